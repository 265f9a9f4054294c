"""Fields shared by every config; each config file overrides what it needs."""
import ml_collections

from lorm_jax import methods


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = 'lorm'              # lorm | fedavg | ... (lorm_jax.methods.METHODS)
  c.seed = 0                     # model init, LoRA init, shuffling, augmentation
  c.overwrite = False            # allow reusing a workdir that holds another config

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'fashion_mnist'
  c.dataset.data_dir = ''        # '' = the loader's default location
  c.dataset.manual_dir = ''      # tfds manual_dir (ImageNet-R/A from local files)
  c.dataset.download = False     # fetch and prepare a missing benchmark (lorm_jax/data/acquire.py)
  c.dataset.store_size = 256     # host storage side of variable-size images
  c.dataset.train_per_class = 0  # 0 = all; else the first N per class in file order
  c.dataset.test_per_class = 0
  c.dataset.preprocess = ''      # augmentation preset name ('' = the dataset's)
  c.image_size = 224             # model input side
  c.augment = True               # training augmentation of the preset

  c.model = ml_collections.ConfigDict()
  c.model.name = 'augreg_b16'    # dinov2_s14 | augreg_b16 | tiny
  c.model.weights = ''           # 'default' (or ''): the backbone's own file; a path; 'random'
  c.model.download = True        # fetch missing pretrained weights (models/backbones.py)
  c.model.rank = 1
  c.model.dtype = 'float32'      # backbone compute dtype: float32 | bfloat16 | auto (the faster here)
  c.model.adapter = 'lora'       # lora | vera | ia3 on qkv, proj, fc1, fc2 (docs/merging.md)
  c.model.vera_rank = 256        # VeRA's r; its frozen projections are drawn from `seed`

  c.num_tasks = 10
  c.classes_per_task = 0         # 0 = num_classes / num_tasks
  c.num_clients = 10
  c.participation_rate = 1.0     # fraction of the task's clients drawn each round, (0, 1]
  c.clients_per_round = 0        # > 0: draw this many each round instead (rate ignored)
  c.beta = 0.5                   # Dirichlet concentration
  c.min_samples = 6              # redraw a task's split until every client has this many
  c.split_seed = 0
  c.split_file = ''              # reuse a split.json written by an earlier run
  c.rounds = 5
  c.local_epochs = 5
  c.batch_size = 16
  c.client_mode = 'vmap'         # vmap: clients in parallel; sequential: lax.map, skips padding
  c.clients_per_chunk = 0        # clients vmapped together; 0: the most that fit the device (sizing.py)
  c.eval_batch_size = 0          # test images per prediction call; 0: the most that fit, <= 256

  c.lr_head = 3e-3
  c.lr_a = 3e-3
  c.lr_b = 3e-3
  c.weight_decay = 0.0
  c.alpha_head = 0.5
  c.alpha_backbone = 0.0
  c.ridge = 1e-6
  c.schedule = 'per_round'       # per_round | per_task | b_only | a_only
  c.lorm_ablation = ''           # diagnostics: '' | mean_deltas | mean_head | own_gram_model
  # Every other method's own hyperparameters, as `config.<method>.<field>`
  # (ewc.lam, lwf.temp, fedproto.ld_reg, ccvr.*, pilora.*), defaults from the
  # method's class (the reference's values; docs/methods.md lists them).
  for name, section in methods.hyperparameter_sections().items():
    c[name] = section

  c.log = ml_collections.ConfigDict()  # metric writers besides metrics.jsonl (lorm_jax/metric_writers.py)
  c.log.tensorboard = False      # event files in <workdir>/tensorboard (tensorboardX)
  c.log.wandb = False            # a W&B run in <workdir>/wandb (pip install -e '.[wandb]')
  c.log.wandb_project = 'lorm_jax'
  c.log.wandb_mode = 'offline'   # offline (wandb sync later) | online | disabled
  return c

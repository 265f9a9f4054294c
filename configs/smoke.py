"""Seconds-long run for tests and CI: a tiny random ViT on Fashion-MNIST.

  python -m experiments.run --config=configs/smoke.py --workdir=/tmp/smoke
"""
from configs import base


def get_config():
  c = base.get_base_config()
  c.seed = 0
  c.dataset.name = 'fashion_mnist'
  c.dataset.train_per_class = 24
  c.dataset.test_per_class = 10
  c.image_size = 28
  c.augment = False
  c.model.name = 'tiny'
  c.model.weights = 'random'
  c.model.rank = 2
  c.num_tasks = 2
  c.classes_per_task = 0
  c.num_clients = 3
  c.beta = 1.0
  c.rounds = 2
  c.local_epochs = 1
  c.batch_size = 8
  c.clients_per_chunk = 3
  c.eval_batch_size = 32
  c.lr_head = 1e-2
  c.lr_a = 1e-2
  c.lr_b = 1e-2
  c.lock()
  return c

"""Synthetic images with the shape of a paper benchmark, for benchmarks.

Nothing is learned from these pixels: they exist so that a whole run at the
paper's sizes (ViT-B/16, 224 px, 200 classes, 24,000 training images) can be
timed on a machine without the data. Pixels are uniform noise from a fixed
seed; labels cycle through the classes, so every class has the same count.
"""
from __future__ import annotations

import numpy as np

from lorm_jax.data.dataset import Dataset

NUM_CLASSES = 200
TRAIN_PER_CLASS = 120  # 24,000 training images, ImageNet-R's training-set size
TEST_PER_CLASS = 30


def synthetic_dataset(size: int, train_per_class: int | None = None,
                      test_per_class: int | None = None, seed: int = 0) -> Dataset:
  """A Dataset of (N, size, size, 3) uint8 noise images over 200 classes.

  train_per_class / test_per_class: images per class (None: 120 / 30).
  """
  n_train = NUM_CLASSES * (train_per_class or TRAIN_PER_CLASS)
  n_test = NUM_CLASSES * (test_per_class or TEST_PER_CLASS)
  rng = np.random.default_rng(seed)
  images = lambda n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = lambda n: (np.arange(n) % NUM_CLASSES).astype(np.int32)
  return Dataset('synthetic', images(n_train), labels(n_train), images(n_test), labels(n_test),
                 NUM_CLASSES, tuple(f'class_{i}' for i in range(NUM_CLASSES)))

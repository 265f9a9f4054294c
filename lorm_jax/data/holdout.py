"""Fixed, seeded train/test split for datasets that ship a single split.

ImageNet-R and ImageNet-A (tfds split ``test`` only) and EuroSAT (tfds split
``train`` only) get an 80/20 split by this rule, applied per class:

1. take the samples of class c and sort them by their key (the base name of
   the ``file_name``/``filename`` feature; ties, or no key, by record index);
2. permute that sorted list with
   ``np.random.default_rng(np.random.SeedSequence([seed, c])).permutation``;
3. the first ``n_c - n_test`` go to train, the rest to test, where
   ``n_test = floor(test_fraction * n_c + 0.5)``, clamped to [1, n_c - 1]
   when n_c >= 2 (a class with a single sample goes to train).

The result depends only on the (label, key) pairs, not on record order, the
machine or the numpy build (PCG64 streams are stable across numpy versions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

HOLDOUT_SEED = 0
TEST_FRACTION = 0.2


def holdout_key(name: str | bytes) -> str:
  """The sort key of one sample: base name of a (possibly absolute) path."""
  if isinstance(name, bytes):
    name = name.decode("utf-8")
  return os.path.basename(name.replace("\\", "/"))


def num_test(n: int, test_fraction: float = TEST_FRACTION) -> int:
  """How many of a class's ``n`` samples go to test."""
  if n < 2:
    return 0
  k = int(np.floor(test_fraction * n + 0.5))
  return min(max(k, 1), n - 1)


def holdout_split(
    labels: np.ndarray,
    keys: Sequence[str] | np.ndarray | None = None,
    test_fraction: float = TEST_FRACTION,
    seed: int = HOLDOUT_SEED,
) -> tuple[np.ndarray, np.ndarray]:
  """Per-class seeded train/test split (rule in the module docstring).

  Args:
    labels: int (N,) labels.
    keys: (N,) stable per-sample strings (file names) or None (record index).
    test_fraction: share of each class sent to test.
    seed: fixed split seed (default ``HOLDOUT_SEED``).

  Returns:
    (train_idx, test_idx): sorted int64 index arrays, disjoint, covering
    range(N).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  if keys is not None and len(keys) != labels.shape[0]:
    raise ValueError(f"{len(keys)} keys for {labels.shape[0]} labels")
  train, test = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if keys is not None:
      # lexsort: last key is primary -> sort by key, ties by record index.
      class_keys = np.array([holdout_key(keys[i]) for i in idx])
      idx = idx[np.lexsort((idx, class_keys))]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(c)]))
    idx = idx[rng.permutation(idx.size)]
    n_tr = idx.size - num_test(idx.size, test_fraction)
    train.append(idx[:n_tr])
    test.append(idx[n_tr:])
  cat = lambda xs: (np.sort(np.concatenate(xs)).astype(np.int64)
                    if xs else np.zeros((0,), np.int64))
  return cat(train), cat(test)

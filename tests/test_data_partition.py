"""Class-incremental tasks and Dirichlet client splits."""

import json
import os

import numpy as np
import pytest

from lorm_jax.data.errors import DataError
from lorm_jax.data.partition import (dirichlet_split, federated_split,
                                     load_split, save_split, task_classes)


def _labels(num_classes=20, per_class=60, seed=0):
  rng = np.random.default_rng(seed)
  return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def test_task_classes_even_and_uneven():
  tasks = task_classes(100, 10)
  assert [t.tolist() for t in tasks[:2]] == [list(range(10)),
                                             list(range(10, 20))]
  cars = task_classes(196, 10, classes_per_task=20)
  assert [len(t) for t in cars] == [20] * 9 + [16]
  np.testing.assert_array_equal(np.concatenate(cars), np.arange(196))
  assert [len(t) for t in task_classes(10, 5)] == [2] * 5
  with pytest.raises(ValueError, match="not divisible.*classes_per_task"):
    task_classes(196, 10)
  with pytest.raises(ValueError, match="into 7 tasks, not num_tasks=10"):
    task_classes(196, 10, classes_per_task=30)


def test_federated_split_covers_every_sample_once():
  labels = _labels()
  split = federated_split(labels, 20, 4, 5, beta=0.5, seed=3)
  assert len(split) == 4 and all(len(t) == 5 for t in split)
  for t, cls in enumerate(task_classes(20, 4)):
    joined = np.concatenate(split[t])
    assert joined.size == np.unique(joined).size       # nothing duplicated
    np.testing.assert_array_equal(                      # nothing lost
        np.sort(joined), np.flatnonzero(np.isin(labels, cls)))
    assert set(labels[joined]) == set(cls.tolist())     # class coverage
    for c in split[t]:
      assert c.dtype == np.int64 and np.all(np.diff(c) > 0)
      assert c.size >= 6                                # min_samples rule


def test_determinism_and_seed_dependence():
  labels = _labels()
  a = federated_split(labels, 20, 4, 5, 0.5, seed=1)
  b = federated_split(labels, 20, 4, 5, 0.5, seed=1)
  c = federated_split(labels, 20, 4, 5, 0.5, seed=2)
  for ta, tb in zip(a, b):
    for ca, cb in zip(ta, tb):
      np.testing.assert_array_equal(ca, cb)
  assert any(not np.array_equal(x, y) for tx, ty in zip(a, c)
             for x, y in zip(tx, ty))


def test_min_samples_forces_redraws():
  labels = _labels(num_classes=4, per_class=15)
  for seed in range(5):
    rng = np.random.default_rng(seed)
    parts = dirichlet_split(labels, [0, 1, 2, 3], 6, beta=0.1, rng=rng,
                            min_samples=8)
    assert min(p.size for p in parts) >= 8
    assert sum(p.size for p in parts) == 60


def test_impossible_and_exhausted():
  labels = _labels(num_classes=2, per_class=10)
  with pytest.raises(ValueError, match="fewer than num_clients"):
    dirichlet_split(labels, [0, 1], 10, 0.5, np.random.default_rng(0),
                    min_samples=3)
  with pytest.raises(ValueError, match="after 3 tries"):
    dirichlet_split(labels, [0, 1], 10, 0.01, np.random.default_rng(0),
                    min_samples=2, max_tries=3)
  with pytest.raises(ValueError, match="beta"):
    dirichlet_split(labels, [0], 2, 0.0, np.random.default_rng(0))


def _mean_client_entropy(labels, split):
  ents = []
  for task in split:
    for c in task:
      p = np.bincount(labels[c]) / c.size
      p = p[p > 0]
      ents.append(-(p * np.log(p)).sum())
  return float(np.mean(ents))


def test_smaller_beta_is_more_non_iid():
  labels = _labels(num_classes=20, per_class=100)
  ent = {b: np.mean([_mean_client_entropy(
      labels, federated_split(labels, 20, 2, 5, b, seed=s))
      for s in range(3)]) for b in (100.0, 1.0, 0.1)}
  assert ent[100.0] > ent[1.0] > ent[0.1]
  assert ent[100.0] > 0.95 * np.log(10)  # near-uniform over a task's classes


def test_per_sample_categorical_counts():
  # With beta large, p is near uniform: client sizes ~ Binomial(n, 1/K).
  labels = np.zeros(10000, np.int64)
  parts = dirichlet_split(labels, [0], 4, 1e4, np.random.default_rng(0))
  sizes = np.array([p.size for p in parts])
  assert np.all(np.abs(sizes - 2500) < 200)


def test_save_load_roundtrip_and_validation(tmp_path):
  labels = _labels()
  split = federated_split(labels, 20, 4, 5, 0.5, seed=0)
  path = str(tmp_path / "split.json")
  save_split(path, split, meta={"beta": 0.5, "seed": 0})
  back = load_split(path, num_samples=labels.size)
  for t, tb in zip(split, back):
    for c, cb in zip(t, tb):
      np.testing.assert_array_equal(c, cb)
      assert cb.dtype == np.int64
  doc = json.load(open(path))
  assert doc["meta"] == {"beta": 0.5, "seed": 0} and doc["num_clients"] == 5

  def broken(mutate):
    d = json.load(open(path))
    mutate(d)
    p = str(tmp_path / "bad.json")
    json.dump(d, open(p, "w"))
    return p

  with pytest.raises(DataError, match="more than once"):
    load_split(broken(lambda d: d["tasks"][0][1].append(d["tasks"][0][0][0])))
  with pytest.raises(DataError, match="num_clients"):
    load_split(broken(lambda d: d["tasks"][1].pop()))
  with pytest.raises(DataError, match="format"):
    load_split(broken(lambda d: d.update(format="other")))
  with pytest.raises(DataError, match="list of integers"):
    load_split(broken(lambda d: d["tasks"][0][0].append(1.5)))
  with pytest.raises(DataError, match=">= num_samples"):
    load_split(path, num_samples=10)
  with pytest.raises(DataError, match="not found"):
    load_split(str(tmp_path / "missing.json"))
  (tmp_path / "junk.json").write_text("{")
  with pytest.raises(DataError, match="JSON"):
    load_split(str(tmp_path / "junk.json"))


def test_check_split_against_data():
  from lorm_jax.data.partition import check_split
  labels = np.repeat(np.arange(4), 5)          # 20 samples, classes 0..3
  tasks = task_classes(4, 2)                   # [0, 1], [2, 3]
  good = [[np.array([0, 5]), np.array([1, 9])], [np.array([10, 15]), np.array([11])]]
  check_split('s.json', good, labels, tasks, num_clients=2)
  with pytest.raises(DataError, match="it has 2 tasks, the config 3"):
    check_split('s.json', good, labels, task_classes(6, 3), num_clients=2)
  with pytest.raises(DataError, match="task 0 has 2 clients, the config num_clients=3"):
    check_split('s.json', good, labels, tasks, num_clients=3)
  past = [good[0], [np.array([10, 20]), np.array([11])]]
  with pytest.raises(DataError, match="index 20, the training set holds 20 samples"):
    check_split('s.json', past, labels, tasks, num_clients=2)
  wrong = [[np.array([0, 10]), np.array([1])], good[1]]
  with pytest.raises(DataError, match="sample 10 of class 2, not one of task 0's classes"):
    check_split('s.json', wrong, labels, tasks, num_clients=2)


def test_shipped_reference_split_fits_the_fmnist_subset():
  """configs/splits/: the PyTorch reference's own split of the first 200
  training images per class: 5 tasks x 10 clients, every index a sample of
  its task's classes, none twice, every client >= 6 samples, all 2000 used."""
  from configs import fmnist_reference
  from lorm_jax.data import dataset as dataset_lib
  from lorm_jax.data import fmnist
  from lorm_jax.data.partition import check_split
  path = fmnist_reference.get_config().split_file
  split = load_split(path)
  assert len(split) == 5 and all(len(t) == 10 for t in split)
  if not os.path.isdir(fmnist.DEFAULT_DIR):
    pytest.skip('Fashion-MNIST (Debian dataset-fashion-mnist) not installed')
  ds = dataset_lib.subsample_dataset(fmnist.load_fashion_mnist(), 200, 200)
  check_split(path, split, ds.train_labels, task_classes(10, 5), num_clients=10)
  every = np.concatenate([np.concatenate(t) for t in split])
  assert np.unique(every).size == every.size == 2000
  assert min(len(c) for t in split for c in t) >= 6

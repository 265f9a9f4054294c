"""Fashion-MNIST idx loader and per-class subsampling."""

import gzip
import os

import numpy as np
import pytest

from lorm_jax.data.dataset import (Dataset, first_per_class_indices,
                                   subsample_dataset, subsample_per_class)
from lorm_jax.data.errors import DataError
from lorm_jax.data.fmnist import DEFAULT_DIR, FILES, load_fashion_mnist


def _idx(arr: np.ndarray) -> bytes:
  magic = 0x800 + arr.ndim
  head = magic.to_bytes(4, "big") + b"".join(
      d.to_bytes(4, "big") for d in arr.shape)
  return head + arr.astype(np.uint8).tobytes()


def _write(folder, n_train=30, n_test=10, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {
      "train_images": rng.integers(0, 256, (n_train, 28, 28), np.uint8),
      "train_labels": np.arange(n_train) % 10,
      "test_images": rng.integers(0, 256, (n_test, 28, 28), np.uint8),
      "test_labels": (np.arange(n_test) * 3) % 10,
  }
  for k, arr in arrays.items():
    data = _idx(arr)
    name = FILES[k] + (".gz" if gz else "")
    with open(os.path.join(folder, name), "wb") as f:
      f.write(gzip.compress(data) if gz else data)
  return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_files(tmp_path, gz):
  arrays = _write(tmp_path, gz=gz)
  ds = load_fashion_mnist(str(tmp_path))
  assert isinstance(ds, Dataset)
  assert ds.train_images.shape == (30, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images[..., 0],
                                arrays["train_images"])
  np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
  assert ds.num_classes == 10 and len(ds.class_names) == 10


def test_missing_file_names_file_and_fix(tmp_path):
  _write(tmp_path)
  os.remove(tmp_path / (FILES["test_labels"] + ".gz"))
  with pytest.raises(DataError) as e:
    load_fashion_mnist(str(tmp_path))
  msg = str(e.value)
  assert "t10k-labels-idx1-ubyte" in msg and str(tmp_path) in msg
  assert "apt-get install dataset-fashion-mnist" in msg
  assert "\n" not in msg


def test_missing_folder(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    load_fashion_mnist(str(tmp_path / "nope"))


def test_bad_magic(tmp_path):
  _write(tmp_path, gz=False)
  path = tmp_path / FILES["train_images"]
  raw = bytearray(path.read_bytes())
  raw[3] = 0x01
  path.write_bytes(bytes(raw))
  with pytest.raises(DataError, match="magic number"):
    load_fashion_mnist(str(tmp_path))


def test_truncated_payload(tmp_path):
  _write(tmp_path, gz=False)
  path = tmp_path / FILES["train_images"]
  path.write_bytes(path.read_bytes()[:-5])
  with pytest.raises(DataError, match="train-images-idx3-ubyte.*data bytes"):
    load_fashion_mnist(str(tmp_path))


def test_corrupt_gzip(tmp_path):
  _write(tmp_path)
  path = tmp_path / (FILES["train_labels"] + ".gz")
  path.write_bytes(path.read_bytes()[:20])
  with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
    load_fashion_mnist(str(tmp_path))


def test_count_mismatch(tmp_path):
  _write(tmp_path)
  lab = np.arange(29) % 10
  with open(tmp_path / (FILES["train_labels"] + ".gz"), "wb") as f:
    f.write(gzip.compress(_idx(lab)))
  with pytest.raises(DataError, match="30 images.*29 labels"):
    load_fashion_mnist(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(DEFAULT_DIR),
                    reason="dataset-fashion-mnist not installed")
def test_default_location_real_files():
  ds = load_fashion_mnist()
  assert ds.train_images.shape == (60000, 28, 28, 1)
  assert ds.test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(ds.train_labels).tolist() == [6000] * 10
  assert ds.train_labels[:5].tolist() == [9, 0, 0, 3, 0]  # file order
  sub = subsample_dataset(ds, 200, 200)
  assert np.bincount(sub.train_labels).tolist() == [200] * 10
  assert np.bincount(sub.test_labels).tolist() == [200] * 10


def test_subsample_per_class_first_in_file_order():
  labels = np.array([2, 0, 2, 1, 0, 2, 1, 0, 1, 2])
  images = np.arange(10)[:, None]
  x, y = subsample_per_class(images, labels, 2)
  assert x[:, 0].tolist() == [0, 1, 2, 3, 4, 6]
  assert y.tolist() == [2, 0, 2, 1, 0, 1]
  assert first_per_class_indices(labels, 3).tolist() == list(range(10))[:9]
  with pytest.raises(ValueError, match="fewer than per_class"):
    first_per_class_indices(labels, 4)

"""Fashion-MNIST from the four original idx files (gzipped or not).

Default location: ``/usr/share/datasets/fashion-mnist/`` (Debian package
``dataset-fashion-mnist``). Images stay uint8 28x28 with one channel; the
on-device preprocessing copies grey to RGB.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from lorm_jax.data.dataset import Dataset
from lorm_jax.data.errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_HOW = ("install it with `apt-get install dataset-fashion-mnist` (files in "
        f"{DEFAULT_DIR}) or point the loader at a folder holding the four idx "
        "files with data_dir= (config key dataset.data_dir)")


def _find(data_dir: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  raise DataError(
      f"Fashion-MNIST file {stem}[.gz] not found in {data_dir}; {_HOW}")


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(
        f"Fashion-MNIST file {path} is unreadable or a corrupt gzip ({e}); "
        f"{_HOW}") from e
  return raw


def read_idx(path: str, expect_ndim: int) -> np.ndarray:
  """Reads an unsigned-byte idx file (optionally gzipped).

  Args:
    path: file path.
    expect_ndim: 1 for label files, 3 for image files.

  Returns:
    uint8 array of the shape stored in the header.

  Raises:
    DataError: wrong magic number or payload size.
  """
  raw = _read_bytes(path)
  magic = _IMAGES_MAGIC if expect_ndim == 3 else _LABELS_MAGIC
  header = 4 + 4 * expect_ndim
  if len(raw) < header:
    raise DataError(
        f"Fashion-MNIST file {path} is truncated ({len(raw)} bytes, header "
        f"needs {header}); {_HOW}")
  got = int.from_bytes(raw[:4], "big")
  if got != magic:
    raise DataError(
        f"Fashion-MNIST file {path} has magic number {got:#010x}, expected "
        f"{magic:#010x} (idx ubyte, {expect_ndim} dims); {_HOW}")
  dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big")
               for i in range(expect_ndim))
  size = int(np.prod(dims))
  if len(raw) - header != size:
    raise DataError(
        f"Fashion-MNIST file {path} holds {len(raw) - header} data bytes, "
        f"header dims {dims} need {size}; {_HOW}")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_pair(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  img_path = _find(data_dir, FILES[f"{split}_images"])
  lab_path = _find(data_dir, FILES[f"{split}_labels"])
  images = read_idx(img_path, 3)
  labels = read_idx(lab_path, 1)
  if images.shape[1:] != (28, 28):
    raise DataError(
        f"Fashion-MNIST file {img_path} holds images of shape "
        f"{images.shape[1:]}, expected (28, 28); {_HOW}")
  if images.shape[0] != labels.shape[0]:
    raise DataError(
        f"Fashion-MNIST {split} split: {images.shape[0]} images in {img_path} "
        f"but {labels.shape[0]} labels in {lab_path}; {_HOW}")
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise DataError(
        f"Fashion-MNIST file {lab_path} holds label {int(labels.max())}, "
        f"expected 0..9; {_HOW}")
  return images[..., None].copy(), labels.astype(np.int32)


def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
  """Loads Fashion-MNIST in file order.

  Args:
    data_dir: folder with the four idx files; None = ``DEFAULT_DIR``.

  Returns:
    Dataset with uint8 images (60000, 28, 28, 1) / (10000, 28, 28, 1) and
    int32 labels, 10 classes.

  Raises:
    DataError: a file is missing or corrupt.
  """
  data_dir = DEFAULT_DIR if data_dir is None else os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(
        f"Fashion-MNIST folder {data_dir} does not exist; {_HOW}")
  tr_x, tr_y = _load_pair(data_dir, "train")
  te_x, te_y = _load_pair(data_dir, "test")
  return Dataset(
      name="fashion_mnist", train_images=tr_x, train_labels=tr_y,
      test_images=te_x, test_labels=te_y, num_classes=len(CLASS_NAMES),
      class_names=CLASS_NAMES)

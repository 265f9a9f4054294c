"""The in-memory dataset container shared by all loaders, and the facts a
registry row holds about a dataset (``registry.py`` lists the rows)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
  """One row of the dataset registry (``lorm_jax.data.registry.DATASETS``).

  Attributes:
    name: registry name (``config.dataset.name``).
    tfds_name: tfds builder name, or None (not a tfds dataset).
    config: tfds builder config (EuroSAT ``rgb``) or None.
    num_classes: classes of the benchmark.
    num_tasks: tasks of the class-incremental benchmark (spec section 1).
    classes_per_task: classes per task (last task may be smaller).
    train_split / test_split: tfds splits, None when the dataset is carved
      from ``holdout_from`` by the fixed 80/20 rule (``holdout.py``).
    load: ``load(facts, data_dir, manual_dir, store_size, train_per_class,
      test_per_class, **kwargs) -> Dataset`` (the registry's loaders).
    preset: name of its preprocessing in ``augment.PRESETS``, or None (a
      config must then name another dataset's, ``dataset.preprocess``).
    aliases: other names accepted for it (``cub200``, ``cifar-100``, ...).
    holdout_from: the single tfds split to carve, or None.
    key_feature: text feature used as a stable sample id, or None.
    native_size: image side of fixed-size datasets (stored as is), or None.
    imagenet_labels: labels are ImageNet-1k ids, compacted to 0..199 in
      ImageNet index (= sorted WordNet id) order.
    manual_tar: archive name accepted in manual_dir (ImageNet-R/A).
  """

  name: str
  tfds_name: str | None
  config: str | None
  num_classes: int
  num_tasks: int
  classes_per_task: int
  train_split: str | None
  test_split: str | None
  load: Callable[..., "Dataset"]
  preset: str | None = None
  aliases: tuple[str, ...] = ()
  holdout_from: str | None = None
  key_feature: str | None = None
  native_size: int | None = None
  imagenet_labels: bool = False
  manual_tar: str | None = None

  @property
  def splits(self) -> tuple[str, ...]:
    """tfds splits read for this dataset."""
    if self.holdout_from is not None:
      return (self.holdout_from,)
    return tuple(s for s in (self.train_split, self.test_split) if s)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification dataset held in host memory at its storage resolution.

  Attributes:
    name: registry name, e.g. ``"cifar100"``.
    train_images: uint8 (N, H, W, C), C = 1 (Fashion-MNIST) or 3.
    train_labels: int32 (N,), values in [0, num_classes).
    test_images: uint8 (M, H, W, C).
    test_labels: int32 (M,).
    num_classes: number of classes of the benchmark.
    class_names: tuple of ``num_classes`` strings, index = label.
    train_keys: optional (N,) numpy str array, a stable per-sample id (file
      name, tfds ``id``...), or None when the source has none.
    test_keys: optional (M,) numpy str array, same meaning.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  train_keys: np.ndarray | None = None
  test_keys: np.ndarray | None = None

  def __post_init__(self):
    for split in ("train", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{split}_images must be uint8 (N, H, W, C), got {images.dtype} "
            f"{images.shape}")
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{split}_labels must be int32 ({images.shape[0]},), got "
            f"{labels.dtype} {labels.shape}")
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise ValueError(
            f"{split}_labels outside [0, {self.num_classes})")
    if len(self.class_names) != self.num_classes:
      raise ValueError(
          f"{len(self.class_names)} class names for {self.num_classes} "
          "classes")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the stored images."""
    return tuple(self.train_images.shape[1:])


def first_per_class_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
  """Indices of the first ``per_class`` samples of every class, file order.

  Args:
    labels: int (N,) labels.
    per_class: how many samples to keep per class (>= 1).

  Returns:
    int64 (K * per_class,) sorted indices into ``labels``, for the K classes
    present.

  Raises:
    ValueError: a present class has fewer than ``per_class`` samples.
  """
  labels = np.asarray(labels)
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  keep = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if idx.size < per_class:
      raise ValueError(
          f"class {int(c)} has {idx.size} samples, fewer than per_class="
          f"{per_class}")
    keep.append(idx[:per_class])
  if not keep:
    return np.zeros((0,), np.int64)
  return np.sort(np.concatenate(keep)).astype(np.int64)


def subsample_per_class(
    images: np.ndarray, labels: np.ndarray, per_class: int
) -> tuple[np.ndarray, np.ndarray]:
  """The first ``per_class`` samples of every class, in file order.

  Args:
    images: (N, ...) array.
    labels: int (N,) labels.
    per_class: samples kept per class.

  Returns:
    (images[idx], labels[idx]) with idx = ``first_per_class_indices``; the
    relative order of the kept samples is the original one.
  """
  idx = first_per_class_indices(labels, per_class)
  return images[idx], labels[idx]


def _first_up_to(labels: np.ndarray, per_class: int | None) -> np.ndarray:
  if per_class is None:
    return np.arange(labels.shape[0])
  labels = np.asarray(labels)
  keep = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
  return np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64)


def subsample_dataset(ds: Dataset, train_per_class: int | None,
                      test_per_class: int | None) -> Dataset:
  """``ds`` restricted to the first samples per class of each split.

  Args:
    ds: dataset.
    train_per_class / test_per_class: keep the first ``n`` samples of every
      class in file order (all of a class's samples when it has fewer);
      None keeps the split whole.

  Returns:
    A new Dataset; arrays are copies, relative order preserved.
  """
  tr = _first_up_to(ds.train_labels, train_per_class)
  te = _first_up_to(ds.test_labels, test_per_class)
  return dataclasses.replace(
      ds,
      train_images=ds.train_images[tr], train_labels=ds.train_labels[tr],
      test_images=ds.test_images[te], test_labels=ds.test_labels[te],
      train_keys=None if ds.train_keys is None else ds.train_keys[tr],
      test_keys=None if ds.test_keys is None else ds.test_keys[te])

"""Writes tiny tfds datasets in the real on-disk format, without TensorFlow.

Each fixture is written by a subclass of the *real* tfds builder (so
``dataset_info.json``, ``features.json``, label files, version folder, file
names and example keys are those of ``tfds build --file_format=array_record``)
whose ``_split_generators`` yields synthetic examples instead of downloading.
Images are passed as already-encoded bytes (PNG or JPEG made with PIL): tfds
stores such bytes as is, while encoding numpy arrays would need TensorFlow.
Every image has one constant colour, so a test can tell which example a
decoded, resized array came from.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


@dataclasses.dataclass(frozen=True)
class FixtureExample:
  """One synthetic example: its split, key feature, label and colour."""

  split: str
  key: str          # value of the dataset's key feature (file name / id)
  label: int        # label as stored by tfds (ImageNet id for IN-R/A)
  color: tuple[int, int, int]
  size: tuple[int, int]  # (H, W) of the encoded image


def imagenet_wnids() -> list[str]:
  """The 1000 ImageNet WordNet ids in label order (tfds' own list)."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  with open(imagenet_common.label_names_file()) as f:
    return [line.strip() for line in f if line.strip()]


def encode(arr: np.ndarray, fmt: str) -> bytes:
  """PNG/JPEG bytes of a uint8 (H, W, C) array."""
  buf = io.BytesIO()
  img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
  img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buf.getvalue()


def _color(k: int) -> tuple[int, int, int]:
  # Distinct, well separated constant colours (JPEG keeps them within ~3).
  return (int(20 + (k * 37) % 216), int(20 + (k * 83) % 216),
          int(20 + (k * 151) % 216))


def _example(name: str, split: str, k: int, label: int, size, wnids):
  """(tfds key, feature dict, FixtureExample) for one synthetic sample."""
  h, w = size
  color = _color(k)
  arr = np.empty((h, w, 3), np.uint8)
  arr[...] = color
  if name == "cifar100":
    key = f"{split}_{k:05d}"
    feats = {"id": key, "image": encode(arr, "PNG"), "label": label,
             "coarse_label": label % 20}
    return key, feats, key
  if name == "imagenet_r":
    wnid = wnids[label]
    fname = f"art_{k}.jpg"
    feats = {"image": encode(arr, "JPEG"), "label": wnid,
             "file_name": f"{wnid}/{fname}"}
    return f"{wnid}_{fname}", feats, f"{wnid}/{fname}"
  if name == "imagenet_a":
    fname = f"0.{k:06d}_thing_{label}.jpg"
    feats = {"image": encode(arr, "JPEG"), "label": wnids[label],
             "file_name": fname}
    return fname, feats, fname
  if name == "eurosat":
    fname = f"Class{label}_{k}.jpg"
    feats = {"image": encode(arr, "JPEG"), "label": label,
             "filename": fname}
    return f"{label}_{fname}", feats, fname
  bbox = tfds.features.BBox(ymin=0.1, xmin=0.2, ymax=0.9, xmax=0.8)
  if name == "cars196":
    key = f"{k:05d}"
    feats = {"image": encode(arr, "JPEG"), "label": label, "bbox": bbox,
             "id": key}
    return key, feats, key
  if name == "caltech_birds2011":
    fname = f"{label:03d}.Bird/Bird_{k}.jpg"
    mask = np.zeros((h, w, 1), np.uint8)
    feats = {"image": encode(arr, "JPEG"), "image/filename": fname,
             "label": label, "label_name": f"{label:03d}.Bird", "bbox": bbox,
             "segmentation_mask": encode(mask, "PNG")}
    return fname, feats, fname
  raise ValueError(name)


TFDS_NAMES = {"cifar100": ("cifar100", None), "imagenet_r": ("imagenet_r", None),
              "imagenet_a": ("imagenet_a", None), "eurosat": ("eurosat", "rgb"),
              "cars196": ("cars196", None),
              "caltech_birds2011": ("caltech_birds2011", None)}


def write_fixture(
    name: str,
    data_dir: str,
    classes: dict[str, list[int]],
    per_class: dict[str, int],
    sizes: list[tuple[int, int]] | None = None,
) -> tuple[str, list[FixtureExample]]:
  """Writes a tiny tfds dataset ``name`` under ``data_dir``.

  Args:
    name: one of the six registry names.
    data_dir: tfds data_dir to write into.
    classes: split -> labels present (ImageNet ids for IN-R/A).
    per_class: split -> examples per class.
    sizes: (H, W) image sizes cycled over examples (fixed-size datasets
      ignore it and use their native size).

  Returns:
    (version folder written, examples in generation order).
  """
  tfds_name, config = TFDS_NAMES[name]
  native = {"cifar100": (32, 32), "eurosat": (64, 64)}.get(name)
  sizes = [native] if native else (sizes or [(40, 56), (64, 48), (50, 50)])
  wnids = imagenet_wnids() if name.startswith("imagenet") else None
  examples: dict[str, list] = {}
  record: list[FixtureExample] = []
  k = 0
  for split, labels in classes.items():
    examples[split] = []
    for label in labels:
      for _ in range(per_class[split]):
        size = sizes[k % len(sizes)]
        key, feats, fkey = _example(name, split, k, label, size, wnids)
        examples[split].append((key, feats))
        record.append(FixtureExample(split, fkey, label, _color(k), size))
        k += 1

  base = tfds.builder_cls(tfds_name)

  def split_generators(self, dl_manager):
    del self, dl_manager
    return {s: iter(list(ex)) for s, ex in examples.items()}

  with tfds.core.registered.skip_registration():
    fake = type(f"Fixture_{tfds_name}", (base,), {
        "name": tfds_name, "_split_generators": split_generators})
  kwargs = {"config": config} if config else {}
  builder = fake(data_dir=os.fspath(data_dir), file_format="array_record",
                 **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))
  return os.fspath(builder.data_dir), record

"""The six paper benchmarks read through tensorflow-datasets, without TensorFlow.

Datasets are read from a *prepared* tfds data_dir in the ``array_record``
format (``tfds build NAME --data_dir=DIR --file_format=array_record`` on a
machine with network, then copy ``DIR/NAME``). Nothing here downloads: the
dataset folder is checked first and a missing one raises ``DataError`` at
once. ImageNet-R / ImageNet-A can also be prepared here, offline, from the
original tar files in a ``manual_dir`` (see ``prepare_from_manual_dir``).

Images are decoded on the host (PIL) to uint8 RGB and brought to one storage
size so a split is a single (N, S, S, 3) array:

* fixed-size datasets keep their native size (CIFAR-100 32, EuroSAT 64);
* the others (ImageNet-R/A, Cars-196, CUB-200) are resized so the shorter
  side is ``store_size`` (PIL bicubic, antialiased, torchvision ``Resize(int)``
  rounding) and centre-cropped to ``store_size`` x ``store_size``
  (``resize_mode="center_crop"``, default), or resized directly to a square
  (``resize_mode="stretch"``, keeps all content, distorts aspect).

With ``store_size=256`` the default test transform (resize 256 + centre crop
224) sees exactly the pixels the reference pipeline sees; random resized crops
are drawn from the central square instead of the full rectangle.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import re
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np

from lorm_jax.data.dataset import Dataset, DatasetFacts
from lorm_jax.data.errors import DataError
from lorm_jax.data.holdout import HOLDOUT_SEED, TEST_FRACTION, holdout_split


RESIZE_MODES = ("center_crop", "stretch")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def _facts(name: str) -> DatasetFacts:
  """The registry's entry for ``name`` (``lorm_jax.data.registry``; imported
  here, not at the top: the registry imports this module for its loader)."""
  from lorm_jax.data import registry  # pylint: disable=import-outside-toplevel
  return registry.facts(name)


def default_data_dir() -> str:
  """tfds' default data_dir: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.environ.get(
      "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"),
                                    "tensorflow_datasets"))


def _how_to_prepare(f: DatasetFacts, data_dir: str) -> str:
  cfg = f"/{f.config}" if f.config else ""
  how = (f"prepare it on a machine with network and TensorFlow with `tfds "
         f"build {f.tfds_name}{cfg} --data_dir=DIR --file_format=array_record` "
         f"(add --manual_dir=M for manually downloaded files) and copy "
         f"DIR/{f.tfds_name} into {data_dir}, or point data_dir (config key "
         f"dataset.data_dir) at an existing tfds data_dir")
  if f.manual_tar:
    how += (f", or put {f.manual_tar} (or its extracted "
            f"{f.manual_tar[:-4]}/ folder) in a folder M and pass "
            f"manual_dir=M (config key dataset.manual_dir) to prepare it "
            f"here offline")
  return how


def _version_key(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in v.split("."))


def find_prepared_dir(name: str, data_dir: str | None = None) -> str:
  """The prepared tfds folder ``data_dir/tfds_name[/config]/VERSION``.

  Picks the highest version folder holding ``dataset_info.json``. Only looks
  at the local file system.

  Raises:
    DataError: no prepared version exists.
  """
  f = _facts(name)
  if f.tfds_name is None:
    raise ValueError(f"{f.name} is not a tfds dataset")
  data_dir = default_data_dir() if data_dir is None else os.fspath(data_dir)
  root = os.path.join(data_dir, f.tfds_name, *([f.config] if f.config else []))
  versions = []
  if os.path.isdir(root):
    versions = [v for v in os.listdir(root) if _VERSION_RE.match(v)
                and os.path.isfile(os.path.join(root, v, "dataset_info.json"))]
  if not versions:
    raise DataError(
        f"{f.name}: no prepared tfds dataset found, looked for "
        f"{root}/<version>/dataset_info.json; {_how_to_prepare(f, data_dir)}")
  return os.path.join(root, max(versions, key=_version_key))


# ----------------------------------------------------------------- decoding


def to_storage(data: bytes, size: int | None,
               resize_mode: str = "center_crop") -> np.ndarray:
  """Decodes one encoded image to uint8 RGB (size, size, 3).

  Args:
    data: encoded image bytes (JPEG/PNG...).
    size: output side, or None to keep the decoded size.
    resize_mode: ``"center_crop"`` (shorter side to ``size`` then centre
      crop) or ``"stretch"`` (direct resize to size x size). Bicubic.

  Returns:
    uint8 (size, size, 3), or (H, W, 3) when ``size`` is None.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  img = Image.open(io.BytesIO(data))
  img = img.convert("RGB")
  w, h = img.size
  if size is None or (w == size and h == size):
    return np.asarray(img, dtype=np.uint8)
  if resize_mode == "stretch":
    img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)
  if resize_mode != "center_crop":
    raise ValueError(f"resize_mode must be one of {RESIZE_MODES}")
  if w <= h:  # torchvision Resize(int) rounding
    ow, oh = size, int(size * h / w)
  else:
    ow, oh = int(size * w / h), size
  img = img.resize((ow, oh), Image.BICUBIC)
  left = int(round((ow - size) / 2.0))
  top = int(round((oh - size) / 2.0))
  img = img.crop((left, top, left + size, top + size))
  return np.asarray(img, dtype=np.uint8)


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


_CHUNK = 256


def _image_features(features) -> list[str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return [k for k, v in features.items()
          if isinstance(v, tfds.features.Image)]


def _open_source(builder, split: str, name: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = {k: tfds.decode.SkipDecoding()
              for k in _image_features(builder.info.features)}
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except (NotImplementedError, ValueError, KeyError) as e:
    raise DataError(
        f"{name}: cannot open split {split!r} of {builder.data_dir} as a "
        f"random-access array_record source ({e}); rebuild it with `tfds "
        f"build ... --file_format=array_record`") from e


def _read_meta(source, key_feature: str | None
               ) -> tuple[np.ndarray, list[str] | None]:
  """Labels (int64 (N,)) and keys of every record of a data source."""
  n = len(source)
  labels = np.empty((n,), np.int64)
  keys: list[str] | None = [] if key_feature else None
  for start in range(0, n, _CHUNK):
    recs = source.__getitems__(list(range(start, min(n, start + _CHUNK))))
    for i, r in enumerate(recs):
      labels[start + i] = int(r["label"])
      if keys is not None:
        keys.append(_text(r[key_feature]))
  return labels, keys


def _decode_records(source, records: np.ndarray, out: np.ndarray,
                    size: int | None, resize_mode: str,
                    pool: concurrent.futures.Executor, name: str) -> None:
  """Decodes ``source[records[k]]`` into ``out[k]`` for every k."""
  for start in range(0, records.size, _CHUNK):
    idx = [int(i) for i in records[start:start + _CHUNK]]
    recs = source.__getitems__(idx)
    datas = [r["image"] for r in recs]
    try:
      arrays = list(pool.map(
          lambda d: to_storage(d, size, resize_mode), datas))
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
      raise DataError(
          f"{name}: an image among records {idx[0]}..{idx[-1]} cannot be "
          f"decoded ({e}); the prepared dataset is corrupt, rebuild it") from e
    for k, a in enumerate(arrays):
      if a.shape != out.shape[1:]:
        raise DataError(
            f"{name}: record {idx[k]} decoded to {a.shape}, expected "
            f"{out.shape[1:]}; pass store_size or rebuild the dataset")
      out[start + k] = a


def _compact_labels(labels: np.ndarray, names: Sequence[str]
                    ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Maps the present ImageNet ids to 0..K-1 in id order."""
  present = np.unique(labels)
  lut = np.full((max(len(names), int(present.max()) + 1),), -1, np.int64)
  lut[present] = np.arange(present.size)
  return lut[labels], tuple(names[int(p)] for p in present)


def load_tfds_dataset(
    name: str,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    store_size: int | None = 256,
    resize_mode: str = "center_crop",
    strict: bool = True,
    num_workers: int | None = None,
) -> Dataset:
  """Loads one of the six tfds benchmarks into memory.

  Args:
    name: registry name (``cifar100``, ``imagenet_r``, ``imagenet_a``,
      ``eurosat``, ``cars196``, ``caltech_birds2011``) or an alias.
    data_dir: tfds data_dir holding the prepared dataset; None = tfds default.
    manual_dir: ImageNet-R/A only: folder with the original tar (or extracted
      folder), used to prepare the dataset offline when it is missing.
    store_size: storage side for variable-size datasets (fixed-size ones keep
      their native size).
    resize_mode: ``"center_crop"`` or ``"stretch"`` (see module docstring).
    strict: require every class of the benchmark in both splits (and, for
      ImageNet-R/A, exactly 200 ImageNet classes).
    num_workers: decoding threads (default: CPU count).

  Returns:
    Dataset with uint8 (N, S, S, 3) images and int32 labels; records keep
    the order of the tfds array_record files (holdout datasets: sorted record
    index within each part).

  Raises:
    DataError: dataset missing or unreadable (raised before any tfds call
      when the folder is missing).
  """
  f = _facts(name)
  if f.tfds_name is None:
    raise ValueError(f"{f.name} is not a tfds dataset; use load_dataset")
  if resize_mode not in RESIZE_MODES:
    raise ValueError(f"resize_mode must be one of {RESIZE_MODES}")
  data_dir = default_data_dir() if data_dir is None else os.fspath(data_dir)
  version_dir = _prepared_version_dir(f, data_dir, manual_dir)
  builder, label_names, key_feature = _open_builder(f, version_dir, data_dir)
  size = f.native_size if f.native_size is not None else store_size
  parts = _record_parts(builder, f, key_feature)
  parts, num_classes, class_names = _class_labels(f, parts, label_names, version_dir,
                                                  data_dir, strict)
  (tr_x, tr_y, tr_k), (te_x, te_y, te_k) = _decode_parts(f, parts, size, resize_mode,
                                                         num_workers)
  return Dataset(
      name=f.name, train_images=tr_x, train_labels=tr_y, test_images=te_x,
      test_labels=te_y, num_classes=num_classes, class_names=class_names,
      train_keys=tr_k, test_keys=te_k)


def _prepared_version_dir(f: DatasetFacts, data_dir: str, manual_dir: str | None) -> str:
  """The prepared dataset's version folder; ImageNet-R/A are prepared from
  manual_dir first when missing. DataError when neither is possible."""
  try:
    return find_prepared_dir(f.name, data_dir)
  except DataError:
    if manual_dir is None:
      raise
    if f.manual_tar is None:
      raise DataError(
          f"{f.name}: not prepared under {data_dir} and offline preparation "
          f"from manual_dir is only implemented for ImageNet-R/A; "
          f"{_how_to_prepare(f, data_dir)}") from None
    prepare_from_manual_dir(f.name, data_dir, manual_dir)
    return find_prepared_dir(f.name, data_dir)


def _open_builder(f: DatasetFacts, version_dir: str, data_dir: str):
  """(tfds builder, label names, key feature or None), checking that the
  prepared dataset has an image and a label feature and every needed split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder_from_directory(version_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"{f.name}: cannot read the tfds metadata in {version_dir} ({e}); "
        f"{_how_to_prepare(f, data_dir)}") from e
  feats = builder.info.features
  missing = [k for k in ("image", "label") if k not in feats]
  if missing:
    raise DataError(
        f"{f.name}: {version_dir} has no feature(s) {missing}; is it the "
        f"right dataset? {_how_to_prepare(f, data_dir)}")
  label_names = tuple(feats["label"].names)
  key_feature = f.key_feature if f.key_feature in feats else None
  avail = set(builder.info.splits.keys())
  for s in f.splits:
    if s not in avail:
      raise DataError(
          f"{f.name}: split {s!r} missing in {version_dir} (has "
          f"{sorted(avail)}); {_how_to_prepare(f, data_dir)}")
  return builder, label_names, key_feature


def _record_parts(builder, f: DatasetFacts, key_feature: str | None) -> list[tuple]:
  """[(source, record ids, labels, keys)] for train and test: two tfds splits,
  or the seeded holdout of one split (ImageNet-R/A, EuroSAT)."""
  parts = []
  if f.holdout_from is not None:
    src = _open_source(builder, f.holdout_from, f.name)
    labels, keys = _read_meta(src, key_feature)
    tr, te = holdout_split(labels, keys, TEST_FRACTION, HOLDOUT_SEED)
    for ids in (tr, te):
      parts.append((src, ids, labels[ids],
                    None if keys is None else [keys[i] for i in ids]))
  else:
    for s in (f.train_split, f.test_split):
      src = _open_source(builder, s, f.name)
      labels, keys = _read_meta(src, key_feature)
      parts.append((src, np.arange(len(src)), labels, keys))
  return parts


def _class_labels(f: DatasetFacts, parts: list[tuple], label_names: tuple, version_dir: str,
                  data_dir: str, strict: bool) -> tuple[list[tuple], int, tuple]:
  """(parts with the benchmark's labels, number of classes, class names):
  ImageNet ids compacted to 0..K-1 for ImageNet-R/A; DataError when classes
  are missing (strict) or the count is not the benchmark's."""
  all_labels = np.concatenate([p[2] for p in parts])
  if f.imagenet_labels:
    compact, class_names = _compact_labels(all_labels, label_names)
    n_tr = parts[0][2].size
    parts[0] = parts[0][:2] + (compact[:n_tr],) + parts[0][3:]
    parts[1] = parts[1][:2] + (compact[n_tr:],) + parts[1][3:]
    num_classes = len(class_names)
    if strict and num_classes != f.num_classes:
      raise DataError(
          f"{f.name}: {version_dir} holds {num_classes} ImageNet classes, "
          f"expected {f.num_classes}; the prepared dataset is incomplete, "
          f"{_how_to_prepare(f, data_dir)}")
  else:
    num_classes = len(label_names)
    class_names = label_names
    if num_classes != f.num_classes:
      raise DataError(
          f"{f.name}: {version_dir} declares {num_classes} classes, expected "
          f"{f.num_classes}; is it the right dataset? "
          f"{_how_to_prepare(f, data_dir)}")
  if strict:
    for (_, _, lab, _), split in zip(parts, ("train", "test")):
      got = np.unique(lab).size
      if got != num_classes:
        raise DataError(
            f"{f.name}: the {split} part of {version_dir} holds {got} of "
            f"{num_classes} classes; the prepared dataset is incomplete, "
            f"{_how_to_prepare(f, data_dir)}")
  return parts, num_classes, class_names


def _decode_parts(f: DatasetFacts, parts: list[tuple], size: int | None, resize_mode: str,
                  num_workers: int | None) -> list[tuple]:
  """[(uint8 (N, S, S, 3) images, int32 labels, keys or None)] per part,
  decoded by a thread pool."""
  workers = num_workers or os.cpu_count() or 1
  out = []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for src, ids, lab, keys in parts:
      if size is None:
        raise ValueError(f"{f.name} needs a store_size")
      images = np.empty((ids.size, size, size, 3), np.uint8)
      _decode_records(src, ids, images, size, resize_mode, pool, f.name)
      out.append((images, lab.astype(np.int32),
                  None if keys is None else np.asarray(keys, dtype=str)))
  return out


# ---------------------------------------------- offline ImageNet-R/A prepare


def _manual_source(f: DatasetFacts, manual_dir: str) -> str:
  folder = os.path.join(manual_dir, f.manual_tar[:-4])
  tar = os.path.join(manual_dir, f.manual_tar)
  if os.path.isdir(folder):
    return folder
  if os.path.isfile(tar):
    return tar
  raise DataError(
      f"{f.name}: neither {tar} nor {folder}/ found in manual_dir; download "
      f"{f.manual_tar} (https://people.eecs.berkeley.edu/~hendrycks/"
      f"{f.manual_tar}) on a machine with network and put it there")


def _iter_manual(source: str, root_name: str
                 ) -> Iterator[tuple[str, str, bytes]]:
  """(synset, file name, bytes) for every image of the original layout."""
  if os.path.isdir(source):
    for synset in sorted(os.listdir(source)):
      class_dir = os.path.join(source, synset)
      if not os.path.isdir(class_dir):
        continue
      for fname in sorted(os.listdir(class_dir)):
        with open(os.path.join(class_dir, fname), "rb") as fh:
          yield synset, fname, fh.read()
    return
  with tarfile.open(source) as tar:
    for member in tar:
      parts = member.name.strip("/").split("/")
      if not member.isfile() or len(parts) != 3 or parts[0] != root_name:
        continue
      fh = tar.extractfile(member)
      yield parts[1], parts[2], fh.read()


def prepare_from_manual_dir(name: str, data_dir: str, manual_dir: str) -> str:
  """Writes ImageNet-R/A as a tfds array_record dataset, offline, no TF.

  Uses the real tfds builder (same name, version, features, example keys and
  feature values as ``tfds build``), but reads ``imagenet-r.tar`` /
  ``imagenet-a.tar`` or the extracted folder from ``manual_dir`` with plain
  Python instead of downloading and of ``tf.io.gfile``.

  Returns:
    The written version folder.
  """
  f = _facts(name)
  if f.manual_tar is None:
    raise ValueError(f"offline preparation supports ImageNet-R/A, not {name}")
  source = _manual_source(f, os.fspath(manual_dir))
  root_name = f.manual_tar[:-4]

  is_r = f.name == "imagenet_r"

  def examples():
    for synset, fname, data in _iter_manual(source, root_name):
      if is_r:  # mirrors imagenet_r_dataset_builder (0.2.0)
        yield f"{synset}_{fname}", {"image": data, "label": synset,
                                    "file_name": f"{synset}/{fname}"}
      else:  # mirrors imagenet_a_dataset_builder (0.1.0)
        yield fname, {"image": data, "label": synset, "file_name": fname}

  return write_offline(f.name, data_dir,
                       lambda builder: {f.holdout_from: examples()},
                       manual_dir=manual_dir)


def write_offline(name: str, data_dir: str | os.PathLike,
                  split_examples, manual_dir: str | os.PathLike | None = None) -> str:
  """Writes a dataset with the real tfds builder of ``name`` (its name,
  version, config, features and file layout: what ``tfds build
  --file_format=array_record`` writes), from examples made here instead of
  the builder's own download and TensorFlow-based reading.

  Args:
    name: registry name (its tfds builder and config are used).
    data_dir: tfds data_dir to write into.
    split_examples: ``fn(builder) -> {split: iterator of (key, example)}``;
      examples hold already-encoded image bytes (tfds stores them as they
      are; encoding arrays would need TensorFlow). It may set label names on
      ``builder.info.features`` first, as the real builders do.
    manual_dir: passed to tfds' DownloadConfig (unused by the examples).

  Returns:
    The written version folder.
  """
  f = _facts(name)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  base = tfds.builder_cls(f.tfds_name)

  def split_generators(self, dl_manager):
    del dl_manager
    return split_examples(self)

  with tfds.core.registered.skip_registration():
    offline = type(f"Offline_{f.tfds_name}", (base,), {
        "name": f.tfds_name,
        "_split_generators": split_generators,
        "_generate_examples": lambda self, **kw: iter(()),
    })
  kwargs = {"config": f.config} if f.config else {}
  builder = offline(data_dir=os.fspath(data_dir), file_format="array_record", **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir) if manual_dir else None, try_download_gcs=False))
  return os.fspath(builder.data_dir)

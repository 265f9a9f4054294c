"""tfds loading on tiny datasets written in the real array_record format."""

import io
import os
import socket
import sys
import tarfile
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_tfds import encode, imagenet_wnids, write_fixture  # noqa: E402

from lorm_jax.data import tfds_source  # noqa: E402
from lorm_jax.data.errors import DataError  # noqa: E402
from lorm_jax.data.holdout import holdout_split  # noqa: E402
from lorm_jax.data.registry import DATASETS, facts, load_dataset  # noqa: E402
from lorm_jax.data.tfds_source import find_prepared_dir, to_storage  # noqa: E402

# (classes present, per-class counts). Holdout datasets write their single
# tfds split; the others write train and test.
SPECS = {
    "cifar100": ({"train": [0, 5, 99], "test": [0, 5, 99]},
                 {"train": 3, "test": 2}),
    "imagenet_r": ({"test": [1, 7, 999]}, {"test": 7}),
    "imagenet_a": ({"test": [6, 11]}, {"test": 6}),
    "eurosat": ({"train": list(range(10))}, {"train": 5}),
    "cars196": ({"train": [0, 17, 195], "test": [0, 17, 195]},
                {"train": 2, "test": 2}),
    "caltech_birds2011": ({"train": [0, 3, 199], "test": [0, 3, 199]},
                          {"train": 2, "test": 1}),
}
STORE = 24


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """name -> (data_dir, version dir, fixture examples)."""
  out = {}
  for name, (classes, per_class) in SPECS.items():
    d = str(tmp_path_factory.mktemp(name))
    vdir, record = write_fixture(name, d, classes, per_class)
    out[name] = (d, vdir, record)
  return out


@pytest.fixture
def no_network(monkeypatch):
  """Any socket connection attempt fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_fixture_is_the_real_on_disk_format(written):
  d, vdir, _ = written["imagenet_r"]
  files = sorted(os.listdir(vdir))
  assert "dataset_info.json" in files and "features.json" in files
  assert any(f.startswith("imagenet_r-test.array_record-") for f in files)
  assert vdir == os.path.join(d, "imagenet_r", "0.2.0")
  assert find_prepared_dir("eurosat", written["eurosat"][0]).endswith(
      os.path.join("eurosat", "rgb", "2.0.0"))
  # tfds' own public entry point opens it too, without TensorFlow.
  import tensorflow_datasets as tfds
  src = tfds.data_source("imagenet_r", data_dir=d, split="test",
                         download=False)
  assert len(src) == 21
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("name", sorted(SPECS))
def test_loads_every_benchmark(written, no_network, name):
  d, _, record = written[name]
  f = facts(name)
  ds = load_dataset(name, d, store_size=STORE, strict=False, num_workers=2)
  side = f.native_size or STORE
  for x, y, keys in ((ds.train_images, ds.train_labels, ds.train_keys),
                     (ds.test_images, ds.test_labels, ds.test_keys)):
    assert x.dtype == np.uint8 and x.shape[1:] == (side, side, 3)
    assert y.dtype == np.int32 and y.shape == x.shape[:1]
    assert keys is not None and keys.shape == y.shape
  assert ds.train_images.shape[0] + ds.test_images.shape[0] == len(record)
  by_key = {r.key: r for r in record}
  if f.imagenet_labels:
    present = sorted({r.label for r in record})  # ImageNet ids, ascending
    remap = {lab: i for i, lab in enumerate(present)}
    wnids = imagenet_wnids()
    assert ds.class_names == tuple(wnids[p] for p in present)
  else:
    remap = {r.label: r.label for r in record}
    assert ds.num_classes == f.num_classes
  for x, y, keys, split in ((ds.train_images, ds.train_labels,
                             ds.train_keys, "train"),
                            (ds.test_images, ds.test_labels, ds.test_keys,
                             "test")):
    for img, lab, key in zip(x, y, keys):
      r = by_key[str(key)]
      assert lab == remap[r.label]
      if f.holdout_from is None:
        assert r.split == split
      # constant-colour images survive decode + resize (+ JPEG) closely
      np.testing.assert_allclose(img.reshape(-1, 3).mean(0), r.color, atol=4)
  if f.holdout_from is not None:
    labels = np.array([r.label for r in record])
    keys = [r.key for r in record]
    tr, te = holdout_split(labels, keys)
    assert set(ds.train_keys) == {keys[i] for i in tr}
    assert set(ds.test_keys) == {keys[i] for i in te}


def test_strict_mode_rejects_incomplete_datasets(written):
  d = written["imagenet_r"][0]
  with pytest.raises(DataError, match="3 ImageNet classes, expected 200"):
    load_dataset("imagenet_r", d, store_size=STORE)
  d = written["cifar100"][0]
  with pytest.raises(DataError, match="holds 3 of 100 classes"):
    load_dataset("cifar100", d)
  # EuroSAT fixture has all 10 classes: strict passes.
  ds = load_dataset("eurosat", written["eurosat"][0])
  assert ds.num_classes == 10 and ds.train_images.shape[0] == 40
  assert np.bincount(ds.test_labels).tolist() == [1] * 10


@pytest.mark.parametrize(
    "name", sorted(k for k in DATASETS if k not in ("fashion_mnist", "synthetic")))
def test_missing_dataset_fails_fast(tmp_path, no_network, name):
  t0 = time.monotonic()
  with pytest.raises(DataError) as e:
    load_dataset(name, str(tmp_path / "empty"), store_size=STORE)
  assert time.monotonic() - t0 < 2.0
  msg = str(e.value)
  assert "\n" not in msg
  assert str(tmp_path / "empty" / facts(name).tfds_name) in msg
  assert "tfds build" in msg and "--file_format=array_record" in msg
  if facts(name).manual_tar:
    assert "manual_dir" in msg


def test_missing_split_message(tmp_path):
  # A prepared folder lacking the test split.
  d = str(tmp_path)
  write_fixture("cars196", d, {"train": [0]}, {"train": 1})
  with pytest.raises(DataError, match="split 'test' missing"):
    load_dataset("cars196", d, strict=False)


def test_unknown_name():
  with pytest.raises(ValueError, match="unknown dataset"):
    load_dataset("mnist3d")
  assert facts("cub200").name == "caltech_birds2011"


def _imagenet_tar(path, root, members):
  with tarfile.open(path, "w") as tar:
    readme = b"readme"
    info = tarfile.TarInfo(f"{root}/README.txt")
    info.size = len(readme)
    tar.addfile(info, io.BytesIO(readme))
    for rel, data in members:
      info = tarfile.TarInfo(f"{root}/{rel}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _color_image(k, h=30, w=20):
  arr = np.zeros((h, w, 3), np.uint8)
  arr[...] = (10 * k % 250, 100, 200)
  return encode(arr, "JPEG")


def test_manual_dir_tar_prepares_imagenet_r_offline(tmp_path, no_network,
                                                    written):
  manual = tmp_path / "manual"
  manual.mkdir()
  wnids = imagenet_wnids()
  members = [(f"{wnids[c]}/img_{i}.jpg", _color_image(i))
             for c in (1, 7, 999) for i in range(7)]
  _imagenet_tar(manual / "imagenet-r.tar", "imagenet-r", members)
  data_dir = str(tmp_path / "tfds")
  ds = load_dataset("imagenet_r", data_dir, manual_dir=str(manual),
                    store_size=STORE, strict=False)
  assert ds.train_images.shape[0] + ds.test_images.shape[0] == 21
  assert ds.class_names == (wnids[1], wnids[7], wnids[999])
  assert sorted(ds.train_keys.tolist() + ds.test_keys.tolist()) == sorted(
      m[0] for m in members)
  vdir = find_prepared_dir("imagenet_r", data_dir)
  # Same features.json as a builder-written dataset of the same version.
  ref = written["imagenet_r"][1]
  with open(os.path.join(vdir, "features.json")) as a, \
      open(os.path.join(ref, "features.json")) as b:
    assert a.read() == b.read()
  # Second call reuses the prepared data.
  ds2 = load_dataset("imagenet_r", data_dir, manual_dir=str(manual),
                     store_size=STORE, strict=False)
  np.testing.assert_array_equal(ds.train_images, ds2.train_images)


def test_manual_dir_folder_prepares_imagenet_a(tmp_path, no_network):
  manual = tmp_path / "manual"
  wnids = imagenet_wnids()
  for c in (6, 11):
    os.makedirs(manual / "imagenet-a" / wnids[c])
    for i in range(5):
      (manual / "imagenet-a" / wnids[c] / f"{c}_{i}.jpg").write_bytes(
          _color_image(i, 17, 33))
  (manual / "imagenet-a" / "README.txt").write_text("readme")
  ds = load_dataset("imagenet_a", str(tmp_path / "tfds"),
                    manual_dir=str(manual), store_size=STORE, strict=False)
  assert ds.train_labels.size == 8 and ds.test_labels.size == 2
  assert set(ds.test_keys) | set(ds.train_keys) == {
      f"{c}_{i}.jpg" for c in (6, 11) for i in range(5)}


def test_manual_dir_without_archive(tmp_path, no_network):
  with pytest.raises(DataError, match="imagenet-r.tar"):
    load_dataset("imagenet_r", str(tmp_path / "tfds"),
                 manual_dir=str(tmp_path))
  with pytest.raises(DataError, match="only implemented for ImageNet-R/A"):
    load_dataset("cars196", str(tmp_path / "tfds"), manual_dir=str(tmp_path))


def test_to_storage_center_crop_and_stretch():
  arr = np.zeros((40, 80, 3), np.uint8)
  arr[:, :12] = 255   # left strip white: cropped away by the centre crop
  data = encode(arr, "PNG")
  out = to_storage(data, 20)
  assert out.shape == (20, 20, 3) and out.max() <= 2
  out = to_storage(data, 20, "stretch")
  assert out.shape == (20, 20, 3) and out[:, :2].min() >= 250
  assert to_storage(data, None).shape == (40, 80, 3)
  grey = encode(np.full((8, 8, 1), 77, np.uint8), "PNG")
  np.testing.assert_array_equal(to_storage(grey, 8), np.full((8, 8, 3), 77))


def test_registry_facts():
  expect = {"cifar100": 100, "imagenet_r": 200, "imagenet_a": 200,
            "eurosat": 10, "cars196": 196, "caltech_birds2011": 200,
            "fashion_mnist": 10, "synthetic": 200}
  assert {k: v.num_classes for k, v in DATASETS.items()} == expect
  for f in DATASETS.values():
    assert -(-f.num_classes // f.classes_per_task) == f.num_tasks
  assert DATASETS["eurosat"].config == "rgb"
  assert DATASETS["imagenet_r"].splits == ("test",)


def test_synthetic_dataset_generates_only_what_it_is_asked():
  ds = load_dataset("synthetic", store_size=16, train_per_class=2, test_per_class=1)
  assert ds.train_images.shape == (400, 16, 16, 3) and ds.test_images.shape == (200, 16, 16, 3)
  assert np.bincount(ds.train_labels).tolist() == [2] * 200
  again = load_dataset("synthetic", store_size=16, train_per_class=2, test_per_class=1)
  np.testing.assert_array_equal(ds.train_images, again.train_images)

"""Downloads against a loopback server: resume, verification, cache, mirrors,
and the no-TensorFlow preparation of the downloaded archives."""
from __future__ import annotations

import hashlib
import io
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lorm_jax import download
from lorm_jax.data import acquire, registry, tfds_source
from lorm_jax.data.errors import DataError
from lorm_jax.models import augreg_b16, pretrained
from tests import loopback


def _payload(n: int = 300_000, seed: int = 0) -> bytes:
  return np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()


@pytest.fixture()
def served(tmp_path):
  """A folder with one 300 kB file, served on 127.0.0.1."""
  folder = tmp_path / 'www'
  folder.mkdir()
  data = _payload()
  (folder / 'blob.bin').write_bytes(data)
  with loopback.serve(folder) as server:
    yield server, data


def _remote(server, data, **kw):
  return download.Remote(f'{server.url}/blob.bin', sha256=hashlib.sha256(data).hexdigest(),
                         size=len(data), **kw)


def test_fetch_verifies_then_reuses_the_cache_without_network(served, tmp_path):
  server, data = served
  dest = tmp_path / 'cache' / 'blob.bin'
  assert download.fetch(_remote(server, data), dest, progress=False) == dest
  assert dest.read_bytes() == data
  assert not dest.with_name('blob.bin.part').exists()
  server.shutdown()   # the server is gone: a second fetch must not need it
  server.server_close()
  assert download.fetch(_remote(server, data), dest, progress=False).read_bytes() == data
  assert server.requests == [('blob.bin', 0)]


def test_a_cut_connection_is_resumed_with_a_range_request(tmp_path):
  folder = tmp_path / 'www'
  folder.mkdir()
  data = _payload()
  (folder / 'blob.bin').write_bytes(data)
  with loopback.serve(folder, cut_once={'blob.bin': 100_000}) as server:
    dest = download.fetch(_remote(server, data), tmp_path / 'blob.bin', progress=False)
    assert dest.read_bytes() == data
    assert server.requests == [('blob.bin', 0), ('blob.bin', 100_000)]


def test_a_partial_file_of_an_earlier_run_is_resumed(served, tmp_path):
  server, data = served
  dest = tmp_path / 'blob.bin'
  dest.with_name('blob.bin.part').write_bytes(data[:123_456])
  download.fetch(_remote(server, data), dest, progress=False)
  assert dest.read_bytes() == data
  assert server.requests == [('blob.bin', 123_456)]


def test_checksum_mismatch_is_refused_and_removed(served, tmp_path):
  server, data = served
  dest = tmp_path / 'blob.bin'
  bad = download.Remote(f'{server.url}/blob.bin', sha256='0' * 64)
  with pytest.raises(download.DownloadError) as e:
    download.fetch(bad, dest, progress=False)
  msg = str(e.value)
  assert 'sha256' in msg and 'removed' in msg and '\n' not in msg
  assert not dest.exists() and not dest.with_name('blob.bin.part').exists()
  with pytest.raises(download.DownloadError, match='bytes, expected'):
    download.fetch(download.Remote(f'{server.url}/blob.bin', size=len(data) - 1), dest,
                   progress=False)


def test_verify_function_refuses_the_wrong_content(served, tmp_path):
  server, data = served

  def not_npz(path):
    raise ValueError('not an npz')
  with pytest.raises(download.DownloadError, match='not the expected file'):
    download.fetch(_remote(server, data), tmp_path / 'blob.bin', verify=not_npz, progress=False)
  assert not list(tmp_path.glob('blob.bin*'))


def test_no_server_fails_fast_in_one_line(tmp_path):
  start = time.time()
  with pytest.raises(download.DownloadError) as e:
    download.fetch(download.Remote('http://127.0.0.1:9/x/blob.bin'), tmp_path / 'blob.bin',
                   progress=False, timeout=2)
  assert time.time() - start < 10
  msg = str(e.value)
  assert 'http://127.0.0.1:9/x/blob.bin' in msg and str(tmp_path / 'blob.bin') in msg
  assert '\n' not in msg
  with pytest.raises(download.DownloadError, match='HTTP 404'):
    with loopback.serve(tmp_path) as server:
      download.fetch(download.Remote(f'{server.url}/missing.bin'), tmp_path / 'm.bin',
                     progress=False)


def test_mirror_replaces_the_url_and_states_its_checksums(served, tmp_path, monkeypatch):
  server, data = served
  folder = tmp_path / 'www'
  loopback.write_sums(folder)
  monkeypatch.setenv(download.MIRROR_ENV, server.url + '/')
  remote = download.Remote('https://example.invalid/files/blob.bin', sha256='1' * 64)
  url, sha, _ = download.source(remote)
  assert url == f'{server.url}/blob.bin' and sha == hashlib.sha256(data).hexdigest()
  assert download.fetch(remote, tmp_path / 'blob.bin', progress=False).read_bytes() == data
  # A mirror without SHA256SUMS: the pin applies (and here refuses the file).
  (folder / 'SHA256SUMS').unlink()
  with pytest.raises(download.DownloadError, match='sha256'):
    download.fetch(remote, tmp_path / 'again.bin', progress=False)


def test_augreg_download_checks_the_npz_and_records_its_sha256(tmp_path, monkeypatch):
  www = tmp_path / 'www'
  www.mkdir()
  name = augreg_b16.WEIGHTS_FILE
  np.savez(www / name, **loopback.augreg_arrays())
  with loopback.serve(www) as server:
    monkeypatch.setenv(download.MIRROR_ENV, server.url)
    out = pretrained.resolve_weights('augreg_b16', 'default', cache_dir=tmp_path / 'cache')
    assert out == tmp_path / 'cache' / name and out.is_file()
    assert Path(f'{out}.sha256').read_text().split()[0] == download.sha256_file(out)
    assert set(pretrained.read_weights(out, 'augreg_tiny')) >= {'patch_kernel', 'pos_embed'}
    # Not an AugReg checkpoint: refused, nothing left in the cache.
    np.savez(www / name, foo=np.zeros(3))
    with pytest.raises(download.DownloadError, match='not an AugReg ViT checkpoint'):
      augreg_b16.fetch(tmp_path / 'cache2' / name, progress=False)
    assert not (tmp_path / 'cache2' / name).exists()


# ------------------------------------------------ archives prepared without TensorFlow


def _cifar100_tar(path: Path, n_train: int = 12, n_test: int = 6) -> np.ndarray:
  rng = np.random.default_rng(1)

  def records(n):
    rows = np.zeros((n, 3074), np.uint8)
    rows[:, 0] = np.arange(n) % 20
    rows[:, 1] = (np.arange(n) * 7) % 100
    rows[:, 2:] = rng.integers(0, 256, (n, 3072))
    return rows
  train, test = records(n_train), records(n_test)
  with tarfile.open(path, 'w:gz') as tar:
    files = {'train.bin': train.tobytes(), 'test.bin': test.tobytes(),
             'fine_label_names.txt': '\n'.join(f'fine{i}' for i in range(100)).encode(),
             'coarse_label_names.txt': '\n'.join(f'coarse{i}' for i in range(20)).encode()}
    for name, blob in files.items():
      info = tarfile.TarInfo(f'cifar-100-binary/{name}')
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return train


EUROSAT = ['AnnualCrop', 'Forest', 'HerbaceousVegetation', 'Highway', 'Industrial', 'Pasture',
           'PermanentCrop', 'Residential', 'River', 'SeaLake']


def _eurosat_zip(path: Path) -> None:
  from PIL import Image
  with zipfile.ZipFile(path, 'w') as zf:
    for c, name in enumerate(EUROSAT):
      for i in range(2):
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), 20 * c, np.uint8)).save(buf, format='JPEG')
        zf.writestr(f'2750/{name}/{name}_{i + 1}.jpg', buf.getvalue())


def test_cifar100_and_eurosat_are_downloaded_and_prepared_without_tensorflow(
    tmp_path, monkeypatch):
  www = tmp_path / 'www'
  www.mkdir()
  train = _cifar100_tar(www / 'cifar-100-binary.tar.gz')
  _eurosat_zip(www / 'EuroSAT.zip')
  loopback.write_sums(www)
  data_dir = str(tmp_path / 'tfds')
  with loopback.serve(www) as server:
    monkeypatch.setenv(download.MIRROR_ENV, server.url)
    vdir = acquire.ensure_dataset('cifar100', data_dir, progress=False)
    assert vdir.endswith('cifar100/3.0.2')
    acquire.ensure_dataset('eurosat', data_dir, progress=False)
  ds = registry.load_dataset('cifar100', data_dir, strict=False)
  assert ds.train_images.shape == (12, 32, 32, 3) and ds.test_images.shape == (6, 32, 32, 3)
  order = np.argsort(ds.train_keys)   # ids train_00000.. in file order
  np.testing.assert_array_equal(ds.train_images[order],
                                train[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(ds.train_labels[order], train[:, 1])
  assert ds.class_names[:2] == ('fine0', 'fine1')
  eu = registry.load_dataset('eurosat', data_dir, strict=False)
  assert eu.train_images.shape[0] + eu.test_images.shape[0] == 20 and eu.num_classes == 10
  # Prepared: a second call never touches the (now gone) server.
  assert acquire.ensure_dataset('cifar100', data_dir, progress=False) == vdir


def test_datasets_that_need_tensorflow_say_how_in_one_line(tmp_path):
  with pytest.raises(DataError) as e:
    acquire.ensure_dataset('cars196', str(tmp_path))
  msg = str(e.value)
  assert 'tfds build cars196' in msg and '--file_format=array_record' in msg and '\n' not in msg


def test_offline_imagenet_r_fails_fast_naming_url_and_path(tmp_path, monkeypatch):
  monkeypatch.setenv(download.MIRROR_ENV, 'http://127.0.0.1:9/mirror')
  start = time.time()
  with pytest.raises(download.DownloadError) as e:
    acquire.ensure_dataset('imagenet_r', str(tmp_path), progress=False)
  assert time.time() - start < 10
  msg = str(e.value)
  assert 'http://127.0.0.1:9/mirror/imagenet-r.tar' in msg
  assert str(tmp_path / 'downloads' / 'lorm_jax' / 'imagenet-r.tar') in msg


def test_prepare_command_fetches_what_a_paper_config_needs(tmp_path):
  import os
  import subprocess
  import sys
  www = tmp_path / 'www'
  www.mkdir()
  _cifar100_tar(www / 'cifar-100-binary.tar.gz')
  np.savez(www / augreg_b16.WEIGHTS_FILE, **loopback.augreg_arrays())
  loopback.write_sums(www)
  env = {**os.environ, 'LORM_JAX_CACHE': str(tmp_path / 'cache'), 'JAX_PLATFORMS': 'cpu'}
  cmd = [sys.executable, '-m', 'experiments.prepare', '--config=configs/cifar100.py',
         f'--config.dataset.data_dir={tmp_path / "tfds"}']
  root = Path(__file__).resolve().parent.parent
  with loopback.serve(www) as server:
    env[download.MIRROR_ENV] = server.url
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'cifar100/3.0.2' in out.stdout
  assert (tmp_path / 'cache' / augreg_b16.WEIGHTS_FILE).is_file()
  # Offline now, and prepared: the same command succeeds without a server.
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]

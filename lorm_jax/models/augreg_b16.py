"""The paper's backbone: AugReg ViT-B/16 pre-trained on ImageNet-21k (docs/weights.md).

Steiner et al., "How to train your ViT?"; the original Flax ViT
(google-research/vision_transformer) uses flax.linen.gelu, whose default is
the tanh approximation, and no LayerScale. Its `.npz` holds the original
names; `augreg.load_augreg_npz` converts them to the canonical layout.

The file is fetched into the cache on first use (`fetch`): streamed,
resumed, checked to open as an AugReg ViT checkpoint (no checksum is
published, so none is pinned; the sha256 it arrived with is written beside
it), `$LORM_JAX_MIRROR` honoured (lorm_jax/download.py).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lorm_jax import download
from lorm_jax.models import augreg

NAME = 'augreg_b16'
ARCHITECTURE = dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                    layerscale=False, ln_eps=1e-6, gelu_approximate=True)

URL = ('https://storage.googleapis.com/vit_models/augreg/'
       'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz')
WEIGHTS_FILE = 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz'
# The publisher lists no checksum (its README gives the size as 391 MiB).
REMOTE = download.Remote(URL)


def read(path: str | os.PathLike) -> dict:
  """The AugReg .npz as a canonical dict (CheckpointError when it is not one)."""
  return augreg.load_augreg_npz(path)


def fetch(dest: str | os.PathLike, *, url: str = URL, timeout: float = 10.0,
          progress: bool = True) -> Path:
  """dest, downloaded first when missing (~391 MiB) and checked to be an
  AugReg ViT checkpoint before it is renamed into place; its sha256 is
  written to `<dest>.sha256` and printed. DownloadError (one line) when there
  is no network or what arrived is not such a checkpoint (it is removed)."""
  dest = Path(dest).expanduser()
  if dest.is_file():
    return dest
  download.fetch(dataclasses.replace(REMOTE, url=url, name=dest.name), dest,
                 verify=read, timeout=timeout, progress=progress, what='AugReg ViT-B/16')
  digest = download.sha256_file(dest)
  Path(f'{dest}.sha256').write_text(f'{digest}  {dest.name}\n')
  print(f'AugReg ViT-B/16: {dest} (sha256 {digest})', flush=True)
  return dest

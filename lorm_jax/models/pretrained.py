"""Pretrained weights into a model: which file, fetched when missing, read, loaded.

  path = pretrained.resolve_weights('augreg_b16', 'default', download=True)
  pretrained.load_backbone(model, 'augreg_b16', path)

`model.weights` is 'default' (the backbone's own pretrained file in the cache,
`backbones.Backbone.weights_file`), a path, or 'random' (no file). A missing
file is fetched when `download` is on and some backbone knows how to fetch a
file of that name; otherwise it is one CheckpointError line naming the path.
Files are read as canonical `.npz` (our format, any backbone) or in the
backbone's native format (`Backbone.read`). See docs/weights.md.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lorm_jax import download
from lorm_jax.errors import CheckpointError
from lorm_jax.models import backbones, npz, vit


def resolve_weights(model_name: str, weights: str, *, download_missing: bool = True,
                    cache_dir: str | os.PathLike | None = None) -> Path | None:
  """The checkpoint file a run loads (None for 'random'), fetched first when
  missing and `download_missing` (and a backbone knows the file's source).

  Raises CheckpointError (one line) when it is missing and cannot be fetched,
  DownloadError when fetching fails.
  """
  if weights == 'random':
    return None
  b = backbones.get(model_name)
  if weights in ('', 'default'):
    if b.weights_file is None:
      raise CheckpointError(f"model {b.name!r} has no default pretrained weights; give "
                            f"model.weights=PATH or 'random'")
    path = download.cache_dir(cache_dir) / b.weights_file
  else:
    path = Path(weights)
  path = path.expanduser()
  if path.is_file():
    return path
  source = next((x for x in backbones.BACKBONES.values()
                 if x.weights_file == path.name and x.fetch is not None), None)
  if source is None:
    raise CheckpointError(f'{path}: checkpoint file not found (and no backbone knows where '
                          f'a file of that name comes from); place it there or set '
                          f'model.weights')
  if not download_missing:
    raise CheckpointError(f'{path}: checkpoint file not found; run with model.download=True '
                          f'(needs a network once) or place the file there')
  return source.fetch(path)


def read_weights(path: str | os.PathLike, model_name: str | None = None
                 ) -> dict[str, np.ndarray]:
  """An .npz as the canonical dict: our format as it is, else the native format
  of `model_name`'s backbone (its `read`)."""
  path = Path(path).expanduser()
  if npz.is_canonical(path):
    return npz.load_npz(path)
  reader = backbones.get(model_name).read if model_name else None
  if reader is None:
    names = npz.array_names(path)
    raise CheckpointError(f'{path}: not a canonical checkpoint (no patch_kernel; found e.g. '
                          f'{sorted(names)[:3]}) and model {model_name!r} reads no other '
                          f'format')
  return reader(path)


def load_backbone(model: vit.ViT, model_name: str, path: str | os.PathLike) -> Path:
  """Loads the checkpoint at path into `model` (LoRA factors and head untouched)."""
  npz.load_pretrained(model, read_weights(path, model_name), source=str(path))
  return Path(path)

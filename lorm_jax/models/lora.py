"""A frozen linear layer with an adapter: y = x @ (W0 + dW) + bias, trained through dW's vectors.

The adapter is LoRA by default (dW = a @ b, no alpha/r scaling); VeRA and
(IA)^3 are the other rows of `adapters.ADAPTERS`, which says what each layer
holds and computes. Variable types keep the parts separable (`nnx.split` by
type): the frozen kernel and bias are nnx.Param (VeRA's shared frozen
projections a VeraProjection, also an nnx.Param), the trained values LoraA
and LoraB (LoRA: a (in, r), b (r, out); VeRA: d (r,), b (out,); (IA)^3: its
vector in LoraB), and a Gram pass sows the layer input's Gram as a GramStat.
Flax layout: the kernel is (in, out).
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lorm_jax import grams as grams_lib
from lorm_jax.models import adapters

GramMode = Literal['diag', 'full'] | None


class LoraA(nnx.Variable):
  """The adapter's first slot: LoRA's a (in, r), VeRA's d (r,)."""


class LoraB(nnx.Variable):
  """The adapter's second slot: LoRA's b (r, out), VeRA's b (out,), (IA)^3's vector."""


class VeraProjection(nnx.Param):
  """A frozen random VeRA projection (A (in, r) or B (r, out)), one per layer
  shape, shared by the layers of that shape; part of the frozen backbone, never
  trained nor sent, and no checkpoint parameter (`npz` loads exact nnx.Param only)."""


class GramStat(nnx.Variable):
  """A Gram statistic sown by a layer during a Gram pass."""


class KernelT(nnx.Variable):
  """The frozen kernel transposed, (out, in), in the compute dtype: derived
  from the kernel by a compute view for one pass, never stored or trained."""


class LoRALinear(nnx.Module):
  """y = x @ W0 + adapter(x) + bias, with W0 (in, out) frozen.

  LoRA: a initialised U(-1/sqrt(in), 1/sqrt(in)) and b = 0; every adapter
  starts at dW = 0, so a fresh layer computes exactly x @ W0 + bias. `kind`
  ('qkv', 'proj', 'fc1', 'fc2') says whether and how the adapter adapts the
  layer; an unadapted one holds no trained values and sows no Gram.
  `projections`: VeRA's shared (A, B) VeraProjection pair of this shape.
  """

  def __init__(self, in_features: int, out_features: int, rank: int, *,
               dtype: str, rngs: nnx.Rngs, adapter: str = 'lora', kind: str = '',
               projections: tuple[VeraProjection, VeraProjection] | None = None):
    spec = adapters.get(adapter)
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (in_features, out_features))
                            * (1.0 / math.sqrt(in_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))
    # Every adapter draws the key LoRA's a is drawn from, so the backbone's
    # random init is the same whichever adapter the model holds.
    a, b = spec.layer_init(kind, in_features, out_features, rank, rngs.params())
    self.lora_a = LoraA(a) if a is not None else None
    self.lora_b = LoraB(b) if b is not None else None
    self.vera_a, self.vera_b = projections if projections is not None else (None, None)
    # The compute view's transposed kernel (out, in) in the compute dtype
    # (`functional.FunctionalViT.compute_view`); None: derived from the kernel here.
    self.kernel_t: KernelT | None = nnx.data(None)
    self.dtype = dtype
    self.adapter = adapter
    self.kind = kind
    self.adapted = b is not None

  def __call__(self, x: jax.Array, gram_mode: GramMode = None,
               sample_weights: jax.Array | None = None) -> jax.Array:
    if self.adapted and gram_mode == 'diag':
      self.gram = GramStat(grams_lib.gram_diag(x, sample_weights))
    elif self.adapted and gram_mode == 'full':
      self.gram = GramStat(grams_lib.gram_full(x, sample_weights))
    dt = jnp.dtype(self.dtype)
    low_rank = lambda v, a, b: lora_product(v.astype(dt), a.astype(dt), b.astype(dt))
    get = lambda var: None if var is None else var[...]
    proj = None if self.vera_a is None else (self.vera_a[...], self.vera_b[...])
    y = adapters.get(self.adapter).forward(self.kind, x, self._dot, low_rank, get(self.lora_a),
                                           get(self.lora_b), proj)
    return y + self.bias[...]

  def _dot(self, x: jax.Array) -> jax.Array:
    """x (..., in) @ W0 in the compute dtype, summed and returned in float32."""
    dt = jnp.dtype(self.dtype)
    w = self.kernel[...].astype(dt)
    if dt == jnp.float32:
      return jnp.dot(x, w, preferred_element_type=jnp.float32)
    # the transposed kernel of a compute view (already dt), else derived here (slower on CPU)
    return low_precision_dot(x, w, w.T if self.kernel_t is None else self.kernel_t[...])


@jax.custom_vjp
def low_precision_dot(x: jax.Array, w: jax.Array, w_t: jax.Array) -> jax.Array:
  """x (..., in) @ w (in, out) with x rounded to w's (reduced) dtype, summed in
  float32: a float32 result, and a float32 input gradient summed likewise from
  the cotangent rounded to w's dtype (torch's 'medium' float32 matmuls).

  w_t is w transposed, (out, in), materialised outside the training loop
  (`functional.FunctionalViT.compute_view`): the backward product g @ w^T
  reads it in its natural layout. XLA:CPU runs a bfloat16 dot whose right
  operand is contracted on its last axis, as autodiff's transpose of x @ w
  is, in float32 (an upcast, ~6x slower than the bfloat16 dot with AMX;
  docs/performance.md).
  """
  del w_t
  return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _lpd_fwd(x, w, w_t):
  return low_precision_dot(x, w, w_t), (x, w, w_t)


def _lpd_bwd(res, g):
  x, w, w_t = res
  g2 = g.reshape(-1, g.shape[-1]).astype(w.dtype)
  dx = jnp.dot(g2, w_t, preferred_element_type=jnp.float32)
  x2 = x.reshape(-1, x.shape[-1]).astype(w.dtype)
  dw = jnp.dot(x2.T, g2, preferred_element_type=jnp.float32)
  return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype), jnp.zeros_like(w_t)


low_precision_dot.defvjp(_lpd_fwd, _lpd_bwd)


@jax.custom_vjp
def lora_product(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """(x @ a) @ b for x (..., in), a (in, r), b (r, out), accumulated in float32.

  The backward pass is written out as plain row-major GEMMs over the flattened
  tokens. With autodiff's version, XLA's CPU layout assignment writes the
  (tokens, out) cotangent transposed inside a loop fusion to feed the (r, out)
  weight gradient, a strided copy that made training 3-5x slower than the
  FLOPs warrant (profiled: docs/performance.md).
  """
  low = jnp.dot(x, a, preferred_element_type=jnp.float32)
  return jnp.dot(low.astype(b.dtype), b, preferred_element_type=jnp.float32)


def _lora_fwd(x, a, b):
  low = jnp.dot(x, a, preferred_element_type=jnp.float32)
  out = jnp.dot(low.astype(b.dtype), b, preferred_element_type=jnp.float32)
  return out, (x, a, b, low)


def _lora_bwd(res, g):
  x, a, b, low = res
  g2 = g.reshape(-1, g.shape[-1]).astype(b.dtype)
  x2 = x.reshape(-1, x.shape[-1])
  low2 = low.reshape(-1, low.shape[-1]).astype(b.dtype)
  dlow = jnp.dot(g2, b.T, preferred_element_type=jnp.float32)          # (T, r)
  db = jnp.dot(low2.T, g2, preferred_element_type=jnp.float32)         # (r, out)
  da = jnp.dot(x2.T, dlow.astype(x.dtype), preferred_element_type=jnp.float32)  # (in, r)
  dx = jnp.dot(dlow.astype(a.dtype), a.T, preferred_element_type=jnp.float32)   # (T, in)
  return (dx.reshape(x.shape).astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype))


lora_product.defvjp(_lora_fwd, _lora_bwd)

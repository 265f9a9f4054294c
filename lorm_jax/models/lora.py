"""LoRA on a frozen linear layer: y = x @ (W0 + a @ b) + bias, trained through a and b.

Variable types keep the parts separable (`nnx.split` by type): the frozen
kernel and bias are nnx.Param, the factors LoraA (in, r) and LoraB (r, out),
and a Gram pass sows the layer input's Gram as a GramStat. Flax layout: the
kernel is (in, out) and the adapted kernel W0 + a @ b, with no alpha/r
scaling.
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lorm_jax import grams as grams_lib

GramMode = Literal['diag', 'full'] | None


class LoraA(nnx.Variable):
  """LoRA down-projection a, shape (in, r)."""


class LoraB(nnx.Variable):
  """LoRA up-projection b, shape (r, out)."""


class GramStat(nnx.Variable):
  """A Gram statistic sown by a layer during a Gram pass."""


class KernelT(nnx.Variable):
  """The frozen kernel transposed, (out, in), in the compute dtype: derived
  from the kernel by a compute view for one pass, never stored or trained."""


class LoRALinear(nnx.Module):
  """y = x @ W0 + (x @ a) @ b + bias, with W0 (in, out) frozen.

  a is initialised U(-1/sqrt(in), 1/sqrt(in)) and b = 0, so a fresh layer
  computes exactly x @ W0 + bias.
  """

  def __init__(self, in_features: int, out_features: int, rank: int, *,
               dtype: str, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(in_features)
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (in_features, out_features))
                            * (1.0 / math.sqrt(in_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))
    self.lora_a = LoraA(jax.random.uniform(rngs.params(), (in_features, rank),
                                           minval=-bound, maxval=bound))
    self.lora_b = LoraB(jnp.zeros((rank, out_features)))
    # The compute view's transposed kernel (out, in) in the compute dtype
    # (`functional.FunctionalViT.compute_view`); None: derived from the kernel here.
    self.kernel_t: KernelT | None = nnx.data(None)
    self.dtype = dtype

  def __call__(self, x: jax.Array, gram_mode: GramMode = None,
               sample_weights: jax.Array | None = None) -> jax.Array:
    if gram_mode == 'diag':
      self.gram = GramStat(grams_lib.gram_diag(x, sample_weights))
    elif gram_mode == 'full':
      self.gram = GramStat(grams_lib.gram_full(x, sample_weights))
    dt = jnp.dtype(self.dtype)
    w = self.kernel[...].astype(dt)
    if dt == jnp.float32:
      y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    else:  # the transposed kernel of a compute view (already dt), else derived here (slower on CPU)
      y = low_precision_dot(x, w, w.T if self.kernel_t is None else self.kernel_t[...])
    y = y + lora_product(x.astype(dt), self.lora_a[...].astype(dt), self.lora_b[...].astype(dt))
    return y + self.bias[...]


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

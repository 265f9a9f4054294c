"""Gram statistics of layer inputs, the sufficient statistics of the LoRM merge.

For a linear layer with input rows x (all tokens of all images), the merge
needs G = X^T X (in, in), or only its diagonal when alpha = 0. These
functions are pure and cheap so the model can fuse them into its forward pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _rows_and_weights(x: jax.Array, sample_weights: jax.Array | None):
  """Flattens x (B, ..., in) to rows (B*T, in) and per-row weights (B*T,)."""
  b, d = x.shape[0], x.shape[-1]
  rows = x.reshape(b, -1, d)
  if sample_weights is None:
    return rows, None
  return rows, sample_weights.astype(jnp.float32)


def gram_full(x: jax.Array, sample_weights: jax.Array | None = None) -> jax.Array:
  """Returns sum over samples b and tokens n of w_b x_bn x_bn^T, shape (in, in).

  x: (B, in) or (B, N, in); sample_weights: (B,) (e.g. a 0/1 padding mask).
  Accumulates in float32 whatever the input dtype.
  """
  rows, w = _rows_and_weights(x, sample_weights)
  rows = rows.astype(jnp.float32)
  if w is None:
    return jnp.einsum('bni,bnj->ij', rows, rows)
  return jnp.einsum('bni,bnj->ij', rows * w[:, None, None], rows)


def gram_diag(x: jax.Array, sample_weights: jax.Array | None = None) -> jax.Array:
  """Returns the diagonal of `gram_full(x, sample_weights)`, shape (in,)."""
  rows, w = _rows_and_weights(x, sample_weights)
  sq = jnp.square(rows.astype(jnp.float32))
  if w is None:
    return jnp.sum(sq, axis=(0, 1))
  return jnp.einsum('bni,b->i', sq, w)

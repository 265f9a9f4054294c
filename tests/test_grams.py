"""Tests of lorm_jax.grams against float64 numpy."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lorm_jax.grams import gram_diag, gram_full


def _ref_full(x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
  """float64 sum_b w_b sum_n x_bn x_bn^T; x (B, in) or (B, N, in) -> (in, in)."""
  x = np.asarray(x, np.float64)
  rows = x.reshape(x.shape[0], -1, x.shape[-1])
  w = np.ones(x.shape[0]) if w is None else np.asarray(w, np.float64)
  return np.einsum('b,bni,bnj->ij', w, rows, rows)


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
  return float(np.linalg.norm(np.asarray(x, np.float64) - ref) /
               np.linalg.norm(ref))


@pytest.mark.parametrize('shape', [(32, 24), (6, 17, 24)])
@pytest.mark.parametrize('weighted', [False, True])
def test_gram_matches_float64(shape: tuple[int, ...], weighted: bool) -> None:
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  w = rng.uniform(0.0, 2.0, size=shape[0]).astype(np.float32) if weighted else None
  w_j = None if w is None else jnp.asarray(w)
  ref = _ref_full(x, w)
  full = gram_full(jnp.asarray(x), w_j)
  diag = gram_diag(jnp.asarray(x), w_j)
  assert full.shape == (shape[-1], shape[-1]) and full.dtype == jnp.float32
  assert diag.shape == (shape[-1],) and diag.dtype == jnp.float32
  assert _rel(full, ref) < 1e-5
  assert _rel(diag, np.diagonal(ref)) < 1e-5
  np.testing.assert_allclose(np.asarray(full), np.asarray(full).T, rtol=1e-6,
                             atol=1e-6 * np.abs(ref).max())


def test_zero_weight_drops_sample() -> None:
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 5, 8)).astype(np.float32)
  w = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  kept = gram_full(jnp.asarray(x[::2]))
  np.testing.assert_allclose(gram_full(jnp.asarray(x), jnp.asarray(w)), kept,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gram_diag(jnp.asarray(x), jnp.asarray(w)),
                             gram_diag(jnp.asarray(x[::2])), rtol=1e-5)


@pytest.mark.parametrize('weighted', [False, True])
def test_bf16_input_accumulates_in_float32(weighted: bool) -> None:
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(8, 33, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.uniform(0.5, 1.5, size=8), jnp.float32) if weighted else None
  ref = _ref_full(np.asarray(x.astype(jnp.float32)), None if w is None else
                  np.asarray(w))
  full, diag = gram_full(x, w), gram_diag(x, w)
  assert full.dtype == jnp.float32 and diag.dtype == jnp.float32
  assert _rel(full, ref) < 1e-5
  assert _rel(diag, np.diagonal(ref)) < 1e-5


def test_bf16_long_sum_does_not_saturate() -> None:
  # 4096 rows of ones: a bfloat16 accumulator (8-bit mantissa) stalls at 256.
  x = jnp.ones((64, 64, 4), jnp.bfloat16)
  np.testing.assert_array_equal(gram_diag(x), np.full(4, 4096.0, np.float32))
  np.testing.assert_array_equal(gram_full(x), np.full((4, 4), 4096.0, np.float32))

"""Tests of lorm_jax.merge against float64 numpy least squares.

The JAX side runs in float32; references are numpy float64. The reference
solves the stacked least-squares problem min sum_i w_i ||X_i (m - m_i)||^2
with X_i^T X_i = G~_i (Cholesky of G~_i, eigh when singular) by
np.linalg.lstsq, whose minimum-norm answer is the float64 pseudo-inverse
answer on singular systems.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference64 import (rand_grams, rand_normal, rand_weights, reg_grams64, rel_err, root64,
                         weights64)

from lorm_jax import merge as M

# ------------------------------------------------------- float64 references


def _lstsq_stacked(roots: list[np.ndarray], targets: list[np.ndarray]) -> np.ndarray:
  """min_m sum_i ||roots_i m - targets_i||^2 by np.linalg.lstsq (min-norm)."""
  return np.linalg.lstsq(np.concatenate(roots), np.concatenate(targets),
                         rcond=None)[0]


def _ref_regmean(k: np.ndarray, grams: np.ndarray, alpha: float,
                 weights: np.ndarray | None = None) -> np.ndarray:
  """argmin_m sum_i w_i ||X_i (m - k_i)||^2; k (C, n, o) -> (n, o) float64."""
  gt = reg_grams64(grams, alpha)
  w = weights64(weights, k.shape[0])
  roots = [np.sqrt(wi) * root64(gi) for gi, wi in zip(gt, w) if wi != 0]
  ks = [ki for ki, wi in zip(np.asarray(k, np.float64), w) if wi != 0]
  return _lstsq_stacked(roots, [x @ ki for x, ki in zip(roots, ks)])


def _ref_merge_b(b: np.ndarray, a: np.ndarray, grams: np.ndarray, alpha: float,
                 weights: np.ndarray | None = None) -> np.ndarray:
  """argmin_m sum_i w_i ||X_i a (m - b_i)||^2; b (C, r, o), a (n, r) -> (r, o)."""
  gt = reg_grams64(grams, alpha)
  w = weights64(weights, b.shape[0])
  a = np.asarray(a, np.float64)
  ys = [np.sqrt(wi) * root64(gi) @ a for gi, wi in zip(gt, w) if wi != 0]
  bs = [bi for bi, wi in zip(np.asarray(b, np.float64), w) if wi != 0]
  return _lstsq_stacked(ys, [y @ bi for y, bi in zip(ys, bs)])


# ------------------------------------------------------------- problems
# Most tests share one small shape (C, N, R, O) so that the jitted functions
# compile once per (shape, alpha) and the file stays fast.
C, N, R, O = 4, 48, 4, 24


# (alpha, rank, in, out of b, out of the regmean kernel, clients, weighted).
# The two (C, R) cases with in/out (N, O) and (O, N) are also the two layer
# kinds of the tree tests, which then reuse their compiled per-leaf calls.
CASES = [
    (0.0, 16, 256, 96, 64, 16, True),
    (0.3, R, N, O, O, C, True),
    (0.3, R, O, N, N, C, True),
    (0.3, 16, 768, 2304, 200, 2, False),  # ViT-B qkv-sized b, head-sized kernel
    (1.0, 1, 64, 32, 32, 1, False),
]


@pytest.fixture(scope='module', params=CASES,
                ids=lambda c: 'alpha{}-r{}-{}x{}-C{}'.format(c[0], c[1], c[2], c[3], c[5]))
def problem(request: pytest.FixtureRequest) -> dict:
  alpha, r, n, o, ok, c, weighted = request.param
  rng = np.random.default_rng(sum(map(hash, request.param)) % 2**32)
  grams = rand_grams(rng, c, n, full=alpha > 0 or c > 8)
  a, k = rand_normal(rng, c, n, r), rand_normal(rng, c, n, ok) * 0.1
  b, a0 = rand_normal(rng, c, r, o), rand_normal(rng, n, r)
  w = rand_weights(rng, c) if weighted else None
  # merge_a and regmean solve the same system: one lstsq for both.
  ref_ak = _ref_regmean(np.concatenate([a, k], axis=2), grams, alpha, w)
  return dict(alpha=alpha, grams=grams, a=a, k=k, b=b, a0=a0, w=w,
              ref_a=ref_ak[:, :r], ref_k=ref_ak[:, r:],
              ref_b=_ref_merge_b(b, a0, grams, alpha, w))


def test_merge_a_matches_float64(problem: dict) -> None:
  p = problem
  out = M.merge_a(p['a'], p['grams'], p['alpha'], p['w'])
  assert out.shape == p['a'].shape[1:] and out.dtype == jnp.float32
  assert rel_err(out, p['ref_a']) < 1e-4
  if p['a'].shape[0] == 1:  # a single client is a fixed point
    assert rel_err(out, p['a'][0]) < 1e-5


def test_merge_b_matches_float64(problem: dict) -> None:
  p = problem
  out = M.merge_b(p['b'], p['a0'], p['grams'], p['alpha'], p['w'])
  assert out.shape == p['b'].shape[1:] and out.dtype == jnp.float32
  assert rel_err(out, p['ref_b']) < 1e-4
  if p['b'].shape[0] == 1:
    assert rel_err(out, p['b'][0]) < 1e-5


def test_regmean_matches_float64(problem: dict) -> None:
  p = problem
  out = M.regmean(p['k'], p['grams'], p['alpha'], p['w'])
  assert out.shape == p['k'].shape[1:] and out.dtype == jnp.float32
  assert rel_err(out, p['ref_k']) < 1e-4


# ------------------------------------------------------------ properties


@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_identical_clients_give_their_factor(alpha: float) -> None:
  rng = np.random.default_rng(3)
  grams, w = rand_grams(rng, C, N), rand_weights(rng, C)
  a, b = rand_normal(rng, N, R), rand_normal(rng, R, O)
  k = rand_normal(rng, N, O)
  same = lambda x: np.stack([x] * C)
  assert rel_err(M.merge_a(same(a), grams, alpha, w), a) < 1e-5
  assert rel_err(M.merge_b(same(b), a, grams, alpha, w), b) < 1e-5
  assert rel_err(M.regmean(same(k), grams, alpha, w), k) < 1e-5
  # Only one client present (the others weigh 0): its own factors come back.
  w1 = np.array([0.0, 2.5, 0.0, 0.0], np.float32)
  a_c, b_c = rand_normal(rng, C, N, R), rand_normal(rng, C, R, O)
  assert rel_err(M.merge_a(a_c, grams, alpha, w1), a_c[1]) < 1e-5
  assert rel_err(M.merge_b(b_c, a, grams, alpha, w1), b_c[1]) < 1e-5


def _tilde(grams: jax.Array, alpha: float) -> jax.Array:
  diag = jax.vmap(jnp.diag)(jnp.diagonal(grams, axis1=1, axis2=2))
  return alpha * grams + (1.0 - alpha) * diag


@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_gradient_vanishes_at_merge(alpha: float) -> None:
  rng = np.random.default_rng(4)
  grams = jnp.asarray(rand_grams(rng, C, N))
  gt = _tilde(grams, alpha)
  w = rand_weights(rng, C)
  a, b, a0 = rand_normal(rng, C, N, R), rand_normal(rng, C, R, O), rand_normal(rng, N, R)

  def loss_a(am: jax.Array) -> jax.Array:  # sum_i w_i ||X_i (a_M - a_i)||^2
    d = am[None] - a
    return jnp.sum(w[:, None] * jnp.einsum('cir,cij,cjr->cr', d, gt, d))

  def loss_b(bm: jax.Array) -> jax.Array:  # sum_i w_i ||X_i a (b_M - b_i)||^2
    d = a0 @ (bm[None] - b)
    return jnp.sum(w[:, None] * jnp.einsum('cio,cij,cjo->co', d, gt, d))

  for loss, merged in ((loss_a, M.merge_a(a, grams, alpha, w)),
                       (loss_b, M.merge_b(b, a0, grams, alpha, w))):
    g_at = jnp.linalg.norm(jax.grad(loss)(merged))
    delta = jnp.asarray(rand_normal(rng, *merged.shape)) * jnp.std(merged)
    g_off = jnp.linalg.norm(jax.grad(loss)(merged + delta))
    assert float(g_at / g_off) < 1e-4


def test_diagonal_a_merge_is_weighted_row_average() -> None:
  rng = np.random.default_rng(5)
  g = rand_grams(rng, C, N, full=False)
  a, w = rand_normal(rng, C, N, R), rand_weights(rng, C)
  wg = w[:, None].astype(np.float64) * g
  ref = np.einsum('ci,cir->ir', wg, a) / np.sum(wg, axis=0)[:, None]
  assert rel_err(M.merge_a(a, g, 0.0, w), ref) < 1e-5


def test_alpha_zero_uses_diagonal_of_full_grams() -> None:
  rng = np.random.default_rng(6)
  grams, w = rand_grams(rng, C, N), rand_weights(rng, C)
  a, b, a0 = rand_normal(rng, C, N, R), rand_normal(rng, C, R, O), rand_normal(rng, N, R)
  diag = np.diagonal(grams, axis1=1, axis2=2).copy()
  np.testing.assert_array_equal(M.merge_a(a, grams, 0.0, w),
                                M.merge_a(a, diag, 0.0, w))
  np.testing.assert_array_equal(M.merge_b(b, a0, grams, 0.0, w),
                                M.merge_b(b, a0, diag, 0.0, w))


def test_diagonal_fast_path_equals_full_path_on_diag_matrices() -> None:
  rng = np.random.default_rng(7)
  diag = rand_grams(rng, C, N, full=False)
  diag[:, 3] = 0.0  # a feature nobody sees
  mats = np.stack([np.diag(d) for d in diag])
  a, b, a0 = rand_normal(rng, C, N, R), rand_normal(rng, C, R, O), rand_normal(rng, N, R)
  w = np.array([1.0, 0.0, 2.0, 0.5], np.float32)
  np.testing.assert_allclose(M.merge_a(a, mats, 0.3, w), M.merge_a(a, diag, 0.0, w),
                             rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(M.merge_b(b, a0, mats, 0.3, w),
                             M.merge_b(b, a0, diag, 0.0, w), rtol=1e-4, atol=1e-5)


def test_diagonal_grams_need_alpha_zero() -> None:
  with pytest.raises(ValueError):
    M.merge_a(np.zeros((2, 4, 1), np.float32), np.ones((2, 4), np.float32), 0.5)


# ------------------------------------------------------- singular systems


@pytest.mark.parametrize('alpha', [0.0, 0.3])
@pytest.mark.parametrize('ridge', [1e-6, 0.0])
def test_zero_feature_matches_pinv(alpha: float, ridge: float) -> None:
  rng = np.random.default_rng(8)
  grams, w = rand_grams(rng, C, N), rand_weights(rng, C)
  grams[:, [5, 17], :] = 0.0
  grams[:, :, [5, 17]] = 0.0
  a, k = rand_normal(rng, C, N, R), rand_normal(rng, C, N, O)
  ref = _ref_regmean(np.concatenate([a, k], axis=2), grams, alpha, w)
  out, info = M.merge_a(a, grams, alpha, w, ridge=ridge, return_info=True)
  assert np.all(np.isfinite(out)) and int(info.nonfinite) == 0
  assert rel_err(out, ref[:, :R]) < 1e-4
  np.testing.assert_allclose(np.asarray(out)[[5, 17]], 0.0, atol=1e-5)
  # ridge = 0 makes the Cholesky of the singular system fail: the
  # eigendecomposition fallback fires and still gives the pinv answer.
  assert int(info.fallbacks) == (1 if ridge == 0 else 0)
  assert rel_err(M.regmean(k, grams, alpha, w, ridge=ridge), ref[:, R:]) < 1e-4


@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_rank_deficient_a_matches_pinv(alpha: float) -> None:
  rng = np.random.default_rng(9)
  grams, w = rand_grams(rng, C, N), rand_weights(rng, C)
  a0 = rand_normal(rng, N, R)
  a0[:, 3] = a0[:, 0]  # duplicate column: a0^T G a0 singular
  a0[:, 2] = 0.0  # zero column
  b = rand_normal(rng, C, R, O)
  ref = _ref_merge_b(b, a0, grams, alpha, w)
  out, info = M.merge_b(b, a0, grams, alpha, w, return_info=True)
  assert np.all(np.isfinite(out)) and int(info.nonfinite) == 0
  # Only a0 @ b_M is determined; the zero column's row is 0 as in pinv.
  assert rel_err(a0 @ np.asarray(out), a0 @ ref) < 1e-4
  np.testing.assert_array_equal(np.asarray(out)[2], 0.0)
  out0, info0 = M.merge_b(b, a0, grams, alpha, w, ridge=0.0, return_info=True)
  assert int(info0.fallbacks) == 1 and np.all(np.isfinite(out0))
  assert rel_err(a0 @ np.asarray(out0), a0 @ ref) < 1e-4
  assert rel_err(out0, ref) < 1e-4  # the pinv answer itself, null space included


@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_absent_and_empty_clients_drop_out(alpha: float) -> None:
  rng = np.random.default_rng(10)
  grams = rand_grams(rng, C, N)
  a, b, a0 = rand_normal(rng, C, N, R), rand_normal(rng, C, R, O), rand_normal(rng, N, R)
  w = np.array([2.0, 0.0, 1.0, 1.0], np.float32)
  grams[3] = 0.0  # a client with no data
  a[1], b[1], grams[1] = np.nan, np.nan, np.nan  # absent client: garbage
  keep = [0, 2]
  out_a = M.merge_a(a, grams, alpha, w)
  out_b = M.merge_b(b, a0, grams, alpha, w)
  assert np.all(np.isfinite(out_a)) and np.all(np.isfinite(out_b))
  assert rel_err(out_a, _ref_regmean(a[keep], grams[keep], alpha, w[keep])) < 1e-4
  assert rel_err(out_b, _ref_merge_b(b[keep], a0, grams[keep], alpha, w[keep])) < 1e-4


def test_all_zero_system_gives_zero() -> None:
  rng = np.random.default_rng(11)
  a, b, w = rand_normal(rng, C, N, R), rand_normal(rng, C, R, O), rand_weights(rng, C)
  for alpha, grams in ((0.0, np.zeros((C, N), np.float32)),
                       (0.3, np.zeros((C, N, N), np.float32))):
    out, info = M.merge_a(a, grams, alpha, w, return_info=True)
    np.testing.assert_array_equal(out, 0.0)
    assert int(info.fallbacks) == 0
    np.testing.assert_array_equal(M.merge_b(b, a[0], grams, alpha, w), 0.0)
  ones = np.ones((C, N), np.float32)
  np.testing.assert_array_equal(M.merge_a(a, ones, 0.0, 0.0 * w), 0.0)


def test_nonfinite_input_is_reported() -> None:
  rng = np.random.default_rng(12)
  grams, a, w = rand_grams(rng, C, N), rand_normal(rng, C, N, R), rand_weights(rng, C)
  a[0, 3, 1] = np.inf
  for alpha in (0.0, 0.3):
    _, info = M.merge_a(a, grams, alpha, w, return_info=True)
    assert int(info.nonfinite) == 1


# ------------------------------------------------------------------ misc


@pytest.mark.parametrize('diagonal', [False, True])
def test_solve_psd(diagonal: bool) -> None:
  rng = np.random.default_rng(13)
  g = rand_grams(rng, 1, N, full=not diagonal)[0]
  rhs = rand_normal(rng, N, R)
  g64 = np.diag(g.astype(np.float64)) if diagonal else g.astype(np.float64)
  x, info = M.solve_psd(g, rhs, return_info=True)
  assert x.dtype == jnp.float32 and int(info.fallbacks) == 0
  assert rel_err(x, np.linalg.solve(g64, rhs)) < 1e-4
  assert rel_err(M.solve_psd(g, rhs[:, 0]), np.linalg.solve(g64, rhs[:, 0])) < 1e-4


def test_solve_psd_singular_matches_pinv() -> None:
  rng = np.random.default_rng(14)
  x = rand_normal(rng, 3 * N, N)
  x[:, -1] = 0.0  # last feature always zero
  g = x.T @ x
  rhs = g @ rand_normal(rng, N, R)  # consistent right-hand side
  ref = np.linalg.pinv(g.astype(np.float64)) @ rhs
  for ridge, fallbacks in ((1e-6, 0), (0.0, 1)):
    out, info = M.solve_psd(g, rhs, ridge=ridge, return_info=True)
    assert int(info.fallbacks) == fallbacks and np.all(np.isfinite(out))
    assert rel_err(out, ref) < 1e-4


def test_fedavg() -> None:
  x = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
  w = np.array([1.0, 3.0, 0.0], np.float32)
  np.testing.assert_allclose(M.fedavg(x, w), (x[0] + 3 * x[1]) / 4, rtol=1e-6)
  np.testing.assert_allclose(M.fedavg(x), x.mean(0), rtol=1e-6)
  x[2] = np.nan
  np.testing.assert_allclose(M.fedavg(x, w), (x[0] + 3 * x[1]) / 4, rtol=1e-6)
  np.testing.assert_array_equal(M.fedavg(x, 0.0 * w), 0.0)


def _vit_like(rng: np.random.Generator, full: bool) -> tuple:
  """Three blocks of {qkv: N -> O, fc2: O -> N} LoRA factors, grams, server a.

  Three layers of each shape: on a 2-core machine a group is solved in two
  chunks, one of them with two layers.
  """
  shapes = {'qkv': (N, O), 'fc2': (O, N)}
  a, b, g, a0 = {}, {}, {}, {}
  for blk in ('block0', 'block1', 'block2'):
    a[blk], b[blk], g[blk], a0[blk] = {}, {}, {}, {}
    for name, (n, o) in shapes.items():
      a[blk][name] = rand_normal(rng, C, n, R)
      b[blk][name] = rand_normal(rng, C, R, o)
      a0[blk][name] = rand_normal(rng, n, R)
      g[blk][name] = rand_grams(rng, C, n, full=full)
  return a, b, g, a0


def _check_tree(out: dict, fn, *trees: dict) -> None:
  """out == fn applied leaf by leaf to trees."""
  jax.tree.map(lambda x, *args: np.testing.assert_allclose(
      x, fn(*args), rtol=2e-5, atol=2e-6), out, *trees)


def test_tree_versions_equal_per_leaf() -> None:
  rng = np.random.default_rng(15)
  alpha = 0.3
  a, b, g, a0 = _vit_like(rng, full=True)
  w = np.array([1.0, 2.0, 0.0, 0.5], np.float32)
  out, info = M.merge_a_tree(a, g, alpha, w, return_info=True)
  assert int(info.fallbacks) == 0 and int(info.nonfinite) == 0
  _check_tree(out, lambda x, y: M.merge_a(x, y, alpha, w), a, g)
  _check_tree(M.merge_b_tree(b, a0, g, alpha, w),
              lambda x, y, z: M.merge_b(x, y, z, alpha, w), b, a0, g)
  kernels = jax.tree.map(lambda x, y: x @ y, a, b)  # (C, in, out) leaves
  _check_tree(M.regmean_tree(kernels, g, alpha, w),
              lambda x, y: M.regmean(x, y, alpha, w), kernels, g)
  q, rhs = jax.tree.map(lambda x: x[0], g), jax.tree.map(lambda x: x[0], a)
  _check_tree(M.solve_psd_tree(q, rhs), M.solve_psd, q, rhs)
  _check_tree(M.fedavg_tree(b, w), lambda x: M.fedavg(x, w), b)


def test_tree_alpha_zero_mixed_full_and_diagonal_grams() -> None:
  rng = np.random.default_rng(16)
  a, b, g, a0 = _vit_like(rng, full=True)
  w = np.array([1.0, 2.0, 0.0, 0.5], np.float32)
  for blk in g.values():  # fc2 ships diagonals, qkv full Grams
    blk['fc2'] = np.diagonal(blk['fc2'], axis1=1, axis2=2).copy()
  _check_tree(M.merge_a_tree(a, g, 0.0, w), lambda x, y: M.merge_a(x, y, 0.0, w),
              a, g)
  _check_tree(M.merge_b_tree(b, a0, g, 0.0, w),
              lambda x, y, z: M.merge_b(x, y, z, 0.0, w), b, a0, g)


def test_tree_fallback_count() -> None:
  rng = np.random.default_rng(17)
  a, _, g, _ = _vit_like(rng, full=True)
  w = rand_weights(rng, C)
  for blk in ('block0', 'block2'):
    g[blk]['qkv'][:, 2, :] = 0.0
    g[blk]['qkv'][:, :, 2] = 0.0
  out, info = M.merge_a_tree(a, g, 0.3, w, ridge=0.0, return_info=True)
  assert int(info.fallbacks) == 2 and int(info.nonfinite) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  for blk in ('block0', 'block1', 'block2'):
    ref = _ref_regmean(a[blk]['qkv'], g[blk]['qkv'], 0.3, w)
    assert rel_err(out[blk]['qkv'], ref) < 1e-4
  assert rel_err(out['block0']['fc2'], M.merge_a(a['block0']['fc2'],
                                              g['block0']['fc2'], 0.3, w)) < 1e-5

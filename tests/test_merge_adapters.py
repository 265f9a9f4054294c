"""Tests of lorm_jax.merge_adapters (VeRA, (IA)^3) and lorm_jax.models.adapters.

The JAX merges run in float32. The reference writes each merged update as a
linear map of the merged vector, dW(theta) = sum_p theta_p E_p (E_p a basis
matrix (in, out)), and solves the same objective,
  min_theta sum_i w_i ||X~_i (dW(theta) - dW_i)||^2,  X~_i^T X~_i = G~_i,
as one stacked float64 least-squares problem (np.linalg.lstsq, minimum norm
= the pseudo-inverse answer on singular systems), independently of the
closed forms. Tolerances are tests/test_merge.py's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference64 import (rand_grams, rand_normal, rand_weights, reg_grams64, rel_err, root64,
                         weights64)

from lorm_jax import merge as M
from lorm_jax import merge_adapters as MA
from lorm_jax.models import adapters as AD

C, N, R, O = 4, 48, 8, 24  # clients, in, VeRA rank, out
ALPHAS = [0.0, 0.3, 1.0]

# ------------------------------------------------------- float64 references


def _ref_linear(basis: np.ndarray, targets: np.ndarray, grams: np.ndarray,
                alpha: float, w: np.ndarray | None) -> np.ndarray:
  """argmin_theta sum_i w_i ||X~_i (sum_p theta_p E_p - T_i)||^2 by lstsq.

  basis (P, in, out), targets (C, in, out) -> theta (P,) float64.
  """
  gt, w = reg_grams64(grams, alpha), weights64(w, targets.shape[0])
  basis = np.asarray(basis, np.float64)
  phis, ys = [], []
  for gi, ti, wi in zip(gt, np.asarray(targets, np.float64), w):
    if wi == 0:
      continue
    x = np.sqrt(wi) * root64(gi)
    phis.append(np.einsum('ij,pjo->iop', x, basis).reshape(-1, basis.shape[0]))
    ys.append((x @ ti).reshape(-1))
  return np.linalg.lstsq(np.concatenate(phis), np.concatenate(ys), rcond=None)[0]


def _col_basis(u: np.ndarray) -> np.ndarray:
  """E_j = u[:, j] e_j^T, (out, in, out): dW = u diag(theta)."""
  u = np.asarray(u, np.float64)
  return u.T[:, :, None] * np.eye(u.shape[1])[:, None, :]


def _row_basis(k: np.ndarray) -> np.ndarray:
  """E_k = e_k k[k, :], (in, in, out): dW = diag(theta) k."""
  k = np.asarray(k, np.float64)
  return np.eye(k.shape[0])[:, :, None] * k[None]


def _outer_basis(a: np.ndarray, c: np.ndarray) -> np.ndarray:
  """E_k = a[:, k] c[k, :], (r, in, out): dW = a diag(theta) c."""
  return np.einsum('ik,ko->kio', np.asarray(a, np.float64), np.asarray(c, np.float64))


def _vera_delta64(a: np.ndarray, bp: np.ndarray, d: np.ndarray, b: np.ndarray) -> np.ndarray:
  """A diag(d) B diag(b) in float64, (in, out)."""
  a, bp, d, b = (np.asarray(x, np.float64) for x in (a, bp, d, b))
  return (a * d) @ bp * b


# ------------------------------------------------------------- problems


def _problem(seed: int, alpha: float, c: int = C) -> dict:
  rng = np.random.default_rng(seed)
  a, bp = (np.asarray(x) for x in AD.vera_projections(seed, N, O, R))
  return dict(
      rng=rng, a=a, bp=bp, grams=rand_grams(rng, c, N, full=alpha > 0 or seed % 2 == 0),
      w=rand_weights(rng, c), d=rand_normal(rng, R), b=rand_normal(rng, O),
      d_c=rand_normal(rng, c, R), b_c=rand_normal(rng, c, O), l_c=1 + 0.3 * rand_normal(rng, c, O),
      lr_c=1 + 0.3 * rand_normal(rng, c, N), kernel=rand_normal(rng, N, O) / np.sqrt(N))


# ------------------------------------------------ merges against float64


@pytest.mark.parametrize('alpha', ALPHAS)
@pytest.mark.parametrize('own_d', [False, True], ids=['shared_d', 'client_d'])
def test_vera_merge_b_matches_float64(alpha: float, own_d: bool) -> None:
  p = _problem(1, alpha)
  d_c = p['d_c'] if own_d else np.stack([p['d']] * C)
  out, info = MA.vera_merge_b(p['b_c'], p['d'], p['a'], p['bp'], p['grams'], alpha, p['w'],
                              return_info=True, d_clients=p['d_c'] if own_d else None)
  assert out.shape == (O,) and out.dtype == jnp.float32
  assert int(info.fallbacks) == 0 and int(info.nonfinite) == 0
  targets = np.stack([_vera_delta64(p['a'], p['bp'], di, bi) for di, bi in zip(d_c, p['b_c'])])
  u = (p['a'] * p['d']) @ p['bp']
  ref = _ref_linear(_col_basis(u), targets, p['grams'], alpha, p['w'])
  assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize('alpha', ALPHAS)
@pytest.mark.parametrize('own_b', [False, True], ids=['shared_b', 'client_b'])
def test_vera_merge_d_matches_float64(alpha: float, own_b: bool) -> None:
  p = _problem(2, alpha)
  b_c = p['b_c'] if own_b else np.stack([p['b']] * C)
  out, info = MA.vera_merge_d(p['d_c'], p['b'], p['a'], p['bp'], p['grams'], alpha, p['w'],
                              return_info=True, b_clients=p['b_c'] if own_b else None)
  assert out.shape == (R,) and out.dtype == jnp.float32
  assert int(info.fallbacks) == 0 and int(info.nonfinite) == 0
  targets = np.stack([_vera_delta64(p['a'], p['bp'], di, bi) for di, bi in zip(p['d_c'], b_c)])
  ref = _ref_linear(_outer_basis(p['a'], p['bp'] * p['b']), targets, p['grams'], alpha, p['w'])
  assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize('alpha', ALPHAS)
def test_ia3_merge_columns_matches_float64(alpha: float) -> None:
  p = _problem(3, alpha)
  out = MA.ia3_merge_columns(p['l_c'], p['kernel'], p['grams'], alpha, p['w'])
  assert out.shape == (O,) and out.dtype == jnp.float32
  targets = np.stack([p['kernel'] * li for li in p['l_c']])
  ref = _ref_linear(_col_basis(p['kernel']), targets, p['grams'], alpha, p['w'])
  assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize('alpha', ALPHAS)
def test_ia3_merge_rows_matches_float64(alpha: float) -> None:
  p = _problem(4, alpha)
  out = MA.ia3_merge_rows(p['lr_c'], p['kernel'], p['grams'], alpha, p['w'])
  assert out.shape == (N,) and out.dtype == jnp.float32
  targets = np.stack([li[:, None] * p['kernel'] for li in p['lr_c']])
  ref = _ref_linear(_row_basis(p['kernel']), targets, p['grams'], alpha, p['w'])
  assert rel_err(out, ref) < 1e-4


def _all_merges(p: dict, alpha: float, w, vec: dict) -> dict:
  """The four merges of one problem, client vectors from vec."""
  return {
      'b': MA.vera_merge_b(vec['b'], p['d'], p['a'], p['bp'], p['grams'], alpha, w),
      'd': MA.vera_merge_d(vec['d'], p['b'], p['a'], p['bp'], p['grams'], alpha, w),
      'cols': MA.ia3_merge_columns(vec['cols'], p['kernel'], p['grams'], alpha, w),
      'rows': MA.ia3_merge_rows(vec['rows'], p['kernel'], p['grams'], alpha, w)}


# ------------------------------------------------------------ properties


@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_identical_clients_give_their_vectors(alpha: float) -> None:
  p = _problem(5, alpha)
  own = {'b': p['b_c'][0], 'd': p['d_c'][0], 'cols': p['l_c'][0], 'rows': p['lr_c'][0]}
  out = _all_merges(p, alpha, p['w'], {k: np.stack([v] * C) for k, v in own.items()})
  for k, v in own.items():
    assert rel_err(out[k], v) < 1e-5, k
  # Only client 1 present; the absent ones hold garbage (NaN vectors and Grams).
  w1 = np.array([0.0, 2.5, 0.0, 0.0], np.float32)
  vec = {'b': p['b_c'].copy(), 'd': p['d_c'].copy(), 'cols': p['l_c'].copy(),
         'rows': p['lr_c'].copy()}
  for v in vec.values():
    v[[0, 2]] = np.nan
  p['grams'] = p['grams'].copy()
  p['grams'][3] = np.nan
  out = _all_merges(p, alpha, w1, vec)
  for k, v in vec.items():
    assert rel_err(out[k], v[1]) < 1e-5, k


@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_one_client_is_a_fixed_point(alpha: float) -> None:
  p = _problem(6, alpha, c=1)
  vec = {'b': p['b_c'], 'd': p['d_c'], 'cols': p['l_c'], 'rows': p['lr_c']}
  out = _all_merges(p, alpha, None, vec)
  for k, v in vec.items():
    assert rel_err(out[k], v[0]) < 1e-5, k


@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_gradient_vanishes_at_merge_float64(alpha: float) -> None:
  """jax.grad in float64 of the objective written with models.adapters' maps."""
  p = _problem(7, alpha)
  merged = _all_merges(p, alpha, p['w'],
                       {'b': p['b_c'], 'd': p['d_c'], 'cols': p['l_c'], 'rows': p['lr_c']})
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    gt, w = f64(reg_grams64(p['grams'], alpha)), f64(p['w'])
    a, bp, kern = f64(p['a']), f64(p['bp']), f64(p['kernel'])
    d, b = f64(p['d']), f64(p['b'])

    def objective(delta: jax.Array, targets: jax.Array) -> jax.Array:
      e = delta[None] - targets
      return jnp.sum(w[:, None] * jnp.einsum('cio,cij,cjo->co', e, gt, e))

    t_b = jax.vmap(lambda bi: AD.vera_delta(a, bp, d, bi))(f64(p['b_c']))
    t_d = jax.vmap(lambda di: AD.vera_delta(a, bp, di, b))(f64(p['d_c']))
    t_c = jax.vmap(lambda li: AD.ia3_scale_columns(kern, li))(f64(p['l_c']))
    t_r = jax.vmap(lambda li: AD.ia3_scale_rows(kern, li))(f64(p['lr_c']))
    losses = {
        'b': lambda x: objective(AD.vera_delta(a, bp, d, x), t_b),
        'd': lambda x: objective(AD.vera_delta(a, bp, x, b), t_d),
        'cols': lambda x: objective(AD.ia3_scale_columns(kern, x), t_c),
        'rows': lambda x: objective(AD.ia3_scale_rows(kern, x), t_r)}
    rng = np.random.default_rng(70)
    for k, loss in losses.items():
      x = f64(merged[k])
      g_at = jnp.linalg.norm(jax.grad(loss)(x))
      g_off = jnp.linalg.norm(jax.grad(loss)(x + f64(rng.normal(size=x.shape)) * jnp.std(x)))
      assert g_at.dtype == jnp.float64
      assert float(g_at / g_off) < 1e-4, k


def test_diagonal_grams_give_weighted_averages() -> None:
  """alpha = 0: (IA)^3 rows average by w_i g_ik, columns and VeRA's b by
  w_i s_ij with s_ij = sum_k g_ik u_kj^2."""
  p = _problem(8, 0.0)
  g = np.diagonal(p['grams'], axis1=1, axis2=2).astype(np.float64) if p['grams'].ndim == 3 \
      else p['grams'].astype(np.float64)
  wg = p['w'][:, None] * g
  ref_rows = np.sum(wg * p['lr_c'], 0) / np.sum(wg, 0)
  assert rel_err(MA.ia3_merge_rows(p['lr_c'], p['kernel'], g, 0.0, p['w']), ref_rows) < 1e-5
  for u, vec, fn in ((p['kernel'], p['l_c'], lambda v: MA.ia3_merge_columns(
      v, p['kernel'], g, 0.0, p['w'])), ((p['a'] * p['d']) @ p['bp'], p['b_c'],
                                       lambda v: MA.vera_merge_b(
                                           v, p['d'], p['a'], p['bp'], g, 0.0, p['w']))):
    s = wg @ np.square(u.astype(np.float64))  # (C, out)
    assert rel_err(fn(vec), np.sum(s * vec, 0) / np.sum(s, 0)) < 1e-5


def test_alpha_zero_uses_diagonal_of_full_grams() -> None:
  p = _problem(10, 0.3)  # full Grams
  diag = np.diagonal(p['grams'], axis1=1, axis2=2).copy()
  vec = {'b': p['b_c'], 'd': p['d_c'], 'cols': p['l_c'], 'rows': p['lr_c']}
  full = _all_merges(p, 0.0, p['w'], vec)
  out = _all_merges({**p, 'grams': diag}, 0.0, p['w'], vec)
  for k in vec:
    np.testing.assert_allclose(full[k], out[k], rtol=1e-6, atol=1e-6)


def test_diagonal_path_equals_full_path_on_diagonal_matrices() -> None:
  p = _problem(11, 0.0)
  diag = rand_grams(p['rng'], C, N, full=False)
  diag[:, 3] = 0.0  # a feature nobody sees
  mats = np.stack([np.diag(x) for x in diag])
  vec = {'b': p['b_c'], 'd': p['d_c'], 'cols': p['l_c'], 'rows': p['lr_c']}
  out_d = _all_merges({**p, 'grams': diag}, 0.0, p['w'], vec)
  out_f = _all_merges({**p, 'grams': mats}, 0.3, p['w'], vec)
  for k in vec:
    np.testing.assert_allclose(out_f[k], out_d[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- singular systems


@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_cholesky_fallback_is_counted(alpha: float) -> None:
  """ridge = 0 on singular systems: the pseudo-inverse fallback fires, is
  counted, and gives lstsq's minimum-norm answer."""
  p = _problem(12, alpha)
  # VeRA d: a zero column of A makes row/column k of the r x r system zero.
  a = p['a'].copy()
  a[:, 2] = 0.0
  targets = np.stack([_vera_delta64(a, p['bp'], di, p['b']) for di in p['d_c']])
  ref = _ref_linear(_outer_basis(a, p['bp'] * p['b']), targets, p['grams'], alpha, p['w'])
  for ridge, fallbacks in ((1e-6, 0), (0.0, 1)):
    out, info = MA.vera_merge_d(p['d_c'], p['b'], a, p['bp'], p['grams'], alpha, p['w'],
                                ridge=ridge, return_info=True)
    assert int(info.fallbacks) == fallbacks and int(info.nonfinite) == 0
    assert rel_err(out, ref) < 1e-4 and abs(float(out[2])) < 1e-6
  # (IA)^3 rows: a feature (input row) nobody sees.
  g = p['grams'].copy()
  if g.ndim == 3:
    g[:, 5, :] = 0.0
    g[:, :, 5] = 0.0
  else:
    g[:, 5] = 0.0
  targets = np.stack([li[:, None] * p['kernel'] for li in p['lr_c']])
  ref = _ref_linear(_row_basis(p['kernel']), targets, g, alpha, p['w'])
  out, info = MA.ia3_merge_rows(p['lr_c'], p['kernel'], g, alpha, p['w'], ridge=0.0,
                                return_info=True)
  assert int(info.fallbacks) == 1 and int(info.nonfinite) == 0
  assert rel_err(out, ref) < 1e-4 and abs(float(out[5])) < 1e-6
  # (IA)^3 columns (a diagonal system): a zero column of the kernel.
  k = p['kernel'].copy()
  k[:, 7] = 0.0
  out, info = MA.ia3_merge_columns(p['l_c'], k, p['grams'], alpha, p['w'], ridge=0.0,
                                   return_info=True)
  assert int(info.fallbacks) == 1 and np.all(np.isfinite(out)) and float(out[7]) == 0.0


def test_zero_b_gives_zero_d() -> None:
  """At VeRA's init b = 0 every d gives dW = 0: the system is zero and so is d."""
  p = _problem(13, 0.0)
  out, info = MA.vera_merge_d(p['d_c'], np.zeros(O, np.float32), p['a'], p['bp'], p['grams'],
                              0.0, p['w'], return_info=True)
  np.testing.assert_array_equal(out, 0.0)
  assert int(info.fallbacks) == 0 and int(info.nonfinite) == 0


# ---------------------------------------------------------------- pytrees


def _vit_like(rng: np.random.Generator, full: bool) -> dict:
  """Two blocks of the ViT's layer kinds at test size: qkv-like (N, 2 O) and
  fc2-like (2 O, N), so each block has two shapes."""
  shapes = {'qkv': (N, 2 * O), 'fc2': (2 * O, N)}
  t: dict = {k: {} for k in ('a', 'bp', 'd', 'b', 'd_c', 'b_c', 'g', 'kern', 'lc', 'lr')}
  for blk in ('block0', 'block1', 'block2'):
    for k in t:
      t[k][blk] = {}
    for name, (n, o) in shapes.items():
      a, bp = AD.vera_projections(0, n, o, R)
      t['a'][blk][name], t['bp'][blk][name] = np.asarray(a), np.asarray(bp)
      t['d'][blk][name], t['b'][blk][name] = rand_normal(rng, R), rand_normal(rng, o)
      t['d_c'][blk][name], t['b_c'][blk][name] = rand_normal(rng, C, R), rand_normal(rng, C, o)
      t['g'][blk][name] = rand_grams(rng, C, n, full=full)
      t['kern'][blk][name] = rand_normal(rng, n, o)
      t['lc'][blk][name], t['lr'][blk][name] = rand_normal(rng, C, o), rand_normal(rng, C, n)
  return t


def _check_tree(out: dict, fn, *trees: dict) -> None:
  jax.tree.map(lambda x, *args: np.testing.assert_allclose(
      x, fn(*args), rtol=2e-5, atol=2e-6), out, *trees)


@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_tree_versions_equal_per_leaf(alpha: float) -> None:
  t = _vit_like(np.random.default_rng(14), full=alpha > 0)
  w = np.array([1.0, 2.0, 0.0, 0.5], np.float32)
  out, info = MA.vera_merge_b_tree(t['b_c'], t['d'], t['a'], t['bp'], t['g'], alpha, w,
                                   return_info=True, d_clients_tree=t['d_c'])
  assert int(info.fallbacks) == 0 and int(info.nonfinite) == 0
  _check_tree(out, lambda b, d, a, bp, g, d_c: MA.vera_merge_b(b, d, a, bp, g, alpha, w,
                                                               d_clients=d_c),
              t['b_c'], t['d'], t['a'], t['bp'], t['g'], t['d_c'])
  _check_tree(MA.vera_merge_d_tree(t['d_c'], t['b'], t['a'], t['bp'], t['g'], alpha, w),
              lambda *x: MA.vera_merge_d(*x, alpha, w),
              t['d_c'], t['b'], t['a'], t['bp'], t['g'])
  _check_tree(MA.ia3_merge_columns_tree(t['lc'], t['kern'], t['g'], alpha, w),
              lambda *x: MA.ia3_merge_columns(*x, alpha, w), t['lc'], t['kern'], t['g'])
  _check_tree(MA.ia3_merge_rows_tree(t['lr'], t['kern'], t['g'], alpha, w),
              lambda *x: MA.ia3_merge_rows(*x, alpha, w), t['lr'], t['kern'], t['g'])


def test_tree_fallback_count() -> None:
  t = _vit_like(np.random.default_rng(15), full=True)
  w = rand_weights(np.random.default_rng(16), C)
  for blk in ('block0', 'block2'):
    t['a'][blk]['qkv'] = t['a'][blk]['qkv'].copy()
    t['a'][blk]['qkv'][:, 1] = 0.0
  out, info = MA.vera_merge_d_tree(t['d_c'], t['b'], t['a'], t['bp'], t['g'], 0.3, w,
                                   ridge=0.0, return_info=True)
  assert int(info.fallbacks) == 2 and int(info.nonfinite) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  assert M.fallback_count(info) == 2


# --------------------------------------------------------------- adapters


def test_vera_maths() -> None:
  a, bp = AD.vera_projections(3, N, O, R)
  a2, bp2 = AD.vera_projections(3, N, O, R)
  np.testing.assert_array_equal(a, a2)
  np.testing.assert_array_equal(bp, bp2)
  a3, _ = AD.vera_projections(3, N, O + 1, R)  # another shape, another draw
  assert not np.allclose(a, a3)
  assert a.shape == (N, R) and bp.shape == (R, O)
  assert float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(N)
  assert float(jnp.max(jnp.abs(bp))) <= 1 / np.sqrt(R)
  d, b = AD.vera_init(R, O)
  np.testing.assert_array_equal(AD.vera_delta(a, bp, d, b), 0.0)
  rng = np.random.default_rng(17)
  x, d, b = rand_normal(rng, 2, 5, N), rand_normal(rng, R), rand_normal(rng, O)
  np.testing.assert_allclose(AD.vera_apply(x, a, bp, d, b), x @ AD.vera_delta(a, bp, d, b),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(AD.vera_delta(a, bp, d, b), _vera_delta64(a, bp, d, b),
                             rtol=1e-5, atol=1e-6)


def test_ia3_maths() -> None:
  rng = np.random.default_rng(18)
  dim, mlp = 8, 12
  qkv, bias = rand_normal(rng, dim, 3 * dim), rand_normal(rng, 3 * dim)
  lk, lv = rand_normal(rng, dim), rand_normal(rng, dim)
  s = AD.ia3_qkv_scale(lk, lv)
  x = rand_normal(rng, 5, dim)
  y = AD.ia3_apply_columns(x, qkv, bias, s)
  ref = x @ qkv
  np.testing.assert_allclose(y[:, :dim], ref[:, :dim] + bias[:dim], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[:, dim:2 * dim], ref[:, dim:2 * dim] * lk + bias[dim:2 * dim],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, x @ AD.ia3_scale_columns(qkv, s) + bias, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(AD.ia3_scale_columns(qkv, s),
                             qkv + AD.ia3_delta_columns(qkv, s), rtol=1e-6, atol=1e-6)
  fc2, h, lff = rand_normal(rng, mlp, dim), rand_normal(rng, 5, mlp), rand_normal(rng, mlp)
  np.testing.assert_allclose(AD.ia3_apply_rows(h, fc2, bias[:dim], lff),
                             (h * lff) @ fc2 + bias[:dim], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(AD.ia3_scale_rows(fc2, lff), fc2 + AD.ia3_delta_rows(fc2, lff),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(AD.ia3_delta_rows(fc2, AD.ia3_init(mlp)), 0.0)


def test_cross_task_merge_of_adapter_deltas() -> None:
  """W0 + Q^-1 P works on any adapter's dense delta: one task gives the delta back."""
  p = _problem(19, 0.0)
  delta = AD.vera_delta(p['a'], p['bp'], p['d'], p['b'])
  g = M.regularize_gram(jnp.asarray(p['grams'][0]), 0.0)
  out = M.solve_psd(g, M.gram_times(g, delta))
  assert rel_err(out, np.asarray(delta, np.float64)) < 1e-5


def test_layer_stats_vit_b() -> None:
  s = AD.vit_adapter_stats('vera', 768, 3072, 12, 256)
  assert s['qkv']['trained'] == 256 + 2304 and s['fc2']['gram_diag'] == 3072
  assert s['qkv']['sufficient'] == 256 * 257 // 2
  lora = AD.vit_adapter_stats('lora', 768, 3072, 12, 1)
  assert lora['model']['trained'] == 12 * (768 + 2304 + 768 + 768 + 768 + 3072 + 3072 + 768)
  ia3 = AD.vit_adapter_stats('ia3', 768, 3072, 12, 0)
  assert ia3['model']['trained'] == 12 * (2 * 768 + 3072)
  assert ia3['proj']['gram_diag'] == 0 and ia3['qkv']['sufficient'] == 1536
  assert lora['model']['upload_1'] == 12 * (2304 + 768 + 3072 + 768)
  assert s['model']['upload_2'] == 12 * 4 * 256


def test_bad_inputs_raise() -> None:
  p = _problem(20, 0.3)
  g_diag = np.ones((C, N), np.float32)
  with pytest.raises(ValueError):  # diagonal Grams carry no off-diagonal terms
    MA.ia3_merge_rows(p['lr_c'], p['kernel'], g_diag, 0.5)
  with pytest.raises(ValueError):  # d has the wrong length
    MA.vera_merge_b(p['b_c'], p['d'][:-1], p['a'], p['bp'], p['grams'], 0.3)
  with pytest.raises(ValueError):  # client vectors do not match the kernel
    MA.ia3_merge_columns(p['lr_c'], p['kernel'], p['grams'], 0.3)
  with pytest.raises(ValueError):
    MA.vera_merge_d(p['d_c'], p['b'], p['a'], p['bp'], p['grams'], 0.3, b_clients=p['d_c'])

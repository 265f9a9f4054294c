"""Closed-form merges of VeRA and (IA)^3 adapters (docs/merging.md), Flax layout.

The objective is LoRM's (spec section 4, `lorm_jax.merge`): the merged layer
should answer every client's inputs as the client's own layer does,
  min_theta sum_i w_i || X~_i (dW(theta) - dW_i) ||^2,   X~_i^T X~_i = G~_i,
with G~_i = alpha G_i + (1 - alpha) diag(G_i) and client weights w_i (0 =
absent). A kernel is (in, out), y = x @ W. Each adapter's update is linear in
the vector being merged while the others are held fixed, so every merge is
one small PSD system:

VeRA, dW = A diag(d) B diag(b); A (in, r), B (r, out) frozen and shared;
H_i = A^T G~_i A (r, r), E = diag(d) B, E_i = diag(d_i) B, C = B diag(b):
  b-merge (d fixed):  b_j = sum_i w_i b_ij e_j^T H_i e_ij / sum_i w_i e_j^T H_i e_j
                      (per output column: a diagonal system, out of them)
  d-merge (b fixed):  [(sum_i w_i H_i) o (C C^T)] d = sum_i w_i (H_i o (C C_i^T)) d_i
                      (o = Hadamard product; an r x r system)
(IA)^3, scalings of a frozen kernel W (in, out):
  columns, W diag(l):  l_j = sum_i w_i s_ij l_ij / sum_i w_i s_ij, s_ij = w_j^T G~_i w_j
  rows, diag(l) W:     [(sum_i w_i G~_i) o (W W^T)] l = sum_i w_i (G~_i o (W W^T)) l_i
                       (diagonal Grams: l_k = sum_i w_i g_ik l_ik / sum_i w_i g_ik)

The client targets default to the server's fixed vector (the LoRM schedule:
one vector trained per round, the other frozen); `d_clients` / `b_clients`
give each client's own value of the fixed vector when clients trained both.

Numerics are merge.py's, by its own helpers: ridge * mean(diag) added to
every system, diagonal systems solved elementwise, full ones by Jacobi-scaled
Cholesky with the eigendecomposition pseudo-inverse as fallback, counted in
`MergeInfo`. `alpha` is static, `ridge` traced. The `*_tree` versions merge
every layer of a model in one jitted call (full systems of one shape are
stacked, as in merge.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from lorm_jax import merge as _merge
from lorm_jax.merge import MergeInfo

PyTree = Any

__all__ = [
    'MergeInfo', 'vera_merge_b', 'vera_merge_d', 'ia3_merge_columns',
    'ia3_merge_rows', 'vera_merge_b_tree', 'vera_merge_d_tree',
    'ia3_merge_columns_tree', 'ia3_merge_rows_tree', 'projected_grams',
]

_F32 = jnp.float32


# ------------------------------------------------------- per-layer systems


def projected_grams(a: jax.Array, grams: jax.Array, alpha: float) -> jax.Array:
  """H_i = a^T G~_i a for every client; a (in, r), grams (C, in) or (C, in, in)
  (already through `merge._prepare_grams`) -> (C, r, r) float32, symmetric.

  LoRM's B-round matrix; VeRA's merges need nothing else of the Grams.
  Clients stay separate (no contraction over C), so an absent client's NaN
  stays in its own slice.
  """
  if grams.ndim == 2:
    h = jnp.einsum('cir,is->crs', grams[:, :, None] * a, a)
  else:
    diag = jnp.diagonal(grams, axis1=1, axis2=2)
    ga = alpha * jnp.einsum('cij,jr->cir', grams, a)
    ga = ga + (1.0 - alpha) * diag[:, :, None] * a[None]
    h = jnp.einsum('ir,cis->crs', a, ga)
  return 0.5 * (h + jnp.swapaxes(h, 1, 2))


def _vera_b_system(b: jax.Array, shared: tuple, g: jax.Array, w: jax.Array,
                   alpha: float) -> tuple[jax.Array, jax.Array]:
  """b (C, out); shared = (d (r,), A (in, r), B (r, out), d_clients (C, r) | None).

  Returns the diagonal system (sum_i w_i e_j^T H_i e_j (out,),
  sum_i w_i b_ij e_j^T H_i e_ij (out, 1)), e_j = d o B[:, j], e_ij = d_i o B[:, j].
  """
  d, a, bmat, d_cl = shared
  b = _merge._drop_absent(b, w)
  h = projected_grams(a, g, alpha)                      # (C, r, r)
  e = d[:, None] * bmat                                 # (r, out)
  he = jnp.einsum('crs,so->cro', h, e)                  # (C, r, out): H_i e_j
  den = jnp.sum(e[None] * he, axis=1)                   # (C, out): e_j^T H_i e_j
  if d_cl is None:
    cross = den
  else:
    cross = jnp.sum(_merge._drop_absent(d_cl, w)[:, :, None] * bmat[None] * he, axis=1)
  m = _merge._client_sum(lambda i: den[i], w)
  rhs = _merge._client_sum(lambda i: cross[i] * b[i], w)
  return m, rhs[:, None]


def _vera_d_system(d: jax.Array, shared: tuple, g: jax.Array, w: jax.Array,
                   alpha: float) -> tuple[jax.Array, jax.Array]:
  """d (C, r); shared = (b (out,), A (in, r), B (r, out), b_clients (C, out) | None).

  Returns ((sum_i w_i H_i) o (C C^T) (r, r), sum_i w_i (H_i o (C C_i^T)) d_i
  (r, 1)), C = B diag(b), C_i = B diag(b_i).
  """
  b, a, bmat, b_cl = shared
  d = _merge._drop_absent(d, w)
  h = projected_grams(a, g, alpha)                      # (C, r, r)
  cm = bmat * b[None, :]                                # (r, out)
  k = cm @ cm.T                                         # (r, r)
  m = _merge._client_sum(lambda i: h[i], w) * k
  if b_cl is None:  # sum_l K_kl sum_i w_i H_i,kl d_il
    z = _merge._client_sum(lambda i: h[i] * d[i][None, :], w)
    rhs = jnp.sum(k * z, axis=1)
  else:
    ci = bmat[None] * _merge._drop_absent(b_cl, w)[:, None, :]  # (C, r, out)
    ki = jnp.einsum('ro,cso->crs', cm, ci)                      # C C_i^T
    rhs = _merge._client_sum(lambda i: (h[i] * ki[i]) @ d[i], w)
  return m, rhs[:, None]


def _ia3_columns_system(l: jax.Array, shared: tuple, g: jax.Array, w: jax.Array,
                        alpha: float) -> tuple[jax.Array, jax.Array]:
  """l (C, out); shared = (kernel (in, out),). Diagonal system
  (sum_i w_i s_ij (out,), sum_i w_i s_ij l_ij (out, 1)), s_ij = w_j^T G~_i w_j.
  """
  (kernel,) = shared
  l = _merge._drop_absent(l, w)
  k2 = kernel * kernel
  if g.ndim == 2:
    s = g @ k2                                          # (C, out); rows independent
  else:
    diag = jnp.diagonal(g, axis1=1, axis2=2)
    gw = jnp.einsum('cij,jo->cio', g, kernel)
    s = alpha * jnp.sum(gw * kernel[None], axis=1) + (1.0 - alpha) * (diag @ k2)
  m = _merge._client_sum(lambda i: s[i], w)
  rhs = _merge._client_sum(lambda i: s[i] * l[i], w)
  return m, rhs[:, None]


def _ia3_rows_system(l: jax.Array, shared: tuple, g: jax.Array, w: jax.Array,
                     alpha: float) -> tuple[jax.Array, jax.Array]:
  """l (C, in); shared = (kernel (in, out),). System
  ((sum_i w_i G~_i) o K, sum_i w_i (G~_i o K) l_i), K = W W^T (in, in); with
  diagonal Grams only diag(K) = row norms enters and the system is diagonal.
  """
  (kernel,) = shared
  l = _merge._drop_absent(l, w)
  norms = jnp.sum(kernel * kernel, axis=1)              # diag(W W^T), (in,)
  if g.ndim == 2:
    m = _merge._client_sum(lambda i: g[i], w) * norms
    rhs = _merge._client_sum(lambda i: g[i] * l[i], w) * norms
    return m, rhs[:, None]
  k = kernel @ kernel.T                                 # (in, in)
  diag = jnp.diagonal(g, axis1=1, axis2=2)
  m = alpha * _merge._client_sum(lambda i: g[i], w) * k
  m = m + (1.0 - alpha) * jnp.diag(_merge._client_sum(lambda i: diag[i], w) * norms)
  z = _merge._client_sum(lambda i: g[i] * l[i][None, :], w)   # sum_i w_i G_i diag(l_i)
  rhs = alpha * jnp.sum(k * z, axis=1)
  rhs = rhs + (1.0 - alpha) * norms * _merge._client_sum(lambda i: diag[i] * l[i], w)
  return m, rhs[:, None]


# ------------------------------------------------------------ validation


def _vec(x: jax.Array, name: str, ndim: int) -> jax.Array:
  x = jnp.asarray(x, _F32)
  if x.ndim != ndim:
    raise ValueError(f'{name} must have {ndim} axes, got {x.shape}')
  return x


def _check_vera(vec: jax.Array, shared: tuple, which: str) -> tuple:
  """Casts and checks one VeRA layer: vec (C, n) with its shared operands."""
  fixed, a, bmat, targets = shared
  a, bmat = _vec(a, 'vera_a', 2), _vec(bmat, 'vera_b', 2)
  r, out = bmat.shape
  if a.shape[1] != r:
    raise ValueError(f'vera_a {a.shape} and vera_b {bmat.shape} disagree on the rank')
  own, other = (out, r) if which == 'b' else (r, out)
  fixed = _vec(fixed, 'the fixed vector', 1)
  if vec.shape[1] != own or fixed.shape != (other,):
    raise ValueError(f'VeRA {which}-merge: clients ({vec.shape}) need ({vec.shape[0]}, '
                     f'{own}) and the fixed vector {fixed.shape} needs ({other},)')
  if targets is not None:
    targets = _vec(targets, 'client targets', 2)
    if targets.shape != (vec.shape[0], other):
      raise ValueError(f'client targets must be ({vec.shape[0]}, {other}), '
                       f'got {targets.shape}')
  return (fixed, a, bmat, targets), a.shape[0]


def _check_ia3(vec: jax.Array, shared: tuple, which: str) -> tuple:
  (kernel,) = shared
  kernel = _vec(kernel, 'kernel', 2)
  n = kernel.shape[1] if which == 'columns' else kernel.shape[0]
  if vec.shape[1] != n:
    raise ValueError(f'(IA)^3 {which}: clients {vec.shape} do not match kernel '
                     f'{kernel.shape}')
  return (kernel,), kernel.shape[0]


_KINDS: dict[str, tuple[Callable, Callable]] = {
    'vera_b': (_vera_b_system, lambda v, s: _check_vera(v, s, 'b')),
    'vera_d': (_vera_d_system, lambda v, s: _check_vera(v, s, 'd')),
    'ia3_columns': (_ia3_columns_system, lambda v, s: _check_ia3(v, s, 'columns')),
    'ia3_rows': (_ia3_rows_system, lambda v, s: _check_ia3(v, s, 'rows')),
}


# ------------------------------------------------------------ jitted core


def _leaves_like(treedef: Any, tree: PyTree | None, n: int) -> list:
  return [None] * n if tree is None else treedef.flatten_up_to(tree)


@functools.partial(jax.jit, static_argnames=('kind', 'alpha'))
def _merge_impl(vec_tree: PyTree, shared_trees: tuple, grams_tree: PyTree,
                w: jax.Array, ridge: jax.Array, kind: str,
                alpha: float) -> tuple[PyTree, MergeInfo]:
  """Every layer's system built on its own, solved by `merge._merge_leaves`.

  vec_tree leaves (C, n); shared_trees a tuple of trees of the same structure
  (or None); grams_tree leaves (C, in, in) or (C, in). Returns the tree of
  (n,) merged vectors and the summed MergeInfo.
  """
  system, check = _KINDS[kind]
  leaves, treedef = jax.tree_util.tree_flatten(vec_tree)
  shared = list(zip(*[_leaves_like(treedef, t, len(leaves)) for t in shared_trees]))
  grams = treedef.flatten_up_to(grams_tree)
  args = []
  for v, s, g in zip(leaves, shared, grams):
    v = _vec(v, 'client vectors', 2)
    s, n_in = check(v, s)
    _merge._check_grams(g, v.shape[0], n_in)
    args.append((v, s, _merge._prepare_grams(g, 3, alpha)))
  out, info = _merge._merge_leaves(lambda v, s, g: system(v, s, g, w, alpha), args, ridge)
  return treedef.unflatten([x[:, 0] for x in out]), info


def _call(kind: str, vec: PyTree, shared: Sequence[PyTree | None], grams: PyTree,
          alpha: float, weights: jax.Array | None, ridge: float,
          return_info: bool) -> Any:
  return _merge._run(_merge_impl, (vec, tuple(shared), grams), weights, ridge,
                     return_info, kind=kind, alpha=alpha)


# ------------------------------------------------------------ single layer


def vera_merge_b(b: jax.Array, d: jax.Array, vera_a: jax.Array, vera_b: jax.Array,
                 grams: jax.Array, alpha: float = 0.0, weights: jax.Array | None = None,
                 ridge: float = 1e-6, return_info: bool = False,
                 d_clients: jax.Array | None = None) -> Any:
  """VeRA b-merge with d fixed: per output column j,
  b_j = sum_i w_i b_ij e_j^T H_i e_ij / sum_i w_i e_j^T H_i e_j.

  b (C, out) the clients' b; d (r,) the merged model's (fixed) d; vera_a
  (in, r), vera_b (r, out) the frozen projections; grams (C, in, in) or
  (C, in); weights (C,); d_clients (C, r) the clients' own d (default: d).
  -> (out,) float32 [, MergeInfo].
  """
  return _call('vera_b', b, (d, vera_a, vera_b, d_clients), grams, alpha, weights,
               ridge, return_info)


def vera_merge_d(d: jax.Array, b: jax.Array, vera_a: jax.Array, vera_b: jax.Array,
                 grams: jax.Array, alpha: float = 0.0, weights: jax.Array | None = None,
                 ridge: float = 1e-6, return_info: bool = False,
                 b_clients: jax.Array | None = None) -> Any:
  """VeRA d-merge with b fixed: the r x r system
  [(sum_i w_i H_i) o (C C^T)] d_M = sum_i w_i (H_i o (C C_i^T)) d_i.

  d (C, r) the clients' d; b (out,) the merged model's (fixed) b; vera_a
  (in, r), vera_b (r, out); grams (C, in, in) or (C, in); weights (C,);
  b_clients (C, out) the clients' own b (default: b). -> (r,) [, MergeInfo].
  b = 0 (VeRA's init) makes the system zero and gives d = 0: train b first.
  """
  return _call('vera_d', d, (b, vera_a, vera_b, b_clients), grams, alpha, weights,
               ridge, return_info)


def ia3_merge_columns(l: jax.Array, kernel: jax.Array, grams: jax.Array,
                      alpha: float = 0.0, weights: jax.Array | None = None,
                      ridge: float = 1e-6, return_info: bool = False) -> Any:
  """(IA)^3 merge of output-column scalings W diag(l):
  l_j = sum_i w_i s_ij l_ij / sum_i w_i s_ij, s_ij = w_j^T G~_i w_j.

  l (C, out); kernel (in, out) the frozen columns the vector scales (for
  qkv's l_k, l_v: kernel[:, D:]); grams (C, in, in) or (C, in) -> (out,).
  """
  return _call('ia3_columns', l, (kernel,), grams, alpha, weights, ridge, return_info)


def ia3_merge_rows(l: jax.Array, kernel: jax.Array, grams: jax.Array,
                   alpha: float = 0.0, weights: jax.Array | None = None,
                   ridge: float = 1e-6, return_info: bool = False) -> Any:
  """(IA)^3 merge of input-row scalings diag(l) W (fc2's l_ff):
  [(sum_i w_i G~_i) o (W W^T)] l = sum_i w_i (G~_i o (W W^T)) l_i.

  l (C, in); kernel (in, out); grams (C, in, in) (an in x in system) or
  (C, in) (diagonal: l_k = sum_i w_i g_ik l_ik / sum_i w_i g_ik) -> (in,).
  """
  return _call('ia3_rows', l, (kernel,), grams, alpha, weights, ridge, return_info)


# ---------------------------------------------------------------- pytrees


def vera_merge_b_tree(b_tree: PyTree, d_tree: PyTree, vera_a_tree: PyTree,
                      vera_b_tree: PyTree, grams_tree: PyTree, alpha: float = 0.0,
                      weights: jax.Array | None = None, ridge: float = 1e-6,
                      return_info: bool = False,
                      d_clients_tree: PyTree | None = None) -> Any:
  """`vera_merge_b` on every layer, one jitted call. Trees share b_tree's
  structure: b (C, out), d (r,), vera_a (in, r), vera_b (r, out), grams
  (C, in[, in]), d_clients (C, r) or None. -> tree of (out,) [, MergeInfo]."""
  return _call('vera_b', b_tree, (d_tree, vera_a_tree, vera_b_tree, d_clients_tree),
               grams_tree, alpha, weights, ridge, return_info)


def vera_merge_d_tree(d_tree: PyTree, b_tree: PyTree, vera_a_tree: PyTree,
                      vera_b_tree: PyTree, grams_tree: PyTree, alpha: float = 0.0,
                      weights: jax.Array | None = None, ridge: float = 1e-6,
                      return_info: bool = False,
                      b_clients_tree: PyTree | None = None) -> Any:
  """`vera_merge_d` on every layer, one jitted call: d (C, r), b (out,),
  vera_a (in, r), vera_b (r, out), grams (C, in[, in]), b_clients (C, out) or
  None. -> tree of (r,) [, MergeInfo]; r x r systems of one shape are stacked."""
  return _call('vera_d', d_tree, (b_tree, vera_a_tree, vera_b_tree, b_clients_tree),
               grams_tree, alpha, weights, ridge, return_info)


def ia3_merge_columns_tree(l_tree: PyTree, kernel_tree: PyTree, grams_tree: PyTree,
                           alpha: float = 0.0, weights: jax.Array | None = None,
                           ridge: float = 1e-6, return_info: bool = False) -> Any:
  """`ia3_merge_columns` on every layer: l (C, out), kernel (in, out), grams
  (C, in[, in]) -> tree of (out,) [, MergeInfo], one jitted call."""
  return _call('ia3_columns', l_tree, (kernel_tree,), grams_tree, alpha, weights,
               ridge, return_info)


def ia3_merge_rows_tree(l_tree: PyTree, kernel_tree: PyTree, grams_tree: PyTree,
                        alpha: float = 0.0, weights: jax.Array | None = None,
                        ridge: float = 1e-6, return_info: bool = False) -> Any:
  """`ia3_merge_rows` on every layer: l (C, in), kernel (in, out), grams
  (C, in[, in]) -> tree of (in,) [, MergeInfo], one jitted call."""
  return _call('ia3_rows', l_tree, (kernel_tree,), grams_tree, alpha, weights,
               ridge, return_info)

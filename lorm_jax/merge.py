"""Closed-form LoRM merges (spec section 4), Flax layout, float32, jitted.

Layout: a kernel is (in, out); a LoRA pair is a = A^T (in, r) and b = B^T
(r, out), so the kernel update is a @ b. A leading axis C indexes clients.
Client i has the Gram G_i = X_i^T X_i of its layer inputs, (in, in), or only
its diagonal (in,). With G~_i = alpha G_i + (1 - alpha) diag(G_i) and client
weights w_i (0 = absent), the merges minimise
  sum_i w_i || X~_i (merged - client_i) ||^2,   X~_i^T X~_i = G~_i,
which gives (G~ = sum_i w_i G~_i):
  A-round / RegMean: G~ a_M = sum_i w_i G~_i a_i                (in x in system)
  B-round:           (a^T G~ a) b_M = sum_i w_i (a^T G~_i a) b_i (r x r system)
  cross-task model:  W0 + Q^-1 P, P = sum_t G_t a_t b_t, Q = sum_t G_t  (solve_psd)
(Torch layout: A_M = (sum_i A_i G~_i) G~^-1, B_M = (sum_i B_i A G~_i A^T)(A G~ A^T)^-1.)

Numerics. Every system is PSD, possibly singular. It gets a ridge relative to
its scale, ridge * mean(diag), is Jacobi-scaled to unit diagonal (float32
conditioning) and solved by Cholesky. A system whose Cholesky result is not
finite is re-solved, inside the same jitted call, by an eigendecomposition
pseudo-inverse (eigenvalues below n * eps * max are dropped); `MergeInfo`
counts those fallbacks and any result still non-finite (non-finite inputs).
The all-zero system (nobody has data) gives 0, like the pseudo-inverse.
With alpha = 0 (or diagonal Grams) the in x in system is diagonal: no (in, in)
matrix is built and the A-merge is a per-input-row weighted average.

Whole-model versions (`*_tree`) take pytrees of per-layer arrays and are one
jitted call each. Every layer's system is built on its own (its client
reductions are GEMMs or fused elementwise sums; stacking the inputs would
only copy them); diagonal systems are solved in place, elementwise, and full
systems ((in, in), or the B-round's (r, r)) are stacked by shape. Each group
of same-shape systems is cut into one chunk per core and each chunk solved
in one loop of Cholesky solves (lax.map; see `_per_system` for why not
vmap). The eigendecomposition fallback is a
lax.cond per chunk, so it costs nothing unless a system of that chunk fails
(under a user's vmap it turns into a select and is always computed).

`alpha` is static (a Python float: it picks the diagonal path; changing it
recompiles); `ridge` is a traced scalar.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import cho_factor, cho_solve

from lorm_jax import runtime

PyTree = Any

__all__ = [
    'MergeInfo', 'merge_a', 'merge_b', 'regmean', 'solve_psd', 'fedavg',
    'merge_a_tree', 'merge_b_tree', 'regmean_tree', 'solve_psd_tree',
    'fedavg_tree',
]

_F32 = jnp.float32
# XLA:CPU's intra-op pool has one thread per usable core.
_THREADS = runtime.available_cores()
_EPS32 = float(jnp.finfo(jnp.float32).eps)


class MergeInfo(NamedTuple):
  """Health of the solves of one call; int32 scalars summed over all layers.

  fallbacks: systems whose Cholesky result was non-finite and that were
    re-solved with the eigendecomposition pseudo-inverse.
  nonfinite: systems whose final result is still non-finite (only happens
    when the inputs are non-finite).
  """
  fallbacks: jax.Array
  nonfinite: jax.Array

  def __add__(self, other: 'MergeInfo') -> 'MergeInfo':  # type: ignore[override]
    return MergeInfo(self.fallbacks + other.fallbacks,
                     self.nonfinite + other.nonfinite)


def _zero_info() -> MergeInfo:
  zero = jnp.zeros((), jnp.int32)
  return MergeInfo(zero, zero)


def _all_finite(x: jax.Array) -> jax.Array:
  """(L, ...) -> (L,) bool: every entry of x[l] is finite."""
  return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def _info(fallback: jax.Array, x: jax.Array) -> MergeInfo:
  return MergeInfo(jnp.sum(fallback, dtype=jnp.int32),
                   jnp.sum(~_all_finite(x), dtype=jnp.int32))


# ----------------------------------------------------------------- solvers


def _chol_solve_one(m: jax.Array, rhs: jax.Array, ridge: jax.Array) -> jax.Array:
  """Solves (m + eps I) x = rhs by Cholesky; m (n, n) PSD, rhs (n, k).

  eps = ridge * mean(diag m); the system is scaled to unit diagonal first.
  An all-zero m gives x = 0. A failed factorisation gives non-finite x.
  """
  n = m.shape[-1]
  d = jnp.diagonal(m)
  mean_d = jnp.mean(d)
  nonzero = mean_d > 0
  eps = jnp.where(nonzero, ridge * mean_d, 1.0)
  s = lax.rsqrt(d + eps)
  scaled = s[:, None] * (m + eps * jnp.eye(n, dtype=m.dtype)) * s[None, :]
  factor = cho_factor(scaled, lower=True, check_finite=False)
  x = s[:, None] * cho_solve(factor, s[:, None] * rhs, check_finite=False)
  return jnp.where(nonzero, x, 0.0)


def _eig_solve_one(m: jax.Array, rhs: jax.Array) -> jax.Array:
  """Pseudo-inverse solve pinv(m) @ rhs via eigh; m (n, n) symmetric, rhs (n, k)."""
  n = m.shape[-1]
  scale = jnp.mean(jnp.abs(jnp.diagonal(m)))
  scale = jnp.where(scale > 0, scale, 1.0)
  lam, v = jnp.linalg.eigh(m / scale)
  keep = lam > n * _EPS32 * jnp.max(jnp.abs(lam))
  inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
  return (v @ (inv[:, None] * (v.T @ rhs))) / scale


def _per_system(fn: Callable[[jax.Array, jax.Array], jax.Array], m: jax.Array,
                rhs: jax.Array) -> jax.Array:
  """fn(m[l], rhs[l]) for every l, one system per LAPACK call (lax.map).

  Not vmap: jaxlib 0.10's CPU LAPACK kernels split a batched call over the
  intra-op thread pool and block waiting for it, which deadlocks when as many
  batched calls run concurrently as the pool has threads (2 on a 2-core
  machine; seen with the 4 layer kinds of a ViT merge). Unbatched calls run
  inline.
  """
  return lax.map(lambda args: fn(*args), (m, rhs))


def _solve_full_stacked(m: jax.Array, rhs: jax.Array,
                        ridge: jax.Array) -> tuple[jax.Array, MergeInfo]:
  """Solves L PSD systems; m (L, n, n), rhs (L, n, k) -> x (L, n, k), info."""
  x = _per_system(lambda a, b: _chol_solve_one(a, b, ridge), m, rhs)
  bad = ~_all_finite(x)

  def fallback() -> jax.Array:
    x_eig = _per_system(_eig_solve_one, m, rhs)
    return jnp.where(bad[:, None, None], x_eig, x)

  x = lax.cond(jnp.any(bad), fallback, lambda: x)
  return x, _info(bad, x)


def _solve_diag_stacked(g: jax.Array, rhs: jax.Array,
                        ridge: jax.Array) -> tuple[jax.Array, MergeInfo]:
  """Solves L diagonal systems; g (L, n) >= 0, rhs (L, n, k) -> x (L, n, k), info.

  Same regularisation as the full path: x = rhs / (g + ridge * mean(g)).
  """
  n = g.shape[-1]
  mean_g = jnp.mean(g, axis=-1, keepdims=True)
  nonzero = mean_g > 0
  eps = jnp.where(nonzero, ridge * mean_g, 1.0)
  x = jnp.where(nonzero[..., None], rhs / (g + eps)[..., None], 0.0)
  bad = ~_all_finite(x)
  keep = g > n * _EPS32 * jnp.max(jnp.abs(g), axis=-1, keepdims=True)
  x_pinv = jnp.where(keep[..., None], rhs / jnp.where(keep, g, 1.0)[..., None],
                     0.0)
  x = jnp.where(bad[:, None, None], x_pinv, x)
  return x, _info(bad, x)


# ------------------------------------------------------ per-layer systems


def _check_alpha(alpha: float) -> float:
  alpha = float(alpha)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}')
  return alpha


def _prepare_grams(grams: jax.Array, full_ndim: int, alpha: float) -> jax.Array:
  """Casts to float32; with alpha = 0 reduces full Grams to their diagonal."""
  grams = jnp.asarray(grams, _F32)
  if grams.ndim == full_ndim:
    if alpha == 0:
      return jnp.diagonal(grams, axis1=-2, axis2=-1)
    return grams
  if grams.ndim == full_ndim - 1:
    if alpha != 0:
      raise ValueError(
          'diagonal Grams carry no off-diagonal terms: alpha must be 0, got '
          f'{alpha}')
    return grams
  raise ValueError(f'bad Gram shape {grams.shape}')


def _client_weights(weights: jax.Array | None, c: int) -> jax.Array:
  if weights is None:
    return jnp.ones((c,), _F32)
  weights = jnp.asarray(weights, _F32)
  if weights.shape != (c,):
    raise ValueError(f'weights must have shape ({c},), got {weights.shape}')
  return weights


def _drop_absent(x: jax.Array, w: jax.Array) -> jax.Array:
  """Zeroes x[c] where w[c] == 0 so absent clients (even NaN ones) add nothing."""
  return jnp.where((w != 0).reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)


def _client_sum(term: Callable[[int], jax.Array], w: jax.Array) -> jax.Array:
  """sum_i w_i term(i) over the clients with w_i != 0; an absent client's term
  (which may be NaN) adds nothing.

  An unrolled loop of multiply-adds that XLA fuses into one pass: XLA:CPU
  reduces the leading axis of a (C, ...) array 3-10x slower, and zeroing the
  absent clients first costs a copy (both measured on the 48 layers of a
  ViT-B).
  """
  acc = None
  for i in range(w.shape[0]):
    t = jnp.where(w[i] != 0, w[i] * term(i), 0.0)
    acc = t if acc is None else acc + t
  return acc


def _regmean_system(k: jax.Array, grams: jax.Array, w: jax.Array,
                    alpha: float) -> tuple[jax.Array, jax.Array]:
  """One layer's RegMean system. k (C, in, out); grams (C, in, in) or (C, in).

  Returns (G~ (in, in) or its diagonal (in,), rhs = sum_i w_i G~_i k_i (in, out)).
  """
  if grams.ndim == 2:
    return (_client_sum(lambda i: grams[i], w),
            _client_sum(lambda i: grams[i][:, None] * k[i], w))
  k = _drop_absent(k, w)

  def build(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    diag = jnp.diagonal(g, axis1=1, axis2=2)
    m = alpha * _client_sum(lambda i: g[i], w)
    m = m + (1.0 - alpha) * jnp.diag(_client_sum(lambda i: diag[i], w))
    # Grams are symmetric, so sum_i G_i k_i = [G_1; ...; G_C]^T [k_1; ...; k_C]:
    # one GEMM over the stacked (C * in, in) rows, whose reshape is free. On
    # XLA:CPU that is 1.7x faster than per-client GEMMs and a client sum, and
    # those ~10x faster than a contraction over (client, column) of g.
    rows = g.shape[0] * g.shape[1]
    rhs = alpha * jnp.dot(g.reshape(rows, -1).T, (w[:, None, None] * k).reshape(rows, -1))
    return m, rhs + (1.0 - alpha) * _client_sum(lambda i: diag[i][:, None] * k[i], w)

  return _build_dropping_absent(build, grams, w)


def _build_dropping_absent(build: Callable[[jax.Array], Any], grams: jax.Array,
                           w: jax.Array) -> Any:
  """build(grams) with absent clients' full Grams zeroed (they may be NaN).

  Zeroing copies (C, in, in), so it only runs when some weight is 0.
  """
  return lax.cond(jnp.any(w == 0), lambda g: build(_drop_absent(g, w)), build,
                  grams)


def _b_system(b: jax.Array, a: jax.Array, grams: jax.Array, w: jax.Array,
              alpha: float) -> tuple[jax.Array, jax.Array]:
  """One layer's B-round system. b (C, r, out), a (in, r), grams (C, in[, in]).

  Returns (a^T G~ a (r, r), sum_i w_i (a^T G~_i a) b_i (r, out)).
  """
  b = _drop_absent(b, w)

  def build(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    if g.ndim == 2:  # a^T diag(g_i) a without diag matrices
      m_c = jnp.einsum('cir,is->crs', (w[:, None] * g)[:, :, None] * a, a)
    else:
      diag = jnp.diagonal(g, axis1=1, axis2=2)
      ga = alpha * jnp.einsum('cij,jr->cir', g, a)
      ga = ga + (1.0 - alpha) * diag[:, :, None] * a[None]
      m_c = w[:, None, None] * jnp.einsum('ir,cis->crs', a, ga)  # (C, r, r)
    m_c = 0.5 * (m_c + jnp.swapaxes(m_c, 1, 2))
    return jnp.sum(m_c, axis=0), jnp.einsum('crs,cso->ro', m_c, b)

  if grams.ndim == 2:
    return build(_drop_absent(grams, w))
  return _build_dropping_absent(build, grams, w)


def _merge_leaves(build: Callable[..., tuple[jax.Array, jax.Array]],
                  leaf_args: Sequence[tuple[jax.Array, ...]],
                  ridge: jax.Array) -> tuple[list[jax.Array], MergeInfo]:
  """Builds every layer's system, then solves them batched by shape.

  build(*args) -> (system, rhs) for one layer; every layer is built on its
  own inside the one jitted call. (Stacking the layers' inputs and vmapping
  build copied them and turned the per-layer products into batched dots:
  measured 2-8x slower on XLA:CPU for the 48 layers of a ViT-B.) Diagonal
  systems (in,) are solved where they are built, elementwise. Full systems,
  (in, in) or the B-round's (r, r), are grouped by shape and stacked; each
  group is cut into one chunk per CPU core, and each chunk is solved in one
  loop of Cholesky solves (`_solve_full_stacked`): the chunks are
  independent, so XLA can run them on different threads.
  """
  systems = [build(*args) for args in leaf_args]
  out: list[Any] = [None] * len(leaf_args)
  info = _zero_info()
  groups: dict[Hashable, list[int]] = collections.defaultdict(list)
  for i, (m, rhs) in enumerate(systems):
    if m.ndim == 1:
      x, leaf_info = _solve_diag_stacked(m[None], rhs[None], ridge)
      out[i], info = x[0], info + leaf_info
    else:
      groups[(m.shape, rhs.shape)].append(i)
  for group in groups.values():
    for idx in _chunks(group, _THREADS):
      x, chunk_info = _solve_full_stacked(jnp.stack([systems[i][0] for i in idx]),
                                          jnp.stack([systems[i][1] for i in idx]), ridge)
      info = info + chunk_info
      for j, i in enumerate(idx):
        out[i] = x[j]
  return out, info


def _chunks(idx: list[int], parts: int) -> list[list[int]]:
  """Splits idx into at most `parts` contiguous, nearly equal chunks."""
  size = -(-len(idx) // max(1, min(parts, len(idx))))
  return [idx[i:i + size] for i in range(0, len(idx), size)]


def _check_factor(x: jax.Array, name: str) -> jax.Array:
  x = jnp.asarray(x, _F32)
  if x.ndim != 3:
    raise ValueError(f'{name} must be (C, rows, cols), got {x.shape}')
  return x


def _check_grams(grams: jax.Array, c: int, n: int) -> None:
  if grams.shape not in ((c, n, n), (c, n)):
    raise ValueError(f'grams must be ({c}, {n}, {n}) or ({c}, {n}), '
                     f'got {grams.shape}')


def _as_matrix_rhs(rhs: jax.Array) -> tuple[jax.Array, bool]:
  rhs = jnp.asarray(rhs, _F32)
  return (rhs[:, None], True) if rhs.ndim == 1 else (rhs, False)


# ------------------------------------------------- jitted implementations
# One jitted function per idea, taking pytrees (a bare array is a one-leaf
# tree), weights always an array and ridge a traced scalar, so single-layer
# and whole-model calls share code and calls differing only in defaults share
# compiled executables.


@functools.partial(jax.jit, static_argnames=('alpha',))
def _regmean_impl(kernels_tree: PyTree, grams_tree: PyTree, w: jax.Array,
                  ridge: jax.Array, alpha: float) -> tuple[PyTree, MergeInfo]:
  leaves, treedef = jax.tree_util.tree_flatten(kernels_tree)
  grams = treedef.flatten_up_to(grams_tree)
  leaves = [_check_factor(k, 'kernels') for k in leaves]
  for k, g in zip(leaves, grams):
    _check_grams(g, k.shape[0], k.shape[1])
  grams = [_prepare_grams(g, 3, alpha) for g in grams]
  out, info = _merge_leaves(
      lambda k, g: _regmean_system(k, g, w, alpha), list(zip(leaves, grams)), ridge)
  return treedef.unflatten(out), info


@functools.partial(jax.jit, static_argnames=('alpha',))
def _merge_b_impl(b_tree: PyTree, a_tree: PyTree, grams_tree: PyTree,
                  w: jax.Array, ridge: jax.Array,
                  alpha: float) -> tuple[PyTree, MergeInfo]:
  leaves, treedef = jax.tree_util.tree_flatten(b_tree)
  a_leaves = [jnp.asarray(a, _F32) for a in treedef.flatten_up_to(a_tree)]
  grams = treedef.flatten_up_to(grams_tree)
  leaves = [_check_factor(b, 'b') for b in leaves]
  for b, a, g in zip(leaves, a_leaves, grams):
    if a.ndim != 2 or a.shape[1] != b.shape[1]:
      raise ValueError(f'a must be (in, {b.shape[1]}), got {a.shape}')
    _check_grams(g, b.shape[0], a.shape[0])
  grams = [_prepare_grams(g, 3, alpha) for g in grams]
  out, info = _merge_leaves(
      lambda b, a, g: _b_system(b, a, g, w, alpha),
      list(zip(leaves, a_leaves, grams)), ridge)
  return treedef.unflatten(out), info


@jax.jit
def _solve_psd_impl(gram_tree: PyTree, rhs_tree: PyTree,
                    ridge: jax.Array) -> tuple[PyTree, MergeInfo]:
  leaves, treedef = jax.tree_util.tree_flatten(rhs_tree)
  grams = [jnp.asarray(g, _F32) for g in treedef.flatten_up_to(gram_tree)]
  mats, vec = zip(*[_as_matrix_rhs(r) for r in leaves]) if leaves else ((), ())
  for g, r in zip(grams, mats):
    if g.shape not in ((r.shape[0], r.shape[0]), (r.shape[0],)):
      raise ValueError(f'gram {g.shape} does not match rhs {r.shape}')
  out, info = _merge_leaves(lambda g, r: (g, r), list(zip(grams, mats)), ridge)
  out = [x[:, 0] if v else x for x, v in zip(out, vec)]
  return treedef.unflatten(out), info


def _fedavg_leaf(x: jax.Array, w: jax.Array) -> jax.Array:
  x = jnp.asarray(x, _F32)
  if x.shape[:1] != w.shape:
    raise ValueError(f'leaf {x.shape} does not start with {w.shape[0]} clients')
  total = jnp.sum(w)
  s = _client_sum(lambda i: x[i], w)
  return jnp.where(total != 0, s / jnp.where(total != 0, total, 1.0), 0.0)


@jax.jit
def _fedavg_impl(tree: PyTree, w: jax.Array) -> PyTree:
  # Elementwise: leaves are not stacked, XLA fuses each leaf's reduction.
  return jax.tree_util.tree_map(lambda x: _fedavg_leaf(x, w), tree)


def _num_clients(tree: PyTree) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  return int(jnp.shape(leaves[0])[0]) if leaves else 0


def _run(impl: Callable[..., tuple[PyTree, MergeInfo]], trees: tuple,
         weights: jax.Array | None, ridge: float, return_info: bool,
         **static: Any) -> Any:
  """Calls impl(*trees, weights array, ridge array, **static) [-> (out, info)]."""
  if 'alpha' in static:
    static['alpha'] = _check_alpha(static['alpha'])
  w = _client_weights(weights, _num_clients(trees[0]))
  out, info = impl(*trees, w, jnp.asarray(ridge, _F32), **static)
  return (out, info) if return_info else out


# ------------------------------------------------------------ single layer


def regmean(kernels: jax.Array, grams: jax.Array, alpha: float,
            weights: jax.Array | None = None, ridge: float = 1e-6,
            return_info: bool = False) -> Any:
  """RegMean of client kernels: G~ k_M = sum_i w_i G~_i k_i.

  kernels (C, in, out); grams (C, in, in) full (symmetric PSD, as every Gram
  X^T X is) or (C, in) diagonal (then alpha must be 0); weights (C,) or None
  -> (in, out) float32 [, MergeInfo].
  Used for the classifier head and the cross-task merge.
  """
  return _run(_regmean_impl, (kernels, grams), weights, ridge, return_info,
              alpha=alpha)


def merge_a(a: jax.Array, grams: jax.Array, alpha: float = 0.0,
            weights: jax.Array | None = None, ridge: float = 1e-6,
            return_info: bool = False) -> Any:
  """A-round merge: G~ a_M = sum_i w_i G~_i a_i (RegMean of the a factors).

  a (C, in, r); grams (C, in, in) or (C, in); weights (C,) -> (in, r) [, info].
  """
  return regmean(a, grams, alpha, weights, ridge, return_info)


def merge_b(b: jax.Array, a: jax.Array, grams: jax.Array, alpha: float = 0.0,
            weights: jax.Array | None = None, ridge: float = 1e-6,
            return_info: bool = False) -> Any:
  """B-round merge with shared a: (a^T G~ a) b_M = sum_i w_i (a^T G~_i a) b_i.

  b (C, r, out); a (in, r); grams (C, in, in) or (C, in); weights (C,)
  -> (r, out) float32 [, MergeInfo].
  """
  return _run(_merge_b_impl, (b, a, grams), weights, ridge, return_info,
              alpha=alpha)


def solve_psd(gram: jax.Array, rhs: jax.Array, ridge: float = 1e-6,
              return_info: bool = False) -> Any:
  """Solves G x = rhs for PSD G (in, in) or diagonal G (in,); rhs (in, k) or (in,).

  Used for the cross-task model W0 + Q^-1 P (P = sum_t G_t a_t b_t, (in, out)).
  Returns x shaped like rhs, float32 [, MergeInfo].
  """
  out, info = _solve_psd_impl(gram, rhs, jnp.asarray(ridge, _F32))
  return (out, info) if return_info else out


def fedavg(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Weighted mean over clients; this is also the head-bias merge.

  x (C, ...); weights (C,) sample counts (None = uniform) -> x.shape[1:]
  float32. Zero-weight clients are ignored (even if NaN); zero total -> 0.
  """
  return fedavg_tree(x, weights)


# ---------------------------------------------------------------- pytrees


def regmean_tree(kernels_tree: PyTree, grams_tree: PyTree, alpha: float,
                 weights: jax.Array | None = None, ridge: float = 1e-6,
                 return_info: bool = False) -> Any:
  """`regmean` on every leaf of a tree, in one jitted call.

  kernels_tree leaves (C, in, out); grams_tree has the same structure with
  leaves (C, in, in) or (C, in). Returns the tree of (in, out) [, MergeInfo
  summed over leaves].
  """
  return regmean(kernels_tree, grams_tree, alpha, weights, ridge, return_info)


def merge_a_tree(a_tree: PyTree, grams_tree: PyTree, alpha: float = 0.0,
                 weights: jax.Array | None = None, ridge: float = 1e-6,
                 return_info: bool = False) -> Any:
  """`merge_a` on every layer: a leaves (C, in, r), grams (C, in, in) or (C, in)."""
  return regmean(a_tree, grams_tree, alpha, weights, ridge, return_info)


def merge_b_tree(b_tree: PyTree, a_tree: PyTree, grams_tree: PyTree,
                 alpha: float = 0.0, weights: jax.Array | None = None,
                 ridge: float = 1e-6, return_info: bool = False) -> Any:
  """`merge_b` on every layer, in one jitted call.

  b_tree leaves (C, r, out); a_tree (same structure) leaves (in, r), the
  shared server a; grams_tree leaves (C, in, in) or (C, in). Returns the tree
  of (r, out) [, MergeInfo].
  """
  return merge_b(b_tree, a_tree, grams_tree, alpha, weights, ridge,
                 return_info)


def solve_psd_tree(gram_tree: PyTree, rhs_tree: PyTree, ridge: float = 1e-6,
                   return_info: bool = False) -> Any:
  """`solve_psd` on every leaf, in one jitted call.

  rhs leaves (in, k) or (in,); gram_tree (same structure) leaves (in, in) or
  (in,). Returns the tree of solutions [, MergeInfo].
  """
  return solve_psd(gram_tree, rhs_tree, ridge, return_info)


def fedavg_tree(tree: PyTree, weights: jax.Array | None = None) -> PyTree:
  """`fedavg` on every leaf (C, ...) -> (...), in one jitted call."""
  return _fedavg_impl(tree, _client_weights(weights, _num_clients(tree)))


# ------------------------------------------------------- Gram helpers for methods


def gram_mode(alpha: float) -> str:
  """'diag' when alpha = 0 (only the diagonal enters the merge), else 'full'."""
  return 'diag' if alpha == 0 else 'full'


def regularize_gram(gram: jax.Array, alpha: float) -> jax.Array:
  """G~ = alpha G + (1 - alpha) diag(G) for a full (.., n, n) or diagonal (.., n) Gram."""
  if gram.ndim >= 2 and gram.shape[-1] == gram.shape[-2] and alpha > 0:
    diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
    return alpha * gram + (1 - alpha) * (diag[..., None] * jnp.eye(gram.shape[-1], dtype=gram.dtype))
  return gram if gram.ndim == 1 or alpha > 0 else jnp.diagonal(gram, axis1=-2, axis2=-1)


def gram_times(gram: jax.Array, x: jax.Array) -> jax.Array:
  """G @ x for a diagonal (n,) or full (n, n) Gram and x (n, k)."""
  return gram[:, None] * x if gram.ndim == 1 else gram @ x


def fallback_count(info: MergeInfo | int) -> jax.Array:
  """int32 sum of a merge's MergeInfo (eigendecomposition fallbacks plus
  systems still non-finite), the `merge_fallbacks` a round reports; a plain
  int (a factor that was not merged) passes through."""
  if isinstance(info, int):
    return jnp.int32(info)
  leaves = jax.tree.leaves(info)
  return sum(jnp.sum(x).astype(jnp.int32) for x in leaves) if leaves else jnp.int32(0)

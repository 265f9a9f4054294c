"""TIES-merging of the clients' task vectors (LoRA variant).

The reference (fed-mammoth `ties_merging`) fine-tunes the whole ViT and, at
every round's end, TIES-merges the clients' task vectors (client parameters
minus the server's) over the one flattened parameter vector. Here the harness
is `fedsum.TaskVectorMerge`: a fresh LoRA per round on top of the server's
running full delta D, task vector tau_i = {layer: a_i @ b_i} + {'head':
head_i - head}. Per round, over the participants i:

  trim    per client, zero the entries of tau_i whose magnitude is below the
          `trim` quantile (0.7, linear interpolation) of |tau_i| over all its
          entries (all layers and the head together); 30% are kept
  elect   per entry, sign(sum_i trimmed tau_i)
  merge   per entry, the mean of the trimmed entries whose sign is the
          elected one (0 where none is)
  apply   D <- D + scale m[layers], head <- head + scale m['head'], scale 0.4

No sample weighting (the reference's `avg_type` is not used by its merge).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from lorm_jax.methods.base import ClientResults, Server
from lorm_jax.methods.fedsum import TaskVectorMerge, present_rows
from lorm_jax.models import functional as F


def _flat(tree: Any) -> jax.Array:
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _kth_smallest_bits(bits: jax.Array, k: jax.Array) -> jax.Array:
  """The k-th smallest (0-based) of bits (n,) int32 >= 0, by bisection.

  Thirty-two counting passes over the array instead of a sort: for the
  embedded default's 21M entries per client, XLA:CPU's sort took about 6 s a
  client, the passes a fraction of that (BENCHMARKS.md, "TIES merge").
  """
  def halve(_, bounds):
    lo, hi = bounds                              # the answer is in [lo, hi]
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid) > k           # k + 1 entries are <= mid
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.int32(0), jnp.int32(jnp.iinfo(jnp.int32).max)))
  return lo


def magnitude_quantile(x: jax.Array, q: float) -> jax.Array:
  """jnp.quantile(jnp.abs(x), q) (method 'linear'), bit for bit, without a sort.

  x (n,) float32. The bit patterns of non-negative float32s order as their
  values, so the two order statistics the interpolation needs come from
  `_kth_smallest_bits` and one more pass; the position q (n - 1), its floor
  and ceiling and the two weights are computed as jnp.quantile computes them
  (in float32). NaN anywhere gives NaN, as jnp.quantile does.
  """
  mag = jnp.abs(x)
  bits = jax.lax.bitcast_convert_type(mag, jnp.int32)
  n = jnp.float32(x.shape[0])
  pos = jnp.float32(q) * (n - 1)
  floor = jnp.floor(pos)
  low = jnp.clip(floor, 0, n - 1)
  high = jnp.clip(jnp.ceil(pos), 0, n - 1)
  high_weight = pos - floor
  low_weight = 1 - high_weight
  low_bits = _kth_smallest_bits(bits, low.astype(jnp.int32))
  # The next order statistic is the same value if it repeats, else the
  # smallest entry above it.
  repeats = jnp.sum(bits <= low_bits) > high.astype(jnp.int32)
  above = jnp.min(jnp.where(bits > low_bits, bits, jnp.iinfo(jnp.int32).max))
  high_bits = jnp.where(repeats, low_bits, above)
  low_value, high_value = (jax.lax.bitcast_convert_type(b, jnp.float32)
                           for b in (low_bits, high_bits))
  result = low_value * low_weight + high_value * high_weight
  return jnp.where(jnp.any(jnp.isnan(mag)), jnp.nan, result)


def trim_thresholds(task_vector: Callable[[Any], Any], rows: Any, trim: float) -> jax.Array:
  """(C,) the `trim` quantile of |task_vector(row)| over all of each row's
  entries, one row at a time (lax.map): the thresholds TIES trims at."""
  return jax.lax.map(lambda row: magnitude_quantile(_flat(task_vector(row)), trim), rows)


def lora_rows(a: F.Flat, b: F.Flat, head: F.Flat, server_head: F.Flat) -> dict:
  """The rows `_lora_task_vector` takes: the clients' factors and heads (leading
  axis C) with the server's head broadcast to every client."""
  c = jax.tree.leaves(a)[0].shape[0]
  return {'a': a, 'b': b, 'head': head,
          'server_head': jax.tree.map(lambda s: jnp.broadcast_to(s, (c,) + s.shape), server_head)}


def ties_merge_rows(task_vector: Callable[[Any], Any], rows: Any, present: jax.Array,
                    trim: float) -> Any:
  """TIES merge of C task vectors given row by row.

  rows: a pytree with leading client axis C; task_vector(row) -> the client's
  task vector (a pytree of arrays, the same structure for every row).
  present (C,) bool: absent rows contribute nothing. Returns the merged
  vector (task_vector's structure, unscaled). The C task vectors are formed
  one at a time (lax.map / lax.scan), never stacked.
  """
  q = trim_thresholds(task_vector, rows, trim)                        # (C,)

  def trimmed(row, qi, keep):
    return jax.tree.map(lambda t: jnp.where(keep & (jnp.abs(t) >= qi), t, 0.0),
                        task_vector(row))

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(task_vector, jax.tree.map(lambda x: x[0], rows)))

  def add(total, xs):
    return jax.tree.map(jnp.add, total, trimmed(*xs)), None

  total, _ = jax.lax.scan(add, zeros, (rows, q, present))
  sign = jax.tree.map(jnp.sign, total)

  def agree(carry, xs):
    s, n = carry
    t = trimmed(*xs)
    hit = jax.tree.map(lambda ti, e: (ti * e) > 0, t, sign)
    s = jax.tree.map(lambda acc, ti, h: acc + jnp.where(h, ti, 0.0), s, t, hit)
    n = jax.tree.map(lambda acc, h: acc + h.astype(acc.dtype), n, hit)
    return (s, n), None

  (s, n), _ = jax.lax.scan(agree, (zeros, zeros), (rows, q, present))
  return jax.tree.map(lambda si, ni: si / jnp.maximum(ni, 1.0), s, n)


@functools.partial(jax.jit, static_argnames=('trim',))
def ties_merge(tau: Any, present: jax.Array, trim: float) -> Any:
  """TIES merge (unscaled) of stacked task vectors tau (pytree, leaves (C, ...))."""
  return ties_merge_rows(lambda row: row, tau, present, trim)


def _lora_task_vector(row: dict) -> dict:
  """{'deltas': {layer: a_i @ b_i (in, out)}, 'head': head_i - head} of one client."""
  return {'deltas': F.lora_deltas(row['a'], row['b']),
          'head': jax.tree.map(jnp.subtract, row['head'], row['server_head'])}


@functools.partial(jax.jit, static_argnames=('trim',))
def ties_merge_lora(a: F.Flat, b: F.Flat, head: F.Flat, server_head: F.Flat,
                    present: jax.Array, trim: float) -> tuple[F.Flat, F.Flat]:
  """TIES merge (unscaled) of the clients' LoRA task vectors.

  a {layer: (C, in, r)}, b {layer: (C, r, out)}, head {name: (C, ...)},
  server_head {name: (...)}, present (C,) bool. Returns ({layer: (in, out)},
  {name: (...)}).
  """
  merged = ties_merge_rows(_lora_task_vector, lora_rows(a, b, head, server_head), present, trim)
  return merged['deltas'], merged['head']


@dataclasses.dataclass
class TIES(TaskVectorMerge):
  """TIES-merging of LoRA task vectors (the reference fine-tunes the whole ViT)."""
  name: ClassVar[str] = 'ties'
  trim: float = 0.7   # quantile of |tau_i| under which entries are zeroed (reference: 0.7)
  scale: float = 0.4  # factor on the merged vector (reference: 0.4)

  @classmethod
  def validate(cls, config: ConfigDict) -> None:
    own = config.get('ties')
    if own is not None and not 0.0 <= own.get('trim', cls.trim) <= 1.0:
      raise ValueError(f'ties.trim must be in [0, 1], got {own.trim}')

  def merge_task_vectors(self, server: Server, results: ClientResults
                         ) -> tuple[F.Flat, F.Flat]:
    d, head = ties_merge_lora(results.a, results.b, results.head, server['head'],
                              present_rows(results), float(self.trim))
    return ({k: self.scale * v for k, v in d.items()},
            jax.tree.map(lambda x: self.scale * x, head))

"""LoRA aggregation baselines: FedEx-LoRA, FLoRA and FedSA-LoRA.

Three answers to the problem `fedavg` has (mean(a_i) @ mean(b_i) is not
mean(a_i @ b_i)); all three keep the LoRA baseline's cross-task protocol of
`fedavg.FedAvg` (a fresh LoRA each task, the evaluated model W0 + the plain
mean of the tasks' final deltas, a running sum in extra['delta_sum']), so a
comparison with `fedavg` changes the within-task aggregation only.

`fedex_lora` (FedEx-LoRA, Singhal et al., arXiv 2410.09432): clients train a,
b and the head; the server averages a and b and folds the residual
  R += sum_i p_i a_i b_i - mean(a) mean(b),  p_i = n_i / sum_j n_j
into a server-side kernel delta (extra['fold']) that the clients train on
top of (`train_deltas`), so W0 + fold + mean(a) mean(b) is exactly the
sample-weighted mean of the clients' W0 + fold + a_i b_i. The task's delta
is fold + a b.

`flora` (FLoRA, Wang et al., NeurIPS 2024): the server stacks the clients'
factors, a_s = [p_1 a_1 | ... | p_C a_C] (in, C r), b_s = [b_1; ...; b_C]
(C r, out), so a_s @ b_s = sum_i p_i a_i b_i exactly (rank C r, growing with
the participants); it folds the product into the frozen weights
(extra['fold'], the clients' `train_deltas`) and every client starts the
next round from a fresh LoRA. The task's delta is the fold.

`fedsa_lora` (FedSA-LoRA, Guo et al., ICLR 2025): a is shared (the
sample-weighted mean), b stays with each client: extra['b_clients']
{layer: (N, r, out)} for all N clients, handed to the participants by
`round_plan` (RoundPlan.client_params) and written back by
ClientResults.client_ids. The global model uses server['b'] =
sum_i n_i B_i / sum_i n_i over the clients trained in the task (n_i their
latest sample count), which with a shared a is exactly the mean of the
personalised models W0 + a B_i.

Flax layout throughout: a (in, r), b (r, out), kernel W0 + a @ b (no alpha/r).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax import merge
from lorm_jax import rng
from lorm_jax.methods.base import ClientResults, Server
from lorm_jax.methods.fedavg import FedAvg
from lorm_jax.methods.interface import RoundPlan
from lorm_jax.models import functional as F

_HI = jax.lax.Precision.HIGHEST  # server-side products in full float32 (no TF32 on GPUs)


def client_probs(weights: jax.Array) -> jax.Array:
  """p_i = w_i / sum_j w_j over the present clients (w_i > 0), 0 for absent
  ones; all zeros if no client is present. weights (C,) -> (C,) float32."""
  w = jnp.where(weights > 0, jnp.asarray(weights, jnp.float32), 0.0)
  total = jnp.sum(w)
  return w / jnp.where(total > 0, total, 1.0)


def stack_factors(a: jax.Array, b: jax.Array, weights: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """FLoRA's stacking of one layer's client factors.

  a (C, in, r), b (C, r, out), weights (C,) sample counts (0 = absent; such
  clients' factors, even non-finite ones, become zeros) -> (a_s (in, C r),
  b_s (C r, out)) with a_s = [p_1 a_1 | ... | p_C a_C] and b_s the b_i
  stacked along the rank axis, so a_s @ b_s = sum_i p_i a_i b_i.
  """
  c, n_in, r = a.shape
  p = client_probs(weights)
  present = (p > 0)[:, None, None]
  a = jnp.where(present, a * p[:, None, None], 0.0)
  b = jnp.where(present, b, 0.0)
  return jnp.transpose(a, (1, 0, 2)).reshape(n_in, c * r), b.reshape(c * r, b.shape[-1])


@jax.jit
def stacked_products(a: F.Flat, b: F.Flat, weights: jax.Array) -> F.Flat:
  """{layer: a_s @ b_s = sum_i p_i a_i b_i (in, out)}: the weighted mean of
  the clients' LoRA products through their stacking (`stack_factors`).
  a {layer: (C, in, r)}, b {layer: (C, r, out)}, weights (C,)."""
  out = {}
  for k in a:
    a_s, b_s = stack_factors(a[k], b[k], weights)
    out[k] = jnp.matmul(a_s, b_s, precision=_HI)
  return out


@jax.jit
def fedex_aggregate(a: F.Flat, b: F.Flat, fold: F.Flat, weights: jax.Array
                    ) -> tuple[F.Flat, F.Flat, F.Flat]:
  """FedEx-LoRA's exact aggregation of one round.

  a {layer: (C, in, r)}, b {layer: (C, r, out)}, fold {layer: (in, out)} the
  server's residual so far, weights (C,) sample counts (0 = absent). Returns
  (mean a {layer: (in, r)}, mean b {layer: (r, out)}, new fold {layer:
  (in, out)}) with fold' = fold + sum_i p_i a_i b_i - mean(a) @ mean(b), so
  fold' + mean(a) @ mean(b) = fold + sum_i p_i a_i b_i.
  """
  p = client_probs(weights)
  present = (p > 0)[:, None, None]
  mean = lambda x: jnp.sum(jnp.where(present, x * p[:, None, None], 0.0), axis=0)
  a_bar = {k: mean(v) for k, v in a.items()}
  b_bar = {k: mean(v) for k, v in b.items()}
  prod = stacked_products(a, b, weights)
  new = {k: fold[k] + prod[k] - jnp.matmul(a_bar[k], b_bar[k], precision=_HI) for k in a}
  return a_bar, b_bar, new


@jax.jit
def scatter_clients(table: jax.Array, ids: jax.Array, rows: jax.Array, weights: jax.Array
                    ) -> jax.Array:
  """table (N, ...) with table[ids[i]] = rows[i] for the present rows
  (weights[i] > 0); absent (padded) rows write nothing, whatever their id.
  ids (C,) int32, rows (C, ...), weights (C,)."""
  idx = jnp.where(weights > 0, ids, table.shape[0])  # out of range: dropped
  return table.at[idx].set(rows.astype(table.dtype), mode='drop')


@jax.jit
def client_mean(table: F.Flat, counts: jax.Array) -> F.Flat:
  """{layer: sum_i n_i T_i / sum_i n_i} over the clients with n_i > 0 (zeros
  if none): table {layer: (N, ...)}, counts (N,) -> {layer: (...)}."""
  p = client_probs(counts)
  return {k: jnp.tensordot(p, jnp.where((p > 0).reshape((-1,) + (1,) * (v.ndim - 1)), v, 0.0),
                           axes=1, precision=_HI) for k, v in table.items()}


def _zeros_like_tree(tree: F.Flat) -> F.Flat:
  return jax.tree.map(jnp.zeros_like, tree)


@dataclasses.dataclass
class _FoldedLoRA(FedAvg):
  """A LoRA baseline with a server-side kernel delta extra['fold'] (in, out)
  under the clients' training forward, restarted every task; the task's
  delta is fold + a @ b and enters FedAvg's mean of the task deltas."""

  def init_extra(self, params: F.Params) -> dict:
    extra = super().init_extra(params)
    return {**extra, 'fold': dict(extra['delta_sum'])}

  def train_deltas(self, server: Server, task: int) -> F.Flat:
    return server['extra']['fold']

  def end_task(self, server: Server, task: int, task_grams) -> Server:
    extra = server['extra']
    delta = F.lora_deltas(server['a'], server['b'])
    total = {k: extra['delta_sum'][k] + extra['fold'][k] + delta[k] for k in delta}
    return {**server, 'extra': {**extra, 'delta_sum': total,
                                'fold': _zeros_like_tree(extra['fold'])}}


@dataclasses.dataclass
class FedExLoRA(_FoldedLoRA):
  name: ClassVar[str] = 'fedex_lora'

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    a, b, fold = fedex_aggregate(results.a, results.b, server['extra']['fold'],
                                 results.num_samples)
    head = merge.fedavg_tree(results.head, results.num_samples)
    return {**server, 'a': a, 'b': b, 'head': head,
            'extra': {**server['extra'], 'fold': fold}}, {}


@dataclasses.dataclass
class FLoRA(_FoldedLoRA):
  name: ClassVar[str] = 'flora'

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    prod = stacked_products(results.a, results.b, results.num_samples)
    fold = {k: v + prod[k] for k, v in server['extra']['fold'].items()}
    head = merge.fedavg_tree(results.head, results.num_samples)
    a, b = F.init_lora(rng.key(self.config.seed, 'method', task, rnd + 1),
                       server['a'], server['b'])
    return {**server, 'a': a, 'b': b, 'head': head,
            'extra': {**server['extra'], 'fold': fold}}, {}


@dataclasses.dataclass
class FedSALoRA(FedAvg):
  name: ClassVar[str] = 'fedsa_lora'

  def init_extra(self, params: F.Params) -> dict:
    n = self.config.num_clients
    return {**super().init_extra(params),
            'b_clients': {k: jnp.zeros((n,) + v.shape, v.dtype) for k, v in params.b.items()},
            'n_clients': jnp.zeros((n,), jnp.float32)}

  def begin_task(self, server: Server, task: int, key: jax.Array) -> Server:
    """A fresh LoRA (shared a, b = 0) and every client's B back to 0."""
    server = super().begin_task(server, task, key)
    extra = server['extra']
    return {**server, 'extra': {**extra, 'b_clients': _zeros_like_tree(extra['b_clients']),
                                'n_clients': jnp.zeros_like(extra['n_clients'])}}

  def round_plan(self, server: Server, task: int, rnd: int, ids: np.ndarray) -> RoundPlan:
    """FedAvg's plan with each participant starting from its own B:
    client_params['b'] {layer: (len(ids), r, out)} in `ids` order, kept on the
    clients (never sent: RoundPlan.kept_local)."""
    ids = np.asarray(ids)
    n = self.config.num_clients
    if ids.size and (ids.min() < 0 or ids.max() >= n):
      raise ValueError(f'fedsa_lora keeps B for clients 0..{n - 1}, got ids {ids.tolist()}')
    plan = super().round_plan(server, task, rnd, ids)
    idx = jnp.asarray(ids, jnp.int32)
    own = {k: v[idx] for k, v in server['extra']['b_clients'].items()}
    return dataclasses.replace(plan, client_params={'b': own}, kept_local=('b',))

  def end_task(self, server: Server, task: int, task_grams) -> Server:
    """FedAvg's: delta_sum += a @ mean B; the per-client tables are kept
    (begin_task resets them)."""
    new = super().end_task(server, task, task_grams)
    return {**new, 'extra': {**server['extra'], **new['extra']}}

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    if results.client_ids is None:
      raise ValueError('fedsa_lora needs ClientResults.client_ids to keep each client\'s B')
    w = results.num_samples
    ids = jnp.asarray(results.client_ids, jnp.int32)
    extra = server['extra']
    b_clients = {k: scatter_clients(v, ids, results.b[k], w)
                 for k, v in extra['b_clients'].items()}
    n_clients = scatter_clients(extra['n_clients'], ids, w, w)
    a = merge.fedavg_tree(results.a, w)
    head = merge.fedavg_tree(results.head, w)
    b = client_mean(b_clients, n_clients)
    return {**server, 'a': a, 'b': b, 'head': head,
            'extra': {**extra, 'b_clients': b_clients, 'n_clients': n_clients}}, {}

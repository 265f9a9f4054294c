"""Task-vector merges on a running full-rank server delta, and FedSum.

LoRA variants; the reference (fed-mammoth `fedsum`, `ties_merging`)
fine-tunes the whole ViT and merges the clients' full parameter vectors.

The harness (`TaskVectorMerge`, shared with `ties`): the server keeps one full
kernel delta D per LoRA layer (in, out) and the head, both carried across
tasks like the reference's single continually fine-tuned network. Every round
the clients train a fresh LoRA (a uniform, b = 0; a and b together) and the
head on top of W0 + D. A client's task vector is what its training changed:
  tau_i = {layer: a_i @ b_i (in, out)} + {'head': head_i - head}
(the reference's client params minus the server's, restricted to what is
trained here). The server applies a merge of the task vectors,
  D <- D + m(tau)[layers],  head <- head + m(tau)['head'],
and redraws a fresh LoRA for the next round. The evaluated model is W0 + D
with the server's head.

`fedsum`: m(tau) = sum_i tau_i over the round's participants (unweighted).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lorm_jax import rng
from lorm_jax.methods.base import ClientResults, Server
from lorm_jax.methods.regmean import FreshLoRAOnDelta
from lorm_jax.models import functional as F


def present_rows(results: ClientResults) -> jax.Array:
  """(C,) bool: the rows of `results` that are real participants with data
  (padded rows, num_samples 0, are not)."""
  return results.num_samples > 0


def _rows_mask(present: jax.Array, x: jax.Array) -> jax.Array:
  return present.reshape((-1,) + (1,) * (x.ndim - 1))


@jax.jit
def summed_task_vectors(a: F.Flat, b: F.Flat, head: F.Flat, server_head: F.Flat,
                        present: jax.Array) -> tuple[F.Flat, F.Flat]:
  """(sum_i a_i @ b_i, sum_i (head_i - head)) over the present clients.

  a {layer: (C, in, r)}, b {layer: (C, r, out)}, head {name: (C, ...)} (the
  clients' trained values), server_head {name: (...)}, present (C,) bool
  (absent rows are ignored even if non-finite). Returns ({layer: (in, out)},
  {name: (...)}); the per-client products are never stacked.
  """
  deltas = {}
  for k in a:
    ak = jnp.where(_rows_mask(present, a[k]), a[k], 0.0)
    bk = jnp.where(_rows_mask(present, b[k]), b[k], 0.0)
    deltas[k] = jnp.einsum('cir,cro->io', ak, bk)
  heads = jax.tree.map(
      lambda h, s: jnp.sum(jnp.where(_rows_mask(present, h), h - s[None], 0.0), axis=0),
      head, server_head)
  return deltas, heads


@dataclasses.dataclass
class TaskVectorMerge(FreshLoRAOnDelta):
  """Fresh LoRA per round on W0 + D; the server merges the clients' task
  vectors (`merge_task_vectors`) into D and the head. Not registered itself."""
  name: ClassVar[str] = 'task_vector_merge'

  def merge_task_vectors(self, server: Server, results: ClientResults
                         ) -> tuple[F.Flat, F.Flat]:
    """({layer: (in, out)} added to D, {name: (...)} added to the head)."""
    raise NotImplementedError

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    step_d, step_head = self.merge_task_vectors(server, results)
    d = {k: v + step_d[k] for k, v in server['extra']['D'].items()}
    head = jax.tree.map(jnp.add, server['head'], step_head)
    a, b = F.init_lora(rng.key(self.config.seed, 'method', task, rnd + 1), server['a'],
                       server['b'])
    return {**server, 'a': a, 'b': b, 'head': head, 'extra': {**server['extra'], 'D': d}}, {}

  def eval_model(self, server: Server, task: int) -> tuple[F.Flat, F.Flat, F.Flat]:
    return server['extra']['D'], server['a'], jax.tree.map(jnp.zeros_like, server['b'])


@dataclasses.dataclass
class FedSum(TaskVectorMerge):
  """FedSum: the server adds every participant's task vector (no averaging)."""
  name: ClassVar[str] = 'fedsum'

  def merge_task_vectors(self, server: Server, results: ClientResults
                         ) -> tuple[F.Flat, F.Flat]:
    return summed_task_vectors(results.a, results.b, results.head, server['head'],
                               present_rows(results))

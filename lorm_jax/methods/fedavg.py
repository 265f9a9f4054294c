"""Averaging baselines: FedAvg of LoRA factors, and FFA-LoRA.

`fedavg`: clients train a, b and the head; the server takes the
sample-weighted mean of each. Averaging the factors separately is not
averaging the updates (mean(a_i) @ mean(b_i) != mean(a_i @ b_i)), which is
the problem LoRM's closed form solves.

`ffa_lora`: a stays at its random initialisation (redrawn each task, shared by
all clients) and only b and the head are trained and averaged, so the average
of the updates is exact.

Across tasks both follow the reference's LoRA baseline: a fresh LoRA for every
task, and the evaluated model is W0 + the plain mean of the tasks' final
deltas a_t @ b_t (kept as a running sum, checkpointed).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lorm_jax import merge
from lorm_jax.methods.interface import LocalSpec
from lorm_jax.methods.base import ClientResults, Method, Server
from lorm_jax.models import functional as F


@dataclasses.dataclass
class FedAvg(Method):
  name: ClassVar[str] = 'fedavg'
  factors: ClassVar[tuple[str, ...]] = ('a', 'b')  # trained and averaged

  def init_extra(self, params: F.Params) -> dict:
    return {'delta_sum': {k: jnp.zeros((params.a[k].shape[0], params.b[k].shape[1]))
                          for k in params.a}}

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    c = self.config
    return LocalSpec(factors=self.factors, lr_a=c.lr_a, lr_b=c.lr_b, lr_head=c.lr_head,
                     weight_decay=c.weight_decay)

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    avg = lambda tree: merge.fedavg_tree(tree, results.num_samples)
    new = {f: avg(getattr(results, f)) for f in self.factors}
    return {**server, **new, 'head': avg(results.head)}, {}

  def end_task(self, server: Server, task: int, task_grams) -> Server:
    delta = F.lora_deltas(server['a'], server['b'])
    total = {k: server['extra']['delta_sum'][k] + delta[k] for k in delta}
    return {**server, 'extra': {'delta_sum': total}}

  def eval_model(self, server: Server, task: int):
    deltas = {k: v / (task + 1) for k, v in server['extra']['delta_sum'].items()}
    return deltas, server['a'], jax.tree.map(jnp.zeros_like, server['b'])


@dataclasses.dataclass
class FFALoRA(FedAvg):
  name: ClassVar[str] = 'ffa_lora'
  factors: ClassVar[tuple[str, ...]] = ('b',)

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

With `config.model.adapter` = 'vera' or 'ia3' (`Adapted`) the same holds for
the adapter's vectors: fedavg averages VeRA's d and b, or every (IA)^3
vector, and the task delta is the adapter's dense update (ffa_lora keeps
VeRA's d at 0.1 and trains b).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lorm_jax import merge
from lorm_jax.methods.interface import LocalSpec
from lorm_jax.methods.base import ClientResults, Method, Server
from lorm_jax.models import adapters as adapters_lib
from lorm_jax.models import functional as F


class Adapted:
  """The adapter side of a method that works with every `config.model.adapter`
  (mixed in before Method; the class then lists them in `adapters`): the
  adapter's own values when the server starts and at every task's start, its
  dense updates, and the constants of the frozen backbone its server-side
  maths reads, kept in extra['consts'] (none for LoRA, whose numbers and
  state are Method's). Each class opts in by its own `adapters` tuple
  (`adapters_lib.supported`); subclasses that change merges or deltas do not
  inherit it."""

  @property
  def adapter(self) -> adapters_lib.AdapterSpec:
    return adapters_lib.for_config(self.config)

  def init_server(self, params: F.Params, head: F.Flat, key: jax.Array) -> Server:
    server = super().init_server(params, head, key)
    a, b = self.adapter.fresh(key, params.a, params.b)
    return {**server, 'a': a, 'b': b}

  def begin_task(self, server: Server, task: int, key: jax.Array) -> Server:
    """The adapter's fresh values (LoRA: b = 0, a uniform; VeRA: d = 0.1, b = 0;
    (IA)^3: ones)."""
    a, b = self.adapter.fresh(key, server['a'], server['b'])
    return {**server, 'a': a, 'b': b}

  def update_shapes(self, params: F.Params) -> dict[str, tuple[int, int]]:
    """{layer: (in, out)} of every adapted layer's dense update."""
    return self.adapter.update_shapes(params.a, params.b, params.frozen)

  def with_constants(self, extra: dict, params: F.Params) -> dict:
    """extra plus 'consts', what the adapter's server maths reads of the frozen
    backbone (VeRA: its projections per layer kind; (IA)^3: the kernel parts
    its vectors scale), when it reads any."""
    consts = self.adapter.server_constants(params.frozen, self.update_shapes(params))
    return extra if consts is None else {**extra, 'consts': consts}

  def task_deltas(self, server: Server) -> F.Flat:
    """{layer: dW (in, out)} of the server's current a, b."""
    return self.adapter.deltas(server['extra'].get('consts'), server['a'], server['b'])


@dataclasses.dataclass
class FedAvg(Adapted, Method):
  name: ClassVar[str] = 'fedavg'
  factors: ClassVar[tuple[str, ...]] = ('a', 'b')  # trained and averaged
  adapters: ClassVar[tuple[str, ...]] = tuple(adapters_lib.ADAPTERS)

  @classmethod
  def validate(cls, config) -> None:
    adapters_lib.check_config(config, cls)

  def init_extra(self, params: F.Params) -> dict:
    extra = {'delta_sum': {k: jnp.zeros(s) for k, s in self.update_shapes(params).items()}}
    return self.with_constants(extra, params)

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    c = self.config
    return LocalSpec(factors=self.adapter.trained(self.factors), lr_a=c.lr_a, lr_b=c.lr_b,
                     lr_head=c.lr_head, weight_decay=c.weight_decay)

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    avg = lambda tree: merge.fedavg_tree(tree, results.num_samples)
    new = {f: avg(getattr(results, f)) for f in self.adapter.trained(self.factors)}
    return {**server, **new, 'head': avg(results.head)}, {}

  def end_task(self, server: Server, task: int, task_grams) -> Server:
    delta = self.task_deltas(server)
    total = {k: server['extra']['delta_sum'][k] + delta[k] for k in delta}
    return {**server, 'extra': {**server['extra'], 'delta_sum': total}}

  def eval_model(self, server: Server, task: int):
    deltas = {k: v / (task + 1) for k, v in server['extra']['delta_sum'].items()}
    return deltas, server['a'], self.adapter.neutral_b(server['b'])


@dataclasses.dataclass
class FFALoRA(FedAvg):
  name: ClassVar[str] = 'ffa_lora'
  factors: ClassVar[tuple[str, ...]] = ('b',)
  adapters: ClassVar[tuple[str, ...]] = tuple(adapters_lib.ADAPTERS)

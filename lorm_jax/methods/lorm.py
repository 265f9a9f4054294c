"""LoRM: alternating closed-form merges of LoRA factors (spec section 3-4).

Per round clients train one factor (B first in every task, then A, B, ...);
the server merges it in closed form from the clients' Gram statistics
(`merge_b` / `merge_a`), the head by RegMean and its bias by a sample-weighted
mean. After the last round of task t the final delta D_t = a_t @ b_t is folded
into per-layer accumulators P += G_t D_t, Q += G_t (Flax layout), and the
evaluated model is W0 + Q^-1 P.

With `config.model.adapter` = 'vera' the slots hold VeRA's d ('a') and b
('b'): b-rounds and d-rounds alternate as B and A do (b first in every
task), merged by `merge_adapters.vera_merge_b` / `vera_merge_d`. With 'ia3'
every vector is trained and merged every round (`ia3_merge_columns` for
qkv, `ia3_merge_rows` for fc2; config.schedule must stay 'per_round'). The
same Gram trees feed every merge; the cross-task merge folds each adapter's
dense update (`adapters.ADAPTERS[...].deltas`) as D_t (docs/merging.md 3d, 4c).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from ml_collections import ConfigDict

from lorm_jax import merge
from lorm_jax.methods.fedavg import Adapted
from lorm_jax.methods.interface import LocalSpec
from lorm_jax.methods.base import ClientResults, GramRequest, Method, Server
from lorm_jax.models import adapters as adapters_lib
from lorm_jax.models import functional as F

SCHEDULES = ('per_round', 'per_task', 'b_only', 'a_only')
# Diagnostics (config.lorm_ablation), each replacing one piece of LoRM by the
# averaging baseline's: the evaluated model W0 + the plain mean of the task
# deltas instead of W0 + Q^-1 P; the head's sample-weighted mean instead of
# RegMean; the Gram-pass model W0 + a_i b_i instead of the mean-delta model.
ABLATIONS = ('', 'mean_deltas', 'mean_head', 'own_gram_model')


def trained_factor(schedule: str, task: int, rnd: int) -> str:
  """'a' or 'b': the reference alternates per round, restarting with B each task."""
  if schedule == 'per_round':
    return 'b' if rnd % 2 == 0 else 'a'
  if schedule == 'per_task':
    return 'b' if task % 2 == 0 else 'a'
  if schedule == 'b_only':
    return 'b'
  if schedule == 'a_only':
    return 'a'
  raise ValueError(f'unknown schedule {schedule!r}; expected one of {SCHEDULES}')


@dataclasses.dataclass
class LoRM(Adapted, Method):
  name: ClassVar[str] = 'lorm'
  adapters: ClassVar[tuple[str, ...]] = tuple(adapters_lib.ADAPTERS)

  @classmethod
  def validate(cls, config: ConfigDict) -> None:
    if config.schedule not in SCHEDULES:
      raise ValueError(f'unknown schedule {config.schedule!r}; expected one of {SCHEDULES}')
    if config.lorm_ablation not in ABLATIONS:
      raise ValueError(f'unknown lorm_ablation {config.lorm_ablation!r}; expected one of '
                       f'{ABLATIONS}')
    adapters_lib.check_config(config, cls)
    adapter = adapters_lib.for_config(config)
    if not adapter.alternates and config.schedule != 'per_round':
      raise ValueError(f'model.adapter {adapter.name} trains every vector every round; '
                       f"schedule {config.schedule!r} applies to lora and vera only")

  @property
  def backbone_gram_mode(self) -> str:
    return merge.gram_mode(self.config.alpha_backbone)

  def init_extra(self, params: F.Params) -> dict:
    shapes = self.update_shapes(params)
    grams = {}
    for k, (n, _) in shapes.items():
      grams[k] = jnp.zeros((n,) if self.backbone_gram_mode == 'diag' else (n, n))
    deltas = {k: jnp.zeros(s) for k, s in shapes.items()}
    return self.with_constants({'P': deltas, 'Q': grams, 'delta_sum': dict(deltas)}, params)

  def round_factors(self, task: int, rnd: int) -> tuple[str, ...]:
    """The slots trained in round rnd: one by the schedule (LoRA, VeRA), or
    every slot the adapter has ((IA)^3)."""
    if self.adapter.alternates:
      return (trained_factor(self.config.schedule, task, rnd),)
    return self.adapter.factors

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    c = self.config
    return LocalSpec(factors=self.round_factors(task, rnd), lr_a=c.lr_a, lr_b=c.lr_b,
                     lr_head=c.lr_head, weight_decay=c.weight_decay)

  def gram_request(self, task: int, rnd: int) -> GramRequest:
    return GramRequest(self.backbone_gram_mode, True)

  def end_task_gram_request(self) -> GramRequest:
    return GramRequest(self.backbone_gram_mode, False)

  def gram_model(self, server: Server, task: int) -> tuple[F.Flat, float]:
    """W0 + (t D_old + a b) / (t + 1), D_old = delta_sum / t: deltas and b scale."""
    if self.config.lorm_ablation == 'own_gram_model':
      return {}, 1.0
    scale = 1.0 / (task + 1)
    return {k: v * scale for k, v in server['extra']['delta_sum'].items()}, scale

  def gram_inputs(self, server: Server, task: int, params: dict) -> tuple[F.Flat, dict]:
    """Method's, with b scaled so that the adapter's update scales by
    `gram_model`'s factor (LoRA, VeRA: b * s; (IA)^3: 1 + (b - 1) s)."""
    deltas, b_scale = self.gram_model(server, task)
    return deltas, {**params, 'b': self.adapter.scale_b(params['b'], b_scale)}

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    c = self.config
    present = (results.num_samples > 0).astype(jnp.float32)
    a, b, fallbacks = self.adapter.merge(
        self.round_factors(task, rnd)[0], results.a, results.b, server['a'], server['b'],
        server['extra'].get('consts'), results.grams, c.alpha_backbone, present, c.ridge)
    if c.lorm_ablation == 'mean_head':
      kernel, fh = merge.fedavg(results.head['kernel'], results.num_samples), 0
    else:
      kernel, fh = merge.regmean(results.head['kernel'], results.head_grams, c.alpha_head,
                                 weights=present, ridge=c.ridge, return_info=True)
    bias = merge.fedavg(results.head['bias'], results.num_samples)
    server = {**server, 'a': a, 'b': b, 'head': {'kernel': kernel, 'bias': bias}}
    return server, {'merge_fallbacks': fallbacks + merge.fallback_count(fh)}

  def end_task(self, server: Server, task: int, task_grams: F.Flat | None) -> Server:
    extra = server['extra']
    delta = self.task_deltas(server)
    g = {k: merge.regularize_gram(v, self.config.alpha_backbone) for k, v in task_grams.items()}
    extra = {**extra, 'P': {k: extra['P'][k] + merge.gram_times(g[k], delta[k]) for k in delta},
             'Q': {k: extra['Q'][k] + g[k] for k in delta},
             'delta_sum': {k: extra['delta_sum'][k] + delta[k] for k in delta}}
    return {**server, 'extra': extra}

  def eval_model(self, server: Server, task: int) -> tuple[F.Flat, F.Flat, F.Flat]:
    extra = server['extra']
    if self.config.lorm_ablation == 'mean_deltas':
      deltas = {k: v / (task + 1) for k, v in extra['delta_sum'].items()}
    else:
      deltas = merge.solve_psd_tree(extra['Q'], extra['P'], ridge=self.config.ridge)
    return deltas, server['a'], self.adapter.neutral_b(server['b'])

"""LoRM: alternating closed-form merges of LoRA factors (spec section 3-4).

Per round clients train one factor (B first in every task, then A, B, ...);
the server merges it in closed form from the clients' Gram statistics
(`merge_b` / `merge_a`), the head by RegMean and its bias by a sample-weighted
mean. After the last round of task t the final delta D_t = a_t @ b_t is folded
into per-layer accumulators P += G_t D_t, Q += G_t (Flax layout), and the
evaluated model is W0 + Q^-1 P.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from lorm_jax import merge
from lorm_jax.methods.interface import LocalSpec
from lorm_jax.methods.base import ClientResults, GramRequest, Method, Server
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
class LoRM(Method):
  name: ClassVar[str] = 'lorm'

  @classmethod
  def validate(cls, config: ConfigDict) -> None:
    if config.schedule not in SCHEDULES:
      raise ValueError(f'unknown schedule {config.schedule!r}; expected one of {SCHEDULES}')
    if config.lorm_ablation not in ABLATIONS:
      raise ValueError(f'unknown lorm_ablation {config.lorm_ablation!r}; expected one of '
                       f'{ABLATIONS}')

  @property
  def backbone_gram_mode(self) -> str:
    return merge.gram_mode(self.config.alpha_backbone)

  def init_extra(self, params: F.Params) -> dict:
    grams = {}
    for k, a in params.a.items():
      n = a.shape[0]
      grams[k] = jnp.zeros((n,) if self.backbone_gram_mode == 'diag' else (n, n))
    deltas = {k: jnp.zeros((params.a[k].shape[0], params.b[k].shape[1])) for k in params.a}
    return {'P': deltas, 'Q': grams, 'delta_sum': dict(deltas)}

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    c = self.config
    factor = trained_factor(c.schedule, task, rnd)
    return LocalSpec(factors=(factor,), lr_a=c.lr_a, lr_b=c.lr_b, lr_head=c.lr_head,
                     weight_decay=c.weight_decay)

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

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    c = self.config
    present = (results.num_samples > 0).astype(jnp.float32)
    factor = trained_factor(c.schedule, task, rnd)
    if factor == 'a':
      a, fa = merge.merge_a_tree(results.a, results.grams, c.alpha_backbone, weights=present,
                                 ridge=c.ridge, return_info=True)
      b, fb = server['b'], 0
    else:
      b, fb = merge.merge_b_tree(results.b, server['a'], results.grams, c.alpha_backbone,
                                 weights=present, ridge=c.ridge, return_info=True)
      a, fa = server['a'], 0
    if c.lorm_ablation == 'mean_head':
      kernel, fh = merge.fedavg(results.head['kernel'], results.num_samples), 0
    else:
      kernel, fh = merge.regmean(results.head['kernel'], results.head_grams, c.alpha_head,
                                 weights=present, ridge=c.ridge, return_info=True)
    bias = merge.fedavg(results.head['bias'], results.num_samples)
    server = {**server, 'a': a, 'b': b, 'head': {'kernel': kernel, 'bias': bias}}
    fallbacks = sum(merge.fallback_count(f) for f in (fa, fb, fh))
    return server, {'merge_fallbacks': fallbacks}

  def end_task(self, server: Server, task: int, task_grams: F.Flat | None) -> Server:
    extra = server['extra']
    delta = F.lora_deltas(server['a'], server['b'])
    g = {k: merge.regularize_gram(v, self.config.alpha_backbone) for k, v in task_grams.items()}
    extra = {'P': {k: extra['P'][k] + merge.gram_times(g[k], delta[k]) for k in delta},
             'Q': {k: extra['Q'][k] + g[k] for k in delta},
             'delta_sum': {k: extra['delta_sum'][k] + delta[k] for k in delta}}
    return {**server, 'extra': extra}

  def eval_model(self, server: Server, task: int) -> tuple[F.Flat, F.Flat, F.Flat]:
    extra = server['extra']
    if self.config.lorm_ablation == 'mean_deltas':
      deltas = {k: v / (task + 1) for k, v in extra['delta_sum'].items()}
    else:
      deltas = merge.solve_psd_tree(extra['Q'], extra['P'], ridge=self.config.ridge)
    return deltas, server['a'], jax.tree.map(jnp.zeros_like, server['b'])

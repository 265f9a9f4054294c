"""CODA-LwF: CODA-Prompt plus a class-weighted distillation from the round's
server model (reference `coda_lwf`, `_models/coda_lwf.py`).

Everything of `coda_p` (`prompts.CodaPrompt`: the component pools, their
Gram-Schmidt start per task, the forward, FedAvg) plus, per client and
sample i of class y_i, the loss term

  alpha * mean_i beta_i * sum_{c in task, c != y_i} p_c (log p_c - log q_c)

with p = softmax of the client's logits and q = softmax of the teacher's (the
server model the round started from), both over the current task's classes
at temperature temp (the reference: alpha = 1, no temperature). beta_i = sum
of betas_c over the task's classes c != y_i, betas = softmax over the classes
the client holds of S_c, S_c = the mean over the client's samples of class c
of the sample's score: the sum over the current task's components of their
CODA weights cos(q * A_k, K_k) under the teacher, averaged over the prompt
blocks. The reference computes betas once per task and client, from the
task-start server model, in a pass over the client's data before training
(with `get_scores` of `_networks/vit_powder`, a file the release lacks; the
score above is this project's reading). Here a client's per-class sums and
counts of the score are its own `RoundPlan.client_state` (kept by the client,
not sent; the simulation stores it in server['extra']): in the first
round of a task it takes part in, they accumulate over its training batches
(the teacher is then the task-start model unless the client joins late) and
each step uses the sums so far plus its own batch; afterwards they stay
fixed for the task. Deviations from the reference: docs/methods.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lorm_jax.methods.base import ClientResults, Server
from lorm_jax.methods.interface import Batch, LocalSpec, RoundPlan
from lorm_jax.methods.prompts import CodaPrompt, coda_forward_with_weights
from lorm_jax.models import functional as F

# A head key the loss term adds to the teacher's head dict: with it the forward
# returns the component weights (B, pool) (mean over the prompt blocks) in place
# of the features. Dict keys are pytree structure, so the choice is static.
WANT_WEIGHTS = 'coda_lwf.want_weights'
_STATE = ('coda_lwf.sum', 'coda_lwf.count', 'coda_lwf.fixed')


def coda_lwf_forward(model: F.FunctionalViT, frozen: F.Flat, a: F.Flat, b: F.Flat,
                     head: F.Flat, ctx: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """CODA-P's forward (`prompts.coda_forward`): x -> (logits (B, K), features
  (B, D)); with head[WANT_WEIGHTS] present, (logits, component weights (B,
  pool), averaged over the prompt blocks) instead."""
  want = WANT_WEIGHTS in head
  head = {k: v for k, v in head.items() if k != WANT_WEIGHTS}
  logits, feats, weights = coda_forward_with_weights(model, frozen, head, ctx, x)
  return (logits, jnp.mean(weights, axis=0)) if want else (logits, feats)


def teacher_outputs(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(teacher logits (B, K), scores (B,)) on the batch's images, no gradient:
  a score is the sum of the current task's components' weights (ctx['train'])."""
  head = {**batch.aux['teacher'], WANT_WEIGHTS: jnp.zeros(())}
  logits, weights = batch.forward({}, {}, head, batch.x)
  scores = jnp.sum(weights * batch.ctx['train'][None, :], axis=-1)
  return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(scores)


def class_score_sums(batch: Batch, scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(per-class sums of scores (K,), per-class sample counts (K,)) of the
  batch's weighted samples."""
  onehot = jax.nn.one_hot(batch.y, batch.logits.shape[-1]) * batch.w[:, None]
  return onehot.T @ scores, jnp.sum(onehot, axis=0)


def class_betas(score_sum: jax.Array, count: jax.Array) -> jax.Array:
  """(K,) softmax of the mean scores over the classes with count > 0, 0 elsewhere."""
  held = count > 0
  mean = score_sum / jnp.maximum(count, 1e-20)
  top = jnp.max(jnp.where(held, mean, -jnp.inf))
  e = jnp.where(held, jnp.exp(jnp.where(held, mean - top, 0.0)), 0.0)
  return e / jnp.maximum(jnp.sum(e), 1e-30)


def coda_lwf_distillation(batch: Batch) -> jax.Array:
  """The LwF term of the module docstring over one batch (a LocalSpec.loss_term).

  aux: {'teacher': the round-start head dict, 'alpha', 'temp'}; state (the
  client's): {'coda_lwf.sum' (K,), 'coda_lwf.count' (K,), 'coda_lwf.fixed' ()}:
  with fixed 0 the batch's own scores join the sums before betas are taken.
  """
  aux, state, cm = batch.aux, batch.state, batch.class_mask
  teacher, scores = teacher_outputs(batch)
  add_sum, add_count = class_score_sums(batch, scores)
  learning = 1.0 - state['coda_lwf.fixed']
  betas = class_betas(state['coda_lwf.sum'] + learning * add_sum,
                      state['coda_lwf.count'] + learning * add_count)
  others = cm[None, :] & (jnp.arange(cm.shape[0])[None, :] != batch.y[:, None])  # (B, K)
  beta = jnp.sum(jnp.where(others, betas[None, :], 0.0), axis=-1)                  # (B,)
  logp = jax.nn.log_softmax(jnp.where(cm, batch.logits, -1e9) / aux['temp'], axis=-1)
  logq = jax.nn.log_softmax(jnp.where(cm, teacher, -1e9) / aux['temp'], axis=-1)
  kl = jnp.sum(jnp.where(others, jnp.exp(logp) * (logp - logq), 0.0), axis=-1)
  return aux['alpha'] * jnp.sum(beta * kl * batch.w) / jnp.maximum(jnp.sum(batch.w), 1.0)


def accumulate_scores(state: dict, batch: Batch) -> dict:
  """After a step: the batch's teacher scores join the client's class sums
  unless they are fixed (a LocalSpec.state_update)."""
  _, scores = teacher_outputs(batch)
  add_sum, add_count = class_score_sums(batch, scores)
  learning = 1.0 - state['coda_lwf.fixed']
  return {**state, 'coda_lwf.sum': state['coda_lwf.sum'] + learning * add_sum,
          'coda_lwf.count': state['coda_lwf.count'] + learning * add_count}


@jax.jit
def record_scores(extra: dict, state: dict, client_ids: jax.Array, num_samples: jax.Array
                  ) -> dict:
  """The participants' score sums and counts into their rows of extra (leaves
  (num_clients, ...)), marked fixed; state rows past len(client_ids) and
  clients without samples are not written."""
  n = client_ids.shape[0]
  target = jnp.where(num_samples[:n] > 0, client_ids, extra['coda_lwf.fixed'].shape[0])
  out = {k: extra[k].at[target].set(state[k][:n], mode='drop') for k in _STATE[:2]}
  out['coda_lwf.fixed'] = extra['coda_lwf.fixed'].at[target].set(1.0, mode='drop')
  return {**extra, **out}


@dataclasses.dataclass
class CodaLwF(CodaPrompt):
  """CODA-Prompt + class-weighted distillation from the round's server model
  (reference `coda_lwf`); alpha and temp are this project's (reference: 1, none)."""
  name: ClassVar[str] = 'coda_lwf'
  forward = staticmethod(coda_lwf_forward)
  alpha: float = 1.0
  temp: float = 1.0

  @classmethod
  def validate(cls, config: ConfigDict) -> None:
    super().validate(config)
    h = config.coda_lwf
    if not h.alpha >= 0:
      raise ValueError(f'coda_lwf.alpha must be >= 0, got {h.alpha!r}')
    if not h.temp > 0:
      raise ValueError(f'coda_lwf.temp must be > 0, got {h.temp!r}')

  def init_extra(self, params: F.Params) -> dict:
    """Every client's per-class score sums and counts of the current task."""
    shape = (self.config.num_clients, params.head['kernel'].shape[1])
    return {'coda_lwf.sum': jnp.zeros(shape), 'coda_lwf.count': jnp.zeros(shape),
            'coda_lwf.fixed': jnp.zeros(shape[:1])}

  def begin_task(self, server: Server, task: int, key: jax.Array) -> Server:
    """CODA-P's Gram-Schmidt start of the task's slice; the scores start afresh."""
    server = super().begin_task(server, task, key)
    return {**server, 'extra': jax.tree.map(jnp.zeros_like, server['extra'])}

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    return dataclasses.replace(super().local_spec(task, rnd), loss_term=coda_lwf_distillation)

  def train_aux(self, server: Server, task: int) -> Any:
    return {'teacher': server['head'], 'alpha': jnp.float32(self.alpha),
            'temp': jnp.float32(self.temp)}

  def round_plan(self, server: Server, task: int, rnd: int, ids: np.ndarray) -> RoundPlan:
    """The default plan with each participant's score sums as its state, and
    their accumulation while some participant has none fixed yet."""
    plan = super().round_plan(server, task, rnd, ids)
    rows = jnp.asarray(np.asarray(ids, np.int32))
    state = {k: server['extra'][k][rows] for k in _STATE}
    fixed = state['coda_lwf.fixed']
    # On an abstract server (sizing.py's eval_shape) plan the accumulating
    # round, the larger program.
    done = not isinstance(fixed, jax.core.Tracer) and bool(np.all(np.asarray(fixed) > 0))
    spec = plan.spec if done else dataclasses.replace(plan.spec, state_update=accumulate_scores)
    return dataclasses.replace(plan, spec=spec, client_state=state)

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    server, info = super().aggregate(server, results, task, rnd)
    extra = record_scores(server['extra'], results.state, results.client_ids,
                          results.num_samples)
    return {**server, 'extra': extra}, info

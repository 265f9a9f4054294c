"""Regularisation and aggregation baselines on one continually trained LoRA.

LoRA variants; the reference (fed-mammoth) fine-tunes the whole ViT. Here the
trainable parameters theta are one LoRA (a, b, trained together, rate `lr_b`)
plus the head (`lr_head`), initialised once (b = 0) and carried across tasks
like the reference's continually fine-tuned network; the evaluated model is
W0 + a @ b with the server's head. Each method keeps the reference's loss,
aggregation and hyperparameters (docs/baselines_reference_facts.md 5, 7-9):

  ewc        CE + lambda sum F (theta - theta*)^2 (lambda 1; online F with
             gamma 0.9; Fisher of the last round's client models at task end)
  lwf        CE + 0.5 soft-CE(teacher, student) at T = 2 over the current
             task's classes (as the reference slices them), teacher = the
             server model at the end of the previous task
  fedproto   CE + 0.1 sum_c MSE(global prototype_c, batch mean feature_c);
             per-class feature means uploaded every round; parameters
             averaged uniformly over clients, prototypes by counts
  fisheravg  plain CE; every round each client's diagonal Fisher; server
             theta = sum_i clip(F_i / sum_j F_j, 0, 1) theta_i per entry

Coefficients travel to the loss terms inside `train_aux` (arrays), so the
loss-term functions are module-level and the LocalSpec stays hashable.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorm_jax import merge
from lorm_jax.methods.interface import Batch, LocalSpec, LossTerm, StatFn
from lorm_jax.methods.base import ClientResults, Method, Server
from lorm_jax.models import functional as F

PARAM_KEYS = ('a', 'b', 'head')


def _theta(server: Server) -> dict:
  return {k: server[k] for k in PARAM_KEYS}


def _wmean(x: jax.Array, w: jax.Array) -> jax.Array:
  """Weighted mean of per-sample values x (B,) with weights w (B,)."""
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


# ------------------------------------------------------------ loss terms


def ewc_penalty(batch: Batch) -> jax.Array:
  """lambda sum F (theta - theta*)^2 over a, b, head (its gradient is the
  reference's injected lambda 2 F (theta - theta*))."""
  aux = batch.aux
  sq = jax.tree.map(lambda p, s, f: jnp.sum(f * (p - s) ** 2),
                    {k: batch.params[k] for k in PARAM_KEYS}, aux['star'], aux['fisher'])
  return aux['lam'] * sum(jax.tree.leaves(sq))


def lwf_distillation(batch: Batch) -> jax.Array:
  """alpha * -mean_n sum_c softmax(t/T)_c log softmax(s/T)_c over the current
  task's classes (the reference slices both logits to them), teacher frozen."""
  aux, cm = batch.aux, batch.class_mask
  t = aux['teacher']
  teacher, _ = batch.forward(t['a'], t['b'], t['head'], batch.x)
  teacher = jax.lax.stop_gradient(teacher)
  p_t = jax.nn.softmax(jnp.where(cm, teacher, -1e9) / aux['temp'], axis=-1)
  logp_s = jax.nn.log_softmax(jnp.where(cm, batch.logits, -1e9) / aux['temp'], axis=-1)
  kd = -jnp.sum(jnp.where(cm, p_t * logp_s, 0.0), axis=-1)
  return aux['alpha'] * _wmean(kd, batch.w)


def proto_alignment(batch: Batch) -> jax.Array:
  """ld_reg * sum over classes c in the batch with a global prototype of
  mean_d (proto_c - batch mean feature of c)^2."""
  aux = batch.aux
  onehot = jax.nn.one_hot(batch.y, aux['protos'].shape[0]) * batch.w[:, None]  # (B, K)
  count = jnp.sum(onehot, axis=0)                                             # (K,)
  mean = (onehot.T @ batch.feats) / jnp.maximum(count, 1.0)[:, None]          # (K, D)
  mse = jnp.mean((mean - aux['protos']) ** 2, axis=-1)
  use = (count > 0) & (aux['valid'] > 0)
  return aux['ld_reg'] * jnp.sum(jnp.where(use, mse, 0.0))


# ------------------------------------------------------------ statistics


def diagonal_fisher(batch: Batch) -> dict:
  """sum_n p(y_n|x_n) (d log p(y_n|x_n) / d theta)^2 over the batch, for theta =
  a, b, head; p over the current task's classes (the reference's slice)."""
  params = {k: batch.params[k] for k in PARAM_KEYS}

  def logp(theta, x1, y1):
    logits, _ = batch.forward(theta['a'], theta['b'], theta['head'], x1[None])
    return jax.nn.log_softmax(jnp.where(batch.class_mask, logits[0], -1e9))[y1]

  def one(x1, y1, w1):
    lp, g = jax.value_and_grad(logp)(params, x1, y1)
    return jax.tree.map(lambda t: w1 * jnp.exp(lp) * t ** 2, g)

  per_sample = jax.vmap(one)(batch.x, batch.y, batch.w)
  return jax.tree.map(lambda t: jnp.sum(t, axis=0), per_sample)


def class_feature_sums(batch: Batch, feats: jax.Array | None = None) -> dict:
  """{'count': (K,), 'sum': (K, D)}: per-class sample counts and sums of
  `feats` (B, D), by default the batch's own features."""
  feats = batch.feats if feats is None else feats
  onehot = jax.nn.one_hot(batch.y, batch.logits.shape[-1]) * batch.w[:, None]
  return {'count': jnp.sum(onehot, axis=0), 'sum': onehot.T @ feats}


# ---------------------------------------------------------------- methods


@dataclasses.dataclass
class ContinualLoRA(Method):
  """One LoRA + head trained together and carried across tasks; FedAvg.

  Not registered itself (it is plain sequential LoRA fine-tuning); the
  baselines below add a loss term, a statistic or another aggregation.
  """
  name: ClassVar[str] = 'continual_lora'

  def begin_task(self, server: Server, task: int, key: jax.Array) -> Server:
    return server  # the LoRA initialised by init_server continues

  def loss_term(self, task: int) -> LossTerm | None:
    return None

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    c = self.config
    return LocalSpec(factors=('a', 'b'), lr_a=c.lr_a, lr_b=c.lr_b, lr_head=c.lr_head,
                     weight_decay=c.weight_decay, loss_term=self.loss_term(task))

  def client_weights(self, results: ClientResults) -> jax.Array:
    return results.num_samples

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    new = merge.fedavg_tree({k: getattr(results, k) for k in PARAM_KEYS},
                            self.client_weights(results))
    return {**server, **new}, {}


@dataclasses.dataclass
class EWC(ContinualLoRA):
  """EWC (LoRA variant; the reference fine-tunes the whole ViT)."""
  name: ClassVar[str] = 'ewc'
  lam: float = 1.0     # reference ewc_lambda
  gamma: float = 0.9   # reference ewc_gamma (online Fisher)

  def init_extra(self, params: F.Params) -> dict:
    zeros = jax.tree.map(jnp.zeros_like, {'a': params.a, 'b': params.b, 'head': params.head})
    return {'fisher': zeros, 'fisher_new': zeros, 'star': zeros}

  def loss_term(self, task: int) -> LossTerm | None:
    return ewc_penalty if task > 0 else None

  def train_aux(self, server: Server, task: int) -> Any:
    if task == 0:
      return {}
    return {'fisher': server['extra']['fisher'], 'star': server['extra']['star'],
            'lam': jnp.float32(self.lam)}

  def stats_request(self, task: int, rnd: int) -> StatFn | None:
    return diagonal_fisher if rnd == self.config.rounds - 1 else None

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    server, info = super().aggregate(server, results, task, rnd)
    if results.stats is not None:  # last round: sum_i F_i / N_total
      total = jnp.maximum(jnp.sum(results.num_samples), 1.0)
      present = results.num_samples > 0
      new = jax.tree.map(lambda f: jnp.sum(jnp.where(
          present.reshape((-1,) + (1,) * (f.ndim - 1)), f, 0.0), axis=0) / total, results.stats)
      server = {**server, 'extra': {**server['extra'], 'fisher_new': new}}
    return server, info

  def end_task(self, server: Server, task: int, task_grams) -> Server:
    extra = server['extra']
    fisher = jax.tree.map(lambda f, n: self.gamma * f + n, extra['fisher'], extra['fisher_new'])
    return {**server, 'extra': {**extra, 'fisher': fisher, 'star': _theta(server)}}


@dataclasses.dataclass
class LwF(ContinualLoRA):
  """Learning without Forgetting (LoRA variant; the reference fine-tunes the whole ViT)."""
  name: ClassVar[str] = 'lwf'
  alpha: float = 0.5  # reference alpha
  temp: float = 2.0   # reference's hard-coded temperature

  def init_extra(self, params: F.Params) -> dict:
    return {'teacher': jax.tree.map(jnp.zeros_like,
                                    {'a': params.a, 'b': params.b, 'head': params.head})}

  def loss_term(self, task: int) -> LossTerm | None:
    return lwf_distillation if task > 0 else None

  def train_aux(self, server: Server, task: int) -> Any:
    if task == 0:
      return {}
    return {'teacher': server['extra']['teacher'], 'alpha': jnp.float32(self.alpha),
            'temp': jnp.float32(self.temp)}

  def end_task(self, server: Server, task: int, task_grams) -> Server:
    return {**server, 'extra': {'teacher': _theta(server)}}


@dataclasses.dataclass
class FedProto(ContinualLoRA):
  """FedProto (LoRA variant; the reference fine-tunes the whole ViT)."""
  name: ClassVar[str] = 'fedproto'
  ld_reg: float = 0.1  # reference ld_reg

  def init_extra(self, params: F.Params) -> dict:
    d, k = params.head['kernel'].shape
    return {'protos': jnp.zeros((k, d)), 'valid': jnp.zeros((k,))}

  def begin_task(self, server: Server, task: int, key: jax.Array) -> Server:
    """Global prototypes are reset per task (old tasks' are never used)."""
    return {**server, 'extra': jax.tree.map(jnp.zeros_like, server['extra'])}

  def loss_term(self, task: int) -> LossTerm | None:
    return proto_alignment

  def train_aux(self, server: Server, task: int) -> Any:
    return {**server['extra'], 'ld_reg': jnp.float32(self.ld_reg)}

  def stats_request(self, task: int, rnd: int) -> StatFn | None:
    return class_feature_sums

  def client_weights(self, results: ClientResults) -> jax.Array:
    return (results.num_samples > 0).astype(jnp.float32)  # the reference's unweighted mean

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    server, info = super().aggregate(server, results, task, rnd)
    present = (results.num_samples > 0)[:, None]
    count = jnp.sum(jnp.where(present, results.stats['count'], 0.0), axis=0)      # (K,)
    sums = jnp.sum(jnp.where(present[..., None], results.stats['sum'], 0.0), axis=0)
    protos = sums / jnp.maximum(count, 1.0)[:, None]
    return {**server, 'extra': {'protos': protos, 'valid': (count > 0).astype(jnp.float32)}}, info


@dataclasses.dataclass
class FisherAvg(ContinualLoRA):
  """Fisher-weighted averaging (LoRA variant; the reference fine-tunes the whole ViT)."""
  name: ClassVar[str] = 'fisheravg'

  def stats_request(self, task: int, rnd: int) -> StatFn | None:
    return diagonal_fisher

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    present = results.num_samples > 0
    new = fisher_weighted_mean({k: getattr(results, k) for k in PARAM_KEYS}, results.stats,
                               present)
    return {**server, **new}, {}


@jax.jit
def fisher_weighted_mean(theta: dict, fisher: dict, present: jax.Array) -> dict:
  """Per entry sum_i clip((F_i + 1e-12) / sum_j (F_j + 1e-12), 0, 1) theta_i over
  present clients; theta/fisher leaves (C, ...), present (C,) bool."""
  def leaf(x, f):
    p = present.reshape((-1,) + (1,) * (x.ndim - 1))
    f = jnp.where(p, f + 1e-12, 0.0)
    w = jnp.clip(f / jnp.sum(f, axis=0, keepdims=True), 0.0, 1.0)
    return jnp.sum(jnp.where(p, w * x, 0.0), axis=0)
  return jax.tree.map(leaf, theta, fisher)

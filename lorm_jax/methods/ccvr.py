"""CCVR: classifier calibration with virtual representations (LoRA variant).

Clients train one LoRA (a, b) and the head, carried across tasks, with plain
cross-entropy on the current task's classes (as `ContinualLoRA`). After every
round each client uploads, per class, the sample count and the sum and sum of
squares of its final-norm class-token features (from its own trained model).
The server (reference facts, section 6):

  1. averages a, b and the head by sample counts;
  2. turns every (client, class) with more than one sample into a diagonal
     Gaussian (mean, unbiased variance, weight = count) and replaces the
     current task's classes in its mixture store with them (earlier tasks'
     components are kept);
  3. re-trains the head on virtual features drawn from the mixtures of all
     seen classes: 5 epochs of (number of seen classes) steps of 256
     samples, labels uniform over the seen classes, SGD lr 0.01 momentum 0.9
     with a per-epoch cosine schedule (T_max 5), cross-entropy on the seen
     classes' logits divided by their L2 norm and by 0.1.

The re-trained head is what clients download next round and what is
evaluated (W0 + a @ b with the server's head).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar
import functools

import jax
import jax.numpy as jnp
import optax

from lorm_jax import rng
from lorm_jax.methods.interface import Batch, StatFn
from lorm_jax.methods.base import ClientResults, Server
from lorm_jax.methods.continual import ContinualLoRA
from lorm_jax.models import functional as F

VAR_EPS = 1e-8  # the reference's 1e-8 I added to each component's covariance


def class_feature_moments(batch: Batch) -> dict:
  """{'count': (K,), 'sum': (K, D), 'sumsq': (K, D)} of the batch's features per class."""
  onehot = jax.nn.one_hot(batch.y, batch.logits.shape[-1]) * batch.w[:, None]
  return {'count': jnp.sum(onehot, axis=0), 'sum': onehot.T @ batch.feats,
          'sumsq': onehot.T @ (batch.feats ** 2)}


def gaussians_from_moments(count: jax.Array, total: jax.Array, sumsq: jax.Array
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per (client, class) component weight, mean and unbiased variance.

  count (C, K), total/sumsq (C, K, D) -> (weight (C, K), mean, var (C, K, D)).
  Only pairs with more than one sample form a component (weight = count);
  the others get weight 0.
  """
  n = jnp.maximum(count, 1.0)[..., None]
  mean = total / n
  var = jnp.maximum(sumsq - n * mean ** 2, 0.0) / jnp.maximum(count - 1.0, 1.0)[..., None]
  valid = count > 1
  return jnp.where(valid, count, 0.0), jnp.where(valid[..., None], mean, 0.0), \
      jnp.where(valid[..., None], var, 0.0)


@functools.partial(jax.jit, static_argnames=('steps_per_epoch', 'epochs', 'batch', 'lr', 'momentum',
                                             'logit_norm'))
def retrain_head(head: F.Flat, weight: jax.Array, mean: jax.Array, var: jax.Array,
                 seen: jax.Array, key: jax.Array, *, steps_per_epoch: int, epochs: int = 5,
                 batch: int = 256, lr: float = 0.01, momentum: float = 0.9,
                 logit_norm: float = 0.1) -> F.Flat:
  """Trains head {'kernel' (D, K), 'bias' (K,)} on features sampled from the mixtures.

  weight (C, K) component weights, mean/var (C, K, D); seen (K,) bool, the
  classes seen so far (their logits are normalised and classified). Each
  sample: a label uniform over the seen classes that have a component, a
  component by weight, a feature from N(mean, diag(var) + 1e-8).
  """
  has_mix = seen & (jnp.sum(weight, axis=0) > 0)
  label_logits = jnp.where(has_mix, 0.0, -jnp.inf)
  comp_logits = jnp.where(weight > 0, jnp.log(jnp.where(weight > 0, weight, 1.0)), -jnp.inf)
  schedule = lambda step: lr * 0.5 * (1 + jnp.cos(jnp.pi * (step // steps_per_epoch) / epochs))
  opt = optax.sgd(schedule, momentum=momentum)

  def loss_fn(h, x, y):
    logits = x @ h['kernel'] + h['bias']
    norm = jnp.sqrt(jnp.sum(jnp.where(seen, logits, 0.0) ** 2, axis=-1, keepdims=True))
    z = jnp.where(seen, (logits + 1e-12) / (norm + 1e-12) / logit_norm, -1e9)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))

  def step(carry, k):
    h, state = carry
    k_y, k_c, k_z = jax.random.split(k, 3)
    y = jax.random.categorical(k_y, label_logits, shape=(batch,))
    comp = jax.random.categorical(k_c, comp_logits[:, y].T)            # (batch,)
    mu, v = mean[comp, y], var[comp, y]                                  # (batch, D)
    x = mu + jnp.sqrt(v + VAR_EPS) * jax.random.normal(k_z, mu.shape)
    grads = jax.grad(loss_fn)(h, x, y)
    updates, state = opt.update(grads, state, h)
    return (optax.apply_updates(h, updates), state), None

  keys = jax.random.split(key, epochs * steps_per_epoch)
  (head, _), _ = jax.lax.scan(step, (head, opt.init(head)), keys)
  return head


@dataclasses.dataclass
class CCVR(ContinualLoRA):
  """CCVR (LoRA variant; the reference fine-tunes the whole ViT)."""
  name: ClassVar[str] = 'ccvr'
  how_many: int = 256   # reference how_many: virtual samples per class and epoch, batch size
  epochs: int = 5       # head re-training epochs (the reference's fixed 5, T_max 5)
  lr: float = 0.01      # head re-training SGD (the reference's)
  momentum: float = 0.9
  logit_norm: float = 0.1  # the reference's logit-normalisation temperature

  def init_extra(self, params: F.Params) -> dict:
    d, k = params.head['kernel'].shape
    c = self.config.num_clients
    return {'weight': jnp.zeros((c, k)), 'mean': jnp.zeros((c, k, d)),
            'var': jnp.zeros((c, k, d)), 'seen': jnp.zeros((k,))}

  def stats_request(self, task: int, rnd: int) -> StatFn | None:
    return class_feature_moments

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    server, info = super().aggregate(server, results, task, rnd)
    c = self.config.num_clients
    present = (results.num_samples[:c] > 0)[:, None]
    st = jax.tree.map(lambda x: x[:c], results.stats)
    count = jnp.where(present, st['count'], 0.0)
    weight, mean, var = gaussians_from_moments(count, st['sum'], st['sumsq'])
    extra = server['extra']
    now = jnp.sum(count, axis=0) > 0  # this task's classes: their components are replaced
    extra = {'weight': jnp.where(now[None], weight, extra['weight']),
             'mean': jnp.where(now[None, :, None], mean, extra['mean']),
             'var': jnp.where(now[None, :, None], var, extra['var']),
             'seen': jnp.maximum(extra['seen'], now.astype(jnp.float32))}
    seen = extra['seen'] > 0
    n_seen = int(jnp.sum(seen))
    key = rng.key(self.config.seed, 'method', task, rnd)
    head = retrain_head(server['head'], extra['weight'], extra['mean'], extra['var'], seen, key,
                        steps_per_epoch=n_seen, epochs=self.epochs, batch=self.how_many,
                        lr=self.lr, momentum=self.momentum, logit_norm=self.logit_norm)
    return {**server, 'head': head, 'extra': extra}, info

"""PILoRA: prototype-guided incremental LoRA (reference `pilora`).

Reference facts: docs/baselines_reference_facts.md section 13.

  LoRA      one adapter, on block 0's fused qkv only (a (D, r), b (r, 3D) in
            this project's layout, b's columns [Q | K | V]); K is zero and
            frozen. The model uses the product of sums
            (a + sum_old a_t) @ ([Q | 0 | V] + sum_old [Q_t | 0 | V_t]);
            each task starts a fresh a (uniform) and b = 0, the finished
            task's pieces join the sums.
  classes   one prototype (D,) per class, 0.1 N(0, 1); the current task's are
            trained, earlier tasks' are frozen. Logits -d / temp with
            d = sqrt(||f - p||^2 / D) over the classes seen so far; the model
            predicts the nearest prototype.
  loss      CE(-d / temp, label) over the seen classes
            + 0.001 mean d(f, own prototype)
            + 0.5 sum_old sum |a^T a_old|       (orthogonality to old tasks)
            + 0.01 * 2 ||a||_1 (the reference adds the L1 term twice; torch's
              matrix 1-norm of its (r, D) A, i.e. max_i sum_r |a[i, r]| here)
            + Adam's coupled L2, 1e-5 / 2 ||theta||^2 over the trained
              a, b and current prototypes. Adam, the config's learning rates.
  upload    a, b, the prototypes, per-class feature counts and sums from the
            plain backbone (no LoRA) after training.
  server    a, b: sample-weighted means. Each current-task prototype: the
            clients' copies weighted by softmax(0.2 * minmax(1 / s_i)), s_i
            the summed distance of client i's copy to the class means of the
            clients that hold the class.

The linear classifier in the head dict is carried along unused (the
reference keeps it in the optimizer but not in the loss).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorm_jax import merge
from lorm_jax.methods.interface import Batch, LocalSpec, StatFn, masked_cross_entropy
from lorm_jax.methods.base import ClientResults, Method, Server
from lorm_jax.methods.continual import class_feature_sums
from lorm_jax.models import functional as F

LAYER = 'blocks.0.attn.qkv'


def _k_mask(b: jax.Array) -> jax.Array:
  """(1, 3D) 1 on b's Q and V columns, 0 on K's."""
  d = b.shape[-1] // 3
  return jnp.concatenate([jnp.ones((d,)), jnp.zeros((d,)), jnp.ones((d,))])[None].astype(b.dtype)


def prototype_distances(feats: jax.Array, protos: jax.Array) -> jax.Array:
  """d (B, K) = sqrt(||f - p||^2 / D), expanded as the reference computes it."""
  sq = (jnp.sum(feats ** 2, 1, keepdims=True) + jnp.sum(protos ** 2, 1)[None]
        - 2.0 * feats @ protos.T) / feats.shape[-1]
  return jnp.sqrt(jnp.maximum(sq, 1e-12))


def pilora_forward(model: F.FunctionalViT, frozen: F.Flat, a: F.Flat, b: F.Flat, head: F.Flat,
                   ctx: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x -> (logits -d / temp over all prototypes (B, K), class-token features (B, D)).

  ctx: {'a_old_sum' (D, r), 'b_old_sum' (r, 3D), 'temp' ()}.
  """
  a_eff = a[LAYER] + ctx['a_old_sum']
  b_eff = (b[LAYER] + ctx['b_old_sum']) * _k_mask(b[LAYER])
  a_full, b_full = F.full_lora(model, {LAYER: a_eff}, {LAYER: b_eff})
  feats, _, _ = model.apply(frozen, a_full, b_full, head, x, features_only=True)
  return -prototype_distances(feats, head['proto']) / ctx['temp'], feats


def pilora_loss(batch: Batch) -> jax.Array:
  """The whole client objective (LocalSpec.cross_entropy is off); see module doc."""
  aux, cm, w = batch.aux, batch.class_mask, batch.w
  protos = batch.params['head']['proto']
  protos = jnp.where(cm[:, None], protos, jax.lax.stop_gradient(protos))  # old ones frozen
  d = prototype_distances(batch.feats, protos)
  ce, _ = masked_cross_entropy(-d / batch.ctx['temp'], batch.y, (aux['seen'] > 0) | cm, w)
  own = jnp.sum(jnp.take_along_axis(d, batch.y[:, None], 1)[:, 0] * w) / jnp.maximum(
      jnp.sum(w), 1.0)
  a, b = batch.params['a'][LAYER], batch.params['b'][LAYER]
  ortho = jnp.sum(aux['a_old_valid'][:, None, None]
                  * jnp.abs(jnp.einsum('ir,tis->trs', a, aux['a_old'])))
  l1 = jnp.max(jnp.sum(jnp.abs(a), axis=1))
  l2 = (jnp.sum(a ** 2) + jnp.sum((b * _k_mask(b)) ** 2)
        + jnp.sum(jnp.where(cm[:, None], batch.params['head']['proto'], 0.0) ** 2))
  return (ce + aux['w_proto'] * own + aux['w_ortho'] * ortho + 2 * aux['w_l1'] * l1
          + 0.5 * aux['l2'] * l2)


def plain_class_feature_sums(batch: Batch) -> dict:
  """{'count': (K,), 'sum': (K, D)} of the backbone's features without the
  PILoRA delta (a + sum a_old = 0 makes it vanish)."""
  zero_a = {LAYER: -batch.ctx['a_old_sum']}
  _, feats = batch.forward(zero_a, batch.params['b'], batch.params['head'], batch.x)
  return class_feature_sums(batch, feats)


@jax.jit
def merge_prototypes(protos: jax.Array, count: jax.Array, sums: jax.Array, present: jax.Array,
                     server_protos: jax.Array, classes: jax.Array, soft_temp: float = 0.2
                     ) -> jax.Array:
  """The reference's prototype merge for the classes in `classes` (K,) bool.

  protos (C, K, D) client copies; count (C, K), sums (C, K, D) plain-backbone
  feature statistics; present (C,) real clients. For class c: s_i = sum over
  clients j holding c of ||proto_i - mean_j||; weights softmax(soft_temp *
  minmax(1 / (s_i + 1e-10))) over present clients (uniform where all s_i are
  equal); classes no client holds keep the server's prototype.
  """
  holds = (count > 0) & present[:, None]                                   # (C, K)
  means = sums / jnp.maximum(count, 1.0)[..., None]                        # (C, K, D)
  diff = protos[:, None] - means[None]                                     # (Ci, Cj, K, D)
  dist = jnp.sqrt(jnp.sum(diff ** 2, -1))                                  # (Ci, Cj, K)
  score = jnp.sum(jnp.where(holds[None], dist, 0.0), axis=1)              # (Ci, K)
  recip = 1.0 / (score + 1e-10)
  big = jnp.where(present[:, None], recip, -jnp.inf).max(0)
  small = jnp.where(present[:, None], recip, jnp.inf).min(0)
  norm = jnp.where(big > small, (recip - small) / jnp.where(big > small, big - small, 1.0), 0.0)
  logits = jnp.where(present[:, None], soft_temp * norm, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=0)                                 # (C, K)
  merged = jnp.einsum('ck,ckd->kd', weights, protos)
  update = classes & jnp.any(holds, axis=0)
  return jnp.where(update[:, None], merged, server_protos)


@dataclasses.dataclass
class PILoRA(Method):
  """PILoRA with the reference's constants."""
  name: ClassVar[str] = 'pilora'
  forward = staticmethod(pilora_forward)
  temp: float = 1.0       # reference temp
  soft_temp: float = 0.2  # reference soft_temp
  w_proto: float = 0.001
  w_ortho: float = 0.5
  w_l1: float = 0.01      # added twice, as the reference
  l2: float = 1e-5        # reference wd_reg, Adam's coupled weight decay

  def init_server(self, params: F.Params, head: F.Flat, key: jax.Array) -> Server:
    k_lora, k_proto = jax.random.split(key)
    a, b = F.init_lora(k_lora, {LAYER: params.a[LAYER]}, {LAYER: params.b[LAYER]})
    d, k = params.head['kernel'].shape
    head = {**head, 'proto': 0.1 * jax.random.normal(k_proto, (k, d))}
    return {'a': a, 'b': b, 'head': head, 'extra': self.init_extra(params)}

  def init_extra(self, params: F.Params) -> dict:
    a0, b0 = params.a[LAYER], params.b[LAYER]
    t = self.config.num_tasks
    return {'a_old': jnp.zeros((t,) + a0.shape), 'a_old_valid': jnp.zeros((t,)),
            'a_old_sum': jnp.zeros_like(a0), 'b_old_sum': jnp.zeros_like(b0),
            'seen': jnp.zeros((params.head['kernel'].shape[1],))}

  def begin_task(self, server: Server, task: int, key: jax.Array) -> Server:
    """The finished task's a and b join the frozen sums; fresh a, b = 0."""
    extra = dict(server['extra'])
    if task > 0:
      a, b = server['a'][LAYER], server['b'][LAYER]
      extra['a_old'] = extra['a_old'].at[task - 1].set(a)
      extra['a_old_valid'] = extra['a_old_valid'].at[task - 1].set(1.0)
      extra['a_old_sum'] = extra['a_old_sum'] + a
      extra['b_old_sum'] = extra['b_old_sum'] + b * _k_mask(b)
    a, b = F.init_lora(key, server['a'], server['b'])
    return {**server, 'a': a, 'b': b, 'extra': extra}

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    c = self.config
    return LocalSpec(factors=('a', 'b'), lr_a=c.lr_a, lr_b=c.lr_b, lr_head=c.lr_head, optimizer='adam',
                     loss_term=pilora_loss, cross_entropy=False)

  def forward_ctx(self, server: Server, task: int) -> Any:
    e = server['extra']
    return {'a_old_sum': e['a_old_sum'], 'b_old_sum': e['b_old_sum'],
            'temp': jnp.float32(self.temp)}

  def train_aux(self, server: Server, task: int) -> Any:
    e = server['extra']
    return {'a_old': e['a_old'], 'a_old_valid': e['a_old_valid'], 'seen': e['seen'],
            'w_proto': jnp.float32(self.w_proto), 'w_ortho': jnp.float32(self.w_ortho),
            'w_l1': jnp.float32(self.w_l1), 'l2': jnp.float32(self.l2)}

  def stats_request(self, task: int, rnd: int) -> StatFn:
    return plain_class_feature_sums

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    w = results.num_samples
    present = w > 0
    ab = merge.fedavg_tree({'a': results.a, 'b': results.b}, w)
    head = merge.fedavg_tree({k: v for k, v in results.head.items() if k != 'proto'}, w)
    count = jnp.where(present[:, None], results.stats['count'], 0.0)
    current = jnp.any(count > 0, axis=0)  # the classes of this task that clients hold
    head['proto'] = merge_prototypes(results.head['proto'], count, results.stats['sum'],
                                     present, server['head']['proto'], current, self.soft_temp)
    extra = {**server['extra'],
             'seen': jnp.maximum(server['extra']['seen'], current.astype(jnp.float32))}
    return {**server, **ab, 'head': head, 'extra': extra}, {}

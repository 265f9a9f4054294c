"""DER++ with a replay buffer per client (LoRA variant).

The reference (fed-mammoth `derpp`) fine-tunes the whole ViT. Here, as for
the other continual baselines (`continual.ContinualLoRA`), the trainable
parameters are one LoRA (a, b) and the head, carried across tasks and
averaged by sample counts. Each client owns a reservoir buffer of
`buffer_size` samples that persists across rounds and tasks; per slot it
holds the sample's index into the training set, its label and the logits
(all K classes) the client's model gave it when it was trained on (the
augmented view, parameters before that step). The loss of a step is

  CE(current task's classes)
  + alpha * mean over (drawn sample, seen class) of (f(x') - stored logits)^2
  + beta  * CE over the seen classes of f(x'') with the stored labels,

x' and x'' two independent draws (without replacement) of min(batch_size,
buffer_size) buffer slots, freshly augmented (`Batch.fetch`); "seen" = the
classes of every task so far, the current one included. After every step the
batch's samples enter the buffer by reservoir sampling.

The buffers live in server['extra']['buffer'] with a leading num_clients
axis (the loop's checkpoints carry them); `round_plan` hands the
participants' rows out as `RoundPlan.client_state` and `aggregate` writes the
trained rows back by `ClientResults.client_ids`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lorm_jax.methods.base import ClientResults, Server
from lorm_jax.methods.continual import ContinualLoRA
from lorm_jax.methods.interface import Batch, LocalSpec, RoundPlan, masked_cross_entropy
from lorm_jax.models import functional as F

# fold_in constants that keep the uses of Batch.key apart
_KEY_RESERVOIR, _KEY_LOGIT_DRAW, _KEY_LABEL_DRAW = 101, 102, 103


def empty_buffer(size: int, num_classes: int, lead: tuple[int, ...] = ()) -> dict:
  """A buffer of `size` slots with leading axes `lead`: {'idx' (..., M) int32,
  'y' (..., M) int32, 'logits' (..., M, K) float32, 'count' (...) int32},
  count = the samples offered to it so far (num_seen_examples)."""
  return {'idx': jnp.zeros(lead + (size,), jnp.int32), 'y': jnp.zeros(lead + (size,), jnp.int32),
          'logits': jnp.zeros(lead + (size, num_classes), jnp.float32),
          'count': jnp.zeros(lead, jnp.int32)}


def reservoir_add(buffer: dict, key: jax.Array, idx: jax.Array, y: jax.Array,
                  logits: jax.Array, valid: jax.Array) -> dict:
  """Offers the valid samples of a batch, in order, to one buffer (Algorithm R).

  buffer: `empty_buffer` layout without leading axes; idx, y (n,) int32,
  logits (n, K), valid (n,) bool. The j-th valid sample is the buffer's
  s-th offered sample (s counted from 0): it takes slot s while s < M, else
  a uniform draw r in [0, s] and slot r if r < M (kept with probability
  M / (s + 1)), else it is dropped. Equivalent to offering the samples one by
  one: where two samples draw the same slot the later one wins.
  """
  m = buffer['idx'].shape[0]
  n = idx.shape[0]
  rank = jnp.cumsum(valid.astype(jnp.int32)) - 1                       # (n,)
  seen = buffer['count'] + rank                                         # s per sample
  r = jax.random.randint(key, (n,), 0, jnp.maximum(seen, 0) + 1)
  slot = jnp.where(seen < m, seen, jnp.where(r < m, r, -1))
  slot = jnp.where(valid, slot, -1)
  later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]               # [j, j']: j' after j
  overwritten = jnp.any(later & (slot[None, :] == slot[:, None]), axis=1)
  slot = jnp.where((slot < 0) | overwritten, m, slot)                   # m: dropped
  return {'idx': buffer['idx'].at[slot].set(idx.astype(jnp.int32), mode='drop'),
          'y': buffer['y'].at[slot].set(y.astype(jnp.int32), mode='drop'),
          'logits': buffer['logits'].at[slot].set(logits.astype(jnp.float32), mode='drop'),
          'count': buffer['count'] + jnp.sum(valid.astype(jnp.int32))}


def buffer_draw(buffer: dict, key: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """`size` distinct slots drawn uniformly among the filled min(count, M)
  ones: (slots (size,) int32, valid (size,) bool); fewer valid where fewer
  are filled (size <= M)."""
  m = buffer['idx'].shape[0]
  filled = jnp.minimum(buffer['count'], m)
  u = jnp.where(jnp.arange(m) < filled, jax.random.uniform(key, (m,)), 2.0)
  slots = jnp.argsort(u)[:size].astype(jnp.int32)
  return slots, slots < filled


def derpp_replay_loss(out_logits: jax.Array, stored_logits: jax.Array, logit_valid: jax.Array,
                      out_labels: jax.Array, stored_labels: jax.Array, label_valid: jax.Array,
                      seen: jax.Array, alpha: float, beta: float) -> jax.Array:
  """alpha * MSE(out_logits, stored_logits) + beta * CE(out_labels, stored_labels).

  out_logits, stored_logits (n, K) with logit_valid (n,); out_labels (n', K)
  logits with stored_labels (n',) int and label_valid (n',); seen (K,) bool.
  The MSE is the mean over valid rows x seen classes; the cross-entropy is
  over the seen classes, the mean over valid rows. Either term is 0 without
  valid rows.
  """
  total = jnp.float32(0)
  if alpha:
    mask = logit_valid[:, None] & seen[None, :]
    sq = jnp.where(mask, (out_logits.astype(jnp.float32) - stored_logits) ** 2, 0.0)
    total = total + alpha * jnp.sum(sq) / jnp.maximum(jnp.sum(mask), 1)
  if beta:
    ce, _ = masked_cross_entropy(out_labels.astype(jnp.float32), stored_labels, seen,
                                 label_valid.astype(jnp.float32))
    total = total + beta * ce
  return total


@dataclasses.dataclass(frozen=True)
class DerppLoss:
  """The replay terms as a LocalSpec.loss_term (hashable by value: the draw
  size and weights are static). Batch.state: a client's buffer plus 'seen'
  (K,) float, 1 for the classes of earlier tasks."""
  draw: int
  alpha: float
  beta: float

  def __call__(self, batch: Batch) -> jax.Array:
    state = batch.state
    seen = (state['seen'] > 0) | batch.class_mask
    draws = []
    for purpose in (_KEY_LOGIT_DRAW, _KEY_LABEL_DRAW):
      key = jax.random.fold_in(batch.key, purpose)
      slots, valid = buffer_draw(state, jax.random.fold_in(key, 0), self.draw)
      x, _ = batch.fetch(jax.random.fold_in(key, 1), state['idx'][slots])
      draws.append((slots, valid, x))
    (s1, v1, x1), (s2, v2, x2) = draws
    p = batch.params
    out, _ = batch.forward(p['a'], p['b'], p['head'], jnp.concatenate([x1, x2], axis=0))
    return derpp_replay_loss(out[:self.draw], state['logits'][s1], v1, out[self.draw:],
                             state['y'][s2], v2, seen, self.alpha, self.beta)


def derpp_state_update(state: dict, batch: Batch) -> dict:
  """After a step: the batch's samples (weight > 0) enter the buffer with
  the logits of that step's forward; the current task's classes join 'seen'."""
  logits = jax.lax.stop_gradient(batch.logits)
  buffer = reservoir_add({k: state[k] for k in ('idx', 'y', 'logits', 'count')},
                         jax.random.fold_in(batch.key, _KEY_RESERVOIR), batch.idx, batch.y,
                         logits, batch.w > 0)
  return {**buffer, 'seen': jnp.maximum(state['seen'], batch.class_mask.astype(jnp.float32))}


@dataclasses.dataclass
class DERpp(ContinualLoRA):
  """DER++ (LoRA variant; the reference fine-tunes the whole ViT)."""
  name: ClassVar[str] = 'derpp'
  buffer_size: int = 200  # reference buffer_size
  alpha: float = 0.5      # logit-replay (MSE) weight, reference alpha
  beta: float = 0.5       # label-replay (CE) weight, reference beta

  @classmethod
  def validate(cls, config: ConfigDict) -> None:
    own = config.get('derpp')
    size = cls.buffer_size if own is None else own.get('buffer_size', cls.buffer_size)
    if int(size) < 1:
      raise ValueError(f'derpp.buffer_size must be at least 1, got {size}')

  def init_extra(self, params: F.Params) -> dict:
    k = params.head['kernel'].shape[1]
    return {'buffer': empty_buffer(int(self.buffer_size), k, (self.config.num_clients,)),
            'seen': jnp.zeros((k,), jnp.float32)}

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    spec = super().local_spec(task, rnd)
    loss = DerppLoss(min(int(self.config.batch_size), int(self.buffer_size)),
                     float(self.alpha), float(self.beta))
    return dataclasses.replace(spec, loss_term=loss, state_update=derpp_state_update)

  def round_plan(self, server: Server, task: int, rnd: int, ids: np.ndarray) -> RoundPlan:
    plan = super().round_plan(server, task, rnd, ids)
    extra = server['extra']
    rows = jnp.asarray(np.asarray(ids, np.int32))
    state = {k: v[rows] for k, v in extra['buffer'].items()}
    state['seen'] = jnp.broadcast_to(extra['seen'], (len(ids),) + extra['seen'].shape)
    return dataclasses.replace(plan, client_state=state)

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    server, info = super().aggregate(server, results, task, rnd)
    extra = server['extra']
    buffer, seen = write_back(extra['buffer'], extra['seen'], results.state,
                              results.client_ids, results.num_samples)
    return {**server, 'extra': {**extra, 'buffer': buffer, 'seen': seen}}, info


@jax.jit
def write_back(buffer: dict, seen: jax.Array, state: dict, client_ids: jax.Array,
               num_samples: jax.Array) -> tuple[dict, jax.Array]:
  """The participants' trained buffers into their rows of `buffer` (leaves
  (num_clients, ...)).

  state: ClientResults.state, leaves (C', ...) with C' >= C rows; client_ids
  (C,) int32 and num_samples (C,): row i is client client_ids[i]; rows with
  num_samples 0 (padding) and rows past C are not written. seen (K,): joined
  with the written rows' 'seen'. Returns (buffer, seen).
  """
  n = client_ids.shape[0]
  state = jax.tree.map(lambda x: x[:n], state)
  present = num_samples[:n] > 0
  target = jnp.where(present, client_ids, buffer['count'].shape[0])
  new = {k: buffer[k].at[target].set(state[k].astype(buffer[k].dtype), mode='drop')
         for k in buffer}
  seen = jnp.maximum(seen, jnp.max(jnp.where(present[:, None], state['seen'], 0.0), axis=0))
  return new, seen

"""The contract between the federated loop and a method: what each side hands the other.

  ForwardFn      how a method turns images into (logits, features)
  LocalSpec      what clients train in a round (factors, learning rates, loss)
  RoundPlan      the method's whole answer for one round (the loop asks once)
  TaskEndPlan    the method's end-of-task Gram pass, if any
  Batch          what a loss term or statistic sees of one batch of one client
  LossTerm       a method's extra local loss over a Batch
  StatFn         a per-client statistic summed over a client's batches
  GramRequest    which Grams clients collect after training
  ClientResults  what the server receives: per-client values stacked over clients
  Server         the server state, a dict pytree {'a', 'b', 'head', 'extra'}

The loop (`lorm_jax.federated`) and every method (`lorm_jax.methods`) import
these from here and nothing else from each other: methods never import the
loop. `linear_head_forward` and `masked_cross_entropy` are the defaults a
method may reuse inside its own forward or loss.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lorm_jax.models.functional import Flat, FunctionalViT

Server = dict[str, Any]
# (model, frozen, a, b, head, ctx, images (B,H,W,C)) -> (logits (B,K), features (B,D))
ForwardFn = Callable[[FunctionalViT, Flat, Flat, Flat, Flat, Any, jax.Array],
                     tuple[jax.Array, jax.Array]]


def linear_head(head: Flat, feats: jax.Array) -> jax.Array:
  """Logits (B, K) of the classifier {'kernel' (D, K), 'bias' (K,)} on feats (B, D)."""
  return feats @ head['kernel'] + head['bias']


def linear_head_forward(model: FunctionalViT, frozen: Flat, a: Flat, b: Flat, head: Flat,
                        ctx: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """W0 + a @ b, final-norm class token, linear head: x (B, H, W, C) ->
  (logits (B, K), features (B, D)). ctx is unused."""
  feats, _, _ = model.apply(frozen, a, b, head, x, features_only=True)
  return linear_head(head, feats), feats


class Batch(NamedTuple):
  """What a method's loss term or statistic sees of one batch of one client."""
  params: dict           # {'a', 'b', 'head'}: the client's current values
  aux: Any               # Method.train_aux(server, task), the same for every client
  x: jax.Array           # (B, H, W, C) preprocessed images
  y: jax.Array           # (B,) int32 labels
  w: jax.Array           # (B,) sample weights, 0 for padding
  logits: jax.Array      # (B, K) with params
  feats: jax.Array       # (B, D) final-norm class-token features with params
  class_mask: jax.Array  # (K,) bool: the current task's classes
  forward: Callable      # (a, b, head, x) -> (logits, feats): the method's forward
                         # on the client's backbone (frozen and ctx bound)
  ctx: Any = None        # Method.forward_ctx(server, task), what `forward` reads
  state: Any = None      # this client's RoundPlan.client_state (local training only)
  idx: jax.Array | None = None   # (B,) int32 indices of the samples into the training set
  key: jax.Array | None = None   # a PRNG key of this client and step (purpose 'shuffle')
  fetch: Callable | None = None  # (key, idx (n,)) -> (x (n,H,W,C) preprocessed, y (n,)):
                                 # training samples by index (e.g. a replay buffer's)


# A method's extra local loss (a scalar added to the masked cross-entropy), and
# a per-client statistic (a pytree, summed over the client's batches).
LossTerm = Callable[[Batch], jax.Array]
StatFn = Callable[[Batch], Any]


@dataclasses.dataclass(frozen=True)
class LocalSpec:
  """What a client trains in one round (static under jit).

  factors: the LoRA factors trained this round, a subset of ('a', 'b'); the
  others stay at the server's value. lr_a, lr_b, lr_head: the learning rates
  of A, B and the head, the same meaning in every method (config lr_a, lr_b,
  lr_head). A fresh optimizer per round, as the
  reference: 'adamw' (decoupled weight decay) or 'adam' (no decay; a method
  that wants torch Adam's coupled L2 puts it in its loss term).
  loss_term: an optional extra loss (a module-level function, so the spec
  stays hashable) added to the cross-entropy; its data is `aux` (shared) and
  `state` (the client's own, RoundPlan.client_state).
  cross_entropy: False drops the current-task cross-entropy from the loss
  (a loss term then supplies the whole objective).
  state_update: (state, Batch) -> state, run after every non-empty training
  step on the batch just trained (its logits from the parameters before the
  step); the final state comes back in ClientResults.state.
  """
  factors: tuple[str, ...]
  lr_a: float
  lr_b: float
  lr_head: float
  weight_decay: float = 0.0
  train_head: bool = True
  loss_term: LossTerm | None = None
  optimizer: str = 'adamw'
  cross_entropy: bool = True
  state_update: Callable[[Any, 'Batch'], Any] | None = None


class GramRequest(NamedTuple):
  backbone: str | None  # 'diag', 'full' or None
  head: bool


class ClientResults(NamedTuple):
  """The round's participants' uploads, stacked over the client axis C."""
  a: Flat        # {layer: (C, in, r)}
  b: Flat        # {layer: (C, r, out)}
  head: Flat     # {'kernel': (C, D, K), 'bias': (C, K)}
  grams: Flat    # {layer: (C, in) or (C, in, in)} or {}
  head_grams: jax.Array | None  # (C, D, D)
  num_samples: jax.Array        # (C,) float32, 0 for padded clients
  stats: Any = None             # stats_request's pytree, leaves (C, ...), or None
  client_ids: jax.Array | None = None  # (C,) int32: which client each row is
  state: Any = None             # RoundPlan.client_state after training, leaves (C, ...)


def _same(params: dict) -> dict:
  return params


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  """Everything a method decides for one round of task t (`Method.round_plan`).

  spec          what the participants train (LocalSpec)
  train_deltas  {layer: (in, out)} added to W0 in the local-training forward
  aux, ctx      pytrees every participant downloads: the loss term's and
                statistic's data (aux) and what the method's forward reads (ctx)
  client_params per-participant starting values for some of 'a', 'b', 'head'
                (Flat dicts, leading axis = participants in `ids` order),
                replacing the server's shared ones (e.g. FedSA-LoRA's own B)
  client_state  per-participant pytree (leading axis = participants) that the
                loss term reads as Batch.state and LocalSpec.state_update
                advances (e.g. DER++'s buffer); None: no state
  gram          the Grams clients collect after training, or None
  gram_deltas   {layer: (in, out)} added to W0 in the Gram pass
  gram_params   {'a', 'b', 'head'} of a client after training -> the factors
                the Gram pass runs through (e.g. LoRM's b scaled)
  stats         a per-client statistic summed over the client's data after
                training, or None
  kept_local    parameters ('a', 'b', 'head') the clients keep between rounds
                and never send: neither downloaded nor uploaded in the byte
                count (FedSA-LoRA's B; the simulation stores them server-side)
  """
  spec: LocalSpec
  train_deltas: Flat = dataclasses.field(default_factory=dict)
  aux: Any = dataclasses.field(default_factory=dict)
  ctx: Any = dataclasses.field(default_factory=dict)
  client_params: dict = dataclasses.field(default_factory=dict)
  client_state: Any = None
  gram: 'GramRequest | None' = None
  gram_deltas: Flat = dataclasses.field(default_factory=dict)
  gram_params: Callable[[dict], dict] = _same
  stats: 'StatFn | None' = None
  kept_local: tuple[str, ...] = ()


class ServerBackbone(NamedTuple):
  """What server-side work (`Method.after_task`) may compute with: the
  model, its frozen weights (Flat, W0) and the training preprocessing
  (key, uint8 (B,H,W,C)) -> float32 images; `progress`: long work may show
  a progress bar (the run's own bar is on)."""
  model: FunctionalViT
  frozen: Flat
  preprocess: Callable[[jax.Array, jax.Array], jax.Array]
  progress: bool = False


@dataclasses.dataclass(frozen=True)
class TaskEndPlan:
  """A method's end-of-task Gram pass (`Method.task_end_plan`): the last
  round's participants run `gram` through W0 + `deltas` and the server's
  factors as `params` gives them ({'a', 'b', 'head'})."""
  gram: 'GramRequest'
  deltas: Flat
  params: dict


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, class_mask: jax.Array,
                         weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy over the classes in class_mask (K,) only; mean over weights (B,).

  Returns (mean loss, number of correct predictions among weighted samples).
  """
  logits = jnp.where(class_mask[None, :], logits, -1e9)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
  return jnp.sum(nll * weights) / denom, correct

"""Per-client pure functions: local training, the Gram pass and prediction.

Each function handles ONE client; `runner.ClientRunner.map_clients` maps
them over the round's clients. Data never leaves the device: the whole uint8
training set is an input, a client's batches are index arrays (S, B) plus a
0/1 mask (S, B), and augmentation runs inside the step.

Parameters are the flat dicts of `lorm_jax.models.functional`. What a method
asks of a client (`LocalSpec`, a loss term or statistic over a `Batch`, its
`ForwardFn`) is defined in `lorm_jax.methods.interface`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lorm_jax.methods.interface import (Batch, ForwardFn, LocalSpec, StatFn,
                                        masked_cross_entropy)
from lorm_jax.models.functional import Flat, FunctionalViT

Preprocess = Callable[[jax.Array, jax.Array], jax.Array]  # (key, uint8 (B,H,W,C)) -> f32


def make_optimizer(spec: LocalSpec) -> optax.GradientTransformation:
  """AdamW or Adam (default betas) with a learning rate per factor (A, B) and
  one for the head; params {'a'?, 'b'?, 'head'?} (what split_trainable gives)."""
  def labels(params):
    return {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}
  if spec.optimizer == 'adamw':
    make = lambda lr: optax.adamw(lr, weight_decay=spec.weight_decay)
  elif spec.optimizer == 'adam':
    make = optax.adam
  else:
    raise ValueError(f'unknown optimizer {spec.optimizer!r}; expected adamw or adam')
  return optax.multi_transform({'a': make(spec.lr_a), 'b': make(spec.lr_b),
                                'head': make(spec.lr_head)}, labels)


def split_trainable(spec: LocalSpec, a: Flat, b: Flat, head: Flat) -> tuple[dict, dict]:
  """-> (trainable, fixed), each a dict with some of the keys 'a', 'b', 'head'."""
  every = {'a': a, 'b': b, 'head': head}
  names = set(spec.factors) | ({'head'} if spec.train_head else set())
  return ({k: v for k, v in every.items() if k in names},
          {k: v for k, v in every.items() if k not in names})


def filled_step(w: jax.Array, carry: Any, update: Callable, half_batches: bool) -> tuple:
  """One step over a front-filled batch with 0/1 mask w (B,) (batching.client_batch_plan).

  update(carry, n) -> (carry, out) works on the batch's first n positions. A
  batch without samples is skipped (carry unchanged, out zero); with
  half_batches, a batch whose samples fit in its first half runs at n = B / 2
  (the partial last batch of an epoch), else at n = B. Which branch runs is
  a `lax.switch`: a real branch under `lax.map`, a select of all under vmap.
  """
  b = w.shape[0]
  sizes = (b // 2, b) if half_batches and b % 2 == 0 else (b,)
  out_shape = jax.eval_shape(lambda c: update(c, b)[1], carry)

  def skip(c):
    return c, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

  count = jnp.sum(w > 0)
  index = sum((count > n).astype(jnp.int32) for n in (0,) + sizes[:-1])
  branches = [skip] + [functools.partial(lambda n, c: update(c, n), n) for n in sizes]
  return jax.lax.switch(index, branches, carry)


class Samples(NamedTuple):
  """One batch of one client inside `batch_loop`, cut to its first n positions."""
  x: jax.Array      # (n, H, W, C) preprocessed images
  y: jax.Array | None  # (n,) int32 labels (None in a pass without labels)
  w: jax.Array      # (n,) sample weights, 0 for padding
  idx: jax.Array    # (n,) int32 indices into the training set
  key: jax.Array    # a PRNG key of this client and step, apart from the preprocessing's


def batch_loop(update: Callable[[Any, Samples], tuple[Any, Any]], carry: Any,
               preprocess: Preprocess, half_batches: bool, *, images: jax.Array,
               labels: jax.Array | None, idx: jax.Array, mask: jax.Array, key: jax.Array
               ) -> tuple[Any, Any]:
  """The one loop over a client's batches that every pass shares: a `lax.scan`
  over the S steps of idx/mask (S, B), each batch preprocessed with
  fold_in(key, step) and cut to n = B or B / 2 positions (`filled_step`; an
  all-padding step leaves carry unchanged and outputs zeros).

  update(carry, Samples) -> (carry, out). Returns (carry, outs stacked over S).
  labels None: a pass that reads none (Samples.y is None).
  """
  def step(carry, inputs):
    s, batch_idx, w = inputs

    def run(carry, n):
      step_key = jax.random.fold_in(key, s)
      x = preprocess(step_key, images[batch_idx])[:n]
      y = None if labels is None else labels[batch_idx][:n]
      return update(carry, Samples(x, y, w[:n], batch_idx[:n],
                                   jax.random.fold_in(step_key, 1)))

    return filled_step(w, carry, run, half_batches)

  return jax.lax.scan(step, carry, (jnp.arange(idx.shape[0]), idx, mask))


def local_train(model: FunctionalViT, forward_fn: ForwardFn, spec: LocalSpec,
                preprocess: Preprocess, half_batches: bool = False, *, frozen: Flat, a: Flat,
                b: Flat, head: Flat, images: jax.Array, labels: jax.Array, idx: jax.Array,
                mask: jax.Array, key: jax.Array, class_mask: jax.Array, aux: Any = None,
                ctx: Any = None, state: Any = None) -> tuple[Flat, Flat, Flat, dict, Any]:
  """One client's local training: `batch_loop` over S steps of batch B.

  images (N, H, W, C) uint8 and labels (N,) int32 are the whole training
  set; idx/mask (S, B) select this client's batches (front-filled, see
  `filled_step`). Steps whose mask is all zero leave parameters and optimizer
  state untouched. With spec.loss_term the loss is the masked cross-entropy +
  loss_term(Batch(..., aux, ..., state)); spec.state_update advances the
  client's state after every step.
  Returns (a, b, head, stats, state) with stats = {loss_sum, correct, seen, steps}.
  """
  trainable, fixed = split_trainable(spec, a, b, head)
  opt = make_optimizer(spec)
  forward = bind_forward(forward_fn, model, frozen, ctx)
  fetch = lambda k, i: (preprocess(k, images[i]), labels[i])

  def loss_fn(trainable, state, smp):
    p = {**fixed, **trainable}
    logits, feats = forward(p['a'], p['b'], p['head'], smp.x)
    loss, correct = masked_cross_entropy(logits, smp.y, class_mask, smp.w)
    loss = loss if spec.cross_entropy else jnp.float32(0)
    batch = Batch(p, aux, smp.x, smp.y, smp.w, logits, feats, class_mask, forward, ctx,
                  state, smp.idx, smp.key, fetch)
    if spec.loss_term is not None:
      loss = loss + spec.loss_term(batch)
    return loss, (correct, batch if spec.state_update is not None else None)

  def update(carry, smp):
    params, opt_state, state = carry
    (loss, (correct, batch)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, smp)
    updates, opt_state = opt.update(grads, opt_state, params)
    if spec.state_update is not None:
      state = spec.state_update(state, batch)
    return ((optax.apply_updates(params, updates), opt_state, state),
            (loss * jnp.sum(smp.w), correct))

  (trainable, _, state), (loss_sum, correct) = batch_loop(
      update, (trainable, opt.init(trainable), state), preprocess, half_batches,
      images=images, labels=labels, idx=idx, mask=mask, key=key)
  p = {**fixed, **trainable}
  stats = {'loss_sum': jnp.sum(loss_sum), 'correct': jnp.sum(correct),
           'seen': jnp.sum(mask), 'steps': jnp.sum(jnp.any(mask > 0, axis=1))}
  return p['a'], p['b'], p['head'], stats, state


def bind_forward(forward_fn: ForwardFn, model: FunctionalViT, frozen: Flat, ctx: Any
                 ) -> Callable[[Flat, Flat, Flat, jax.Array], tuple[jax.Array, jax.Array]]:
  """(a, b, head, x) -> (logits, features) on one backbone and ctx; the
  backbone's compute view is made here, once, outside the caller's loop."""
  frozen = model.compute_view(frozen)
  return lambda a, b, head, x: forward_fn(model, frozen, a, b, head, ctx, x)


def stats_pass(model: FunctionalViT, forward_fn: ForwardFn, preprocess: Preprocess,
               stat_fn: StatFn, half_batches: bool = False, *, frozen: Flat, a: Flat, b: Flat,
               head: Flat, aux: Any, ctx: Any, images: jax.Array, labels: jax.Array,
               idx: jax.Array, mask: jax.Array, key: jax.Array, class_mask: jax.Array) -> Any:
  """Sums stat_fn(Batch) over a client's batches idx/mask (S, B); padded
  samples have weight 0 and all-padding steps are skipped. Returns the summed pytree."""
  forward = bind_forward(forward_fn, model, frozen, ctx)
  params = {'a': a, 'b': b, 'head': head}

  def one(smp):
    logits, feats = forward(a, b, head, smp.x)
    return stat_fn(Batch(params, aux, smp.x, smp.y, smp.w, logits, feats, class_mask,
                         forward, ctx))

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      lambda k: one(Samples(preprocess(k, images[idx[0]]), labels[idx[0]], mask[0], idx[0], k)),
      key))
  add = lambda acc, smp: (jax.tree.map(jnp.add, acc, one(smp)), None)
  return batch_loop(add, zeros, preprocess, half_batches, images=images, labels=labels,
                    idx=idx, mask=mask, key=key)[0]


def gram_pass(model: FunctionalViT, preprocess: Preprocess, gram_mode: str | None,
              head_gram: bool, half_batches: bool = False, *, frozen: Flat, a: Flat, b: Flat,
              head: Flat, images: jax.Array, idx: jax.Array, mask: jax.Array, key: jax.Array,
              ) -> tuple[Flat, jax.Array | None]:
  """Sums the Grams of every adapted layer's input over a client's batches.

  One forward per batch (S, B) with the given model; all tokens; padded
  samples weigh 0. Returns ({layer: (in,) or (in, in)}, head Gram (D, D)).
  """
  d = model.cfg.width
  frozen = model.compute_view(frozen)

  def zeros(n):
    return jnp.zeros((n,) if gram_mode == 'diag' else (n, n), jnp.float32)

  # the adapted layers among those the factors hold (b's keys: (IA)^3 has no a)
  inputs = {k: n for k, n in model.layer_inputs.items() if k in b}
  init = ({k: zeros(n) for k, n in inputs.items()} if gram_mode else {},
          jnp.zeros((d, d), jnp.float32) if head_gram else None)

  def accumulate(carry, smp):
    acc, hacc = carry
    _, g, hg = model.apply(frozen, a, b, head, smp.x, gram_mode=gram_mode, head_gram=head_gram,
                           sample_weights=smp.w, features_only=not head_gram)
    return ({k: acc[k] + g[k] for k in acc}, (hacc + hg if head_gram else None)), None

  return batch_loop(accumulate, init, preprocess, half_batches, images=images, labels=None,
                    idx=idx, mask=mask, key=key)[0]


def predict(model: FunctionalViT, forward_fn: ForwardFn, preprocess: Preprocess, *,
            frozen: Flat, a: Flat, b: Flat, head: Flat, ctx: Any, images: jax.Array,
            idx: jax.Array) -> jax.Array:
  """Logits (S, B, K) for the samples idx (S, B) of `images`; deterministic preprocessing."""
  key = jax.random.key(0)  # test-time preprocessing draws no randomness
  forward = bind_forward(forward_fn, model, frozen, ctx)

  def step(_, batch_idx):
    logits, _ = forward(a, b, head, preprocess(key, images[batch_idx]))
    return None, logits

  return jax.lax.scan(step, None, idx)[1]

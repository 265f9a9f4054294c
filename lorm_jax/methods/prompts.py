"""Prompt-based baselines: L2P and CODA-Prompt on the frozen backbone.

Neither keeps a LoRA (server a and b are empty; `F.full_lora` gives the
model zero deltas). Their trained parameters live in the server's 'head' dict
beside the classifier, so the loop trains, uploads and averages them like a
head. Reference facts: docs/baselines_reference_facts.md sections 10-11.

  l2p     a pool of `pool_size` (10) prompts of `length` (5) tokens with
          keys, both U(-1, 1). The query is the class token of a prompt-free
          forward (no gradient); the `top_k` (5) keys most cosine-similar to
          it pick the prompts, whose top_k * length tokens are inserted after
          the class token; the head reads the mean of the class token and the
          prompt tokens after the final norm. Prompt position embeddings
          0.02 N(0, 1), frozen. No key-pull loss (as the reference), so the
          keys keep their initial values.
  coda_p  per block 0..`layers`-1 (0-4) a pool of `pool_size` (100)
          components (prompt (`length` = 8, D), key (D,), attention vector
          (D,)), pool_size / num_tasks of them per task; weight of component
          k = cos(query * A_k, K_k); the weighted prompt's first length / 2
          vectors prefix the keys and the rest the values of that block's
          attention. Training reaches the current task's components only
          (earlier ones are detached, later ones absent); each task's slice
          starts from the reference's Gram-Schmidt step against all earlier
          components.

Both: AdamW with weight decay 0 at the config's head learning rate, cross-
entropy on the current task's classes, server = sample-weighted mean. The
pool sizes are the methods' hyperparameters (`config.l2p.*`, `config.coda_p.*`,
defaults the reference's); a size that shapes an array inside the forward
(L2P's top_k) is bound to it statically (`StaticForward`), the rest follow
from the shapes of the pools in the head dict.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from lorm_jax import merge
from lorm_jax.methods.interface import ForwardFn, LocalSpec, linear_head
from lorm_jax.methods.base import ClientResults, Method, Server
from lorm_jax.models import functional as F
from lorm_jax.models.vit import Prompting

_PROMPT_POS_KEY = 0x12b  # the frozen prompt position embeddings: every client can redraw them


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along axis, with a finite gradient at x = 0."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


@dataclasses.dataclass(frozen=True)
class StaticForward:
  """A module-level forward `fn(model, frozen, a, b, head, ctx, x, **static)`
  with static keyword values bound (sizes that shape arrays under jit, e.g.
  L2P's top_k). Hashable and equal by value, so a method's `forward` built
  again from the same hyperparameters is the same jit cache entry."""
  fn: Callable[..., tuple[jax.Array, jax.Array]]
  static: tuple[tuple[str, Any], ...] = ()

  def __call__(self, model: F.FunctionalViT, frozen: F.Flat, a: F.Flat, b: F.Flat,
               head: F.Flat, ctx: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.fn(model, frozen, a, b, head, ctx, x, **dict(self.static))


def bind_static(fn: Callable[..., tuple[jax.Array, jax.Array]], **static: Any) -> ForwardFn:
  """fn with `static` bound (sorted by name): a `StaticForward`."""
  return StaticForward(fn, tuple(sorted(static.items())))


def prompt_free_query(model: F.FunctionalViT, frozen: F.Flat, head: F.Flat, x: jax.Array
                      ) -> tuple[F.Flat, F.Flat, jax.Array]:
  """(zero a, zero b, class-token query (B, D)) of the prompt-free frozen backbone."""
  a, b = F.full_lora(model, {}, {})
  q, _, _ = model.apply(frozen, a, b, head, x, features_only=True)
  return a, b, jax.lax.stop_gradient(q)


# ------------------------------------------------------------------ L2P


def l2p_select(prompts: jax.Array, keys: jax.Array, query: jax.Array, top_k: int) -> jax.Array:
  """Prompt tokens (B, top_k * L, D) of the top_k keys (pool, D) most
  cosine-similar to query (B, D); prompts (pool, L, D), ordered by similarity."""
  sim = l2_normalize(query) @ l2_normalize(keys).T            # (B, pool)
  _, idx = jax.lax.top_k(sim, top_k)                            # (B, top_k)
  picked = prompts[idx]                                         # (B, top_k, L, D)
  return picked.reshape(picked.shape[0], -1, picked.shape[-1])


def l2p_forward(model: F.FunctionalViT, frozen: F.Flat, a: F.Flat, b: F.Flat, head: F.Flat,
                ctx: Any, x: jax.Array, *, top_k: int) -> tuple[jax.Array, jax.Array]:
  """The reference L2P network (`vit_l2p`): x (B, H, W, C) -> (logits, features).

  head['l2p.prompts'] (pool, L, D), head['l2p.keys'] (pool, D); top_k
  (static) prompts per image, so top_k * L prompt tokens.
  """
  a0, b0, q = prompt_free_query(model, frozen, head, x)
  tokens = l2p_select(head['l2p.prompts'], head['l2p.keys'], q, top_k)
  pos = 0.02 * jax.random.normal(jax.random.key(_PROMPT_POS_KEY), tokens.shape[1:])
  feats, _, _ = model.apply(frozen, a0, b0, head, x, features_only=True,
                            prompting=Prompting(tokens, pos, None, 'cls_and_tokens'))
  return linear_head(head, feats), feats


def check_positive_ints(method: str, h: ConfigDict, names: tuple[str, ...]) -> None:
  """ValueError unless every config.<method>.<name> is an integer >= 1."""
  for name in names:
    v = h[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f'{method}.{name} must be an integer >= 1, got {v!r}')


@dataclasses.dataclass
class PromptMethod(Method):
  """Shared by the prompt methods (L2P, CODA-P, DualPrompt, CODA-LwF): no
  LoRA, prompts + classifier trained, FedAvg."""

  def init_server(self, params: F.Params, head: F.Flat, key: jax.Array) -> Server:
    return {'a': {}, 'b': {}, 'head': {**head, **self.init_prompts(key, params)},
            'extra': self.init_extra(params)}

  def init_prompts(self, key: jax.Array, params: F.Params) -> F.Flat:
    """The method's trained parameters besides the classifier, keyed '<method>.<name>'."""
    raise NotImplementedError

  def begin_task(self, server: Server, task: int, key: jax.Array) -> Server:
    return server

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    c = self.config
    return LocalSpec(factors=(), lr_a=c.lr_a, lr_b=c.lr_b, lr_head=c.lr_head,
                     weight_decay=0.0)

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    head = merge.fedavg_tree(results.head, results.num_samples)
    return {**server, 'head': head}, {}


@dataclasses.dataclass
class L2P(PromptMethod):
  """Learning to Prompt with a shared pool (reference `l2p`): `pool_size`
  prompts of `length` tokens, `top_k` of them per image."""
  name: ClassVar[str] = 'l2p'
  pool_size: int = 10
  length: int = 5
  top_k: int = 5

  @property
  def forward(self) -> ForwardFn:
    return bind_static(l2p_forward, top_k=self.top_k)

  @classmethod
  def validate(cls, config: ConfigDict) -> None:
    h = config.l2p
    check_positive_ints('l2p', h, ('pool_size', 'length', 'top_k'))
    if h.top_k > h.pool_size:
      raise ValueError(f'l2p.top_k {h.top_k} is more than the {h.pool_size} prompts of the pool '
                       '(l2p.pool_size)')

  def init_prompts(self, key: jax.Array, params: F.Params) -> F.Flat:
    width = params.head['kernel'].shape[0]
    kp, kk = jax.random.split(key)
    return {'l2p.prompts': jax.random.uniform(kp, (self.pool_size, self.length, width),
                                              minval=-1.0, maxval=1.0),
            'l2p.keys': jax.random.uniform(kk, (self.pool_size, width), minval=-1.0, maxval=1.0)}


# ------------------------------------------------------------- CODA-Prompt


def coda_prompt_weights(query: jax.Array, keys: jax.Array, attn: jax.Array, live: jax.Array
                        ) -> jax.Array:
  """(B, pool) weights cos(query * attn_k, key_k) of the live components.

  query (B, D); keys, attn (pool, D); live (pool,) 0/1.
  """
  aq = l2_normalize(query[:, None, :] * attn[None], axis=-1)   # (B, pool, D)
  return jnp.einsum('bkd,kd->bk', aq, l2_normalize(keys)) * live


def coda_prefixes(q: jax.Array, head: F.Flat, ctx: Any
                  ) -> tuple[dict[int, tuple[jax.Array, jax.Array]], jax.Array]:
  """CODA-P's prefixes for the query q (B, D) and the component weights they use.

  head['coda.p'] (layers, pool, L, D), head['coda.k'], head['coda.a']
  (layers, pool, D); ctx as `coda_forward`. Returns ({block: (key prefix
  (B, L/2, D), value prefix (B, L - L/2, D))}, weights (layers, B, pool)).
  """
  train = ctx['train'] > 0
  detach = lambda t: jnp.where(train.reshape((-1,) + (1,) * (t.ndim - 1)), t,
                               jax.lax.stop_gradient(t))
  prefixes, weights = {}, []
  for layer in range(head['coda.p'].shape[0]):
    p, k, att = (detach(head[name][layer]) for name in ('coda.p', 'coda.k', 'coda.a'))
    w = coda_prompt_weights(q, k, att, ctx['live'])
    prompt = jnp.einsum('bk,kld->bld', w, p)                   # (B, L, D)
    half = prompt.shape[1] // 2
    prefixes[layer] = (prompt[:, :half], prompt[:, half:])
    weights.append(w)
  return prefixes, jnp.stack(weights)


def coda_forward_with_weights(model: F.FunctionalViT, frozen: F.Flat, head: F.Flat, ctx: Any,
                              x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits (B, K), features (B, D), component weights (layers, B, pool)) of
  the reference CODA-P network on x (B, H, W, C); ctx as `coda_forward`."""
  a0, b0, q = prompt_free_query(model, frozen, head, x)
  prefixes, weights = coda_prefixes(q, head, ctx)
  feats, _, _ = model.apply(frozen, a0, b0, head, x, features_only=True,
                            prompting=Prompting(prefixes=prefixes))
  return linear_head(head, feats), feats, weights


def coda_forward(model: F.FunctionalViT, frozen: F.Flat, a: F.Flat, b: F.Flat, head: F.Flat,
                 ctx: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The reference CODA-P network (`vit_prompt_coda`): x -> (logits, features).

  ctx: {'live': (pool,) components in use, 'train': (pool,) the current
  task's, the only ones that receive gradients}.
  """
  logits, feats, _ = coda_forward_with_weights(model, frozen, head, ctx, x)
  return logits, feats


@functools.partial(jax.jit, static_argnames=('start', 'stop'))
def gram_schmidt_rows(key: jax.Array, rows: jax.Array, start: int, stop: int) -> jax.Array:
  """The reference's re-initialisation of rows[start:stop] (pool, n).

  Each new row: a standard normal vector minus its projections on every
  earlier row (classical Gram-Schmidt against rows[:k], which after training
  need not be orthogonal); then the new rows are scaled to unit norm. Rows
  outside [start, stop) are returned unchanged.
  """
  def one(k, u):
    v = jax.random.normal(jax.random.fold_in(key, k), u.shape[1:], u.dtype)
    earlier = (jnp.arange(u.shape[0]) < k)[:, None]
    uu = jnp.where(earlier, u, 0.0)
    coeff = (uu @ v) / jnp.maximum(jnp.sum(uu * uu, axis=1), 1e-30)
    return u.at[k].set(v - coeff @ uu)

  out = jax.lax.fori_loop(start, stop, one, rows)
  new = out[start:stop]
  return out.at[start:stop].set(l2_normalize(new, axis=1))


@dataclasses.dataclass
class CodaPrompt(PromptMethod):
  """CODA-Prompt (reference `coda_prompt`, ortho penalty mu = 0): per block
  0..layers-1 a pool of `pool_size` components whose prompts have `length`
  vectors."""
  name: ClassVar[str] = 'coda_p'
  forward = staticmethod(coda_forward)
  pool_size: int = 100
  length: int = 8
  layers: int = 5

  @classmethod
  def validate(cls, config: ConfigDict) -> None:
    h = config[cls.name]
    check_positive_ints(cls.name, h, ('pool_size', 'length', 'layers'))
    if h.length % 2:
      raise ValueError(f'{cls.name}.length must be even (half the prompt prefixes the keys, '
                       f'half the values), got {h.length}')
    if h.pool_size < config.num_tasks:
      raise ValueError(f'{cls.name}.pool_size {h.pool_size} gives none of the {config.num_tasks} '
                       'tasks a component; give at least num_tasks')

  def task_slice(self, task: int) -> tuple[int, int]:
    """[start, stop) of the components task `task` owns (pool_size // num_tasks each)."""
    per_task = self.pool_size // self.config.num_tasks
    return task * per_task, (task + 1) * per_task

  def init_prompts(self, key: jax.Array, params: F.Params) -> F.Flat:
    """Zeros; begin_task fills each task's slice (blocks 0..layers-1, fewer if
    the ViT is shallower)."""
    width = params.head['kernel'].shape[0]
    layers = min(self.layers, len({k.split('.')[1] for k in params.a}))
    return {'coda.p': jnp.zeros((layers, self.pool_size, self.length, width)),
            'coda.k': jnp.zeros((layers, self.pool_size, width)),
            'coda.a': jnp.zeros((layers, self.pool_size, width))}

  def begin_task(self, server: Server, task: int, key: jax.Array) -> Server:
    """Gram-Schmidt initialisation of this task's slice of every pool."""
    start, stop = self.task_slice(task)
    head = dict(server['head'])
    for i, name in enumerate(('coda.p', 'coda.k', 'coda.a')):
      x = head[name]
      rows = x.reshape(x.shape[0], self.pool_size, -1)
      new = jnp.stack([gram_schmidt_rows(jax.random.fold_in(key, 16 * layer + i), rows[layer],
                                         start, stop) for layer in range(x.shape[0])])
      head[name] = new.reshape(x.shape)
    return {**server, 'head': head}

  def forward_ctx(self, server: Server, task: int) -> Any:
    comp = jnp.arange(self.pool_size)
    start, stop = self.task_slice(task)
    return {'live': (comp < stop).astype(jnp.float32),
            'train': ((comp >= start) & (comp < stop)).astype(jnp.float32)}

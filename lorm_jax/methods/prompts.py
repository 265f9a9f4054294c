"""Prompt-based baselines: L2P and CODA-Prompt on the frozen backbone.

Neither keeps a LoRA (server a and b are empty; `F.full_lora` gives the
model zero deltas). Their trained parameters live in the server's 'head' dict
beside the classifier, so the loop trains, uploads and averages them like a
head. Reference facts: docs/baselines_reference_facts.md sections 10-11.

  l2p     a pool of 10 prompts of 5 tokens with keys, both U(-1, 1). The
          query is the class token of a prompt-free forward (no gradient);
          the 5 keys most cosine-similar to it pick the prompts, whose 25
          tokens are inserted after the class token; the head reads the mean
          of the class token and the prompt tokens after the final norm.
          Prompt position embeddings 0.02 N(0, 1), frozen. No key-pull loss
          (as the reference), so the keys keep their initial values.
  coda_p  per block 0-4 a pool of 100 components (prompt (8, D), key (D,),
          attention vector (D,)), 100 / num_tasks of them per task; weight of
          component k = cos(query * A_k, K_k); the weighted prompt's first
          4 vectors prefix the keys and the last 4 the values of that block's
          attention. Training reaches the current task's components only
          (earlier ones are detached, later ones absent); each task's slice
          starts from the reference's Gram-Schmidt step against all earlier
          components.

Both: AdamW with weight decay 0 at the config's head learning rate, cross-
entropy on the current task's classes, server = sample-weighted mean.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorm_jax import merge
from lorm_jax.methods.interface import LocalSpec, linear_head
from lorm_jax.methods.base import ClientResults, Method, Server
from lorm_jax.models import functional as F
from lorm_jax.models.vit import Prompting

L2P_POOL, L2P_LENGTH, L2P_TOP_K = 10, 5, 5
CODA_POOL, CODA_LENGTH, CODA_LAYERS = 100, 8, 5
_PROMPT_POS_KEY = 0x12b  # the frozen prompt position embeddings: every client can redraw them


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along axis, with a finite gradient at x = 0."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def _query(model: F.FunctionalViT, frozen: F.Flat, head: F.Flat, x: jax.Array
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
                ctx: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The reference L2P network (`vit_l2p`): x (B, H, W, C) -> (logits, features)."""
  a0, b0, q = _query(model, frozen, head, x)
  tokens = l2p_select(head['l2p.prompts'], head['l2p.keys'], q, L2P_TOP_K)
  pos = 0.02 * jax.random.normal(jax.random.key(_PROMPT_POS_KEY), tokens.shape[1:])
  feats, _, _ = model.apply(frozen, a0, b0, head, x, features_only=True,
                            prompting=Prompting(tokens, pos, None, 'cls_and_tokens'))
  return linear_head(head, feats), feats


@dataclasses.dataclass
class PromptMethod(Method):
  """Shared by L2P and CODA-P: no LoRA, prompts + classifier trained, FedAvg."""

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
  """Learning to Prompt with a shared pool (reference `l2p`)."""
  name: ClassVar[str] = 'l2p'
  forward = staticmethod(l2p_forward)

  def init_prompts(self, key: jax.Array, params: F.Params) -> F.Flat:
    width = params.head['kernel'].shape[0]
    kp, kk = jax.random.split(key)
    return {'l2p.prompts': jax.random.uniform(kp, (L2P_POOL, L2P_LENGTH, width), minval=-1.0,
                                              maxval=1.0),
            'l2p.keys': jax.random.uniform(kk, (L2P_POOL, width), minval=-1.0, maxval=1.0)}


# ------------------------------------------------------------- CODA-Prompt


def coda_prompt_weights(query: jax.Array, keys: jax.Array, attn: jax.Array, live: jax.Array
                        ) -> jax.Array:
  """(B, pool) weights cos(query * attn_k, key_k) of the live components.

  query (B, D); keys, attn (pool, D); live (pool,) 0/1.
  """
  aq = l2_normalize(query[:, None, :] * attn[None], axis=-1)   # (B, pool, D)
  return jnp.einsum('bkd,kd->bk', aq, l2_normalize(keys)) * live


def coda_forward(model: F.FunctionalViT, frozen: F.Flat, a: F.Flat, b: F.Flat, head: F.Flat,
                 ctx: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The reference CODA-P network (`vit_prompt_coda`): x -> (logits, features).

  ctx: {'live': (pool,) components in use, 'train': (pool,) the current
  task's, the only ones that receive gradients}.
  """
  a0, b0, q = _query(model, frozen, head, x)
  train = ctx['train'] > 0
  detach = lambda t: jnp.where(train.reshape((-1,) + (1,) * (t.ndim - 1)), t,
                               jax.lax.stop_gradient(t))
  prefixes = {}
  for layer in range(head['coda.p'].shape[0]):
    p, k, att = (detach(head[name][layer]) for name in ('coda.p', 'coda.k', 'coda.a'))
    w = coda_prompt_weights(q, k, att, ctx['live'])
    prompt = jnp.einsum('bk,kld->bld', w, p)                   # (B, L, D)
    half = prompt.shape[1] // 2
    prefixes[layer] = (prompt[:, :half], prompt[:, half:])
  feats, _, _ = model.apply(frozen, a0, b0, head, x, features_only=True,
                            prompting=Prompting(prefixes=prefixes))
  return linear_head(head, feats), feats


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
  """CODA-Prompt (reference `coda_prompt`, ortho penalty mu = 0)."""
  name: ClassVar[str] = 'coda_p'
  forward = staticmethod(coda_forward)

  def task_slice(self, task: int) -> tuple[int, int]:
    """[start, stop) of the components task `task` owns (100 / num_tasks each)."""
    per_task = CODA_POOL // self.config.num_tasks
    return task * per_task, (task + 1) * per_task

  def init_prompts(self, key: jax.Array, params: F.Params) -> F.Flat:
    """Zeros; begin_task fills each task's slice (blocks 0-4, fewer if the ViT is shallower)."""
    width = params.head['kernel'].shape[0]
    layers = min(CODA_LAYERS, len({k.split('.')[1] for k in params.a}))
    return {'coda.p': jnp.zeros((layers, CODA_POOL, CODA_LENGTH, width)),
            'coda.k': jnp.zeros((layers, CODA_POOL, width)),
            'coda.a': jnp.zeros((layers, CODA_POOL, width))}

  def begin_task(self, server: Server, task: int, key: jax.Array) -> Server:
    """Gram-Schmidt initialisation of this task's slice of every pool."""
    start, stop = self.task_slice(task)
    head = dict(server['head'])
    for i, name in enumerate(('coda.p', 'coda.k', 'coda.a')):
      x = head[name]
      rows = x.reshape(x.shape[0], CODA_POOL, -1)
      new = jnp.stack([gram_schmidt_rows(jax.random.fold_in(key, 16 * layer + i), rows[layer],
                                         start, stop) for layer in range(x.shape[0])])
      head[name] = new.reshape(x.shape)
    return {**server, 'head': head}

  def forward_ctx(self, server: Server, task: int) -> Any:
    comp = jnp.arange(CODA_POOL)
    start, stop = self.task_slice(task)
    return {'live': (comp < stop).astype(jnp.float32),
            'train': ((comp >= start) & (comp < stop)).astype(jnp.float32)}

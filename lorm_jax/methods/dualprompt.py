"""DualPrompt on the frozen backbone (reference `dual_prompt`: `_models/dualp.py`,
network `vit_prompt_dual` in `_networks/vit_prompt_dual.py`).

No LoRA (server a and b are empty); the prompts live in the server's 'head'
dict beside the classifier, so the loop trains, uploads and averages them like
a head (`prompts.PromptMethod`). D is the backbone width.

  G-prompt  one per block in `g_layers` (0, 1), `g_length` (5) vectors for
            the keys and as many for the values of that block's attention
            (prefix tuning); the same for every task and image.
            head['dualprompt.g'] (n_g, 2, g_length, D), n_g >= 1.
  E-prompts a pool of `pool_size` (10) prompts per block in `e_layers`
            (2, 3, 4), each `e_length` (20) vectors (x 2 for prefix tuning),
            with one key (D,) per pool entry. head['dualprompt.e']
            (n_e, 2, pool, e_length, D) for e_tuning 'prefix' or
            (n_e, pool, e_length, D) for 'prompt', n_e >= 1; head['dualprompt.keys']
            (pool, D). Evaluation picks the `top_k` (1) entries whose keys
            are most cosine-similar to the query (the class token of a
            prompt-free forward, no gradient); training uses task t's own
            entries [t * top_k, (t + 1) * top_k) while the pool has them (the
            reference's prompt mask), key matching after that.
            e_tuning 'prefix': the picked entries' top_k * e_length key and
            value vectors prefix that block's attention; 'prompt': they are
            prepended to the token sequence before that block (and stay in it),
            and the head reads the class token wherever it then sits.

Slot j of the G (E) array belongs to the j-th smallest block of g_layers
(e_layers), as the reference's counters assign them; blocks the ViT does not
have get no slot, and an array without slots is left out of the head dict.
Every prompt and key starts U(-1, 1). As the reference: the key-pull loss is
not used, so the keys never receive a gradient and keep their initial values.
AdamW with weight decay 0 at the config's head learning rate, cross-entropy
on the current task's classes, server = sample-weighted mean of the head
dict. Deviations from the reference: docs/methods.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lorm_jax.methods.base import Server
from lorm_jax.methods.interface import ForwardFn, RoundPlan, linear_head
from lorm_jax.methods.prompts import (PromptMethod, bind_static, check_positive_ints, l2_normalize,
                                      prompt_free_query)
from lorm_jax.models import functional as F

E_TUNINGS = ('prefix', 'prompt')


def present_layers(layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
  """The blocks of `layers` a ViT of `depth` blocks has, ascending: slot j of
  a prompt array is the j-th of them."""
  return tuple(sorted(layer for layer in layers if layer < depth))


def dualprompt_select(keys: jax.Array, query: jax.Array, top_k: int, ctx: Any) -> jax.Array:
  """Indices (B, top_k) of the E-prompts each image uses.

  keys (pool, D), query (B, D). With ctx['force'] > 0 (training while the
  pool holds the task's own entries) every image gets ctx['forced'] (top_k,);
  else the top_k keys most cosine-similar to the query, most similar first.
  """
  sim = l2_normalize(query) @ l2_normalize(keys).T             # (B, pool)
  _, idx = jax.lax.top_k(sim, top_k)                            # (B, top_k)
  forced = jnp.broadcast_to(ctx['forced'][None, :], idx.shape)
  return jnp.where(ctx['force'] > 0, forced, idx)


def dualprompt_prompts(head: F.Flat, idx: jax.Array, g_layers: tuple[int, ...],
                       e_layers: tuple[int, ...], e_tuning: str
                       ) -> tuple[dict[int, tuple[jax.Array, jax.Array]], dict[int, jax.Array]]:
  """({block: (key prefix (B, L, D), value prefix (B, L, D))}, {block: prompt
  tokens (B, top_k * e_length, D)}) for E-prompt indices idx (B, top_k);
  g_layers and e_layers as `present_layers` gives them."""
  batch, top_k = idx.shape
  prefixes, tokens = {}, {}
  for j, layer in enumerate(g_layers):
    g = head['dualprompt.g'][j]                                 # (2, Lg, D)
    prefixes[layer] = tuple(jnp.broadcast_to(g[i], (batch,) + g.shape[1:]) for i in (0, 1))
  for j, layer in enumerate(e_layers):
    e = head['dualprompt.e'][j]
    if e_tuning == 'prefix':
      picked = e[:, idx]                                        # (2, B, top_k, Le, D)
      picked = picked.reshape(2, batch, top_k * e.shape[-2], e.shape[-1])
      prefixes[layer] = (picked[0], picked[1])
    else:
      picked = e[idx]                                           # (B, top_k, Le, D)
      tokens[layer] = picked.reshape(batch, top_k * e.shape[-2], e.shape[-1])
  return prefixes, tokens


def prompted_features(model: F.FunctionalViT, frozen: F.Flat, a: F.Flat, b: F.Flat,
                      head: F.Flat, x: jax.Array,
                      prefixes: dict[int, tuple[jax.Array, jax.Array]],
                      tokens: dict[int, jax.Array]) -> jax.Array:
  """Final-norm class token (B, D) with `prefixes` on blocks' attention and
  `tokens` (B, P, D) prepended to the sequence before their blocks (no
  position embedding; the class token moves back by P each time).
  `vit.ViT.features` with the insertion it lacks: the same embedding, blocks
  and final norm of the module the parameters make."""
  m = model.module(frozen, a, b, head)
  seq = m.embed(x)
  cls = 0
  for i, block in enumerate(m.blocks):
    if i in tokens:
      seq = jnp.concatenate([tokens[i].astype(seq.dtype), seq], axis=1)
      cls += tokens[i].shape[1]
    seq = block(seq, None, None, prefixes.get(i))
  return m.norm(seq)[:, cls]


def dualprompt_forward(model: F.FunctionalViT, frozen: F.Flat, a: F.Flat, b: F.Flat,
                       head: F.Flat, ctx: Any, x: jax.Array, *, g_layers: tuple[int, ...],
                       e_layers: tuple[int, ...], top_k: int, e_tuning: str
                       ) -> tuple[jax.Array, jax.Array]:
  """The reference DualPrompt network: x (B, H, W, C) -> (logits, features).

  ctx {'forced': (top_k,) int32, 'force': () float} (`dualprompt_select`);
  the keyword arguments are static (`prompts.bind_static`).
  """
  a0, b0, q = prompt_free_query(model, frozen, head, x)
  idx = dualprompt_select(head['dualprompt.keys'], q, top_k, ctx)
  depth = model.cfg.depth
  prefixes, tokens = dualprompt_prompts(head, idx, present_layers(g_layers, depth),
                                        present_layers(e_layers, depth), e_tuning)
  feats = prompted_features(model, frozen, a0, b0, head, x, prefixes, tokens)
  return linear_head(head, feats), feats


def _check_layers(name: str, layers: Any) -> None:
  if not isinstance(layers, (tuple, list)) or not all(
      isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
    raise ValueError(f'dualprompt.{name} must be a tuple of block indices >= 0, got {layers!r}')
  if len(set(layers)) != len(layers):
    raise ValueError(f'dualprompt.{name} names a block twice: {tuple(layers)}')


@dataclasses.dataclass
class DualPrompt(PromptMethod):
  """DualPrompt (reference `dual_prompt`): G-prompts on g_layers, an E-prompt
  pool on e_layers; defaults the reference network's (`VitDual`)."""
  name: ClassVar[str] = 'dualprompt'
  g_length: int = 5
  g_layers: tuple[int, ...] = (0, 1)
  pool_size: int = 10
  e_length: int = 20
  e_layers: tuple[int, ...] = (2, 3, 4)
  top_k: int = 1
  e_tuning: str = 'prefix'

  def __post_init__(self) -> None:
    # A config read back from JSON gives lists.
    self.g_layers, self.e_layers = tuple(self.g_layers), tuple(self.e_layers)

  @property
  def forward(self) -> ForwardFn:
    return bind_static(dualprompt_forward, g_layers=self.g_layers, e_layers=self.e_layers,
                       top_k=self.top_k, e_tuning=self.e_tuning)

  @classmethod
  def validate(cls, config: ConfigDict) -> None:
    h = config.dualprompt
    check_positive_ints('dualprompt', h, ('g_length', 'pool_size', 'e_length', 'top_k'))
    if h.top_k > h.pool_size:
      raise ValueError(f'dualprompt.top_k {h.top_k} is more than the {h.pool_size} E-prompts '
                       'of the pool (dualprompt.pool_size)')
    _check_layers('g_layers', h.g_layers)
    _check_layers('e_layers', h.e_layers)
    both = sorted(set(h.g_layers) & set(h.e_layers))
    if both:
      raise ValueError(f'dualprompt.g_layers and dualprompt.e_layers share block(s) {both}; '
                       'a block takes a G- or an E-prompt')
    if h.e_tuning not in E_TUNINGS:
      raise ValueError(f"dualprompt.e_tuning must be 'prefix' or 'prompt', got {h.e_tuning!r}")

  def init_prompts(self, key: jax.Array, params: F.Params) -> F.Flat:
    """U(-1, 1) G-prompts, E-prompts and keys; a prompt array only where the
    ViT has at least one of its blocks."""
    width = params.head['kernel'].shape[0]
    depth = len({k.split('.')[1] for k in params.frozen if k.startswith('blocks.')})
    n_g = len(present_layers(self.g_layers, depth))
    n_e = len(present_layers(self.e_layers, depth))
    e_shape = ((n_e, 2, self.pool_size, self.e_length, width) if self.e_tuning == 'prefix'
               else (n_e, self.pool_size, self.e_length, width))
    kg, ke, kk = jax.random.split(key, 3)
    uniform = lambda k, shape: jax.random.uniform(k, shape, minval=-1.0, maxval=1.0)
    out = {'dualprompt.keys': uniform(kk, (self.pool_size, width))}
    if n_g:
      out['dualprompt.g'] = uniform(kg, (n_g, 2, self.g_length, width))
    if n_e:
      out['dualprompt.e'] = uniform(ke, e_shape)
    return out

  def forward_ctx(self, server: Server, task: int) -> Any:
    """Evaluation's: key matching."""
    return {'forced': jnp.zeros((self.top_k,), jnp.int32), 'force': jnp.float32(0.0)}

  def train_ctx(self, task: int) -> Any:
    """Local training's: task `task`'s own E-prompts while the pool has them."""
    start, stop = task * self.top_k, (task + 1) * self.top_k
    return {'forced': jnp.arange(start, stop, dtype=jnp.int32),
            'force': jnp.float32(stop <= self.pool_size)}

  def round_plan(self, server: Server, task: int, rnd: int, ids: np.ndarray) -> RoundPlan:
    """The default plan with training's forward ctx (`train_ctx`)."""
    return dataclasses.replace(super().round_plan(server, task, rnd, ids),
                               ctx=self.train_ctx(task))

"""RegMean of full LoRA deltas on a running full-rank server delta.

LoRA variant; the reference (fed-mammoth `regmean`) fine-tunes the whole ViT.

The server keeps one full kernel delta D per LoRA layer (in, out), carried
across tasks like the reference's single continually fine-tuned model (it has
no cross-task merge). Every round the clients train a fresh LoRA (a and b
together, b = 0 at the start) and the head on top of W0 + D; the Gram pass
runs through W0 + D + a_i b_i with the client's head; the server merges the
clients' full models by RegMean,
  D <- RegMean_i(D + a_i b_i) = D + G~^-1 sum_i G~_i a_i b_i,
  G~_i = alpha G_i + (1 - alpha) diag(G_i),  G~ = sum_i G~_i
(the rank-r products are never stacked over clients), the head weight by
RegMean with the head Gram and `alpha_head`, the head bias by the
sample-weighted mean, then redraws a fresh LoRA for the next round.
The evaluated model is W0 + D.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar
import functools

import jax
import jax.numpy as jnp

from lorm_jax import merge
from lorm_jax import rng
from lorm_jax.methods.interface import LocalSpec
from lorm_jax.methods.base import ClientResults, GramRequest, Method, Server
from lorm_jax.models import functional as F


@functools.partial(jax.jit, static_argnames=('alpha',))
def lowrank_regmean_system(a: F.Flat, b: F.Flat, grams: F.Flat, weights: jax.Array,
                           alpha: float) -> tuple[F.Flat, F.Flat]:
  """Per layer (sum_i w_i G~_i, sum_i w_i G~_i a_i b_i), without forming a_i b_i per client.

  a {layer: (C, in, r)}, b {layer: (C, r, out)}, grams {layer: (C, in) or (C, in, in)},
  weights (C,) (0 = absent; such clients are ignored even if non-finite).
  Returns ({layer: (in,) or (in, in)}, {layer: (in, out)}); diagonal when
  alpha = 0 or the Grams are diagonals.
  """
  present = weights > 0
  gsum, rhs = {}, {}
  for k in a:
    g = grams[k]                                     # (C, in) diagonals or (C, in, in)
    if g.ndim == 3:
      g = jax.vmap(lambda x: merge.regularize_gram(x, alpha))(g)  # (C, in, in), or (C, in) if alpha = 0
    wb = (slice(None),) + (None,) * (g.ndim - 1)
    g = jnp.where(present[wb], g * weights[wb], 0.0)
    ak = jnp.where(present[:, None, None], a[k], 0.0)
    bk = jnp.where(present[:, None, None], b[k], 0.0)
    ga = g[:, :, None] * ak if g.ndim == 2 else jnp.einsum('cij,cjr->cir', g, ak)
    gsum[k] = jnp.sum(g, axis=0)
    rhs[k] = jnp.einsum('cir,cro->io', ga, bk)
  return gsum, rhs


@dataclasses.dataclass
class FreshLoRAOnDelta(Method):
  """Clients train a fresh LoRA (a and b) and the head every round on top of
  W0 + D, a running full-size delta per layer (server['extra']['D'], (in, out))
  that the server's merge moves; clients download D. Not registered itself:
  `regmean` merges into D by RegMean, `ties` and `fedsum` by task vectors."""
  name: ClassVar[str] = 'fresh_lora_on_delta'

  def init_extra(self, params: F.Params) -> dict:
    return {'D': {k: jnp.zeros((params.a[k].shape[0], params.b[k].shape[1])) for k in params.a}}

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    c = self.config
    return LocalSpec(factors=('a', 'b'), lr_a=c.lr_a, lr_b=c.lr_b, lr_head=c.lr_head,
                     weight_decay=c.weight_decay)

  def train_deltas(self, server: Server, task: int) -> F.Flat:
    return server['extra']['D']


@dataclasses.dataclass
class RegMean(FreshLoRAOnDelta):
  name: ClassVar[str] = 'regmean'

  @property
  def backbone_gram_mode(self) -> str:
    return merge.gram_mode(self.config.alpha_backbone)

  def gram_request(self, task: int, rnd: int) -> GramRequest:
    return GramRequest(self.backbone_gram_mode, True)

  def gram_model(self, server: Server, task: int) -> tuple[F.Flat, float]:
    """W0 + D + a_i b_i."""
    return server['extra']['D'], 1.0

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    c = self.config
    present = (results.num_samples > 0).astype(jnp.float32)
    gsum, rhs = lowrank_regmean_system(results.a, results.b, results.grams, present,
                                       c.alpha_backbone)
    step, fd = merge.solve_psd_tree(gsum, rhs, ridge=c.ridge, return_info=True)
    d = {k: v + step[k] for k, v in server['extra']['D'].items()}
    kernel, fh = merge.regmean(results.head['kernel'], results.head_grams, c.alpha_head,
                               weights=present, ridge=c.ridge, return_info=True)
    bias = merge.fedavg(results.head['bias'], results.num_samples)
    a, b = F.init_lora(rng.key(c.seed, 'method', task, rnd + 1), server['a'], server['b'])
    server = {**server, 'a': a, 'b': b, 'head': {'kernel': kernel, 'bias': bias},
              'extra': {'D': d}}
    return server, {'merge_fallbacks': merge.fallback_count(fd) + merge.fallback_count(fh)}

  def eval_model(self, server: Server, task: int) -> tuple[F.Flat, F.Flat, F.Flat]:
    return server['extra']['D'], server['a'], jax.tree.map(jnp.zeros_like, server['b'])

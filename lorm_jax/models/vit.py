"""A Vision Transformer in Flax NNX with LoRA on its linear layers.

Pre-norm blocks, class token, learned position embeddings, optional
LayerScale: enough to host both the AugReg ViT-B/16 (the paper's backbone) and
the DINOv2-style ViT-S/14 (the embedded default).

Variable types split the model into separable pytrees:

  nnx.Param   the frozen backbone (W0, biases, norms, embeddings)
  LoraA       LoRA factor a, (in, r) per adapted layer
  LoraB       LoRA factor b, (r, out) per adapted layer
  HeadParam   the linear classifier (trained fully)
  GramStat    Gram statistics sown during a Gram pass (not parameters)

so `nnx.split(model, nnx.Param, LoraA, LoraB, HeadParam)` gives the frozen
part and the per-client trainable parts (the LoRA layer and its variable
types live in `lora.py`). All kernels use the Flax layout (in, out); the
adapted kernel is W0 + a @ b with no alpha/r scaling.

`ViTConfig.adapter` ('lora' | 'vera' | 'ia3') swaps LoRA for another adapter
on the same layers (`adapters.ADAPTERS`): VeRA keeps d in LoraA and b in
LoraB, with its frozen projections under `adapter_projections` (nnx.Param,
one pair per layer shape, shared by the layers); (IA)^3 keeps its vectors
in LoraB of qkv and fc2 and no LoraA.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lorm_jax import grams as grams_lib
from lorm_jax.models import adapters
from lorm_jax.models.lora import (GramMode, GramStat, LoRALinear, LoraA, LoraB,
                                  VeraProjection)


class HeadParam(nnx.Variable):
  """Classifier parameters (kernel (D, K), bias (K,))."""


class Prompting(NamedTuple):
  """Prompt inputs of one forward (prompt-based methods; all optional).

  tokens     (B, P, D) prompt tokens inserted after the class token
  token_pos  (P, D) position embeddings: [token_pos, pos_embed] is added to
             [cls, tokens, patches], the reference L2P network's order (the
             patches keep their own entries; the class token gets
             token_pos[0])
  prefixes   per block index, (key prefix (B, Lk, D), value prefix (B, Lv, D))
             concatenated to that block's attention keys and values
  pool       'cls': the class token's final-norm feature; 'cls_and_tokens':
             the mean over the class token and the P prompt tokens
  """
  tokens: jax.Array | None = None
  token_pos: jax.Array | None = None
  prefixes: dict[int, tuple[jax.Array, jax.Array]] | None = None
  pool: str = 'cls'


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a ViT; hashable so it can be a static jit argument."""
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 100
  lora_rank: int = 1
  layerscale: bool = False
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  dtype: str = 'float32'  # compute dtype of the backbone matmuls
  adapter: str = 'lora'   # lora | vera | ia3 (adapters.ADAPTERS)
  vera_rank: int = adapters.VERA_RANK  # VeRA's r (its projections' inner size)
  vera_seed: int = 0      # VeRA's projections are a function of (vera_seed, in, out, r)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid * self.grid + 1

  def validate(self) -> None:
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not a multiple of '
                       f'patch_size {self.patch_size}')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} not divisible by num_heads {self.num_heads}')
    if self.lora_rank < 1:
      raise ValueError(f'lora_rank must be >= 1, got {self.lora_rank}')
    adapters.get(self.adapter)
    if self.vera_rank < 1:
      raise ValueError(f'vera_rank must be >= 1, got {self.vera_rank}')

  @property
  def adapter_rank(self) -> int:
    """The rank the adapter's layers are built with (its `rank_field`)."""
    return getattr(self, adapters.get(self.adapter).rank_field)

  def layer_shapes(self) -> dict[str, tuple[int, int]]:
    """(in, out) of each block's adapted-layer kinds: qkv, proj, fc1, fc2."""
    return adapters.vit_layer_shapes(self.width, self.mlp_dim)


def architecture(name: str, **overrides) -> ViTConfig:
  """The ViTConfig of a registered backbone (`backbones.py`) with some fields
  set (image_size, num_classes, lora_rank, dtype, ...); unknown name -> ValueError."""
  from lorm_jax.models import backbones  # pylint: disable=import-outside-toplevel
  return ViTConfig(**{**backbones.get(name).architecture, **overrides})


def run_architecture(c, num_classes: int) -> ViTConfig:
  """The ViTConfig of a run's config c (an ml_collections ConfigDict):
  config.model's backbone, rank, dtype and adapter (VeRA's projections drawn
  from config.seed), at config.image_size with num_classes outputs."""
  model = c.model
  return architecture(model.name, image_size=c.image_size, num_classes=num_classes,
                      lora_rank=model.rank, dtype=model.dtype,
                      adapter=adapters.config_adapter(c),
                      vera_rank=getattr(model, 'vera_rank', adapters.VERA_RANK),
                      vera_seed=c.seed)


def lora_param_count(cfg: ViTConfig) -> int:
  """Trainable LoRA numbers: per block r * (in + out) for qkv, proj, fc1, fc2
  (`adapters.layer_stats`, the one count of every adapter's numbers)."""
  return adapters.vit_adapter_stats('lora', cfg.width, cfg.mlp_dim, cfg.depth,
                                    cfg.lora_rank)['model']['trained']


def head_param_count(cfg: ViTConfig) -> int:
  return cfg.width * cfg.num_classes + cfg.num_classes


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: jax.Array, approximate: bool) -> jax.Array:
  """`jax.nn.gelu`, whose backward pass multiplies by a derivative saved in the forward.

  Autodiff's backward evaluates erf (or tanh) again from the saved input, and
  XLA:CPU copies that chain into each fusion that consumes it; here the
  forward computes y and dy/dx together and the backward is one multiply
  (4% of a ViT-S/14 training step, docs/performance.md).
  """
  return jax.nn.gelu(x, approximate=approximate)


def _gelu_fwd(x, approximate):
  xf = x.astype(jnp.float32)
  if approximate:  # 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
    c = math.sqrt(2.0 / math.pi)
    t = jnp.tanh(c * (xf + 0.044715 * xf ** 3))
    y = 0.5 * xf * (1.0 + t)
    dy = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * xf * xf)
  else:            # x Phi(x); d/dx = Phi(x) + x phi(x)
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0))))
    y = xf * cdf
    dy = cdf + xf * jnp.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
  return y.astype(x.dtype), dy.astype(x.dtype)


def _gelu_bwd(approximate, dy, g):
  del approximate
  return (g * dy,)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def residual_boundary(x: jax.Array, guard: jax.Array) -> jax.Array:
  """Identity on the residual stream x; in the backward pass its cotangent
  becomes one materialised array.

  XLA:CPU fuses the residual stream's cotangent, a chain of additions through
  every later block, into each of its consumers instead of writing it once,
  so a step recomputed that chain for every layer (quadratic in depth: 28 ms
  of a 236 ms ViT-S/14 training step, docs/performance.md). A conditional is
  a fusion boundary (an optimization barrier is not: XLA:CPU expands it away
  before fusion). `guard` is a scalar of the frozen backbone, finite in any
  run that has a finite loss: the backward passes the cotangent through
  unchanged when the guard is finite and gives NaN otherwise, where the
  forward pass has already made every gradient NaN (a conditional with two
  identical branches would be simplified away).
  """
  del guard
  return x


def _boundary_fwd(x, guard):
  return x, guard


def _boundary_bwd(guard, g):
  g = jax.lax.cond(jnp.isfinite(guard), lambda t: t, lambda t: jnp.full_like(t, jnp.nan), g)
  return g, jnp.zeros_like(guard)


residual_boundary.defvjp(_boundary_fwd, _boundary_bwd)


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,)))
    self.bias = nnx.Param(jnp.zeros((dim,)))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


Projections = dict[tuple[int, int], tuple[VeraProjection, VeraProjection]]


def adapted_linear(cfg: ViTConfig, kind: str, rngs: nnx.Rngs,
                   projections: Projections | None = None) -> LoRALinear:
  """The block's `kind` layer ('qkv', 'proj', 'fc1', 'fc2') with cfg's adapter;
  projections: VeRA's shared pairs by layer shape (`ViT.__init__`)."""
  n, o = cfg.layer_shapes()[kind]
  return LoRALinear(n, o, cfg.adapter_rank, dtype=cfg.dtype, rngs=rngs, adapter=cfg.adapter,
                    kind=kind, projections=(projections or {}).get((n, o)))


class Attention(nnx.Module):
  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, projections: Projections | None = None):
    self.num_heads = cfg.num_heads
    self.dtype = cfg.dtype
    self.qkv = adapted_linear(cfg, 'qkv', rngs, projections)
    self.proj = adapted_linear(cfg, 'proj', rngs, projections)

  def __call__(self, x, gram_mode=None, sample_weights=None, prefix=None):
    """x (B, N, D); prefix: optional (key (B, Lk, D), value (B, Lv, D)) prepended
    to the keys and values (prefix tuning), split into heads like them."""
    b, n, d = x.shape
    h = self.num_heads
    qkv = self.qkv(x, gram_mode, sample_weights).reshape(b, n, 3, h, d // h)
    q, k, v = (qkv[:, :, i].astype(jnp.dtype(self.dtype)) for i in range(3))
    if prefix is not None:
      pk, pv = (p.reshape(b, p.shape[1], h, d // h).astype(q.dtype) for p in prefix)
      k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
    out = jax.lax.platform_dependent(q, k, v, cpu=_attention_image_major,
                                     default=_attention_head_major)
    return self.proj(out.reshape(b, n, d), gram_mode, sample_weights)


def _attention_image_major(q, k, v):
  """softmax(q k^T / sqrt(hd)) v for q (B, N, H, hd), k and v (B, Nk, H, hd) -> (B, N, H, hd),
  the products batched over (image, head)."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                      preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  attn = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', attn, v, preferred_element_type=jnp.float32)


def _attention_head_major(q, k, v):
  """`_attention_image_major` with the products batched over (head, image), in that order.

  The products' outputs are (H, B, ...), so the image and token axes of the attention
  output are adjacent and its transpose to (B N, D) rows is a 2-D transpose per head.
  XLA:GPU fuses that transpose into the projection's GEMM (and the cotangents' into the
  qkv GEMMs); batched over (image, head), the B N rows come from two axes with the head
  axes between them, and without autotuning (a deviceless compile) no row tile fits
  when N is prime: "Couldn't find output tile sizes" for ViT-B/16 at 224 px (N = 197).
  XLA:CPU runs these products with other kernels and other bits, so the CPU keeps
  `_attention_image_major` (`Attention.__call__`).
  """
  logits = jax.lax.dot_general(q, k, (((3,), (3,)), ((2, 0), (2, 0))),
                               preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  attn = jax.nn.softmax(logits, axis=-1).astype(q.dtype)             # (H, B, N, Nk)
  out = jax.lax.dot_general(v, attn, (((1,), (3,)), ((2, 0), (0, 1))),
                            preferred_element_type=jnp.float32)      # (H, B, hd, N)
  return out.transpose(1, 3, 0, 2)


class Mlp(nnx.Module):
  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, projections: Projections | None = None):
    self.fc1 = adapted_linear(cfg, 'fc1', rngs, projections)
    self.fc2 = adapted_linear(cfg, 'fc2', rngs, projections)
    self.approximate = cfg.gelu_approximate

  def __call__(self, x, gram_mode=None, sample_weights=None):
    x = gelu(self.fc1(x, gram_mode, sample_weights), self.approximate)
    return self.fc2(x, gram_mode, sample_weights)


class Block(nnx.Module):
  """Pre-norm transformer block: x + ls1*attn(ln1(x)); x + ls2*mlp(ln2(x))."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, projections: Projections | None = None):
    self.norm1 = LayerNorm(cfg.width, cfg.ln_eps)
    self.attn = Attention(cfg, rngs=rngs, projections=projections)
    self.norm2 = LayerNorm(cfg.width, cfg.ln_eps)
    self.mlp = Mlp(cfg, rngs=rngs, projections=projections)
    if cfg.layerscale:
      self.ls1 = nnx.Param(jnp.ones((cfg.width,)))
      self.ls2 = nnx.Param(jnp.ones((cfg.width,)))
    else:
      self.ls1 = self.ls2 = None

  def __call__(self, x, gram_mode=None, sample_weights=None, prefix=None):
    x = self._residual(x, self.attn(self.norm1(x), gram_mode, sample_weights, prefix), self.ls1)
    return self._residual(x, self.mlp(self.norm2(x), gram_mode, sample_weights), self.ls2)

  def _residual(self, x, y, layerscale):
    """x + layerscale * y, its cotangent kept one array (`residual_boundary`)."""
    y = y * layerscale[...] if layerscale is not None else y
    return residual_boundary(x + y, self.norm1.scale[...][0])


class Head(nnx.Module):
  """Linear classifier over all classes of the benchmark: kernel (D, K)."""

  def __init__(self, width: int, num_classes: int):
    self.kernel = HeadParam(jnp.zeros((width, num_classes)))
    self.bias = HeadParam(jnp.zeros((num_classes,)))

  def __call__(self, feats, collect_gram: bool = False, sample_weights=None):
    if collect_gram:
      self.gram = GramStat(grams_lib.gram_full(feats, sample_weights))
    return feats @ self.kernel[...] + self.bias[...]


class ViT(nnx.Module):
  """images (B, H, W, 3) float32 -> logits (B, num_classes).

  `gram_mode` ('diag' | 'full' | None) makes every LoRA layer sow the Gram of
  its input (all tokens, weighted per sample by `sample_weights`, e.g. a 0/1
  padding mask); `head_gram` sows the head input's full Gram.
  """

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    p, d = cfg.patch_size, cfg.width
    self.patch_kernel = nnx.Param(jax.random.normal(rngs.params(), (p, p, 3, d)) * 0.02)
    self.patch_bias = nnx.Param(jnp.zeros((d,)))
    self.cls_token = nnx.Param(jnp.zeros((1, 1, d)))
    self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (1, cfg.num_tokens, d)) * 0.02)
    projections = self._projections(cfg)
    self.blocks = nnx.List([Block(cfg, rngs=rngs, projections=projections)
                            for _ in range(cfg.depth)])
    self.norm = LayerNorm(d, cfg.ln_eps)
    self.head = Head(d, cfg.num_classes)

  def _projections(self, cfg: ViTConfig) -> Projections:
    """VeRA's frozen pairs, one per layer shape, drawn from cfg.vera_seed (none
    for the other adapters). They live here as `adapter_projections.{in}x{out}`
    and every layer of that shape holds the same variables, so the frozen dict
    has each pair once, under this name (it sorts before 'blocks')."""
    pairs = adapters.get(cfg.adapter).projections(cfg.layer_shapes().values(), cfg.vera_rank,
                                                  cfg.vera_seed)
    if not pairs:
      return {}
    out = {s: (VeraProjection(a), VeraProjection(b)) for s, (a, b) in pairs.items()}
    self.adapter_projections = nnx.Dict({f'{n}x{o}': nnx.Dict({'a': a, 'b': b})
                                         for (n, o), (a, b) in out.items()})
    return out

  def embed(self, images: jax.Array, prompting: Prompting | None = None) -> jax.Array:
    """(B, H, W, 3) -> tokens (B, 1 [+ P] + grid^2, D): patchify as a matmul."""
    cfg = self.cfg
    b, hgt, wid, c = images.shape
    if hgt != cfg.image_size or wid != cfg.image_size:
      raise ValueError(f'expected {cfg.image_size}x{cfg.image_size} images, got {hgt}x{wid}')
    p, g = cfg.patch_size, cfg.grid
    x = images.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)
    x = x @ self.patch_kernel[...].reshape(p * p * c, cfg.width) + self.patch_bias[...]
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.width))
    if prompting is None or prompting.tokens is None:
      return jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
    pos = jnp.concatenate([prompting.token_pos[None], self.pos_embed[...]], axis=1)
    return jnp.concatenate([cls, prompting.tokens.astype(x.dtype), x], axis=1) + pos

  def features(self, images: jax.Array, gram_mode: GramMode = None,
               sample_weights: jax.Array | None = None,
               prompting: Prompting | None = None) -> jax.Array:
    """Final-norm features (B, D): the class token's, or as `prompting.pool` says."""
    x = self.embed(images, prompting)
    prefixes = (prompting.prefixes or {}) if prompting is not None else {}
    for i, block in enumerate(self.blocks):
      x = block(x, gram_mode, sample_weights, prefixes.get(i))
    x = self.norm(x)
    if prompting is not None and prompting.pool == 'cls_and_tokens':
      return jnp.mean(x[:, :1 + prompting.tokens.shape[1]], axis=1)
    return x[:, 0]

  def __call__(self, images: jax.Array, gram_mode: GramMode = None,
               head_gram: bool = False, sample_weights: jax.Array | None = None) -> jax.Array:
    feats = self.features(images, gram_mode, sample_weights)
    return self.head(feats, head_gram, sample_weights)


def split_model(model: ViT):
  """-> (graphdef, frozen, lora_a, lora_b, head) states."""
  return nnx.split(model, nnx.Param, LoraA, LoraB, HeadParam)

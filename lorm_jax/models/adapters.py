"""Pure maths of the VeRA and (IA)^3 adapters (docs/merging.md), Flax layout.

A kernel is (in, out) and y = x @ W + bias. No NNX here: the model calls
these functions, the server merges with `lorm_jax.merge_adapters`.

VeRA (Kopiczko et al., ICLR 2024): dW = A diag(d) B diag(b), i.e.
  delta(x) = ((x @ A) * d) @ B * b,
with A (in, r), B (r, out) frozen random projections shared by every layer
of one shape (regenerated from a seed, never trained nor sent) and trained
vectors d (r,), b (out,). Init as the reference release (PEFT): A, B
Kaiming-uniform with a = sqrt(5) on torch's (r, in) and (out, r), i.e.
A ~ U(+-1/sqrt(in)), B ~ U(+-1/sqrt(r)); b = 0; d = d_init (0.1). PEFT draws
one pair of the largest shape and slices it per layer; here each layer shape
(in, out) gets its own pair from (seed, in, out).

(IA)^3 (Liu et al., NeurIPS 2022) on a ViT block: l_k and l_v scale the key
and value outputs of the fused qkv layer, i.e. the columns D:2D and 2D:3D of
its (D, 3D) kernel (q's columns stay at 1); l_ff scales the MLP hidden
activation after GELU, i.e. the input rows of fc2: W_fc2' = diag(l_ff) W_fc2.
proj and fc1 are not adapted. The biases are frozen and NOT scaled: qkv's
output is (x @ W0) * s + bias with s = [1, l_k, l_v] (T5, the paper's model,
has no biases; keeping them out makes every adapter a kernel update dW that
LoRM's input Grams match exactly; docs/merging.md, "the bias"). All vectors
start at 1 (the adapted layer starts as W0).

`ADAPTERS` (the end of this file) is the one table that says, per adapter,
everything the model, the clients and the server do differently: which
layers it adapts, the layer's initial vectors and forward, a new task's
vectors, the dense update dW, the constants the server's merges read, and
which closed-form merge (`lorm_jax.merge` for LoRA, `lorm_jax.merge_adapters`
for VeRA and (IA)^3) merges each trained slot. `config.model.adapter` picks
the row (`for_config`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Iterable, Literal

import jax
import jax.numpy as jnp

from lorm_jax import merge as merge_lib
from lorm_jax import merge_adapters

Adapter = Literal['lora', 'vera', 'ia3']
LAYERS = ('qkv', 'proj', 'fc1', 'fc2')
VERA_RANK = 256
VERA_D_INIT = 0.1
_F32 = jnp.float32

# ------------------------------------------------------------------- VeRA


def vera_projections(seed: int, in_features: int, out_features: int,
                     rank: int = VERA_RANK) -> tuple[jax.Array, jax.Array]:
  """The frozen pair of one layer shape: A (in, r) ~ U(+-1/sqrt(in)),
  B (r, out) ~ U(+-1/sqrt(r)), float32, a function of (seed, in, out, r) only.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), in_features),
                           out_features)
  ka, kb = jax.random.split(key)
  ba, bb = 1.0 / math.sqrt(in_features), 1.0 / math.sqrt(rank)
  a = jax.random.uniform(ka, (in_features, rank), _F32, -ba, ba)
  b = jax.random.uniform(kb, (rank, out_features), _F32, -bb, bb)
  return a, b


def vera_init(rank: int, out_features: int, d_init: float = VERA_D_INIT
              ) -> tuple[jax.Array, jax.Array]:
  """Trained vectors at the start: d = d_init (r,), b = 0 (out,), so dW = 0."""
  return jnp.full((rank,), d_init, _F32), jnp.zeros((out_features,), _F32)


def vera_delta(a: jax.Array, b_proj: jax.Array, d: jax.Array, b: jax.Array) -> jax.Array:
  """dW = A diag(d) B diag(b): a (in, r), b_proj (r, out), d (r,), b (out,) -> (in, out)."""
  return ((a * d[None, :]) @ b_proj) * b[None, :]


def vera_apply(x: jax.Array, a: jax.Array, b_proj: jax.Array, d: jax.Array,
               b: jax.Array) -> jax.Array:
  """delta(x) = ((x @ A) * d) @ B * b: x (..., in) -> (..., out), summed in float32.

  x @ vera_delta(...) without forming the (in, out) matrix: (in + out) r per
  token instead of in * out once plus in * out per token.
  """
  low = jnp.dot(x, a.astype(x.dtype), preferred_element_type=_F32) * d
  return jnp.dot(low.astype(b_proj.dtype), b_proj, preferred_element_type=_F32) * b


# ----------------------------------------------------------------- (IA)^3


def ia3_qkv_scale(l_k: jax.Array, l_v: jax.Array) -> jax.Array:
  """The (3D,) column scaling of the fused qkv kernel: [1 (q), l_k, l_v]."""
  return jnp.concatenate([jnp.ones_like(l_k), l_k, l_v])


def ia3_init(dim: int) -> jax.Array:
  """A fresh (IA)^3 vector: ones (dim,)."""
  return jnp.ones((dim,), _F32)


def ia3_scale_columns(kernel: jax.Array, s: jax.Array) -> jax.Array:
  """W diag(s): kernel (in, out), s (out,) -> (in, out)."""
  return kernel * s[None, :]


def ia3_scale_rows(kernel: jax.Array, l: jax.Array) -> jax.Array:
  """diag(l) W: kernel (in, out), l (in,) -> (in, out)."""
  return l[:, None] * kernel


def ia3_delta_columns(kernel: jax.Array, s: jax.Array) -> jax.Array:
  """dW = W0 diag(s - 1), (in, out): the update the cross-task merge keeps."""
  return kernel * (s - 1.0)[None, :]


def ia3_delta_rows(kernel: jax.Array, l: jax.Array) -> jax.Array:
  """dW = diag(l - 1) W0, (in, out)."""
  return (l - 1.0)[:, None] * kernel


def ia3_apply_columns(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                      s: jax.Array) -> jax.Array:
  """(x @ W0) * s + bias: x (..., in) -> (..., out); the bias is not scaled."""
  return jnp.dot(x, kernel, preferred_element_type=_F32) * s + bias


def ia3_apply_rows(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                   l: jax.Array) -> jax.Array:
  """(x * l) @ W0 + bias = x @ (diag(l) W0) + bias: x (..., in) -> (..., out)."""
  return jnp.dot(x * l.astype(x.dtype), kernel, preferred_element_type=_F32) + bias


# ------------------------------------------------------- sizes and counts


def vit_layer_shapes(width: int, mlp_dim: int) -> dict[str, tuple[int, int]]:
  """(in, out) of the four adapted layers of a block (D = width, M = mlp_dim)."""
  return {'qkv': (width, 3 * width), 'proj': (width, width),
          'fc1': (width, mlp_dim), 'fc2': (mlp_dim, width)}


def layer_stats(adapter: Adapter, layer: str, in_features: int, out_features: int,
                rank: int) -> dict[str, int]:
  """Per-layer counts of float32 numbers (bytes = 4 x) for one adapter.

  trained      numbers trained per layer (0: the layer is not adapted)
  upload_1     the vector/factor a client uploads in the rounds that start a
               task (LoRA: B, r * out; VeRA: b, out; (IA)^3: all of it)
  upload_2     the same in the alternate rounds (LoRA: A, in * r; VeRA: d, r;
               (IA)^3: all of it)
  gram_diag    the Gram diagonal, exact for alpha = 0 (what LoRM sends)
  gram_full    the full Gram, in * in as the Gram pass makes it
  sufficient   the smallest statistic that makes the merge exact for any alpha
               (symmetric matrices counted by their distinct entries, n (n + 1)
               / 2): LoRA's B-round and VeRA's d-round need H_i = a^T G~_i a
               (r (r + 1) / 2), LoRA's A-round needs G~_i;
               VeRA's b-round needs s_ij = e_j^T H_i e_j (out); (IA)^3 columns
               s_ij = w_j^T G~_i w_j (one per scaled column); (IA)^3 rows G~_i.
               (max over the rounds of a layer)
  """
  n, o, r = in_features, out_features, rank
  full, sym = n * n, n * (n + 1) // 2
  if adapter == 'lora':
    return dict(trained=r * (n + o), upload_1=r * o, upload_2=n * r, gram_diag=n,
                gram_full=full, sufficient=sym)
  if adapter == 'vera':
    return dict(trained=r + o, upload_1=o, upload_2=r, gram_diag=n, gram_full=full,
                sufficient=max(o, min(r * (r + 1) // 2, sym)))
  if adapter == 'ia3':
    if layer == 'qkv':  # l_k, l_v scale 2 D of the 3 D columns
      cols = 2 * o // 3
      return dict(trained=cols, upload_1=cols, upload_2=cols, gram_diag=n, gram_full=full,
                  sufficient=cols)
    if layer == 'fc2':
      return dict(trained=n, upload_1=n, upload_2=n, gram_diag=n, gram_full=full,
                  sufficient=sym)
    return dict(trained=0, upload_1=0, upload_2=0, gram_diag=0, gram_full=0, sufficient=0)
  raise ValueError(f'unknown adapter {adapter!r}')


def vit_adapter_stats(adapter: Adapter, width: int, mlp_dim: int, depth: int,
                      rank: int) -> dict[str, dict[str, int]]:
  """`layer_stats` of every layer kind of a block, plus 'model' = depth x their
  sum (the 'sufficient' of the model adds each layer's largest round; the
  Grams are per round, and again per task for the cross-task merge)."""
  per = {name: layer_stats(adapter, name, n, o, rank)
         for name, (n, o) in vit_layer_shapes(width, mlp_dim).items()}
  keys = next(iter(per.values())).keys()
  per['model'] = {k: depth * sum(p[k] for p in per.values()) for k in keys}
  return per


# ------------------------------------------------------- the adapter table

Flat = dict[str, jax.Array]
# The ViT attribute that holds VeRA's frozen pairs, one per layer shape; the
# frozen dict keys them 'adapter_projections.{in}x{out}.a' (in, r) and '.b'
# (r, out) (the layers share these variables; `projection_keys`).
PROJECTIONS = 'adapter_projections'


def layer_kind(layer: str) -> str:
  """The kind of a layer key: 'blocks.3.attn.qkv' -> 'qkv'."""
  return layer.rsplit('.', 1)[-1]


def projection_keys(in_features: int, out_features: int) -> tuple[str, str]:
  """The frozen-dict keys of the VeRA pair of one layer shape (in, out)."""
  base = f'{PROJECTIONS}.{in_features}x{out_features}'
  return base + '.a', base + '.b'


def _kernel_shape(frozen: Flat, layer: str) -> tuple[int, int]:
  return tuple(frozen[layer + '.kernel'].shape)


class AdapterSpec:
  """One adapter, as the model, the clients and the server see it.

  The base class is LoRA where the others share its behaviour. Flat dicts
  are keyed by layer ('blocks.0.attn.qkv'); 'a' and 'b' are the server's
  two slots of trained values (LoRA: a (in, r), b (r, out); VeRA: d (r,),
  b (out,); (IA)^3: b only).

  name        config.model.adapter
  kinds       the block layers it adapts (of LAYERS); the others are plain W0
  factors     the slots that hold trained values
  alternates  LoRM trains one slot per round (config.schedule) when True,
              every slot every round when False
  rank_field  the ViTConfig field that gives its rank
  """
  name: ClassVar[str] = ''
  kinds: ClassVar[tuple[str, ...]] = LAYERS
  factors: ClassVar[tuple[str, ...]] = ('a', 'b')
  alternates: ClassVar[bool] = True
  rank_field: ClassVar[str] = 'lora_rank'

  # -- the model --------------------------------------------------------
  def projections(self, shapes: Iterable[tuple[int, int]], rank: int, seed: int
                  ) -> dict[tuple[int, int], tuple[jax.Array, jax.Array]]:
    """Frozen constants per layer shape (in, out): VeRA's (A, B); none here."""
    return {}

  def layer_init(self, kind: str, n: int, o: int, rank: int, key: jax.Array
                 ) -> tuple[jax.Array | None, jax.Array | None]:
    """A layer's initial (a, b) for kernel (n, o); None: no such variable."""
    bound = 1.0 / math.sqrt(n)
    return (jax.random.uniform(key, (n, rank), minval=-bound, maxval=bound),
            jnp.zeros((rank, o)))

  def forward(self, kind: str, x: jax.Array, dot: Callable, low_rank: Callable,
              a: jax.Array | None, b: jax.Array | None, proj: tuple | None) -> jax.Array:
    """x (..., n) -> x @ W (..., o) without the bias, float32. dot(x) = x @ W0
    and low_rank(x, a (n, k), b (k, o)) = (x @ a) @ b in the layer's compute
    dtype; proj = (A, B) for VeRA."""
    return dot(x) + low_rank(x, a, b)

  # -- the server -------------------------------------------------------
  def fresh(self, key: jax.Array, a: Flat, b: Flat) -> tuple[Flat, Flat]:
    """A new task's (a, b) of the same shapes: a ~ U(+-1/sqrt(in)) per layer
    (key folded by the layer's index in sorted order), b = 0."""
    new_a = {}
    for i, name in enumerate(sorted(a)):
      x = a[name]
      bound = 1.0 / jnp.sqrt(x.shape[0])
      new_a[name] = jax.random.uniform(jax.random.fold_in(key, i), x.shape, x.dtype, -bound,
                                       bound)
    return new_a, {k: jnp.zeros_like(v) for k, v in b.items()}

  def neutral_b(self, b: Flat) -> Flat:
    """The b that makes every layer's update zero, whatever a."""
    return jax.tree.map(jnp.zeros_like, b)

  def scale_b(self, b: Flat, s: float) -> Flat:
    """The b that makes every layer's update s times b's (a unchanged)."""
    return jax.tree.map(lambda x: x * s, b)

  def trained(self, factors: tuple[str, ...]) -> tuple[str, ...]:
    """The slots of `factors` that hold trained values for this adapter."""
    return tuple(f for f in factors if f in self.factors)

  def update_shapes(self, a: Flat, b: Flat, frozen: Flat) -> dict[str, tuple[int, int]]:
    """{layer: (in, out)} of every adapted layer's dense update."""
    return {k: (a[k].shape[0], b[k].shape[1]) for k in a}

  def server_constants(self, frozen: Flat, layers: Iterable[str]) -> Any:
    """What the server's merges and dense updates read of the frozen
    backbone (kept in the method's extra state), or None: nothing."""
    return None

  def deltas(self, consts: Any, a: Flat, b: Flat) -> Flat:
    """{layer: dW (in, out)} of the adapter values a, b."""
    return {k: a[k] @ b[k] for k in a}

  def merge(self, factor: str, clients_a: Flat, clients_b: Flat, a: Flat, b: Flat,
            consts: Any, grams: Flat, alpha: float, weights: jax.Array, ridge: float
            ) -> tuple[Flat, Flat, jax.Array]:
    """LoRM's closed-form server merge of the clients' trained slot(s):
    clients_* leaves (C, ...), a and b the server's, grams (C, in[, in]),
    weights (C,). -> (a, b, fallback count)."""
    if factor == 'a':
      a, info = merge_lib.merge_a_tree(clients_a, grams, alpha, weights=weights, ridge=ridge,
                                       return_info=True)
    else:
      b, info = merge_lib.merge_b_tree(clients_b, a, grams, alpha, weights=weights,
                                       ridge=ridge, return_info=True)
    return a, b, merge_lib.fallback_count(info)


class _LoRA(AdapterSpec):
  """y = x @ (W0 + a b) + bias on qkv, proj, fc1 and fc2."""
  name = 'lora'


class _VeRA(AdapterSpec):
  """y = x @ (W0 + A diag(d) B diag(b)) + bias; 'a' holds d (r,), 'b' holds b (out,);
  A, B frozen per layer shape from (vera_seed, in, out, r)."""
  name = 'vera'
  rank_field = 'vera_rank'

  def projections(self, shapes, rank, seed):
    return {s: vera_projections(seed, s[0], s[1], rank) for s in dict.fromkeys(shapes)}

  def layer_init(self, kind, n, o, rank, key):
    return vera_init(rank, o)

  def forward(self, kind, x, dot, low_rank, a, b, proj):
    """x @ W0 + (x @ (A diag(d))) @ (B diag(b)): `vera_apply` through the
    layer's low-rank product (its written-out backward)."""
    pa, pb = proj
    return dot(x) + low_rank(x, pa * a[None, :], pb * b[None, :])

  def fresh(self, key, a, b):
    """d = 0.1, b = 0 (`vera_init`); the key is unused."""
    return ({k: jnp.full_like(v, VERA_D_INIT) for k, v in a.items()},
            {k: jnp.zeros_like(v) for k, v in b.items()})

  def update_shapes(self, a, b, frozen):
    return {k: _kernel_shape(frozen, k) for k in b}

  def server_constants(self, frozen, layers):
    """{kind: {'a': A, 'b': B}}: the pair of each layer kind (one shape each)."""
    out = {}
    for layer in layers:
      ka, kb = projection_keys(*_kernel_shape(frozen, layer))
      out.setdefault(layer_kind(layer), {'a': frozen[ka], 'b': frozen[kb]})
    return out

  def deltas(self, consts, a, b):
    return {k: vera_delta(consts[layer_kind(k)]['a'], consts[layer_kind(k)]['b'], a[k], b[k])
            for k in b}

  def merge(self, factor, clients_a, clients_b, a, b, consts, grams, alpha, weights, ridge):
    """b-rounds: `vera_merge_b` with d fixed; d-rounds ('a'): `vera_merge_d` with b fixed."""
    pa = {k: consts[layer_kind(k)]['a'] for k in b}
    pb = {k: consts[layer_kind(k)]['b'] for k in b}
    if factor == 'a':
      a, info = merge_adapters.vera_merge_d_tree(clients_a, b, pa, pb, grams, alpha,
                                                 weights=weights, ridge=ridge, return_info=True)
    else:
      b, info = merge_adapters.vera_merge_b_tree(clients_b, a, pa, pb, grams, alpha,
                                                 weights=weights, ridge=ridge, return_info=True)
    return a, b, merge_lib.fallback_count(info)


# (IA)^3's layers and what its vector scales there: qkv's output columns D:3D
# (l_k, l_v), fc2's input rows (l_ff).
_IA3_SCALES = {'qkv': 'columns', 'fc2': 'rows'}


class _IA3(AdapterSpec):
  """qkv: y = (x @ W0) * [1, l_k, l_v] + bias; fc2: y = (x * l_ff) @ W0 + bias;
  proj and fc1 plain. 'b' holds [l_k, l_v] (2D,) and l_ff (M,); 'a' is empty.
  Every vector is trained every round (no two vectors share a layer's update)."""
  name = 'ia3'
  kinds = tuple(_IA3_SCALES)
  factors = ('b',)
  alternates = False

  def layer_init(self, kind, n, o, rank, key):
    scale = _IA3_SCALES.get(kind)
    if scale is None:
      return None, None
    return None, ia3_init(o - n if scale == 'columns' else n)

  def forward(self, kind, x, dot, low_rank, a, b, proj):
    scale = _IA3_SCALES.get(kind)
    if scale == 'columns':
      half = b.shape[0] // 2
      return dot(x) * ia3_qkv_scale(b[:half], b[half:])
    if scale == 'rows':
      return dot(x * b.astype(x.dtype))
    return dot(x)

  def fresh(self, key, a, b):
    """Every vector 1; the key is unused."""
    return dict(a), {k: jnp.ones_like(v) for k, v in b.items()}

  def neutral_b(self, b):
    return jax.tree.map(jnp.ones_like, b)

  def scale_b(self, b, s):
    return jax.tree.map(lambda x: 1.0 + (x - 1.0) * s, b)

  def update_shapes(self, a, b, frozen):
    return {k: _kernel_shape(frozen, k) for k in b}

  def server_constants(self, frozen, layers):
    """{layer: the frozen kernel part its vector scales}: qkv's columns D:3D
    (D, 2D), fc2's whole kernel (M, D)."""
    out = {}
    for layer in layers:
      w = frozen[layer + '.kernel']
      out[layer] = w[:, w.shape[0]:] if _IA3_SCALES[layer_kind(layer)] == 'columns' else w
    return out

  def deltas(self, consts, a, b):
    out = {}
    for k, v in b.items():
      w = consts[k]
      if _IA3_SCALES[layer_kind(k)] == 'columns':  # q's columns: no update
        out[k] = jnp.concatenate([jnp.zeros((w.shape[0], w.shape[0]), w.dtype),
                                  ia3_delta_columns(w, v)], axis=1)
      else:
        out[k] = ia3_delta_rows(w, v)
    return out

  def merge(self, factor, clients_a, clients_b, a, b, consts, grams, alpha, weights, ridge):
    """`ia3_merge_columns` on qkv's [l_k, l_v], `ia3_merge_rows` on fc2's l_ff."""
    fns = {'columns': merge_adapters.ia3_merge_columns_tree,
           'rows': merge_adapters.ia3_merge_rows_tree}
    new_b, fallbacks = dict(b), jnp.int32(0)
    for scale, fn in fns.items():
      keys = [k for k in clients_b if _IA3_SCALES[layer_kind(k)] == scale]
      if keys:
        merged, info = fn({k: clients_b[k] for k in keys}, {k: consts[k] for k in keys},
                          {k: grams[k] for k in keys}, alpha, weights=weights, ridge=ridge,
                          return_info=True)
        new_b.update(merged)
        fallbacks = fallbacks + merge_lib.fallback_count(info)
    return a, new_b, fallbacks


ADAPTERS: dict[str, AdapterSpec] = {s.name: s for s in (_LoRA(), _VeRA(), _IA3())}


def get(name: str) -> AdapterSpec:
  """The row of `name`; ValueError (one line) naming the known ones."""
  if name not in ADAPTERS:
    raise ValueError(f'unknown model.adapter {name!r}; expected one of '
                     f'{", ".join(ADAPTERS)}')
  return ADAPTERS[name]


def config_adapter(config: Any) -> str:
  """config.model.adapter, 'lora' where a config has none (older runs)."""
  return getattr(getattr(config, 'model', None), 'adapter', 'lora')


def for_config(config: Any) -> AdapterSpec:
  return get(config_adapter(config))


def supported(method_cls: type) -> tuple[str, ...]:
  """The adapters a method class declares in its own body (`adapters = (...)`);
  ('lora',) when it declares none. Not inherited: a subclass that changes how
  a method merges or forms updates supports LoRA until it says otherwise."""
  return vars(method_cls).get('adapters', ('lora',))


def check_config(config: Any, method_cls: type) -> None:
  """Raises ValueError (one line) for an unknown config.model.adapter, one the
  method does not support, or a VeRA rank below 1."""
  name = config_adapter(config)
  get(name)
  ok = supported(method_cls)
  if name not in ok:
    raise ValueError(f'method {method_cls.name} supports model.adapter '
                     f'{" | ".join(ok)}, not {name!r}')
  rank = getattr(getattr(config, 'model', None), 'vera_rank', VERA_RANK)
  if name == 'vera' and not (isinstance(rank, int) and rank >= 1):
    raise ValueError(f'model.vera_rank must be an integer >= 1, got {rank!r}')

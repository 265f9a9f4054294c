"""Model-level properties of the NNX ViT: LoRA algebra, parameter counts,
position-embedding resampling, Gram sowing, bf16 compute."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lorm_jax.models import functional as F
from lorm_jax.models import lora, npz, posemb
from lorm_jax.models import vit

CFG = vit.ViTConfig(image_size=32, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32,
                    num_classes=5, lora_rank=2, layerscale=True)


def _build(cfg: vit.ViTConfig = CFG, seed: int = 0) -> vit.ViT:
  """A ViT with random, well-scaled values everywhere (b = 0), built with
  nnx.eval_shape plus numpy so no per-shape init kernels get compiled.
  kernels ~ N(0, 1/in), LayerNorm scale ~ 1 + N(0, 0.1^2), LayerScale ~ U(0.5, 1),
  a ~ U(-1/sqrt(in), 1/sqrt(in)), b = 0, head ~ N(0, 0.1^2)."""
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Variable):
      continue
    shape, name = node.get_value().shape, str(path[-1])
    if isinstance(node, vit.LoraB):
      val = np.zeros(shape)
    elif isinstance(node, vit.LoraA):
      val = rng.uniform(-1, 1, shape) / math.sqrt(shape[0])
    elif name == 'scale':
      val = 1 + 0.1 * rng.standard_normal(shape)
    elif name in ('ls1', 'ls2'):
      val = rng.uniform(0.5, 1.0, shape)
    elif name == 'kernel' and len(shape) == 2:
      val = rng.standard_normal(shape) / math.sqrt(shape[0])
    elif name == 'patch_kernel':
      val = rng.standard_normal(shape) / math.sqrt(np.prod(shape[:3]))
    else:
      val = 0.1 * rng.standard_normal(shape)
    node.set_value(jnp.asarray(val, jnp.float32))
  return model


def _images(n: int = 3, seed: int = 1, size: int = 32) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, size, size, 3)), jnp.float32)


@nnx.jit
def _logits(model: vit.ViT, images: jax.Array) -> jax.Array:
  return model(images)


@nnx.jit
def _features(model: vit.ViT, images: jax.Array) -> jax.Array:
  return model.features(images)


def _lora_layers(model: vit.ViT) -> list[vit.LoRALinear]:
  return [n for _, n in nnx.iter_graph(model) if isinstance(n, vit.LoRALinear)]


def test_fresh_lora_layer_is_the_base_layer():
  layer = vit.LoRALinear(6, 4, 2, dtype='float32', rngs=nnx.Rngs(0))
  assert np.all(np.asarray(layer.lora_b.get_value()) == 0)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 6)), jnp.float32)
  want = x @ layer.kernel.get_value() + layer.bias.get_value()
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(want))


def test_lora_with_zero_b_reproduces_base_model_exactly():
  model = _build()
  x = _images()
  out = np.asarray(_logits(model, x))
  rng = np.random.default_rng(5)
  for layer in _lora_layers(model):  # another a, still b = 0
    layer.lora_a.set_value(jnp.asarray(rng.standard_normal(layer.lora_a.get_value().shape) * 3,
                                       jnp.float32))
  np.testing.assert_array_equal(np.asarray(_logits(model, x)), out)
  for layer in _lora_layers(model):  # no LoRA at all
    layer.lora_a.set_value(jnp.zeros_like(layer.lora_a.get_value()))
  np.testing.assert_array_equal(np.asarray(_logits(model, x)), out)


def test_lora_equals_merged_kernel():
  model = _build()
  rng = np.random.default_rng(7)
  for layer in _lora_layers(model):
    a, b = layer.lora_a.get_value(), layer.lora_b.get_value()
    layer.lora_a.set_value(jnp.asarray(rng.standard_normal(a.shape) / math.sqrt(a.shape[0]),
                                       jnp.float32))
    layer.lora_b.set_value(jnp.asarray(rng.standard_normal(b.shape) * 0.3, jnp.float32))
  x = _images()
  out = np.asarray(_logits(model, x))
  merged = _build()
  nnx.update(merged, nnx.state(model))
  for layer in _lora_layers(merged):
    w = np.asarray(layer.kernel.get_value(), np.float64)
    ab = np.asarray(layer.lora_a.get_value(), np.float64) @ np.asarray(layer.lora_b.get_value(),
                                                                       np.float64)
    layer.kernel.set_value(jnp.asarray(w + ab, jnp.float32))
    layer.lora_a.set_value(jnp.zeros_like(layer.lora_a.get_value()))
    layer.lora_b.set_value(jnp.zeros_like(layer.lora_b.get_value()))
  base = _build()  # the LoRA update must matter, or this test proves nothing
  nnx.update(base, nnx.state(merged))
  ref = np.asarray(_logits(merged, x))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for layer, src in zip(_lora_layers(base), _lora_layers(model)):
    layer.kernel.set_value(src.kernel.get_value())
  assert np.abs(np.asarray(_logits(base, x)) - out).max() > 1e-2


@pytest.mark.parametrize('cfg', [
    CFG,
    vit.architecture('dinov2_s14', num_classes=100, lora_rank=4),
    vit.architecture('augreg_b16', num_classes=200, lora_rank=1),
], ids=['tiny', 's14', 'b16'])
def test_trainable_parameter_counts(cfg):
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  def count(kind):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, kind)))
  assert count(vit.LoraA) + count(vit.LoraB) == vit.lora_param_count(cfg)
  assert count(vit.HeadParam) == vit.head_param_count(cfg) == cfg.width * cfg.num_classes + cfg.num_classes
  shapes = {k: tuple(v.get_value().shape) for k, v in
            ((('.'.join(map(str, p))), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))}
  assert shapes == npz.expected_shapes(cfg)


@pytest.mark.parametrize('method', posemb.POSEMB_METHODS)
def test_posemb_resample_round_trip(method):
  rng = np.random.default_rng(0)
  pos = rng.standard_normal((1, 1 + 4 * 4, 6)).astype(np.float32)
  up = posemb.resample_posemb(pos, 7, method)
  assert up.shape == (1, 1 + 7 * 7, 6)
  back = posemb.resample_posemb(up, 4, method)
  assert back.shape == pos.shape
  np.testing.assert_array_equal(up[:, 0], pos[:, 0])
  np.testing.assert_array_equal(back[:, 0], pos[:, 0])
  np.testing.assert_array_equal(posemb.resample_posemb(pos, 4, method), pos)  # same grid: identity
  const = np.concatenate([pos[:, :1], np.full((1, 16, 6), 0.25, np.float32)], axis=1)
  np.testing.assert_allclose(posemb.resample_posemb(const, 9, method)[:, 1:], 0.25, atol=1e-5)
  with pytest.raises(ValueError, match='not a square grid'):
    posemb.resample_posemb(pos[:, :-1], 3, method)
  with pytest.raises(ValueError, match='unknown posemb resample method'):
    posemb.resample_posemb(pos, 7, 'lanczos')


@nnx.jit
def _gram_pass_full(model, images, weights):
  model(images, gram_mode='full', head_gram=True, sample_weights=weights)


@nnx.jit
def _gram_pass_diag(model, images, weights):
  model(images, gram_mode='diag', sample_weights=weights)


@nnx.jit
def _layer_inputs(model, images):
  """Inputs of block 0's qkv, fc1 and fc2 layers by a manual forward."""
  blk = model.blocks[0]
  x0 = model.embed(images)
  qkv_in = blk.norm1(x0)
  x1 = x0 + blk.attn(qkv_in) * blk.ls1[...]
  fc1_in = blk.norm2(x1)
  fc2_in = jax.nn.gelu(blk.mlp.fc1(fc1_in), approximate=model.cfg.gelu_approximate)
  return qkv_in, fc1_in, fc2_in, model.features(images)


def _np_gram(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """sum_b w_b X_b^T X_b, X_b the (tokens, in) rows of sample b, in float64."""
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1, x.shape[-1])
  return np.einsum('b,bni,bnj->ij', w.astype(np.float64), x, x)


def test_gram_sow_matches_numpy():
  model = _build()
  x = _images(3)
  w = np.array([1.0, 0.0, 1.0], np.float32)  # a padding mask: sample 1 is padding
  qkv_in, fc1_in, fc2_in, feats = (np.asarray(a) for a in _layer_inputs(model, x))
  _gram_pass_full(model, x, jnp.asarray(w))
  grams = {'.'.join(map(str, p[:-1])): v.get_value()
           for p, v in nnx.to_flat_state(nnx.pop(model, vit.GramStat))}
  assert set(grams) == {f'blocks.{i}.{l}' for i in range(2)
                        for l in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')} | {'head'}
  for name, inp in [('blocks.0.attn.qkv', qkv_in), ('blocks.0.mlp.fc1', fc1_in),
                    ('blocks.0.mlp.fc2', fc2_in), ('head', feats)]:
    g = grams[name]  # the layer's GramStat holds the pass's Gram
    ref = _np_gram(inp, w)
    assert g.shape == ref.shape
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())
  # the padding sample must not contribute
  np.testing.assert_allclose(np.asarray(grams['blocks.0.mlp.fc1']),
                             _np_gram(fc1_in[[0, 2]], w[[0, 2]]), rtol=1e-4, atol=1e-3)
  _gram_pass_diag(model, x, jnp.asarray(w))
  diags = {'.'.join(map(str, p[:-1])): v.get_value()
           for p, v in nnx.to_flat_state(nnx.pop(model, vit.GramStat))}
  assert 'head' not in diags
  for name, inp in [('blocks.0.attn.qkv', qkv_in), ('blocks.0.mlp.fc1', fc1_in),
                    ('blocks.0.mlp.fc2', fc2_in)]:
    g = diags[name]
    ref = np.diag(_np_gram(inp, w))
    assert g.shape == ref.shape
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4)


def test_bf16_compute_close_to_f32():
  model = _build()
  rng = np.random.default_rng(3)
  for layer in _lora_layers(model):  # a nonzero LoRA update too
    b = layer.lora_b.get_value()
    layer.lora_b.set_value(jnp.asarray(rng.standard_normal(b.shape) * 0.1, jnp.float32))
  bf16 = _build(dataclasses.replace(CFG, dtype='bfloat16'))
  nnx.update(bf16, nnx.state(model))
  x = _images()
  ref, out = np.asarray(_features(model, x)), np.asarray(_features(bf16, x))
  assert out.dtype == np.float32
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert 0 < rel < 3e-2, rel
  lref, lout = np.asarray(_logits(model, x)), np.asarray(_logits(bf16, x))
  assert np.abs(lout - lref).max() / np.abs(lref).max() < 3e-2


def test_low_precision_dot_backward_is_float32_products_of_bfloat16_operands():
  """Forward and input gradient of a bfloat16 dot: float32 sums of bfloat16
  operands (x and the cotangent rounded to bfloat16 first), float32 results,
  against float64; the kernel's gradient likewise, in bfloat16."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32).astype(jnp.bfloat16)
  g = jnp.asarray(rng.standard_normal((3, 5, 6)), jnp.float32)
  y, vjp = jax.vjp(lora.low_precision_dot, x, w, w.T)
  dx, dw, dwt = vjp(g)
  f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
  rounded = lambda a: f64(a.astype(jnp.bfloat16))  # what the products see
  assert y.dtype == dx.dtype == jnp.float32 and dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y), rounded(x) @ f64(w), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), rounded(g) @ f64(w).T, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(dx) - f64(g) @ f64(w).T).max() > 1e-4  # g was rounded
  np.testing.assert_allclose(f64(dw), np.einsum('bti,bto->io', rounded(x), rounded(g)),
                             rtol=1e-2, atol=1e-2)
  assert not np.any(np.asarray(dwt, np.float32))


def test_compute_view_changes_no_gradient():
  """A bfloat16 model's compute view (kernels cast once, transposes added) gives
  the LoRA gradients of the kernels cast inside the step; a float32 model's
  view is its backbone itself."""
  fm32 = F.FunctionalViT(_build())
  p = fm32.initial_params()
  assert fm32.compute_view(p.frozen) is p.frozen
  fm = F.FunctionalViT(_build(dataclasses.replace(CFG, dtype='bfloat16')))
  view = fm.compute_view(p.frozen)
  assert isinstance(view, F.ComputeView) and sorted(view.kernels_t) == fm.layer_names
  for layer in fm.layer_names:
    w = view.frozen[F.kernel_key(layer)]
    assert w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(view.kernels_t[layer]), np.asarray(w.T))
  x = _images()
  b = {k: jnp.asarray(np.random.default_rng(2).standard_normal(v.shape) * 0.1, jnp.float32)
       for k, v in p.b.items()}

  @jax.jit
  def grads(frozen):
    loss = lambda b: jnp.sum(jnp.sin(fm.apply(frozen, p.a, b, p.head, x)[0]))
    return jax.grad(loss)(b)

  with_view, without = grads(view), grads(p.frozen)
  for k in b:
    np.testing.assert_allclose(np.asarray(with_view[k]), np.asarray(without[k]),
                               rtol=1e-4, atol=1e-5 * float(np.abs(without[k]).max()))


def test_lora_product_custom_vjp_matches_autodiff():
  """The hand-written backward of (x @ a) @ b equals autodiff of the plain product."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)
  a = jnp.asarray(rng.standard_normal((8, 2)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((2, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 5, 6)), jnp.float32)
  ours = jax.grad(lambda x, a, b: jnp.sum(jnp.tanh(lora.lora_product(x, a, b)) * w),
                  argnums=(0, 1, 2))(x, a, b)
  ref = jax.grad(lambda x, a, b: jnp.sum(jnp.tanh((x @ a) @ b) * w), argnums=(0, 1, 2))(x, a, b)
  for o, r in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lora.lora_product(x, a, b)), np.asarray((x @ a) @ b),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('approximate', [False, True])
def test_gelu_custom_vjp_matches_float64(approximate):
  """vit.gelu's value and saved derivative against float64 formulas (and autodiff)."""
  x64 = np.linspace(-7.0, 7.0, 2001)
  if approximate:
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (x64 + 0.044715 * x64 ** 3))
    y64 = 0.5 * x64 * (1 + t)
    d64 = 0.5 * (1 + t) + 0.5 * x64 * (1 - t ** 2) * c * (1 + 3 * 0.044715 * x64 ** 2)
  else:
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    y64 = x64 * cdf
    d64 = cdf + x64 * np.exp(-x64 ** 2 / 2) / math.sqrt(2 * math.pi)
  x = jnp.asarray(x64, jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(vit.gelu(x, approximate)))(x)
  np.testing.assert_allclose(np.asarray(vit.gelu(x, approximate)), y64, atol=2e-6, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(grad), d64, atol=5e-6, rtol=2e-6)
  auto = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=approximate)))(x)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(auto), atol=2e-6)


def test_residual_boundary_is_the_identity_with_an_identity_backward():
  """Forward and cotangent pass unchanged (bit for bit) for a finite guard;
  a non-finite guard turns the cotangent into NaN; the guard gets no gradient."""
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  w = jax.random.normal(jax.random.key(1), (3, 5, 8))
  loss = lambda x, guard: jnp.sum(jnp.sin(vit.residual_boundary(x, guard)) * w)
  gx, gguard = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, jnp.float32(0.7))
  np.testing.assert_array_equal(np.asarray(vit.residual_boundary(x, jnp.float32(0.7))), x)
  np.testing.assert_array_equal(np.asarray(gx), np.asarray(jnp.cos(x) * w))
  assert float(gguard) == 0.0
  bad = jax.jit(jax.grad(loss))(x, jnp.float32(jnp.inf))
  assert np.all(np.isnan(np.asarray(bad)))


def test_head_init_is_the_reference_timm_init():
  """Kernel ~ N(0, 0.02^2) (timm's trunc_normal_ with absolute bounds +-2,
  i.e. in effect untruncated), bias exactly 0; with 2 classes per task and
  current-task cross-entropy, each task's column and bias sums never move
  from their initial values, so this init sets the cross-task calibration."""
  from lorm_jax.models import functional as F
  head = F.init_head(jax.random.key(3), 384, 1000)
  k = np.asarray(head['kernel'])
  assert k.shape == (384, 1000) and head['bias'].shape == (1000,)
  np.testing.assert_array_equal(np.asarray(head['bias']), 0.0)
  assert abs(k.std() - 0.02) < 0.02 * 0.01      # 384k draws: std within 1%
  assert abs(k.mean()) < 1e-4
  assert np.abs(k).max() < 0.02 * 6              # a normal's tail, nowhere near +-2
  # normal, not uniform: the fourth standardized moment of a normal is 3 (uniform 1.8)
  assert abs(np.mean((k / k.std()) ** 4) - 3.0) < 0.1


def test_row_size_bytes_is_one_clients_share():
  """row_size_bytes counts one row of the leading client axis, from shapes."""
  tree = {'a': jnp.zeros((5, 3, 4), jnp.float32), 'b': [jnp.zeros((5, 7), jnp.bfloat16)],
          'none': None}
  assert F.row_size_bytes(tree) == F.tree_size_bytes(jax.tree.map(lambda x: x[0], tree))
  assert F.row_size_bytes(tree) == 3 * 4 * 4 + 7 * 2
  assert F.row_size_bytes(None) == 0

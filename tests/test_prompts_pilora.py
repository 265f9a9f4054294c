"""Prompt tokens and prefixes in the ViT; L2P, CODA-P and PILoRA pieces against
float64 numpy references and their freezing rules."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SMALL_WIDTH as D, small_images, smoke_config as _config
from lorm_jax.methods import make_method
from lorm_jax.methods import interface
from lorm_jax.methods import pilora as PI
from lorm_jax.methods import prompts as PR
from lorm_jax.models import functional as F, vit

# ------------------------------------------------------------------- ViT


def test_prefix_attention_matches_float64_reference():
  cfg = vit.ViTConfig(width=D, num_heads=2, lora_rank=1)
  attn = vit.Attention(cfg, rngs=nnx.Rngs(1))
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 5, D)), np.float64)
  pk = np.asarray(jax.random.normal(jax.random.key(3), (2, 3, D)), np.float64)
  pv = np.asarray(jax.random.normal(jax.random.key(4), (2, 3, D)), np.float64)
  got = attn(jnp.asarray(x, jnp.float32), prefix=(jnp.asarray(pk, jnp.float32),
                                                  jnp.asarray(pv, jnp.float32)))
  wq = np.asarray(attn.qkv.kernel[...], np.float64)
  bq = np.asarray(attn.qkv.bias[...], np.float64)
  q, k, v = np.split(x @ wq + bq, 3, axis=-1)
  k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
  heads = lambda t: t.reshape(2, t.shape[1], 2, D // 2).transpose(0, 2, 1, 3)
  logits = heads(q) @ heads(k).transpose(0, 1, 3, 2) / np.sqrt(D // 2)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = (p @ heads(v)).transpose(0, 2, 1, 3).reshape(2, 5, D)
  want = out @ np.asarray(attn.proj.kernel[...], np.float64) + np.asarray(attn.proj.bias[...])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_prompt_tokens_follow_the_reference_order_and_pooling(small_fm):
  p0 = small_fm.initial_params()
  model = small_fm.module(p0.frozen, p0.a, p0.b, p0.head)
  x = small_images()
  tokens = jax.random.normal(jax.random.key(5), (3, 4, D))
  pos = jax.random.normal(jax.random.key(6), (4, D))
  plain = model.embed(x)
  got = model.embed(x, vit.Prompting(tokens, pos))
  pos_embed = model.pos_embed[...][0]
  cls = plain[:, :1] - pos_embed[:1]
  want = jnp.concatenate([cls, tokens, plain[:, 1:] - pos_embed[1:]], 1) \
      + jnp.concatenate([pos, pos_embed])[None]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Patches keep their own position embeddings; the class token gets pos[0].
  np.testing.assert_allclose(np.asarray(got[:, 5:]), np.asarray(plain[:, 1:]), atol=1e-6)
  feats = model.features(x, prompting=vit.Prompting(tokens, pos, None, 'cls_and_tokens'))
  seq = got
  for block in model.blocks:
    seq = block(seq)
  np.testing.assert_allclose(np.asarray(feats), np.asarray(model.norm(seq)[:, :5].mean(1)),
                             rtol=1e-5, atol=1e-5)
  # No prompting = the plain forward, bit for bit.
  assert np.array_equal(np.asarray(model.features(x, prompting=None)),
                        np.asarray(model.features(x)))


# ------------------------------------------------------------------- L2P


def test_l2p_selects_the_most_cosine_similar_keys():
  rng = np.random.default_rng(0)
  prompts = rng.normal(size=(10, 5, D)).astype(np.float32)
  keys = rng.normal(size=(10, D)).astype(np.float32)
  q = rng.normal(size=(4, D)).astype(np.float32)
  got = np.asarray(PR.l2p_select(jnp.asarray(prompts), jnp.asarray(keys), jnp.asarray(q), 5))
  cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ \
      (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
  for n in range(4):
    top = np.argsort(-cos[n])[:5]
    np.testing.assert_array_equal(got[n], prompts[top].reshape(25, D))


def test_l2p_trains_prompts_but_not_keys(small_fm):
  m = make_method('l2p', _config())
  p = small_fm.initial_params()
  server = m.init_server(p, F.init_head(jax.random.key(0), D, 4), jax.random.key(1))
  assert server['a'] == {} and server['b'] == {}

  def loss(head):
    logits, _ = m.forward(small_fm, p.frozen, {}, {}, head, m.forward_ctx(server, 0),
                          small_images())
    return jnp.sum(logits ** 2)

  g = jax.grad(loss)(server['head'])
  assert float(jnp.max(jnp.abs(g['l2p.prompts']))) > 0
  assert not np.any(np.asarray(g['l2p.keys']))  # top-k is not differentiable; no pull loss
  picked = np.flatnonzero(np.abs(np.asarray(g['l2p.prompts'])).sum((1, 2)))
  assert 5 <= len(picked) <= 10


def test_l2p_pool_sizes_are_hyperparameters(small_fm):
  from lorm_jax.methods import METHODS
  assert METHODS['l2p'].hyperparameters() == {'pool_size': 10, 'length': 5, 'top_k': 5}
  m = make_method('l2p', _config(**{'l2p.pool_size': 6, 'l2p.length': 3, 'l2p.top_k': 2}))
  p = small_fm.initial_params()
  head = m.init_server(p, F.init_head(jax.random.key(0), D, 4), jax.random.key(1))['head']
  assert head['l2p.prompts'].shape == (6, 3, D) and head['l2p.keys'].shape == (6, D)
  x = small_images()
  _, feats = m.forward(small_fm, p.frozen, {}, {}, head, {}, x)
  a0, b0 = F.full_lora(small_fm, {}, {})
  q, _, _ = small_fm.apply(p.frozen, a0, b0, head, x, features_only=True)
  tokens = PR.l2p_select(head['l2p.prompts'], head['l2p.keys'], q, 2)   # (B, 2 x 3, D)
  pos = 0.02 * jax.random.normal(jax.random.key(PR._PROMPT_POS_KEY), (6, D))
  want, _, _ = small_fm.apply(p.frozen, a0, b0, head, x, features_only=True,
                        prompting=vit.Prompting(tokens, pos, None, 'cls_and_tokens'))
  np.testing.assert_allclose(np.asarray(feats), np.asarray(want), rtol=1e-5, atol=1e-5)
  # The static forward is equal (one jit cache entry) for equal hyperparameters only.
  assert m.forward == make_method('l2p', m.config).forward
  assert m.forward != make_method('l2p', _config()).forward
  with pytest.raises(ValueError, match='l2p.top_k 11 is more than the 10 prompts'):
    METHODS['l2p'].validate(_config(**{'l2p.top_k': 11}))


# ---------------------------------------------------------------- CODA-P


def test_gram_schmidt_rows_match_the_reference_procedure():
  key = jax.random.key(3)
  rows = jnp.zeros((12, 20))
  first = PR.gram_schmidt_rows(key, rows, 0, 4)
  f = np.asarray(first, np.float64)
  np.testing.assert_allclose(f[:4] @ f[:4].T, np.eye(4), atol=1e-5)
  assert not np.any(f[4:])
  # After "training", earlier rows are no longer orthonormal; new rows are built
  # by classical Gram-Schmidt against every earlier row, then normalised.
  trained = first.at[:4].add(0.3 * jax.random.normal(jax.random.key(4), (4, 20)))
  second = np.asarray(PR.gram_schmidt_rows(key, trained, 4, 8), np.float64)
  np.testing.assert_array_equal(second[:4], np.asarray(trained[:4]))
  assert not np.any(second[8:])
  u = np.asarray(trained, np.float64).copy()
  for k in range(4, 8):
    v = np.asarray(jax.random.normal(jax.random.fold_in(key, k), (20,)), np.float64)
    u[k] = v - sum((v @ u[j]) / (u[j] @ u[j]) * u[j] for j in range(k))
  u[4:8] /= np.linalg.norm(u[4:8], axis=1, keepdims=True)
  np.testing.assert_allclose(second[4:8], u[4:8], rtol=1e-4, atol=1e-5)


def test_coda_p_trains_only_the_current_slice_and_ignores_later_ones(small_fm):
  m = make_method('coda_p', _config(num_tasks=4))  # 25 components per task
  p = small_fm.initial_params()
  server = m.init_server(p, F.init_head(jax.random.key(0), D, 4), jax.random.key(1))
  assert server['head']['coda.p'].shape == (2, 100, 8, D)  # blocks 0-1 of a depth-2 ViT
  for t in (0, 1):
    server = m.begin_task(server, t, jax.random.key(10 + t))
  head, ctx = server['head'], m.forward_ctx(server, 1)
  assert np.any(np.asarray(head['coda.k'][:, 25:50])) and not np.any(np.asarray(head['coda.k'][:, 50:]))
  x = small_images()

  def out(h):
    return m.forward(small_fm, p.frozen, {}, {}, h, ctx, x)[0]

  g = jax.grad(lambda h: jnp.sum(out(h) ** 2))(head)
  for name in ('coda.p', 'coda.k', 'coda.a'):
    per = np.abs(np.asarray(g[name])).reshape(2, 100, -1).sum((0, 2))
    assert per[25:50].max() > 0 and not np.any(per[:25]) and not np.any(per[50:]), name
  # Components past the current task do not change the output.
  later = {**head, 'coda.p': head['coda.p'].at[:, 60].set(5.0),
           'coda.k': head['coda.k'].at[:, 60].set(1.0), 'coda.a': head['coda.a'].at[:, 60].set(1.0)}
  np.testing.assert_array_equal(np.asarray(out(later)), np.asarray(out(head)))


def test_coda_p_pool_sizes_are_hyperparameters(small_fm):
  from lorm_jax.methods import METHODS
  assert METHODS['coda_p'].hyperparameters() == {'pool_size': 100, 'length': 8, 'layers': 5}
  m = make_method('coda_p', _config(**{'coda_p.pool_size': 10, 'coda_p.length': 4,
                                       'coda_p.layers': 1}))
  p = small_fm.initial_params()
  server = m.init_server(p, F.init_head(jax.random.key(0), D, 4), jax.random.key(1))
  head = server['head']
  assert head['coda.p'].shape == (1, 10, 4, D) and head['coda.k'].shape == (1, 10, D)
  server = m.begin_task(server, 1, jax.random.key(2))   # 2 tasks: components 5..9
  k = np.abs(np.asarray(server['head']['coda.k'][0])).sum(1)
  assert np.all(k[5:] > 0) and not np.any(k[:5])
  ctx = m.forward_ctx(server, 1)
  np.testing.assert_array_equal(np.asarray(ctx['train']), [0] * 5 + [1] * 5)
  _, feats = m.forward(small_fm, p.frozen, {}, {}, server['head'], ctx, small_images())
  assert feats.shape == (3, D) and np.all(np.isfinite(np.asarray(feats)))
  with pytest.raises(ValueError, match='coda_p.length must be even'):
    METHODS['coda_p'].validate(_config(**{'coda_p.length': 5}))
  with pytest.raises(ValueError, match='coda_p.pool_size 1 gives none of the 2 tasks'):
    METHODS['coda_p'].validate(_config(**{'coda_p.pool_size': 1}))


# ---------------------------------------------------------------- PILoRA


def _pilora(small_fm):
  m = make_method('pilora', _config())
  p = small_fm.initial_params()
  return m, p, m.init_server(p, F.init_head(jax.random.key(0), D, 4), jax.random.key(1))


def test_pilora_forward_is_the_product_of_sums_with_zero_k(small_fm):
  m, p, server = _pilora(small_fm)
  server = {**server, 'b': {PI.LAYER: 0.1 * jnp.ones((2, 3 * D))}}
  server = m.begin_task(server, 1, jax.random.key(2))  # task 0's pieces join the sums
  a = server['a'][PI.LAYER]
  b = 0.2 * jax.random.normal(jax.random.key(3), (2, 3 * D))
  ctx = m.forward_ctx(server, 1)
  logits, feats = m.forward(small_fm, p.frozen, {PI.LAYER: a}, {PI.LAYER: b}, server['head'], ctx,
                            small_images())
  mask = np.r_[np.ones(D), np.zeros(D), np.ones(D)]
  delta = np.asarray(a + ctx['a_old_sum']) @ (np.asarray(b + ctx['b_old_sum']) * mask)
  la, lb = F.full_lora(small_fm, {}, {})
  frozen = F.add_kernel_deltas(p.frozen, {PI.LAYER: jnp.asarray(delta, jnp.float32)})
  want, _, _ = small_fm.apply(frozen, la, lb, server['head'], small_images(), features_only=True)
  np.testing.assert_allclose(np.asarray(feats), np.asarray(want), rtol=1e-4, atol=1e-4)
  protos = np.asarray(server['head']['proto'], np.float64)
  f64 = np.asarray(feats, np.float64)
  d = np.sqrt(((f64[:, None] - protos[None]) ** 2).sum(-1) / D)
  np.testing.assert_allclose(np.asarray(logits), -d, rtol=1e-4, atol=1e-4)


def test_pilora_loss_freezes_k_and_old_prototypes(small_fm):
  from lorm_jax.federated import client
  m, p, server = _pilora(small_fm)
  server = m.begin_task(server, 1, jax.random.key(2))
  params = {'a': server['a'], 'b': server['b'], 'head': server['head']}
  ctx, aux = m.forward_ctx(server, 1), m.train_aux(server, 1)
  cm = jnp.array([False, False, True, True])
  x, y, w = small_images(4), jnp.array([2, 3, 2, 3]), jnp.ones(4)
  forward = client.bind_forward(m.forward, small_fm, p.frozen, ctx)

  def loss(theta):
    logits, feats = forward(theta['a'], theta['b'], theta['head'], x)
    return PI.pilora_loss(interface.Batch(theta, aux, x, y, w, logits, feats, cm, forward, ctx))

  g = jax.grad(loss)(params)
  gb = np.asarray(g['b'][PI.LAYER])
  assert not np.any(gb[:, D:2 * D]) and np.abs(gb[:, 2 * D:]).max() > 0  # K frozen, V trained
  gp = np.asarray(g['head']['proto'])
  assert not np.any(gp[:2]) and np.abs(gp[2:]).max() > 0  # old classes' prototypes frozen
  assert float(jnp.max(jnp.abs(g['a'][PI.LAYER]))) > 0


def test_pilora_prototype_merge_matches_a_per_class_loop():
  rng = np.random.default_rng(1)
  c, k = 4, 3
  protos = rng.normal(size=(c, k, D))
  count = np.array([[5, 0, 2], [1, 3, 0], [0, 4, 0], [9, 9, 9]], np.float64)
  sums = rng.normal(size=(c, k, D)) * count[..., None]
  present = np.array([True, True, True, False])  # client 3 is padding
  server = rng.normal(size=(k, D))
  classes = np.array([True, True, False])
  got = np.asarray(PI.merge_prototypes(*(jnp.asarray(v, jnp.float32) for v in
                                         (protos, count, sums)), jnp.asarray(present),
                                       jnp.asarray(server, jnp.float32), jnp.asarray(classes)))
  want = server.copy()
  for cls in range(k):
    holders = [i for i in range(c) if present[i] and count[i, cls] > 0]
    if not classes[cls] or not holders:
      continue
    means = np.stack([sums[i, cls] / count[i, cls] for i in holders])
    mine = protos[present, cls]
    s = np.linalg.norm(mine[:, None] - means[None], axis=-1).sum(1)
    r = 1 / (s + 1e-10)
    z = 0.2 * (r - r.min()) / (r.max() - r.min())
    wts = np.exp(z) / np.exp(z).sum()
    want[cls] = (wts[:, None] * mine).sum(0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

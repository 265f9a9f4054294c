"""Properties of the baseline strategies (lorm_jax.methods), without the loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import smoke_config as _config
from lorm_jax import merge
from lorm_jax.methods import ClientResults, make_method
from lorm_jax.methods.regmean import lowrank_regmean_system


# ---------------------------------------------------------------- joint


def test_joint_is_one_task_one_client_with_every_sample():
  task_classes = [np.arange(0, 5), np.arange(5, 10)]
  split = [[np.array([0, 3]), np.array([1, 2, 7])], [np.array([4, 9]), np.array([5, 6, 8])]]
  classes, new = make_method('joint', _config()).task_structure(task_classes, split)
  assert len(classes) == 1 and classes[0].tolist() == list(range(10))
  assert len(new) == 1 and len(new[0]) == 1
  assert new[0][0].tolist() == list(range(10))


def test_joint_fed_keeps_each_clients_union():
  task_classes = [np.arange(0, 5), np.arange(5, 10)]
  split = [[np.array([0, 3]), np.array([1, 2, 7])], [np.array([4, 9]), np.array([5, 6, 8])]]
  classes, new = make_method('joint_fed', _config()).task_structure(task_classes, split)
  assert len(classes) == 1 and len(new) == 1 and len(new[0]) == 2
  assert sorted(new[0][0].tolist()) == [0, 3, 4, 9]
  assert sorted(new[0][1].tolist()) == [1, 2, 5, 6, 7, 8]


# -------------------------------------------------------------- regmean


def _random_clients(key, c, n, r, out, full: bool):
  ka, kb, kg = jax.random.split(key, 3)
  a = jax.random.normal(ka, (c, n, r))
  b = jax.random.normal(kb, (c, r, out))
  x = jax.random.normal(kg, (c, 3 * n, n))
  g = jnp.einsum('cti,ctj->cij', x, x)
  return a, b, (g if full else jnp.diagonal(g, axis1=1, axis2=2))


@pytest.mark.parametrize('alpha,full', [(0.0, False), (0.0, True), (0.5, True), (1.0, True)])
def test_lowrank_regmean_equals_regmean_of_the_full_deltas(alpha, full):
  """D + G~^-1 sum_i G~_i a_i b_i == merge.regmean of the stacked D + a_i b_i."""
  a, b, g = _random_clients(jax.random.key(0), 4, 6, 2, 5, full)
  w = jnp.array([1.0, 1.0, 0.0, 1.0])  # client 2 absent
  d = jax.random.normal(jax.random.key(1), (6, 5))
  gsum, rhs = lowrank_regmean_system({'l': a}, {'l': b}, {'l': g}, w, alpha)
  ours = d + merge.solve_psd_tree(gsum, rhs, ridge=0.0)['l']
  full_deltas = d[None] + jnp.einsum('cir,cro->cio', a, b)
  want = merge.regmean(full_deltas, g, alpha, weights=w, ridge=0.0)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=2e-4, atol=2e-4)


def _results(a, b, g, head_k, head_g, n):
  c = a.shape[0]
  return ClientResults(a={'l': a}, b={'l': b}, head={'kernel': head_k, 'bias': jnp.zeros((c, 3))},
                       grams={'l': g}, head_grams=head_g, num_samples=n)


def test_regmean_identical_clients_add_their_delta_and_restart_lora():
  m = make_method('regmean', _config())
  a1, b1, g1 = _random_clients(jax.random.key(2), 1, 6, 2, 5, False)
  c = 3
  rep = lambda x: jnp.repeat(x, c, axis=0)
  d0 = jax.random.normal(jax.random.key(3), (6, 5))
  head_k = rep(jax.random.normal(jax.random.key(4), (1, 4, 3)))
  xh = jax.random.normal(jax.random.key(5), (20, 4))
  head_g = rep((xh.T @ xh)[None])
  server = {'a': {'l': a1[0]}, 'b': {'l': jnp.zeros((2, 5))},
            'head': {'kernel': head_k[0], 'bias': jnp.zeros(3)}, 'extra': {'D': {'l': d0}}}
  new, info = m.aggregate(server, _results(rep(a1), rep(b1), rep(g1), head_k, head_g,
                                           jnp.array([3.0, 5.0, 7.0])), task=0, rnd=0)
  np.testing.assert_allclose(np.asarray(new['extra']['D']['l']),
                             np.asarray(d0 + a1[0] @ b1[0]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(new['head']['kernel']), np.asarray(head_k[0]),
                             rtol=1e-4, atol=1e-4)
  assert int(info['merge_fallbacks']) == 0
  # A fresh LoRA for the next round: b = 0, a redrawn; W0 + D is what clients train on.
  assert not np.any(np.asarray(new['b']['l']))
  assert not np.allclose(np.asarray(new['a']['l']), np.asarray(a1[0]))
  assert m.train_deltas(new, 0) is new['extra']['D']
  # Across tasks D is carried on (one continually fine-tuned model, as the reference).
  nxt = m.begin_task(new, 1, jax.random.key(9))
  assert nxt['extra']['D'] is new['extra']['D']
  deltas, _, b = m.eval_model(nxt, 1)
  assert deltas is new['extra']['D'] and not np.any(np.asarray(b['l']))


# ------------------------------------- ewc, lwf, fedproto, fisheravg (LoRA variants)

import functools  # noqa: E402

from flax import nnx  # noqa: E402

from lorm_jax.federated import client  # noqa: E402
from lorm_jax.methods import interface  # noqa: E402
from lorm_jax.methods import continual as C  # noqa: E402
from lorm_jax.models import functional as F, vit  # noqa: E402


@pytest.fixture(scope='module')
def tiny():
  cfg = vit.ViTConfig(image_size=14, patch_size=7, width=16, depth=1, num_heads=2, mlp_dim=32,
                      num_classes=4, lora_rank=2)
  fm = F.FunctionalViT(vit.ViT(cfg, rngs=nnx.Rngs(0)))
  p = fm.initial_params()
  a, b = F.init_lora(jax.random.key(1), p.a, p.b)
  b = jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(7), x.shape), b)
  head = F.init_head(jax.random.key(2), 16, 4)
  x = jax.random.normal(jax.random.key(3), (6, 14, 14, 3))
  y = jnp.array([0, 1, 1, 0, 1, 0])
  w = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # the last sample is padding
  return fm, p.frozen, {'a': a, 'b': b, 'head': head}, x, y, w


def _batch(tiny, params, aux, cm=(True, True, False, False)):
  fm, frozen, _, x, y, w = tiny
  forward = client.bind_forward(interface.linear_head_forward, fm, frozen, {})
  logits, feats = forward(params['a'], params['b'], params['head'], x)
  return interface.Batch(params, aux, x, y, w, logits, feats, jnp.array(cm), forward)


def test_ewc_penalty_is_lambda_fisher_squared_distance(tiny):
  theta = tiny[2]
  star = jax.tree.map(lambda t: t + 0.5, theta)
  fisher = jax.tree.map(lambda t: jnp.full_like(t, 2.0), theta)
  aux = {'fisher': fisher, 'star': star, 'lam': jnp.float32(1.0)}
  n = sum(x.size for x in jax.tree.leaves(theta))
  np.testing.assert_allclose(C.ewc_penalty(_batch(tiny, theta, aux)), 2.0 * 0.25 * n, rtol=1e-5)
  assert float(C.ewc_penalty(_batch(tiny, theta, {**aux, 'star': theta}))) == 0.0
  # Its gradient is the reference's injected lambda * 2 F (theta - theta*).
  g = jax.grad(lambda t: C.ewc_penalty(_batch(tiny, t, aux)))(theta)
  for gi in jax.tree.leaves(g):
    np.testing.assert_allclose(np.asarray(gi), -2.0, rtol=1e-5)


def test_lwf_term_has_zero_gradient_when_student_is_the_teacher(tiny):
  theta = tiny[2]
  aux = {'teacher': theta, 'alpha': jnp.float32(0.5), 'temp': jnp.float32(2.0)}
  g = jax.grad(lambda t: C.lwf_distillation(_batch(tiny, t, aux)))(theta)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g)) < 1e-6
  other = {**aux, 'teacher': jax.tree.map(lambda t: t * 1.5, theta)}
  g2 = jax.grad(lambda t: C.lwf_distillation(_batch(tiny, t, other)))(theta)
  assert float(jnp.max(jnp.abs(g2['head']['kernel']))) > 1e-4
  # Only the current task's columns (the reference's slice) take part.
  assert not np.any(np.asarray(g2['head']['kernel'])[:, 2:])


def test_diagonal_fisher_matches_a_per_sample_loop(tiny):
  theta = tiny[2]
  batch = _batch(tiny, theta, {})
  got = C.diagonal_fisher(batch)
  fm, frozen, _, x, y, w = tiny
  want = jax.tree.map(jnp.zeros_like, theta)
  for n in range(x.shape[0] - 1):  # the padded sample adds nothing
    def logp(t):
      logits, _ = interface.linear_head_forward(fm, frozen, t['a'], t['b'], t['head'], {},
                                               x[n:n + 1])
      return jax.nn.log_softmax(jnp.where(batch.class_mask, logits[0], -1e9))[y[n]]
    lp, g = jax.value_and_grad(logp)(theta)
    want = jax.tree.map(lambda acc, gi: acc + jnp.exp(lp) * gi ** 2, want, g)
  for a_, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a_), np.asarray(b_), rtol=1e-4, atol=1e-9)
  assert not np.any(np.asarray(got['head']['kernel'])[:, 2:])  # other tasks' classes


def test_fisher_weighted_mean():
  theta = {'p': jnp.array([[1.0, 1.0, 5.0], [3.0, 3.0, 7.0], [100.0, 100.0, 100.0]])}
  fisher = {'p': jnp.array([[1.0, 0.0, 2.0], [1.0, 4.0, 0.0], [9.0, 9.0, 9.0]])}
  present = jnp.array([True, True, False])  # client 2 is padding
  got = C.fisher_weighted_mean(theta, fisher, present)['p']
  np.testing.assert_allclose(np.asarray(got), [2.0, 3.0, 5.0], rtol=1e-6)


def test_proto_alignment_and_prototype_merge(tiny):
  theta = tiny[2]
  batch = _batch(tiny, theta, {})
  sums = C.class_feature_sums(batch)
  np.testing.assert_allclose(np.asarray(sums['count']), [2.0, 3.0, 0.0, 0.0])
  protos = sums['sum'] / jnp.maximum(sums['count'], 1.0)[:, None]
  aux = {'protos': protos, 'valid': jnp.array([1.0, 1.0, 0.0, 0.0]), 'ld_reg': jnp.float32(0.1)}
  assert float(C.proto_alignment(_batch(tiny, theta, aux))) < 1e-10
  shifted = {**aux, 'protos': protos + 1.0}
  np.testing.assert_allclose(C.proto_alignment(_batch(tiny, theta, shifted)), 0.1 * 2, rtol=1e-5)
  # The server: parameters averaged uniformly over clients, prototypes by counts.
  m = make_method('fedproto', _config())
  ones = lambda v: {'l': jnp.full((3, 2, 2), v)}
  stats = {'count': jnp.array([[2.0, 0.0], [6.0, 1.0], [0.0, 0.0]]),
           'sum': jnp.array([[[2.0], [0.0]], [[18.0], [4.0]], [[0.0], [0.0]]])}
  res = ClientResults(a=ones(1.0), b={'l': jnp.array([0.0, 3.0, 9.0])[:, None, None] * jnp.ones(
      (3, 2, 2))}, head={'kernel': jnp.zeros((3, 1, 2)), 'bias': jnp.zeros((3, 2))}, grams={},
      head_grams=None, num_samples=jnp.array([2.0, 7.0, 0.0]), stats=stats)
  server = {'a': None, 'b': None, 'head': None, 'extra': None}
  new, _ = m.aggregate(server, res, 0, 0)
  np.testing.assert_allclose(np.asarray(new['b']['l']), 1.5)  # (0 + 3) / 2, not by samples
  np.testing.assert_allclose(np.asarray(new['extra']['protos'])[:, 0], [20 / 8, 4.0])
  np.testing.assert_allclose(np.asarray(new['extra']['valid']), [1.0, 1.0])


def test_ewc_online_fisher_and_anchor():
  m = make_method('ewc', _config())
  theta = {'a': {'l': jnp.ones((2, 1))}, 'b': {'l': jnp.ones((1, 2))},
           'head': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}}
  stack = lambda t, v: jax.tree.map(lambda x: jnp.stack([x * v, x * 3 * v]), t)
  res = ClientResults(**stack(theta, 1.0), grams={}, head_grams=None,
                      num_samples=jnp.array([1.0, 3.0]), stats=stack(theta, 2.0))
  old = jax.tree.map(lambda x: x * 10.0, theta)
  server = {**theta, 'extra': {'fisher': old, 'fisher_new': old, 'star': old}}
  assert m.stats_request(0, 0) is None and m.stats_request(0, 1) is C.diagonal_fisher
  new, _ = m.aggregate(server, res, task=1, rnd=1)
  np.testing.assert_allclose(np.asarray(new['a']['l']), 2.5)  # (1 * 1 + 3 * 3) / 4
  np.testing.assert_allclose(np.asarray(new['extra']['fisher_new']['a']['l']), 2.0)  # (2+6)/4
  done = m.end_task(new, 1, None)
  np.testing.assert_allclose(np.asarray(done['extra']['fisher']['head']['bias']), 0.9 * 10 + 2)
  np.testing.assert_allclose(np.asarray(done['extra']['star']['a']['l']), 2.5)
  assert m.local_spec(0, 0).loss_term is None and m.local_spec(1, 0).loss_term is C.ewc_penalty


# ---------------------------------------------------------------- ccvr

from lorm_jax.methods import ccvr  # noqa: E402


def test_ccvr_moments_give_numpy_mean_and_unbiased_variance(tiny):
  batch = _batch(tiny, tiny[2], {})
  mom = ccvr.class_feature_moments(batch)
  weight, mean, var = ccvr.gaussians_from_moments(*(mom[k][None] for k in ('count', 'sum',
                                                                           'sumsq')))
  feats, y = np.asarray(batch.feats)[:5], np.asarray(batch.y)[:5]  # the 6th sample is padding
  for k in (0, 1):
    f = feats[y == k]
    assert weight[0, k] == len(f)
    np.testing.assert_allclose(np.asarray(mean[0, k]), f.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var[0, k]), f.var(0, ddof=1), rtol=1e-3, atol=1e-5)
  # Classes with at most one sample form no component.
  w1, m1, v1 = ccvr.gaussians_from_moments(jnp.array([[1.0, 0.0]]), jnp.ones((1, 2, 3)),
                                           jnp.ones((1, 2, 3)))
  assert not np.any(np.asarray(w1)) and not np.any(np.asarray(m1)) and not np.any(np.asarray(v1))


def test_ccvr_head_retraining_separates_the_mixtures_and_leaves_unseen_classes():
  d, k, c = 8, 5, 2
  centres = 3.0 * jnp.eye(d)[:k]                                   # class means, far apart
  mean = jnp.stack([centres, centres + 0.1])                       # (C, K, D)
  var = jnp.full((c, k, d), 0.05)
  weight = jnp.array([[3.0, 1.0, 0.0, 2.0, 0.0], [1.0, 4.0, 5.0, 0.0, 0.0]])
  seen = jnp.array([True, True, True, True, False])
  head = {'kernel': 0.01 * jax.random.normal(jax.random.key(0), (d, k)), 'bias': jnp.zeros(k)}
  new = ccvr.retrain_head(head, weight, mean, var, seen, jax.random.key(1), steps_per_epoch=4,
                          batch=64)
  logits = centres[:4] @ new['kernel'] + new['bias']
  assert list(np.argmax(np.asarray(logits)[:, :4], axis=1)) == [0, 1, 2, 3]
  # The unseen class's column gets no gradient.
  np.testing.assert_array_equal(np.asarray(new['kernel'])[:, 4], np.asarray(head['kernel'])[:, 4])
  assert new['bias'][4] == 0.0


def test_ccvr_server_keeps_old_tasks_components():
  m = make_method('ccvr', _config(num_clients=2))
  d, k = 3, 4
  zeros = lambda *s: jnp.zeros(s)
  extra = {'weight': jnp.array([[2.0, 3.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]]),
           'mean': jnp.ones((2, k, d)), 'var': jnp.ones((2, k, d)),
           'seen': jnp.array([1.0, 1.0, 0.0, 0.0])}
  theta = {'a': {'l': zeros(3, 2, 1)}, 'b': {'l': zeros(3, 1, 2)},
           'head': {'kernel': zeros(3, d, k), 'bias': zeros(3, k)}}
  count = jnp.array([[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
  total = 2.0 * count[..., None] * jnp.ones(d)
  stats = {'count': count, 'sum': total, 'sumsq': 2.0 * total}  # mean 2, var of 0 or more
  res = ClientResults(**theta, grams={}, head_grams=None, num_samples=jnp.array([6.0, 5.0, 0.0]),
                      stats=stats)
  server = {'a': None, 'b': None, 'head': {'kernel': zeros(d, k), 'bias': zeros(k)},
            'extra': extra}
  new, _ = m.aggregate(server, res, task=1, rnd=0)
  got = new['extra']
  # Task 0's classes (0, 1) keep their components; classes 2, 3 get this round's,
  # where a client holds more than one sample of the class.
  np.testing.assert_array_equal(np.asarray(got['weight']), [[2, 3, 5, 0], [4, 0, 2, 3]])
  np.testing.assert_allclose(np.asarray(got['mean'])[:, :2], 1.0)
  np.testing.assert_allclose(np.asarray(got['mean'])[0, 2], 2.0)
  np.testing.assert_array_equal(np.asarray(got['seen']), [1, 1, 1, 1])
  assert m.stats_request(0, 0) is ccvr.class_feature_moments


# ---------------------------------------------------------------- lorm ablations


def _lorm_round_inputs(key, clients=3, d=6, r=2, k=4):
  ks = jax.random.split(key, 6)
  a = {'l': jax.random.normal(ks[0], (d, r))}
  b = {'l': jax.random.normal(ks[1], (r, d))}
  head = {'kernel': jax.random.normal(ks[2], (d, k)), 'bias': jnp.zeros(k)}
  x = jax.random.normal(ks[3], (clients, 20, d))
  results = ClientResults(
      a={'l': jnp.broadcast_to(a['l'], (clients, d, r))},
      b={'l': jax.random.normal(ks[4], (clients, r, d))},
      head={'kernel': jax.random.normal(ks[5], (clients, d, k)), 'bias': jnp.ones((clients, k))},
      grams={'l': jnp.sum(x ** 2, axis=1)}, head_grams=jnp.einsum('cni,cnj->cij', x, x),
      num_samples=jnp.array([3.0, 1.0, 2.0]))
  return {'a': a, 'b': b, 'head': head}, results


def test_lorm_ablations_each_replace_one_piece_by_the_averaging_one():
  base = make_method('lorm', _config())
  params, results = _lorm_round_inputs(jax.random.key(0))
  server = {**params, 'extra': {'P': {'l': jnp.ones((6, 6))}, 'Q': {'l': jnp.full((6,), 2.0)},
                                'delta_sum': {'l': jnp.full((6, 6), 3.0)}}}
  # mean_head: the head kernel is the sample-weighted mean, not RegMean.
  plain, _ = base.aggregate(server, results, 0, 0)
  ablated, _ = make_method('lorm', _config(lorm_ablation='mean_head')).aggregate(
      server, results, 0, 0)
  want = np.einsum('c,cij->ij', np.array([3, 1, 2]) / 6, np.asarray(results.head['kernel']))
  np.testing.assert_allclose(np.asarray(ablated['head']['kernel']), want, rtol=1e-5)
  assert not np.allclose(np.asarray(plain['head']['kernel']), want, rtol=1e-3)
  np.testing.assert_array_equal(np.asarray(ablated['b']['l']), np.asarray(plain['b']['l']))
  # mean_deltas: the evaluated model is W0 + delta_sum / (t + 1), not W0 + Q^-1 P.
  deltas, _, _ = make_method('lorm', _config(lorm_ablation='mean_deltas')).eval_model(server, 2)
  np.testing.assert_allclose(np.asarray(deltas['l']), 1.0)
  deltas, _, _ = base.eval_model(server, 2)
  np.testing.assert_allclose(np.asarray(deltas['l']), 0.5, rtol=1e-5)
  # own_gram_model: the Gram pass runs W0 + a_i b_i (no earlier deltas, b unscaled).
  assert make_method('lorm', _config(lorm_ablation='own_gram_model')).gram_model(server, 2) \
      == ({}, 1.0)
  deltas, scale = base.gram_model(server, 2)
  assert scale == pytest.approx(1 / 3)
  np.testing.assert_allclose(np.asarray(deltas['l']), 1.0)

"""DualPrompt and CODA-LwF (issue 29): each method's defining property against
a hand computation, the hyperparameters' checks, and a run of each on the loop."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SMALL_WIDTH as D, small_images, smoke_config, strip_wall_time
from lorm_jax.federated import client, simulate
from lorm_jax.methods import METHODS, make_method
from lorm_jax.methods import coda_lwf as CL
from lorm_jax.methods import dualprompt as DP
from lorm_jax.methods import prompts as PR
from lorm_jax.methods.interface import Batch, ClientResults, masked_cross_entropy
from lorm_jax.models import functional as F, vit

def _server(small_fm, name, **hp):
  m = make_method(name, smoke_config(**{f'{name}.{k}': v for k, v in hp.items()}))
  p = small_fm.initial_params()
  return m, p, m.init_server(p, F.init_head(jax.random.key(0), D, 4), jax.random.key(1))


def _cos(q, keys):
  q, keys = np.asarray(q, np.float64), np.asarray(keys, np.float64)
  return (q / np.linalg.norm(q, axis=1, keepdims=True)) @ \
      (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T


def _query(small_fm, p, head, x):
  a0, b0 = F.full_lora(small_fm, {}, {})
  return small_fm.apply(p.frozen, a0, b0, head, x, features_only=True)[0]


# ------------------------------------------------------------- DualPrompt


def test_dualprompt_picks_e_prompts_by_key_matching_and_its_own_in_training():
  m = make_method('dualprompt', smoke_config(**{'dualprompt.pool_size': 6,
                                                'dualprompt.top_k': 2}))
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(6, D)).astype(np.float32)
  q = rng.normal(size=(5, D)).astype(np.float32)
  got = DP.dualprompt_select(jnp.asarray(keys), jnp.asarray(q), 2, m.forward_ctx(None, 0))
  np.testing.assert_array_equal(np.asarray(got), np.argsort(-_cos(q, keys), axis=1)[:, :2])
  # Training of task 1 uses entries 2 and 3 for every image (the reference's prompt mask) ...
  got = DP.dualprompt_select(jnp.asarray(keys), jnp.asarray(q), 2, m.train_ctx(1))
  np.testing.assert_array_equal(np.asarray(got), np.tile([2, 3], (5, 1)))
  # ... while the pool has them: task 3 would need entries 6 and 7 of 6.
  assert float(m.train_ctx(2)['force']) == 1.0 and float(m.train_ctx(3)['force']) == 0.0


def test_dualprompt_prefixes_sit_on_the_g_and_e_blocks(small_fm):
  m, p, server = _server(small_fm, 'dualprompt', g_layers=(0,), e_layers=(1,), pool_size=4,
                         e_length=3, g_length=2)
  head, x = server['head'], small_images()
  assert server['a'] == {} and server['b'] == {}
  assert head['dualprompt.g'].shape == (1, 2, 2, D)      # (blocks, key/value, length, D)
  assert head['dualprompt.e'].shape == (1, 2, 4, 3, D)   # (blocks, key/value, pool, length, D)
  assert head['dualprompt.keys'].shape == (4, D)
  g, e = np.asarray(head['dualprompt.g'][0]), np.asarray(head['dualprompt.e'][0])
  q = _query(small_fm, p, head, x)
  a0, b0 = F.full_lora(small_fm, {}, {})

  def by_hand(idx):
    bcast = lambda t: jnp.broadcast_to(jnp.asarray(t), (3,) + t.shape)
    prefixes = {0: (bcast(g[0]), bcast(g[1])),
                1: (jnp.asarray(e[0, idx]), jnp.asarray(e[1, idx]))}  # (B, 3, D) each
    return small_fm.apply(p.frozen, a0, b0, head, x, features_only=True,
                    prompting=vit.Prompting(prefixes=prefixes))[0]

  # Evaluation: each image's entry is its best-matching key.
  picked = np.argmax(_cos(q, head['dualprompt.keys']), axis=1)
  logits, feats = m.forward(small_fm, p.frozen, {}, {}, head, m.forward_ctx(server, 0), x)
  np.testing.assert_allclose(np.asarray(feats), np.asarray(by_hand(picked)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits),
                             np.asarray(feats @ head['kernel'] + head['bias']), rtol=1e-6)
  # Training of task 2: entry 2 for every image.
  _, feats = m.forward(small_fm, p.frozen, {}, {}, head, m.train_ctx(2), x)
  np.testing.assert_allclose(np.asarray(feats), np.asarray(by_hand(np.full(3, 2))),
                             rtol=1e-5, atol=1e-5)


def test_dualprompt_training_reaches_its_task_entry_and_g_but_not_the_keys(small_fm):
  m, p, server = _server(small_fm, 'dualprompt', g_layers=(0,), e_layers=(1,), pool_size=4,
                         e_length=3, g_length=2)
  ctx = m.train_ctx(1)

  def loss(head):
    logits, _ = m.forward(small_fm, p.frozen, {}, {}, head, ctx, small_images())
    return jnp.sum(logits ** 2)

  grad = jax.grad(loss)(server['head'])
  per_entry = np.abs(np.asarray(grad['dualprompt.e'])).sum((0, 1, 3, 4))
  assert per_entry[1] > 0 and not np.any(np.delete(per_entry, 1))
  assert float(jnp.max(jnp.abs(grad['dualprompt.g']))) > 0
  assert not np.any(np.asarray(grad['dualprompt.keys']))  # no key-pull loss, as the reference


def test_dualprompt_prompt_tuning_prepends_the_entry_before_its_block(small_fm):
  m, p, server = _server(small_fm, 'dualprompt', g_layers=(0,), e_layers=(1,), pool_size=4,
                         e_length=3, g_length=2, e_tuning='prompt')
  head, x = server['head'], small_images()
  assert head['dualprompt.e'].shape == (1, 4, 3, D)       # (blocks, pool, length, D)
  _, feats = m.forward(small_fm, p.frozen, {}, {}, head, m.train_ctx(3), x)
  a0, b0 = F.full_lora(small_fm, {}, {})
  model = small_fm.module(p.frozen, a0, b0, head)
  g = head['dualprompt.g'][0]
  seq = model.embed(x)
  seq = model.blocks[0](seq, prefix=tuple(jnp.broadcast_to(g[i], (3, 2, D)) for i in (0, 1)))
  seq = jnp.concatenate([jnp.broadcast_to(head['dualprompt.e'][0, 3], (3, 3, D)), seq], axis=1)
  seq = model.norm(model.blocks[1](seq))
  np.testing.assert_allclose(np.asarray(feats), np.asarray(seq[:, 3]), rtol=1e-5, atol=1e-5)


def test_dualprompt_defaults_are_the_reference_network_and_absent_blocks_get_no_slot(small_fm):
  assert METHODS['dualprompt'].hyperparameters() == {
      'g_length': 5, 'g_layers': (0, 1), 'pool_size': 10, 'e_length': 20, 'e_layers': (2, 3, 4),
      'top_k': 1, 'e_tuning': 'prefix'}
  m, p, server = _server(small_fm, 'dualprompt')  # a depth-2 ViT: no block of e_layers
  head = server['head']
  assert head['dualprompt.g'].shape == (2, 2, 5, D) and 'dualprompt.e' not in head
  logits, _ = m.forward(small_fm, p.frozen, {}, {}, head, m.train_ctx(0), small_images())
  assert logits.shape == (3, 4) and np.all(np.isfinite(np.asarray(logits)))
  # A config read back from JSON gives lists; the static forward needs tuples.
  m = make_method('dualprompt', smoke_config(**{'dualprompt.e_layers': (1,)}))
  m.config.unlock()
  assert DP.DualPrompt(m.config, g_layers=[0], e_layers=[1]).forward == \
      DP.DualPrompt(m.config, g_layers=(0,), e_layers=(1,)).forward


@pytest.mark.parametrize('bad, match', [
    ({'dualprompt.top_k': 11}, 'top_k 11 is more than the 10'),
    ({'dualprompt.e_length': 0}, 'e_length must be an integer >= 1'),
    ({'dualprompt.e_layers': (1, 2), 'dualprompt.g_layers': (0, 1)}, r'share block\(s\) \[1\]'),
    ({'dualprompt.e_layers': (2, 2)}, 'names a block twice'),
    ({'dualprompt.e_tuning': 'suffix'}, "'prefix' or 'prompt'"),
    ({'method': 'coda_lwf', 'coda_lwf.temp': 0.0}, 'temp must be > 0'),
    ({'method': 'coda_lwf', 'coda_lwf.length': 7}, 'length must be even'),
])
def test_prompt_method_hyperparameters_are_checked(bad, match):
  c = smoke_config(**{'method': 'dualprompt', **bad})
  with pytest.raises(ValueError, match=match):
    METHODS[c.method].validate(c)


# --------------------------------------------------------------- CODA-LwF


def _coda_lwf_batch(small_fm, fixed_state=None):
  """A CODA-LwF batch of task 0 (classes 0, 1 of 4) whose student has moved
  off the teacher; the last sample is padding."""
  m, p, server = _server(small_fm, 'coda_lwf')
  server = m.begin_task(server, 0, jax.random.key(2))
  teacher = server['head']
  noise = lambda k, t: t + 0.3 * jax.random.normal(jax.random.key(k), t.shape)
  student = {**teacher, 'kernel': noise(3, teacher['kernel']),
             'coda.p': noise(4, teacher['coda.p'])}
  ctx, aux = m.forward_ctx(server, 0), m.train_aux(server, 0)
  x, y = small_images(5, seed=1), jnp.array([0, 1, 0, 1, 1])
  w, cm = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0]), jnp.array([True, True, False, False])
  forward = client.bind_forward(m.forward, small_fm, p.frozen, ctx)
  logits, feats = forward({}, {}, student, x)
  state = fixed_state or {'coda_lwf.sum': jnp.zeros(4), 'coda_lwf.count': jnp.zeros(4),
                          'coda_lwf.fixed': jnp.float32(0)}
  batch = Batch({'a': {}, 'b': {}, 'head': student}, aux, x, y, w, logits, feats, cm, forward,
                ctx, state)
  return m, p, server, student, batch


def _lwf_by_hand(small_fm, p, server, student, batch, betas=None):
  """float64: CE of the student + sum_i w_i beta_i KL_i / sum w (module docstring)."""
  x, y, w = batch.x, np.asarray(batch.y), np.asarray(batch.w, np.float64)
  ctx, teacher = batch.ctx, server['head']
  s = np.asarray(PR.coda_forward(small_fm, p.frozen, {}, {}, student, ctx, x)[0], np.float64)[:, :2]
  t = np.asarray(PR.coda_forward(small_fm, p.frozen, {}, {}, teacher, ctx, x)[0], np.float64)[:, :2]
  logp = s - np.log(np.exp(s).sum(1, keepdims=True))
  logq = t - np.log(np.exp(t).sum(1, keepdims=True))
  ce = -(w * logp[np.arange(5), y]).sum() / w.sum()
  if betas is None:  # the batch's own class-mean scores under the teacher
    q = np.asarray(_query(small_fm, p, teacher, x), np.float64)
    live, train = np.asarray(ctx['live']) > 0, np.asarray(ctx['train']) > 0
    layers = teacher['coda.k'].shape[0]
    score = np.zeros(5)
    for layer in range(layers):
      k, a = (np.asarray(teacher[n][layer], np.float64) for n in ('coda.k', 'coda.a'))
      weight = np.stack([_cos(q[i:i + 1] * a, k)[np.arange(len(a)), np.arange(len(a))]
                         for i in range(5)])   # (B, pool): cos(q_i * A_k, K_k)
      score += (weight * live)[:, train].sum(1) / layers
    means = np.array([score[(y == c) & (w > 0)].mean() for c in (0, 1)])
    betas = np.exp(means) / np.exp(means).sum()
  kl = np.exp(logp) * (logp - logq)
  others = np.arange(2)[None, :] != y[:, None]
  beta = np.where(others, betas[None, :2], 0).sum(1)
  return ce + (w * beta * np.where(others, kl, 0).sum(1)).sum() / w.sum()


def test_coda_lwf_loss_is_coda_p_cross_entropy_plus_the_weighted_distillation(small_fm):
  m, p, server, student, batch = _coda_lwf_batch(small_fm)
  # CODA-LwF's forward is CODA-P's.
  np.testing.assert_array_equal(
      np.asarray(batch.logits),
      np.asarray(PR.coda_forward(small_fm, p.frozen, {}, {}, student, batch.ctx, batch.x)[0]))
  ce, _ = masked_cross_entropy(batch.logits, batch.y, batch.class_mask, batch.w)
  got = float(ce + CL.coda_lwf_distillation(batch))
  want = _lwf_by_hand(small_fm, p, server, student, batch)
  assert got > float(ce) + 1e-4
  np.testing.assert_allclose(got, want, rtol=2e-4)
  # Once a client's class sums are fixed, betas come from them alone.
  fixed = {'coda_lwf.sum': jnp.array([0.6, -0.4, 0.0, 0.0]),
           'coda_lwf.count': jnp.array([2.0, 1.0, 0.0, 0.0]), 'coda_lwf.fixed': jnp.float32(1)}
  m, p, server, student, batch = _coda_lwf_batch(small_fm, fixed)
  ce, _ = masked_cross_entropy(batch.logits, batch.y, batch.class_mask, batch.w)
  betas = np.exp([0.3, -0.4]) / np.exp([0.3, -0.4]).sum()
  np.testing.assert_allclose(float(ce + CL.coda_lwf_distillation(batch)),
                             _lwf_by_hand(small_fm, p, server, student, batch, betas), rtol=2e-4)
  # alpha scales the term; a student equal to its teacher distils nothing.
  half = batch._replace(aux={**batch.aux, 'alpha': jnp.float32(0.5)})
  np.testing.assert_allclose(float(CL.coda_lwf_distillation(half)),
                             0.5 * float(CL.coda_lwf_distillation(batch)), rtol=1e-6)
  same = batch._replace(logits=batch.forward({}, {}, server['head'], batch.x)[0])
  assert abs(float(CL.coda_lwf_distillation(same))) < 1e-6


def test_coda_lwf_client_scores_accumulate_once_per_task(small_fm):
  m, p, server = _server(small_fm, 'coda_lwf')
  assert server['extra']['coda_lwf.sum'].shape == (3, 4)  # smoke: 3 clients, here 4 classes
  server = m.begin_task(server, 0, jax.random.key(2))
  plan = m.round_plan(server, 0, 0, np.array([2, 0]))
  assert plan.spec.state_update is CL.accumulate_scores
  assert plan.spec.loss_term is CL.coda_lwf_distillation
  assert plan.client_state['coda_lwf.sum'].shape == (2, 4)
  state = {'coda_lwf.sum': jnp.array([[1.0, 2.0, 0, 0], [3.0, 0, 0, 0]]),
           'coda_lwf.count': jnp.array([[2.0, 2.0, 0, 0], [4.0, 0, 0, 0]]),
           'coda_lwf.fixed': jnp.zeros(2)}
  heads = jax.tree.map(lambda t: jnp.stack([t, t]), server['head'])
  results = ClientResults({}, {}, heads, {}, None, jnp.array([4.0, 4.0]),
                          client_ids=jnp.array([2, 0], jnp.int32), state=state)
  server, _ = m.aggregate(server, results, 0, 0)
  extra = server['extra']
  np.testing.assert_array_equal(np.asarray(extra['coda_lwf.fixed']), [1, 0, 1])
  np.testing.assert_array_equal(np.asarray(extra['coda_lwf.sum'][2]), [1, 2, 0, 0])
  np.testing.assert_array_equal(np.asarray(extra['coda_lwf.count'][0]), [4, 0, 0, 0])
  # Clients 0 and 2 keep their sums for the task: no accumulation for them alone.
  plan = m.round_plan(server, 0, 1, np.array([0, 2]))
  assert plan.spec.state_update is None
  np.testing.assert_array_equal(np.asarray(plan.client_state['coda_lwf.sum'][1]), [1, 2, 0, 0])
  assert m.round_plan(server, 0, 1, np.array([0, 1])).spec.state_update is not None
  # A new task starts afresh.
  server = m.begin_task(server, 1, jax.random.key(3))
  assert not np.any(np.asarray(server['extra']['coda_lwf.fixed']))


# ------------------------------------------------------------- on the loop


def _rounds(workdir):
  return [json.loads(l) for l in open(workdir / 'metrics.jsonl') if '"round"' in l]


def test_dualprompt_runs_on_the_same_loop(tmp_path):
  """What is trained and sent, exactly, on the tiny ViT (width 64, depth 2, 10 classes)."""
  c = smoke_config(method='dualprompt', **{'dualprompt.g_layers': (0,),
                                           'dualprompt.e_layers': (1,)})
  res = simulate.run(c, str(tmp_path), progress=False)
  assert res['method'] == 'dualprompt' and 0.0 <= res['final_accuracy'] <= 1.0
  rounds = _rounds(tmp_path)
  assert len(rounds) == 4 and all(np.isfinite(r['train_loss']) for r in rounds)
  # head + G (1 block x 2 x 5 x 64) + E (1 block x 2 x 10 entries x 20 x 64) + 10 keys
  up = 64 * 10 + 10 + 2 * 5 * 64 + 2 * 10 * 20 * 64 + 10 * 64
  assert {r['factors'] for r in rounds} == {''}
  assert {r['upload_bytes_per_client'] for r in rounds} == {4 * up}
  assert {r['download_bytes_per_client'] for r in rounds} == {4 * (up + 2)}  # + forced entry, flag


@pytest.fixture(scope='module')
def coda_lwf_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('coda_lwf')
  return workdir, simulate.run(smoke_config(method='coda_lwf'), str(workdir), progress=False)


def test_coda_lwf_runs_on_the_same_loop(coda_lwf_run):
  workdir, res = coda_lwf_run
  assert res['method'] == 'coda_lwf' and 0.0 <= res['final_accuracy'] <= 1.0
  rounds = _rounds(workdir)
  assert len(rounds) == 4 and all(np.isfinite(r['train_loss']) for r in rounds)
  up = 64 * 10 + 10 + 2 * 100 * (8 * 64 + 64 + 64)  # as coda_p
  # + live and trained masks, the teacher (the head dict again), alpha, temp; the
  # client's own class score sums stay with it (RoundPlan.client_state)
  down = up + 2 * 100 + up + 2
  assert {r['upload_bytes_per_client'] for r in rounds} == {4 * up}
  assert {r['download_bytes_per_client'] for r in rounds} == {4 * down}


def test_coda_lwf_scores_survive_kill_and_resume(coda_lwf_run, tmp_path):
  _, full = coda_lwf_run
  cfg, workdir = smoke_config(method='coda_lwf'), str(tmp_path)
  assert simulate.run(cfg, workdir, max_rounds=1, progress=False) == {}  # sums fixed after it
  assert simulate.run(cfg, workdir, max_rounds=2, progress=False) == {}  # crosses a task end
  assert strip_wall_time(simulate.run(cfg, workdir, progress=False)) == strip_wall_time(full)

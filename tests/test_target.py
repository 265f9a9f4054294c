"""TARGET (lorm_jax.methods.target): the generator, the synthesis's generator
step, the distillation losses against hand computations, the server-side
task boundary on a tiny ViT, and a shrunk smoke run through the loop."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import smoke_config
from lorm_jax.methods import interface, make_method
from lorm_jax.methods import target as T
from lorm_jax.models import functional as F, vit
from lorm_jax.models import generator as G

# A synthesis small enough for a test: 3 rounds of 4 steps, the adversarial
# term and the student's distillation from round 2 on.
SHRUNK = {'syn_round': 3, 'warmup': 2, 'g_steps': 4, 'kd_steps': 3, 'ngf': 8, 'nz': 32}


def _config(**target):
  c = smoke_config(method='target')
  c.unlock()
  for k, v in target.items():
    c.target[k] = v
  c.lock()
  return c


@pytest.fixture(scope='module')
def tiny():
  """(FunctionalViT, Params, theta {'a', 'b', 'head'}) of the smoke model: the
  tiny ViT at 28 px, 10 classes, rank 2, with a non-zero b."""
  cfg = vit.architecture('tiny', image_size=28, num_classes=10, lora_rank=2)
  fm = F.FunctionalViT(vit.ViT(cfg, rngs=nnx.Rngs(0)))
  p = fm.initial_params()
  a, b = F.init_lora(jax.random.key(1), p.a, p.b)
  b = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.key(7), x.shape), b)
  head = F.init_head(jax.random.key(2), cfg.width, 10)
  return fm, p, {'a': a, 'b': b, 'head': head}


def _synthesizer(fm, **over):
  method = make_method('target', _config(**{**SHRUNK, **over}))
  spec = method.train_preprocess_spec()
  from lorm_jax.data import augment  # pylint: disable=import-outside-toplevel
  pre = lambda k, x: augment.preprocess(k, x, spec)
  return method, T.Synthesizer(method.synthesis_spec(), fm, pre, spec.mean, spec.std)


# ------------------------------------------------------------- generator


def test_generator_output_shape_range_and_size_check():
  gen = G.FunctionalGenerator(G.Generator(256, 64, 28, 3, rngs=nnx.Rngs(0)))
  params = gen.initial_params()
  assert params['l1']['kernel'].shape == (256, 128 * 7 * 7)
  assert params['conv3']['kernel'].shape == (3, 3, 64, 3)
  x = jax.jit(gen.apply)(params, jax.random.normal(jax.random.key(0), (5, 256)))
  assert x.shape == (5, 28, 28, 3) and x.dtype == jnp.float32
  assert float(jnp.min(x)) > 0.0 and float(jnp.max(x)) < 1.0 and float(jnp.std(x)) > 1e-3
  # torch's default init: |w| <= 1/sqrt(fan_in)
  assert float(jnp.max(jnp.abs(params['l1']['kernel']))) <= 1 / math.sqrt(256) + 1e-7
  assert float(jnp.max(jnp.abs(params['conv1']['kernel']))) <= 1 / math.sqrt(9 * 128) + 1e-7
  with pytest.raises(ValueError, match='multiple of 4'):
    G.Generator(8, 4, 30, 3, rngs=nnx.Rngs(0))
  reset = G.reset_l1(params, jax.random.key(1))
  assert float(jnp.max(jnp.abs(reset['l1']['bias']))) == 0.0
  assert abs(float(jnp.std(reset['l1']['kernel'])) - 0.02) < 1e-3


# ------------------------------------------------------ the generator step


def test_generator_step_decreases_the_loss_on_a_fixed_batch(tiny):
  fm, p, theta = tiny
  _, syn = _synthesizer(fm)
  s = syn.spec
  teacher = {'frozen': p.frozen, **theta}
  student = T.reinit_student(p.frozen, theta['head'], jax.random.key(3))
  gen = G.FunctionalGenerator(syn.new_generator(jax.random.key(4))).initial_params()
  z = jax.random.normal(jax.random.key(5), (s.batch, s.nz))
  targets = jnp.arange(s.batch) % 9
  key = jax.random.key(6)  # one key: the same crops and flips every step
  first_grad = jax.grad(lambda g: syn.gen_loss(g, z, targets, key, teacher, student, False)[0])(
      gen)
  carry = syn.init_inner(gen, z)
  losses = []
  for _ in range(8):
    carry, out = syn.gen_step(carry, targets, key, teacher, student, adv_on=False)
    losses.append(float(out[0]))
    if len(losses) == 1:  # FOMAML: the meta gradient starts as the first step's gradient
      for x, y in zip(jax.tree.leaves(carry['meta_grad']), jax.tree.leaves(first_grad)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)
  assert losses[-1] < losses[0] - 1e-3, losses
  assert float(carry['best_loss']) == pytest.approx(min(losses), rel=1e-6)
  assert float(jnp.max(jnp.abs(carry['z'] - z))) > 0  # z is trained too
  # The adversarial step runs the student as well and gives a finite, non-positive term.
  carry, out = syn.gen_step(carry, targets, key, teacher, student, adv_on=True)
  assert np.isfinite(np.asarray(out)).all() and float(out[2]) <= 0.0
  assert float(out[3]) == 0.0  # the BN term: no BatchNorm in a ViT


# ---------------------------------------------------------- loss terms


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_div_and_soft_cross_entropy_by_hand():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
  # kl_div: sum_c p_t (log p_t - log p_s) at T, x T^2 (the reference's kldiv)
  lp = _np_log_softmax(t.astype(np.float64) / 20.0)
  lq = _np_log_softmax(s.astype(np.float64) / 20.0)
  want = (np.exp(lp) * (lp - lq)).sum(-1) * 400.0
  # float32 at T = 20: log-probabilities differ by ~1e-2, so ~1e-3 relative
  np.testing.assert_allclose(np.asarray(T.kl_div(jnp.asarray(s), jnp.asarray(t), 20.0)), want,
                             rtol=1e-3)
  # soft CE over the first 3 classes (the reference's [:, :cur_offset]), / B
  mask = np.arange(6) < 3
  p = np.exp(_np_log_softmax(t[:, :3] / 2.0))
  want = -(p * _np_log_softmax(s[:, :3] / 2.0)).sum() / 4
  got = T.soft_cross_entropy(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), 2.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_client_synthetic_kd_matches_a_hand_computation(tiny):
  fm, p, theta = tiny
  from lorm_jax.federated import client  # pylint: disable=import-outside-toplevel
  method = make_method('target', _config())
  forward = client.bind_forward(interface.linear_head_forward, fm, p.frozen, {})
  # every pool image the same: whichever 16 the term draws, x is known
  img = jax.random.randint(jax.random.key(0), (1, 28, 28, 3), 0, 256).astype(jnp.uint8)
  pool = jnp.repeat(img, 40, axis=0)
  teacher = {**theta, 'head': jax.tree.map(lambda x: 1.5 * x + 0.01, theta['head'])}
  old = jnp.arange(10) < 5
  aux = {'pool': pool, 'teacher': teacher, 'old': old, 'alpha': jnp.float32(25.0),
         'temp': jnp.float32(2.0)}
  x0 = jnp.zeros((2, 28, 28, 3))
  logits, feats = forward(theta['a'], theta['b'], theta['head'], x0)
  batch = interface.Batch(theta, aux, x0, jnp.zeros(2, jnp.int32), jnp.ones(2), logits, feats,
                          jnp.arange(10) >= 5, forward, key=jax.random.key(9))
  term = method.loss_term(1)
  assert term is not None and method.loss_term(0) is None
  hash(method.local_spec(1, 0))  # the spec stays hashable (a static jit argument)
  got = float(term(batch))
  x = np.asarray(T.augment.preprocess(None, img, method.train_preprocess_spec()))
  s, _ = forward(theta['a'], theta['b'], theta['head'], jnp.asarray(x))
  t, _ = forward(teacher['a'], teacher['b'], teacher['head'], jnp.asarray(x))
  s, t = np.asarray(s)[0, :5], np.asarray(t)[0, :5]
  per_image = -(np.exp(_np_log_softmax(t / 2.0)) * _np_log_softmax(s / 2.0)).sum()
  np.testing.assert_allclose(got, 25.0 * per_image, rtol=1e-4)  # 16 equal rows / 16
  # the teacher is frozen: no gradient reaches it through the term
  g = jax.grad(lambda tt: term(batch._replace(aux={**aux, 'teacher': tt})))(teacher)
  assert max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g)) == 0.0


def test_train_aux_old_classes_and_preprocessing_match_the_loop():
  from lorm_jax.federated import setup  # pylint: disable=import-outside-toplevel
  c = _config()
  method = make_method('target', c)
  assert method.syn_round == 30 and method.g_steps == 80 and method.kd_alpha == 25.0
  assert make_method('target', smoke_config()).warmup == 20  # defaults = the reference's
  k = 10
  server = {'a': {}, 'b': {}, 'head': {'kernel': jnp.zeros((4, k)), 'bias': jnp.zeros(k)},
            'extra': {'pool': jnp.zeros((48, 28, 28, 3), jnp.uint8), 'teacher': {}}}
  assert method.train_aux(server, 0) == {}
  aux = method.train_aux(server, 1)
  assert np.asarray(aux['old']).tolist() == [True] * 5 + [False] * 5
  train, _ = setup.preprocessors(c)
  imgs = jax.random.randint(jax.random.key(0), (3, 28, 28, 3), 0, 256).astype(jnp.uint8)
  key = jax.random.key(1)
  np.testing.assert_array_equal(
      np.asarray(train(key, imgs)),
      np.asarray(T.augment.preprocess(key, imgs, method.train_preprocess_spec())))
  with pytest.raises(ValueError, match='multiple of 4'):
    T.TARGET.validate(smoke_config(method='target', image_size=30))


# ------------------------------------------------------- the task boundary


def test_student_reinit_redraws_linear_layers_and_keeps_the_rest(tiny):
  _, p, theta = tiny
  st = T.reinit_student(p.frozen, theta['head'], jax.random.key(0))
  qkv = 'blocks.0.attn.qkv'
  w = st['frozen'][qkv + '.kernel']
  assert abs(float(jnp.std(w)) - math.sqrt(2.0 / (64 + 192))) < 0.01
  assert abs(float(jnp.std(st['frozen'][qkv + '.bias'])) - 1.0) < 0.2
  pk = st['frozen']['patch_kernel']  # a conv: fans x p^2
  assert abs(float(jnp.std(pk)) - math.sqrt(2.0 / (49 * (3 + 64)))) < 0.005
  for name in ('pos_embed', 'cls_token', 'norm.scale', 'blocks.0.norm1.bias', 'blocks.0.ls1'):
    np.testing.assert_array_equal(np.asarray(st['frozen'][name]), np.asarray(p.frozen[name]))
    assert st['frozen'][name] is not p.frozen[name]  # copies: the KD step donates them
  assert abs(float(jnp.std(st['head']['bias'])) - 1.0) < 0.5


def test_after_task_fills_the_pool_and_snapshots_the_teacher(tiny, capsys):
  fm, p, theta = tiny
  method = make_method('target', _config(**SHRUNK))
  assert method.pool_size == 48
  server = method.init_server(p, theta['head'], jax.random.key(0))
  assert server['extra']['pool'].shape == (48, 28, 28, 3)
  server = {**server, **theta}
  from lorm_jax.data import augment  # pylint: disable=import-outside-toplevel
  spec = method.train_preprocess_spec()
  backbone = interface.ServerBackbone(fm, p.frozen, lambda k, x: augment.preprocess(k, x, spec))
  new = method.after_task(server, 0, backbone, jax.random.key(1))
  pool = np.asarray(new['extra']['pool'])
  assert pool.dtype == np.uint8 and pool.std() > 0
  assert all(pool[i].std() > 0 for i in range(48))  # every slot written
  for k in ('a', 'b', 'head'):
    for x, y in zip(jax.tree.leaves(new['extra']['teacher'][k]), jax.tree.leaves(theta[k])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  info = {k: float(v) for k, v in new['extra']['synthesis'].items()}
  assert info['seconds'] > 0 and info['flops'] > 0 and info['bytes_accessed'] > 0
  assert np.isfinite(list(info.values())).all()
  assert jax.tree.structure(new) == jax.tree.structure(server)  # checkpoint layout unchanged
  # the second boundary reuses the compiled steps
  again = method.after_task(new, 1, backbone, jax.random.key(2))
  assert float(again['extra']['synthesis']['compile_seconds']) == 0.0
  # with the progress bar, which waits for each round's losses: the same pool
  capsys.readouterr()
  shown = method.after_task(server, 0, backbone._replace(progress=True), jax.random.key(1))
  assert 'synthesis' in capsys.readouterr().err
  np.testing.assert_array_equal(np.asarray(shown['extra']['pool']), pool)
  # last_task_synthesis off: only the teacher snapshot after the last task
  off = make_method('target', _config(**SHRUNK, last_task_synthesis=False))
  kept = off.after_task(new, 1, backbone, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(kept['extra']['pool']), pool)


def test_synthesis_inputs_go_to_one_device():
  # A run's server state is replicated over its devices; a step compiled for
  # replicated inputs would run whole on each of them (on a CPU, sharing its cores).
  code = textwrap.dedent('''
      import jax, jax.numpy as jnp, numpy as np
      jax.config.update('jax_num_cpu_devices', 2)
      from jax.sharding import Mesh, NamedSharding, PartitionSpec
      from lorm_jax.methods.target import on_one_device
      mesh = Mesh(np.array(jax.devices()), ('clients',))
      tree = {'w': jnp.arange(6.0).reshape(2, 3), 'key': jax.random.key(3),
              'sharded': jnp.arange(4.0)}
      rep = jax.device_put({k: tree[k] for k in ('w', 'key')}, NamedSharding(mesh, PartitionSpec()))
      rep['sharded'] = jax.device_put(tree['sharded'], NamedSharding(mesh, PartitionSpec('clients')))
      assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(rep))
      one = on_one_device(rep)
      for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(tree)):
        assert x.sharding.device_set == {jax.local_devices()[0]}, x.sharding
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
          np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
      np.testing.assert_array_equal(jax.random.key_data(one['key']), jax.random.key_data(tree['key']))
      out = jax.jit(lambda t: t['w'] * 2 + jax.random.normal(t['key'], (3,)))(one)
      assert out.sharding.device_set == {jax.local_devices()[0]}
      print('ok')
      ''')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=False)
  assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stderr[-2000:]


def test_smoke_run_through_the_loop(tmp_path):
  from lorm_jax.federated import simulate  # pylint: disable=import-outside-toplevel
  results = simulate.run(_config(**SHRUNK), str(tmp_path), progress=False)
  acc = results['accuracy_per_task_end']
  assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)
  evals = [l for l in map(json.loads, open(tmp_path / 'metrics.jsonl')) if l['kind'] == 'eval']
  # The task's synthesis is in its eval line: seconds, and XLA's FLOP count.
  assert evals[0]['synthesis_seconds'] > 0 and evals[0]['synthesis_flops'] > 0

"""End-to-end properties of the federated simulation on configs/smoke.py."""
from __future__ import annotations

import functools
import importlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import smoke_config, strip_wall_time as _strip
from lorm_jax import errors, runtime
from lorm_jax.data import augment
from lorm_jax.data.errors import DataError
from lorm_jax.federated import batching, client, setup, simulate
from lorm_jax.methods import interface
from lorm_jax.models import functional as F, vit

PAPER_CONFIGS = ['cifar100', 'imagenet_r', 'imagenet_a', 'eurosat', 'cub200', 'cars196']


def test_results_json_shapes_and_ranges(smoke_run):
  workdir, results = smoke_run
  with open(os.path.join(workdir, 'results.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results))
  t = saved['num_tasks']
  assert t == 2
  acc = saved['accuracy_matrix']
  assert len(acc) == t and all(len(row) == t for row in acc)
  for i, row in enumerate(acc):
    for j, v in enumerate(row):
      if j <= i:
        assert 0.0 <= v <= 1.0
      else:
        assert v is None
  assert 0.0 <= saved['final_accuracy'] <= 1.0
  assert saved['final_accuracy'] == saved['accuracy_per_task_end'][-1]
  assert saved['per_task_accuracy'] == acc[-1]
  assert math.isclose(saved['forgetting'], acc[0][0] - acc[1][0], abs_tol=1e-9)
  assert saved['comm_bytes_total'] == saved['comm_bytes_upload'] + saved['comm_bytes_download'] > 0
  assert saved['merge_fallbacks'] >= 0 and saved['wall_seconds'] > 0
  assert (saved['method'], saved['dataset'], saved['seed']) == ('lorm', 'fashion_mnist', 0)
  # what computed it, for tables that gather runs from several machines
  assert (saved['adapter'], saved['compute_dtype']) == ('lora', 'float32')
  assert saved['machine'] == runtime.cpu_kind() and saved['devices'].endswith('x cpu')
  for name in ('config.json', 'metrics.jsonl', 'split.json', 'accuracy_matrix.png',
               'accuracy_per_task.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  rounds = [l for l in lines if l['kind'] == 'round']
  assert len(rounds) == 2 * 2 and [r['factors'] for r in rounds] == ['b', 'a', 'b', 'a']
  assert all(np.isfinite(r['train_loss']) for r in rounds)
  # Peak memory so far: never decreasing, and at least the model's size.
  rss = [r['peak_rss_mib'] for r in rounds]
  assert rss == sorted(rss) and rss[0] > 50
  assert len([l for l in lines if l['kind'] == 'eval']) == 2


def test_resume_after_kill_gives_identical_results(smoke_run, tmp_path):
  _, full = smoke_run
  workdir = str(tmp_path / 'resumed')
  cfg = smoke_config()
  assert simulate.run(cfg, workdir, max_rounds=1, progress=False) == {}
  assert simulate.run(cfg, workdir, max_rounds=2, progress=False) == {}  # crosses a task end
  resumed = simulate.run(cfg, workdir, progress=False)
  assert _strip(resumed) == _strip(full)
  lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
  assert len(lines) == 2 * 2 + 2


def test_replayed_round_reproduces_the_run_and_other_draws_differ(tmp_path):
  """experiments.replay_round: the round after a checkpoint, replayed with the
  run's own draws, gives the run's next checkpoint bit for bit; other draws
  train a different model; every replay is evaluated."""
  from experiments import replay_round
  workdir = str(tmp_path)
  assert simulate.run(smoke_config(), workdir, max_rounds=2, progress=False,
                      keep_checkpoints=0) == {}
  records = replay_round.replay(workdir, step=1, shuffles=2)
  own, other = records
  assert (own['task'], own['round'], own['shuffle']) == (0, 1, 0)
  assert own['max_abs_diff_to_run'] == 0.0
  assert 'max_abs_diff_to_run' not in other
  assert other['train_loss'] != own['train_loss']
  assert all(0.0 <= r['test_accuracy'] <= 1.0 for r in records)
  with pytest.raises(errors.CheckpointError, match='no checkpoint 9'):
    replay_round.replay(workdir, step=9, shuffles=1)


def test_resume_truncates_metrics_written_after_the_checkpoint(smoke_run, tmp_path):
  _, full = smoke_run
  workdir = str(tmp_path / 'w')
  cfg = smoke_config()
  simulate.run(cfg, workdir, max_rounds=1, progress=False)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"kind": "round", "partial": true}\n')  # a line the killed process wrote
  assert _strip(simulate.run(cfg, workdir, progress=False)) == _strip(full)
  assert 'partial' not in open(os.path.join(workdir, 'metrics.jsonl')).read()


def test_sequential_client_mode_matches_vmap(smoke_run, tmp_path):
  _, full = smoke_run
  seq = simulate.run(smoke_config(client_mode='sequential'), str(tmp_path / 's'), progress=False)
  np.testing.assert_allclose(np.array(seq['accuracy_matrix'], float),
                             np.array(full['accuracy_matrix'], float), atol=1e-6, equal_nan=True)


def test_client_chunks_do_not_change_results(smoke_run, tmp_path):
  """3 clients in chunks of 2 (the second padded with an empty client) = all 3 at once."""
  workdir, full = smoke_run
  chunked = simulate.run(smoke_config(clients_per_chunk=2), str(tmp_path / 'c'), progress=False)
  np.testing.assert_allclose(np.array(chunked['accuracy_matrix'], float),
                             np.array(full['accuracy_matrix'], float), atol=1e-6, equal_nan=True)
  loss = lambda d: [r['train_loss'] for r in map(json.loads, open(os.path.join(d, 'metrics.jsonl')))
                    if r['kind'] == 'round']
  np.testing.assert_allclose(loss(str(tmp_path / 'c')), loss(workdir), rtol=1e-5)
  assert chunked['comm_bytes_total'] == full['comm_bytes_total']


def test_bfloat16_backbone_trains_like_float32(smoke_run, tmp_path):
  """model.dtype=bfloat16 (the reference's precision as released): on the same
  draws the first round's training loss is within bfloat16 rounding of the
  float32 run's, and the run completes with valid results."""
  workdir, full = smoke_run
  res = simulate.run(smoke_config(**{'model.dtype': 'bfloat16'}), str(tmp_path), progress=False)
  rounds = lambda d: [r for r in map(json.loads, open(os.path.join(d, 'metrics.jsonl')))
                      if r['kind'] == 'round']
  first16, first32 = rounds(str(tmp_path))[0], rounds(workdir)[0]
  assert first16['train_loss'] != first32['train_loss']  # it did compute in bfloat16
  np.testing.assert_allclose(first16['train_loss'], first32['train_loss'], rtol=3e-2)
  assert 0.0 <= res['final_accuracy'] <= 1.0 and res['merge_fallbacks'] == 0
  assert len(res['accuracy_matrix']) == len(full['accuracy_matrix'])


def test_fedavg_runs_on_the_same_loop(tmp_path):
  """FedAvg of the LoRA factors; the evaluated model is W0 + the mean task delta."""
  res = simulate.run(smoke_config(method='fedavg'), str(tmp_path), progress=False)
  assert res['method'] == 'fedavg' and 0.0 <= res['final_accuracy'] <= 1.0
  assert res['merge_fallbacks'] == 0


# ---------------------------------------------------------------------------
# Local training: padding and masking change nothing.


def _tiny_model():
  cfg = vit.ViTConfig(image_size=14, patch_size=7, width=16, depth=1, num_heads=2, mlp_dim=32,
                      num_classes=4, lora_rank=2)
  return F.FunctionalViT(vit.ViT(cfg, rngs=nnx.Rngs(0)))


def _tiny_client(num_images: int):
  """A tiny ViT's params, fresh LoRA factors and head, num_images random
  14x14 images with labels 0/1, and the un-augmented preprocessing."""
  fm = _tiny_model()
  p = fm.initial_params()
  a, b = F.init_lora(jax.random.key(1), p.a, p.b)
  head = F.init_head(jax.random.key(2), 16, 4)
  images = jax.random.randint(jax.random.key(3), (num_images, 14, 14, 1), 0, 255).astype(jnp.uint8)
  labels = jnp.arange(num_images, dtype=jnp.int32) % 2
  pre_spec = augment.preset('fashion_mnist', 14, train=False)
  pre = lambda k, x: augment.preprocess(k, x, pre_spec)
  return fm, p, a, b, head, images, labels, pre


def test_padded_steps_and_samples_do_not_change_a_client():
  fm, p, a, b, head, images, labels, pre = _tiny_client(20)
  spec = interface.LocalSpec(('b',), lr_a=1e-2, lr_b=1e-2, lr_head=1e-2)
  cm = jnp.array([True, True, False, False])
  own = [np.arange(11)]
  rng = lambda c: np.random.default_rng(0)
  idx, mask = batching.client_batch_plan(own, 4, 2, rng)              # (1, 6, 4)
  idx_p, mask_p = batching.client_batch_plan(own, 4, 2, rng, num_steps=9)  # 3 padded steps
  assert idx.shape == (1, 6, 4) and idx_p.shape == (1, 9, 4)
  assert mask[0, 2].tolist() == [1, 1, 1, 0]  # the partial last batch of an epoch
  run = lambda i, m: client.local_train(
      fm, interface.linear_head_forward, spec, pre, frozen=p.frozen, a=a, b=b, head=head,
      images=images, labels=labels, idx=jnp.asarray(i[0]), mask=jnp.asarray(m[0]),
      key=jax.random.key(4), class_mask=cm)
  a1, b1, h1, s1, _ = run(idx, mask)
  a2, b2, h2, s2, _ = run(idx_p, mask_p)
  for x, y in zip(jax.tree.leaves((a1, b1, h1)), jax.tree.leaves((a2, b2, h2))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert float(s1['seen']) == float(s2['seen']) == 22 and int(s2['steps']) == 6
  # The padded sample of a partial batch does not count: change its image, same result.
  idx_x = idx.copy()
  idx_x[0, 2, 3] = 19
  a3, b3, h3, _, _ = run(idx_x, mask)
  np.testing.assert_array_equal(np.asarray(h3['kernel']), np.asarray(h1['kernel']))
  # Training really moved b and left the frozen factor a alone.
  assert not np.allclose(np.asarray(jax.tree.leaves(b1)[0]), 0.0)
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(a1)[0]),
                                np.asarray(jax.tree.leaves(a)[0]))


def test_half_batches_train_like_full_batches():
  """A partial batch that fits in half a batch, run at half size (the CPU
  path), trains the client as the full-size padded batch does."""
  fm, p, a, b, head, images, labels, pre = _tiny_client(40)
  own = [np.arange(19)]   # batches of 8: 8, 8, 3 (fits in 4) per epoch
  idx, mask = batching.client_batch_plan(own, 8, 2, lambda c: np.random.default_rng(0),
                                         num_steps=8)
  for factors in (('a',), ('b',)):
    spec = interface.LocalSpec(factors, lr_a=1e-2, lr_b=1e-2, lr_head=1e-2)
    run = lambda half: client.local_train(
        fm, interface.linear_head_forward, spec, pre, half, frozen=p.frozen, a=a, b=b,
        head=head, images=images, labels=labels, idx=jnp.asarray(idx[0]),
        mask=jnp.asarray(mask[0]), key=jax.random.key(4), class_mask=jnp.arange(4) < 2)
    full, half = run(False), run(True)
    for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(half)):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-5, atol=1e-6)
    assert float(half[3]['seen']) == 38 and int(half[3]['steps']) == 6


def test_loss_ignores_other_tasks_classes():
  logits = jnp.array([[2.0, 1.0, 50.0, -3.0]])
  cm = jnp.array([True, True, False, False])
  loss, correct = interface.masked_cross_entropy(logits, jnp.array([0]), cm, jnp.ones(1))
  expected = -jax.nn.log_softmax(jnp.array([2.0, 1.0]))[0]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(correct) == 1.0


# ---------------------------------------------------------------------------
# Configs and bad input.


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_paper_configs_build_and_validate(name, tmp_path):
  mod = importlib.import_module(f'configs.{name}')
  c = mod.get_config()
  setup.validate_config(c)
  assert c.model.name == 'augreg_b16' and c.image_size == 224 and c.num_clients == 10
  betas = list(importlib.import_module('configs.paper').PAPER[c.dataset.name]['betas'])
  assert c.beta == betas[0]
  other = mod.get_config(f'beta={betas[-1]}')
  assert other.beta == betas[-1]
  with pytest.raises(ValueError, match='not a paper setting'):
    mod.get_config('beta=0.77')
  with pytest.raises(AttributeError):
    c.not_a_field = 1  # locked
  # The model builds (abstractly) with the benchmark's classes.
  num_classes = {'cifar100': 100, 'eurosat': 10, 'cars196': 196}.get(c.dataset.name, 200)
  cfg = vit.architecture(c.model.name, image_size=c.image_size, num_classes=num_classes,
                         lora_rank=c.model.rank)
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  assert model.head.kernel.get_value().shape == (768, num_classes)
  # With no prepared data (and downloads off) the run stops at once with a
  # DataError naming where it looked; tests/test_download.py covers downloads.
  assert c.dataset.download and c.model.download
  c.unlock()
  c.dataset.data_dir = str(tmp_path / 'no_data_here')
  c.dataset.download = False
  c.lock()
  with pytest.raises(DataError, match='no_data_here'):
    setup.build_experiment(c, str(tmp_path / 'w'))


def test_benchmark_config_has_the_imagenet_r_shape():
  from configs import bench_vit_b16, imagenet_r
  c, ref = bench_vit_b16.get_config(), imagenet_r.get_config()
  setup.validate_config(c)
  assert c.dataset.name == 'synthetic' and c.model.weights == 'random'
  same = ('model.name', 'model.rank', 'image_size', 'num_tasks', 'num_clients', 'rounds',
          'local_epochs', 'batch_size', 'lr_head', 'alpha_head')
  get = lambda cfg, k: functools.reduce(getattr, k.split('.'), cfg)
  assert all(get(c, k) == get(ref, k) for k in same)


@pytest.mark.parametrize('override,match', [
    (dict(method='nope'), 'unknown method'),
    (dict(**{'dataset.name': 'mnist_plus'}), 'mnist_plus'),
    (dict(**{'model.rank': 0}), 'rank must be an integer >= 1'),
    (dict(beta=0.0), 'beta must be a finite number > 0'),
    (dict(num_tasks=3), 'do not divide'),
    (dict(num_clients=50), 'need more data'),
    (dict(schedule='zigzag'), 'unknown schedule'),
    (dict(alpha_head=1.5), 'alpha'),
])
def test_bad_config_fails_with_one_line_error(override, match, tmp_path):
  with pytest.raises(ValueError, match=match) as info:
    setup.build_experiment(smoke_config(**override), str(tmp_path))
  assert '\n' not in str(info.value)


def test_workdir_of_another_run_is_refused(tmp_path):
  setup.prepare_workdir(smoke_config(), str(tmp_path))
  with pytest.raises(setup.ConfigError, match='different config'):
    setup.check_workdir(smoke_config(seed=3), str(tmp_path))
  setup.check_workdir(smoke_config(seed=3, overwrite=True), str(tmp_path))
  setup.prepare_workdir(smoke_config(seed=3, overwrite=True), str(tmp_path))
  assert json.load(open(tmp_path / 'config.json'))['seed'] == 3
  (tmp_path / 'metrics.jsonl').write_text('{}\n')
  setup.prepare_workdir(smoke_config(seed=3, overwrite=True), str(tmp_path))  # same config
  assert (tmp_path / 'metrics.jsonl').exists()   # overwrite wipes only another config's run


def test_divergence_stops_before_anything_is_saved(tmp_path):
  """An absurd learning rate: the run stops with one line naming task, round
  and client, and no checkpoint or metrics line holds the diverged round."""
  from lorm_jax.errors import DivergenceError  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / 'w')
  cfg = smoke_config(lr_head=1e30, lr_a=1e30, lr_b=1e30)
  with pytest.raises(DivergenceError, match=r'non-finite training loss at task 0, round 0, '
                     r'client \d') as info:
    simulate.run(cfg, workdir, progress=False)
  assert '\n' not in str(info.value)
  assert not os.listdir(os.path.join(workdir, 'checkpoints'))
  assert not os.path.exists(os.path.join(workdir, 'metrics.jsonl')) or \
      open(os.path.join(workdir, 'metrics.jsonl')).read() == ''


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(smoke_run, tmp_path, capsys):
  """Kill after 3 steps, damage every file of the newest step, resume: the run
  says so in one line, redoes that step from the one before and ends with the
  uninterrupted run's results."""
  _, full = smoke_run
  workdir = str(tmp_path / 'w')
  cfg = smoke_config()
  assert simulate.run(cfg, workdir, max_rounds=3, progress=False) == {}
  ckdir = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
  assert len(steps) == 2
  for root, _, names in os.walk(os.path.join(ckdir, str(steps[-1]))):
    for name in names:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00garbage')
  resumed = simulate.run(cfg, workdir, progress=False)
  captured = capsys.readouterr()
  warned = [l for l in (captured.out + captured.err).splitlines() if 'unreadable' in l]
  assert len(warned) == 1 and f'step {steps[-1]}' in warned[0]
  assert f'resuming from step {steps[0]}' in warned[0]
  assert _strip(resumed) == _strip(full)


def test_no_readable_checkpoint_is_a_one_line_error(tmp_path):
  from lorm_jax.errors import CheckpointError  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / 'w')
  cfg = smoke_config()
  assert simulate.run(cfg, workdir, max_rounds=1, progress=False) == {}
  ckdir = os.path.join(workdir, 'checkpoints')
  for root, _, names in os.walk(ckdir):
    for name in names:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00')
  with pytest.raises(CheckpointError, match='no readable checkpoint in .*checkpoints') as info:
    simulate.run(cfg, workdir, progress=False)
  assert '\n' not in str(info.value)


def test_ffa_lora_trains_only_b(tmp_path):
  res = simulate.run(smoke_config(method='ffa_lora'), str(tmp_path), progress=False)
  assert res['method'] == 'ffa_lora' and 0.0 <= res['final_accuracy'] <= 1.0
  rounds = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"round"' in l]
  assert {r['factors'] for r in rounds} == {'b'}


# ---------------------------------------------------------------------------
# Baselines on the same loop (lorm_jax/methods; properties in test_methods.py).


@pytest.mark.parametrize('method', ['joint', 'joint_fed', 'regmean', 'ewc', 'lwf', 'fedproto',
                                    'fisheravg', 'ccvr'])
def test_baseline_runs_on_the_same_loop(method, tmp_path):
  res = simulate.run(smoke_config(method=method), str(tmp_path), progress=False)
  assert res['method'] == method and 0.0 <= res['final_accuracy'] <= 1.0
  assert res['merge_fallbacks'] == 0
  rounds = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"round"' in l]
  assert {r['factors'] for r in rounds} == {'ab'}
  assert all(np.isfinite(r['train_loss']) for r in rounds)
  if method.startswith('joint'):
    # One task over all 10 classes, evaluated on all of them; `joint` is one client.
    assert res['num_tasks'] == 1 and res['accuracy_matrix'] == [[res['final_accuracy']]]
    assert res['num_clients'] == (1 if method == 'joint' else 3)
    assert len(rounds) == 2 and res['forgetting'] == 0.0
  else:
    assert res['num_tasks'] == 2 and len(rounds) == 4
  ab_head_bytes = 4 * (2 * 1536 + 64 * 10 + 10)  # tiny ViT: a, b of 2 blocks; head
  if method in ('fedproto', 'fisheravg', 'ccvr'):  # a statistic uploaded every round
    assert rounds[0]['upload_bytes_per_client'] > ab_head_bytes
  if method in ('fedproto', 'regmean') or method in ('lwf', 'ewc') and rounds[2]['task'] == 1:
    # Clients also download the method's train_deltas / train_aux (D, prototypes, teacher, ...).
    assert rounds[2]['download_bytes_per_client'] > ab_head_bytes
  if method == 'regmean':
    # The running full delta D (tiny ViT: 2 blocks of qkv, proj, fc1, fc2) is downloaded too.
    d_bytes = 4 * 2 * (64 * 192 + 64 * 64 + 64 * 128 + 128 * 64)
    assert rounds[0]['download_bytes_per_client'] > d_bytes


@pytest.mark.parametrize('method', ['regmean', 'ewc'])
def test_baseline_state_survives_kill_and_resume(method, tmp_path):
  """The methods' `extra` state (D; Fisher, anchor) is checkpointed with the rest."""
  cfg = smoke_config(method=method)
  full = simulate.run(cfg, str(tmp_path / 'full'), progress=False)
  workdir = str(tmp_path / 'resumed')
  assert simulate.run(cfg, workdir, max_rounds=2, progress=False) == {}  # up to the task end
  assert simulate.run(cfg, workdir, max_rounds=1, progress=False) == {}
  assert _strip(simulate.run(cfg, workdir, progress=False)) == _strip(full)


@pytest.mark.parametrize('method', ['l2p', 'coda_p', 'pilora'])
def test_prompt_and_prototype_methods_run_on_the_same_loop(method, tmp_path):
  """What is trained and uploaded, exactly, on the tiny ViT (width 64, depth 2, 10 classes)."""
  res = simulate.run(smoke_config(method=method), str(tmp_path), progress=False)
  assert res['method'] == method and res['num_tasks'] == 2 and 0.0 <= res['final_accuracy'] <= 1.0
  rounds = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"round"' in l]
  assert len(rounds) == 4 and all(np.isfinite(r['train_loss']) for r in rounds)
  head = 64 * 10 + 10
  if method == 'l2p':  # no LoRA; head + 10 prompts of 5 tokens + 10 keys
    up = down = head + 10 * 5 * 64 + 10 * 64
  elif method == 'coda_p':  # no LoRA; head + 2 blocks x 100 components (8 x 64 prompt, key, A)
    up = head + 2 * 100 * (8 * 64 + 64 + 64)
    down = up + 2 * 100  # + which components are live and which are trained
  else:  # block 0's qkv a (64, 2), b (2, 192); head + prototypes (10, 64)
    ab = 64 * 2 + 2 * 192
    up = ab + head + 10 * 64 + (10 + 10 * 64)  # + per-class counts and feature sums
    # + the frozen sums of old a and b, temp, the 2 old a's, their flags, seen, 4 weights
    down = ab + head + 10 * 64 + ab + 1 + 2 * 64 * 2 + 2 + 10 + 4
  assert {r['factors'] for r in rounds} == ({'ab'} if method == 'pilora' else {''})
  assert {r['upload_bytes_per_client'] for r in rounds} == {4 * up}
  assert {r['download_bytes_per_client'] for r in rounds} == {4 * down}



def test_participation_one_keeps_every_client_and_its_streams():
  """At participation_rate 1 every client holding data takes part, in order,
  with the RNG streams it had before client sampling existed."""
  from lorm_jax import rng  # pylint: disable=import-outside-toplevel
  np.testing.assert_array_equal(rng.participants(0, 1, 2, [5, 3, 7], 1.0), [0, 1, 2])
  np.testing.assert_array_equal(rng.participants(0, 1, 2, [5, 0, 7], 1.0), [0, 2])
  k = jax.random.key(3)
  ids = rng.participants(0, 0, 0, [1] * 4, 1.0)
  np.testing.assert_array_equal(jax.random.key_data(rng.client_keys(k, 4)),
                                jax.random.key_data(rng.client_keys(k, ids)))
  a = rng.numpy_rng(0, 'shuffle', 1, 2, 3).permutation(10)
  b = rng.numpy_rng(0, 'shuffle', 1, 2, ids[3]).permutation(10)
  np.testing.assert_array_equal(a, b)


def test_participation_draw_is_seeded_and_skips_empty_clients():
  from lorm_jax import rng  # pylint: disable=import-outside-toplevel
  sizes = [4, 0, 9, 3, 0, 8, 1, 2, 6, 5]
  draws = [rng.participants(7, t, r, sizes, 0.5) for t in range(3) for r in range(4)]
  assert all(len(d) == 4 and np.all(np.diff(d) > 0) for d in draws)   # round(0.5 * 8)
  assert all(1 not in d and 4 not in d for d in draws)
  assert len({tuple(d) for d in draws}) > 1                            # rounds differ
  again = [rng.participants(7, t, r, sizes, 0.5) for t in range(3) for r in range(4)]
  assert all(np.array_equal(x, y) for x, y in zip(draws, again))
  assert len(rng.participants(7, 0, 0, [0, 0, 5], 0.01)) == 1          # at least one


def test_clients_per_round_draws_a_fixed_count_among_eligible_clients():
  from lorm_jax import rng  # pylint: disable=import-outside-toplevel
  sizes = np.zeros(5000, int)
  sizes[::7] = 3                                  # 715 clients hold data of the task
  draws = [rng.participants(1, 0, r, sizes, 1.0, count=20) for r in range(5)]
  assert all(len(d) == 20 and np.all(sizes[d] > 0) for d in draws)
  assert len({tuple(d) for d in draws}) == 5
  np.testing.assert_array_equal(rng.participants(1, 0, 3, sizes, 0.1, count=20), draws[3])
  np.testing.assert_array_equal(rng.participants(1, 0, 0, [2, 0, 1], 1.0, count=20), [0, 2])


def test_half_participation_merges_exactly_the_drawn_clients_and_resumes(tmp_path, monkeypatch):
  """participation_rate 0.5 of 3 clients: 2 per round. The merge sees exactly
  the drawn clients (their sample counts as weights, nothing else); the draw
  and the results are the same after a kill and resume."""
  from lorm_jax import rng  # pylint: disable=import-outside-toplevel
  from lorm_jax.methods import lorm as lorm_lib  # pylint: disable=import-outside-toplevel
  seen = []
  original = lorm_lib.LoRM.aggregate

  def recording(self, server, results, task, rnd):
    seen.append((task, rnd, np.asarray(results.num_samples).tolist()))
    return original(self, server, results, task, rnd)

  monkeypatch.setattr(lorm_lib.LoRM, 'aggregate', recording)
  cfg = smoke_config(participation_rate=0.5)
  full = simulate.run(cfg, str(tmp_path / 'full'), progress=False)
  exp = setup.build_experiment(cfg, str(tmp_path / 'probe'))
  for task, rnd, weights in seen:
    sizes = [len(ix) for ix in exp.split[task]]
    ids = rng.participants(cfg.seed, task, rnd, sizes, 0.5)
    assert len(ids) == 2
    assert [w for w in weights if w > 0] == [float(sizes[i]) for i in ids]
  lines = [json.loads(l) for l in open(tmp_path / 'full' / 'metrics.jsonl')]
  drawn = [l['clients'] for l in lines if l['kind'] == 'round']
  assert len(drawn) == 4 and all(len(d) == 2 for d in drawn)
  workdir = str(tmp_path / 'resumed')
  assert simulate.run(cfg, workdir, max_rounds=3, progress=False) == {}
  assert _strip(simulate.run(cfg, workdir, progress=False)) == _strip(full)
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [l['clients'] for l in lines if l['kind'] == 'round'] == drawn

"""The benchmark scripts' main paths at tiny shapes, so that none of them rots.

Each runs in seconds on a CPU: the scripts' own entry points are called in-process
with their `--tiny` flag (which writes nothing to BENCHMARKS.md); the task run of
`experiments.gpu_check --tiny` is an `experiments.run` process, as on a GPU.
"""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_merge, bench_round, bench_synthesis, bench_ties, bench_train, gpu_check


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_train_tiny():
  rows = bench_train.main(['--tiny', '--repeats=1'])
  assert len(rows) == 1
  r = rows[0]
  for k in ('vmap', 'lax.map', 'python loop', 'gram', 'forward', 'train_gflops'):
    assert _positive(r[k]), (k, r[k])


def test_bench_train_vmap_breakdown_tiny():
  rows = bench_train.main(['--tiny', '--vmap-breakdown', '--repeats=1'])
  assert len(rows) == 1 and all(_positive(v) for k, v in rows[0].items() if k != 'name')


def test_bench_synthesis_tiny():
  out = bench_synthesis.main(['--tiny', '--repeats=1'])
  rows = out['rows']
  for r in rows.values():
    assert _positive(r['seconds']) and _positive(r['gflop']), r
  # The adversarial term adds the student's pass to a generator step.
  assert rows['gen_step, adv on']['gflop'] > rows['gen_step, adv off']['gflop']
  # 19 rounds without the student, 11 with it, 10 x 50 student steps (the reference's schedule).
  want = 80 * (19 * rows['gen_step, adv off']['gflop'] + 11 * rows['gen_step, adv on']['gflop']) \
      + 500 * rows['kd_step']['gflop']
  assert math.isclose(out['projection']['tflop'], want / 1e3, rel_tol=1e-9)


def test_bench_merge_tiny():
  rows = bench_merge.main(['--tiny', '--repeats=1'])
  assert {(r['kind'], r['alpha']) for r in rows} == {('A', 0.0), ('B', 0.0), ('A', 0.5),
                                                        ('B', 0.5)}
  for r in rows:
    assert _positive(r['jax']) and _positive(r['np']) and r['fallbacks'] == 0


def test_bench_round_renders_points():
  # The sweeps' rows and overrides, without their processes (the whole-run path,
  # which runs experiments.run, is exercised by test_gpu_check_tiny).
  o = bench_round.point_overrides(bench_round.SWEEPS['vit_b16'], clients=2, rank=1)
  assert o['num_clients'] == 2 and o['model.rank'] == 1 and o['dataset.train_per_class'] == 2
  point = dict(sweep='vit_b16', clients=2, rank=None, round=2.0, train=1.5, gram=0.4,
               merge=0.01, rss_gib=1.0, device_gib=3.0)
  text = bench_round.render([point], 'machine')
  assert '| vit_b16 | 2 | config | 2.00 | 1.50 | 0.40 | 10 | 1.00 | 1.00 | 3.00 |' in text


def test_gpu_check_tiny(tmp_path):
  out = tmp_path / 'gpu_check.json'
  result = gpu_check.main(['--tiny', f'--out={out}'])
  saved = json.loads(out.read_text())
  assert saved['mode'] == 'tiny' and result['tiny']
  assert set(saved['training']) == {'bfloat16', 'float32'}
  for t in saved['training'].values():
    for k in ('images_per_s', 'useful_tflops', 'step_ms', 'train_s', 'gram_s',
              'gram_images_per_s', 'train_compile_s'):
      assert _positive(t[k]), (k, t[k])
    assert _positive(t['train_memory']['total_bytes'])
  task = saved['task']
  for k in ('first_task_rounds_s', 'steady_round_s', 'train_s', 'gram_s', 'merge_s',
            'whole_run_extrapolated_s', 'peak_rss_gib'):
    assert _positive(task[k]), (k, task[k])
  assert task['tasks'] == 10 and task['rounds'] == 3
  assert _positive(saved['wall_s'])


def test_gpu_check_compile_only_tiny_on_cpu(tmp_path):
  # The compile-only path (abstract inputs, every program of the config) against
  # this machine's CPU; on a GPU target the same code compiles for the card.
  out = tmp_path / 'compile.json'
  gpu_check.main(['--compile-only', '--target=cpu', '--tiny', '--config=configs/bench_vit_b16.py',
                  '--clients=2', '--dtypes=float32', f'--out={out}'])
  rows = json.loads(out.read_text())['rows']
  names = {r['program'] for r in rows}
  assert names == {'train_B', 'train_A', 'gram_round', 'gram_task_end', 'merge_B', 'merge_A',
                   'cross_task_merge', 'eval_model', 'evaluate'}
  assert not [r for r in rows if 'error' in r]
  assert all(r['total_bytes'] > 0 for r in rows)


@pytest.mark.parametrize('target', sorted(gpu_check.TARGETS))
def test_gpu_target_files_name_their_card(target):
  text = (gpu_check.TARGETS_DIR / gpu_check.TARGETS[target]).read_text()
  assert 'gpu_device_info' in text and 'device_description_str' in text
  assert 'core_count' in text and 'device_memory_size' in text


def test_compile_table_per_client_memory_and_fits():
  gib = 2 ** 30
  row = lambda prog, n, total, **kw: dict(target='h100', device_kind='NVIDIA H100 80GB HBM3',
                                          dtype='float32', clients=n, program=prog,
                                          argument_bytes=gib, output_bytes=0, alias_bytes=0,
                                          temp_bytes=total - gib, code_bytes=0,
                                          total_bytes=total, **kw)
  rows = [row('train_B', 1, 6 * gib, flags='xla_gpu_enable_triton_gemm=false',
              error="JaxRuntimeError: INTERNAL: Couldn't find output tile sizes ..."),
          row('train_B', 10, 24 * gib), row('evaluate', 1, 3 * gib),
          dict(target='h100', device_kind='NVIDIA H100 80GB HBM3', dtype='float32', clients=10,
               program='train_A', error='JaxRuntimeError: INTERNAL: boom')]
  text = gpu_check.render_compile(rows, gib, 'cmd', 'machine')
  # 2 GiB per client over a 4 GiB base: (0.9 * 16e9 - 4 GiB) // 2 GiB = 4, ..., 80 GB -> 31.
  assert '| train_B | float32 | 10 | 1.00 | 23.00 | 24.00 | 2.00 | 4 / 8 / 14 / 31 |' in text
  assert '| train_B* | float32 | 1 | 1.00 | 5.00 | 6.00 |  |  |' in text
  assert '| evaluate | float32 | 1 | 1.00 | 2.00 | 3.00 |  | yes / yes / yes / yes |' in text
  assert '| train_A | float32 | 10 | compile error: JaxRuntimeError: INTERNAL: boom |' in text
  assert 'xla_gpu_enable_triton_gemm=false' in text


def test_bench_train_precision_tiny():
  """Both compute dtypes measured: matmul rate and one client's training step."""
  rows = bench_train.main(['--tiny', '--precision', '--repeats=1'])
  assert [r['dtype'] for r in rows] == ['float32', 'bfloat16']
  for r in rows:
    for k in ('compile_s', 'step_ms', 'train_gflops', 'matmul_gflops'):
      assert _positive(r[k]), (k, r[k])


def test_bench_ties_tiny_times_the_merge_and_its_thresholds():
  """The thresholds it times are each client's trim quantile of |task vector|."""
  assert bench_ties.TRIM == 0.7   # the reference's trim
  out = bench_ties.main(['--tiny', '--repeats=1'])
  assert out['quantiles_s'] > 0 and out['merge_s'] > 0
  tv = bench_ties.task_vectors(clients=2, rank=1, width=16, blocks=1, head=8, classes=2)
  got = bench_ties.quantiles(tv['a'], tv['b'], tv['head'], tv['server_head'])
  for i in range(2):
    deltas = [tv['a'][k][i] @ tv['b'][k][i] for k in tv['a']]
    flat = jnp.concatenate([d.ravel() for d in deltas] +
                           [(tv['head'][k][i] - tv['server_head'][k]).ravel()
                            for k in tv['head']])
    np.testing.assert_allclose(float(got[i]), float(jnp.quantile(jnp.abs(flat), bench_ties.TRIM)),
                               rtol=1e-6)

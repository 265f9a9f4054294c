"""Sizing clients_per_chunk and eval_batch_size to the device's memory
(lorm_jax/federated/sizing.py), on the CPU with a given memory limit."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from lorm_jax import errors
from lorm_jax.data import fmnist
from lorm_jax.federated import setup, simulate, sizing

try:
  from conftest import smoke_config   # tests/conftest.py, where the helper lives
except ImportError:  # pragma: no cover
  from tests.test_federated import smoke_config

AUTO = {'clients_per_chunk': 0, 'eval_batch_size': 0}


def _no_compile(probe):
  raise AssertionError(f'{probe.name} was compiled; nothing should be')


@pytest.fixture(autouse=True)
def _no_env_limit(monkeypatch):
  monkeypatch.delenv(sizing.ENV_LIMIT, raising=False)


@pytest.fixture(scope='module')
def smoke_figures():
  """The smoke config's per-client programs (3 clients), compiled once: 1 and 3 clients."""
  s = sizing.run_shapes(smoke_config(**AUTO))
  figures, data_args = {}, {}
  for p in sizing.probes(s, (1, 3), (8, 256)):
    figures.setdefault(p.name, {})[p.count] = sizing.program_bytes(sizing.compile_probe(p))
    data_args[p.name] = p.data_arguments
  return s, figures, data_args


def test_parse_bytes_and_limit_sources(monkeypatch):
  assert sizing.parse_bytes('24GiB') == sizing.parse_bytes('24G') == 24 * 2 ** 30
  assert sizing.parse_bytes('512 MiB') == 512 * 2 ** 20
  assert sizing.parse_bytes('2.5e10') == 25_000_000_000 == sizing.parse_bytes(2.5e10)
  for bad in ('lots', '-1G', '0'):
    with pytest.raises(errors.ConfigError, match=sizing.ENV_LIMIT):
      sizing.parse_bytes(bad)
  cpu = jax.devices('cpu')[0]
  assert sizing.device_memory_limit(cpu) == (None, 'none')   # XLA:CPU reports no memory
  monkeypatch.setenv(sizing.ENV_LIMIT, '3GiB')
  assert sizing.device_memory_limit(cpu) == (3 * 2 ** 30, sizing.ENV_LIMIT)
  assert sizing.device_memory_limit(cpu, '1GiB') == (2 ** 30, 'given')   # an argument wins


def test_choice_arithmetic_without_a_device():
  """The chunk and eval batch from given figures alone (what gpu_check feeds in)."""
  mib = 2 ** 20
  passes = {'train': sizing.PassFigures(sizing.Line(100 * mib, 1000 * mib), 1 * mib),
            'gram': sizing.PassFigures(sizing.Line(50 * mib, 300 * mib), 2 * mib)}
  choose = lambda limit, devices=1: sizing.choose_clients_per_chunk(
      limit, passes, clients=10, resident=2000 * mib, devices=devices, margin=0.1)
  assert choose(None) == 10
  chunks = [choose(g * 2 ** 30) for g in (40, 16, 8, 4, 3, 2)]
  assert chunks == sorted(chunks, reverse=True) and chunks[0] == 10 and chunks[-1] == 0
  assert 0 < chunks[3] < 10
  for limit in (40, 16, 8, 4):   # the chosen chunk fits, one more does not
    c = choose(limit * 2 ** 30)
    budget = 0.9 * limit * 2 ** 30
    assert sizing.need_bytes(passes, 2000 * mib, 10, c) <= budget
    assert c == 10 or sizing.need_bytes(passes, 2000 * mib, 10, c + 1) > budget
  assert choose(8 * 2 ** 30, devices=2) % 2 == 0   # a multiple of the devices
  line = sizing.Line(10 * mib, 1 * mib)
  assert sizing.choose_eval_batch(None, line) == sizing.EVAL_BATCH_MAX
  assert sizing.choose_eval_batch(2 ** 30, line) == 256
  assert sizing.choose_eval_batch(100 * mib, line, margin=0.0) == 64
  assert sizing.choose_eval_batch(5 * mib, line) == 0
  assert sizing.fit_line({1: 5.0, 3: 11.0}) == sizing.Line(2.0, 3.0)
  assert sizing.fit_line({4: 8.0}) == sizing.Line(0.0, 2.0)


def test_probed_slope_is_positive_and_chunk_shrinks_with_the_limit(smoke_figures):
  s, figures, data_args = smoke_figures
  assert set(figures) == {'train_b', 'train_a', 'gram', 'predict'}   # LoRM's B- and A-rounds
  passes = sizing.fit_passes({k: v for k, v in figures.items() if k != 'predict'}, data_args)
  for name, p in passes.items():
    assert p.footprint.slope > 0 and p.outputs_per_client > 0, name
  resident = sum(s.resident.values())
  assert s.resident['data'] == (240 + 100) * 28 * 28 + 4 * 240   # 24 / 10 per class, uint8
  need = lambda c: sizing.need_bytes(passes, resident, 3, c)
  assert need(1) < need(2) < need(3)
  limits = [need(3) * 2, need(3) / 0.9 + 1, need(2) / 0.9 + 1, need(1) / 0.9 + 1, need(1) / 0.9 - 1]
  chunks = [sizing.choose_clients_per_chunk(int(l), passes, clients=3, resident=resident)
            for l in limits]
  assert chunks == [3, 3, 2, 1, 0]
  eval_line = sizing.fit_line({b: sizing.footprint(pb, data_args['predict'])
                               for b, pb in figures['predict'].items()})
  assert eval_line.slope > 0
  batches = [sizing.choose_eval_batch(int(l), eval_line, resident=resident) for l in limits]
  assert batches == sorted(batches, reverse=True) and batches[-1] >= 1
  assert sizing.choose_eval_batch(2 ** 30, eval_line, resident=resident) == 256


def test_explicit_values_win_and_compile_nothing():
  d = sizing.size_run(smoke_config(), limit='1KiB', compile_fn=_no_compile)
  assert (d.clients_per_chunk, d.eval_batch_size, d.automatic) == (3, 32, False)


def test_no_limit_means_all_clients_of_a_round():
  """XLA:CPU reports no memory limit: automatic = every client in one chunk, eval batch 256."""
  d = sizing.size_run(smoke_config(**AUTO, num_clients=5), compile_fn=_no_compile)
  assert d.automatic and d.limit is None
  assert (d.clients_per_chunk, d.chosen_chunk, d.eval_batch_size) == (0, 5, 256)
  assert 'no device memory limit' in d.line()
  setup.validate_config(smoke_config(**AUTO))   # 0 is a valid value of both


def test_one_client_too_large_fails_before_any_data_loads(tmp_path, monkeypatch):
  def never(*a, **k):
    raise AssertionError('the dataset was loaded')
  monkeypatch.setattr(fmnist, 'load_fashion_mnist', never)   # every loader of fashion_mnist ends here
  monkeypatch.setenv(sizing.ENV_LIMIT, '1MiB')
  workdir = tmp_path / 'w'
  with pytest.raises(errors.ConfigError, match='one client does not fit in device memory') as e:
    simulate.run(smoke_config(**AUTO), str(workdir), progress=False)
  assert '\n' not in str(e.value) and '1.0 MiB limit from LORM_JAX_DEVICE_MEMORY' in str(e.value)
  assert not workdir.exists()


def test_sized_run_end_to_end_matches_the_explicit_chunk(smoke_figures, tmp_path, monkeypatch):
  """Automatic sizing under a limit that holds 2 of the 3 clients: the run
  uses chunks of 2, logs its figures as metrics.jsonl's first line, and ends
  with the results of the same run with clients_per_chunk=2 given."""
  s, figures, data_args = smoke_figures
  passes = sizing.fit_passes({k: v for k, v in figures.items() if k != 'predict'}, data_args)
  resident = sum(s.resident.values())
  limit = int(sizing.need_bytes(passes, resident, 3, 2) / 0.9) + 1
  monkeypatch.setenv(sizing.ENV_LIMIT, str(limit))
  auto = simulate.run(smoke_config(**AUTO), str(tmp_path / 'auto'), progress=False)
  lines = [json.loads(l) for l in open(tmp_path / 'auto' / 'metrics.jsonl')]
  rec = lines[0]
  assert rec['kind'] == 'sizing' and [l['kind'] for l in lines].count('sizing') == 1
  assert rec['clients_per_chunk'] == 2 and rec['limit_bytes'] == limit
  assert rec['limit_source'] == sizing.ENV_LIMIT and rec['margin'] == sizing.DEFAULT_MARGIN
  assert rec['need_bytes'] <= rec['budget_bytes'] and rec['passes']['train_a']['per_client_bytes'] > 0
  eval_batch = rec['eval_batch_size']
  assert 1 <= eval_batch <= 256 and eval_batch & (eval_batch - 1) == 0
  monkeypatch.delenv(sizing.ENV_LIMIT)
  given = simulate.run(smoke_config(clients_per_chunk=2, eval_batch_size=eval_batch),
                       str(tmp_path / 'given'), progress=False)
  strip = lambda r: {k: v for k, v in r.items() if k != 'wall_seconds'}
  assert strip(auto) == strip(given)
  rounds = lambda d: [l for l in map(json.loads, open(d / 'metrics.jsonl')) if l['kind'] == 'round']
  assert ([r['train_loss'] for r in rounds(tmp_path / 'auto')]
          == [r['train_loss'] for r in rounds(tmp_path / 'given')])


def test_a_compiled_client_too_large_is_one_line(smoke_figures):
  """The data fits, one client's programs do not: size_run's ConfigError
  names the need and the usable bytes (figures served from the fixture's
  compiles: size_run takes any compile, e.g. a deviceless one for a GPU)."""
  s, figures, data_args = smoke_figures
  passes = sizing.fit_passes({k: v for k, v in figures.items() if k != 'predict'}, data_args)
  resident = sum(s.resident.values())
  limit = int(sizing.need_bytes(passes, resident, 3, 1) / 0.9) - 1
  served = lambda p: figures[p.name][p.count]
  with pytest.raises(errors.ConfigError, match=r'^one client does not fit in device memory: '
                     r'[0-9.]+ MiB needed, [0-9.]+ MiB usable') as e:
    sizing.size_run(smoke_config(**AUTO), limit=limit, compile_fn=served)
  assert '\n' not in str(e.value)
  d = sizing.size_run(smoke_config(**AUTO), limit=limit + 2, compile_fn=served)
  assert (d.chosen_chunk, d.clients_per_chunk) == (1, 1) and d.record()['need_bytes'] <= limit

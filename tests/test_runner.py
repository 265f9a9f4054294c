"""ClientRunner: the one place that maps a per-client function over clients."""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorm_jax.federated import runner as runner_lib


@pytest.mark.parametrize('work,groups', [([5, 25, 25, 10, 5, 10, 20, 10, 20, 20], 2),
                                         ([3, 1, 2], 2), ([7], 4), ([1, 1, 1, 1, 9], 3)])
def test_balanced_order_is_a_padded_permutation_with_even_blocks(work, groups):
  order = runner_lib.balanced_order(np.array(work), groups)
  assert len(order) % groups == 0
  real = order[order >= 0]
  assert sorted(real.tolist()) == list(range(len(work)))
  blocks = order.reshape(groups, -1)
  loads = [sum(work[i] for i in b if i >= 0) for b in blocks]
  # Longest-first: no block exceeds the even share by more than one client's work.
  assert max(loads) <= sum(work) / groups + max(work)
  assert max(loads) - min(loads) <= max(work)
  np.testing.assert_array_equal(order, runner_lib.balanced_order(np.array(work), groups))


def test_balanced_order_evens_the_default_split():
  """The first task of the reference split (steps per client at 5 epochs):
  the two devices get 75 steps each."""
  work = np.array([5, 25, 25, 10, 5, 10, 20, 10, 20, 20])
  blocks = runner_lib.balanced_order(work, 2).reshape(2, -1)
  assert [int(sum(work[i] for i in b if i >= 0)) for b in blocks] == [75, 75]


def _fn(scale, *, w, x, key):
  """A per-client function with a shared input, a plain and a key input."""
  return {'y': scale * w * x + jax.random.uniform(key), 'n': x.shape[0]}


@pytest.mark.parametrize('mode,chunk', [('vmap', 10), ('vmap', 3), ('sequential', 10)])
def test_map_clients_returns_clients_in_order(mode, chunk):
  runner = runner_lib.ClientRunner(mode, chunk)
  x = jnp.arange(7 * 4, dtype=jnp.float32).reshape(7, 4)
  keys = jax.random.split(jax.random.key(0), 7)
  fn = runner.bind(_fn, 2.0)
  assert runner.bind(_fn, 2.0) is fn   # the same object: one jit cache entry
  out = runner.map_clients(fn, {'w': jnp.float32(3.0)}, {'x': x, 'key': keys},
                           work=np.arange(7, 0, -1))
  want = 6.0 * x + jax.vmap(jax.random.uniform)(keys)[:, None]
  np.testing.assert_allclose(np.asarray(out['y']), np.asarray(want), rtol=1e-6)
  assert out['y'].shape == (7, 4)


def _slow(w, x):
  """Tens of milliseconds per client on a CPU: queued calls stay unfinished."""
  for _ in range(8):
    x = jnp.tanh(x @ w)
  return x.sum()


def _unfinished_at_each_call(monkeypatch, limit: int) -> list[int]:
  """How many earlier chunk calls were unfinished as map_clients made each
  call, over 12 one-client chunks of `_slow`, with MAX_UNFINISHED_CALLS=limit."""
  monkeypatch.setattr(runner_lib, 'MAX_UNFINISHED_CALLS', limit)
  runner = runner_lib.ClientRunner('vmap', 1)
  outputs, unfinished = [], []
  run = runner._run

  def counting_run(fn, shared, chunk):
    unfinished.append(sum(not all(x.is_ready() for x in jax.tree.leaves(o)) for o in outputs))
    outputs.append(run(fn, shared, chunk))
    return outputs[-1]

  monkeypatch.setattr(runner, '_run', counting_run)
  x = jnp.ones((12, 512, 512)) * jnp.arange(12.0)[:, None, None]
  w = jnp.eye(512) * 0.5
  out = runner.map_clients(_slow, {'w': w}, {'x': x})
  np.testing.assert_allclose(np.asarray(out), np.asarray(jax.vmap(_slow, (None, 0))(w, x)),
                             rtol=1e-5)
  return unfinished


def test_map_clients_leaves_few_calls_unfinished(monkeypatch):
  """A pass over many chunks waits for the oldest call before it queues more
  than MAX_UNFINISHED_CALLS (long queues stall XLA:CPU's devices; see the
  constant). With the limit lifted the same pass does queue more: the count
  sees unfinished calls."""
  limit = runner_lib.MAX_UNFINISHED_CALLS
  assert max(_unfinished_at_each_call(monkeypatch, limit)) <= limit
  assert max(_unfinished_at_each_call(monkeypatch, 1000)) > limit


def test_map_clients_rejects_unknown_mode():
  with pytest.raises(ValueError, match='client_mode'):
    runner_lib.ClientRunner('threads', 4)


@pytest.mark.parametrize('mode', ['vmap', 'sequential'])
def test_compile_ahead_leaves_the_call_nothing_to_compile(mode, caplog):
  """compile_ahead compiles, from shapes alone, the very program map_clients
  then runs: the call logs no compilation and gives the plain call's values."""
  runner = runner_lib.ClientRunner(mode, 3)
  x = jnp.arange(5 * 3, dtype=jnp.float32).reshape(5, 3)
  keys = jax.random.split(jax.random.key(1), 5)
  fn = runner.bind(_fn, 7.0)   # no other test compiles this one
  shared, per_client, work = {'w': jnp.float32(2.0)}, {'x': x, 'key': keys}, np.arange(5, 0, -1)
  runner.compile_ahead(fn, shared, per_client, work=work).join()
  with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
    out = runner.map_clients(fn, shared, per_client, work=work)
  compiled = [r.getMessage() for r in caplog.records
              if 'XLA compilation' in r.getMessage() and '_over_clients' in r.getMessage()]
  assert compiled == []
  want = 14.0 * x + jax.vmap(jax.random.uniform)(keys)[:, None]
  np.testing.assert_allclose(np.asarray(out['y']), np.asarray(want), rtol=1e-6)


def test_cpu_collectives_get_a_longer_wait_unless_xla_flags_name_one(monkeypatch):
  """runtime._patient_cpu_collectives adds XLA:CPU's collective timeout to
  XLA_FLAGS, keeping the flags already there and a timeout given there."""
  from lorm_jax import runtime  # pylint: disable=import-outside-toplevel
  flag = '--xla_cpu_collective_call_terminate_timeout_seconds'
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  runtime._patient_cpu_collectives()  # pylint: disable=protected-access
  assert os.environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=2',
                                             f'{flag}={runtime.COLLECTIVE_TIMEOUT_S}']
  monkeypatch.setenv('XLA_FLAGS', f'{flag}=5')
  runtime._patient_cpu_collectives()  # pylint: disable=protected-access
  assert os.environ['XLA_FLAGS'] == f'{flag}=5'
  monkeypatch.delenv('XLA_FLAGS')
  runtime._patient_cpu_collectives()  # pylint: disable=protected-access
  assert os.environ['XLA_FLAGS'] == f'{flag}={runtime.COLLECTIVE_TIMEOUT_S}'


_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx avx2 fma
processor\t: 1
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_bfloat16_is_chosen_only_where_the_cpu_multiplies_it_natively(tmp_path):
  """runtime.cpu_flags reads the first flags line of a cpuinfo file;
  fast_bfloat16_matmuls is True on accelerators and on CPUs with AMX or
  AVX-512 BF16, False on an AVX2-only CPU and where no flags are known."""
  from lorm_jax import runtime  # pylint: disable=import-outside-toplevel
  info = tmp_path / 'cpuinfo'
  info.write_text(_CPUINFO)
  flags = runtime.cpu_flags(str(info))
  assert flags == {'fpu', 'sse2', 'avx', 'avx2', 'fma'}
  assert runtime.cpu_flags(str(tmp_path / 'absent')) == frozenset()
  assert not runtime.fast_bfloat16_matmuls('cpu', flags)
  assert not runtime.fast_bfloat16_matmuls('cpu', frozenset())
  assert runtime.fast_bfloat16_matmuls('cpu', flags | {'amx_bf16'})
  assert runtime.fast_bfloat16_matmuls('cpu', flags | {'avx512_bf16'})
  assert runtime.fast_bfloat16_matmuls('gpu', flags) and runtime.fast_bfloat16_matmuls('tpu')


@pytest.mark.parametrize('fast', [True, False])
def test_auto_dtype_is_resolved_before_the_run_and_recorded(tmp_path, monkeypatch, fast):
  """model.dtype='auto' becomes bfloat16 or float32 by the machine, in a copy
  (the caller's config keeps 'auto'); the experiment's config and the
  workdir's config.json hold the resolved dtype, so a resume compares like
  with like."""
  import json  # pylint: disable=import-outside-toplevel
  from conftest import smoke_config  # pylint: disable=import-outside-toplevel
  from lorm_jax import runtime  # pylint: disable=import-outside-toplevel
  from lorm_jax.federated import setup  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(runtime, 'fast_bfloat16_matmuls', lambda *a, **k: fast)
  c = smoke_config(**{'model.dtype': 'auto'})
  want = 'bfloat16' if fast else 'float32'
  exp = setup.build_experiment(c, str(tmp_path))
  assert c.model.dtype == 'auto' and exp.config.model.dtype == want
  assert exp.model.cfg.dtype == want
  assert json.loads((tmp_path / 'config.json').read_text())['model']['dtype'] == want
  assert setup.compute_dtype_line(exp.config).startswith(f'model.dtype=auto -> {want} (')
  setup.check_workdir(setup.resolve_compute_dtype(c), str(tmp_path))  # the same run: no error


def test_runtime_names_the_cpu_kind(tmp_path):
  from lorm_jax import runtime
  info = tmp_path / 'cpuinfo'
  info.write_text('model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n')
  assert runtime.cpu_kind(str(info)) == 'AMD EPYC, AVX-512 BF16, no AMX'
  info.write_text('model name\t: AMD EPYC\nflags\t\t: fpu avx2\n')
  assert runtime.cpu_kind(str(info)) == 'AMD EPYC, AVX2 only'

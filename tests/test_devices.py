"""Several devices and several processes as one run.

Two CPU devices in one process (the client axis sharded over them) give the
one-device results; several processes (jax.distributed on localhost, gloo CPU
collectives), each training its share of the clients on its own devices, give
the results of one process with as many devices: the merges' client sums are
reduced across processes, process 0 writes the workdir.

Each run is `experiments.run` in a subprocess (the device count is fixed when
JAX starts). The one-process two-device runs are made once for the module
(`two_devices`) and serve as the reference of both kinds of test.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, smoke_config
from lorm_jax.federated import simulate

# Five clients: uneven per device (a padded empty client) in both client modes.
SMOKE = ['--config=configs/smoke.py', '--config.num_clients=5']
MODES = ('vmap', 'sequential')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run(workdir: str, flags: list[str], processes: int = 1, cpu_devices: int = 1,
         cache: str | None = None) -> None:
  """experiments.run as `processes` processes of one run (each with cpu_devices)."""
  # A compilation cache of this module's own (`cache`): programs compiled by
  # the in-process tests must not stand in for the ones compiled here.
  env = dict(os.environ, PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=cache or os.path.join(os.path.dirname(workdir), 'xla'))
  base = [sys.executable, '-m', 'experiments.run', f'--workdir={workdir}',
          f'--cpu_devices={cpu_devices}', *SMOKE, *flags]
  if processes == 1:
    done = subprocess.run(base, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, done.stdout.decode()[-3000:]
    return
  port = _free_port()
  procs = [subprocess.Popen(base + [f'--coordinator_address=127.0.0.1:{port}',
                                    f'--num_processes={processes}', f'--process_id={i}'],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(processes)]
  try:
    outs = [p.communicate(timeout=600)[0].decode()[-2000:] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out


def _results(workdir: str) -> tuple[dict, list]:
  results = json.load(open(os.path.join(workdir, 'results.json')))
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {k: v for k, v in results.items() if k != 'wall_seconds'}, lines


def _same(a: str, b: str) -> None:
  (ra, la), (rb, lb) = _results(a), _results(b)
  assert ra == rb
  keys = ('kind', 'task', 'round', 'clients', 'train_loss', 'upload_bytes_per_client')
  assert [{k: l.get(k) for k in keys} for l in la] == [{k: l.get(k) for k in keys} for l in lb]


@pytest.fixture(scope='module')
def cache(tmp_path_factory) -> str:
  """The compilation cache of this module's subprocesses."""
  return str(tmp_path_factory.mktemp('xla'))


@pytest.fixture(scope='module')
def two_devices(tmp_path_factory, cache) -> dict[str, str]:
  """{client mode: workdir} of one process with 2 CPU devices."""
  out = {}
  for mode in MODES:
    out[mode] = str(tmp_path_factory.mktemp(f'two_devices_{mode}'))
    _run(out[mode], [f'--config.client_mode={mode}'], processes=1, cpu_devices=2, cache=cache)
  return out


@pytest.mark.slow
@pytest.mark.parametrize('mode', MODES)
def test_two_cpu_devices_give_the_one_device_results(mode, two_devices, tmp_path):
  """The client axis over 2 CPU devices: vmapped chunks of 4 clients (2 per
  device; the second chunk one real client and three padded ones), or
  sequential clients balanced over the devices (a padded empty client), give
  the results of one device (this process)."""
  one = simulate.run(smoke_config(num_clients=5, client_mode=mode), str(tmp_path), progress=False)
  two, two_lines = _results(two_devices[mode])
  assert (one['devices'], two['devices']) == ('1 x cpu', '2 x cpu')
  np.testing.assert_allclose(np.array(two['accuracy_matrix'], float),
                             np.array(one['accuracy_matrix'], float), atol=1e-6, equal_nan=True)
  assert two['comm_bytes_total'] == one['comm_bytes_total']
  one_lines = [json.loads(l) for l in open(os.path.join(str(tmp_path), 'metrics.jsonl'))]
  loss = lambda lines: [l['train_loss'] for l in lines if l['kind'] == 'round']
  np.testing.assert_allclose(loss(two_lines), loss(one_lines), rtol=1e-5)


@pytest.mark.slow
def test_two_sequential_processes_give_one_process_results(two_devices, cache, tmp_path):
  """Clients mapped one after another on each device (the embedded configs'
  mode); the test below covers vmapped chunks (the smoke config's mode)."""
  two = str(tmp_path / 'two')
  _run(two, ['--config.client_mode=sequential'], processes=2, cpu_devices=1, cache=cache)
  _same(two, two_devices['sequential'])
  assert _results(two)[0]['devices'] == '2 x cpu'


@pytest.mark.slow
def test_two_processes_vmapped_and_resume(two_devices, cache, tmp_path):
  """2 processes x 1 CPU device = 1 process x 2 devices with the clients in
  vmapped chunks, also when the 2-process run is stopped after 3 rounds
  (crossing a task end) and resumed."""
  two = str(tmp_path / 'two')
  flags = ['--config.client_mode=vmap']
  _run(two, flags + ['--max_rounds=3'], processes=2, cpu_devices=1, cache=cache)
  assert not os.path.exists(os.path.join(two, 'results.json'))
  _run(two, flags, processes=2, cpu_devices=1, cache=cache)
  _same(two, two_devices['vmap'])
  assert _results(two)[0]['devices'] == '2 x cpu'


# More CPU devices than cores: XLA:CPU's collectives then stall now and then
# (seen on the 2-core machine, quiet or busy: a 4-device run sat at a
# rendezvous with no CPU use until the 600 s limit), so this runs only where
# every device has a core of its own. That stall looks like the one that
# runner.MAX_UNFINISHED_CALLS now prevents: since it, this test passed 5 of 5
# times on the 2-core machine (2 quiet, 3 beside a busy loop), but it stays
# skipped there until more runs say the stall is gone.
@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 4, reason='4 CPU devices need >= 4 cores')
def test_two_processes_of_two_devices(tmp_path):
  """2 processes x 2 CPU devices = 1 process x 4 devices."""
  _run(str(tmp_path / 'one'), [], processes=1, cpu_devices=4)
  _run(str(tmp_path / 'two'), [], processes=2, cpu_devices=2)
  _same(str(tmp_path / 'two'), str(tmp_path / 'one'))
  assert _results(str(tmp_path / 'two'))[0]['devices'] == '4 x cpu'

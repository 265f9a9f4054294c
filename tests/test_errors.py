"""Bad input through the real entry point: exit status 2, one line on stderr
(`error: ...`), no traceback, and a workdir the refused run left as it was."""
from __future__ import annotations

import fcntl
import multiprocessing
import os
import re
import runpy
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from configs import smoke
from conftest import REPO, smoke_config
from lorm_jax.data import dataset as dataset_lib, fmnist, partition
from lorm_jax.federated import setup



# Each case runs the entry point in a process of its own, as `python -m
# module args` would, but forked from a server that has already imported
# what every entry point imports (JAX, Flax, orbax, the package): its exit
# status and stderr are the real ones, without paying ~2.5 s of imports per
# case. The server is started once, by the first case.
_FORKS = multiprocessing.get_context('forkserver')
_FORKS.set_forkserver_preload(['lorm_jax.federated.simulate', 'lorm_jax.federated.setup'])


def _entry_point(module: str, args: list[str], out: str, err: str) -> None:
  """`python -m module *args` in this (forked) process, stdout/stderr to files."""
  os.chdir(REPO)
  sys.path.insert(0, REPO)
  os.environ.pop('LORM_JAX_VERBOSE', None)
  sys.argv = [module, *args]
  sys.stdout.flush()
  sys.stderr.flush()
  for path, fd in ((out, 1), (err, 2)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  sys.stdout, sys.stderr = open(1, 'w', closefd=False), open(2, 'w', closefd=False)
  try:
    runpy.run_module(module, run_name='__main__', alter_sys=True)
  finally:
    sys.stdout.flush()
    sys.stderr.flush()


def _cli(*args: str, module: str = 'experiments.run') -> subprocess.CompletedProcess:
  """(returncode, stdout, stderr) of `python -m module *args`."""
  with tempfile.TemporaryDirectory() as d:
    out, err = os.path.join(d, 'out'), os.path.join(d, 'err')
    proc = _FORKS.Process(target=_entry_point, args=(module, list(args), out, err))
    proc.start()
    proc.join(timeout=300)
    if proc.exitcode is None:
      proc.kill()
    return subprocess.CompletedProcess(args, proc.exitcode, open(out).read(), open(err).read())


def _snapshot(path: str):
  """Every file below path with its size, mtime and bytes (None if path is absent)."""
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    return open(path, 'rb').read()
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      st = os.stat(full)
      out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns, open(full, 'rb').read())
  return out


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Split files and weights files of every kind of damage, for the smoke config."""
  d = tmp_path_factory.mktemp('inputs')
  c = smoke.get_config()
  if not os.path.isdir(fmnist.DEFAULT_DIR):
    pytest.skip('Fashion-MNIST (Debian dataset-fashion-mnist) not installed')
  ds = dataset_lib.subsample_dataset(fmnist.load_fashion_mnist(), c.dataset.train_per_class,
                                     c.dataset.test_per_class)
  labels = ds.train_labels
  good = partition.federated_split(labels, 10, c.num_tasks, c.num_clients, c.beta, 0,
                                   min_samples=1)
  paths = {}

  def save(name, split):
    paths[name] = str(d / f'{name}.json')
    partition.save_split(paths[name], split)

  save('two_clients', [task[:2] for task in good])
  save('past_the_data', [[np.append(good[0][0], labels.size + 5)] + list(good[0][1:]), good[1]])
  other = int(good[1][0][0])  # a sample of task 1 placed in task 0
  save('wrong_class', [[np.append(good[0][0], other)] + list(good[0][1:]), good[1]])
  save('one_task', good[:1])
  paths['not_json'] = str(d / 'not_json.json')
  open(paths['not_json'], 'w').write('{"format": "lorm_jax.fed')
  paths['bad_npz'] = str(d / 'bad.npz')
  open(paths['bad_npz'], 'w').write('not a zip file')
  paths['a_file'] = str(d / 'a_file')
  open(paths['a_file'], 'w').write('x')
  return paths


# (case id, arguments after --config/--workdir, pattern the one line must match)
BAD = [
    ('unknown key', ['--config.rnak=3'], r"no key 'rnak'"),
    ('unknown nested key', ['--config.model.rnak=3'], r"no key 'model.rnak'"),
    ('not a number', ['--config.rounds=abc'], r'--config.rounds=abc'),
    ('unknown flag', ['--bogus=1'], r'bogus'),
    ('unknown method', ['--config.method=nope'], r'unknown method'),
    ('unknown dataset', ['--config.dataset.name=mnist_plus'], r'mnist_plus'),
    ('unknown model', ['--config.model.name=vit_zz'], r'unknown model'),
    ('rank 0', ['--config.model.rank=0'], r'model.rank must be an integer >= 1'),
    ('beta 0', ['--config.beta=0'], r'beta must be a finite number > 0'),
    ('beta nan', ['--config.beta=nan'], r'beta must be a finite number'),
    ('negative lr', ['--config.lr_head=-0.001'], r'lr_head must be a finite number > 0'),
    ('infinite lr', ['--config.lr_b=inf'], r'lr_b must be a finite number'),
    ('negative weight decay', ['--config.weight_decay=-0.1'], r'weight_decay .*>= 0'),
    ('ridge 0', ['--config.ridge=0'], r'ridge must be a finite number > 0'),
    ('alpha > 1', ['--config.alpha_head=1.5'], r'alpha_head .*<= 1'),
    ('no clients', ['--config.num_clients=0'], r'num_clients must be an integer >= 1'),
    ('no rounds', ['--config.rounds=0'], r'rounds must be an integer >= 1'),
    ('no epochs', ['--config.local_epochs=0'], r'local_epochs must be an integer >= 1'),
    ('batch 0', ['--config.batch_size=0'], r'batch_size must be an integer >= 1'),
    ('eval batch -1', ['--config.eval_batch_size=-1'], r'eval_batch_size must be'),
    ('negative per-class', ['--config.dataset.train_per_class=-1'], r'train_per_class'),
    ('image size vs patch', ['--config.image_size=30'], r'not a multiple of the tiny patch'),
    ('unknown dtype', ['--config.model.dtype=float16'], r'model.dtype'),
    ('unknown client mode', ['--config.client_mode=threads'], r'client_mode'),
    ('unknown schedule', ['--config.schedule=zigzag'], r'unknown schedule'),
    ('tasks do not divide', ['--config.num_tasks=3'], r'do not divide'),
    ('too many clients', ['--config.num_clients=50'], r'need more data'),
    ('missing data', ['--config.dataset.data_dir=/nonexistent/fmnist'], r'/nonexistent/fmnist'),
    ('missing split file', ['--config.split_file=/nonexistent/split.json'], r'does not exist'),
    ('split: clients', ['--config.split_file={two_clients}'], r'2 clients, the config'),
    ('split: tasks', ['--config.split_file={one_task}'], r'1 tasks, the config 2'),
    ('split: index past data', ['--config.split_file={past_the_data}'], r'training set holds'),
    ('split: wrong class', ['--config.split_file={wrong_class}'], r"not one of task 0's"),
    ('split: not JSON', ['--config.split_file={not_json}'], r'not readable JSON'),
    ('missing weights', ['--config.model.weights=/nonexistent/w.npz'], r'/nonexistent/w.npz'),
    ('corrupt weights', ['--config.model.weights={bad_npz}'], r'bad.npz'),
    ('config argument', ['--config=configs/fmnist_reference.py:foo=1'], r"unknown config arg"),
    ('missing config file', ['--config=configs/nope.py'], r'No such file.*nope.py'),
    ('workdir is a file', ['--workdir={a_file}'], r'not a folder'),
]


@pytest.mark.parametrize('case,args,pattern', BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_status_2(case, args, pattern, files, tmp_path):
  del case
  args = [a.format(**files) for a in args]
  workdir = next((a.split('=', 1)[1] for a in args if a.startswith('--workdir=')),
                 str(tmp_path / 'w'))
  config = next((a for a in args if a.startswith('--config=')), '--config=configs/smoke.py')
  rest = [a for a in args if not a.startswith(('--workdir=', '--config='))]
  before = _snapshot(workdir)
  out = _cli(config, f'--workdir={workdir}', *rest)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr[-2000:]
  assert 'Traceback' not in out.stderr + out.stdout
  assert re.search(pattern, lines[0]), lines[0]
  assert _snapshot(workdir) == before   # a refused run writes nothing


def test_workdir_of_another_config_is_refused_and_left_alone(tmp_path):
  workdir = str(tmp_path / 'w')
  c = smoke_config(seed=3)
  setup.prepare_workdir(c, workdir)
  open(os.path.join(workdir, 'metrics.jsonl'), 'w').write('{"kind": "round"}\n')
  before = _snapshot(workdir)
  out = _cli('--config=configs/smoke.py', f'--workdir={workdir}')
  assert out.returncode == 2 and 'different config (differs in: seed)' in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1
  assert _snapshot(workdir) == before


def test_second_run_on_a_locked_workdir_is_refused_at_once(tmp_path):
  """The lock is an flock on the workdir folder: held here as a running run
  would hold it, the CLI refuses; a released (or killed) holder frees it."""
  workdir = tmp_path / 'w'
  workdir.mkdir()
  fd = os.open(workdir, os.O_RDONLY)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  try:
    out = _cli('--config=configs/smoke.py', f'--workdir={workdir}', '--config.rounds=1')
    assert out.returncode == 2 and 'in use by another run' in out.stderr
    assert os.listdir(workdir) == []
  finally:
    os.close(fd)
  from lorm_jax import checkpointing  # pylint: disable=import-outside-toplevel
  lock = checkpointing.WorkdirLock(str(workdir))
  lock.acquire()       # free again once the holder's descriptor is closed
  lock.release()


@pytest.mark.parametrize('module,args,pattern', [
    ('experiments.report', ['/nonexistent/run'], r'no results.json'),
    ('experiments.report', ['some_run', '--bogus'], r'unrecognized arguments: --bogus'),
    ('experiments.sweep', [], r'--config'),
])
def test_other_entry_points_report_one_line(module, args, pattern):
  out = _cli(*args, module=module)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ')
  assert re.search(pattern, lines[0])


def test_verbose_shows_the_traceback(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'experiments.run', '--config=configs/smoke.py',
                        f'--workdir={tmp_path}/w', '--config.method=nope'], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO, LORM_JAX_VERBOSE='1'))
  assert out.returncode == 2 and 'Traceback' in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith('error: unknown method')

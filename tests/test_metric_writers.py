"""Issue 28, items 6 and 8: TensorBoard / W&B copies of metrics.jsonl, read
back from their files; clients_per_round beyond the clients; a disk that
fills while a checkpoint is written."""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, smoke_config, strip_wall_time
from lorm_jax import checkpointing, metric_writers
from lorm_jax.federated import simulate


# ------------------------------------------------------------------ readers


def _tfrecords(path: str):
  """The payloads of a TFRecord file (length, crc, data, crc)."""
  with open(path, 'rb') as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack('<Q', data[pos:pos + 8])
    yield data[pos + 12:pos + 12 + n]
    pos += 12 + n + 4


def _tensorboard_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} as TensorBoard shows it: event files in order, a
  file's START event at step P hiding what earlier files logged at steps >= P."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  files = []
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    events = [event_pb2.Event.FromString(b) for b in _tfrecords(path)]
    files.append((events[0].wall_time, events))
  out: dict[str, dict[int, float]] = {}
  for _, events in sorted(files, key=lambda f: f[0]):
    for e in events:
      if e.HasField('session_log') and e.session_log.status == e.session_log.START:
        for steps in out.values():
          for s in [s for s in steps if s >= e.step]:
            del steps[s]
      for v in e.summary.value:
        steps = out.setdefault(v.tag, {})
        assert e.step not in steps, f'{v.tag} logged twice at step {e.step}'
        steps[e.step] = v.simple_value
  return out


def _wandb_history(workdir: str) -> tuple[dict[str, dict[int, float]], int]:
  """({tag: {step: value}}, number of offline runs) from the offline runs'
  `.wandb` files (LevelDB-log records of wandb's `Record` protobuf)."""
  from wandb.proto import wandb_internal_pb2 as pb  # pylint: disable=import-outside-toplevel
  paths = sorted(glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*', 'run-*.wandb')))
  out: dict[str, dict[int, float]] = {}
  for path in paths:
    with open(path, 'rb') as f:
      data = f.read()
    assert data[:4] == b':W&B'
    pos, block, buf = 7, 32768, b''
    while pos + 7 <= len(data):
      if block - pos % block < 7:   # a block's tail too short for a header is padding
        pos += block - pos % block
        continue
      _, n, kind = struct.unpack('<IHB', data[pos:pos + 7])
      if n == 0 and kind == 0:
        pos += block - pos % block
        continue
      buf += data[pos + 7:pos + 7 + n]
      pos += 7 + n
      if kind in (1, 4):   # a full record, or the last piece of one
        record = pb.Record.FromString(buf)
        buf = b''
        if record.WhichOneof('record_type') == 'history':
          for item in record.history.item:
            tag = item.key or '/'.join(item.nested_key)
            if not tag.startswith('_'):
              out.setdefault(tag, {})[record.history.step.num] = json.loads(item.value_json)
  return out, len(paths)


def _expected(workdir: str, rounds: int) -> dict[str, dict[int, float]]:
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  out: dict[str, dict[int, float]] = {}
  step = 0
  for record in lines:
    step = metric_writers.record_step(record, rounds, step)
    for tag, value in metric_writers.record_scalars(record).items():
      out.setdefault(tag, {})[step] = value
  return out


# ------------------------------------------------------------------ writers


def test_record_steps_and_scalars():
  rnd = {'kind': 'round', 'task': 1, 'round': 0, 'clients': [0, 2], 'train_loss': 0.5,
         'factors': 'b', 'merge_fallbacks': 0, '_steps': 7, 'bad': float('nan')}
  assert metric_writers.record_step(rnd, 5, 0) == 5
  assert metric_writers.record_scalars(rnd) == {'round/train_loss': 0.5,
                                                'round/merge_fallbacks': 0.0}
  ev = {'kind': 'eval', 'task': 1, 'accuracy': 0.25, 'per_task_accuracy': [0.5, None]}
  assert metric_writers.record_step(ev, 5, 5) == 9   # task 1's last round
  assert metric_writers.record_scalars(ev) == {'eval/accuracy': 0.25,
                                               'eval/per_task_accuracy/0': 0.5}
  assert metric_writers.record_step({'kind': 'sizing', 'margin': 0.1}, 5, 3) == 3


def test_writers_are_off_unless_asked(smoke_run):
  workdir, _ = smoke_run
  assert not os.path.exists(os.path.join(workdir, 'tensorboard'))
  assert not os.path.exists(os.path.join(workdir, 'wandb'))
  assert not os.path.exists(os.path.join(workdir, 'wandb_run_id'))


def test_tensorboard_and_wandb_hold_every_record_and_a_resume_appends(smoke_run, tmp_path,
                                                                      monkeypatch):
  """Both writers on, a run stopped after 3 rounds, a round's worth of
  TensorBoard scalars and a metrics line written past the checkpoint (as by a
  killed process), then resumed: TensorBoard (its purge applied) and W&B hold
  exactly metrics.jsonl's numbers at their global round steps, once each, and
  the results are those of a run without writers."""
  pytest.importorskip('tensorboardX')
  pytest.importorskip('wandb')
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  _, full = smoke_run
  workdir = str(tmp_path / 'w')
  cfg = smoke_config(**{'log.tensorboard': True, 'log.wandb': True})
  assert simulate.run(cfg, workdir, max_rounds=3, progress=False) == {}
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  killed = SummaryWriter(os.path.join(workdir, 'tensorboard'), filename_suffix='.killed')
  killed.add_scalar('round/train_loss', 123.0, global_step=3)
  killed.close()
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"kind": "round", "task": 1, "round": 1, "train_loss": 123.0}\n')
  resumed = simulate.run(cfg, workdir, progress=False)
  assert strip_wall_time(resumed) == strip_wall_time(full)

  expected = _expected(workdir, cfg.rounds)
  assert expected['round/train_loss'].keys() == {0, 1, 2, 3}
  assert expected['eval/accuracy'] == {1: full['accuracy_per_task_end'][0],
                                       3: full['accuracy_per_task_end'][1]}
  assert expected['eval/per_task_accuracy/1'] == {3: full['per_task_accuracy'][1]}
  assert len(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))) == 3
  board = _tensorboard_scalars(os.path.join(workdir, 'tensorboard'))
  assert board.keys() == expected.keys()
  for tag, steps in expected.items():
    assert board[tag].keys() == steps.keys(), tag
    np.testing.assert_allclose([board[tag][s] for s in steps], list(steps.values()),
                               rtol=1e-6, err_msg=tag)   # float32 in the event file
  history, runs = _wandb_history(workdir)
  assert runs == 2 and open(os.path.join(workdir, 'wandb_run_id')).read().strip()
  assert history == expected


def test_wandb_asked_for_but_not_installed_is_one_line(tmp_path, monkeypatch):
  import importlib.util  # pylint: disable=import-outside-toplevel
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'wandb' else real(name, *a))
  with pytest.raises(metric_writers.ConfigError, match=r"needs the wandb package.*\[wandb\]"):
    metric_writers.Writers(smoke_config(**{'log.wandb': True}), str(tmp_path))


# ------------------------------------------------------- clients_per_round


def test_clients_per_round_above_the_clients_is_refused_in_one_line(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'experiments.run', '--config=configs/smoke.py',
                        f'--workdir={tmp_path}/w', '--config.clients_per_round=1000'],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO, LORM_JAX_VERBOSE=''))
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in out.stderr + out.stdout
  assert lines[0].startswith('error: clients_per_round 1000 is more than the 3 clients')
  assert not os.path.exists(tmp_path / 'w')
  from lorm_jax.federated import setup  # pylint: disable=import-outside-toplevel
  setup.validate_config(smoke_config(clients_per_round=3))   # all of them: fine


# --------------------------------------------------------------- full disk

# Orbax writes a step in the background: a disk that fills during step 4's
# write leaves `4.orbax-checkpoint-tmp`, and the error (tensorstore's
# ValueError) comes out of the next save, which waits for it.
_FULL_DISK = '''
import os
import orbax.checkpoint as ocp
_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
  if step == 4:
    os.makedirs(os.path.join(str(self.directory), '4.orbax-checkpoint-tmp', 'state'))
    return True
  if step == 5:
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local file '
                     '"4.orbax-checkpoint-tmp/state/": Failed to write 1024 bytes to file 11: '
                     "No space left on device [os_error_code='28']")
  return _save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
'''


def test_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes(smoke_run, tmp_path):
  """Through experiments.run: status 2 and one line naming the workdir and
  the last saved step; steps 2 and 3 survive, readable; rerun with space
  again, the run resumes from step 3 and ends as the uninterrupted run."""
  _, full = smoke_run
  workdir = str(tmp_path / 'w')
  code = (_FULL_DISK + 'import runpy, sys\n'
          f"sys.argv = ['run', '--config=configs/smoke.py', '--workdir={workdir}']\n"
          "runpy.run_module('experiments.run', run_name='__main__')\n")
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, PYTHONPATH=REPO, LORM_JAX_VERBOSE=''))
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.count('error: ') == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  # after the progress bar (tqdm redraws it once more as the process exits)
  lines = out.stderr[out.stderr.index('error: '):].strip().splitlines()
  assert all(l.startswith('lorm: ') for l in lines[1:] if l.strip()), out.stderr[-3000:]
  assert lines[0].startswith(f'error: cannot write a checkpoint in workdir {workdir}: no space '
                             'left on device; the last saved checkpoint is step 3 (after task 0 '
                             'and its evaluation)'), lines[0]
  ckdir = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(ckdir)) == ['2', '3', '4.orbax-checkpoint-tmp']
  resumed = simulate.run(smoke_config(), workdir, progress=False)
  assert strip_wall_time(resumed) == strip_wall_time(full)
  assert '4.orbax-checkpoint-tmp' not in os.listdir(ckdir)


def test_a_real_full_tmpfs_gives_the_one_line_error(tmp_path, capfd):
  """The same on a 300 KiB tmpfs (root only): orbax's own failure, quiet."""
  mount = tmp_path / 'small'
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=300k', 'tmpfs',
                                          str(mount)], capture_output=True).returncode != 0:
    pytest.skip('needs root to mount a small tmpfs')
  try:
    ckpt = checkpointing.Checkpointer(str(mount / 'w'))
    rng = np.random.default_rng(0)
    ckpt.save(1, {'x': np.zeros(10, np.float32)}, {'task': 0, 'round': 1})
    ckpt.save(2, {'x': np.zeros(10, np.float32)}, {'task': 0, 'round': 2})
    with pytest.raises(checkpointing.CheckpointWriteError) as info:
      ckpt.save(3, {'x': rng.random(100_000).astype(np.float32)}, {'task': 1, 'round': 0})
      ckpt.save(4, {'x': np.zeros(10, np.float32)}, {'task': 1, 'round': 1})
      ckpt.close()
    message = str(info.value)
    assert '\n' not in message and 'no space left on device' in message
    assert 'the last saved checkpoint is step 2 (after task 0, round 1)' in message
    assert 'Traceback' not in capfd.readouterr().err
    again = checkpointing.Checkpointer(str(mount / 'w'))
    state, meta = again.restore({'x': np.zeros(10, np.float32)}, 2)
    assert meta == {'task': 0, 'round': 2} and not state['x'].any()
    again.close()
  finally:
    subprocess.run(['umount', str(mount)], check=False)

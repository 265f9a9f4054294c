"""Replays one round of a run from its checkpoint, with the run's draws and with others.

  python -m experiments.run --config=configs/default.py --config.method=joint --config.seed=1 \
      --workdir=W --keep_checkpoints=0
  python -m experiments.replay_round --workdir=W --step=4 --shuffles=5 --dtype=float32

Checkpoint `step` holds the server state after a round r - 1 of task t. The
replay trains round r from it, as the run did, once per shuffle: shuffle 0 is
the run's own draws (its result is compared with the run's next checkpoint,
which it reproduces bit for bit under the same precision and devices), shuffle
k >= 1 draws batch order and keys as round 10000 + k would. Each replay's
model then ends the task as the run ends one (the method's end-of-task pass and
cross-task merge) and is evaluated on the seen classes' test images. One JSON
line per replay goes to W/replays.jsonl and to the screen. It answers whether
a run's final accuracy is a property of its setting or of one draw.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from lorm_jax import checkpointing, errors, runtime
from lorm_jax.federated import setup, simulate

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a run (its config.json and checkpoints).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint to start from (the round after it is replayed).')
_SHUFFLES = flags.DEFINE_integer('shuffles', 5, 'Replays: the run\'s own draws, then others.')
_DTYPE = flags.DEFINE_enum('dtype', '', ['', 'float32', 'bfloat16'],
                           'Backbone matmul precision of the replays (default: the run\'s).')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0, 'As in experiments.run.')
flags.mark_flags_as_required(['workdir', 'step'])

REDRAW_BASE = 10_000  # shuffle k >= 1 draws as round REDRAW_BASE + k


def replay(workdir: str, step: int, shuffles: int, dtype: str = '') -> list[dict]:
  """Replays the round after checkpoint `step`; returns one record per shuffle."""
  config = setup.load_workdir_config(workdir)
  if dtype:
    config.model.dtype = dtype
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=None)
  steps = sorted(ckpt.manager.all_steps())
  if step not in steps:
    raise errors.CheckpointError(f'{workdir}: no checkpoint {step} (there are '
                                 f'{steps}; run with --keep_checkpoints=0 '
                                 'to keep every one)')
  exp, passes = simulate.prepare(config, workdir)
  template = simulate.initial_server(exp)
  state, meta = ckpt.restore(template, step)
  t, r = meta['task'], meta['round']
  if t >= len(exp.task_classes) or r >= config.rounds:
    raise errors.CheckpointError(f'{workdir}: checkpoint {step} ends task {t} (round {r} of '
                                 f'{config.rounds}); give the step of a round inside a task')
  server = jax.tree.map(jnp.asarray, state)
  if not meta['task_begun']:
    server = simulate.begin_task(exp, server, t)
  server = passes.runner.replicate(server)
  following = None
  if step + 1 in steps:
    following, next_meta = ckpt.restore(template, step + 1)
    following = following if (next_meta['task'], next_meta['round']) == (t, r + 1) else None

  records = []
  for k in range(shuffles):
    t0 = time.time()
    new, round_record = simulate.federated_round(
        exp, passes, server, t, r, shuffle_round=None if k == 0 else REDRAW_BASE + k)
    record = {'step': step, 'task': t, 'round': r, 'shuffle': k,
              'dtype': config.model.dtype, 'devices': len(passes.runner.devices),
              'train_loss': round_record['train_loss'],
              'train_accuracy': round_record['train_accuracy']}
    if k == 0 and following is not None:
      trained = {f: new[f] for f in ('a', 'b', 'head')}
      saved = {f: following[f] for f in ('a', 'b', 'head')}
      record['max_abs_diff_to_run'] = float(max(
          np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0)
          for x, y in zip(jax.tree.leaves(trained), jax.tree.leaves(saved))))
    finished, _ = simulate.finish_task(exp, passes, new, t)
    record['test_accuracy'], _ = simulate.evaluate(exp, passes, exp.method, finished, t,
                                                   config.eval_batch_size)
    record['seconds'] = round(time.time() - t0, 1)
    records.append(record)
    print(json.dumps(record), flush=True)
  return records


@errors.report_user_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _SHUFFLES.value < 1:
    raise errors.UserError(f'--shuffles={_SHUFFLES.value}: expected 1 or more')
  runtime.set_cpu_devices(_CPU_DEVICES.value)
  runtime.enable_compilation_cache()
  records = replay(_WORKDIR.value, _STEP.value, _SHUFFLES.value, _DTYPE.value)
  with open(os.path.join(_WORKDIR.value, 'replays.jsonl'), 'a') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags_or_fail)

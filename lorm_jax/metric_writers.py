"""Scalar copies of the metrics.jsonl records for TensorBoard and Weights & Biases.

Off unless asked (`--config.log.tensorboard=True`, `--config.log.wandb=True`).
Every record `metrics.MetricsLog` writes goes, as scalars tagged
`<kind>/<field>` (`round/train_loss`, `eval/accuracy`,
`eval/per_task_accuracy/0`, ...), to the enabled writers at one step axis:
the global round index `task * rounds + round` of a round record, the index
of the task's last round for its evaluation (the model evaluated is the one
after that round); a record without a task (the sizing line) takes the last
step written (0 at the start).

A resumed run appends: TensorBoard gets a new event file in
`<workdir>/tensorboard/` whose first event purges the steps after the last
record the checkpoint kept (what the killed process wrote past it), and W&B
resumes the run whose id `<workdir>/wandb_run_id` holds (offline by default:
`wandb sync <workdir>/wandb/offline-run-*` uploads it later).
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
import uuid
from typing import Any, Iterable

from ml_collections import ConfigDict

from lorm_jax.errors import ConfigError

# Fields that place or label a record rather than measure something.
_NOT_SCALARS = frozenset({'kind', 'task', 'round', 'clients'})


def record_step(record: dict[str, Any], rounds: int, last: int) -> int:
  """The step of a record (module docstring); `last` is the previous record's."""
  if 'task' not in record:
    return last
  if 'round' in record:
    return int(record['task']) * rounds + int(record['round'])
  return (int(record['task']) + 1) * rounds - 1


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
  """The record's finite numbers as {'<kind>/<field>[/<key or index>]': value};
  strings, booleans, None, fields starting with '_' and the record's place
  (task, round, the participating clients) are left out."""
  out: dict[str, float] = {}

  def add(tag: str, value: Any) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
      return
    if isinstance(value, (int, float)):
      if math.isfinite(value):
        out[tag] = float(value)
    elif isinstance(value, dict):
      for k, v in value.items():
        add(f'{tag}/{k}', v)
    elif isinstance(value, (list, tuple)):
      for i, v in enumerate(value):
        add(f'{tag}/{i}', v)

  kind = record.get('kind', 'record')
  for key, value in record.items():
    if key not in _NOT_SCALARS and not key.startswith('_'):
      add(f'{kind}/{key}', value)
  return out


class TensorBoardWriter:
  """tensorboardX event files in `logdir` (no TensorFlow needed)."""

  def __init__(self, logdir: str, purge_step: int | None):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # Two writers opened in one second (a quick restart) would share tensorboardX's
    # file name `events.out.tfevents.<seconds>.<host>`: a nanosecond suffix keeps
    # them apart and in order.
    self._writer = SummaryWriter(logdir, purge_step=purge_step,
                                 filename_suffix=f'.{time.time_ns()}')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, value, global_step=step)
    self._writer.flush()   # once per record: a killed run loses nothing it logged

  def close(self) -> None:
    self._writer.close()


class WandbWriter:
  """A W&B run (offline unless log.wandb_mode says otherwise) in `workdir/wandb/`,
  resumed across restarts under the id stored in `workdir/wandb_run_id`."""

  def __init__(self, workdir: str, project: str, mode: str, config: dict):
    import wandb  # pylint: disable=import-outside-toplevel
    id_path = os.path.join(workdir, 'wandb_run_id')
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = uuid.uuid4().hex[:16]
      with open(id_path, 'w') as f:
        f.write(run_id + '\n')
    self._run = wandb.init(project=project, dir=workdir, mode=mode, id=run_id, resume='allow',
                           name=os.path.basename(os.path.abspath(workdir)), config=config,
                           settings=wandb.Settings(console='off'))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._run.log(scalars, step=step)

  def close(self) -> None:
    self._run.finish()


def check_packages(config: ConfigDict) -> None:
  """ConfigError (one line) when a writer is asked for whose package is not
  installed (called by config validation, before anything is written)."""
  log = config.get('log') or ConfigDict()
  for flag, module, extra in (('tensorboard', 'tensorboardX', ''), ('wandb', 'wandb', '[wandb]')):
    if log.get(flag, False) and importlib.util.find_spec(module) is None:
      raise ConfigError(f'log.{flag}=True needs the {module} package, which is not installed: '
                        f".venv/bin/pip install -e '.{extra}' (or {module}), or leave "
                        f'--config.log.{flag} off')


class Writers:
  """The writers a config enables, opened on the first record (`open`), so
  that a resumed run knows which records its checkpoint kept."""

  def __init__(self, config: ConfigDict, workdir: str):
    log = config.get('log') or ConfigDict()
    self.tensorboard = bool(log.get('tensorboard', False))
    self.wandb = bool(log.get('wandb', False))
    self.wandb_project = log.get('wandb_project', 'lorm_jax')
    self.wandb_mode = log.get('wandb_mode', 'offline')
    self.rounds = int(config.rounds)
    self.workdir = workdir
    self._config = config
    self._open: list[Any] | None = None
    self._step = 0
    check_packages(config)

  @property
  def enabled(self) -> bool:
    return self.tensorboard or self.wandb

  @property
  def is_open(self) -> bool:
    return self._open is not None

  def open(self, kept: Iterable[dict[str, Any]]) -> None:
    """Opens the writers; `kept` are the records metrics.jsonl holds before the
    next one (a resume's: those its checkpoint kept)."""
    if self.is_open:
      return
    self._open, last, any_kept = [], 0, False
    for record in kept:
      last, any_kept = record_step(record, self.rounds, last), True
    self._step = last
    if self.tensorboard:
      self._open.append(TensorBoardWriter(os.path.join(self.workdir, 'tensorboard'),
                                          purge_step=last + 1 if any_kept else None))
    if self.wandb:
      self._open.append(WandbWriter(self.workdir, self.wandb_project, self.wandb_mode,
                                    self._config.to_dict()))

  def write(self, record: dict[str, Any]) -> None:
    if self._open is None:
      raise RuntimeError('Writers.write before open')
    self._step = record_step(record, self.rounds, self._step)
    scalars = record_scalars(record)
    if scalars:
      for writer in self._open:
        writer.write(self._step, scalars)

  def close(self) -> None:
    for writer in self._open or []:
      writer.close()
    self._open = None

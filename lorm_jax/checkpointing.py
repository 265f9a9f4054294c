"""Orbax checkpoints of the whole simulation state, saved after every round.

The state is a pytree of arrays (server LoRA, head, method accumulators) plus
a JSON record (task, round, accuracy matrix, metrics line count, comm bytes,
wall time). RNG needs no saving: every key derives from (seed, task, round,
client).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lorm_jax import errors
from lorm_jax.errors import CheckpointError, ConfigError


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (a full disk, a quota, a read-only or
  vanished folder); the earlier checkpoints are intact and the run resumes
  from the newest of them once the cause is fixed."""


# How a write that failed for want of space shows in orbax's / tensorstore's
# exceptions (tensorstore raises ValueError('RESOURCE_EXHAUSTED: ... No space
# left on device [os_error_code='28']'), Python's own I/O an OSError).
_NO_SPACE = ('RESOURCE_EXHAUSTED', 'No space left on device', 'Disk quota exceeded',
             "os_error_code='28'", "os_error_code='122'")


def is_write_failure(e: BaseException) -> bool:
  """Whether e is the file system refusing a write rather than a bug."""
  return isinstance(e, OSError) or any(m in str(e) for m in _NO_SPACE)


class _QuietWriteFailures(logging.Filter):
  """Drops orbax's own ERROR logs (with tracebacks, from its background
  threads) of a failed write: the run reports it in one line instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    if 'orbax' not in record.pathname:
      return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else '')
    return not any(m in text for m in _NO_SPACE)


class Checkpointer:
  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.workdir = workdir
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    # cleanup_tmp_directories: a save cut short (killed, disk full) leaves a
    # `<step>.orbax-checkpoint-tmp*` folder that the step's next save must not meet.
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True))
    self._metas: dict[int, dict] = {}   # the meta of every step saved or restored here
    self._quiet = None if errors.verbose() else _QuietWriteFailures()
    if self._quiet is not None:
      logging.getLogger('absl').addFilter(self._quiet)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Copies state to the host and writes it in the background (orbax's async
    save: the next round trains meanwhile; the next save or `close` waits for
    it). A step becomes visible only once fully written, so a killed run
    resumes from the last complete one. A write the file system refuses (this
    step's, or the previous step's, found when this save waits for it) raises
    CheckpointWriteError naming the workdir and the last complete step."""
    state = jax.tree.map(np.asarray, state)
    self._metas[step] = dict(meta)
    with self._write_failures():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  @contextlib.contextmanager
  def _write_failures(self):
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (orbax re-raises its threads' errors)
      if not is_write_failure(e):
        raise
      err = self._write_error(e)
      self._abandon()
      raise err from None

  def _write_error(self, e: BaseException) -> CheckpointWriteError:
    text, errno = str(e), getattr(e, 'errno', None)
    if 'Disk quota exceeded' in text or "os_error_code='122'" in text or errno == 122:
      why = 'disk quota exceeded'
    elif any(m in text for m in _NO_SPACE) or errno == 28:
      why = 'no space left on device'
    else:
      why = ' '.join(f'{type(e).__name__}: {text}'.split())[:200]
    fix = 'free space (or give the workdir more)' if 'disk' in why or 'space' in why else \
        'fix that'
    done = self._complete_steps()
    if done:
      last = done[-1]
      saved = f'the last saved checkpoint is step {last}{_where(self._metas.get(last))}'
      then = 'rerun the same command: the run resumes from it'
    else:
      saved, then = 'no checkpoint was saved yet', 'rerun the same command to start again'
    return CheckpointWriteError(
        f'cannot write a checkpoint in workdir {self.workdir}: '
        f'{why}; {saved} (in {self.directory}); {fix} and {then}')

  def _complete_steps(self) -> list[int]:
    """The steps fully written to disk (orbax renames a step's folder to its
    bare number only once every file of it is written)."""
    try:
      return sorted(int(n) for n in os.listdir(self.directory)
                    if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))
    except OSError:
      return []

  def _abandon(self) -> None:
    """After a failed write: stops orbax's threads, whatever they still raise."""
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      pass
    self._unquiet()

  def _unquiet(self) -> None:
    if self._quiet is not None:
      logging.getLogger('absl').removeFilter(self._quiet)
      self._quiet = None

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    step = self.latest_step() if step is None else step
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    self._metas[step] = dict(out['meta'])
    return out['state'], out['meta']

  def restore_newest_readable(self, abstract_state: Any, warn=print
                              ) -> tuple[Any, dict] | None:
    """The newest checkpoint that can be read, or None when there is none.

    A step that cannot be read (damaged or half-written files) is reported in
    one line through `warn`, removed so that the run can save that step
    again, and the next older one is tried. Raises CheckpointError, naming the
    folder, when checkpoints exist but none is readable.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        return self.restore(abstract_state, step)
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
        why = ' '.join(f'{type(e).__name__}: {e}'.split())[:200]
        if i + 1 == len(steps):
          raise CheckpointError(f'no readable checkpoint in {self.directory} (steps '
                                f'{", ".join(map(str, steps))}; the last tried: {why}); remove '
                                'the folder to start the run afresh') from None
        warn(f'warning: checkpoint step {step} in {self.directory} is unreadable ({why}); '
             f'resuming from step {steps[i + 1]}')
        self._remove(step)
    return None

  def _remove(self, step: int) -> None:
    try:
      self.manager.delete(step)
    except Exception:  # pylint: disable=broad-except  (too damaged for orbax)
      shutil.rmtree(os.path.join(self.directory, str(step)), ignore_errors=True)
      self.manager.reload()

  def close(self) -> None:
    """Waits for the last save (CheckpointWriteError if it failed) and closes."""
    with self._write_failures():
      self.manager.wait_until_finished()
    self.manager.close()
    self._unquiet()


def _where(meta: dict | None) -> str:
  """' (task t, round r)' of the last round a run's checkpoint meta holds
  (simulate.RunMeta: task and round are those of the next round to run)."""
  if not meta or 'task' not in meta or 'round' not in meta:
    return ''
  task, rnd = int(meta['task']), int(meta['round'])
  if rnd > 0:
    return f' (after task {task}, round {rnd - 1})'
  return f' (after task {task - 1} and its evaluation)' if task > 0 else ' (before the first round)'


class WorkdirLock:
  """An exclusive flock on the workdir folder itself: a second run on the same
  workdir is refused at once, and a killed process leaves nothing stuck (the
  kernel drops the lock with its file descriptor). Locking the folder's own
  descriptor writes nothing into it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._fd: int | None = None

  def acquire_if_exists(self) -> None:
    if os.path.isdir(self.workdir):
      self.acquire()

  def acquire(self) -> None:
    if self._fd is not None:
      return
    fd = os.open(self.workdir, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise ConfigError(f'{self.workdir} is in use by another run (it holds the workdir '
                        'lock); wait for it to finish or give another --workdir') from None
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

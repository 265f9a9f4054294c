"""Orbax checkpoints of the whole simulation state, saved after every round.

The state is a pytree of arrays (server LoRA, head, method accumulators) plus
a JSON record (task, round, accuracy matrix, metrics line count, comm bytes,
wall time). RNG needs no saving: every key derives from (seed, task, round,
client).
"""
from __future__ import annotations

import fcntl
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lorm_jax.errors import CheckpointError, ConfigError


class Checkpointer:
  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Copies state to the host and writes it in the background (orbax's async
    save: the next round trains meanwhile; the next save or `close` waits for
    it). A step becomes visible only once fully written, so a killed run
    resumes from the last complete one."""
    state = jax.tree.map(np.asarray, state)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    step = self.latest_step() if step is None else step
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
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
    self.manager.wait_until_finished()
    self.manager.close()


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

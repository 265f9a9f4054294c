"""Orbax checkpoints of the whole simulation state, saved after every round.

The state is a pytree of arrays (server LoRA, head, method accumulators) plus
a JSON record (task, round, accuracy matrix, metrics line count, comm bytes,
wall time). RNG needs no saving: every key derives from (seed, task, round,
client).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    state = jax.tree.map(np.asarray, state)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    step = self.latest_step() if step is None else step
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def close(self) -> None:
    self.manager.close()

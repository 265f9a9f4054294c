"""Class-incremental tasks and Dirichlet client partitions (pure numpy).

Everything is a pure function of (labels, config values, seed). The split
seed is independent of any training seed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np

from lorm_jax.data.errors import DataError

SPLIT_FORMAT = "lorm_jax.federated_split/v1"


def task_classes(num_classes: int, num_tasks: int,
                 classes_per_task: int | None = None) -> list[np.ndarray]:
  """Class-incremental tasks in label order.

  Args:
    num_classes: total classes (labels 0..num_classes-1).
    num_tasks: number of tasks T.
    classes_per_task: classes per task; the last task takes the remainder
      (Cars-196: 20 -> 9 x 20 + 1 x 16). None: num_classes / num_tasks,
      which must divide evenly.

  Returns:
    T int64 arrays of consecutive class ids.

  Raises:
    ValueError: the tasks do not cover the classes as asked.
  """
  if num_tasks < 1 or num_classes < num_tasks:
    raise ValueError(
        f"need 1 <= num_tasks <= num_classes, got num_tasks={num_tasks}, "
        f"num_classes={num_classes}")
  if classes_per_task is None:
    if num_classes % num_tasks:
      raise ValueError(
          f"num_classes={num_classes} is not divisible by num_tasks="
          f"{num_tasks}; pass classes_per_task (e.g. "
          f"{math.ceil(num_classes / num_tasks)} gives an uneven last task)")
    classes_per_task = num_classes // num_tasks
  if classes_per_task < 1 or math.ceil(num_classes / classes_per_task) \
      != num_tasks:
    raise ValueError(
        f"classes_per_task={classes_per_task} splits {num_classes} classes "
        f"into {math.ceil(num_classes / max(classes_per_task, 1))} tasks, "
        f"not num_tasks={num_tasks}")
  return [np.arange(s, min(s + classes_per_task, num_classes), dtype=np.int64)
          for s in range(0, num_classes, classes_per_task)]


def dirichlet_split(
    labels: np.ndarray,
    classes: Sequence[int] | np.ndarray,
    num_clients: int,
    beta: float,
    rng: np.random.Generator,
    min_samples: int = 6,
    max_tries: int = 10_000,
) -> list[np.ndarray]:
  """Dirichlet label-skew split of one task's samples over clients.

  For every class c (ascending) draw p ~ Dirichlet(beta * 1_K) and send each
  sample of c to client k ~ Cat(p), independently. The whole task is redrawn
  until every client holds at least ``min_samples`` samples.

  Args:
    labels: int (N,) labels of the whole training set.
    classes: the task's classes.
    num_clients: K.
    beta: Dirichlet concentration (> 0); smaller = more non-IID.
    rng: numpy Generator (consumed).
    min_samples: minimum samples per client.
    max_tries: redraws before giving up.

  Returns:
    K sorted int64 arrays of indices into ``labels``; together they hold every
    sample of the task's classes exactly once.

  Raises:
    ValueError: impossible (fewer samples than K * min_samples), bad
      arguments, or no valid split after ``max_tries`` draws.
  """
  labels = np.asarray(labels)
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  classes = np.unique(np.asarray(classes, dtype=np.int64))
  per_class = [np.flatnonzero(labels == c) for c in classes]
  total = sum(idx.size for idx in per_class)
  if total < num_clients * min_samples:
    raise ValueError(
        f"task with classes {classes.min()}..{classes.max()} has {total} "
        f"samples, fewer than num_clients * min_samples = {num_clients} * "
        f"{min_samples}")
  if not per_class:
    return [np.zeros((0,), np.int64) for _ in range(num_clients)]
  alpha = np.full((num_clients,), float(beta))
  for _ in range(max_tries):
    owner = _draw_owners(per_class, alpha, rng)
    counts = np.bincount(owner, minlength=num_clients)
    if counts.min() >= min_samples:
      return _group_by_owner(per_class, owner, counts)
  raise ValueError(
      f"no Dirichlet(beta={beta}) split of {total} samples gives every one of "
      f"{num_clients} clients >= {min_samples} samples after {max_tries} "
      "tries; raise beta or lower min_samples")


def _draw_owners(per_class: list[np.ndarray], alpha: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
  """One draw of the task's owners: class by class (per_class order),
  p ~ Dirichlet(alpha), then every sample's client k ~ Cat(p).

  Returns int (N_task,) client ids, aligned with concatenate(per_class).
  """
  num_clients = alpha.size
  owner = []
  for idx in per_class:
    p = rng.dirichlet(alpha)
    cdf = np.cumsum(p)
    u = rng.random(idx.size) * cdf[-1]
    owner.append(np.minimum(np.searchsorted(cdf, u, side="right"),
                            num_clients - 1))
  return np.concatenate(owner)


def _group_by_owner(per_class: list[np.ndarray], owner: np.ndarray,
                    counts: np.ndarray) -> list[np.ndarray]:
  """K int64 index arrays, client k's samples ascending; counts (K,) are the
  bincount of owner. O(N log N) for any K."""
  idx_all = np.concatenate(per_class)
  order = np.lexsort((idx_all, owner))
  return np.split(idx_all[order].astype(np.int64), np.cumsum(counts)[:-1])


def federated_split(
    labels: np.ndarray,
    num_classes: int,
    num_tasks: int,
    num_clients: int,
    beta: float,
    seed: int,
    min_samples: int = 6,
    classes_per_task: int | None = None,
) -> list[list[np.ndarray]]:
  """Per-task, per-client sample indices of a training set.

  Task t uses the generator ``default_rng(SeedSequence(seed).spawn(T)[t])``,
  so a task's split depends only on (seed, t, labels, K, beta, min_samples).

  Args:
    labels: int (N,) training labels in [0, num_classes).
    num_classes, num_tasks, classes_per_task: see ``task_classes``.
    num_clients: K.
    beta: Dirichlet concentration.
    seed: split seed (independent of the training seed).
    min_samples: minimum samples per client and task.

  Returns:
    split[t][k]: sorted int64 indices into ``labels``.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes})")
  tasks = task_classes(num_classes, num_tasks, classes_per_task)
  seqs = np.random.SeedSequence(int(seed)).spawn(num_tasks)
  return [dirichlet_split(labels, cls, num_clients, beta,
                          np.random.default_rng(ss), min_samples)
          for cls, ss in zip(tasks, seqs)]


def save_split(path: str, split: Sequence[Sequence[np.ndarray]],
               meta: dict | None = None) -> None:
  """Writes split[t][k] (index arrays) as JSON, with optional metadata."""
  doc = {
      "format": SPLIT_FORMAT,
      "num_tasks": len(split),
      "num_clients": len(split[0]) if split else 0,
      "meta": meta or {},
      "tasks": [[[int(i) for i in np.asarray(c)] for c in task]
                for task in split],
  }
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, separators=(",", ":"))
  os.replace(tmp, path)


def load_split(path: str, num_samples: int | None = None
               ) -> list[list[np.ndarray]]:
  """Reads a split written by ``save_split`` and validates it.

  Args:
    path: JSON file.
    num_samples: if given, every index must be < num_samples.

  Returns:
    split[t][k]: int64 index arrays.

  Raises:
    DataError: missing file or malformed content (wrong format tag, ragged
      client count, negative / out-of-range / duplicated indices in a task).
  """
  try:
    with open(path) as f:
      doc = json.load(f)
  except FileNotFoundError as e:
    raise DataError(f"split file {path} not found; write one with "
                    "lorm_jax.data.partition.save_split") from e
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"split file {path} is not readable JSON ({e})") from e

  def bad(why: str) -> DataError:
    return DataError(f"split file {path} is invalid: {why}")

  if not isinstance(doc, dict) or doc.get("format") != SPLIT_FORMAT:
    raise bad(f"format tag is not {SPLIT_FORMAT!r}")
  tasks = doc.get("tasks")
  if not isinstance(tasks, list) or len(tasks) != doc.get("num_tasks"):
    raise bad("'tasks' missing or its length differs from num_tasks")
  out = []
  for t, task in enumerate(tasks):
    if not isinstance(task, list) or len(task) != doc.get("num_clients"):
      raise bad(f"task {t} does not have num_clients={doc.get('num_clients')}"
                " client lists")
    clients = []
    for k, c in enumerate(task):
      if not isinstance(c, list) or not all(
          isinstance(i, int) and not isinstance(i, bool) for i in c):
        raise bad(f"task {t} client {k} is not a list of integers")
      arr = np.asarray(c, dtype=np.int64)
      if arr.size and arr.min() < 0:
        raise bad(f"task {t} client {k} has a negative index")
      if num_samples is not None and arr.size and arr.max() >= num_samples:
        raise bad(f"task {t} client {k} has index {int(arr.max())} >= "
                  f"num_samples={num_samples}")
      clients.append(arr)
    joined = np.concatenate(clients) if clients else np.zeros((0,), np.int64)
    if np.unique(joined).size != joined.size:
      raise bad(f"task {t} holds a sample index more than once")
    out.append(clients)
  return out


def check_split(path: str, split: Sequence[Sequence[np.ndarray]], labels: np.ndarray,
                tasks: Sequence[np.ndarray], num_clients: int) -> None:
  """Checks a loaded split against the data and the config.

  Raises DataError unless: len(split) == len(tasks), every task has
  `num_clients` clients, every index lies inside the training set, and every
  index of task t is labelled with a class of task t (a split made for other
  data would otherwise train on the wrong images: JAX clamps gathers).
  """
  labels = np.asarray(labels)
  where = f"split file {path} does not fit this run"
  if len(split) != len(tasks):
    raise DataError(f"{where}: it has {len(split)} tasks, the config {len(tasks)}")
  for t, (clients, cls) in enumerate(zip(split, tasks)):
    if len(clients) != num_clients:
      raise DataError(f"{where}: task {t} has {len(clients)} clients, the config "
                      f"num_clients={num_clients}")
    for k, idx in enumerate(clients):
      idx = np.asarray(idx, np.int64)
      if idx.size and idx.max() >= labels.size:
        raise DataError(f"{where}: task {t} client {k} has index {int(idx.max())}, the "
                        f"training set holds {labels.size} samples")
      wrong = idx[~np.isin(labels[idx], cls)]
      if wrong.size:
        raise DataError(f"{where}: task {t} client {k} holds sample {int(wrong[0])} of class "
                        f"{int(labels[wrong[0]])}, not one of task {t}'s classes "
                        f"{[int(x) for x in cls]}")

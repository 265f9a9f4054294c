"""PRNG keys and numpy generators derived from (seed, task, round, client).

No state is carried: the same coordinates always give the same stream, which
is what makes a resumed run identical to an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

# Purposes keep streams for different uses of the same round apart.
PURPOSES = {'lora_init': 0, 'train': 1, 'gram': 2, 'task_gram': 3, 'head_init': 4,
            'shuffle': 5, 'method': 6, 'stats': 7, 'participants': 8, 'after_task': 9}


def key(seed: int, purpose: str, task: int = 0, rnd: int = 0) -> jax.Array:
  k = jax.random.key(seed)
  for v in (PURPOSES[purpose], task, rnd):
    k = jax.random.fold_in(k, v)
  return k


def client_keys(k: jax.Array, clients: int | Sequence[int]) -> jax.Array:
  """(C,) keys, client c's key = fold_in(k, c), for clients 0..C-1 (an int)
  or for the given client ids (a round's participants keep their own streams)."""
  ids = np.arange(clients) if isinstance(clients, (int, np.integer)) else np.asarray(clients)
  return jax.vmap(lambda c: jax.random.fold_in(k, c))(ids)


def participants(seed: int, task: int, rnd: int, client_sizes: Sequence[int],
                 rate: float, count: int = 0) -> np.ndarray:
  """Sorted ids of the clients that take part in round `rnd` of `task`.

  Only clients holding data of the task are eligible. `count` > 0 draws
  min(count, eligible) of them (FedJAX's clients per round); otherwise rate 1
  takes all of them and rate < 1 draws max(1, round(rate * eligible)). Draws
  are without replacement from (seed, task, round) alone, so every process
  and every resume draws the same.
  """
  eligible = np.flatnonzero(np.asarray(client_sizes) > 0)
  if count > 0:
    k = min(count, len(eligible))
  elif rate >= 1.0:
    return eligible
  else:
    k = max(1, int(round(rate * len(eligible))))
  if k == len(eligible):
    return eligible
  picked = numpy_rng(seed, 'participants', task, rnd, 0).choice(eligible, k, replace=False)
  return np.sort(picked)


def numpy_rng(seed: int, purpose: str, task: int, rnd: int, client: int) -> np.random.Generator:
  return np.random.default_rng([seed, PURPOSES[purpose], task, rnd, client])

"""PRNG keys and numpy generators derived from (seed, task, round, client).

No state is carried: the same coordinates always give the same stream, which
is what makes a resumed run identical to an uninterrupted one.
"""
from __future__ import annotations

import jax
import numpy as np

# Purposes keep streams for different uses of the same round apart.
PURPOSES = {'lora_init': 0, 'train': 1, 'gram': 2, 'task_gram': 3, 'head_init': 4,
            'shuffle': 5, 'method': 6, 'stats': 7}


def key(seed: int, purpose: str, task: int = 0, rnd: int = 0) -> jax.Array:
  k = jax.random.key(seed)
  for v in (PURPOSES[purpose], task, rnd):
    k = jax.random.fold_in(k, v)
  return k


def client_keys(k: jax.Array, num_clients: int) -> jax.Array:
  """(C,) keys, client c's key = fold_in(k, c)."""
  return jax.vmap(lambda c: jax.random.fold_in(k, c))(np.arange(num_clients))


def numpy_rng(seed: int, purpose: str, task: int, rnd: int, client: int) -> np.random.Generator:
  return np.random.default_rng([seed, PURPOSES[purpose], task, rnd, client])

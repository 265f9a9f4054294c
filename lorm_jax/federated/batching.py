"""Host-side batch plans: padded, masked index arrays for vmapped clients.

Clients hold different numbers of samples. Every client gets the same number
of steps S (the largest client's), its missing steps padded with index 0 and
mask 0, so one vmapped `lax.scan` trains all of them; masked samples and
fully masked steps change nothing.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def steps_per_epoch(n: int, batch_size: int) -> int:
  return math.ceil(n / batch_size)


def client_batch_plan(client_indices: Sequence[np.ndarray], batch_size: int, epochs: int,
                      rng_for_client, shuffle: bool = True,
                      num_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns idx (C, S, B) int32 and mask (C, S, B) float32.

  Client c runs `epochs` passes over its samples, each a fresh permutation
  (drawn from `rng_for_client(c)`, a numpy Generator) cut into batches of
  `batch_size` (the last one partial, as a non-dropping DataLoader does);
  then padded steps up to S = max over clients (or `num_steps`).
  """
  per_client = []
  for c, idx in enumerate(client_indices):
    idx = np.asarray(idx, np.int64)
    rng = rng_for_client(c)
    steps = []
    for _ in range(epochs):
      order = rng.permutation(idx) if shuffle else idx
      for s in range(steps_per_epoch(len(order), batch_size)):
        steps.append(order[s * batch_size:(s + 1) * batch_size])
    per_client.append(steps)
  s_max = max((len(s) for s in per_client), default=0)
  if num_steps is not None:
    if num_steps < s_max:
      raise ValueError(f'num_steps={num_steps} < needed {s_max}')
    s_max = num_steps
  c = len(client_indices)
  idx_out = np.zeros((c, s_max, batch_size), np.int32)
  mask = np.zeros((c, s_max, batch_size), np.float32)
  for ci, steps in enumerate(per_client):
    for si, batch in enumerate(steps):
      idx_out[ci, si, :len(batch)] = batch
      mask[ci, si, :len(batch)] = 1.0
  return idx_out, mask


def pad_clients(idx: np.ndarray, mask: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads the client axis to a multiple of `multiple` with empty (all-masked) clients."""
  c = idx.shape[0]
  pad = (-c) % multiple
  if not pad:
    return idx, mask
  return (np.concatenate([idx, np.zeros((pad,) + idx.shape[1:], idx.dtype)]),
          np.concatenate([mask, np.zeros((pad,) + mask.shape[1:], mask.dtype)]))

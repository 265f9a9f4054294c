"""On-device preprocessing and augmentation in JAX (jit- and vmap-friendly).

The host feeds uint8 (B, H, W, C) batches at storage size; ``preprocess``
turns them into float32 (B, S, S, 3) model inputs. Every op has a static
output shape: random resized crops are a per-sample ``scale_and_translate``
whose scale/translation are traced values.

Semantics follow torchvision (the reference uses it on PIL images):
RandomResizedCrop samples (scale, log-ratio) up to 10 times and falls back to
a centre crop; Resize(int) sets the shorter side; RandomCrop / CenterCrop use
the same offsets. Resampling is Keys bicubic (a = -0.5, as PIL) with
antialiasing, and the result is clipped to [0, 255] as a uint8 PIL image
would be. One difference: the crop is resampled from the full image, so the
outermost output pixels of a crop also see the image just outside the box
(PIL crops first); this changes only the border pixels, slightly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from lorm_jax.data import registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
_METHODS = {"bicubic": "cubic", "cubic": "cubic", "bilinear": "linear",
            "linear": "linear", "lanczos3": "lanczos3", "nearest": "nearest"}
_RRC_ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Static preprocessing spec (hashable: usable as a jit static argument).

  Attributes:
    image_size: output side S.
    train: apply the random augmentations below (False = evaluation path).
    rrc_scale: RandomResizedCrop area range, e.g. (0.08, 1.0), or None.
    rrc_ratio: RandomResizedCrop aspect-ratio range.
    random_crop_from: train: resize the shorter side to this, then take a
      random S x S crop (CUB style); None = off.
    hflip: train: horizontal flip with probability 1/2.
    resize_method: ``"bicubic"`` (default), ``"bilinear"``, ``"lanczos3"``,
      ``"nearest"``.
    test_resize: eval (and train without crops): resize the shorter side to
      this then centre-crop S; None = direct resize to S x S.
    mean / std: per-channel normalisation of [0, 1] inputs; None = leave
      inputs in [0, 1].
    gray_to_rgb: copy one-channel inputs to three channels.
  """

  image_size: int
  train: bool = False
  rrc_scale: tuple[float, float] | None = None
  rrc_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  random_crop_from: int | None = None
  hflip: bool = False
  resize_method: str = "bicubic"
  test_resize: int | None = None
  mean: tuple[float, float, float] | None = None
  std: tuple[float, float, float] | None = None
  gray_to_rgb: bool = True

  def __post_init__(self):
    if self.image_size < 1:
      raise ValueError(f"image_size must be >= 1, got {self.image_size}")
    if self.rrc_scale is not None and self.random_crop_from is not None:
      raise ValueError("rrc_scale and random_crop_from are exclusive")
    if self.random_crop_from is not None and \
        self.random_crop_from < self.image_size:
      raise ValueError("random_crop_from must be >= image_size")
    if self.test_resize is not None and self.test_resize < self.image_size:
      raise ValueError("test_resize must be >= image_size")
    if self.resize_method not in _METHODS:
      raise ValueError(f"resize_method must be one of {sorted(_METHODS)}")
    if (self.mean is None) != (self.std is None):
      raise ValueError("give both mean and std, or neither")

  @property
  def is_random(self) -> bool:
    """Whether ``preprocess`` uses its key."""
    return self.train and (self.rrc_scale is not None or self.hflip
                           or self.random_crop_from is not None)


def _shorter_side_shape(h: int, w: int, side: int) -> tuple[int, int]:
  """torchvision Resize(int) output (H, W): shorter side = ``side``."""
  if h <= w:
    return side, int(side * w / h)
  return int(side * h / w), side


def _resize(x: jax.Array, hw: tuple[int, int], spec: Preprocess) -> jax.Array:
  """Deterministic resize of (..., H, W, C) float images to ``hw``."""
  if tuple(x.shape[-3:-1]) == tuple(hw):
    return x
  shape = x.shape[:-3] + tuple(hw) + x.shape[-1:]
  return jax.image.resize(x, shape, _METHODS[spec.resize_method],
                          antialias=True)


def _center_crop(x: jax.Array, size: int) -> jax.Array:
  h, w = x.shape[-3], x.shape[-2]
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return x[..., top:top + size, left:left + size, :]


def _eval_geometry(x: jax.Array, spec: Preprocess) -> jax.Array:
  """Resize (+ centre crop) of a (B, H, W, C) float batch to S x S."""
  s = spec.image_size
  if spec.test_resize is None:
    return _resize(x, (s, s), spec)
  hw = _shorter_side_shape(x.shape[-3], x.shape[-2], spec.test_resize)
  return _center_crop(_resize(x, hw, spec), s)


# Layout of the per-sample uniforms: [0:10] RRC areas, [10:20] RRC log
# ratios, [20] top offset, [21] left offset, [22] flip.
_NUM_UNIFORMS = 2 * _RRC_ATTEMPTS + 3


def rrc_box_from_uniform(u: jax.Array, height: int, width: int,
                         scale: tuple[float, float],
                         ratio: tuple[float, float]) -> jax.Array:
  """torchvision RandomResizedCrop.get_params driven by given uniforms.

  Args:
    u: float32 (>= 22,) uniforms in [0, 1): 10 areas, 10 log-ratios, top,
      left.
    height, width: static image size.
    scale, ratio: area and aspect-ratio ranges.

  Returns:
    float32 (4,) = (top, left, crop_h, crop_w) in whole pixels.
  """
  n = _RRC_ATTEMPTS
  area = float(height * width)
  target = area * (scale[0] + (scale[1] - scale[0]) * u[:n])
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  ar = jnp.exp(lo + (hi - lo) * u[n:2 * n])
  w = jnp.round(jnp.sqrt(target * ar))
  h = jnp.round(jnp.sqrt(target / ar))
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(ok)
  any_ok = jnp.any(ok)
  w, h = w[first], h[first]
  top = jnp.minimum(jnp.floor(u[2 * n] * (height - h + 1)), height - h)
  left = jnp.minimum(jnp.floor(u[2 * n + 1] * (width - w + 1)), width - w)
  # Fallback: centre crop with the ratio clamped to the range.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = float(width), float(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    fw, fh = float(round(height * ratio[1])), float(height)
  else:
    fw, fh = float(width), float(height)
  ftop, fleft = float((height - fh) // 2), float((width - fw) // 2)
  box = jnp.stack([top, left, h, w])
  fallback = jnp.array([ftop, fleft, fh, fw], jnp.float32)
  return jnp.where(any_ok, box, fallback).astype(jnp.float32)


def rrc_box(key: jax.Array, height: int, width: int,
            scale: tuple[float, float],
            ratio: tuple[float, float]) -> jax.Array:
  """torchvision RandomResizedCrop.get_params in JAX.

  Returns:
    float32 (4,) = (top, left, crop_h, crop_w) in whole pixels.
  """
  u = jax.random.uniform(key, (_NUM_UNIFORMS,))
  return rrc_box_from_uniform(u, height, width, scale, ratio)


def crop_resize(image: jax.Array, box: jax.Array, size: int,
                method: str = "bicubic") -> jax.Array:
  """Resamples the ``box`` = (top, left, h, w) of one (H, W, C) float image.

  Returns:
    float32 (size, size, C); a fixed-shape op whatever the box.
  """
  top, left, h, w = box[0], box[1], box[2], box[3]
  scale = jnp.stack([size / h, size / w])
  translation = jnp.stack([-top * size / h, -left * size / w])
  return jax.image.scale_and_translate(
      image, (size, size, image.shape[-1]), (0, 1), scale, translation,
      _METHODS[method], antialias=True)


def _train_one(u: jax.Array, x: jax.Array, spec: Preprocess) -> jax.Array:
  """Random geometry + flip of one (H, W, C) float image; u: (23,) uniforms."""
  s = spec.image_size
  h, w = x.shape[0], x.shape[1]
  n = 2 * _RRC_ATTEMPTS
  if spec.rrc_scale is not None:
    box = rrc_box_from_uniform(u, h, w, spec.rrc_scale, spec.rrc_ratio)
    x = crop_resize(x, box, s, spec.resize_method)
  elif spec.random_crop_from is not None:
    rh, rw = _shorter_side_shape(h, w, spec.random_crop_from)
    x = _resize(x, (rh, rw), spec)
    top = jnp.minimum(jnp.floor(u[n] * (rh - s + 1)), rh - s).astype(jnp.int32)
    left = jnp.minimum(jnp.floor(u[n + 1] * (rw - s + 1)),
                       rw - s).astype(jnp.int32)
    x = jax.lax.dynamic_slice(x, (top, left, 0), (s, s, x.shape[-1]))
  else:
    x = _eval_geometry(x, spec)
  if spec.hflip:
    x = jnp.where(u[n + 2] < 0.5, x[:, ::-1, :], x)
  return x


def preprocess(key: jax.Array | None, images: jax.Array,
               spec: Preprocess) -> jax.Array:
  """uint8 (B, H, W, C) -> float32 (B, S, S, 3) model inputs.

  Args:
    key: PRNG key for the batch (one uniform draw of shape (B, 23) gives every
      sample its own crop and flip). May be None when ``spec.is_random`` is
      False.
    images: uint8 (or float in [0, 255]) (B, H, W, C), C in {1, 3}.
    spec: static ``Preprocess`` spec.

  Returns:
    float32 (B, S, S, 3): in [0, 1], or normalised with spec.mean/std.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got {images.shape}")
  x = jnp.asarray(images).astype(jnp.float32)
  if spec.is_random:
    if key is None:
      raise ValueError("a PRNG key is needed for train augmentation")
    u = jax.random.uniform(key, (x.shape[0], _NUM_UNIFORMS))
    x = jax.vmap(lambda ui, im: _train_one(ui, im, spec))(u, x)
  else:
    x = _eval_geometry(x, spec)
  x = jnp.clip(x, 0.0, 255.0) / 255.0
  if x.shape[-1] == 1 and spec.gray_to_rgb:
    x = jnp.repeat(x, 3, axis=-1)
  if spec.mean is not None:
    mean = jnp.asarray(spec.mean, jnp.float32)
    std = jnp.asarray(spec.std, jnp.float32)
    x = (x - mean) / std
  return x


def _test_resize(image_size: int) -> int:
  """256 for 224, same ratio for other sizes."""
  return int(round(image_size * 256 / 224))


# The preprocessing of each benchmark as the reference does it (spec section
# 5), by name; a dataset's registry row names its preset. Each maker takes
# (image_size, train, augment) and returns the Preprocess spec; `augment`
# (random flips) applies to the grayscale preset only, the others follow the
# reference and ignore it.
PRESETS: dict[str, Callable[[int, bool, bool], Preprocess]] = {
    # CIFAR-100, ImageNet-R: inception crop (0.08-1), flip, mean/std 0.5.
    'inception_half': lambda s, train, aug: Preprocess(
        s, train, rrc_scale=(0.08, 1.0), hflip=True, test_resize=_test_resize(s),
        mean=HALF, std=HALF),
    # ImageNet-A: inception crop (0.05-1), flip, ImageNet mean/std.
    'inception_imagenet_a': lambda s, train, aug: Preprocess(
        s, train, rrc_scale=(0.05, 1.0), hflip=True, test_resize=_test_resize(s),
        mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # CUB-200: random crop from the test resize, flip, ImageNet mean/std.
    'crop_flip_imagenet': lambda s, train, aug: Preprocess(
        s, train, random_crop_from=_test_resize(s), hflip=True, test_resize=_test_resize(s),
        mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # Cars-196: resize and flip.
    'flip': lambda s, train, aug: Preprocess(s, train, hflip=True),
    # EuroSAT: resize only.
    'plain': lambda s, train, aug: Preprocess(s, train),
    # Fashion-MNIST: gray to RGB, mean/std 0.5, flips only when asked.
    'grayscale_half': lambda s, train, aug: Preprocess(
        s, train, hflip=aug, mean=HALF, std=HALF, gray_to_rgb=True),
}


def preset(dataset_name: str, image_size: int = 224, train: bool = True,
           augment: bool = False) -> Preprocess:
  """The preprocessing of a registered dataset (its row's ``preset``).

  Args:
    dataset_name: registry name or alias (``lorm_jax.data.registry``).
    image_size: model input side (224 for ViT-B/16).
    train: training (random augmentation) or evaluation transform.
    augment: Fashion-MNIST only: add random flips in training (off by
      default; the other datasets follow the reference and ignore it).

  Returns:
    Preprocess spec.

  Raises:
    ValueError: an unknown name, or a dataset without a preset (one line).
  """
  f = registry.facts(dataset_name)
  if f.preset is None:
    raise ValueError(f'dataset {f.name!r} has no preprocessing preset of its own; set '
                     f'dataset.preprocess to the dataset whose preprocessing it should use')
  return PRESETS[f.preset](image_size, train, augment)

"""On-device preprocessing: shapes, exactness of the simple paths, jit/vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorm_jax.data.augment import (IMAGENET_MEAN, IMAGENET_STD, Preprocess,
                                   crop_resize, preprocess, preset, rrc_box)

pp = jax.jit(preprocess, static_argnames="spec")
crop = jax.jit(crop_resize, static_argnums=(2, 3))


def _images(b=4, h=24, w=24, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, c), np.uint8)


@functools.partial(jax.jit, static_argnums=1)
def _ref_resize(x, size):
  x = jnp.asarray(x, jnp.float32)
  y = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "cubic")
  return jnp.clip(y, 0, 255) / 255


@pytest.mark.parametrize("name", ["cifar100", "imagenet_r", "imagenet_a",
                                  "caltech_birds2011", "cars196", "eurosat",
                                  "fashion_mnist"])
def test_presets_shapes_and_ranges(name):
  x = _images(c=1 if name == "fashion_mnist" else 3)
  key = jax.random.key(0)
  for train in (True, False):
    spec = preset(name, 16, train)
    y = pp(key, x, spec=spec)
    assert y.shape == (4, 16, 16, 3) and y.dtype == jnp.float32
    if spec.mean is None:
      lo, hi = np.zeros(3), np.ones(3)
    else:
      m, s = np.array(spec.mean), np.array(spec.std)
      lo, hi = -m / s, (1 - m) / s
    y = np.asarray(y)
    assert np.all(y >= lo - 1e-5) and np.all(y <= hi + 1e-5)
  hash(spec)  # usable as a static argument


def test_preset_values():
  s = preset("imagenet_r", 224, True)
  assert s.rrc_scale == (0.08, 1.0) and s.hflip and s.mean == (0.5,) * 3
  assert preset("imagenet_r", 224, False).test_resize == 256
  a = preset("imagenet_a", 224, True)
  assert a.rrc_scale == (0.05, 1.0) and a.mean == IMAGENET_MEAN
  assert a.std == IMAGENET_STD
  cub = preset("cub200", 224, True)
  assert cub.random_crop_from == 256 and cub.hflip and cub.rrc_scale is None
  cars = preset("cars196", 224, True)
  assert cars.hflip and cars.mean is None and cars.rrc_scale is None
  e = preset("eurosat", 224, True)
  assert not e.is_random and e.mean is None
  assert not preset("fashion_mnist", 56, True).is_random
  assert preset("fashion_mnist", 56, True, augment=True).hflip
  with pytest.raises(ValueError):
    preset("mnist", 224, True)


def test_deterministic_path_is_jax_resize():
  x = _images(h=20, w=20)
  y = pp(None, x, spec=Preprocess(32))
  np.testing.assert_allclose(y, _ref_resize(x, 32), atol=1e-6)
  y = pp(None, x, spec=Preprocess(20))   # same size: identity
  np.testing.assert_allclose(y, x / 255.0, atol=1e-6)


def test_test_resize_then_center_crop():
  x = _images(h=16, w=16)
  y = pp(None, x, spec=Preprocess(24, test_resize=32))
  big = _ref_resize(x, 32)
  np.testing.assert_allclose(y, big[:, 4:28, 4:28], atol=1e-6)


def test_flip_is_exactly_a_flip():
  x = _images(b=16, h=12, w=12)
  y = np.asarray(pp(jax.random.key(1), x, spec=Preprocess(12, True,
                                                         hflip=True)))
  flipped = 0
  for xi, yi in zip(x / 255.0, y):
    if np.allclose(yi, xi, atol=1e-6):
      continue
    np.testing.assert_allclose(yi, xi[:, ::-1], atol=1e-6)
    flipped += 1
  assert 0 < flipped < 16


def test_full_scale_crop_equals_plain_resize():
  x = _images(h=24, w=24)
  spec = Preprocess(40, True, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0))
  y = pp(jax.random.key(2), x, spec=spec)
  np.testing.assert_allclose(y, _ref_resize(x, 40), atol=1e-4)
  box = jnp.array([0.0, 0.0, 24.0, 24.0])
  z = crop(jnp.asarray(x[0], jnp.float32), box, 40, "bicubic")
  np.testing.assert_allclose(jnp.clip(z, 0, 255) / 255, _ref_resize(x, 40)[0],
                             atol=1e-4)


def test_crop_box_matches_subimage():
  # An integer box with no resampling (crop size = output size) is a slice.
  x = jnp.asarray(_images(b=1, h=30, w=30)[0], jnp.float32)
  box = jnp.array([5.0, 7.0, 16.0, 16.0])
  np.testing.assert_allclose(crop(x, box, 16, "bicubic"), x[5:21, 7:23],
                             atol=1e-3)


def test_rrc_boxes_follow_torchvision_ranges():
  keys = jax.random.split(jax.random.key(3), 2000)
  boxes = np.asarray(jax.jit(jax.vmap(
      lambda k: rrc_box(k, 64, 48, (0.08, 1.0), (0.75, 4 / 3))))(keys))
  top, left, h, w = boxes.T
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= 64) and np.all(left + w <= 48)
  assert np.all(h >= 1) and np.all(w >= 1)
  area = h * w / (64 * 48)
  assert area.min() >= 0.06 and area.max() <= 1.0
  ratio = w / h
  assert ratio.min() > 0.7 and ratio.max() < 1.45
  assert len({tuple(b) for b in boxes}) > 1500  # varied


def test_different_keys_different_crops():
  x = _images()  # same shapes/spec as the cifar100 preset test: no recompile
  spec = preset("imagenet_r", 16, True)
  a = pp(jax.random.key(10), x, spec=spec)
  b = pp(jax.random.key(11), x, spec=spec)
  c = pp(jax.random.key(10), x, spec=spec)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, c)
  # samples in a batch get their own crops
  same = np.repeat(x[:1], 4, axis=0)
  d = pp(jax.random.key(12), same, spec=spec)
  assert not np.allclose(d[0], d[1])


def test_random_crop_from_is_window_of_resized():
  x = _images(b=3, h=20, w=20)
  spec = Preprocess(16, True, random_crop_from=24)
  y = np.asarray(pp(jax.random.key(4), x, spec=spec))
  big = np.asarray(_ref_resize(x, 24))
  for yi, bi in zip(y, big):
    hits = [(i, j) for i in range(9) for j in range(9)
            if np.allclose(bi[i:i + 16, j:j + 16], yi, atol=1e-6)]
    assert hits


def test_gray_to_rgb_and_normalisation():
  x = np.full((2, 8, 8, 1), 255, np.uint8)
  y = pp(None, x, spec=Preprocess(8, mean=(0.5,) * 3, std=(0.5,) * 3))
  np.testing.assert_allclose(y, np.ones((2, 8, 8, 3)), atol=1e-6)
  y = pp(None, np.zeros((1, 8, 8, 3), np.uint8), spec=Preprocess(
      8, mean=IMAGENET_MEAN, std=IMAGENET_STD))
  np.testing.assert_allclose(y[0, 0, 0], -np.array(IMAGENET_MEAN) /
                             np.array(IMAGENET_STD), rtol=1e-6)


def test_vmap_over_clients_under_jit():
  x = _images(b=8, h=24, w=24).reshape(2, 4, 24, 24, 3)
  spec = preset("cifar100", 16, True)
  f = jax.jit(jax.vmap(functools.partial(preprocess, spec=spec)))
  keys = jax.random.split(jax.random.key(5), 2)
  y = f(keys, x)
  assert y.shape == (2, 4, 16, 16, 3)
  np.testing.assert_allclose(y[1], pp(keys[1], x[1], spec=spec), atol=1e-5)


def test_spec_validation():
  with pytest.raises(ValueError, match="exclusive"):
    Preprocess(8, rrc_scale=(0.5, 1.0), random_crop_from=10)
  with pytest.raises(ValueError, match="mean and std"):
    Preprocess(8, mean=(0.5,) * 3)
  with pytest.raises(ValueError, match="key"):
    preprocess(None, _images(), Preprocess(8, True, hflip=True))

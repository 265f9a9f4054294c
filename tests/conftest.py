"""Helpers shared by the test files: the smoke config with overrides, one
uninterrupted smoke run per session, results without their wall time.

Test files import the plain helpers with `from conftest import ...`
(pytest puts tests/ on sys.path); fixtures need no import.
"""
from __future__ import annotations

import os
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the session, shared with the
# subprocesses tests start (they inherit the environment): the many runs of
# the same smoke programs compile once. A cache hit loads the executable XLA
# wrote for the same program and options, so no number changes.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='lorm_jax_xla_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# XLA:CPU compiles the tests' programs with LLVM's optimisation level 0: the
# suite is mostly compilation of small programs, and this takes a third off
# its CPU time (tests/test_methods.py: 83 s -> 54 s of user time on an AMD
# EPYC). Numbers move at round-off against level 3 (summation order, fused
# multiply-adds), the same in every process of the session (subprocesses
# inherit XLA_FLAGS), so every property tested holds as it did.
from lorm_jax import runtime  # pylint: disable=wrong-import-position
runtime.default_xla_flag('--xla_backend_optimization_level', 0)

from configs import smoke  # pylint: disable=wrong-import-position

SMALL_WIDTH = 16   # the prompt and PILoRA tests' ViT: 14 px, patches of 7, 2 blocks


@pytest.fixture(scope='module')
def small_fm():
  """A FunctionalViT of width SMALL_WIDTH for 14 px images, 4 classes, rank 2."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from lorm_jax.models import functional as F, vit  # pylint: disable=import-outside-toplevel
  cfg = vit.ViTConfig(image_size=14, patch_size=7, width=SMALL_WIDTH, depth=2, num_heads=2,
                      mlp_dim=32, num_classes=4, lora_rank=2)
  return F.FunctionalViT(vit.ViT(cfg, rngs=nnx.Rngs(0)))


def small_images(n: int = 3, seed: int = 0):
  """(n, 14, 14, 3) float32 normal images for `small_fm`."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.random.normal(jax.random.key(seed), (n, 14, 14, 3))


def smoke_config(**overrides):
  """configs/smoke.py with overrides; dotted keys reach nested fields
  (`smoke_config(**{'model.dtype': 'bfloat16'})`). Returned locked."""
  c = smoke.get_config()
  c.unlock()
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split('.')
    for p in path:
      node = node[p]
    node[leaf] = v
  c.lock()
  return c


def strip_wall_time(results: dict) -> dict:
  """results.json without what differs between identical runs (wall_seconds)."""
  return {k: v for k, v in results.items() if k not in ('wall_seconds',)}


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """(workdir, results) of one uninterrupted run of the smoke config."""
  from lorm_jax.federated import simulate  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp('smoke'))
  results = simulate.run(smoke_config(), workdir, progress=False)
  return workdir, results

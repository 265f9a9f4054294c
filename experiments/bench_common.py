"""Small helpers shared by the benchmark scripts in experiments/.

- `measure_matmul_gflops`: float32 matmul throughput of the JAX device.
- `measure_bandwidth_gbs`: memory read bandwidth in JAX.
- `time_fn`: median wall time of a call, after a warm-up, outputs blocked on.
- `machine_description`: one line naming CPU, cores, load, JAX and its device.
- `write_section`: appends or replaces one '## Name' section of BENCHMARKS.md.
"""
from __future__ import annotations

import os
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lorm_jax import runtime

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / 'BENCHMARKS.md'


def random_model(cfg: Any) -> Any:
  """A FunctionalViT of `cfg` (a vit.ViTConfig) with every parameter drawn as
  0.02 * N(0, 1) from a fixed seed (weights do not matter for timing)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from lorm_jax.models import functional as F, vit  # pylint: disable=import-outside-toplevel
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      node.set_value(jnp.asarray(0.02 * rng.standard_normal(node.get_value().shape), jnp.float32))
  return F.FunctionalViT(model)


def block(tree: Any) -> Any:
  """Waits for every JAX array in tree (other leaves pass through)."""
  for leaf in jax.tree_util.tree_leaves(tree):
    if hasattr(leaf, 'block_until_ready'):
      leaf.block_until_ready()
  return tree


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 5,
            warmup: int = 1) -> float:
  """Median seconds of fn(*args) over `repeats` calls after `warmup` calls."""
  for _ in range(warmup):
    block(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_matmul_gflops(n: int = 2048, repeats: int = 7, dtype: Any = jnp.float32) -> float:
  """GFLOP/s of a jitted (n, n) @ (n, n) matmul (2 n^3 flops) with operands of
  `dtype` and float32 results (the backbone's bfloat16 matmuls), median."""
  keys = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(keys[0], (n, n), jnp.float32).astype(dtype)
  y = jax.random.normal(keys[1], (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  seconds = time_fn(matmul, x, y, repeats=repeats)
  return 2.0 * n**3 / seconds / 1e9


def measure_bandwidth_gbs(mbytes: int = 1024, repeats: int = 7) -> float:
  """GB/s of reading a float32 array once (jitted sum; nothing large written).

  A read-only reduction: writing a large fresh output would mostly measure
  page faults of the new buffer, not memory bandwidth.
  """
  x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
  seconds = time_fn(jax.jit(jnp.sum), x, repeats=repeats)
  return x.nbytes / seconds / 1e9


def machine_description() -> str:
  """CPU model, usable cores, 1-min load average, jax version and device."""
  cores = runtime.available_cores()
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  dev = jax.devices()[0]
  return (f'{runtime.cpu_model()}, {cores} cores (load avg {load:.1f} at start), '
          f'jax {jax.__version__} on {dev.platform} ({dev.device_kind})')


def write_section(name: str, body: str,
                  path: pathlib.Path | str = BENCHMARKS_MD) -> None:
  """Replaces the '## name' section of path with body (appends it if absent).

  A section runs from its heading to the next '## ' heading or the end of
  the file; other sections are left untouched. Creates the file with a
  '# Benchmarks' heading if it does not exist.
  """
  path = pathlib.Path(path)
  text = path.read_text() if path.exists() else '# Benchmarks\n'
  heading = f'## {name}'
  section = f'{heading}\n\n{body.strip()}\n'
  lines = text.splitlines(keepends=True)
  start = next((i for i, line in enumerate(lines)
                if line.rstrip() == heading), None)
  if start is None:
    text = text.rstrip('\n') + '\n\n' + section
  else:
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith('## ')), len(lines))
    tail = ''.join(lines[end:])
    text = ''.join(lines[:start]) + section + ('\n' + tail if tail else '')
  path.write_text(text)

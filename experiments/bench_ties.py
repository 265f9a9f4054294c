"""Where a TIES merge's time goes: the clients' quantiles against the whole merge.

  python -m experiments.bench_ties            # the embedded default's shapes, 10 clients
  python -m experiments.bench_ties --tiny     # seconds (tests, CI)

The embedded default's LoRA task vectors: ViT-S/14 (12 blocks x {qkv 384->1152,
proj 384->384, fc1 384->1536, fc2 1536->384}, rank 2) and its head (384 x 394
and a bias of 10), 21,384,970 entries per client, ten clients. Timed, jitted,
median of --repeats calls after a warm-up, on one device: the ten trim
thresholds alone (`ties.magnitude_quantile` of each client's task vector, as
`ties_merge_rows` computes them) and the whole `ties.ties_merge_lora`. The
rest of a round's `seconds_merge` (head bookkeeping, the server update,
replication over the devices) is outside both. Prints; writes nothing.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from experiments import bench_common
from lorm_jax.methods import ties


def task_vectors(clients: int, rank: int, width: int, blocks: int, head: int,
                 classes: int) -> dict:
  """Random LoRA factors (a {layer: (C, in, r)}, b {layer: (C, r, out)}) and
  heads of `clients` clients at ViT shapes of the given width and depth."""
  kinds = {'qkv': (width, 3 * width), 'proj': (width, width),
           'fc1': (width, 4 * width), 'fc2': (4 * width, width)}
  shapes = {f'blocks_{i}/{k}': s for i in range(blocks) for k, s in kinds.items()}
  key = jax.random.key(0)
  draw = lambda i, shape: 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)
  return {
      'a': {k: draw(2 * i, (clients, s[0], rank)) for i, (k, s) in enumerate(shapes.items())},
      'b': {k: draw(2 * i + 1, (clients, rank, s[1])) for i, (k, s) in enumerate(shapes.items())},
      'head': {'w': draw(2 * len(shapes), (clients, width, head)), 'b': jnp.zeros((clients, classes))},
      'server_head': {'w': jnp.zeros((width, head)), 'b': jnp.zeros((classes,))},
      'present': jnp.ones((clients,), bool)}


TRIM = ties.TIES.trim   # the method's default trim quantile


@jax.jit
def quantiles(a: dict, b: dict, head: dict, server_head: dict) -> jax.Array:
  """(C,) trim thresholds, as `ties_merge_lora` computes them."""
  return ties.trim_thresholds(ties._lora_task_vector, ties.lora_rows(a, b, head, server_head),
                              TRIM)


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--tiny', action='store_true', help='2 clients, one small block')
  args = parser.parse_args(argv)
  shape = (dict(clients=2, rank=1, width=16, blocks=1, head=8, classes=2) if args.tiny else
           dict(clients=10, rank=2, width=384, blocks=12, head=394, classes=10))
  tv = task_vectors(**shape)
  args4 = (tv['a'], tv['b'], tv['head'], tv['server_head'])
  merge = lambda *x: ties.ties_merge_lora(*x, trim=TRIM)
  out = {'quantiles_s': bench_common.time_fn(quantiles, *args4, repeats=args.repeats),
         'merge_s': bench_common.time_fn(merge, *args4, tv['present'], repeats=args.repeats)}
  print(f'{bench_common.machine_description()}\n{shape}\n'
        f'{shape["clients"]} quantiles {out["quantiles_s"]:.2f} s, whole merge '
        f'{out["merge_s"]:.2f} s (median of {args.repeats})', flush=True)
  return out


if __name__ == '__main__':
  main()

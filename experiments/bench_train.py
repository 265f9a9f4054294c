"""Local-training and Gram-pass throughput, measured side by side in one run.

  python -m experiments.bench_train            # ViT-S/14 at 56 px and ViT-B/16 at 224 px
  python -m experiments.bench_train --quick    # ViT-S/14 only

For each shape, one synthetic round of C clients x S steps x batch 16
(balanced clients, so no padding), trained three ways:
  vmap        all clients in one vmapped, jitted call (the default on GPU)
  lax.map     clients one after another inside one jitted call
  python loop one jitted call per client, the way the PyTorch reference loops
and the Gram pass (diagonal backbone Grams + full head Gram) against a plain
forward pass over the same images. FLOPs come from XLA's cost analysis of the
compiled step; the achieved rate is set against the measured matmul peak.
Writes the "Training throughput" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import bench_common as bc
from lorm_jax.federated import client
from lorm_jax.models import checkpoints, functional as F, vit

SHAPES = {
    'ViT-S/14 @ 56 px (default)': dict(arch=checkpoints.dinov2_s14_config, image=56, clients=10,
                                       steps=4, classes=10, rank=2),
    'ViT-B/16 @ 224 px (paper)': dict(arch=checkpoints.augreg_b16_config, image=224, clients=4,
                                      steps=1, classes=200, rank=4),
}
BATCH = 16


def _model(shape) -> F.FunctionalViT:
  kw = shape['arch'](image_size=shape['image'], num_classes=shape['classes'],
                     lora_rank=shape['rank'])
  model = nnx.eval_shape(lambda: vit.ViT(vit.ViTConfig(**kw), rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      node.set_value(jnp.asarray(0.02 * rng.standard_normal(node.get_value().shape), jnp.float32))
  return F.FunctionalViT(model)


def _flops(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan')))


def bench_shape(name: str, shape: dict, peak: float, repeats: int) -> dict:
  fm = _model(shape)
  p = fm.initial_params()
  c, s, size = shape['clients'], shape['steps'], shape['image']
  n = c * s * BATCH
  images = jax.random.randint(jax.random.key(0), (n, size, size, 3), 0, 255).astype(jnp.uint8)
  labels = jnp.arange(n, dtype=jnp.int32) % 2
  idx = jnp.arange(n, dtype=jnp.int32).reshape(c, s, BATCH)
  mask = jnp.ones((c, s, BATCH), jnp.float32)
  keys = jax.random.split(jax.random.key(1), c)
  class_mask = jnp.arange(shape['classes']) < 2
  pre = lambda k, x: x.astype(jnp.float32) / 127.5 - 1.0
  spec = client.LocalSpec(('b',), 1e-3, 1e-3)
  train_one = functools.partial(client.local_train, fm, spec, pre)
  args = (p.frozen, p.a, p.b, p.head, images, labels)

  vmapped = jax.jit(lambda i, m, k: jax.vmap(train_one, in_axes=(None,) * 6 + (0, 0, 0, None))(
      *args, i, m, k, class_mask))
  mapped = jax.jit(lambda i, m, k: jax.lax.map(
      lambda x: train_one(*args, x[0], x[1], x[2], class_mask), (i, m, k)))
  single = jax.jit(lambda i, m, k: train_one(*args, i, m, k, class_mask))
  loop = lambda i, m, k: [single(i[j], m[j], k[j]) for j in range(c)]

  out = {'name': name, 'images': n}
  for label, fn in (('vmap', vmapped), ('lax.map', mapped), ('python loop', loop)):
    out[label] = bc.time_fn(fn, idx, mask, keys, repeats=repeats)
  # XLA's cost analysis counts a loop body once, so take a one-step scan and scale.
  train_flops = _flops(single, idx[0, :1], mask[0, :1], keys[0]) * s * c

  gram = jax.jit(lambda i, m, k: jax.vmap(
      functools.partial(client.gram_pass, fm, pre, 'diag', True),
      in_axes=(None,) * 5 + (0, 0, 0))(p.frozen, p.a, p.b, p.head, images, i, m, k))
  fwd = jax.jit(lambda i: jax.vmap(functools.partial(client.predict, fm, pre),
                                   in_axes=(None,) * 5 + (0,))(p.frozen, p.a, p.b, p.head,
                                                                images, i))
  out['gram'] = bc.time_fn(gram, idx, mask, keys, repeats=repeats)
  out['forward'] = bc.time_fn(fwd, idx, repeats=repeats)
  best = min(out['vmap'], out['lax.map'], out['python loop'])
  out['train_gflops'] = train_flops / best / 1e9
  out['train_tflop'] = train_flops / 1e12
  out['peak_fraction'] = out['train_gflops'] / peak
  return out


def render(rows, peak, machine, cmd) -> str:
  lines = [f'Command: `{cmd}`  ', f'Machine: {machine}  ',
           f'Measured matmul peak (2048^3 float32, jitted): **{peak:.0f} GFLOP/s**. '
           'Median of repeated runs after a compile/warm-up call. Balanced synthetic clients '
           '(no padding), batch 16, B-round (b and head trained).', '',
           '| shape | images / round | vmap img/s | lax.map img/s | python-loop img/s | '
           'vmap / loop | train GFLOP/s (best) | of peak | Gram pass / forward |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    n = r['images']
    lines.append(f"| {r['name']} | {n} | {n / r['vmap']:.1f} | {n / r['lax.map']:.1f} | "
                 f"{n / r['python loop']:.1f} | {r['python loop'] / r['vmap']:.2f}x | "
                 f"{r['train_gflops']:.0f} | {100 * r['peak_fraction']:.0f}% | "
                 f"{r['gram'] / r['forward']:.2f}x |")
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='ViT-S/14 only')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--no-write', action='store_true')
  args = parser.parse_args(argv)
  machine = bc.machine_description()
  peak = bc.measure_matmul_gflops()
  rows = []
  for name, shape in SHAPES.items():
    if args.quick and 'ViT-B' in name:
      continue
    rows.append(bench_shape(name, shape, peak, args.repeats))
    print(rows[-1], flush=True)
  cmd = 'python -m experiments.bench_train' + (' --quick' if args.quick else '')
  text = render(rows, peak, machine, cmd)
  print(text)
  if not args.no_write:
    bc.write_section('Training throughput', text)


if __name__ == '__main__':
  main()

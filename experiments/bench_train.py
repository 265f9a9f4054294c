"""Local-training and Gram-pass throughput, measured side by side in one run.

  python -m experiments.bench_train            # ViT-S/14 at 56 px and ViT-B/16 at 224 px
  python -m experiments.bench_train --quick    # ViT-S/14 only
  python -m experiments.bench_train --vmap-breakdown [--quick]   # where vmap loses on CPU
  python -m experiments.bench_train --tiny --no-write   # the tiny ViT at 28 px (tests, CI)
  python -m experiments.bench_train --precision [--tiny]  # float32 against bfloat16 here

--precision measures what `model.dtype='auto'` decides by: the machine's
matmul rate with float32 and with bfloat16 operands, and one client's
B-round training step of the default's shapes in each compute dtype, beside
the dtype 'auto' resolves to on this machine (`runtime.fast_bfloat16_matmuls`).

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
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from lorm_jax import metrics, runtime
from lorm_jax.federated import client
from lorm_jax.methods import interface
from lorm_jax.models import functional as F, vit

SHAPES = {
    'ViT-S/14 @ 56 px (default)': dict(arch='dinov2_s14', image=56, clients=10,
                                       steps=4, classes=10, rank=2),
    'ViT-B/16 @ 224 px (paper)': dict(arch='augreg_b16', image=224, clients=4,
                                      steps=1, classes=200, rank=4),
}
TINY = {'tiny ViT @ 28 px (tests)': dict(arch='tiny', image=28, clients=2, steps=2, classes=10,
                                         rank=2)}
BATCH = 16


def _model(shape) -> F.FunctionalViT:
  cfg = vit.architecture(shape['arch'], image_size=shape['image'], num_classes=shape['classes'],
                         lora_rank=shape['rank'])
  return bc.random_model(cfg)


def _flops(jitted, *args) -> float:
  return metrics.compiled_cost(jitted.lower(*args).compile())[0]


class Round(NamedTuple):
  """One synthetic round of a shape: C balanced clients x S steps x batch 16."""
  fm: F.FunctionalViT
  p: F.Params
  images: jax.Array      # (C * S * 16, H, W, 3) uint8
  labels: jax.Array      # (C * S * 16,) int32
  idx: jax.Array         # (C, S, 16) int32
  mask: jax.Array        # (C, S, 16) float32, all ones
  keys: jax.Array        # (C,) keys
  class_mask: jax.Array  # (K,) bool: the first two classes


def _round(shape: dict) -> Round:
  fm = _model(shape)
  c, s, size = shape['clients'], shape['steps'], shape['image']
  n = c * s * BATCH
  images = jax.random.randint(jax.random.key(0), (n, size, size, 3), 0, 255).astype(jnp.uint8)
  return Round(fm, fm.initial_params(), images, jnp.arange(n, dtype=jnp.int32) % 2,
               jnp.arange(n, dtype=jnp.int32).reshape(c, s, BATCH),
               jnp.ones((c, s, BATCH), jnp.float32), jax.random.split(jax.random.key(1), c),
               jnp.arange(shape['classes']) < 2)


def _pre(key, x):
  return x.astype(jnp.float32) / 127.5 - 1.0


def bench_shape(name: str, shape: dict, peak: float, repeats: int) -> dict:
  fm, p, images, labels, idx, mask, keys, class_mask = _round(shape)
  c, s = shape['clients'], shape['steps']
  n = idx.size
  pre = _pre
  spec = interface.LocalSpec(('b',), lr_a=1e-3, lr_b=1e-3, lr_head=1e-3)
  # client.local_train(model, forward, spec, preprocess, half_batches, *, the rest by name).
  train = functools.partial(client.local_train, fm, interface.linear_head_forward, spec, pre)
  train_one = lambda i, m, k: train(frozen=p.frozen, a=p.a, b=p.b, head=p.head, images=images,
                                    labels=labels, idx=i, mask=m, key=k, class_mask=class_mask)

  vmapped = jax.jit(jax.vmap(train_one))
  mapped = jax.jit(lambda i, m, k: jax.lax.map(lambda x: train_one(*x), (i, m, k)))
  single = jax.jit(train_one)
  loop = lambda i, m, k: [single(i[j], m[j], k[j]) for j in range(c)]

  out = {'name': name, 'images': n}
  for label, fn in (('vmap', vmapped), ('lax.map', mapped), ('python loop', loop)):
    out[label] = bc.time_fn(fn, idx, mask, keys, repeats=repeats)
  # XLA's cost analysis counts a loop body once, so take a one-step scan and scale.
  train_flops = _flops(single, idx[0, :1], mask[0, :1], keys[0]) * s * c

  gram = jax.jit(jax.vmap(lambda i, m, k: client.gram_pass(
      fm, pre, 'diag', True, frozen=p.frozen, a=p.a, b=p.b, head=p.head, images=images,
      idx=i, mask=m, key=k)))
  fwd = jax.jit(jax.vmap(lambda i: client.predict(
      fm, interface.linear_head_forward, pre, frozen=p.frozen, a=p.a, b=p.b, head=p.head,
      ctx={}, images=images, idx=i)))
  out['gram'] = bc.time_fn(gram, idx, mask, keys, repeats=repeats)
  out['forward'] = bc.time_fn(fwd, idx, repeats=repeats)
  best = min(out['vmap'], out['lax.map'], out['python loop'])
  out['train_gflops'] = train_flops / best / 1e9
  out['train_tflop'] = train_flops / 1e12
  out['peak_fraction'] = out['train_gflops'] / peak
  return out


def vmap_breakdown(name: str, shape: dict, repeats: int) -> dict[str, float]:
  """Seconds of one round of `shape` four ways, to locate vmap's overhead on CPU.

  vmap with per-client a/b/head (what the loop runs), vmap with the server's
  a/b/head shared by all clients (per-client data, optimizer state and
  gradients still), one client holding all C x 16 images per step (same
  FLOPs, no client axis), and the Python loop of single clients.
  """
  fm, p, images, labels, idx, mask, keys, class_mask = _round(shape)
  c, s = shape['clients'], shape['steps']
  n = idx.size
  pre = _pre
  train = functools.partial(client.local_train, fm, interface.linear_head_forward,
                            interface.LocalSpec(('b',), lr_a=1e-3, lr_b=1e-3, lr_head=1e-3), pre)
  train_one = lambda a, b, h, i, m, k: train(frozen=p.frozen, a=a, b=b, head=h, images=images,
                                             labels=labels, idx=i, mask=m, key=k,
                                             class_mask=class_mask)
  stack = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (c,) + x.shape), t)
  per_client = jax.jit(jax.vmap(train_one))
  shared = jax.jit(jax.vmap(lambda i, m, k: train_one(p.a, p.b, p.head, i, m, k)))
  single = jax.jit(lambda i, m, k: train_one(p.a, p.b, p.head, i, m, k))
  flat_idx = jnp.transpose(idx, (1, 0, 2)).reshape(s, c * BATCH)
  t = {'vmap, per-client parameters': bc.time_fn(
           per_client, stack(p.a), stack(p.b), stack(p.head), idx, mask, keys, repeats=repeats),
       'vmap, parameters shared by all clients': bc.time_fn(shared, idx, mask, keys,
                                                            repeats=repeats),
       f'one client, {c} x {BATCH} images per step': bc.time_fn(
           single, flat_idx, jnp.ones((s, c * BATCH)), keys[0], repeats=repeats),
       'python loop of single clients': bc.time_fn(
           lambda i, m, k: [single(i[j], m[j], k[j]) for j in range(c)], idx, mask, keys,
           repeats=repeats)}
  return {'name': name, 'images': n, **t}


def precision_rows(shape: dict, repeats: int, n: int) -> list[dict]:
  """Per compute dtype: matmul GFLOP/s at n^3 and one client's B-round step
  of `shape` (batch 16, `shape['steps']` steps in one jitted call): compile
  seconds, ms per step, useful GFLOP/s (XLA's count of a one-step call)."""
  rows = []
  for dtype in ('float32', 'bfloat16'):
    sh = dict(shape, clients=1)
    fm = bc.random_model(vit.architecture(sh['arch'], image_size=sh['image'],
                                          num_classes=sh['classes'], lora_rank=sh['rank'],
                                          dtype=dtype))
    _, p, images, labels, idx, mask, keys, class_mask = _round(sh)
    spec = interface.LocalSpec(('b',), lr_a=1e-3, lr_b=1e-3, lr_head=1e-3)
    train = functools.partial(client.local_train, fm, interface.linear_head_forward, spec, _pre)
    step = jax.jit(lambda i, m, k: train(frozen=p.frozen, a=p.a, b=p.b, head=p.head,
                                         images=images, labels=labels, idx=i, mask=m, key=k,
                                         class_mask=class_mask))
    start = time.perf_counter()
    compiled = step.lower(idx[0], mask[0], keys[0]).compile()
    compile_s = time.perf_counter() - start
    seconds = bc.time_fn(compiled, idx[0], mask[0], keys[0], repeats=repeats)
    steps = idx.shape[1]
    flops = _flops(step, idx[0, :1], mask[0, :1], keys[0])
    rows.append({'dtype': dtype, 'compile_s': compile_s, 'step_ms': 1e3 * seconds / steps,
                 'train_gflops': flops * steps / seconds / 1e9,
                 'matmul_gflops': bc.measure_matmul_gflops(n, repeats, jnp.dtype(dtype))})
  return rows


def render_precision(name: str, rows: list[dict], machine: str, cmd: str) -> str:
  auto, why = runtime.auto_compute_dtype()
  lines = [f'Command: `{cmd}`  ', f'Machine: {machine}  ',
           f"`model.dtype='auto'` resolves to **{auto}** on this machine ({why}).", '',
           f'| compute dtype | matmul GFLOP/s | {name}: step ms (batch 16, B-round) | '
           'useful GFLOP/s | compile s |', '|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['dtype']} | {r['matmul_gflops']:.0f} | {r['step_ms']:.1f} | "
                 f"{r['train_gflops']:.0f} | {r['compile_s']:.1f} |")
  return '\n'.join(lines)


def render_breakdown(rows, machine, cmd) -> str:
  lines = [f'Command: `{cmd}`  ', f'Machine: {machine}  ',
           'One round, median after a warm-up; the same images and steps in every row.', '',
           '| shape | variant | seconds | img/s | / python loop |', '|---|---|---|---|---|']
  for r in rows:
    loop = r['python loop of single clients']
    for k, v in r.items():
      if k not in ('name', 'images'):
        lines.append(f"| {r['name']} | {k} | {v:.2f} | {r['images'] / v:.1f} | {v / loop:.2f}x |")
  return '\n'.join(lines)


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
  parser.add_argument('--tiny', action='store_true',
                      help='the tiny ViT only (seconds; implies nothing is written)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--no-write', action='store_true')
  parser.add_argument('--precision', action='store_true',
                      help='only: float32 against bfloat16 on this machine (what dtype=auto picks)')
  parser.add_argument('--vmap-breakdown', action='store_true',
                      help='only: where vmapped training loses time against the loop')
  args = parser.parse_args(argv)
  machine = bc.machine_description()
  shapes = TINY if args.tiny else SHAPES
  args.no_write = args.no_write or args.tiny
  if args.precision:
    name, shape = next(iter(shapes.items()))
    rows = precision_rows(shape, args.repeats, n=256 if args.tiny else 2048)
    text = render_precision(name, rows, machine, 'python -m experiments.bench_train --precision')
    print(text)
    if not args.no_write:
      bc.write_section(f'Compute dtype on this CPU ({runtime.cpu_kind()})', text)
    return rows
  if args.vmap_breakdown:
    rows = [vmap_breakdown(name, shape, args.repeats) for name, shape in shapes.items()
            if not (args.quick and 'ViT-B' in name)]
    cmd = 'python -m experiments.bench_train --vmap-breakdown' + (' --quick' if args.quick else '')
    text = render_breakdown(rows, machine, cmd)
    print(text)
    if not args.no_write:
      bc.write_section('Training throughput: vmap against the loop', text)
    return rows
  peak = bc.measure_matmul_gflops(n=256 if args.tiny else 2048)
  rows = []
  for name, shape in shapes.items():
    if args.quick and 'ViT-B' in name:
      continue
    rows.append(bench_shape(name, shape, peak, args.repeats))
    print(rows[-1], flush=True)
  cmd = 'python -m experiments.bench_train' + (' --quick' if args.quick else '')
  text = render(rows, peak, machine, cmd)
  print(text)
  if not args.no_write:
    bc.write_section('Training throughput', text)
  return rows


if __name__ == '__main__':
  main()

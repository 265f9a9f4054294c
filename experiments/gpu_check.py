"""The paper's programs on a GPU: compiled for a card without one, or measured on one.

  # every program configs/imagenet_r.py runs, compiled for an H100 here (no GPU needed;
  # a venv with the `cuda` extra: pip install -e '.[cuda]'):
  python -m experiments.gpu_check --compile-only --target=h100 [--target=l4 ...] \
      [--config=configs/imagenet_r.py] [--clients=1,10] [--out=FILE.json] [--write]
  # on a real GPU (at most ~8 min on one H100): ViT-B/16 @ 224 training throughput in
  # bfloat16 and float32, the Gram pass, one ImageNet-R-shaped task of
  # configs/bench_vit_b16.py with the whole run extrapolated, peak device memory:
  python -m experiments.gpu_check --out=gpu_check.json
  # the same measurements at tiny shapes, on any machine (CI runs it):
  python -m experiments.gpu_check --tiny --out=/tmp/gpu_check_tiny.json

Compile-only mode lowers the programs of the real code paths (`client.local_train`,
`client.gram_pass`, `client.predict` through `runner.ClientRunner`, the method's
merges, cross-task merge and evaluated model) with abstract inputs
(`jax.ShapeDtypeStruct`) placed on a device of a deviceless CUDA topology built from a
target config in `lorm_jax/gpu_targets/` (XLA's GpuTargetConfigProto of the card), and
reports `compiled.memory_analysis()` per program: arguments, outputs, temporaries and
generated code, the card's own buffer assignment, or the compile error. There is no
autotuning without a device, so a real card picks its own GEMM kernels; the buffers
are XLA's.
"""
from __future__ import annotations

import os
import sys

# Before jax is imported: deviceless CUDA compilation skips the driver/toolkit version
# checks (there is no driver here), and on a real GPU the measurements run with
# on-demand allocation, so that the task run's child process finds memory free and
# `peak_bytes_in_use` means what the programs used, not a preallocated pool.
if '--compile-only' in sys.argv:
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import importlib.util
import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from experiments import bench_common as bc
from lorm_jax import methods as methods_lib, metrics, runtime
from lorm_jax.federated import client, setup, sizing
from lorm_jax.federated.runner import ClientRunner
from lorm_jax.methods import ClientResults
from lorm_jax.models import functional as F, vit

TARGETS_DIR = pathlib.Path(__file__).resolve().parent.parent / 'lorm_jax' / 'gpu_targets'
TARGETS = {'h100': 'h100_sxm.txtpb', 'a100': 'a100_sxm_80.txtpb', 'l4': 'l4.txtpb'}

# Dense (no sparsity) peak TFLOP/s by device_kind substring, from NVIDIA's datasheets:
# bfloat16 tensor cores, TF32 tensor cores (what XLA runs a float32 dot on at JAX's
# default precision on Ampere and later), plain FP32 (CUDA cores).
PEAKS_TFLOPS = {
    'H100 PCIe': dict(bfloat16=756.0, tf32=378.0, fp32=51.2),
    'H100 NVL': dict(bfloat16=835.0, tf32=418.0, fp32=60.0),
    'H100': dict(bfloat16=989.4, tf32=494.7, fp32=66.9),      # SXM5 (80GB HBM3)
    'H200': dict(bfloat16=989.4, tf32=494.7, fp32=66.9),      # SXM
    'A100': dict(bfloat16=312.0, tf32=156.0, fp32=19.5),
    'L4': dict(bfloat16=121.0, tf32=60.0, fp32=30.3),
}
GIB = 2 ** 30

# Training/test images of the datasets a compile-only config may name (no data is
# read: only the shapes matter). ImageNet-R: 30,000 images, the fixed 80/20 split
# (docs/data.md); ImageNet-A: 7,500; synthetic: data/synthetic.py's counts.
DATA_SIZES = {'imagenet_r': (24000, 6000), 'imagenet_a': (6000, 1500)}


def load_config(path: str) -> ConfigDict:
  """get_config() of a config file; 'file.py:arg' passes arg (paper configs: beta=...)."""
  path, _, arg = path.partition(':')
  spec = importlib.util.spec_from_file_location('gpu_check_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def with_overrides(config: ConfigDict, overrides: dict[str, Any]) -> ConfigDict:
  c = ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    node = c
    *parents, leaf = dotted.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def data_shapes(c: ConfigDict) -> tuple[int, int, int]:
  """(training images, test images, stored side) of a config's dataset."""
  name = c.dataset.name
  if name == 'synthetic':
    from lorm_jax.data import synthetic
    return (200 * (c.dataset.train_per_class or synthetic.TRAIN_PER_CLASS),
            200 * (c.dataset.test_per_class or synthetic.TEST_PER_CLASS), c.dataset.store_size)
  if name not in DATA_SIZES:
    raise ValueError(f'compile-only knows the data sizes of {sorted(DATA_SIZES)} and synthetic, '
                     f'not {name!r}')
  return DATA_SIZES[name] + (c.dataset.store_size,)


# ------------------------------------------------------------------ the programs


@dataclasses.dataclass
class Program:
  """One compiled program of a run: name, what lowers it, its abstract inputs."""
  name: str
  what: str
  lower: Callable[[], Any]   # -> jax.stages.Lowered
  clients: int


def _abstract(tree: Any, sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _stack(tree: Any, c: int) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((c,) + tuple(x.shape), x.dtype,
                                                     sharding=x.sharding), tree)


def paper_programs(c: ConfigDict, device: jax.Device, clients: int) -> list[Program]:
  """Every program a run of config c compiles, for `clients` clients per chunk on device.

  Task 1 (a later task: the cross-task terms are live), its B-round (round 0) and A-round
  (round 1): the per-client passes exactly as the run builds them from the method's round
  plan (`sizing.abstract_round_plan`, `sizing.round_passes`), the merges, the cross-task
  merge and the evaluation.
  """
  from jax.sharding import SingleDeviceSharding
  sh = SingleDeviceSharding(device)
  on = lambda tree: _abstract(tree, sh)
  s = sizing.run_shapes(c)
  p = s.params
  s = dataclasses.replace(s, params=F.Params(on(p.frozen), on(p.a), on(p.b), on(p.head)),
                          server=on(s.server))
  method, srv, t = s.method, s.server, 1
  runner = ClientRunner(c.client_mode, clients, devices=[device])
  data = on({'images': jax.ShapeDtypeStruct((s.data.num_train,) + s.data.image_shape, jnp.uint8),
             'labels': jax.ShapeDtypeStruct((s.data.num_train,), jnp.int32),
             'class_mask': jax.ShapeDtypeStruct((s.num_classes,), jnp.bool_)})
  # Steps per client: a client holding twice a balanced share of a task's images, for
  # local_epochs (training) or one epoch (Gram, statistics). Vmapped clients pad to the
  # pass's largest client; the step count sets only the (S, B) plans and per-step
  # scalars, not the step's buffers.
  epoch = math.ceil(2 * (s.data.num_train // c.num_tasks) / c.num_clients / c.batch_size)
  out, seen, plans = [], set(), {}
  for rnd, kind in ((0, 'B'), (1, 'A')):
    plan = plans[kind] = sizing.abstract_round_plan(method, srv, t, rnd, clients)
    for name, fn, shared, epochs, own in sizing.round_passes(s, runner, plan, data):
      if name != 'train_' + ''.join(plan.spec.factors) and name in seen:
        continue   # the Gram and statistics passes are the same program every round
      seen.add(name)
      per_client = on({**sizing.batch_plan(clients, epoch * epochs, c.batch_size),
                       **sizing._stacked(own, clients)})  # pylint: disable=protected-access
      label = f'train_{kind}' if name.startswith('train') else f'{name}_round'
      out.append(Program(label, f'client.{fn.func.__name__}, {kind}-round, {clients} '
                         f'client(s) x {epoch * epochs} steps',
                         lambda fn=fn, sh_=on(shared), pc=per_client: runner._call.lower(fn, sh_, pc),
                         clients))
  out += _server_programs(s, plans, clients, sh)
  return out + _eval_programs(s, c, device, sh)


def _server_programs(s, plans: dict, clients: int, sh) -> list[Program]:
  """The round's merges (method.aggregate) over the clients' uploads, the
  end-of-task Gram pass and the cross-task merge."""
  method, srv, t, model = s.method, s.server, 1, s.model
  lora = {f: srv[f] for f in ('a', 'b', 'head')}
  stacked = _stack(lora, clients)
  out = []
  for rnd, kind in ((0, 'B'), (1, 'A')):
    request = plans[kind].gram
    grams = {} if request is None or request.backbone is None else {
        k: jax.ShapeDtypeStruct((clients,) + ((n,) if request.backbone == 'diag' else (n, n)),
                                jnp.float32, sharding=sh)
        for k, n in model.layer_inputs.items() if k in srv['b']}
    head_grams = (jax.ShapeDtypeStruct((clients, model.cfg.width, model.cfg.width), jnp.float32,
                                       sharding=sh) if request is not None and request.head
                  else None)
    row = lambda dt: jax.ShapeDtypeStruct((clients,), dt, sharding=sh)
    results = ClientResults(stacked['a'], stacked['b'], stacked['head'], grams, head_grams,
                            row(jnp.float32), None, client_ids=row(jnp.int32))
    merge_fn = jax.jit(lambda sv, r, rnd=rnd: method.aggregate(sv, r, t, rnd))
    out.append(Program(f'merge_{kind}', f'method.aggregate, {kind}-round',
                       lambda f=merge_fn, r=results: f.lower(srv, r), clients))
  end_request = method.end_task_gram_request()
  if end_request is not None:
    runner = ClientRunner(s.config.client_mode, clients, devices=list(sh.device_set))
    fn = runner.bind(client.gram_pass, model, s.preprocess_train, end_request.backbone,
                     end_request.head, runner.half_batches)
    images = jax.ShapeDtypeStruct((s.data.num_train,) + s.data.image_shape, jnp.uint8,
                                  sharding=sh)
    per_client = _abstract(sizing.batch_plan(clients, 1, s.config.batch_size), sh)
    out.append(Program('gram_task_end', f'client.gram_pass (backbone {end_request.backbone}), '
                       'the server\'s factors', lambda: runner._call.lower(
                           fn, dict(frozen=s.params.frozen, images=images, **lora), per_client),
                       clients))
    task_grams = {k: jax.ShapeDtypeStruct((n,) if end_request.backbone == 'diag' else (n, n),
                                          jnp.float32, sharding=sh)
                  for k, n in model.layer_inputs.items() if k in srv['b']}
    end_fn = jax.jit(lambda sv, g: method.end_task(sv, t, g))
    out.append(Program('cross_task_merge', 'method.end_task',
                       lambda: end_fn.lower(srv, task_grams), 1))
  return out


def _eval_programs(s, c: ConfigDict, device, sh) -> list[Program]:
  """The evaluated backbone (method.eval_model + add_deltas) and one batch of predictions."""
  method, srv, t = s.method, s.server, 1

  def eval_model(sv, frozen):
    deltas, a, b = method.eval_model(sv, t)
    return F.add_kernel_deltas(frozen, deltas) if deltas else frozen, a, b
  out = [Program('eval_model', 'method.eval_model + add_deltas (the evaluated backbone)',
                 lambda: jax.jit(eval_model).lower(srv, s.params.frozen), 1)]
  eval_batch = c.eval_batch_size if c.eval_batch_size > 0 else 256
  eval_runner = ClientRunner(c.client_mode, 1, devices=[device])
  probe, = sizing._predict_probes(s, eval_runner, (eval_batch,), t)  # pylint: disable=protected-access
  fn, shared, per_client = probe.args
  shared = {**shared, 'images': _abstract(shared['images'], sh),
            'ctx': _abstract(shared['ctx'], sh)}
  out.append(Program('evaluate', f'client.predict, one batch of {eval_batch} test images',
                     lambda: eval_runner._call.lower(fn, shared, _abstract(per_client, sh)), 1))
  return out


def memory_row(compiled) -> dict[str, Any]:
  m = compiled.memory_analysis()
  row = {'argument_bytes': int(m.argument_size_in_bytes),
         'output_bytes': int(m.output_size_in_bytes),
         'alias_bytes': int(m.alias_size_in_bytes),
         'temp_bytes': int(m.temp_size_in_bytes),
         'code_bytes': int(m.generated_code_size_in_bytes)}
  row['total_bytes'] = (row['argument_bytes'] + row['output_bytes'] - row['alias_bytes']
                        + row['temp_bytes'] + row['code_bytes'])
  try:
    flops, _ = metrics.compiled_cost(compiled)
    if flops:
      row['flops'] = flops
  except Exception:  # pylint: disable=broad-except
    pass
  return row


# A program XLA:GPU cannot tile without a device. Before the head-major attention of
# vit._attention_head_major, one client's ViT-B/16 step at 224 px failed so: the
# attention output, batched over (image, head), came out as (B, H, Dh, N), and its
# transpose back to (B N, D) tokens was fused into the Triton GEMM of the projection
# (joined by XLA's dot merger with the LoRA factor a, (768, 770)); with N = 197 tokens, a
# prime, no row tile of the B N = 3152 rows maps onto the transposed operand, and
# without a device there is no autotuning to fall back on (the qkv input gradient,
# likewise). Batched over (head, image) every program compiles with the default flags.
# Should a program still fail so, it is compiled again with cuBLAS GEMMs (the flag
# below) and both outcomes are reported.
TILE_ERROR = "Couldn't find output tile sizes"
NO_TRITON_GEMM = {'xla_gpu_enable_triton_gemm': False}


def target_device(target: str) -> jax.Device:
  """A device of a 1-GPU deviceless topology of the target card ('cpu': this CPU)."""
  if target == 'cpu':
    return jax.devices('cpu')[0]
  from jax.experimental import topologies
  text = (TARGETS_DIR / TARGETS[target]).read_text()
  topo = topologies.get_topology_desc(platform='cuda', target_config=text, topology='1x1x1')
  return topo.devices[0]


def compile_programs(c: ConfigDict, target: str, clients: list[int], dtypes: list[str],
                     say: Callable[[str], None] = print) -> list[dict]:
  """Compiles every program of c for the target, per dtype and client count."""
  device = target_device(target)
  rows = []
  for dtype in dtypes:
    cd = with_overrides(c, {'model.dtype': dtype})
    for n in clients:
      for prog in paper_programs(cd, device, n):
        if prog.clients != n and n != clients[0]:
          continue  # client-independent programs: compiled once per dtype
        row = dict(target=target, device_kind=device.device_kind, dtype=dtype,
                   clients=prog.clients, program=prog.name, what=prog.what)
        t0 = time.perf_counter()
        lowered = prog.lower()
        try:
          row.update(memory_row(lowered.compile()))
        except Exception as e:  # pylint: disable=broad-except
          row['error'] = f'{type(e).__name__}: {str(e).strip()[:2000]}'
          if target != 'cpu' and TILE_ERROR in row['error']:
            # Again with cuBLAS for every GEMM (see NO_TRITON_GEMM).
            try:
              row.update(memory_row(lowered.compile(compiler_options=NO_TRITON_GEMM)))
              row['flags'] = 'xla_gpu_enable_triton_gemm=false'
            except Exception as e2:  # pylint: disable=broad-except
              row['error_without_triton_gemm'] = f'{type(e2).__name__}: {str(e2).strip()[:2000]}'
        row['compile_s'] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        say(_row_line(row))
  return rows


def _row_line(r: dict) -> str:
  if 'total_bytes' not in r:
    return (f"{r['target']} {r['dtype']:8s} {r['program']:16s} C={r['clients']:<2d} "
            f"ERROR {r['error'].splitlines()[0][:300]}")
  return (f"{r['target']} {r['dtype']:8s} {r['program']:16s} C={r['clients']:<2d} "
          f"args {r['argument_bytes'] / GIB:6.2f} GiB  out {r['output_bytes'] / GIB:6.2f}  "
          f"temp {r['temp_bytes'] / GIB:6.2f}  total {r['total_bytes'] / GIB:6.2f} GiB  "
          f"({r['compile_s']:.0f} s)" + (f" with {r['flags']}" if r.get('flags') else ''))


def render_compile(rows: list[dict], data_bytes: int, command: str, machine: str) -> str:
  """Markdown: per target, program and dtype, 1 and N clients, per-client memory, fits."""
  lines = [f'Command: `{command}`  ', f'Compiled on: {machine}  ',
           'Sizes from `compiled.memory_analysis()` of each program compiled for the card without '
           'a device (GiB = 2^30 bytes): args = arguments (the frozen backbone, the server state, '
           f'the whole uint8 training set, {data_bytes / GIB:.2f} GiB, or the test set for '
           '`evaluate`), temp = XLA\'s temporaries, total = args + outputs - aliased + temp + '
           'code, what one call needs on the card. Per client = (total at N - total at 1) / '
           '(N - 1). "Clients per chunk on 16/24/40/80 GB" = the largest `clients_per_chunk` '
           'whose total fits in 90% of the card\'s memory (GB = 10^9 bytes), from the linear '
           'fit; 0 = not even one client.', '']
  cards = (16, 24, 40, 80)
  for target in dict.fromkeys(r['target'] for r in rows):
    sub = [r for r in rows if r['target'] == target]
    lines += [f"### {sub[0]['device_kind']} (`--target={target}`)", '',
              '| program | dtype | clients | args | temp | total | per client | '
              'clients per chunk on 16 / 24 / 40 / 80 GB |', '|---|---|---|---|---|---|---|---|']
    for prog in dict.fromkeys(r['program'] for r in sub):
      for dtype in dict.fromkeys(r['dtype'] for r in sub):
        group = sorted((r for r in sub if r['program'] == prog and r['dtype'] == dtype),
                       key=lambda r: r['clients'])
        ok = [r for r in group if 'total_bytes' in r]
        per = None
        if len(ok) >= 2 and ok[-1]['clients'] > ok[0]['clients']:
          per = (ok[-1]['total_bytes'] - ok[0]['total_bytes']) / (ok[-1]['clients']
                                                                 - ok[0]['clients'])
        for r in group:
          if 'error' in r and 'flags' not in r:
            lines.append(f"| {prog} | {dtype} | {r['clients']} | compile error: "
                         f"{r['error'].splitlines()[0][:160]} | | | | |")
            continue
          fits = ''
          if per is not None and r is group[-1]:
            base = ok[0]['total_bytes'] - per * ok[0]['clients']
            fits = ' / '.join(str(max(0, int((0.9 * gb * 1e9 - base) // per)))
                              if per > 0 else 'any' for gb in cards)
          elif per is None and len(group) == 1:
            fits = ' / '.join('yes' if r['total_bytes'] <= 0.9 * gb * 1e9 else 'no'
                              for gb in cards)
          star = '*' if r.get('flags') else ''
          lines.append(f"| {prog}{star} | {dtype} | {r['clients']} | {r['argument_bytes'] / GIB:.2f} | "
                       f"{r['temp_bytes'] / GIB:.2f} | {r['total_bytes'] / GIB:.2f} | "
                       f"{'' if per is None or r is not group[-1] else f'{per / GIB:.2f}'} | "
                       f'{fits} |')
    starred = [r for r in sub if r.get('flags')]
    if starred:
      lines += ['', '\\* compiled with `' + starred[0]['flags'] + '`: with the default flags XLA '
                'stopped with `' + starred[0]['error'].splitlines()[0][:200].replace('|', '/')
                + '...` (see `TILE_ERROR` in experiments/gpu_check.py).']
    lines.append('')
  return '\n'.join(lines)


# ------------------------------------------------------------------ measurements


def tiny_overrides() -> dict[str, Any]:
  """configs/bench_vit_b16.py shrunk to seconds on a CPU: the tiny ViT at 28 px."""
  from experiments import bench_round
  return dict(bench_round.TINY_WHOLE_RUN)


def peak_of(device_kind: str) -> dict[str, float] | None:
  for name, peak in PEAKS_TFLOPS.items():  # most specific names first
    if name.lower() in device_kind.lower():
      return peak
  return None


def device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def measure_training(arch: str, image: int, dtype: str, clients: int, steps: int,
                     rank: int = 2, classes: int = 200, batch: int = 16, repeats: int = 3,
                     say: Callable[[str], None] = print) -> dict[str, Any]:
  """A synthetic round: C vmapped clients x S steps x batch (a B-round, AdamW), through
  `client.local_train` and the runner's vmapped call, and the Gram pass over the same
  batches (diagonal backbone Grams + head Gram, one epoch). Images/s, useful TFLOP/s
  (`metrics.vit_train_flops`), the compiled programs' memory."""
  cfg = vit.architecture(arch, image_size=image, num_classes=classes, lora_rank=rank,
                         dtype=dtype)
  fm = bc.random_model(cfg)
  p = fm.initial_params()
  n = clients * steps * batch
  images = jax.random.randint(jax.random.key(0), (n, image, image, 3), 0, 255).astype(jnp.uint8)
  labels = jnp.arange(n, dtype=jnp.int32) % 20
  per_client = {'idx': jnp.arange(n, dtype=jnp.int32).reshape(clients, steps, batch),
                'mask': jnp.ones((clients, steps, batch), jnp.float32),
                'key': jax.random.split(jax.random.key(1), clients)}
  pre = lambda k, x: x.astype(jnp.float32) / 127.5 - 1.0
  runner = ClientRunner('vmap', clients)
  from lorm_jax.methods import interface
  spec = interface.LocalSpec(('b',), lr_a=1e-3, lr_b=1e-3, lr_head=1e-3)
  train = runner.bind(client.local_train, fm, interface.linear_head_forward, spec, pre, False)
  shared = dict(frozen=p.frozen, a=p.a, b=p.b, head=p.head, images=images, labels=labels,
                class_mask=jnp.arange(classes) < 20, aux={}, ctx={})
  out: dict[str, Any] = {'arch': arch, 'image': image, 'dtype': dtype, 'clients': clients,
                         'steps': steps, 'batch': batch, 'rank': rank, 'images': n}
  t0 = time.perf_counter()
  compiled = _compile(runner._call.lower(train, shared, per_client), out, 'train')
  out['train_compile_s'] = time.perf_counter() - t0
  out['train_memory'] = memory_row(compiled)
  seconds = bc.time_fn(lambda: compiled(shared, per_client), repeats=repeats)
  out['train_s'] = seconds
  out['images_per_s'] = n / seconds
  out['useful_tflops'] = n * metrics.vit_train_flops(cfg) / seconds / 1e12
  out['step_ms'] = 1e3 * seconds / steps
  peak = peak_of(jax.devices()[0].device_kind)
  if peak is not None:
    ref = peak['bfloat16'] if dtype == 'bfloat16' else peak['tf32']
    out['peak_tflops'] = ref
    out['share_of_peak'] = out['useful_tflops'] / ref
  say(f'{arch} @ {image} {dtype}: {clients} clients x {steps} steps: {seconds:.3f} s, '
      f'{out["images_per_s"]:.1f} img/s, {out["useful_tflops"]:.3f} useful TFLOP/s'
      + (f' ({100 * out["share_of_peak"]:.1f}% of {out["peak_tflops"]:.0f})' if peak else '')
      + f', compile {out["train_compile_s"]:.1f} s')

  gram = runner.bind(client.gram_pass, fm, pre, 'diag', True, False)
  g_shared = dict(frozen=p.frozen, a=p.a, b=p.b, head=p.head, images=images)
  t0 = time.perf_counter()
  g_compiled = _compile(runner._call.lower(gram, g_shared, per_client), out, 'gram')
  out['gram_compile_s'] = time.perf_counter() - t0
  out['gram_memory'] = memory_row(g_compiled)
  out['gram_s'] = bc.time_fn(lambda: g_compiled(g_shared, per_client), repeats=repeats)
  out['gram_images_per_s'] = n / out['gram_s']
  out['device_peak_bytes'] = device_peak_bytes()
  say(f'  Gram pass over the same batches: {out["gram_s"]:.3f} s '
      f'({out["gram_images_per_s"]:.1f} img/s, compile {out["gram_compile_s"]:.1f} s)')
  return out


def _compile(lowered, out: dict, name: str):
  """lowered.compile(); on TILE_ERROR (a GPU), again with cuBLAS GEMMs, noted in out."""
  try:
    return lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if TILE_ERROR not in str(e):
      raise
    out[f'{name}_flags'] = 'xla_gpu_enable_triton_gemm=false'
    out[f'{name}_error_with_defaults'] = str(e)[:2000]
    return lowered.compile(compiler_options=NO_TRITON_GEMM)


def measure_task(config: str, overrides: dict[str, Any]) -> dict[str, Any]:
  """One task of a config as an experiments.run process (bench_round.whole_run); if
  XLA cannot tile a GEMM fusion of it (TILE_ERROR), once more with cuBLAS GEMMs."""
  from experiments import bench_round
  try:
    return bench_round.whole_run_figures(config, overrides)
  except RuntimeError as e:
    if TILE_ERROR not in str(e):
      raise
    env = dict(os.environ)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_gpu_enable_triton_gemm=false').strip()
    out = bench_round.whole_run_figures(config, overrides, env=env)
    out['flags'] = 'xla_gpu_enable_triton_gemm=false'
    out['error_with_defaults'] = str(e)[-2000:]
    return out


def measure(tiny: bool, skip_task: bool = False, say: Callable[[str], None] = print
            ) -> dict[str, Any]:
  """The device measurements: training (bf16, f32), Gram pass, one task, peak memory."""
  t0 = time.perf_counter()
  dev = jax.devices()[0]
  result: dict[str, Any] = {'device_kind': dev.device_kind, 'platform': dev.platform,
                            'machine': bc.machine_description(), 'tiny': tiny,
                            'jax': jax.__version__}
  if tiny:
    shape = dict(arch='tiny', image=28, clients=2, steps=2, repeats=2)
  else:  # ViT-B/16 @ 224, one chunk of the paper's 10 vmapped clients
    shape = dict(arch='augreg_b16', image=224, clients=10, steps=8, repeats=3)
  result['training'] = {}
  for dtype in ('bfloat16', 'float32'):
    result['training'][dtype] = measure_training(
        shape['arch'], shape['image'], dtype, shape['clients'], shape['steps'],
        repeats=shape['repeats'], say=say)
  if not skip_task:
    overrides = tiny_overrides() if tiny else {}
    result['task'] = measure_task('configs/bench_vit_b16.py', overrides)
  result['device_peak_bytes'] = device_peak_bytes()
  result['wall_s'] = time.perf_counter() - t0
  return result


def render_measure(r: dict[str, Any]) -> str:
  lines = [f"Device: {r['device_kind']} ({r['platform']}); {r['machine']}", '',
           '| dtype | clients x steps x batch | img/s | useful TFLOP/s | of dense peak | '
           'step (ms) | train temp (GiB) | Gram img/s | Gram temp (GiB) | compile train / Gram (s) |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for dtype, t in r['training'].items():
    share = (f"{100 * t['share_of_peak']:.1f}% of {t['peak_tflops']:.0f}"
             if 'share_of_peak' in t else 'n/a')
    lines.append(f"| {dtype} | {t['clients']} x {t['steps']} x {t['batch']} | "
                 f"{t['images_per_s']:.1f} | {t['useful_tflops']:.3f} | {share} | "
                 f"{t['step_ms']:.1f} | {t['train_memory']['temp_bytes'] / GIB:.2f} | "
                 f"{t['gram_images_per_s']:.1f} | {t['gram_memory']['temp_bytes'] / GIB:.2f} | "
                 f"{t['train_compile_s']:.1f} / {t['gram_compile_s']:.1f} |")
  if 'task' in r:
    lines += ['', r['task']['text']]
  peak = r.get('device_peak_bytes')
  lines += ['', f"Peak device memory of this process: "
            f"{'not reported by this device' if peak is None else f'{peak / GIB:.2f} GiB'}; "
            f"wall {r['wall_s']:.0f} s."]
  return '\n'.join(lines)


# ------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--compile-only', action='store_true',
                 help='compile the config\'s programs for --target cards, without a GPU')
  p.add_argument('--target', action='append', choices=sorted(TARGETS) + ['cpu'],
                 help='card(s) to compile for (repeatable, or comma-separated); default h100')
  p.add_argument('--config', default='configs/imagenet_r.py')
  p.add_argument('--clients', default='1,10', help='client counts per chunk to compile')
  p.add_argument('--dtypes', default='bfloat16,float32')
  p.add_argument('--tiny', action='store_true', help='tiny shapes (CPU, CI)')
  p.add_argument('--skip-task', action='store_true', help='measure without the task run')
  p.add_argument('--out', help='write the JSON here')
  p.add_argument('--write', action='store_true',
                 help='compile-only: write the table into BENCHMARKS.md')
  p.add_argument('--render', help='the JSON of an earlier --compile-only run: print its table '
                 '(and with --write, put it into BENCHMARKS.md) without compiling again')
  args = p.parse_args(argv)
  if args.render:
    saved = json.loads(pathlib.Path(args.render).read_text())
    c = load_config(saved['config'])
    n_train, _, side = data_shapes(c)
    targets = dict.fromkeys(r['target'] for r in saved['rows'])
    command = saved.get('command') or (
        'python -m experiments.gpu_check --compile-only ' + ' '.join(f'--target={t}' for t in targets)
        + f" --config={saved['config']} --clients="
        + ','.join(str(n) for n in sorted({r['clients'] for r in saved['rows']})))
    text = render_compile(saved['rows'], n_train * side * side * 3, command,
                          saved.get('machine') or _machine_cpu())
    print(text)
    if args.write:
      bc.write_section('GPU programs compiled here (deviceless AOT)', text)
    return saved

  if args.compile_only:
    targets = [t for x in (args.target or ['h100']) for t in x.split(',')]
    c = load_config(args.config)
    if args.tiny:
      c = with_overrides(c, tiny_overrides())
    clients = [int(x) for x in args.clients.split(',')]
    dtypes = args.dtypes.split(',')
    rows = []
    for target in targets:
      rows += compile_programs(c, target, clients, dtypes)
    n_train, _, side = data_shapes(c)
    command = ('python -m experiments.gpu_check --compile-only ' +
               ' '.join(f'--target={t}' for t in targets) + f' --config={args.config} '
               f'--clients={args.clients}')
    text = render_compile(rows, n_train * side * side * 3, command, _machine_cpu())
    print(text)
    result = {'mode': 'compile-only', 'config': args.config, 'rows': rows,
              'command': command, 'machine': _machine_cpu(),
              'xla_flags': os.environ.get('XLA_FLAGS', ''), 'jax': jax.__version__}
    if args.write:
      bc.write_section('GPU programs compiled here (deviceless AOT)', text)
  else:
    result = measure(args.tiny, args.skip_task)
    result['mode'] = 'tiny' if args.tiny else 'device'
    print(render_measure(result))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1, default=str))
  return result


def _machine_cpu() -> str:
  """CPU model and cores (no JAX device: compile-only runs on any machine)."""
  return f'{runtime.cpu_model()}, {runtime.available_cores()} cores, jax {jax.__version__}'


if __name__ == '__main__':
  try:
    main()
  except KeyboardInterrupt:
    sys.exit(130)

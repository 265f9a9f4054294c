"""Benchmark of the whole-model LoRM merge at ViT-B shapes.

  python -m experiments.bench_merge [--repeats 5] [--np-repeats 1] [--full-loop]

One server merge = the 48 LoRA layers of a ViT-B (12 blocks x {qkv 768->2304,
proj 768->768, fc1 768->3072, fc2 3072->768}) in an A-round or a B-round,
plus the 768 x 200 head by RegMean with a full head Gram (alpha 0.5) and the
head bias by FedAvg, for 10 clients. Backbone alpha 0 (the reference: diagonal
Grams, which is what clients upload) and 0.5 (full Grams); ranks 1, 16, 32.

Compared: lorm_jax.merge in one jitted call (float32, Cholesky) against a
float64 numpy loop over layers doing what the PyTorch reference does (full
diag-regularised Grams per client, np.linalg.pinv of the summed Gram or of
A G A^T, per layer). The numpy A-round costs ~10 s per 3072-wide pinv, so by
default it is timed on one layer of each kind (plus the head) and the 12
blocks are counted as 12 times that; --full-loop also times the complete
48-layer loop once (rank 16, alpha 0, A-round) to check that extrapolation.
Writes the '## Merge' section of BENCHMARKS.md (--no-write to skip).
"""
from __future__ import annotations

import os

# One OpenBLAS thread for both sides, set before numpy/jaxlib load OpenBLAS:
# jaxlib's LAPACK kernels (Cholesky, triangular solves) call OpenBLAS from
# XLA's own threads, and with OpenBLAS's threads on top the 2 cores are
# oversubscribed: measured 5x slower Cholesky and 3-4x slower numpy pinv
# while other jobs share the machine. Override by setting the variable.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse  # pylint: disable=g-import-not-at-top
import functools
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common
from lorm_jax import merge

BLOCKS = 12
LAYERS = {'qkv': (768, 2304), 'proj': (768, 768), 'fc1': (768, 3072),
          'fc2': (3072, 768)}
HEAD = (768, 200)
HEAD_ALPHA = 0.5
CLIENTS = 10
BACKBONE_ALPHAS = (0.0, 0.5)
RANKS = (1, 16, 32)

def measure_cholesky_gflops(n: int = 3072, repeats: int = 3) -> float:
  """GFLOP/s (n^3 / 3 flops) of one jitted float32 Cholesky factorisation of an
  (n, n) SPD matrix: the LAPACK potrf call every full-Gram solve makes."""
  x = jax.random.normal(jax.random.PRNGKey(2), (n + 256, n), jnp.float32)
  m = x.T @ x / (n + 256) + jnp.eye(n)
  chol = jax.jit(lambda a: jnp.linalg.cholesky(a))
  return n ** 3 / 3 / bench_common.time_fn(chol, m, repeats=repeats) / 1e9


# ----------------------------------------------------------------- inputs


@functools.partial(jax.jit, static_argnames=('c', 'n'))
def _random_grams(key: jax.Array, c: int, n: int) -> jax.Array:
  """(c, n, n) float32 PSD: X^T X / m for m = 256 rows, plus a positive diagonal."""
  kx, kd = jax.random.split(key)
  x = jax.random.normal(kx, (c, 256, n), jnp.float32)
  d = jax.random.uniform(kd, (c, n), jnp.float32, 0.5, 2.0)
  return jnp.einsum('cmi,cmj->cij', x, x) / 256.0 + jax.vmap(jnp.diag)(d)


def make_grams(c: int) -> dict[int, jax.Array]:
  """Full client Grams per input width (768, 3072) and for the head.

  Layers of the same width share one buffer (memory: 10 clients of full
  3072-wide Grams for 12 layers would be 4.5 GB more); the merge cannot tell.
  """
  widths = sorted({n for n, _ in LAYERS.values()})  # 768, 3072 at ViT-B shapes
  keys = jax.random.split(jax.random.PRNGKey(1), len(widths) + 1)
  grams = {n: _random_grams(k, c, n) for n, k in zip(widths, keys)}
  grams[-1] = _random_grams(keys[-1], c, HEAD[0])
  return grams


def make_factors(c: int, r: int, seed: int) -> dict[str, Any]:
  """Client a (C, in, r), client b (C, r, out), server a (in, r) per layer; head."""
  key = jax.random.PRNGKey(seed)
  a, b, a_srv = {}, {}, {}
  for blk in range(BLOCKS):
    name = f'block{blk}'
    a[name], b[name], a_srv[name] = {}, {}, {}
    for layer, (n, o) in LAYERS.items():
      key, k1, k2, k3 = jax.random.split(key, 4)
      a[name][layer] = jax.random.normal(k1, (c, n, r)) / np.sqrt(n)
      b[name][layer] = jax.random.normal(k2, (c, r, o)) * 0.01
      a_srv[name][layer] = jax.random.normal(k3, (n, r)) / np.sqrt(n)
  key, k1, k2, k3 = jax.random.split(key, 4)
  head_k = jax.random.normal(k1, (c,) + HEAD) * 0.02
  head_bias = jax.random.normal(k2, (c, HEAD[1])) * 0.02
  weights = jax.random.randint(k3, (c,), 50, 500).astype(jnp.float32)
  return dict(a=a, b=b, a_srv=a_srv, head_k=head_k, head_bias=head_bias,
              weights=weights)


def gram_tree(grams: dict[int, jax.Array], alpha: float) -> dict:
  """Per-layer Grams keyed like the factors: full, or diagonals when alpha = 0."""
  g = grams if alpha > 0 else {
      n: jnp.diagonal(x, axis1=1, axis2=2) for n, x in grams.items()}
  return {f'block{blk}': {layer: g[n] for layer, (n, _) in LAYERS.items()}
          for blk in range(BLOCKS)}


# ------------------------------------------------------------ JAX merges


@jax.jit
def jax_head(head_k, head_g, head_bias, w):
  """The head part of every round alone: RegMean weight and FedAvg bias."""
  return (merge.regmean(head_k, head_g, HEAD_ALPHA, w),
          merge.fedavg(head_bias, w))


@functools.partial(jax.jit, static_argnames=('alpha',))
def jax_round_a(a, grams, head_k, head_g, head_bias, w, alpha):
  """A-round + head: one jitted call. Returns (a tree, head, bias, fallbacks)."""
  a_m, info = merge.merge_a_tree(a, grams, alpha, w, return_info=True)
  head, head_info = merge.regmean(head_k, head_g, HEAD_ALPHA, w,
                                  return_info=True)
  bias = merge.fedavg(head_bias, w)
  return a_m, head, bias, (info + head_info).fallbacks


@functools.partial(jax.jit, static_argnames=('alpha',))
def jax_round_b(b, a_srv, grams, head_k, head_g, head_bias, w, alpha):
  """B-round + head: one jitted call. Returns (b tree, head, bias, fallbacks)."""
  b_m, info = merge.merge_b_tree(b, a_srv, grams, alpha, w, return_info=True)
  head, head_info = merge.regmean(head_k, head_g, HEAD_ALPHA, w,
                                  return_info=True)
  bias = merge.fedavg(head_bias, w)
  return b_m, head, bias, (info + head_info).fallbacks


# ---------------------------------------------- float64 numpy reference


def _np_tilde(grams: np.ndarray, alpha: float, w: np.ndarray) -> list[np.ndarray]:
  """w_i (alpha G_i + (1 - alpha) diag(G_i)) as full float64 (in, in) matrices."""
  out = []
  for g, wi in zip(grams, w):
    g = g.astype(np.float64)
    out.append(wi * (alpha * g + (1.0 - alpha) * np.diag(np.diag(g))))
  return out


def np_regmean_layer(k: np.ndarray, grams: np.ndarray, alpha: float,
                     w: np.ndarray) -> np.ndarray:
  """Torch layout W_M = (sum_i W_i G~_i) pinv(sum_i G~_i); k (C, in, out) -> (out, in)."""
  gt = _np_tilde(grams, alpha, w)
  num = sum(ki.T.astype(np.float64) @ gi for ki, gi in zip(k, gt))
  return num @ np.linalg.pinv(sum(gt))


def np_merge_b_layer(b: np.ndarray, a: np.ndarray, grams: np.ndarray,
                     alpha: float, w: np.ndarray) -> np.ndarray:
  """Torch layout B_M = (sum_i B_i A G~_i A^T) pinv(A G~ A^T); -> (out, r)."""
  a_t = a.T.astype(np.float64)  # A (r, in)
  m = [a_t @ gi @ a_t.T for gi in _np_tilde(grams, alpha, w)]
  num = sum(bi.T.astype(np.float64) @ mi for bi, mi in zip(b, m))
  return num @ np.linalg.pinv(sum(m))


def np_layer(kind: str, host: dict, grams: dict[int, np.ndarray], alpha: float,
             blk: int, layer: str) -> np.ndarray:
  """The reference's merge of one backbone layer."""
  g, name, w = grams[LAYERS[layer][0]], f'block{blk}', host['weights']
  if kind == 'A':
    return np_regmean_layer(host['a'][name][layer], g, alpha, w)
  return np_merge_b_layer(host['b'][name][layer], host['a_srv'][name][layer],
                          g, alpha, w)


def np_head(host: dict, grams: dict[int, np.ndarray]) -> tuple:
  """The reference's head merge: RegMean weight, sample-weighted bias."""
  w = host['weights']
  return (np_regmean_layer(host['head_k'], grams[-1], HEAD_ALPHA, w),
          np.tensordot(w, host['head_bias'], axes=1) / w.sum())


def np_round(kind: str, host: dict, grams: dict[int, np.ndarray],
             alpha: float) -> list:
  """The reference's whole merge: a Python loop over all 48 layers, then the head."""
  out = [np_layer(kind, host, grams, alpha, blk, layer)
         for blk in range(BLOCKS) for layer in LAYERS]
  return out + list(np_head(host, grams))


def np_round_time(kind: str, host: dict, grams: dict[int, np.ndarray],
                  alpha: float, repeats: int) -> float:
  """Seconds of the full numpy merge: 12 x (one block's 4 layers) + head.

  Each layer kind of block 0 and the head are timed separately (median of
  repeats); every block has the same shapes, so 12 blocks cost 12 x one.
  """
  t = bench_common.time_fn(np_head, host, grams, repeats=repeats, warmup=0)
  for layer in LAYERS:
    t += BLOCKS * bench_common.time_fn(np_layer, kind, host, grams, alpha, 0,
                                       layer, repeats=repeats, warmup=0)
  return t


# ------------------------------------------------------------ FLOP model


def flops_regmean(c: int, n: int, k: int, full: bool) -> float:
  """G~ x = sum_i w_i G~_i x_i for (C, n, k) inputs."""
  if not full:  # weighted sums over clients and one division per entry
    return 2 * c * n * k + 2 * c * n + n * k
  return (2 * c * n * n + 2 * c * n * n * k  # G~ and the right-hand side
          + n**3 / 3 + 2 * n * n * k)  # Cholesky and two triangular solves


def flops_b(c: int, n: int, r: int, o: int, full: bool) -> float:
  """(a^T G~ a) b_M = sum_i w_i (a^T G~_i a) b_i with a (n, r), b_i (r, o)."""
  ga = 2 * c * n * n * r if full else c * n * r
  return ga + 2 * c * n * r * r + 2 * c * r * r * o + r**3 / 3 + 2 * r * r * o


def round_flops(kind: str, c: int, r: int, alpha: float) -> float:
  full = alpha > 0
  per_block = sum(flops_regmean(c, n, r, full) if kind == 'A'
                  else flops_b(c, n, r, o, full) for n, o in LAYERS.values())
  return BLOCKS * per_block + flops_regmean(c, HEAD[0], HEAD[1], True)


def round_bytes(kind: str, c: int, r: int, alpha: float) -> float:
  """Input bytes the jitted merge must read (every layer's own Gram counted)."""
  total = 0
  for n, o in LAYERS.values():
    gram = c * n * (n if alpha > 0 else 1)
    factor = c * n * r if kind == 'A' else c * r * o + n * r
    total += BLOCKS * (gram + factor)
  total += c * HEAD[0] * HEAD[0] + c * HEAD[0] * HEAD[1] + c * HEAD[1]
  return 4.0 * total


# ------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=5,
                      help='timed calls of the jitted merge (median)')
  parser.add_argument('--np-repeats', type=int, default=1,
                      help='timed calls per layer kind of the numpy loop')
  parser.add_argument('--ranks', type=str, default=','.join(map(str, RANKS)))
  parser.add_argument('--full-loop', action='store_true',
                      help='also time the complete 48-layer numpy A-round once')
  parser.add_argument('--no-write', action='store_true')
  parser.add_argument('--tiny', action='store_true',
                      help='one block of tiny layers, 2 clients, rank 1 (seconds; tests, CI); '
                           'writes nothing')
  args = parser.parse_args(argv)
  if args.tiny:
    set_tiny_shapes()
    args.no_write, args.ranks, args.repeats = True, '1', min(args.repeats, 2)
  ranks = [int(x) for x in args.ranks.split(',')]
  start = time.time()

  machine = bench_common.machine_description()
  gflops = bench_common.measure_matmul_gflops(n=256 if args.tiny else 2048)
  bandwidth = bench_common.measure_bandwidth_gbs(mbytes=16 if args.tiny else 1024)
  chol = measure_cholesky_gflops(n=128 if args.tiny else 3072)
  print(f'{machine}\nmatmul {gflops:.1f} GFLOP/s, bandwidth {bandwidth:.1f} GB/s, '
        f'Cholesky 3072 {chol:.1f} GFLOP/s', flush=True)

  grams = make_grams(CLIENTS)
  np_grams = {n: np.asarray(g) for n, g in grams.items()}
  rows, checks = [], []
  dev = make_factors(CLIENTS, 1, seed=0)
  t_head = bench_common.time_fn(jax_head, dev['head_k'], grams[-1],
                                dev['head_bias'], dev['weights'],
                                repeats=args.repeats)
  print(f'head alone (RegMean 768x200 + bias): {t_head * 1e3:.1f} ms',
        flush=True)
  for r in ranks:
    dev = make_factors(CLIENTS, r, seed=r)
    host = jax.tree_util.tree_map(np.asarray, dev)
    for alpha in BACKBONE_ALPHAS:
      g_tree = gram_tree(grams, alpha)
      for kind in ('A', 'B'):
        if kind == 'A':
          fn = functools.partial(jax_round_a, alpha=alpha)
          call_args = (dev['a'], g_tree)
        else:
          fn = functools.partial(jax_round_b, alpha=alpha)
          call_args = (dev['b'], dev['a_srv'], g_tree)
        call_args += (dev['head_k'], grams[-1], dev['head_bias'], dev['weights'])
        t0 = time.perf_counter()
        fallbacks = int(bench_common.block(fn(*call_args))[-1])
        compile_s = time.perf_counter() - t0
        # The machine may be shared: take the matmul rate right beside the
        # merge timing, so that each row's bound sees the same load.
        rate = bench_common.measure_matmul_gflops(repeats=3)
        t_jax = bench_common.time_fn(fn, *call_args, repeats=args.repeats,
                                     warmup=0)
        t_np = np_round_time(kind, host, np_grams, alpha, args.np_repeats)
        flops = round_flops(kind, CLIENTS, r, alpha)
        nbytes = round_bytes(kind, CLIENTS, r, alpha)
        row = dict(kind=kind, r=r, alpha=alpha, jax=t_jax, np=t_np,
                   compile=compile_s, gflop=flops / 1e9, rate=rate,
                   bound=flops / (rate * 1e9), mb=nbytes / 1e6,
                   mem_bound=nbytes / (bandwidth * 1e9), fallbacks=fallbacks)
        rows.append(row)
        print(f'{kind}-round r={r:2d} alpha={alpha}: jax {t_jax * 1e3:8.1f} ms '
              f'(compile {compile_s:.1f} s, fallbacks {fallbacks}), numpy '
              f'{t_np:7.2f} s, x{t_np / t_jax:7.1f}, flop bound '
              f'{row["bound"] * 1e3:.1f} ms, memory bound '
              f'{row["mem_bound"] * 1e3:.1f} ms', flush=True)
      del g_tree
    if args.full_loop and r == 16:
      t0 = time.perf_counter()
      np_round('A', host, np_grams, 0.0)
      full = time.perf_counter() - t0
      est = next(x['np'] for x in rows
                 if x['kind'] == 'A' and x['r'] == 16 and x['alpha'] == 0.0)
      checks.append((full, est))
      print(f'numpy full 48-layer A-round r=16 alpha=0: {full:.1f} s '
            f'(per-kind estimate {est:.1f} s)', flush=True)
    del dev, host

  body = render(rows, checks, machine, gflops, bandwidth, chol, t_head, args, argv,
                time.time() - start)
  print(body)
  if not args.no_write:
    bench_common.write_section('Merge', body)
  return rows


def set_tiny_shapes() -> None:
  """One block of 32-wide layers, a 32 x 10 head, 2 clients: the script's whole path
  in seconds (tests/test_bench_scripts.py)."""
  global BLOCKS, LAYERS, HEAD, CLIENTS
  BLOCKS, CLIENTS, HEAD = 1, 2, (32, 10)
  LAYERS = {'qkv': (32, 96), 'proj': (32, 32), 'fc1': (32, 128), 'fc2': (128, 32)}


def render(rows: list[dict], checks: list, machine: str, gflops: float,
           bandwidth: float, chol: float, t_head: float, args: argparse.Namespace,
           argv: list[str] | None, wall: float) -> str:
  """Markdown body of the '## Merge' section."""
  cmd = ' '.join(['python -m experiments.bench_merge']
                 + list(sys.argv[1:] if argv is None else argv))
  lines = [
      f'Command: `{cmd}` (total {wall / 60:.1f} min)  ',
      f'Machine: {machine}, OPENBLAS_NUM_THREADS='
      f'{os.environ.get("OPENBLAS_NUM_THREADS")}, load avg at end '
      f'{os.getloadavg()[0]:.1f}  ',
      f'Measured at start: float32 matmul {gflops:.0f} GFLOP/s (2048^3, '
      'jitted; re-measured beside every row, column "matmul"), '
      f'memory read bandwidth {bandwidth:.1f} GB/s (jitted sum of 1 GiB), '
      f'Cholesky factorisation {chol:.0f} GFLOP/s (one jitted 3072 x 3072 potrf).',
      '',
      'Whole-model server merge at ViT-B shapes, 10 clients: 48 LoRA layers '
      '(12 x qkv 768->2304, proj 768->768, fc1 768->3072, fc2 3072->768) in '
      'an A-round or a B-round, plus the 768x200 head by RegMean with a full '
      'head Gram (alpha 0.5) and the head bias by FedAvg. Backbone alpha 0 '
      'takes diagonal Grams (what clients upload), alpha 0.5 full ones. '
      '"jax" = `lorm_jax.merge` in one jitted float32 call, median of '
      f'{args.repeats} after a warm-up (compile not included). "numpy" = the '
      'float64 per-layer loop of the PyTorch reference (full diag-regularised '
      'Grams, `np.linalg.pinv`), one layer of each kind and the head timed '
      f'(median of {args.np_repeats}) and the 12 blocks counted 12x. '
      '"flop bound" = FLOPs of the merge / that row\'s matmul rate; "mem bound" '
      '= input bytes / measured bandwidth.',
      '',
      '| round | rank | alpha | jax (ms) | numpy f64 (s) | speed-up | '
      'GFLOP | matmul (GFLOP/s) | flop bound (ms) | jax / flop bound | '
      'input MB | mem bound (ms) | fallbacks |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for x in rows:
    lines.append(
        f'| {x["kind"]} | {x["r"]} | {x["alpha"]} | {x["jax"] * 1e3:.1f} | '
        f'{x["np"]:.2f} | {x["np"] / x["jax"]:.0f}x | {x["gflop"]:.2f} | '
        f'{x["rate"]:.0f} | '
        f'{x["bound"] * 1e3:.1f} | {x["jax"] / x["bound"]:.1f} | '
        f'{x["mb"]:.0f} | {x["mem_bound"] * 1e3:.1f} | {x["fallbacks"]} |')
  for full, est in checks:
    lines += ['', f'Check of the per-kind numpy figure: the complete 48-layer '
              f'numpy A-round (rank 16, alpha 0) took {full:.1f} s once, '
              f'against {est:.1f} s estimated.']
  speedups = [x['np'] / x['jax'] for x in rows]
  ratios = [x['jax'] / x['bound'] for x in rows]
  lines += ['', f'Speed-up over numpy: {min(speedups):.0f}x to '
            f'{max(speedups):.0f}x (target >= 10x: '
            f'{"met" if min(speedups) >= 10 else "MISSED"}). Time / flop '
            f'bound: {min(ratios):.1f} to {max(ratios):.1f} (target <= 3: '
            f'{"met" if max(ratios) <= 3 else "missed in the rows above 3"}).']
  missed = [x for x in rows if x['jax'] > 3 * x['bound']]
  if missed:
    head_flops = flops_regmean(CLIENTS, HEAD[0], HEAD[1], True) / 1e9
    head_mb = 4e-6 * CLIENTS * (HEAD[0] * HEAD[0] + HEAD[0] * HEAD[1] + HEAD[1])
    balance = gflops / bandwidth
    lines += ['', 'Where the flop-bound target is missed (measured): the head '
              f'alone (RegMean 768x200 with a full Gram, plus bias) takes '
              f'{t_head * 1e3:.1f} ms for {head_flops:.2f} GFLOP; the '
              'backbone part of those rounds (round minus head):', '']
    for x in missed:
      rest = max(x['jax'] - t_head, 1e-9)
      rest_flops = x['gflop'] - head_flops
      rest_mb = x['mb'] - head_mb
      per_byte = rest_flops * 1e3 / rest_mb
      read = rest_mb / 1e3 / bandwidth
      what = (f'{x["kind"]}-round rank {x["r"]} alpha {x["alpha"]}: '
              f'{rest * 1e3:.1f} ms for {rest_flops:.2f} GFLOP '
              f'({rest_flops / rest:.1f} GFLOP/s) and {rest_mb:.0f} MB of '
              f'inputs, {per_byte:.2f} flop/byte')
      if per_byte < balance:
        why = (f'below the {balance:.1f} flop/byte a matmul-rate bound '
               f'needs, so memory bound: {rest / read:.1f}x the time to '
               f'read its inputs once ({read * 1e3:.1f} ms)')
        if rest > 1.5 * read:
          why += ('; the rest is copies (masking, fresh outputs) and per-op '
                  'overhead, not timed separately')
      elif x['kind'] == 'A' and x['alpha'] > 0:
        chol_flops = BLOCKS * sum(n ** 3 / 3 for n, _ in LAYERS.values()) / 1e9
        why = (f'{chol_flops:.0f} of its GFLOP are the Cholesky factorisations of '
               f'the 48 (in, in) systems, which LAPACK runs at {chol:.0f} GFLOP/s '
               f'(measured above), {chol / gflops:.2f} of the matmul rate: at that '
               f'rate they alone take {chol_flops / chol * 1e3:.0f} ms')
      else:
        why = ('its flops are small per-client r x r products and narrow '
               'solves, which run far below the large-matmul rate')
      lines.append(f'- {what}: {why}.')
  return '\n'.join(lines)


if __name__ == '__main__':
  main()

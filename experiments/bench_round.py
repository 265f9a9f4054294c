"""Whole rounds through the real loop: time and peak memory vs clients and rank.

  python -m experiments.bench_round                   # both sweeps below, ~30 min here
  python -m experiments.bench_round --only=default    # the embedded default only
  python -m experiments.bench_round --config=configs/bench_vit_b16.py --whole-run
                                                      # first task, whole run extrapolated
  python -m experiments.bench_round --many-clients    # 100 / 1,000 / 5,000 clients, 20 drawn

Every point is its own `python -m experiments.run ... --max_rounds=R` process
(nothing is shared between points; peak RSS is that process's, from wait4).
The first two rounds compile (a B-round and an A-round, different jitted
steps), so the figures are the medians of the rounds after them, split into
local training, Gram pass and merge as the loop logs them in metrics.jsonl.

Clients hold balanced data (beta = 1000) and a fixed number of samples each,
so the work per client is constant and the curves show the cost of the client
axis itself. Writes the "Rounds" section of BENCHMARKS.md, the plot
docs/img/bench_round.png and the points in docs/bench_round.json (`--only`
reruns one sweep and keeps the other's points).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from experiments import bench_common as bc

# name -> (config file, fixed overrides, samples per client, clients sweep, ranks sweep)
SWEEPS = {
    'default': dict(config='configs/default.py', per_client=40, rank_clients=10,
                    clients=(1, 2, 4, 8, 16, 32), ranks=(1, 8, 32), rounds=4,
                    set={'num_tasks': 5, 'dataset.test_per_class': 10}),
    'vit_b16': dict(config='configs/bench_vit_b16.py', per_client=16, rank_clients=1,
                    clients=(1, 2, 4), ranks=(1, 32), rounds=3,
                    set={'model.dtype': 'float32', 'clients_per_chunk': 2,
                         'dataset.test_per_class': 1, 'local_epochs': 1}),
}
# Many clients, few participants: the full Fashion-MNIST training set (60k images)
# split Dirichlet(0.5) over 100 / 1,000 / 5,000 clients, 20 drawn per round among
# the clients holding data of the task (min_samples 0: most of 5,000 clients hold
# none of a task's 12k images), 1 local epoch, LoRM.
MANY_CLIENTS = dict(config='configs/fmnist_reference.py:epochs=1,split=dirichlet',
                    clients=(100, 1000, 5000), rounds=5,
                    set={'dataset.train_per_class': 0, 'dataset.test_per_class': 10,
                         'min_samples': 0, 'clients_per_round': 20})
# configs/bench_vit_b16.py shrunk to seconds on a CPU (`--whole-run --tiny`, tests and
# experiments.gpu_check --tiny): the tiny ViT at 28 px, 2 clients, 3 rounds of 1 epoch.
TINY_WHOLE_RUN = {'model.name': 'tiny', 'image_size': 28, 'dataset.store_size': 32,
                  'dataset.train_per_class': 4, 'dataset.test_per_class': 1, 'num_clients': 2,
                  'clients_per_chunk': 2, 'rounds': 3, 'local_epochs': 1,
                  'eval_batch_size': 64, 'model.rank': 2}
# Rounds per point: the first two compile (a B-round and an A-round are different
# jitted steps); the rest are measured (default: a B- and an A-round; ViT-B: a B-round).


def classes_per_task(config: str) -> int:
  return 2 if 'default' in config else 20


def run_point(config: str, overrides: dict, rounds: int, extra_flags=(),
              env: dict | None = None) -> dict:
  """One experiments.run process (environment `env`, default this one's); its round
  timings and peak RSS."""
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, '-m', 'experiments.run', f'--config={config}',
           f'--workdir={workdir}', f'--max_rounds={rounds}', *extra_flags]
    cmd += [f'--config.{k}={v}' for k, v in overrides.items()]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
      raise RuntimeError(f'{" ".join(cmd)} failed:\n{out[-3000:]}')
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = [json.loads(x) for x in f]
  rows = [x for x in lines if x['kind'] == 'round']
  timed = rows[2:] or rows[-1:]
  med = lambda k: statistics.median(x[k] for x in timed)
  return dict(round=med('seconds_round'), steps=med('_steps'), train=med('seconds_train'), gram=med('seconds_gram'),
              merge=med('seconds_merge'), wall=wall, rows=rows,
              rss_gib=usage.ru_maxrss / 2**20,  # ru_maxrss is in KiB on Linux
              device_gib=max((x.get('device_peak_mib', 0.0) for x in rows), default=0.0) / 1024)


def point_overrides(sweep: dict, clients: int, rank: int | None) -> dict:
  per_class = -(-sweep['per_client'] * clients // classes_per_task(sweep['config']))
  o = dict(sweep['set'], num_clients=clients, beta=1000.0, **{
      'dataset.train_per_class': per_class})
  if rank is not None:
    o['model.rank'] = rank
  return o


def run_sweep(name: str, sweep: dict) -> list[dict]:
  points = [('clients', c, None) for c in sweep['clients']]
  points += [('rank', sweep['rank_clients'], r) for r in sweep['ranks']]
  out = []
  for axis, clients, rank in points:
    res = run_point(sweep['config'], point_overrides(sweep, clients, rank), sweep['rounds'])
    res.update(sweep=name, axis=axis, clients=clients, rank=rank)
    out.append(res)
    print(f"{name} clients={clients} rank={rank}: round {res['round']:.2f} s (train "
          f"{res['train']:.2f}, gram {res['gram']:.2f}, merge {1e3 * res['merge']:.0f} ms), "
          f"peak RSS {res['rss_gib']:.2f} GiB", flush=True)
  return out


def whole_run_figures(config: str, overrides: dict | None = None,
                      env: dict | None = None) -> dict:
  """Runs the first task of `config` (with `overrides`) as one experiments.run process
  and extrapolates the whole run; the figures and a one-paragraph summary ('text')."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg', config)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  overrides = dict(overrides or {})
  rounds, tasks = overrides.get('rounds', c.rounds), overrides.get('num_tasks', c.num_tasks)
  res = run_point(config, overrides, rounds, env=env)
  first = sum(x['seconds_round'] for x in res['rows'])
  steady = res['round'] * rounds
  est = first + steady * (tasks - 1)
  out = dict(config=config, overrides=overrides, rounds=rounds, tasks=tasks,
             first_task_rounds_s=first, process_s=res['wall'], peak_rss_gib=res['rss_gib'],
             device_peak_gib=res['device_gib'], steady_round_s=res['round'],
             train_s=res['train'], gram_s=res['gram'], merge_s=res['merge'],
             whole_run_extrapolated_s=est)
  device = (f', device peak {res["device_gib"]:.1f} GiB' if res['device_gib'] else '')
  out['text'] = (
      f'`{config}`: first task ({rounds} rounds) {first:.0f} s of rounds, process '
      f'{res["wall"]:.0f} s, peak RSS {res["rss_gib"]:.1f} GiB{device}; steady round '
      f'{res["round"]:.1f} s (train {res["train"]:.1f}, Gram {res["gram"]:.1f}, merge '
      f'{res["merge"]:.2f}); whole run of {tasks} tasks **extrapolated** (not run): '
      f'{est / 60:.1f} min (end-of-task Gram passes and evaluations not included).')
  return out


def whole_run(config: str, overrides: dict | None = None) -> str:
  """Runs the first task of `config` and extrapolates the whole run (a summary line)."""
  return whole_run_figures(config, overrides)['text']


def many_clients() -> list[dict]:
  """MANY_CLIENTS, one process per client count."""
  out = []
  for n in MANY_CLIENTS['clients']:
    res = run_point(MANY_CLIENTS['config'], dict(MANY_CLIENTS['set'], num_clients=n),
                    MANY_CLIENTS['rounds'])
    res.update(clients=n, rows=None)
    out.append(res)
    print(f"{n} clients, 20 drawn: round {res['round']:.2f} s (train {res['train']:.2f} s for "
          f"{res['steps']:.0f} client-steps, Gram {res['gram']:.2f}, merge "
          f"{1e3 * res['merge']:.0f} ms), peak RSS {res['rss_gib']:.2f} GiB", flush=True)
  return out


def render_many(points: list[dict], machine: str) -> str:
  lines = ['Command: `python -m experiments.bench_round --many-clients`  ', f'Machine: {machine}  ',
           'Full Fashion-MNIST training set (60,000 images), Dirichlet(0.5) split over N '
           'clients, `clients_per_round=20` drawn each round among the clients holding data '
           'of the task, `min_samples=0`, LoRM, ViT-S/14 @ 56 px, rank 2, 1 local epoch, '
           'batch 16. One `experiments.run --max_rounds=5` process per row; times are '
           'medians of rounds 3-5 (the first two compile). The 20 participants hold less '
           'data when N is larger, so the training work differs between rows: compare '
           'the seconds per client-step (a client-step is one batch of one participant).', '',
           '| clients | round (s) | train (s) | client-steps | train / step (ms) | Gram (s) | '
           'merge (ms) | peak RSS (GiB) |', '|---|---|---|---|---|---|---|---|']
  for p in points:
    lines.append(f"| {p['clients']} | {p['round']:.2f} | {p['train']:.2f} | {p['steps']:.0f} | "
                 f"{1e3 * p['train'] / max(p['steps'], 1):.0f} | {p['gram']:.2f} | "
                 f"{1e3 * p['merge']:.0f} | {p['rss_gib']:.2f} |")
  return '\n'.join(lines)


def plot_many(points: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  xs = [p['clients'] for p in points]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  axes[0].plot(xs, [p['round'] for p in points], 'o-', label='round')
  axes[0].plot(xs, [1e3 * p['train'] / max(p['steps'], 1) / 10 for p in points], 's--',
               label='training per client-step (10 ms)')
  axes[0].set_ylabel('seconds')
  axes[0].set_ylim(bottom=0)
  axes[1].plot(xs, [p['rss_gib'] for p in points], 'o-', label='peak RSS')
  axes[1].set_ylabel('GiB')
  axes[1].set_ylim(bottom=0)
  _save_log_x(fig, axes, ('Round time, 20 participants', 'Peak RSS, 20 participants'),
              'clients in the federation', 10, path)


def render(points: list[dict], machine: str) -> str:
  device = any(p.get('device_gib') for p in points)  # GPUs and TPUs report it, CPUs do not
  lines = ['Command: `python -m experiments.bench_round`  ', f'Machine: {machine}  ',
           'Each row is one `experiments.run --max_rounds=R` process (LoRM; R = 4 for the '
           'default, 3 for ViT-B); times are medians of the rounds after the two compiling '
           'ones; peak RSS is the whole '
           'process (wait4). Balanced clients (beta 1000) with a fixed number of samples '
           'each: default 40 (Fashion-MNIST, ViT-S/14 @ 56 px, rank 2, 1 epoch), '
           'ViT-B/16 16 (synthetic 224 px, float32, 1 epoch, clients vmapped 2 at a time).',
           '', '| config | clients | rank | round (s) | train (s) | Gram (s) | merge (ms) | '
           'round / client (s) | peak RSS (GiB) |' + (' device peak (GiB) |' if device else ''),
           '|---|---|---|---|---|---|---|---|---|' + ('---|' if device else '')]
  for p in points:
    rank = p['rank'] if p['rank'] is not None else 'config'
    lines.append(f"| {p['sweep']} | {p['clients']} | {rank} | {p['round']:.2f} | "
                 f"{p['train']:.2f} | {p['gram']:.2f} | {1e3 * p['merge']:.0f} | "
                 f"{p['round'] / p['clients']:.2f} | {p['rss_gib']:.2f} |" +
                 (f" {p.get('device_gib', 0.0):.2f} |" if device else ''))
  return '\n'.join(lines)


def plot(points: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name in sorted({p['sweep'] for p in points}):
    pts = [p for p in points if p['sweep'] == name and p['axis'] == 'clients']
    xs = [p['clients'] for p in pts]
    axes[0].plot(xs, [p['round'] for p in pts], 'o-', label=f'{name} round (s)')
    axes[1].plot(xs, [p['rss_gib'] for p in pts], 'o-', label=f'{name} peak RSS (GiB)')
  _save_log_x(fig, axes, ('Round time vs clients', 'Peak RSS vs clients'), 'clients', 2, path)


def _save_log_x(fig, axes, titles, xlabel: str, base: int, path: str) -> None:
  """Log-scale x axes with titles, grid and legend; the figure saved to path."""
  import matplotlib.pyplot as plt
  for ax, title in zip(axes, titles):
    ax.set_xscale('log', base=base)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--only', choices=sorted(SWEEPS), help='one sweep only')
  p.add_argument('--config', help='with --whole-run: the config to time')
  p.add_argument('--whole-run', action='store_true')
  p.add_argument('--many-clients', action='store_true',
                 help='the many-clients sweep (partial participation) instead')
  p.add_argument('--no-write', action='store_true')
  p.add_argument('--tiny', action='store_true',
                 help='with --whole-run: the config at tiny shapes (TINY_WHOLE_RUN; seconds on '
                      'a CPU; writes nothing)')
  args = p.parse_args(argv)
  machine = bc.machine_description()
  if args.whole_run:
    if not args.config:
      p.error('--whole-run needs --config')
    figures = whole_run_figures(args.config, TINY_WHOLE_RUN if args.tiny else None)
    text = f'Command: `python -m experiments.bench_round --config={args.config} --whole-run`  \n' \
           f'Machine: {machine}  \n{figures["text"]}'
    print(text)
    if not (args.no_write or args.tiny):
      bc.write_section('Whole run, extrapolated from its first task', text)
    return figures
  if args.many_clients:
    points = many_clients()
    text = render_many(points, machine)
    print(text)
    if not args.no_write:
      (bc.REPO_ROOT / 'docs' / 'bench_many_clients.json').write_text(json.dumps(points, indent=1))
      plot_many(points, str(bc.REPO_ROOT / 'docs' / 'img' / 'bench_many_clients.png'))
      bc.write_section('Many clients, 20 participants per round', text +
                       '\n\n![round time and RSS vs clients](docs/img/bench_many_clients.png)')
    return
  # Points of the sweeps not rerun are kept from the last run (docs/bench_round.json).
  saved = bc.REPO_ROOT / 'docs' / 'bench_round.json'
  old = json.loads(saved.read_text()) if saved.exists() and args.only else []
  points = [p for p in old if p['sweep'] != args.only]
  for name, sweep in SWEEPS.items():
    if args.only in (None, name):
      points += run_sweep(name, sweep)
  points.sort(key=lambda p: list(SWEEPS).index(p['sweep']))
  if not args.no_write:
    saved.write_text(json.dumps(points, indent=1))
  text = render(points, machine)
  print(text)
  if not args.no_write:
    img = bc.REPO_ROOT / 'docs' / 'img' / 'bench_round.png'
    plot(points, str(img))
    bc.write_section('Rounds', text + '\n\n![round time and RSS vs clients](docs/img/bench_round.png)')


if __name__ == '__main__':
  main()

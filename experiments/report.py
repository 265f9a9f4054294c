"""Tabulates results.json files beside the published PyTorch numbers.

  python -m experiments.report workdirs/sweep/* [--out workdirs/report]

Prints, and writes as report.md and report.png, a method x benchmark table of
final accuracy (mean +- std over seeds), the published number of that cell
(LORM_SPEC section 6, the poster's table) and the difference. Runs on the
embedded Fashion-MNIST configs get a table of their own: nothing was
published for them.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np

from lorm_jax.errors import UserError, argument_parser, report_user_errors
from lorm_jax import plotting  # noqa: F401  (selects the Agg backend)
import matplotlib.pyplot as plt  # noqa: E402

BENCHMARKS = ['cifar100', 'imagenet_r', 'imagenet_a', 'eurosat', 'cars196', 'caltech_birds2011']
TITLES = {'cifar100': 'CIFAR-100', 'imagenet_r': 'ImageNet-R', 'imagenet_a': 'ImageNet-A',
          'eurosat': 'EuroSAT', 'cars196': 'Cars-196', 'caltech_birds2011': 'CUB-200'}
# Final accuracy (%) after the last task, from the paper's poster (spec section 6),
# in the order of BENCHMARKS.
PUBLISHED = {
    'joint': (92.75, 84.02, 54.64, 98.42, 85.62, 86.04),
    'ewc': (78.46, 58.93, 10.86, 64.12, 19.55, 31.46),
    'lwf': (62.87, 54.03, 8.89, 31.91, 20.84, 25.25),
    'fisheravg': (76.10, 58.68, 11.59, 58.84, 26.03, 30.45),
    'regmean': (59.80, 61.18, 8.56, 48.74, 21.83, 35.57),
    'ccvr': (79.95, 70.00, 39.50, 64.44, 38.99, 62.67),
    'l2p': (83.88, 42.08, 20.14, 40.63, 35.49, 56.23),
    'coda_p': (82.25, 61.18, 18.30, 73.38, 28.04, 42.53),
    'fedproto': (75.79, 58.52, 9.87, 58.79, 26.08, 30.22),
    'target': (74.72, 54.65, 10.27, 52.74, 28.65, 39.30),
    'pilora': (76.48, 53.67, 19.62, 48.35, 37.57, 61.11),
    'lorm': (86.95, 72.48, 37.26, 84.23, 54.41, 64.60),
}
# Methods of this project compared with another name's published row: `joint_fed`
# is the reference's own joint protocol (one task, federated), `joint` the central one.
PUBLISHED_AS = {'joint_fed': 'joint'}
METHOD_ORDER = ['joint', 'joint_fed', 'fedavg', 'ffa_lora', 'regmean', 'fisheravg', 'ccvr', 'ewc', 'lwf',
                'fedproto', 'l2p', 'coda_p', 'target', 'pilora', 'lorm']


def published(method: str) -> tuple:
  """The published final accuracies of `method` in BENCHMARKS order (None if none)."""
  return PUBLISHED.get(PUBLISHED_AS.get(method, method), (None,) * len(BENCHMARKS))


def load_results(paths: list[str]) -> list[dict]:
  out = []
  for p in paths:
    f = p if p.endswith('.json') else os.path.join(p, 'results.json')
    if os.path.exists(f):
      try:
        with open(f) as fh:
          r = json.load(fh)
      except (OSError, json.JSONDecodeError) as e:
        raise UserError(f'{f} is not a readable results file ({e})') from None
      r['_path'] = os.path.dirname(f)
      cfg = os.path.join(r['_path'], 'config.json')
      if 'local_epochs' not in r and os.path.exists(cfg):  # results of older runs
        with open(cfg) as fh:
          r['local_epochs'] = json.load(fh).get('local_epochs')
      out.append(r)
  if not out:
    raise UserError(f'no results.json in {", ".join(paths)}; give finished run folders')
  return out


def group(results: list[dict]) -> dict[tuple[str, str], list[float]]:
  """(method, dataset) -> final accuracies (%) over seeds."""
  cells = collections.defaultdict(list)
  for r in results:
    cells[(r['method'], r['dataset'])].append(100.0 * r['final_accuracy'])
  return cells


def fmt(values: list[float]) -> str:
  if not values:
    return 'no run'
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{np.mean(values):.2f} +- {np.std(values, ddof=1):.2f} (n={len(values)})'


def paper_table(cells) -> str:
  methods = [m for m in METHOD_ORDER if m in PUBLISHED or any(k[0] == m for k in cells)]
  head = '| method | ' + ' | '.join(TITLES[b] for b in BENCHMARKS) + ' |'
  lines = [head, '|---|' + '---|' * len(BENCHMARKS)]
  for m in methods:
    row = []
    for i, b in enumerate(BENCHMARKS):
      ours = cells.get((m, b), [])
      pub = published(m)[i]
      pub_s = f'{pub:.2f}' if pub is not None else 'n/a'
      if ours:
        diff = f' ({np.mean(ours) - pub:+.2f})' if pub is not None else ''
        row.append(f'{fmt(ours)} / {pub_s}{diff}')
      else:
        row.append(f'no run / {pub_s}')
    lines.append(f'| {m} | ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def local_table(results: list[dict]) -> str:
  rows = collections.defaultdict(list)
  for r in results:
    if r['dataset'] in BENCHMARKS:
      continue
    rows[(r['method'], r['dataset'], r['beta'], r.get('local_epochs'))].append(r)
  if not rows:
    return '(no runs on the embedded configs)'
  lines = ['| method | dataset | beta | local epochs | final accuracy % | forgetting % | wall s '
           '| runs |', '|---|---|---|---|---|---|---|---|']
  for (m, d, beta, epochs), rs in sorted(rows.items(), key=lambda kv: tuple(map(str, kv[0]))):
    acc = [100 * r['final_accuracy'] for r in rs]
    fgt = [100 * r['forgetting'] for r in rs]
    wall = np.mean([r['wall_seconds'] for r in rs])
    epochs = '-' if epochs is None else epochs
    lines.append(f'| {m} | {d} | {beta} | {epochs} | {fmt(acc)} | {np.mean(fgt):.2f} | {wall:.0f} | '
                 f'{len(rs)} |')
  return '\n'.join(lines)


def runs_table(results: list[dict]) -> str:
  """One row per run of the embedded configs: final accuracy, the per-task
  row after the last task and the accuracy after each task (all %)."""
  pct = lambda xs: ', '.join('-' if x is None else f'{100 * x:.2f}' for x in xs)
  rows = sorted((r for r in results if r['dataset'] not in BENCHMARKS
                 and 'per_task_accuracy' in r and 'accuracy_per_task_end' in r),
                key=lambda r: (str(r.get('local_epochs')), r['method'], r['seed']))
  lines = ['| method | local epochs | seed | final % | per task after the last task | '
           'after each task |', '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['method']} | {r.get('local_epochs')} | {r['seed']} | "
                 f"{100 * r['final_accuracy']:.2f} | {pct(r['per_task_accuracy'])} | "
                 f"{pct(r['accuracy_per_task_end'])} |")
  return '\n'.join(lines)


def bar_chart(path: str, cells) -> None:
  methods = sorted({m for m, _ in cells}, key=lambda m: METHOD_ORDER.index(m)
                   if m in METHOD_ORDER else 99)
  datasets = sorted({d for _, d in cells})
  fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(datasets) * max(1, len(methods)) / 3, 3.5))
  width = 0.8 / max(1, len(methods))
  for i, m in enumerate(methods):
    vals = [np.mean(cells.get((m, d), [np.nan])) for d in datasets]
    errs = [np.std(cells.get((m, d), [0]), ddof=0) for d in datasets]
    ax.bar(np.arange(len(datasets)) + i * width, vals, width, yerr=errs, label=m)
    for d_i, d in enumerate(datasets):
      if d in BENCHMARKS and published(m)[0] is not None:
        ax.plot(d_i + i * width, published(m)[BENCHMARKS.index(d)], 'k_', markersize=12)
  ax.set_xticks(np.arange(len(datasets)) + width * (len(methods) - 1) / 2)
  ax.set_xticklabels([TITLES.get(d, d) for d in datasets])
  ax.set_ylabel('final accuracy (%)')
  ax.set_ylim(0, 100)
  ax.legend(fontsize=8)
  ax.set_title('bars: this project; black ticks: published PyTorch', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


@report_user_errors
def main(argv=None) -> None:
  p = argument_parser(description=__doc__.splitlines()[0])
  p.add_argument('workdirs', nargs='+')
  p.add_argument('--out', default='', help='folder for report.md / report.png')
  args = p.parse_args(argv)
  results = load_results(args.workdirs)
  cells = group(results)
  text = ('## Paper benchmarks (ours / published, difference)\n\n' + paper_table(cells) +
          '\n\n## Embedded configs (no published numbers)\n\n' + local_table(results) +
          '\n\n### Runs\n\n' + runs_table(results) + '\n')
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'report.md'), 'w') as f:
      f.write(text)
    if cells:
      bar_chart(os.path.join(args.out, 'report.png'), cells)


if __name__ == '__main__':
  main()

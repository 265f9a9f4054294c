"""Tabulates results.json files beside the published PyTorch numbers.

  python -m experiments.report workdirs/sweep/* [--out workdirs/report]
  python -m experiments.report docs/results/fidelity/e5/* \
      --reference=docs/results/fidelity/reference.json --out=workdirs/fidelity

Prints, and writes as report.md and report.png, a method x benchmark table of
final accuracy (mean +- std over seeds), the published number of that cell
(LORM_SPEC section 6, the poster's table) and the difference. Runs on the
embedded Fashion-MNIST configs get a table of their own: nothing was
published for them. `--reference` sets them beside runs of the PyTorch
reference on the same setting (a JSON list of {method, local_epochs, seed,
final_accuracy %}): per cell the difference of the means with a Welch 95%
interval, per local-epoch count every pair of methods' difference on both
sides (the ordering), and reference.png, every run as a point; runs of the
reference replayed on this project's draws (`"replay": true`) are set beside
this project's run of the same seed instead. Welch's interval
trusts each side's own spread; Student's assumes one spread for both (the
same setting), which matters when a side has only two runs.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np
from scipy import stats  # a dependency of jax itself

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
METHOD_ORDER = ['joint', 'joint_fed', 'fedavg', 'ffa_lora', 'fedex_lora', 'flora', 'fedsa_lora',
                'regmean', 'fisheravg', 'ties', 'fedsum', 'ccvr', 'ewc', 'lwf', 'derpp',
                'fedproto', 'l2p', 'dualprompt', 'coda_p', 'coda_lwf', 'target', 'pilora', 'lorm']


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
      config = {}
      if os.path.exists(cfg):
        with open(cfg) as fh:
          config = json.load(fh)
      if 'local_epochs' not in r:  # results of older runs
        r['local_epochs'] = config.get('local_epochs')
      r['matmuls'] = config.get('model', {}).get('dtype', 'float32')  # older runs: float32
      r.setdefault('adapter', config.get('model', {}).get('adapter', 'lora'))  # older: LoRA
      r.setdefault('machine', 'not recorded')
      r['_config'] = config
      out.append(r)
  if not out:
    raise UserError(f'no results.json in {", ".join(paths)}; give finished run folders')
  return out


def label(r: dict) -> str:
  """The row name of a run: its method, with '+<adapter>' where the adapter is
  not LoRA (`lorm+vera`)."""
  adapter = r.get('adapter', 'lora')
  return r['method'] if adapter == 'lora' else f"{r['method']}+{adapter}"


def method_rank(method: str) -> int:
  """A method's place in METHOD_ORDER (the paper's table, then the newer
  methods; after all of them if it is not listed)."""
  return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def group(results: list[dict]) -> dict[tuple[str, str], list[float]]:
  """(method label, dataset) -> final accuracies (%) over seeds."""
  cells = collections.defaultdict(list)
  for r in results:
    cells[(label(r), r['dataset'])].append(100.0 * r['final_accuracy'])
  return cells


def machines(runs: list[dict]) -> str:
  """The machines that computed `runs`, with counts where there are several
  ('Intel(R) Xeon(R) Processor, AMX x2; AMD EPYC, AVX-512 BF16, no AMX x1')."""
  counts = collections.Counter(r.get('machine', 'not recorded') for r in runs)
  if len(counts) == 1:
    return next(iter(counts))
  return '; '.join(f'{m} x{n}' for m, n in sorted(counts.items()))


def fmt(values: list[float]) -> str:
  if not values:
    return 'no run'
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{np.mean(values):.2f} +- {np.std(values, ddof=1):.2f} (n={len(values)})'


# What makes a run the paper's protocol: these fields as configs/paper.py sets
# them for the run's dataset and beta (the weights by file name).
PROTOCOL_KEYS = ('model.name', 'model.weights', 'model.rank', 'image_size', 'num_tasks',
                 'classes_per_task', 'rounds', 'local_epochs', 'num_clients', 'batch_size',
                 'lr_head', 'lr_a', 'lr_b', 'alpha_head', 'alpha_backbone', 'participation_rate',
                 'clients_per_round', 'dataset.train_per_class', 'dataset.test_per_class')


def protocol_deviations(r: dict) -> list[str]:
  """The config fields in which a run on a paper benchmark differs from the
  paper's protocol ([] when it follows it, or when its config.json is absent)."""
  config = r.get('_config') or {}
  if r['dataset'] not in BENCHMARKS or not config:
    return []
  from configs import paper  # pylint: disable=import-outside-toplevel
  try:
    want = json.loads(paper.paper_config(r['dataset'], f"beta={r['beta']}").to_json())
  except ValueError:
    return ['beta']

  def get(c, dotted):
    for part in dotted.split('.'):
      c = c.get(part) if isinstance(c, dict) else None
    return os.path.basename(c) if dotted == 'model.weights' and isinstance(c, str) else c
  return [k for k in PROTOCOL_KEYS if get(config, k) != get(want, k)]


def deviating_cells(results: list[dict]) -> dict[tuple[str, str], list[str]]:
  """(method, dataset) -> '<run folder>: differs in <fields>' for each run of a
  paper cell that is not the paper's protocol."""
  out = collections.defaultdict(list)
  for r in results:
    keys = protocol_deviations(r)
    if keys:
      out[(label(r), r['dataset'])].append(f"{r['_path']}: differs in {', '.join(keys)}")
  return out


def paper_table(cells, deviating=None) -> str:
  """Ours / published (difference) per method and benchmark; a cell holding a
  run that is not the paper's protocol is marked * and its runs listed below."""
  deviating = deviating or {}
  methods = [m for m in METHOD_ORDER if m in PUBLISHED or any(k[0] == m for k in cells)]
  methods += sorted({m for m, b in cells if b in BENCHMARKS} - set(methods))  # lorm+vera, ...
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
        mark = '*' if (m, b) in deviating else ''
        row.append(f'{fmt(ours)}{mark} / {pub_s}{diff}')
      else:
        row.append(f'no run / {pub_s}')
    lines.append(f'| {m} | ' + ' | '.join(row) + ' |')
  if deviating:
    lines.append('\n\\* not the paper\'s protocol (configs/paper.py), so not comparable:')
    lines += [f'- {line}' for runs in deviating.values() for line in runs]
  return '\n'.join(lines)


def local_table(results: list[dict]) -> str:
  rows = collections.defaultdict(list)
  for r in results:
    if r['dataset'] in BENCHMARKS:
      continue
    rows[(label(r), r['dataset'], r['beta'], r.get('local_epochs'),
          r['matmuls'])].append(r)
  if not rows:
    return '(no runs on the embedded configs)'
  lines = ['| method | dataset | beta | local epochs | matmuls | final accuracy % | forgetting % '
           '| wall s | runs | seeds | machine |', '|---|---|---|---|---|---|---|---|---|---|---|']
  for (m, d, beta, epochs, mm), rs in sorted(
      rows.items(), key=lambda kv: (str(kv[0][1:]), method_rank(kv[1][0]['method']), kv[0][0])):
    acc = [100 * r['final_accuracy'] for r in rs]
    fgt = [100 * r['forgetting'] for r in rs]
    wall = np.mean([r['wall_seconds'] for r in rs])
    epochs = '-' if epochs is None else epochs
    seeds = ', '.join(str(r['seed']) for r in rs)
    lines.append(f'| {m} | {d} | {beta} | {epochs} | {mm} | {fmt(acc)} | {np.mean(fgt):.2f} | '
                 f'{wall:.0f} | {len(rs)} | {seeds} | {machines(rs)} |')
  return '\n'.join(lines)


def runs_table(results: list[dict]) -> str:
  """One row per run of the embedded configs: final accuracy, the per-task
  row after the last task and the accuracy after each task (all %)."""
  pct = lambda xs: ', '.join('-' if x is None else f'{100 * x:.2f}' for x in xs)
  rows = sorted((r for r in results if r['dataset'] not in BENCHMARKS
                 and 'per_task_accuracy' in r and 'accuracy_per_task_end' in r),
                key=lambda r: (str(r.get('local_epochs')), label(r), r['seed']))
  lines = ['| method | local epochs | seed | final % | per task after the last task | '
           'after each task |', '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {label(r)} | {r.get('local_epochs')} | {r['seed']} | "
                 f"{100 * r['final_accuracy']:.2f} | {pct(r['per_task_accuracy'])} | "
                 f"{pct(r['accuracy_per_task_end'])} |")
  return '\n'.join(lines)


def bar_chart(path: str, cells) -> None:
  methods = sorted({m for m, _ in cells}, key=method_rank)
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


def load_reference(path: str) -> tuple[dict[tuple[str, int], list[float]], list[dict]]:
  """((method, local_epochs) -> the reference's final accuracies (%) of its own
  draws, the replayed runs). A run with "replay": true trained on this
  project's draws of its seed (run_fed_mammoth.py --replay): it is set beside
  that run, not counted as an independent draw."""
  try:
    with open(path) as f:
      runs = json.load(f)['runs']
    cells = collections.defaultdict(list)
    for r in runs:
      if not r.get('replay'):
        cells[(r['method'], int(r['local_epochs']))].append(float(r['final_accuracy']))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f'{path} is not a reference file ({type(e).__name__}: {e}); expected '
                    '{"runs": [{"method", "local_epochs", "final_accuracy"}, ...]}') from None
  return dict(cells), [r for r in runs if r.get('replay')]


def replay_table(results: list[dict], replays: list[dict]) -> str:
  """Each replayed reference run beside this project's run of the same method,
  local epochs, seed and rounds (where the reference run names them): the
  accuracy after each task on both sides (%)."""
  pct = lambda xs: ', '.join(f'{x:.2f}' for x in xs)
  lines = ['| method | local epochs | seed | reference float32 matmuls | after each task: this project | '
           'reference (replayed) | largest difference |', '|---|---|---|---|---|---|---|']
  for ref in sorted(replays, key=lambda r: (r['local_epochs'], r['method'], r['seed'],
                                            r.get('float32_matmul_precision', ''))):
    ours = [r for r in results if (r['method'], r.get('local_epochs'), r['seed']) ==
            (ref['method'], ref['local_epochs'], ref['seed'])
            and ref.get('rounds', r.get('rounds')) == r.get('rounds')]
    if not ours:
      continue
    mine = [100 * x for x in ours[0]['accuracy_per_task_end']]
    theirs = ref['accuracy_after_each_task']
    gap = max(abs(x - y) for x, y in zip(mine, theirs))
    lines.append(f"| {ref['method']} | {ref['local_epochs']} | {ref['seed']} | "
                 f"{ref.get('float32_matmul_precision', 'not recorded')} | {pct(mine)} | "
                 f'{pct(theirs)} | {gap:.2f} |')
  return '\n'.join(lines)


def welch(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float | None]:
  """mean(a) - mean(b) and the half-width of its Welch t interval (each side's
  own spread; None when a side has fewer than two values, or no spread at all)."""
  diff = float(np.mean(a) - np.mean(b))
  if len(a) < 2 or len(b) < 2:
    return diff, None
  va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
  if va + vb == 0:
    return diff, None
  dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  return diff, float(stats.t.ppf(0.5 + level / 2, dof) * np.sqrt(va + vb))


def pooled(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float | None]:
  """mean(a) - mean(b) and the half-width of Student's t interval, which assumes
  one spread for both sides (the same setting run twice) and estimates it from
  all runs; None with fewer than three runs in all or no spread."""
  diff = float(np.mean(a) - np.mean(b))
  dof = len(a) + len(b) - 2
  if dof < 1:
    return diff, None
  ss = np.var(a, ddof=0) * len(a) + np.var(b, ddof=0) * len(b)
  if ss == 0:
    return diff, None
  se = np.sqrt(ss / dof * (1 / len(a) + 1 / len(b)))
  return diff, float(stats.t.ppf(0.5 + level / 2, dof) * se)


def _interval(diff: float, half: float | None) -> str:
  if half is None:
    return f'{diff:+.2f} (no interval)'
  verdict = 'excludes 0' if abs(diff) > half else 'includes 0'
  return f'{diff:+.2f} [{diff - half:+.2f}, {diff + half:+.2f}] ({verdict})'


def ours_by_epochs(results: list[dict]) -> dict[tuple[str, int], list[float]]:
  """(method, local_epochs) -> this project's final accuracies (%), embedded configs only.
  Runs of one cell at different matmul precisions are refused (report them separately)."""
  cells, precisions = collections.defaultdict(list), collections.defaultdict(set)
  for r in results:
    if r['dataset'] not in BENCHMARKS and r.get('local_epochs') is not None:
      key = (label(r), int(r['local_epochs']))
      cells[key].append(100.0 * r['final_accuracy'])
      precisions[key].add(r['matmuls'])
  mixed = sorted(f'{m} at {e} epochs ({", ".join(sorted(p))})'
                 for (m, e), p in precisions.items() if len(p) > 1)
  if mixed:
    raise UserError(f'runs at different matmul precisions in one cell: {"; ".join(mixed)}; '
                    'report each precision separately')
  return dict(cells)


def reference_tables(ours: dict, ref: dict) -> str:
  """This project beside the reference per cell, then every pair of methods per
  local-epoch count (A - B; the ordering) on both sides."""
  lines = ['| method | local epochs | this project | reference | this project - reference: '
           'Welch 95% interval | Student 95% interval (one spread) |', '|---|---|---|---|---|---|']
  for m, e in sorted(set(ours) & set(ref), key=lambda k: (k[1], k[0])):
    a, b = ours[m, e], ref[m, e]
    lines.append(f'| {m} | {e} | {fmt(a)} | {fmt(b)} | {_interval(*welch(a, b))} | '
                 f'{_interval(*pooled(a, b))} |')
  lines += ['', '| local epochs | A - B | this project (Welch 95%) | reference (Welch 95%) |',
            '|---|---|---|---|']
  for e in sorted({e for _, e in ref}):
    methods = sorted((m for m, e2 in ref if e2 == e and (m, e) in ours),
                     key=method_rank)
    for i, a in enumerate(methods):
      for b in methods[i + 1:]:
        lines.append(f'| {e} | {b} - {a} | {_interval(*welch(ours[b, e], ours[a, e]))} | '
                     f'{_interval(*welch(ref[b, e], ref[a, e]))} |')
  return '\n'.join(lines)


def reference_chart(path: str, ours: dict, ref: dict) -> None:
  """Every run's final accuracy as a point, per (method, local epochs): this
  project in blue, the reference in red; bars are the means."""
  keys = sorted(set(ours) | set(ref), key=lambda k: (k[1], k[0]))
  fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(keys), 3.5))
  for x, k in enumerate(keys):
    for side, vals, colour, dx in (('this project', ours.get(k, []), 'tab:blue', -0.15),
                                   ('reference', ref.get(k, []), 'tab:red', 0.15)):
      if vals:
        ax.scatter(np.full(len(vals), x + dx), vals, color=colour, s=18, zorder=3,
                   label=side if x == 0 else None)
        ax.hlines(np.mean(vals), x + dx - 0.12, x + dx + 0.12, color=colour, lw=2)
  ax.set_xticks(range(len(keys)), [f'{m}\n{e} epoch{"s" * (e != 1)}' for m, e in keys])
  top = max(v for vals in (*ours.values(), *ref.values()) for v in vals)
  ax.set_ylabel('final accuracy (%)')
  ax.set_ylim(0, min(100, 10 * np.ceil(top / 10) + 10))
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title('every run (points) and the mean (bar)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


@report_user_errors
def main(argv=None) -> None:
  p = argument_parser(description=__doc__.splitlines()[0])
  p.add_argument('workdirs', nargs='+')
  p.add_argument('--out', default='', help='folder for report.md / report.png')
  p.add_argument('--reference', default='',
                 help='JSON of the PyTorch reference\'s runs on an embedded config')
  args = p.parse_args(argv)
  ref, replays = load_reference(args.reference) if args.reference else (None, [])
  results = load_results(args.workdirs)
  cells = group(results)
  ours = ours_by_epochs(results) if ref is not None else None
  text = ('## Paper benchmarks (ours / published, difference)\n\n' +
          paper_table(cells, deviating_cells(results)) +
          '\n\n## Embedded configs (no published numbers)\n\n' + local_table(results) +
          '\n\n### Runs\n\n' + runs_table(results) + '\n')
  if ref is not None:
    text += ('\n## Beside the PyTorch reference\n\n' +
             reference_tables(ours, ref) + '\n')
    if replays:
      text += ('\n### Replayed: the reference on this project\'s draws\n\n' +
               replay_table(results, replays) + '\n')
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'report.md'), 'w') as f:
      f.write(text)
    if cells:
      bar_chart(os.path.join(args.out, 'report.png'), cells)
    if ref is not None:
      reference_chart(os.path.join(args.out, 'reference.png'), ours, ref)


if __name__ == '__main__':
  main()

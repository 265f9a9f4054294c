"""Runs methods x betas x seeds (x extra settings) of one config, skipping finished runs.

  python -m experiments.sweep --config=configs/default.py --methods=lorm,fedavg \
      --seeds=0,1,2 --root=workdirs/sweep
  python -m experiments.sweep --config=configs/default.py --methods=lorm \
      --set lr_head=1e-3,lr_a=1e-3,lr_b=1e-3 --root=workdirs/sweep
  python -m experiments.sweep --config=configs/default.py --methods=all \
      --seeds=42,1,2 --root=docs/results/bf16 --skip=target   # every method

Every run is its own `experiments.run` process with its own workdir
ROOT/<method>_beta<beta>_seed<seed>[_<setting>]; a workdir holding a
results.json is skipped, one holding a checkpoint is resumed. Then
`python -m experiments.report ROOT/*` tabulates them. `--set` names the
folder, except `model.dtype`: the precision is in each run's results.json
(the report keys its rows by it), so pinning it with `--set
model.dtype=bfloat16` still finds, and skips, the folders `auto` wrote.
"""
from __future__ import annotations

import os
import subprocess
import sys

from lorm_jax.errors import UserError, argument_parser, report_user_errors


# Overrides that leave the folder name alone: they are recorded in results.json.
UNNAMED = ('model.dtype=',)


def method_names(methods: str, skip: str = '') -> list[str]:
  """The comma list `methods` ('all': every registered method, in the
  report's order) less the comma list `skip`; an unknown name is a UserError."""
  from experiments.report import method_rank  # pylint: disable=import-outside-toplevel
  from lorm_jax.methods import METHODS  # pylint: disable=import-outside-toplevel
  every = sorted(METHODS, key=lambda m: (method_rank(m), m))
  names = every if methods == 'all' else methods.split(',')
  dropped = skip.split(',') if skip else []
  unknown = [m for m in names + dropped if m not in METHODS]
  if unknown:
    raise UserError(f'unknown method(s) {", ".join(unknown)}; known: {", ".join(every)}')
  return [m for m in names if m not in dropped]


def run_dirs(args) -> list[tuple[str, list[str]]]:
  """(workdir, command) for every combination."""
  out = []
  overrides = list(filter(None, args.set.split(',')))
  setting = '_'.join(kv.replace('=', '') for kv in overrides if not kv.startswith(UNNAMED))
  for method in method_names(args.methods, args.skip):
    for beta in (args.betas.split(',') if args.betas else ['']):
      for seed in args.seeds.split(','):
        name = f'{method}' + (f'_beta{beta}' if beta else '') + f'_seed{seed}'
        name += f'_{setting}' if setting else ''
        workdir = os.path.join(args.root, name)
        cmd = [sys.executable, '-m', 'experiments.run', f'--config={args.config}',
               f'--workdir={workdir}', f'--config.method={method}', f'--config.seed={seed}']
        if beta:
          cmd.append(f'--config.beta={beta}')
        for kv in overrides:
          cmd.append(f'--config.{kv}')
        out.append((workdir, cmd))
  return out


@report_user_errors
def main(argv=None) -> None:
  p = argument_parser(description=__doc__.splitlines()[0])
  p.add_argument('--config', required=True)
  p.add_argument('--methods', default='lorm', help="comma list, or 'all'")
  p.add_argument('--skip', default='', help='comma list of methods to leave out')
  p.add_argument('--betas', default='', help='comma list; empty = the config\'s beta')
  p.add_argument('--seeds', default='0')
  p.add_argument('--set', default='', help='extra config overrides, k=v,k=v')
  p.add_argument('--root', default='workdirs/sweep')
  p.add_argument('--dry-run', action='store_true')
  args = p.parse_args(argv)
  for workdir, cmd in run_dirs(args):
    if os.path.exists(os.path.join(workdir, 'results.json')):
      print(f'skip (done): {workdir}')
      continue
    print(' '.join(cmd), flush=True)
    if not args.dry_run:
      done = subprocess.run(cmd, check=False)
      if done.returncode:
        raise UserError(f'the run in {workdir} failed (exit status {done.returncode}, its '
                        'error above); rerun the sweep to resume it and the rest')


if __name__ == '__main__':
  main()

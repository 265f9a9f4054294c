"""experiments.report: grouping over seeds, published numbers, outputs."""
import json

import pytest

from experiments import report, sweep


def _write(path, method, dataset, acc, seed):
  path.mkdir(parents=True)
  (path / 'results.json').write_text(json.dumps({
      'method': method, 'dataset': dataset, 'beta': 0.5, 'seed': seed, 'final_accuracy': acc,
      'forgetting': 0.1, 'wall_seconds': 10.0}))


def test_report_groups_seeds_and_sets_published_numbers(tmp_path, capsys):
  _write(tmp_path / 'a', 'lorm', 'cifar100', 0.80, 0)
  _write(tmp_path / 'b', 'lorm', 'cifar100', 0.90, 1)
  _write(tmp_path / 'c', 'fedavg', 'fashion_mnist', 0.5, 0)
  report.main([str(tmp_path / d) for d in 'abc'] + [str(tmp_path / 'missing'),
                                                     '--out', str(tmp_path / 'out')])
  text = (tmp_path / 'out' / 'report.md').read_text()
  assert '85.00 +- 7.07 (n=2) / 86.95 (-1.95)' in text
  assert 'no run / 72.48' in text  # LoRM on ImageNet-R: nothing run
  assert '| fedavg | fashion_mnist | 0.5 | - | 50.00 |' in text
  assert (tmp_path / 'out' / 'report.png').stat().st_size > 0


def test_report_places_baselines_beside_their_published_rows(tmp_path, capsys):
  _write(tmp_path / 'j', 'joint', 'eurosat', 0.9, 0)
  _write(tmp_path / 'f', 'joint_fed', 'eurosat', 0.8, 0)
  _write(tmp_path / 'r', 'regmean', 'cifar100', 0.6, 0)
  report.main([str(tmp_path / d) for d in 'jfr'])
  lines = {l.split(' | ')[0][2:]: l for l in capsys.readouterr().out.splitlines()
           if l.startswith('| ')}
  assert '90.00 / 98.42 (-8.42)' in lines['joint']
  assert '80.00 / 98.42 (-18.42)' in lines['joint_fed']  # the reference's joint protocol
  assert '60.00 / 59.80 (+0.20)' in lines['regmean']
  assert 'no run / 76.10' in lines['fisheravg']


def test_sweep_skips_finished_runs(tmp_path, capsys):
  _write(tmp_path / 'lorm_seed0', 'lorm', 'fashion_mnist', 0.5, 0)
  sweep.main(['--config=configs/smoke.py', '--methods=lorm', '--seeds=0,1',
              f'--root={tmp_path}', '--dry-run'])
  out = capsys.readouterr().out
  assert 'skip (done)' in out and 'lorm_seed1' in out and '--config.seed=1' in out


def test_report_lists_runs_with_local_epochs_and_per_task_rows(tmp_path, capsys):
  for seed, acc in ((42, 0.25), (1, 0.4)):
    p = tmp_path / f'lorm_seed{seed}'
    p.mkdir()
    (p / 'results.json').write_text(json.dumps({
        'method': 'lorm', 'dataset': 'fashion_mnist', 'beta': 0.5, 'seed': seed,
        'final_accuracy': acc, 'forgetting': 0.1, 'wall_seconds': 10.0,
        'per_task_accuracy': [0.5, acc], 'accuracy_per_task_end': [0.9, acc]}))
    (p / 'config.json').write_text(json.dumps({'local_epochs': 5}))  # an older results.json
  report.main([str(tmp_path / 'lorm_seed42'), str(tmp_path / 'lorm_seed1')])
  out = capsys.readouterr().out
  assert '| lorm | fashion_mnist | 0.5 | 5 | 32.50 +- 10.61 (n=2) |' in out
  assert '| lorm | 5 | 42 | 25.00 | 50.00, 25.00 | 90.00, 25.00 |' in out

"""experiments.report: grouping over seeds, published numbers, outputs."""
import json

import numpy as np
import pytest
from scipy import stats

from experiments import report, sweep
from lorm_jax.errors import UserError


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
  assert '| fedavg | fashion_mnist | 0.5 | - | float32 | 50.00 |' in text
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
  # Pinning the precision names no new folder: the finished seed-0 run is still skipped.
  sweep.main(['--config=configs/smoke.py', '--methods=lorm', '--seeds=0,1', f'--root={tmp_path}',
              '--set=model.dtype=bfloat16', '--dry-run'])
  out = capsys.readouterr().out
  assert f'skip (done): {tmp_path}/lorm_seed0\n' in out
  assert f'--workdir={tmp_path}/lorm_seed1 ' in out and '--config.model.dtype=bfloat16' in out
  # Other settings do name it.
  sweep.main(['--config=configs/smoke.py', '--methods=lorm', '--seeds=0', f'--root={tmp_path}',
              '--set=model.dtype=bfloat16,lr_head=0.1', '--dry-run'])
  assert f'--workdir={tmp_path}/lorm_seed0_lr_head0.1 ' in capsys.readouterr().out


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
  assert '| lorm | fashion_mnist | 0.5 | 5 | float32 | 32.50 +- 10.61 (n=2) |' in out
  assert '| lorm | 5 | 42 | 25.00 | 50.00, 25.00 | 90.00, 25.00 |' in out


def test_welch_and_student_intervals_match_scipy_t_tests():
  a, b = [30.1, 26.9, 32.3, 32.35, 37.9], [38.1, 40.05]
  diff, half = report.welch(a, b)
  ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
  assert diff == pytest.approx(np.mean(a) - np.mean(b))
  assert (diff - half, diff + half) == pytest.approx((ci.low, ci.high), rel=1e-9)
  assert report.welch([1.0, 2.0], [3.0])[1] is None  # one reference run: no interval
  diff, half = report.pooled(a, b)
  ci = stats.ttest_ind(a, b, equal_var=True).confidence_interval(0.95)
  assert (diff - half, diff + half) == pytest.approx((ci.low, ci.high), rel=1e-9)
  assert report.pooled([1.0, 2.0], [3.0])[1] is not None  # one spread from three runs


def test_report_sets_runs_beside_the_reference(tmp_path, capsys):
  for name, method, epochs, seed, acc in (('l1', 'lorm', 5, 1, 0.30), ('l2', 'lorm', 5, 2, 0.34),
                                           ('f1', 'fedavg', 5, 1, 0.36), ('f2', 'fedavg', 5, 2, 0.40)):
    p = tmp_path / name
    p.mkdir()
    (p / 'results.json').write_text(json.dumps({
        'method': method, 'dataset': 'fashion_mnist', 'beta': 0.5, 'seed': seed,
        'local_epochs': epochs, 'final_accuracy': acc, 'forgetting': 0.1, 'wall_seconds': 1.0,
        'accuracy_per_task_end': [0.9, acc]}))
  ref = tmp_path / 'reference.json'
  ref.write_text(json.dumps({'runs': [
      {'method': 'lorm', 'local_epochs': 5, 'seed': 42, 'final_accuracy': 38.0},
      {'method': 'lorm', 'local_epochs': 5, 'seed': 1, 'final_accuracy': 40.0},
      {'method': 'fedavg', 'local_epochs': 5, 'seed': 42, 'final_accuracy': 35.0},
      # replayed on this project's draws of seed 2: beside that run, not in the cell
      {'method': 'lorm', 'local_epochs': 5, 'seed': 2, 'final_accuracy': 33.5, 'replay': True,
       'accuracy_after_each_task': [90.25, 33.5], 'float32_matmul_precision': 'highest'}]}))
  report.main([str(tmp_path / n) for n in ('l1', 'l2', 'f1', 'f2')] +
              [f'--reference={ref}', f'--out={tmp_path / "out"}'])
  out = capsys.readouterr().out
  diff, half = report.welch([30.0, 34.0], [38.0, 40.0])
  assert (f'| lorm | 5 | 32.00 +- 2.83 (n=2) | 39.00 +- 1.41 (n=2) | '
          f'{diff:+.2f} [{diff - half:+.2f}, {diff + half:+.2f}]') in out
  # the ordering: LoRM - averaging is -6 here, +4 (one averaging run) in the reference
  assert '| 5 | lorm - fedavg | -6.00 [' in out and '| +4.00 (no interval)' in out
  assert (tmp_path / 'out' / 'reference.png').stat().st_size > 0
  assert '| lorm | 5 | 2 | highest | 90.00, 34.00 | 90.25, 33.50 | 0.50 |' in out


def test_report_keeps_matmul_precisions_apart(tmp_path, capsys):
  """Runs in bfloat16 and float32 get rows of their own, and are never pooled
  into one cell beside the reference."""
  for name, dtype, acc in (('b1', 'bfloat16', 0.30), ('b2', 'bfloat16', 0.34), ('f1', 'float32', 0.2)):
    p = tmp_path / name
    p.mkdir()
    (p / 'results.json').write_text(json.dumps({
        'method': 'lorm', 'dataset': 'fashion_mnist', 'beta': 0.5, 'seed': 1, 'local_epochs': 5,
        'final_accuracy': acc, 'forgetting': 0.1, 'wall_seconds': 1.0}))
    (p / 'config.json').write_text(json.dumps({'local_epochs': 5, 'model': {'dtype': dtype}}))
  report.main([str(tmp_path / n) for n in ('b1', 'b2', 'f1')])
  out = capsys.readouterr().out
  assert '| lorm | fashion_mnist | 0.5 | 5 | bfloat16 | 32.00 +- 2.83 (n=2) |' in out
  assert '| lorm | fashion_mnist | 0.5 | 5 | float32 | 20.00 |' in out
  ref = tmp_path / 'reference.json'
  ref.write_text(json.dumps({'runs': [
      {'method': 'lorm', 'local_epochs': 5, 'seed': 42, 'final_accuracy': 38.0}]}))
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(tmp_path / n) for n in ('b1', 'b2', 'f1')] + [f'--reference={ref}'])
  assert exit_info.value.code == 2
  assert ('error: runs at different matmul precisions in one cell: lorm at 5 epochs '
          '(bfloat16, float32)') in capsys.readouterr().err


def test_report_refuses_a_malformed_reference_file(tmp_path):
  bad = tmp_path / 'ref.json'
  bad.write_text(json.dumps({'runs': [{'method': 'lorm'}]}))
  with pytest.raises(UserError, match='is not a reference file'):
    report.load_reference(str(bad))


def test_runs_off_the_paper_protocol_are_marked(tmp_path, capsys):
  from configs import paper
  for name, rounds in (('paper', 5), ('short', 1)):
    _write(tmp_path / name, 'lorm', 'cifar100', 0.8, 0)
    c = paper.paper_config('cifar100', 'beta=0.5')
    c.unlock()
    c.rounds = rounds
    (tmp_path / name / 'config.json').write_text(c.to_json())
  report.main([str(tmp_path / 'paper')])
  assert '80.00 / 86.95 (-6.95)' in capsys.readouterr().out
  report.main([str(tmp_path / 'paper'), str(tmp_path / 'short')])
  out = capsys.readouterr().out
  assert '80.00 +- 0.00 (n=2)* / 86.95' in out
  assert f'- {tmp_path / "short"}: differs in rounds' in out and f'{tmp_path / "paper"}:' not in out


def test_report_keeps_adapters_apart_and_names_the_machines(tmp_path, capsys):
  """A run's adapter (results.json, else config.json, else LoRA) makes a row of
  its own; a row lists its seeds and the machines that computed them."""
  runs = (('l', 'lora', 0.30, 42, 'CPU A'), ('v1', 'vera', 0.20, 42, 'CPU A'),
          ('v2', 'vera', 0.40, 1, 'CPU B'), ('old', None, 0.5, 2, None))
  for name, adapter, acc, seed, machine in runs:
    p = tmp_path / name
    p.mkdir()
    r = {'method': 'lorm', 'dataset': 'fashion_mnist', 'beta': 0.5, 'seed': seed,
         'local_epochs': 5, 'final_accuracy': acc, 'forgetting': 0.1, 'wall_seconds': 1.0}
    if machine:
      r.update(machine=machine, adapter=adapter)
    (p / 'results.json').write_text(json.dumps(r))
    (p / 'config.json').write_text(json.dumps({'model': {'dtype': 'bfloat16'}}))
  report.main([str(tmp_path / name) for name, *_ in runs])
  out = capsys.readouterr().out
  assert ('| lorm+vera | fashion_mnist | 0.5 | 5 | bfloat16 | 30.00 +- 14.14 (n=2) | 10.00 | 1 | 2 '
          '| 42, 1 | CPU A x1; CPU B x1 |') in out
  assert '| lorm | fashion_mnist | 0.5 | 5 | bfloat16 | 40.00 +- 14.14 (n=2) |' in out
  assert '| 42, 2 | CPU A x1; not recorded x1 |' in out


def test_sweep_runs_every_method_in_the_report_order(tmp_path, capsys):
  from lorm_jax.methods import METHODS
  sweep.main(['--config=configs/smoke.py', '--methods=all', '--skip=target,joint',
              f'--root={tmp_path}', '--dry-run'])
  out = capsys.readouterr().out
  ran = [l.split('--config.method=')[1].split()[0] for l in out.splitlines() if 'method=' in l]
  assert sorted(ran) == sorted(set(METHODS) - {'target', 'joint'})
  assert ran[0] == 'joint_fed' and ran[-1] == 'lorm'
  with pytest.raises(SystemExit):
    sweep.main(['--config=configs/smoke.py', '--methods=lorm,nope', '--dry-run'])
  assert 'unknown method(s) nope' in capsys.readouterr().err

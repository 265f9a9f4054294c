"""A bit-exact digest of runs, to show that a refactor changed no number.

  python -m experiments.digest --out=before.json                 # smoke run of every method
  python -m experiments.digest --out=after.json --check=before.json
  python -m experiments.digest --config=configs/fmnist_reference.py:epochs=1 --methods=lorm \
      --max_rounds=4 --out=ref.json

Runs `--config` for each method in a fresh workdir (one process, sequential)
and records what a run reports: the accuracy matrix, communication bytes and
merge fallbacks from results.json, and every round's train loss, accuracy and
byte counts from metrics.jsonl, as exact float64 hex strings. `--check`
compares two digests field by field and exits 1 on the first difference.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from lorm_jax import methods
from lorm_jax.federated import simulate

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/smoke.py', 'Config file.',
                                          lock_config=True)
_METHODS = flags.DEFINE_list('methods', sorted(methods.METHODS), 'Methods to run.')
_MAX_ROUNDS = flags.DEFINE_integer('max_rounds', None, 'Rounds per run (None: the whole run).')
_OUT = flags.DEFINE_string('out', None, 'Where to write the digest (JSON).')
_CHECK = flags.DEFINE_string('check', None, 'A digest to compare with.')

ROUND_FIELDS = ('train_loss', 'train_accuracy', 'upload_bytes_per_client',
                'download_bytes_per_client', 'merge_fallbacks', 'factors', 'clients')
RESULT_FIELDS = ('accuracy_matrix', 'comm_bytes_upload', 'comm_bytes_download',
                 'merge_fallbacks', 'final_accuracy')


def _exact(v):
  """Floats as hex strings (bit-exact), everything else as is."""
  if isinstance(v, float):
    return v.hex()
  if isinstance(v, list):
    return [_exact(x) for x in v]
  return v


def digest_run(config, method: str, max_rounds: int | None) -> dict:
  config = config.copy_and_resolve_references()
  config.unlock()
  config.method = method
  config.lock()
  with tempfile.TemporaryDirectory() as workdir:
    results = simulate.run(config, workdir, max_rounds=max_rounds, progress=False)
    lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  rounds = [{k: _exact(l[k]) for k in ROUND_FIELDS} for l in lines if l['kind'] == 'round']
  evals = [_exact(l['per_task_accuracy']) for l in lines if l['kind'] == 'eval']
  return {'rounds': rounds, 'evals': evals,
          'results': {k: _exact(results[k]) for k in RESULT_FIELDS} if results else {}}


def compare(new: dict, old: dict) -> list[str]:
  """Lines naming every run and field where the digests differ. A run the
  older digest lacks (a method added since) is no difference; one the new
  digest lacks is."""
  diffs = []
  for run in sorted(set(new) | set(old)):
    if run not in new:
      diffs.append(f'{run}: missing from the new digest')
      continue
    if run not in old:
      continue
    for part in ('rounds', 'evals', 'results'):
      if new[run][part] != old[run][part]:
        diffs.append(f'{run}: {part} differ')
  return diffs


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  out = {}
  for method in _METHODS.value:
    out[method] = digest_run(_CONFIG.value, method, _MAX_ROUNDS.value)
    print(f'{method}: {len(out[method]["rounds"])} rounds', flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(out, f, indent=1, sort_keys=True)
  if _CHECK.value:
    old = json.load(open(_CHECK.value))
    diffs = compare(out, old)
    added = sorted(set(out) - set(old))
    print('\n'.join(diffs) if diffs else
          f'identical to {_CHECK.value}: {len(set(out) & set(old))} runs'
          + (f' (new, not compared: {", ".join(added)})' if added else ''))
    sys.exit(1 if diffs else 0)


if __name__ == '__main__':
  app.run(main)

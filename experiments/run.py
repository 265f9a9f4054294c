"""Runs one federated class-incremental experiment.

  python -m experiments.run --config=configs/default.py --workdir=workdirs/default
  python -m experiments.run --config=configs/imagenet_r.py:beta=0.1 --config.seed=1

Rerunning the same command on the same workdir resumes from the last round.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from lorm_jax.federated import simulate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (results, checkpoints).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  results = simulate.run(_CONFIG.value, _WORKDIR.value)
  print(f"final accuracy {100 * results['final_accuracy']:.2f}%  "
        f"forgetting {100 * results['forgetting']:.2f}  "
        f"wall {results['wall_seconds']:.0f}s  -> {_WORKDIR.value}/results.json")


if __name__ == '__main__':
  app.run(main)

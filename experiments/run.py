"""Runs one federated class-incremental experiment.

  python -m experiments.run --config=configs/default.py --workdir=workdirs/default
  python -m experiments.run --config=configs/imagenet_r.py:beta=0.1 --config.seed=1
  python -m experiments.run --config=configs/default.py --workdir=W --max_rounds=3  # then stop
  python -m experiments.run --config=configs/smoke.py --workdir=W --coordinator_address=HOST:PORT \
      --num_processes=2 --process_id=I    # one of two processes (I = 0, 1); process 0 writes

Rerunning the same command on the same workdir resumes from the last round.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from lorm_jax import errors, runtime
from lorm_jax.federated import simulate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (results, checkpoints).')
_MAX_ROUNDS = flags.DEFINE_integer('max_rounds', None, 'Stop after this many rounds (the '
                                   'checkpoint stays; rerun to continue).')
_KEEP = flags.DEFINE_integer('keep_checkpoints', 2, 'Checkpoints kept in the workdir, newest '
                             'first (0: every one, e.g. to replay a round with '
                             'experiments.replay_round).')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0, 'CPU devices to declare when JAX runs on '
                                    'the CPU (0: one per available core; clients are spread '
                                    'over them). Ignored on GPUs and TPUs.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Join a multi-process run '
                                  '(jax.distributed.initialize; the three flags below, or '
                                  'what JAX detects under SLURM, Open MPI or a TPU pod).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 '
                                   '(implies --distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


@errors.report_user_errors
def main(argv):
  del argv
  if _KEEP.value < 0:
    raise errors.UserError(f'--keep_checkpoints={_KEEP.value}: expected 0 (all) or more')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  runtime.set_cpu_devices(_CPU_DEVICES.value)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  runtime.enable_compilation_cache()  # after joining: then only process 0 writes the cache
  results = simulate.run(_CONFIG.value, _WORKDIR.value, max_rounds=_MAX_ROUNDS.value,
                         keep_checkpoints=_KEEP.value)
  if not runtime.is_primary():
    return
  if not results:
    print(f'stopped after {_MAX_ROUNDS.value} rounds; rerun to continue -> {_WORKDIR.value}')
    return
  print(f"final accuracy {100 * results['final_accuracy']:.2f}%  "
        f"forgetting {100 * results['forgetting']:.2f}  "
        f"wall {results['wall_seconds']:.0f}s  -> {_WORKDIR.value}/results.json")


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags_or_fail)

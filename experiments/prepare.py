"""Fetches and prepares what a config needs, without running it.

  python -m experiments.prepare --config=configs/imagenet_r.py
  python -m experiments.prepare --config=configs/cifar100.py --config.dataset.data_dir=/data/tfds

For a machine whose jobs run where there is no network (a cluster's compute
nodes): run this once where there is, on the same file system; the run then
finds the prepared dataset and the checkpoint in their caches. The run itself
does the same on its first start (dataset.download / model.download, on in
the paper configs). `$LORM_JAX_MIRROR` points every download at a mirror.
"""
from absl import app, flags
from ml_collections import config_flags

from lorm_jax import errors
from lorm_jax.data import acquire
from lorm_jax.federated import setup
from lorm_jax.models import pretrained

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
flags.mark_flags_as_required(['config'])


@errors.report_user_errors
def main(argv):
  del argv
  c = _CONFIG.value
  setup.validate_config(c)
  where = acquire.ensure_dataset(c.dataset.name, c.dataset.data_dir or None)
  print(f'dataset {c.dataset.name}: {where or "nothing to prepare"}')
  path = pretrained.resolve_weights(c.model.name, c.model.weights,
                                    download_missing=c.model.download)
  print(f'weights: {path or "random (nothing to fetch)"}')


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags_or_fail)

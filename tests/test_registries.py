"""The dataset registry: every name a config can give resolves everywhere or is
refused in one line, and adding a dataset is one loader plus one registry line."""
from __future__ import annotations

import numpy as np
import pytest

from configs import smoke
from lorm_jax.data import augment, registry
from lorm_jax.data.dataset import Dataset, DatasetFacts
from lorm_jax.errors import ConfigError
from lorm_jax.federated import setup, simulate


def _config(**overrides):
  c = smoke.get_config()
  c.unlock()
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split('.')
    for p in path:
      node = node[p]
    node[leaf] = v
  c.lock()
  return c


def _every_name():
  return sorted([(n, n) for n in registry.DATASETS] +
                [(a, f.name) for f in registry.DATASETS.values() for a in f.aliases])


@pytest.mark.parametrize('name,canonical', _every_name())
def test_every_name_and_alias_resolves_everywhere_or_is_refused_in_one_line(name, canonical):
  f = registry.facts(name)
  assert f.name == canonical
  tasks = dict(num_tasks=f.num_tasks, classes_per_task=f.classes_per_task)
  if f.preset is None:   # synthetic: a config must name the preprocessing to time
    with pytest.raises(ConfigError, match='no preprocessing preset') as e:
      setup.validate_config(_config(**{'dataset.name': name}, **tasks))
    assert '\n' not in str(e.value)
    setup.validate_config(_config(**{'dataset.name': name, 'dataset.preprocess': 'imagenet-r'},
                                  **tasks))
    return
  setup.validate_config(_config(**{'dataset.name': name}, **tasks))
  assert augment.preset(name, 32) == augment.preset(canonical, 32)


def test_cifar_100_resolves_and_unknown_names_are_one_line():
  assert registry.facts('cifar-100').name == 'cifar100'
  assert augment.preset('cifar-100', 224).rrc_scale == (0.08, 1.0)
  for bad in ({'dataset.name': 'cifar1000'}, {'dataset.preprocess': 'cifar1000'}):
    with pytest.raises(ConfigError, match="unknown dataset 'cifar1000'; known: ") as e:
      setup.validate_config(_config(**bad))
    assert '\n' not in str(e.value)


def test_a_name_cannot_be_registered_twice():
  with pytest.raises(ValueError, match='registered already'):
    registry.register(DatasetFacts('cub', None, None, 2, 1, 2, 'train', 'test',
                                   load=lambda f, **kw: None))


def _toy_loader(f, data_dir=None, store_size=None, **kwargs) -> Dataset:
  """A dataset module's loader: 4 classes of striped 28 px images."""
  del data_dir, store_size, kwargs
  rng = np.random.default_rng(0)

  def split(n):
    labels = (np.arange(n) % f.num_classes).astype(np.int32)
    images = rng.integers(0, 60, (n, 28, 28, 3)).astype(np.uint8)
    images[np.arange(n), :, 7 * labels] = 255   # the class is a bright column
    return images, labels
  (tr_x, tr_y), (te_x, te_y) = split(96), split(32)
  return Dataset(f.name, tr_x, tr_y, te_x, te_y, f.num_classes,
                 tuple(f'toy{i}' for i in range(f.num_classes)))


def test_adding_a_dataset_is_a_loader_and_one_registry_line(tmp_path):
  registry.register(DatasetFacts('toy_stripes', None, None, 4, 2, 2, 'train', 'test',
                                 _toy_loader, preset='plain', aliases=('toy',)))
  try:
    c = _config(**{'dataset.name': 'toy', 'dataset.train_per_class': 0,
                   'dataset.test_per_class': 0, 'rounds': 1, 'min_samples': 2})
    results = simulate.run(c, str(tmp_path / 'run'), progress=False)
    assert results['dataset'] == 'toy' and len(results['accuracy_per_task_end']) == 2
  finally:
    registry.unregister('toy_stripes')
  with pytest.raises(ValueError, match='unknown dataset'):
    registry.facts('toy')

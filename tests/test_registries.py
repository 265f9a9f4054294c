"""The dataset registry: every name a config can give resolves everywhere or is
refused in one line, and adding a dataset is one loader plus one registry line."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import smoke_config
from lorm_jax.data import augment, registry
from lorm_jax.data.dataset import Dataset, DatasetFacts
from lorm_jax.errors import ConfigError
from lorm_jax.federated import setup, simulate


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
      setup.validate_config(smoke_config(**{'dataset.name': name}, **tasks))
    assert '\n' not in str(e.value)
    setup.validate_config(smoke_config(**{'dataset.name': name, 'dataset.preprocess': 'imagenet-r'},
                                  **tasks))
    return
  setup.validate_config(smoke_config(**{'dataset.name': name}, **tasks))
  assert augment.preset(name, 32) == augment.preset(canonical, 32)


def test_cifar_100_resolves_and_unknown_names_are_one_line():
  assert registry.facts('cifar-100').name == 'cifar100'
  assert augment.preset('cifar-100', 224).rrc_scale == (0.08, 1.0)
  for bad in ({'dataset.name': 'cifar1000'}, {'dataset.preprocess': 'cifar1000'}):
    with pytest.raises(ConfigError, match="unknown dataset 'cifar1000'; known: ") as e:
      setup.validate_config(smoke_config(**bad))
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
    c = smoke_config(**{'dataset.name': 'toy', 'dataset.train_per_class': 0,
                   'dataset.test_per_class': 0, 'rounds': 1, 'min_samples': 2})
    results = simulate.run(c, str(tmp_path / 'run'), progress=False)
    assert results['dataset'] == 'toy' and len(results['accuracy_per_task_end']) == 2
  finally:
    registry.unregister('toy_stripes')
  with pytest.raises(ValueError, match='unknown dataset'):
    registry.facts('toy')


def test_adding_a_backbone_is_a_module_and_one_registry_line(tmp_path, monkeypatch):
  from flax import nnx
  from lorm_jax.models import backbones, npz, vit
  arch = dict(patch_size=7, width=32, depth=1, num_heads=2, mlp_dim=64, layerscale=False,
              ln_eps=1e-6, gelu_approximate=True)

  def fetch(dest):   # the module's "where its file comes from"
    model = vit.ViT(vit.ViTConfig(**arch, image_size=28, num_classes=2), rngs=nnx.Rngs(5))
    return npz.save_npz(npz.model_params(model), dest)

  monkeypatch.setenv('LORM_JAX_CACHE', str(tmp_path / 'cache'))
  backbones.register(backbones.Backbone('toy_vit', arch, aliases=('toy',),
                                        weights_file='toy_vit.npz', fetch=fetch))
  try:
    c = smoke_config(**{'model.name': 'toy', 'model.weights': 'default', 'rounds': 1})
    results = simulate.run(c, str(tmp_path / 'run'), progress=False)
    assert len(results['accuracy_per_task_end']) == 2
    assert (tmp_path / 'cache' / 'toy_vit.npz').is_file()
  finally:
    backbones.unregister('toy_vit')
  with pytest.raises(ConfigError, match="unknown model 'toy'"):
    setup.validate_config(smoke_config(**{'model.name': 'toy'}))


def test_every_method_hyperparameter_is_reachable_from_thesmoke_config():
  from lorm_jax import methods
  c = smoke_config()
  for name, cls in methods.METHODS.items():
    defaults = cls.hyperparameters()
    if not defaults:
      assert name not in c
      continue
    assert c[name].to_dict() == defaults
    changed = {k: (not v if isinstance(v, bool) else v * 2 if isinstance(v, (int, float)) else v)
               for k, v in defaults.items()}
    m = methods.make_method(name, smoke_config(**{f'{name}.{k}': v for k, v in changed.items()}))
    assert {k: getattr(m, k) for k in defaults} == changed, name


def test_lora_learning_rates_mean_the_same_in_every_method():
  from lorm_jax import methods
  c = smoke_config(lr_a=1e-3, lr_b=2e-3, lr_head=3e-3)
  for name in methods.METHODS:
    spec = methods.make_method(name, c).local_spec(0, 0)
    assert (spec.lr_a, spec.lr_b, spec.lr_head) == (1e-3, 2e-3, 3e-3), name

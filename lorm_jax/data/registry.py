"""Every dataset a config can name: one row each, read by every consumer.

A row (``dataset.DatasetFacts``) says what the dataset is (classes, tasks,
tfds builder and splits), how it loads (``load``), how it is preprocessed
(``preset``, a name in ``augment.PRESETS``) and which other names it answers
to (``aliases``). Validation, loading, preprocessing, acquisition and the
GPU tools all look datasets up here, so a name is either known everywhere or
refused in one line before any work.

Adding a dataset: a module with its loader (``load(facts, data_dir,
manual_dir, store_size, train_per_class, test_per_class, **kw) -> Dataset``)
and one ``register(DatasetFacts(...))`` line (docs/architecture.md).
"""
from __future__ import annotations

from lorm_jax.data import fmnist, synthetic, tfds_source
from lorm_jax.registry import Registry
from lorm_jax.data.dataset import Dataset, DatasetFacts


def _load_fmnist(f, data_dir=None, manual_dir=None, store_size=None, train_per_class=None,
                 test_per_class=None, **kwargs) -> Dataset:
  del f, manual_dir, store_size, train_per_class, test_per_class, kwargs
  return fmnist.load_fashion_mnist(data_dir)


def _load_synthetic(f, data_dir=None, manual_dir=None, store_size=None, train_per_class=None,
                    test_per_class=None, **kwargs) -> Dataset:
  del f, data_dir, manual_dir, kwargs
  return synthetic.synthetic_dataset(store_size or 224, train_per_class, test_per_class)


def _load_tfds(f, data_dir=None, manual_dir=None, store_size=256, train_per_class=None,
               test_per_class=None, **kwargs) -> Dataset:
  del train_per_class, test_per_class  # cut afterwards by dataset.subsample_dataset
  return tfds_source.load_tfds_dataset(f.name, data_dir, manual_dir, store_size, **kwargs)


DATASETS: Registry[DatasetFacts] = Registry('dataset')
register, unregister, facts = DATASETS.register, DATASETS.unregister, DATASETS.get


def load_dataset(name: str, data_dir: str | None = None, manual_dir: str | None = None,
                 store_size: int | None = 256, train_per_class: int | None = None,
                 test_per_class: int | None = None, **kwargs) -> Dataset:
  """Loads any registered dataset (a name or an alias) into host memory.

  Args:
    name: registry name or alias.
    data_dir: Fashion-MNIST: folder of the idx files (None = Debian path);
      tfds datasets: tfds data_dir (None = tfds default).
    manual_dir: ImageNet-R/A: folder with the original tar (or extracted
      folder), prepared offline when the dataset is missing.
    store_size: storage side of variable-size datasets (and the side of the
      synthetic images).
    train_per_class, test_per_class: image counts of ``synthetic`` (which
      generates only what it needs); other datasets ignore them and are cut
      afterwards by ``dataset.subsample_dataset``.
    **kwargs: passed to the tfds loader (resize_mode, strict, num_workers).

  Returns:
    Dataset (uint8 images at storage size, int32 labels).
  """
  f = facts(name)
  return f.load(f, data_dir=data_dir, manual_dir=manual_dir, store_size=store_size,
                train_per_class=train_per_class, test_per_class=test_per_class, **kwargs)


# name, tfds builder, config, classes, tasks, classes/task, train split, test split
register(DatasetFacts('fashion_mnist', None, None, 10, 5, 2, 'train', 'test', _load_fmnist,
                      preset='grayscale_half', aliases=('fmnist',), native_size=28))
register(DatasetFacts('cifar100', 'cifar100', None, 100, 10, 10, 'train', 'test', _load_tfds,
                      preset='inception_half', aliases=('cifar-100', 'cifar_100'),
                      key_feature='id', native_size=32))
register(DatasetFacts('imagenet_r', 'imagenet_r', None, 200, 10, 20, None, None, _load_tfds,
                      preset='inception_half', aliases=('imagenet-r',), holdout_from='test',
                      key_feature='file_name', imagenet_labels=True,
                      manual_tar='imagenet-r.tar'))
register(DatasetFacts('imagenet_a', 'imagenet_a', None, 200, 10, 20, None, None, _load_tfds,
                      preset='inception_imagenet_a', aliases=('imagenet-a',),
                      holdout_from='test', key_feature='file_name', imagenet_labels=True,
                      manual_tar='imagenet-a.tar'))
register(DatasetFacts('eurosat', 'eurosat', 'rgb', 10, 5, 2, None, None, _load_tfds,
                      preset='plain', aliases=('eurosat_rgb', 'eurosat/rgb'),
                      holdout_from='train', key_feature='filename', native_size=64))
register(DatasetFacts('cars196', 'cars196', None, 196, 10, 20, 'train', 'test', _load_tfds,
                      preset='flip', aliases=('cars', 'cars-196', 'stanford_cars'),
                      key_feature='id'))
register(DatasetFacts('caltech_birds2011', 'caltech_birds2011', None, 200, 10, 20, 'train',
                      'test', _load_tfds, preset='crop_flip_imagenet',
                      aliases=('cub200', 'cub', 'cub-200', 'cub_200_2011'),
                      key_feature='image/filename'))
# Noise images shaped like ImageNet-R, for benchmarks (data/synthetic.py); no
# preset of its own (configs name the one to time, dataset.preprocess).
register(DatasetFacts('synthetic', None, None, 200, 10, 20, 'train', 'test', _load_synthetic))

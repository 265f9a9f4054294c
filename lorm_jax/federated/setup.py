"""Everything a run needs before its first step, checked up front.

`validate_config` raises one-line errors for bad input; `build_experiment`
then loads data and weights, splits clients and builds the method, in that
order, so a missing dataset or checkpoint stops the run before any training.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from lorm_jax import checkpointing, methods, metric_writers, runtime
from lorm_jax.data import acquire, augment, dataset as dataset_lib, partition, registry
from lorm_jax.errors import ConfigError
from lorm_jax.models import adapters, backbones, functional as F, pretrained, vit


def validate_config(c: ConfigDict) -> None:
  """Raises ConfigError (one line) for values no run could use, before any work."""
  _need(c.method in methods.METHODS,
        f'unknown method {c.method!r}; available: {", ".join(sorted(methods.METHODS))}')
  facts, backbone = _dataset_and_backbone(c)
  _check_counts(c)
  _check_rates(c)
  try:
    adapters.check_config(c, methods.METHODS[c.method])
    methods.METHODS[c.method].validate(c)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  metric_writers.check_packages(c)
  _check_switches(c)
  _check_fit(c, facts, backbone)


COMPUTE_DTYPES = ('auto', 'float32', 'bfloat16')


def resolve_compute_dtype(c: ConfigDict) -> ConfigDict:
  """c itself, or with model.dtype 'auto' a copy holding the dtype this
  machine runs fastest: 'bfloat16' where bfloat16 matmuls beat float32 ones
  (accelerators; CPUs with AMX or AVX-512 BF16), 'float32' elsewhere
  (`runtime.fast_bfloat16_matmuls`). The run's config.json records the
  resolved dtype, so a resume on a machine of the other kind is refused as
  another config rather than silently changing precision."""
  if c.model.dtype != 'auto':
    return c
  c = copy.deepcopy(c)
  c.model.dtype = runtime.auto_compute_dtype()[0]
  return c


def compute_dtype_line(c: ConfigDict) -> str:
  """One line saying what model.dtype='auto' chose here, and why."""
  return f'model.dtype=auto -> {c.model.dtype} ({runtime.auto_compute_dtype()[1]})'


def _need(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def _get(c: ConfigDict, dotted: str):
  for part in dotted.split('.'):
    c = getattr(c, part)
  return c


def _is_int(v, low: int) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_finite(c: ConfigDict, name: str, low: float, high: float = math.inf,
                  low_open: bool = True) -> None:
  """config `name` a finite number in (low, high] (or [low, high] without low_open)."""
  v = _get(c, name)
  ok = isinstance(v, (int, float)) and math.isfinite(v) and (
      v > low if low_open else v >= low) and v <= high
  bound = f'> {low}' if low_open else f'>= {low}'
  _need(ok, f'{name} must be a finite number {bound}' + (f' and <= {high}' if high < math.inf
                                                        else '') + f', got {v!r}')


def _dataset_and_backbone(c: ConfigDict) -> tuple[dataset_lib.DatasetFacts, backbones.Backbone]:
  """The registry facts of config.dataset (its preprocessing preset checked)
  and the backbone of config.model, or one-line ConfigErrors naming the known ones."""
  try:
    facts = registry.facts(c.dataset.name)
    augment.preset(c.dataset.preprocess or c.dataset.name, c.image_size)
  except ValueError as e:  # the registry's own message names the known datasets
    raise ConfigError(str(e).splitlines()[0]) from None
  try:
    backbone = backbones.get(c.model.name)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return facts, backbone


def _check_counts(c: ConfigDict) -> None:
  """The integer settings: sizes >= 1, automatic sizes and counts >= 0,
  clients_per_round at most num_clients."""
  for name in ('model.rank', 'num_clients', 'num_tasks', 'rounds', 'local_epochs', 'batch_size',
               'image_size', 'dataset.store_size'):
    v = _get(c, name)
    _need(_is_int(v, 1), f'{name} must be an integer >= 1, got {v!r}')
  for name in ('clients_per_chunk', 'eval_batch_size'):  # 0: sized to the device (sizing.py)
    v = _get(c, name)
    _need(_is_int(v, 0),
          f'{name} must be an integer >= 0 (0: chosen from the device memory), got {v!r}')
  for name in ('dataset.train_per_class', 'dataset.test_per_class', 'min_samples', 'seed',
               'split_seed', 'classes_per_task', 'clients_per_round'):
    v = _get(c, name)
    _need(_is_int(v, 0), f'{name} must be an integer >= 0, got {v!r}')
  _need(c.clients_per_round <= c.num_clients, f'clients_per_round {c.clients_per_round} is more '
        f'than the {c.num_clients} clients (num_clients); give at most {c.num_clients} (0: draw '
        'by participation_rate)')


def _check_rates(c: ConfigDict) -> None:
  """The real-valued settings: concentrations, rates, learning rates, weights."""
  _check_finite(c, 'beta', 0.0)
  _check_finite(c, 'participation_rate', 0.0, 1.0)
  for name in ('lr_head', 'lr_a', 'lr_b'):
    _check_finite(c, name, 0.0)   # a too large one is caught as divergence (a non-finite loss)
  _check_finite(c, 'weight_decay', 0.0, low_open=False)
  _check_finite(c, 'ridge', 0.0, 1.0)  # relative to the mean of a system's diagonal
  _check_finite(c, 'alpha_head', 0.0, 1.0, low_open=False)
  _check_finite(c, 'alpha_backbone', 0.0, 1.0, low_open=False)


def _check_switches(c: ConfigDict) -> None:
  """The settings with a fixed set of values: download flags, dtype, client mode."""
  for name in ('dataset.download', 'model.download'):
    _need(isinstance(_get(c, name), bool), f'{name} must be True or False, got {_get(c, name)!r}')
  _need(c.model.dtype in COMPUTE_DTYPES,
        f'model.dtype must be one of {", ".join(COMPUTE_DTYPES)}, got {c.model.dtype!r}')
  _need(c.client_mode in ('vmap', 'sequential'),
        f"client_mode must be 'vmap' or 'sequential', got {c.client_mode!r}")


def _check_fit(c: ConfigDict, facts: dataset_lib.DatasetFacts, backbone: backbones.Backbone
               ) -> None:
  """The settings that must agree with the dataset and backbone: image size a
  multiple of the patch, the split file present, the tasks covering the classes."""
  patch = backbone.architecture['patch_size']
  _need(c.image_size % patch == 0,
        f'image_size {c.image_size} is not a multiple of the {c.model.name} patch size {patch}')
  if c.split_file:
    _need(os.path.isfile(c.split_file), f'split_file {c.split_file} does not exist')
  num_classes = facts.num_classes
  if not c.classes_per_task:
    _need(num_classes % c.num_tasks == 0,
          f'{c.num_tasks} tasks do not divide the {num_classes} classes of {c.dataset.name}; '
          'set classes_per_task for an uneven last task')
  else:
    _need(c.classes_per_task * (c.num_tasks - 1) < num_classes
          <= c.classes_per_task * c.num_tasks,
          f'{c.num_tasks} tasks of {c.classes_per_task} classes do not cover the '
          f'{num_classes} classes of {c.dataset.name}')


def check_workdir(c: ConfigDict, workdir: str) -> None:
  """Raises ConfigError, touching nothing, if workdir cannot hold this run:
  not a folder, or holding a run of another config (without overwrite)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} exists and is not a folder; give a folder path')
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path) or c.overwrite:
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f'{path} is unreadable ({e}); use another --workdir or '
                      '--config.overwrite=True') from None
  diff = _config_diff(old, c)
  if diff:
    raise ConfigError(f'{workdir} holds a run with a different config (differs in: '
                      f'{", ".join(diff)}); use another --workdir or --config.overwrite=True')


def load_workdir_config(workdir: str) -> ConfigDict:
  """The config a run wrote to workdir/config.json (one-line ConfigError if none)."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      return ConfigDict(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f'{path}: no readable run config ({type(e).__name__}); '
                      f'is {workdir} the workdir of a run?') from None


# Keys a resumed run may change: they change no number (`log`: which metric
# writers also get the records).
_RESUMABLE_KEYS = ('overwrite', 'log')


def _config_diff(old: dict, c: ConfigDict) -> list[str]:
  """Top-level keys where a workdir's config.json and c differ, `overwrite`
  and `log` aside."""
  new = json.loads(c.to_json_best_effort())
  old = {k: v for k, v in old.items() if k not in _RESUMABLE_KEYS}
  for k in _RESUMABLE_KEYS:
    new.pop(k, None)
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def prepare_workdir(c: ConfigDict, workdir: str) -> None:
  """Creates workdir and writes config.json (after `check_workdir`); with
  overwrite, a workdir of another config is emptied first."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  text = c.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path) and c.overwrite:
    try:
      with open(path) as f:
        same = not _config_diff(json.load(f), c)
    except (OSError, json.JSONDecodeError):
      same = False   # an unreadable config.json: start afresh
    if not same:
      for name in os.listdir(workdir):  # start afresh
        full = os.path.join(workdir, name)
        if os.path.isdir(full):
          shutil.rmtree(full)
        else:
          os.remove(full)
  with open(path, 'w') as f:
    f.write(text)


@dataclasses.dataclass
class Experiment:
  """The static inputs of a run: data on device, the model, the client split."""
  config: ConfigDict
  model: F.FunctionalViT
  params: F.Params
  train_images: jax.Array       # (N, H, W, C) uint8, on device
  train_labels: jax.Array       # (N,) int32, on device
  test_images: jax.Array        # (M, H, W, C) uint8, on device
  test_labels_np: np.ndarray    # (M,) int32, host
  num_classes: int
  task_classes: list[np.ndarray]
  task_of_label: np.ndarray     # (K,) task index of each class
  split: list[list[np.ndarray]]  # [task][client] -> training-sample indices
  preprocess_train: Callable
  preprocess_test: Callable
  method: methods.Method


def build_model(c: ConfigDict, num_classes: int) -> vit.ViT:
  """The ViT of config.model with its pretrained weights loaded (or random)."""
  cfg = vit.run_architecture(c, num_classes)
  try:
    cfg.validate()
  except ValueError as e:
    raise ConfigError(str(e)) from None
  weights = c.model.weights
  if weights == 'random':
    return vit.ViT(cfg, rngs=nnx.Rngs(c.seed))
  # Pretrained: build abstractly and fill with zeros (eager init would compile a
  # kernel per parameter shape); the loader overwrites every frozen parameter,
  # LoRA and head are initialised by the method.
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      node.set_value(jnp.zeros(node.get_value().shape, jnp.float32))
  path = pretrained.resolve_weights(c.model.name, weights, download_missing=c.model.download)
  pretrained.load_backbone(model, c.model.name, path)
  return model


def preprocessors(c: ConfigDict) -> tuple[Callable, Callable]:
  """(train, test) preprocessing of config c, each (key, uint8 (B, H, W, C)) ->
  float32 (B, image_size, image_size, 3): the preset of dataset.preprocess, or
  of the dataset itself (its registry row)."""
  name = c.dataset.preprocess or c.dataset.name
  spec_train = augment.preset(name, c.image_size, train=True, augment=c.augment)
  spec_test = augment.preset(name, c.image_size, train=False)

  def preprocess_train(key, images):
    return augment.preprocess(key, images, spec_train)

  def preprocess_test(key, images):
    return augment.preprocess(key, images, spec_test)
  return preprocess_train, preprocess_test


def load_data(c: ConfigDict) -> dataset_lib.Dataset:
  """The dataset of config.dataset (uint8 images at store_size), cut to
  train_per_class / test_per_class samples per class where they are set."""
  ds = registry.load_dataset(c.dataset.name, c.dataset.data_dir or None,
                             c.dataset.manual_dir or None, c.dataset.store_size,
                             train_per_class=c.dataset.train_per_class or None,
                             test_per_class=c.dataset.test_per_class or None)
  if c.dataset.train_per_class or c.dataset.test_per_class:
    ds = dataset_lib.subsample_dataset(ds, c.dataset.train_per_class or 10**9,
                                       c.dataset.test_per_class or 10**9)
  return ds


def client_split(c: ConfigDict, ds: dataset_lib.Dataset, task_classes: list[np.ndarray]
                 ) -> list[list[np.ndarray]]:
  """split[task][client]: training-sample indices, read from config.split_file
  (checked against the labels and tasks) or drawn: a pure function of
  (labels, config, split_seed). Raises ConfigError when the smallest task
  cannot give every client min_samples."""
  if c.split_file:
    split = partition.load_split(c.split_file)
    partition.check_split(c.split_file, split, ds.train_labels, task_classes, c.num_clients)
    return split
  per_task_min = min(np.isin(ds.train_labels, cls).sum() for cls in task_classes)
  if per_task_min < c.num_clients * c.min_samples:
    raise ConfigError(f'{c.num_clients} clients x {c.min_samples} samples need more data than '
                      f'the smallest task has ({per_task_min} training samples)')
  return partition.federated_split(ds.train_labels, ds.num_classes, c.num_tasks, c.num_clients,
                                   c.beta, c.split_seed, min_samples=c.min_samples,
                                   classes_per_task=c.classes_per_task or None)


def build_experiment(c: ConfigDict, workdir: str,
                     lock: checkpointing.WorkdirLock | None = None,
                     write: bool = True) -> Experiment:
  """Checks everything (config, workdir, data, split, weights) before writing
  anything to workdir, so a refused run leaves it as it was; `lock` (held by
  the caller) is taken at once on an existing workdir, else once it is made.
  write=False (the other processes of a multi-process run) leaves the
  workdir to the process that writes it. model.dtype 'auto' is resolved
  (`resolve_compute_dtype`); Experiment.config holds the resolved config."""
  c = resolve_compute_dtype(c)
  validate_config(c)
  if lock is not None:
    lock.acquire_if_exists()
  if write:
    check_workdir(c, workdir)

  # Acquisition, before anything is loaded: the dataset prepared (downloaded
  # with dataset.download; the cache afterwards), then the weights (fetched
  # with model.download). A missing one stops here in one line.
  acquire.ensure_dataset(c.dataset.name, c.dataset.data_dir or None,
                         manual_dir=c.dataset.manual_dir or None,
                         download_missing=c.dataset.download)
  pretrained.resolve_weights(c.model.name, c.model.weights, download_missing=c.model.download)

  ds = load_data(c)   # data first: a missing dataset fails before the weights load
  task_classes = partition.task_classes(ds.num_classes, c.num_tasks, c.classes_per_task or None)
  task_of_label = np.zeros(ds.num_classes, np.int32)
  for t, cls in enumerate(task_classes):
    task_of_label[cls] = t
  split = client_split(c, ds, task_classes)
  model = build_model(c, ds.num_classes)
  if write:
    prepare_workdir(c, workdir)
    if lock is not None:
      lock.acquire()
    partition.save_split(os.path.join(workdir, 'split.json'), split)
  fmodel = F.FunctionalViT(model)
  preprocess_train, preprocess_test = preprocessors(c)

  return Experiment(
      config=c, model=fmodel, params=fmodel.initial_params(),
      train_images=jnp.asarray(ds.train_images), train_labels=jnp.asarray(ds.train_labels),
      test_images=jnp.asarray(ds.test_images), test_labels_np=np.asarray(ds.test_labels),
      num_classes=ds.num_classes, task_classes=task_classes, task_of_label=task_of_label,
      split=split, preprocess_train=preprocess_train, preprocess_test=preprocess_test,
      method=methods.make_method(c.method, c))

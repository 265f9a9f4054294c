"""The paper's benchmark settings (spec sections 1 and 5), shared by the six
benchmark config files. A benchmark file calls `paper_config(name, arg)` where
`arg` is the text after ':' on the command line, e.g. 'beta=0.1'.
"""
import os

import ml_collections

from configs import base

AUGREG_B16 = 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz'

# dataset -> facts and per-beta hyperparameters (spec section 5 table).
# Per beta: (lr_head, lr_b, lr_a, rank, alpha_head).
PAPER = {
    'cifar100': dict(num_tasks=10, classes_per_task=0, rounds=5, betas={
        0.5: (3e-3, 3e-3, 3e-3, 1, 0.5), 0.1: (3e-4, 3e-4, 3e-4, 16, 0.5),
        0.05: (5e-4, 5e-4, 5e-4, 16, 0.5)}),
    'imagenet_r': dict(num_tasks=10, classes_per_task=0, rounds=5, betas={
        0.5: (3e-3, 3e-3, 3e-3, 2, 0.5), 0.1: (1e-3, 1e-3, 1e-3, 32, 0.5),
        0.05: (1e-3, 1e-3, 1e-3, 16, 0.5)}),
    'imagenet_a': dict(num_tasks=10, classes_per_task=0, rounds=10, betas={
        1.0: (1e-2, 1e-3, 1e-2, 4, 0.5), 0.5: (1e-2, 1e-3, 1e-2, 4, 0.5),
        0.2: (1e-2, 1e-3, 1e-2, 4, 0.5)}),
    'eurosat': dict(num_tasks=5, classes_per_task=0, rounds=5, betas={
        1.0: (3e-3, 3e-3, 3e-3, 1, 0.5), 0.5: (1e-3, 1e-3, 1e-3, 1, 0.5),
        0.2: (3e-3, 3e-3, 3e-3, 1, 0.5)}),
    'caltech_birds2011': dict(num_tasks=10, classes_per_task=0, rounds=5, betas={
        1.0: (1e-2, 1e-2, 3e-3, 1, 0.3), 0.5: (3e-2, 3e-2, 1e-3, 1, 0.3),
        0.2: (3e-2, 3e-2, 3e-3, 1, 0.3)}),
    'cars196': dict(num_tasks=10, classes_per_task=20, rounds=10, betas={
        1.0: (1e-2, 1e-3, 1e-2, 8, 0.5), 0.5: (1e-2, 1e-3, 1e-2, 8, 0.5),
        0.2: (1e-2, 1e-3, 1e-2, 4, 0.5)}),
}


def parse_arg(arg: str | None) -> dict[str, str]:
  """'beta=0.1,seed=2' -> {'beta': '0.1', 'seed': '2'}."""
  out = {}
  for part in filter(None, (arg or '').split(',')):
    if '=' not in part:
      raise ValueError(f'config argument {part!r} is not key=value')
    k, v = part.split('=', 1)
    out[k.strip()] = v.strip()
  return out


def paper_config(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
  facts = PAPER[dataset]
  args = parse_arg(arg)
  betas = list(facts['betas'])
  beta = float(args.pop('beta', betas[0]))
  if beta not in facts['betas']:
    raise ValueError(f'beta={beta} is not a paper setting for {dataset}; one of {betas}')
  if args:
    raise ValueError(f'unknown config arguments {sorted(args)}; only beta=')
  lr_head, lr_b, lr_a, rank, alpha_head = facts['betas'][beta]

  c = base.get_base_config()
  c.dataset.name = dataset
  c.dataset.download = True      # first run: download and prepare (needs a network)
  c.dataset.store_size = 256
  c.image_size = 224
  c.model.name = 'augreg_b16'
  cache = os.environ.get('LORM_JAX_CACHE', os.path.join('~', '.cache', 'lorm_jax'))
  c.model.weights = os.path.join(cache, AUGREG_B16)
  c.model.rank = rank
  c.num_tasks = facts['num_tasks']
  c.classes_per_task = facts['classes_per_task']
  c.rounds = facts['rounds']
  c.num_clients = 10
  c.local_epochs = 5
  c.batch_size = 16
  c.beta = beta
  c.lr_head, c.lr_b, c.lr_a = lr_head, lr_b, lr_a
  c.alpha_head = alpha_head
  c.alpha_backbone = 0.0
  c.lock()
  return c

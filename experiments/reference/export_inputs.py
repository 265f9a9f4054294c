"""Write what a PyTorch reference run needs to train exactly this project's inputs.

  python -m experiments.reference.export_inputs --out=/tmp/fmnist_ref_inputs.npz

One .npz (float32 unless said):
  train_x, test_x        (N, 3, S, S)  the images as this project feeds them
                         (`preprocess_train` / `preprocess_test`: resized,
                         normalised), NCHW as torch convolutions take them
  train_y, test_y        (N,) int64
  split_{t}_{k}          indices into train_x of client k's data in task t
  w:model.<timm name>    the backbone in timm VisionTransformer's names and
                         layout (Linear weights (out, in), conv OIHW), position
                         embeddings already resampled to the config's grid
  check_feats            (8, D) this project's final-norm class tokens of the
                         first 8 test images, for the other side's parity check
and what this project draws from the config's seed, so that the reference can
replay it (`run_fed_mammoth.py --replay`):
  replay:order_{t}_{k}   (rounds * epochs, n) int64: client k's sample order in
                         each local epoch of task t (positions in split_{t}_{k}),
                         the permutations of this project's training plan
  replay:head.weight/bias  the initial head (torch layout (K, D))
  replay:a{t}:model.<name>  the server's LoRA A at the start of task t, (r, in)
  replay:seed, replay:epochs, replay:rounds, replay:batch_size
The config must describe a training without random augmentation (the images
are written once).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from lorm_jax.errors import ConfigError
from lorm_jax.federated import setup, simulate
from lorm_jax.federated.runner import ClientRunner

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist_reference.py', 'Config file.',
                                          lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'The .npz to write.', required=True)
_CHECK_IMAGES = 8


def timm_state_dict(flat: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
  """This project's backbone (flat `nnx` state, Flax layout) -> timm's names
  under the reference network's `model.` prefix, torch layout."""
  w = {'patch_embed.proj.weight': flat['patch_kernel'].transpose(3, 2, 0, 1),  # HWIO -> OIHW
       'patch_embed.proj.bias': flat['patch_bias'],
       'cls_token': flat['cls_token'], 'pos_embed': flat['pos_embed'],
       'norm.weight': flat['norm.scale'], 'norm.bias': flat['norm.bias']}
  for i in range(depth):
    ours, theirs = f'blocks.{i}.', f'blocks.{i}.'
    for n in ('norm1', 'norm2'):
      w[theirs + n + '.weight'] = flat[ours + n + '.scale']
      w[theirs + n + '.bias'] = flat[ours + n + '.bias']
    for n in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'):
      w[theirs + n + '.weight'] = flat[ours + n + '.kernel'].T  # (in, out) -> (out, in)
      w[theirs + n + '.bias'] = flat[ours + n + '.bias']
    if ours + 'ls1' in flat:
      w[theirs + 'ls1.gamma'] = flat[ours + 'ls1']
      w[theirs + 'ls2.gamma'] = flat[ours + 'ls2']
  return {'w:model.' + k: np.ascontiguousarray(v, np.float32) for k, v in w.items()}


def replay_arrays(c, exp) -> dict[str, np.ndarray]:
  """What a run of config c draws from its seed, in the reference's terms:
  the initial head, each task's LoRA A (the server's state at the task's
  start) and every client's sample order in each local epoch (the training
  pass's own plan, its batches joined)."""
  server = simulate.initial_server(exp)
  arrays = {'replay:head.weight': np.asarray(server['head']['kernel']).T,
            'replay:head.bias': np.asarray(server['head']['bias']),
            'replay:seed': np.int64(c.seed), 'replay:epochs': np.int64(c.local_epochs),
            'replay:rounds': np.int64(c.rounds), 'replay:batch_size': np.int64(c.batch_size)}
  passes = simulate.Passes(exp, ClientRunner(c.client_mode, c.clients_per_chunk))
  for t, clients in enumerate(exp.split):
    server = simulate.begin_task(exp, server, t)
    arrays.update({f'replay:a{t}:model.{name}.weight': np.asarray(a).T  # (in, r) -> (r, in)
                   for name, a in server['a'].items()})
    ids = np.arange(len(clients))
    plans = [passes.training_plan(t, r, ids)[0] for r in range(c.rounds)]
    for k, idx in enumerate(clients):
      position = np.full(len(exp.train_labels), -1)
      position[np.asarray(idx)] = np.arange(len(idx))
      joined = np.concatenate([p['idx'][k][p['mask'][k] > 0] for p in plans])
      arrays[f'replay:order_{t}_{k}'] = position[joined].reshape(-1, len(idx))
  return arrays


def export(c, out: str) -> dict[str, tuple]:
  """Builds the experiment of config c and writes the .npz; returns its shapes."""
  if c.augment:
    raise ConfigError('config.augment is on: the exported images would be one draw of it')
  exp = setup.build_experiment(c, '', write=False)
  train_x = np.asarray(exp.preprocess_train(jax.random.key(0), exp.train_images))
  test_x = np.asarray(exp.preprocess_test(None, exp.test_images))
  model = setup.build_model(c, exp.num_classes)
  flat = {'.'.join(map(str, k)): np.asarray(v.get_value())
          for k, v in nnx.to_flat_state(nnx.state(model))}
  arrays = {'train_x': train_x.transpose(0, 3, 1, 2), 'train_y': np.asarray(exp.train_labels, np.int64),
            'test_x': test_x.transpose(0, 3, 1, 2), 'test_y': exp.test_labels_np.astype(np.int64),
            'check_feats': np.asarray(model.features(jnp.asarray(test_x[:_CHECK_IMAGES])))}
  for t, clients in enumerate(exp.split):
    for k, idx in enumerate(clients):
      arrays[f'split_{t}_{k}'] = np.asarray(idx, np.int64)
  arrays.update(timm_state_dict(flat, len(model.blocks)))
  arrays.update(replay_arrays(c, exp))
  np.savez(out, **arrays)
  return {k: v.shape for k, v in arrays.items()}


def main(argv):
  del argv
  shapes = export(_CONFIG.value, _OUT.value)
  print(f'{_OUT.value}: {len(shapes)} arrays; train_x {shapes["train_x"]}, test_x {shapes["test_x"]}')


if __name__ == '__main__':
  app.run(main)

"""Run the PyTorch reference's own `main.py` on an `export_inputs` .npz.

  python run_fed_mammoth.py --fed_mammoth=FM --inputs=IN.npz --out=DIR [--threads=N] \
      -- --model=lorm --dataset=seq-exported --network=vit-exported <main.py flags>
  python run_fed_mammoth.py --fed_mammoth=FM --inputs=IN.npz --check

Needs torch, timm, lightning, kornia, matplotlib, pandas and an unmodified
checkout FM of aimagelab/fed-mammoth; nothing of this project is imported.
What it adds around the reference, and nothing else:
- dataset `seq-exported`: the exported images, labels and client split
  (tasks of 2 classes, the classes in order); each task's test images dealt
  round-robin to the clients (the reference's evaluation pools every
  client's test images, so only the number of loaders matters);
- network `vit-exported`: timm's VisionTransformer with the exported backbone
  (ViT-S/14 with LayerScale at the exported image size) and a head from
  timm's init, with the forward of the reference's `vit` network less its
  resize to 224 px;
- on a CPU: Lightning's default single-device strategy where main.py asks for
  'dp' (which this lightning turns into DDP), and a stand-in for the GPU's
  memory size that lorm.py reads to decide when to empty the CUDA cache;
- empty modules for packages the reference's files import at module level
  but no image run uses (transformers, wandb, downloaders) and for the one
  module its repository lacks (`_networks.vit_powder`).
`--check` compares the network's final-norm class tokens with the exported
ones. After a run, DIR/results.json holds the accuracy after each task and
the per-task row after the last, read from the reference's own printout.
"""
# No `from __future__ import annotations`: the reference builds its flags from
# the annotations of the registered classes' __init__ (utils/args.py).
import argparse
import importlib.abc
import importlib.machinery
import json
import os
import re
import runpy
import sys
import time
import types

UNUSED = ('transformers', 'wandb', 'onedrivedownloader', 'google_drive_downloader', 'deeplake')
MISSING = ('_networks.vit_powder',)


class _Anything(type):
  """A class whose attributes and instances are classes again."""

  def __getattr__(cls, name):
    return _Anything(name, (object,), {})

  def __call__(cls, *args, **kwargs):
    return _Anything('instance', (object,), {})


class _EmptyModule(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _Anything(name, (object,), {})


class _EmptyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in UNUSED or name in MISSING:
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _EmptyModule(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    pass


def register(inputs: str):
  """Registers `seq-exported` and `vit-exported` with the reference's
  factories; returns the network class."""
  import numpy as np
  import timm
  import torch
  from torch.utils.data import Dataset

  from _datasets import register_dataset
  from _datasets._utils import BaseDataset
  from _networks import register_network
  from _networks._utils import BaseNetwork

  z = np.load(inputs)
  classes = int(z['train_y'].max()) + 1

  class Arrays(Dataset):
    def __init__(self, x, y):
      self.data, self.targets = x, y

    def __len__(self):
      return len(self.data)

    def __getitem__(self, i):
      return self.data[i], int(self.targets[i])

  @register_dataset('seq-exported')
  class SeqExported(BaseDataset):
    N_CLASSES_PER_TASK = 2
    N_TASKS = classes // 2
    INPUT_SHAPE = tuple(z['train_x'].shape[2:])

    def __init__(self, num_clients: int, batch_size: int, partition_mode: str = 'distribution',
                 distribution_alpha: float = 0.5, class_quantity: int = 1):
      super().__init__(num_clients, batch_size, partition_mode, distribution_alpha, class_quantity)
      train_x, train_y = torch.tensor(z['train_x']), torch.tensor(z['train_y'])
      test_x, test_y = torch.tensor(z['test_x']), z['test_y']
      self.train_dataset, self.test_dataset = Arrays(None, None), Arrays(None, None)
      for t in range(self.N_TASKS):
        idx = [torch.tensor(z[f'split_{t}_{k}']) for k in range(num_clients)]
        self.train_data.append([train_x[i] for i in idx])
        self.train_targets.append([train_y[i] for i in idx])
        own = np.flatnonzero(np.isin(test_y, [2 * t, 2 * t + 1]))
        shards = [torch.tensor(own[k::num_clients]) for k in range(num_clients)]
        self.test_data.append([test_x[i] for i in shards])
        self.test_targets.append([torch.tensor(test_y)[i] for i in shards])

    def train_transform(self, x):
      return x

    def test_transform(self, x):
      return x

  @register_network('vit-exported')
  class ViTExported(BaseNetwork):
    def __init__(self, num_classes: int = classes):
      super().__init__()
      width = z['w:model.cls_token'].shape[-1]
      self.model = timm.models.vision_transformer.VisionTransformer(
          img_size=z['train_x'].shape[-1], patch_size=z['w:model.patch_embed.proj.weight'].shape[-1],
          embed_dim=width, depth=sum(k.endswith('.norm1.weight') for k in z.files),
          num_heads=width // 64, mlp_ratio=4, init_values=1e-5, num_classes=num_classes)
      state = {k[len('w:model.'):]: torch.tensor(z[k]) for k in z.files if k.startswith('w:')}
      missing, unexpected = self.model.load_state_dict(state, strict=False)
      if sorted(missing) != ['head.bias', 'head.weight'] or unexpected:
        raise ValueError(f'{inputs}: backbone does not fit: missing {missing}, unexpected {unexpected}')

    def forward(self, x, penultimate=False, prelogits=False, block=None):
      m = self.model
      if block == 'head':
        return m.forward_head(m.norm(x))
      if block is not None:
        if block == 0:
          x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return m.blocks[block](x)
      if prelogits:
        return m.forward_head(m.forward_features(x), pre_logits=True)
      if penultimate:
        feats = m.forward_features(x)
        return feats[:, 0], m.forward_head(feats)
      return m(x)

  return ViTExported, z


def on_cpu():
  """Lets main.py's GPU-minded set-up run in one CPU process."""
  import lightning
  import torch
  fabric = lightning.Fabric

  def single_device_on_cpu(*args, strategy='auto', **kwargs):
    return fabric(*args, strategy='auto' if kwargs.get('accelerator') == 'cpu' else strategy, **kwargs)

  lightning.Fabric = single_device_on_cpu
  torch.cuda.get_device_properties = lambda i: types.SimpleNamespace(total_memory=1 << 40)
  torch.cuda.memory_reserved = lambda *a: 0


def results_from_printout(text: str) -> dict:
  """The evaluation after each task: the last 'Mean accuracy up to task t'
  line before 'Task t time'."""
  after, rows, last = [], [], None
  for line in text.splitlines():
    m = re.match(r'Mean accuracy up to task (\d+): ([\d.]+) % Task accuracies: \[(.*)\]', line)
    if m:
      last = (float(m.group(2)), [float(v) for v in m.group(3).split(',')])
    elif re.match(r'Task \d+ time:', line) and last is not None:
      after.append(last[0])
      rows.append(last[1])
  return {'accuracy_after_each_task': after, 'per_task_accuracy': rows[-1] if rows else None,
          'final_accuracy': after[-1] if after else None}


class _Tee:
  def __init__(self, *streams):
    self.streams = streams

  def write(self, text):
    for s in self.streams:
      s.write(text)

  def flush(self):
    for s in self.streams:
      s.flush()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--fed_mammoth', required=True, help='checkout of aimagelab/fed-mammoth')
  p.add_argument('--inputs', required=True, help='.npz from experiments.reference.export_inputs')
  p.add_argument('--out', help='output directory of the run')
  p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
  p.add_argument('--check', action='store_true', help='only compare features with the export')
  own = sys.argv[1:sys.argv.index('--')] if '--' in sys.argv else sys.argv[1:]
  flags = sys.argv[sys.argv.index('--') + 1:] if '--' in sys.argv else []
  a = p.parse_args(own)
  if not a.check and (not a.out or not flags):
    p.error('a run needs --out and main.py flags after --')
  if not os.path.isfile(os.path.join(a.fed_mammoth, 'main.py')):
    p.error(f'{a.fed_mammoth} is not a fed-mammoth checkout (no main.py)')
  inputs = os.path.abspath(a.inputs)
  out = os.path.abspath(a.out) if a.out else None

  sys.meta_path.insert(0, _EmptyModules())
  import numpy as np
  import torch
  if a.threads:
    torch.set_num_threads(a.threads)
  sys.path.insert(0, os.path.abspath(a.fed_mammoth))
  os.chdir(a.fed_mammoth)
  network, z = register(inputs)

  if a.check:
    net = network().eval()
    with torch.no_grad():
      feats = net.model.forward_features(torch.tensor(z['test_x'][:len(z['check_feats'])]))[:, 0]
    ref = z['check_feats']
    print(f'final-norm class tokens: max|diff| / max|ref| = '
          f'{float(np.abs(feats.numpy() - ref).max() / np.abs(ref).max()):.2e}')
    return

  os.makedirs(out, exist_ok=True)
  on_cpu()
  printout = os.path.join(out, 'stdout.txt')
  with open(printout, 'w') as log:
    sys.stdout = _Tee(sys.__stdout__, log)
    sys.argv = ['main.py'] + flags + ['--output_folders_root', out]
    start = time.time()
    try:
      runpy.run_path('main.py', run_name='__main__')
    finally:
      sys.stdout = sys.__stdout__
    seconds = time.time() - start
  with open(printout) as f:
    results = results_from_printout(f.read())
  results.update(flags=flags, wall_seconds=round(seconds, 1), threads=torch.get_num_threads())
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  print(json.dumps({k: results[k] for k in ('final_accuracy', 'per_task_accuracy')}))


if __name__ == '__main__':
  main()

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
- `--matmul_precision`: main.py calls torch.set_float32_matmul_precision('medium'),
  which on a CPU with bfloat16 units (AMX, AVX512-BF16) runs float32 matmuls
  with bfloat16 operands; 'highest' keeps them float32 (as this project's);
- on a CPU: Lightning's default single-device strategy where main.py asks for
  'dp' (which this lightning turns into DDP), and a stand-in for the GPU's
  memory size that lorm.py reads to decide when to empty the CUDA cache;
- empty modules for packages the reference's files import at module level
  but no image run uses (transformers, wandb, downloaders) and for the one
  module its repository lacks (`_networks.vit_powder`).
With `--replay`, the reference draws nothing itself: the initial head, each
task's LoRA A and every client's sample order in every local epoch are the
ones this project draws from its seed (the export's `replay:` arrays), so the
two implementations train the same trajectories up to float rounding. The
order is replayed by a batch sampler whose passes with gradients enabled are
the training epochs; its passes under `torch.no_grad()` (the Gram passes)
keep file order, which a sum over samples does not see.
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


class ReplayBatches:
  """A batch sampler (positions in one client's data) that replays `orders`
  (epochs, n), one row per pass taken with gradients enabled; passes under
  `torch.no_grad()` run in file order."""

  def __init__(self, orders, batch_size: int):
    self.orders, self.batch_size, self.used = orders, batch_size, 0

  def __len__(self):
    return -(-self.orders.shape[1] // self.batch_size)

  def __iter__(self):
    import numpy as np
    import torch
    if torch.is_grad_enabled():
      if self.used == len(self.orders):
        raise RuntimeError(f'replay: a training pass beyond the {len(self.orders)} exported epochs')
      order = self.orders[self.used]
      self.used += 1
    else:
      order = np.arange(self.orders.shape[1])
    for s in range(0, len(order), self.batch_size):
      yield order[s:s + self.batch_size].tolist()


def register(inputs: str, replay: bool = False):
  """Registers `seq-exported` and `vit-exported` with the reference's
  factories; returns the network class, the export and, with `replay`, the
  list of the training loaders' samplers."""
  import numpy as np
  import timm
  import torch
  from torch.utils.data import DataLoader, Dataset

  from _datasets import register_dataset
  from _datasets._utils import BaseDataset
  from _networks import register_network
  from _networks._utils import BaseNetwork

  z = np.load(inputs)
  classes = int(z['train_y'].max()) + 1
  samplers = []

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

    def get_cur_dataloaders(self, task: int):
      train, test = super().get_cur_dataloaders(task)
      if replay:
        for k, loader in enumerate(train):
          samplers.append(ReplayBatches(z[f'replay:order_{task}_{k}'], self.batch_size))
          train[k] = DataLoader(loader.dataset, batch_sampler=samplers[-1])
      return train, test

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
      if replay:
        self.model.head.weight.data.copy_(torch.tensor(z['replay:head.weight']))
        self.model.head.bias.data.copy_(torch.tensor(z['replay:head.bias']))

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

  return ViTExported, z, samplers


def replay_lora_init(model_name: str, z) -> None:
  """After every `begin_task` of the model class: the exported A of the task
  (B is zero there already), in place of the reference's kaiming draw."""
  import torch
  from torch import nn

  from _models import model_factory
  cls = model_factory(model_name)
  begin_task = cls.begin_task

  def replayed(self, *args, **kwargs):
    begin_task(self, *args, **kwargs)
    for key in self.lora_keys:
      a = torch.tensor(z[f'replay:a{self.cur_task}:{key}'])
      if a.shape != self.cur_A[key].shape:
        raise ValueError(f'replay: A of {key} is {tuple(a.shape)}, the reference has {tuple(self.cur_A[key].shape)}')
      self.cur_A[key] = nn.Parameter(a, requires_grad=True).to(self.device)

  cls.begin_task = replayed


def _save_factors(path: str, cur_a: dict, cur_b: dict, head: dict) -> None:
  """One .npz of LoRA factors ('A:<key>' (r, in), 'B:<key>' (out, r)) and head tensors."""
  import numpy as np
  arrays = {k: v.detach().cpu().numpy() for k, v in head.items()}
  arrays.update({f'A:{key}': v.detach().cpu().numpy() for key, v in cur_a.items()})
  arrays.update({f'B:{key}': v.detach().cpu().numpy() for key, v in cur_b.items()})
  np.savez(path, **arrays)


def dump_server_rounds(model_name: str, out: str) -> None:
  """After every `end_round_server`: the server's LoRA factors and head to
  out/server_task{t}_round{r}.npz ('head.weight' (K, D), 'head.bias'); after
  every `get_client_info`: what the client sends, to
  out/client_task{t}_round{r}_{k}.npz; to set beside this project's state."""
  import collections

  from _models import model_factory
  cls = model_factory(model_name)
  end_round_server, get_client_info = cls.end_round_server, cls.get_client_info
  rounds, clients = collections.Counter(), collections.Counter()

  def dumped(self, *args, **kwargs):
    result = end_round_server(self, *args, **kwargs)
    r = rounds[self.cur_task]
    rounds[self.cur_task] += 1
    head = self.network.model.head
    _save_factors(os.path.join(out, f'server_task{self.cur_task}_round{r}.npz'), self.cur_A,
                  self.cur_B, {'head.weight': head.weight, 'head.bias': head.bias})
    return result

  def dumped_client(self, *args, **kwargs):
    info = get_client_info(self, *args, **kwargs)
    if 'cur_A' in info:
      t, r = here = (self.cur_task, getattr(self, 'cur_round', 0))
      k = clients[here]
      clients[here] += 1
      _save_factors(os.path.join(out, f'client_task{t}_round{r}_{k}.npz'), info['cur_A'],
                    info['cur_B'], info.get('head', {}))
    return info

  cls.end_round_server, cls.get_client_info = dumped, dumped_client


def check_replay_flags(given: dict[str, str], z) -> None:
  """The run's epochs, rounds and batch size (main.py's flags, name -> value)
  must be those the export drew for."""
  for flag, key in (('num_epochs', 'epochs'), ('num_comm_rounds', 'rounds'), ('batch_size', 'batch_size')):
    if given.get(flag) != str(int(z[f'replay:{key}'])):
      raise SystemExit(f'--replay: --{flag}={given.get(flag)} but the export drew for {int(z[f"replay:{key}"])}')


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
  p.add_argument('--dump_rounds', action='store_true',
                 help='save the server state after every round (server_task{t}_round{r}.npz) and '
                      'what every client sends (client_task{t}_round{r}_{k}.npz)')
  p.add_argument('--matmul_precision', choices=('highest', 'high', 'medium'),
                 help="float32 matmul precision in place of the 'medium' that main.py sets "
                      '(on a CPU with bfloat16 units, medium runs float32 matmuls in bfloat16)')
  p.add_argument('--replay', action='store_true',
                 help="train on this project's draws (head, LoRA A, sample orders) from the export")
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
  network, z, samplers = register(inputs, a.replay)

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
  if a.matmul_precision:
    set_precision = torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision = lambda _: set_precision(a.matmul_precision)
  given = dict(f[2:].split('=', 1) for f in flags if f.startswith('--') and '=' in f)
  if a.replay:
    check_replay_flags(given, z)
    replay_lora_init(given.get('model'), z)
  if a.dump_rounds:
    dump_server_rounds(given.get('model'), out)
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
  results.update(flags=flags, wall_seconds=round(seconds, 1), threads=torch.get_num_threads(),
                 float32_matmul_precision=torch.get_float32_matmul_precision())
  if a.replay:
    used = [s.used for s in samplers if s.used]  # evaluations build training loaders too
    results.update(replay_seed=int(z['replay:seed']), replayed_loaders=len(used),
                   replayed_epochs_per_loader=sorted(set(used)))
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  print(json.dumps({k: results[k] for k in ('final_accuracy', 'per_task_accuracy')}))


if __name__ == '__main__':
  main()

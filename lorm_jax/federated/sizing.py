"""How many clients a vmapped chunk holds, and how large an evaluation batch is,
chosen from the compiled programs' memory and the device's memory.

`clients_per_chunk = 0` and `eval_batch_size = 0` (configs/base.py) ask for
this; a value >= 1 is used as it is. Sizing needs shapes only (config, the
dataset's image count and side, model, rank, classes, batch size), so it runs
before any data loads or downloads, and a run that cannot fit one client stops
with one line (ConfigError) first.

  limit      the device's memory: `device.memory_stats()['bytes_limit']`, or
             $LORM_JAX_DEVICE_MEMORY ('24GiB', '80G', '2.5e10'), which wins;
             a backend that reports none (XLA:CPU) and no override: no limit,
             then all clients of a round run in one chunk (as before sizing
             existed) and the evaluation batch is EVAL_BATCH_MAX.
  budget     limit x (1 - margin), margin DEFAULT_MARGIN (10%): room for the
             programs not probed (merges, the end-of-task Gram pass, the
             evaluation's own deltas) and for allocator fragmentation.
  resident   bytes on the device for the whole run: training images and
             labels, test images, the frozen backbone, the server state.
  passes     each per-client program the run maps over clients (local training
             of every distinct round kind, e.g. LoRM's A- and B-rounds; the Gram
             pass; a method's statistics pass), compiled ahead of time from
             abstract arguments (`jax.ShapeDtypeStruct`, nothing allocated) for
             1 client and for the round's clients; from its
             `memory_analysis()`: m(c) = arguments - data arguments + outputs
             + temporaries + code - aliased, fitted as fixed + per_client x c.
  held       the round's per-client results kept while later passes run:
             n x sum of per-client outputs, plus a second copy of the largest
             pass's outputs when chunks are joined (c < n).

  need(c) = resident + held(c) + max over passes (fixed + per_client x c)
  clients_per_chunk = the largest c <= n (clients per round, per device) with
                      need(c) <= budget, times the device count
  eval_batch_size   = the largest power of two b <= EVAL_BATCH_MAX with
                      resident + fixed_eval + per_image x b <= budget

Several devices: the programs are probed for one device (a device runs
c / devices clients of a chunk; shard_map keeps the rest on the others), the
limit is one device's.

The pieces are pure and usable without a device (experiments/gpu_check.py):
`program_bytes` reads a compiled program, `fit_line` fits two counts,
`choose_clients_per_chunk` / `choose_eval_batch` do the arithmetic from a
given limit and given figures; `probes` builds the run's per-client programs
as (jitted function, abstract arguments) for any lowering; `size_run` does
all of it for a config on this process's device.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from lorm_jax import methods, rng
from lorm_jax.methods import interface
from lorm_jax.data import registry, tfds_source
from lorm_jax.errors import ConfigError
from lorm_jax.federated import batching, client, setup
from lorm_jax.federated.runner import ClientRunner
from lorm_jax.models import functional as F, vit

ENV_LIMIT = 'LORM_JAX_DEVICE_MEMORY'
DEFAULT_MARGIN = 0.10
EVAL_BATCH_MAX = 256   # the evaluation batch every config used before sizing
GIB = 2 ** 30


def human(b: float | None) -> str:
  """Bytes for a person: '1.73 GiB', '12.5 MiB', '830 KiB'."""
  if b is None:
    return 'none'
  for unit, size in (('GiB', GIB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if abs(b) >= size:
      return f'{b / size:.{2 if unit == "GiB" else 1}f} {unit}'
  return f'{int(b)} B'

# Training / test images of each dataset when its prepared dataset_info.json is
# not there yet (a first run that downloads it): the published split sizes
# (holdout datasets: the one split that is carved 80/20, see data/holdout.py).
PUBLISHED_SIZES = {
    'fashion_mnist': (60000, 10000), 'cifar100': (50000, 10000),
    'imagenet_r': (30000, None), 'imagenet_a': (7500, None), 'eurosat': (27000, None),
    'cars196': (8144, 8041), 'caltech_birds2011': (5994, 5794),
}


# ------------------------------------------------------------------ figures


def parse_bytes(text: str | int | float) -> int:
  """'24GiB', '24 GB', '80G', '512MiB', '2.5e10', 1e9 -> bytes (G/GB/GiB all
  mean 2**30, a card's marketing size being the closest reading)."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    value = float(text)
  else:
    m = re.fullmatch(r'\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*', str(text).lower())
    if not m:
      raise ConfigError(f'{ENV_LIMIT}={text!r} is not a memory size; give e.g. 24GiB, 80G or '
                        '25769803776 (bytes)')
    value = float(m.group(1)) * 1024 ** ' kmgt'.index(m.group(2) or ' ')
  if not math.isfinite(value) or value <= 0:
    raise ConfigError(f'{ENV_LIMIT}={text!r} must be a positive memory size')
  return int(value)


def device_memory_limit(device: Any = None, override: str | int | None = None
                        ) -> tuple[int | None, str]:
  """(bytes one device may hold, where that came from).

  override (an argument) wins, then $LORM_JAX_DEVICE_MEMORY, then the
  backend's `memory_stats()['bytes_limit']`; (None, 'none') when neither
  (XLA:CPU reports no memory statistics)."""
  if override is not None:
    return parse_bytes(override), 'given'
  if os.environ.get(ENV_LIMIT, '').strip():
    return parse_bytes(os.environ[ENV_LIMIT]), ENV_LIMIT
  device = device if device is not None else jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without the call)
    stats = {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.platform} bytes_limit'
  return None, 'none'


def program_bytes(compiled: Any) -> dict[str, int] | None:
  """{'arguments', 'outputs', 'temporaries', 'code', 'alias'} bytes of a
  compiled program (`jax.stages.Compiled.memory_analysis()`), per device;
  None when the backend reports nothing."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  get = lambda name: int(getattr(m, name, 0) or 0)
  return {'arguments': get('argument_size_in_bytes'), 'outputs': get('output_size_in_bytes'),
          'temporaries': get('temp_size_in_bytes'), 'code': get('generated_code_size_in_bytes'),
          'alias': get('alias_size_in_bytes')}


def footprint(pb: dict[str, int], data_arguments: int = 0) -> int:
  """What running the program adds to the device beyond the resident data:
  arguments (less the data arrays, which are resident) + outputs +
  temporaries + code - aliased."""
  return (pb['arguments'] - data_arguments + pb['outputs'] + pb['temporaries'] + pb['code']
          - pb['alias'])


class Line(NamedTuple):
  """bytes(c) = fixed + slope x c."""
  fixed: float
  slope: float

  def at(self, c: float) -> float:
    return self.fixed + self.slope * c


def fit_line(points: dict[int, float]) -> Line:
  """The line through {count: bytes} at the smallest and largest count; one
  count c alone gives slope bytes / c and no fixed part (all of it per client,
  the cautious reading). A negative slope (noise of the buffer assignment) is 0."""
  counts = sorted(points)
  lo, hi = counts[0], counts[-1]
  if hi == lo:
    return Line(0.0, points[lo] / lo)
  slope = max(0.0, (points[hi] - points[lo]) / (hi - lo))
  return Line(points[lo] - slope * lo, slope)


# ----------------------------------------------------------------- choosing


@dataclasses.dataclass
class PassFigures:
  """One per-client program's fitted figures (bytes)."""
  footprint: Line         # m(c), beyond the resident data
  outputs_per_client: float


def held_bytes(passes: dict[str, PassFigures], clients: int, chunk: int) -> float:
  """Per-client results of the whole round held at once, plus one more copy of
  the largest pass's while chunk results are joined (chunk < clients)."""
  outs = [p.outputs_per_client for p in passes.values()]
  return clients * (sum(outs) + (max(outs, default=0.0) if chunk < clients else 0.0))


def need_bytes(passes: dict[str, PassFigures], resident: float, clients: int, chunk: int
               ) -> float:
  """need(c) of the module docstring, for one device."""
  largest = max((p.footprint.at(chunk) for p in passes.values()), default=0.0)
  return resident + held_bytes(passes, clients, chunk) + largest


def choose_clients_per_chunk(limit: int | None, passes: dict[str, PassFigures], *,
                             clients: int, resident: float = 0.0, devices: int = 1,
                             margin: float = DEFAULT_MARGIN) -> int:
  """The largest chunk (a multiple of `devices`, at most the round's
  `clients` rounded up to one) whose need fits limit x (1 - margin); 0 when
  not even one client per device fits. No limit: all clients.

  passes: {name: PassFigures} of one device (from `fit_passes`, or any
  compile: this needs no device)."""
  per_device = -(-clients // devices)
  if limit is None:
    return per_device * devices
  budget = limit * (1.0 - margin)
  for c in range(per_device, 0, -1):
    if need_bytes(passes, resident, per_device, c) <= budget:
      return c * devices
  return 0


def choose_eval_batch(limit: int | None, line: Line, *, resident: float = 0.0,
                      margin: float = DEFAULT_MARGIN, largest: int = EVAL_BATCH_MAX) -> int:
  """The largest power of two <= largest whose prediction pass fits
  (resident + line(b) <= limit x (1 - margin)); 0 when not even 1 fits. No
  limit: `largest`."""
  if limit is None:
    return largest
  budget = limit * (1.0 - margin)
  b = 1 << (max(1, largest).bit_length() - 1)
  while b >= 1:
    if resident + line.at(b) <= budget:
      return b
    b //= 2
  return 0


def fit_passes(figures: dict[str, dict[int, dict[str, int]]],
               data_arguments: dict[str, int] | None = None) -> dict[str, PassFigures]:
  """{pass: {count: program_bytes}} -> {pass: PassFigures}; data_arguments
  {pass: bytes of its resident data arguments} (images, labels)."""
  data_arguments = data_arguments or {}
  out = {}
  for name, by_count in figures.items():
    d = data_arguments.get(name, 0)
    out[name] = PassFigures(fit_line({c: footprint(pb, d) for c, pb in by_count.items()}),
                            fit_line({c: pb['outputs'] for c, pb in by_count.items()}).slope)
  return out


# ----------------------------------------------------------- the run's shapes


@dataclasses.dataclass(frozen=True)
class DataShapes:
  """What sizing needs to know of the dataset before loading it."""
  num_train: int
  num_test: int
  image_shape: tuple[int, int, int]   # stored (S, S, channels)
  source: str                         # where the counts came from

  def bytes(self) -> int:
    side = int(np.prod(self.image_shape))
    return (self.num_train + self.num_test) * side + 4 * self.num_train  # uint8 images, int32 labels


def _split_sizes(info_path: str) -> dict[str, int]:
  """{split: examples} from a prepared tfds dataset_info.json."""
  with open(info_path) as f:
    info = json.load(f)
  out = {}
  for s in info.get('splits', []):
    lengths = s.get('shardLengths') or []
    n = sum(int(x) for x in lengths) if lengths else int(s.get('numExamples', 0) or 0)
    out[s['name']] = n
  return out


def data_shapes(c: ConfigDict) -> DataShapes:
  """Image counts and stored image shape of c's dataset, without loading it:
  the prepared tfds dataset's dataset_info.json split sizes when it is there,
  else the published sizes (PUBLISHED_SIZES); a holdout dataset's carved split
  counted at 80% / 20% plus one image per class either way (the per-class
  rounding of data/holdout.py); train_per_class / test_per_class cap them."""
  f = registry.facts(c.dataset.name)
  k = f.num_classes
  if f.name == 'synthetic':
    from lorm_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    n_train = k * (c.dataset.train_per_class or synthetic.TRAIN_PER_CLASS)
    n_test = k * (c.dataset.test_per_class or synthetic.TEST_PER_CLASS)
    side = c.dataset.store_size or 224
    return DataShapes(n_train, n_test, (side, side, 3), 'synthetic')
  train, test = PUBLISHED_SIZES.get(f.name, (None, None))
  source = 'published sizes'
  if f.tfds_name is not None:
    try:
      root = tfds_source.find_prepared_dir(f.name, c.dataset.data_dir or None)
      sizes = _split_sizes(os.path.join(root, 'dataset_info.json'))
      if f.holdout_from is not None:
        train, test = sizes[f.holdout_from], None
      else:
        train, test = sizes[f.train_split], sizes[f.test_split]
      source = 'dataset_info.json'
    except Exception:  # pylint: disable=broad-except  (not prepared yet: published sizes)
      pass
  if train is None:
    raise ConfigError(f'no image counts known for dataset {c.dataset.name!r} to size the run; '
                      'set clients_per_chunk and eval_batch_size explicitly')
  if test is None:  # one split carved 80/20 per class
    total = train
    train = min(total, math.ceil(0.8 * total) + k)
    test = min(total, math.ceil(0.2 * total) + k)
  if c.dataset.train_per_class:
    train = min(train, c.dataset.train_per_class * k)
  if c.dataset.test_per_class:
    test = min(test, c.dataset.test_per_class * k)
  if f.name == 'fashion_mnist':
    shape = (28, 28, 1)
  else:
    side = f.native_size or c.dataset.store_size
    shape = (side, side, 3)
  return DataShapes(int(train), int(test), shape, source)


def clients_per_round(c: ConfigDict, method: methods.Method) -> int:
  """The most participants a round of c can have (after the method's task
  structure, e.g. joint's one central client)."""
  fake = [[np.zeros(1, np.int64) for _ in range(c.num_clients)] for _ in range(c.num_tasks)]
  _, split = method.task_structure([np.arange(1)] * c.num_tasks, fake)
  eligible = max(len(task) for task in split)
  if c.clients_per_round > 0:
    return min(c.clients_per_round, eligible)
  if c.participation_rate >= 1.0:
    return eligible
  return max(1, int(round(c.participation_rate * eligible)))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
                      if not isinstance(x, jax.ShapeDtypeStruct) else x, tree)


def _stacked(tree: Any, n: int) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + tuple(x.shape), x.dtype), tree)


def _tree_bytes(tree: Any) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


class Probe(NamedTuple):
  """One per-client program at one count: `jitted(*args)` is what the run
  calls (`ClientRunner._call`, the pass's fn static); args are abstract.
  data_arguments: bytes of its resident data arguments (images, labels)."""
  name: str
  count: int
  jitted: Callable
  args: tuple
  data_arguments: int


@dataclasses.dataclass
class Shapes:
  """The abstract run: model, method, server state, preprocessing and data
  shapes, built from the config alone."""
  config: ConfigDict
  data: DataShapes
  model: F.FunctionalViT
  params: F.Params
  method: methods.Method
  server: dict
  num_classes: int
  clients: int           # most participants in a round
  preprocess_train: Callable
  preprocess_test: Callable

  @property
  def resident(self) -> dict[str, int]:
    """Bytes on the device for the whole run, by kind."""
    return {'data': self.data.bytes(), 'backbone': _tree_bytes(self.params.frozen),
            'server': _tree_bytes(self.server)}


def run_shapes(c: ConfigDict, data: DataShapes | None = None) -> Shapes:
  """The run of config c, abstract (jax.ShapeDtypeStruct leaves): nothing is
  loaded or allocated."""
  facts = registry.facts(c.dataset.name)
  k = facts.num_classes
  cfg = vit.run_architecture(c, k)
  model = F.FunctionalViT(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0))))
  params = model.initial_params()
  method = methods.make_method(c.method, c)
  head = jax.eval_shape(lambda key: F.init_head(key, cfg.width, k), jax.random.key(0))
  server = jax.eval_shape(
      lambda parts, h, key: method.init_server(F.Params(*parts), h, key),
      (params.frozen, params.a, params.b, params.head), head, jax.random.key(0))
  return Shapes(c, data or data_shapes(c), model, params, method, server, k,
                clients_per_round(c, method), *setup.preprocessors(c))


_PLAN_ARRAYS = ('train_deltas', 'aux', 'ctx', 'client_params', 'client_state', 'gram_deltas')


def abstract_round_plan(method: methods.Method, server: Any, t: int, r: int, clients: int
                        ) -> interface.RoundPlan:
  """`method.round_plan` of round r of task t with `clients` participants on an
  abstract server state: its static parts (spec, Gram request, statistic) as
  the method gives them, its arrays as jax.ShapeDtypeStruct. gram_params is
  left out (the identity): the Gram pass's factors keep the clients' shapes."""
  static = {}

  def arrays(sv):
    plan = method.round_plan(sv, t, r, np.arange(clients))
    static['plan'] = plan
    return {f: getattr(plan, f) for f in _PLAN_ARRAYS}

  shapes = _abstract(jax.eval_shape(arrays, server))
  return dataclasses.replace(static['plan'], **shapes, gram_params=interface.RoundPlan.gram_params)


def _rows(tree: Any) -> Any:
  """A per-participant tree's one row: the leading axis dropped."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype), tree)


def round_passes(s: Shapes, runner: ClientRunner, plan: interface.RoundPlan, data: dict
                 ) -> list[tuple[str, Callable, dict, int, dict]]:
  """The per-client programs of a round as the loop runs them: (name, the
  pass's fn, shared arguments, epochs, one client's own arguments besides its
  batch plan). data: abstract {'images', 'labels', 'class_mask'}."""
  c, method, frozen = s.config, s.method, s.params.frozen
  lora = {f: s.server[f] for f in ('a', 'b', 'head')}
  own = _rows(plan.client_params)
  if plan.client_state is not None:
    own['state'] = _rows(plan.client_state)
  train = runner.bind(client.local_train, s.model, method.forward, plan.spec,
                      s.preprocess_train, runner.half_batches)
  shared = dict(frozen=frozen, **data, aux=plan.aux, ctx=plan.ctx,
                **{k: v for k, v in lora.items() if k not in plan.client_params})
  out = [('train_' + ''.join(plan.spec.factors) if plan.spec.factors else 'train', train,
          shared, c.local_epochs, own)]
  if plan.gram is not None:
    fn = runner.bind(client.gram_pass, s.model, s.preprocess_train, plan.gram.backbone,
                     plan.gram.head, runner.half_batches)
    out.append(('gram', fn, dict(frozen=frozen, images=data['images']), 1, lora))
  if plan.stats is not None:
    fn = runner.bind(client.stats_pass, s.model, method.forward, s.preprocess_train,
                     plan.stats, runner.half_batches)
    out.append(('stats', fn, dict(frozen=frozen, aux=plan.aux, ctx=plan.ctx, **data), 1, lora))
  return out


def probes(s: Shapes, counts: tuple[int, ...], eval_batches: tuple[int, ...] = (),
           mode: str | None = None) -> list[Probe]:
  """The run's per-client programs, one Probe per distinct program and count:
  local training of every distinct round kind of the first two tasks'
  first two rounds (LoRM: the B- and the A-round), the Gram pass and a
  method's statistics pass after each, and prediction at each eval batch."""
  c = s.config
  runner = ClientRunner(mode or c.client_mode, max(counts, default=1),
                        devices=jax.local_devices()[:1])
  data = {'images': jax.ShapeDtypeStruct((s.data.num_train,) + s.data.image_shape, jnp.uint8),
          'labels': jax.ShapeDtypeStruct((s.data.num_train,), jnp.int32),
          'class_mask': jax.ShapeDtypeStruct((s.num_classes,), jnp.bool_)}
  # A client's share of a task, batched: the steps barely matter (a scan).
  per_client = math.ceil(s.data.num_train / max(1, c.num_tasks) / max(1, s.clients))
  steps = batching.steps_per_epoch(max(1, per_client), c.batch_size)
  found: dict[Any, str] = {}
  out = []
  tasks = sorted({0, min(1, c.num_tasks - 1)})
  rounds = sorted({0, min(1, c.rounds - 1)})
  for t, r in ((t, r) for t in (tasks if counts else ()) for r in rounds):
    plan = abstract_round_plan(s.method, s.server, t, r, max(counts))
    for name, fn, shared, epochs, own in round_passes(s, runner, plan, data):
      signature = (fn, jax.tree.structure(shared), str(jax.tree.leaves(shared)))
      if signature in found:
        continue
      found[signature] = name = _unique(name, found.values())
      resident = _tree_bytes({k: v for k, v in shared.items() if k in ('images', 'labels')})
      for n in counts:
        clients = {**batch_plan(n, steps * epochs, c.batch_size), **_stacked(own, n)}
        out.append(Probe(name, n, runner._call, (fn, shared, clients), resident))  # pylint: disable=protected-access
  return out + _predict_probes(s, runner, eval_batches, tasks[-1])


def batch_plan(clients: int, steps: int, batch_size: int) -> dict:
  """An abstract per-client batch plan {'idx', 'mask' (C, S, B), 'key' (C,)}."""
  keys = jax.eval_shape(lambda: rng.client_keys(jax.random.key(0), clients))
  return {'idx': jax.ShapeDtypeStruct((clients, steps, batch_size), jnp.int32),
          'mask': jax.ShapeDtypeStruct((clients, steps, batch_size), jnp.float32), 'key': keys}


def _predict_probes(s: Shapes, runner: ClientRunner, eval_batches: tuple[int, ...], t: int
                    ) -> list[Probe]:
  """Prediction over one batch of each size in eval_batches, task t's model."""
  method = s.method
  test_images = jax.ShapeDtypeStruct((s.data.num_test,) + s.data.image_shape, jnp.uint8)
  ctx = _abstract(jax.eval_shape(lambda sv: method.forward_ctx(sv, t), s.server))
  fn = runner.bind(client.predict, s.model, method.forward, s.preprocess_test)
  shared = dict(frozen=s.params.frozen, **{f: s.server[f] for f in ('a', 'b', 'head')},
                ctx=ctx, images=test_images)
  return [Probe('predict', b, runner._call,  # pylint: disable=protected-access
                (fn, shared, {'idx': jax.ShapeDtypeStruct((1, 1, b), jnp.int32)}),
                _tree_bytes(test_images)) for b in eval_batches]


def _unique(name: str, taken: Any) -> str:
  taken, k, out = set(taken), 1, name
  while out in taken:
    k += 1
    out = f'{name}{k}'
  return out


def compile_probe(p: Probe) -> Any:
  """The default lowering: this process's backend, ahead of time."""
  return p.jitted.lower(*p.args).compile()


# ------------------------------------------------------------------ the run


@dataclasses.dataclass
class Decision:
  """What sizing chose for a run, and the figures that decided it."""
  clients_per_chunk: int         # what the runner gets; 0: all clients of a round
  eval_batch_size: int
  automatic: bool                # either field was 0 in the config
  clients: int = 0               # most participants of a round
  devices: int = 1
  limit: int | None = None
  limit_source: str = 'none'
  margin: float = DEFAULT_MARGIN
  resident: dict = dataclasses.field(default_factory=dict)
  data_source: str = ''
  passes: dict = dataclasses.field(default_factory=dict)    # name -> PassFigures
  eval_line: Line | None = None
  compile_seconds: float = 0.0
  chosen_chunk: int = 0          # the chunk in clients (clients_per_chunk, or all)

  def need(self) -> float | None:
    """need(chosen chunk) in bytes, per device (None without figures)."""
    if not self.passes:
      return None
    per_device = -(-self.clients // self.devices)
    return need_bytes(self.passes, sum(self.resident.values()), per_device,
                      self.chosen_chunk // self.devices)

  def record(self) -> dict:
    """The metrics.jsonl line: {'kind': 'sizing', ...} (bytes as integers)."""
    rec = {'kind': 'sizing', 'clients_per_chunk': self.chosen_chunk,
           'eval_batch_size': self.eval_batch_size, 'clients_per_round': self.clients,
           'devices': self.devices, 'limit_bytes': self.limit, 'limit_source': self.limit_source,
           'margin': self.margin,
           'budget_bytes': None if self.limit is None else int(self.limit * (1 - self.margin)),
           'resident_bytes': {k: int(v) for k, v in self.resident.items()},
           'data_counts_from': self.data_source}
    if self.passes:
      rec['passes'] = {k: {'fixed_bytes': int(p.footprint.fixed),
                           'per_client_bytes': int(p.footprint.slope),
                           'outputs_per_client_bytes': int(p.outputs_per_client)}
                       for k, p in self.passes.items()}
      rec['held_bytes'] = int(held_bytes(self.passes, -(-self.clients // self.devices),
                                         self.chosen_chunk // self.devices))
      rec['need_bytes'] = int(self.need())
    if self.eval_line is not None:
      rec['eval'] = {'fixed_bytes': int(self.eval_line.fixed),
                     'per_image_bytes': int(self.eval_line.slope)}
    rec['compile_seconds'] = round(self.compile_seconds, 2)
    return rec

  def line(self) -> str:
    """One line for the console."""
    gib = human
    if self.limit is None:
      return (f'sizing: no device memory limit known (backend reports none; set '
              f'{ENV_LIMIT}=24GiB to size): all {self.chosen_chunk} clients of a round in one '
              f'chunk, eval batch {self.eval_batch_size}')
    text = (f'sizing: limit {gib(self.limit)} ({self.limit_source}), margin '
            f'{100 * self.margin:.0f}%: {self.chosen_chunk} of {self.clients} clients per chunk')
    if self.passes:
      worst = max(self.passes, key=lambda k: self.passes[k].footprint.at(self.chosen_chunk))
      p = self.passes[worst].footprint
      text += (f' (need {gib(self.need())}: resident {gib(sum(self.resident.values()))}, '
               f'{worst} {gib(p.fixed)} + {gib(p.slope)} per client)')
    text += f', eval batch {self.eval_batch_size}'
    if self.eval_line is not None:
      text += f' ({gib(self.eval_line.slope)} per image)'
    return text + f'; probes compiled in {self.compile_seconds:.1f} s'


def size_run(c: ConfigDict, *, limit: str | int | None = None, margin: float = DEFAULT_MARGIN,
             devices: list | None = None, data: DataShapes | None = None,
             compile_fn: Callable[[Probe], Any] = compile_probe) -> Decision:
  """The chunk and evaluation batch of config c on `devices` (default: this
  process's view of the run's devices). Explicit config values are used as
  they are and nothing is compiled; 0 asks for sizing: with no limit known,
  all clients and EVAL_BATCH_MAX; else the run's programs are compiled from
  shapes. Raises ConfigError (one line) when not one client, or not one
  evaluation image, fits."""
  auto_chunk, auto_eval = c.clients_per_chunk == 0, c.eval_batch_size == 0
  if not (auto_chunk or auto_eval):
    return Decision(c.clients_per_chunk, c.eval_batch_size, automatic=False,
                    chosen_chunk=c.clients_per_chunk)
  devices = list(devices or jax.devices())
  n_dev = len(devices)
  local = [x for x in devices if x.process_index == jax.process_index()] or devices
  lim, source = device_memory_limit(local[0], limit)
  sequential = c.client_mode == 'sequential'
  method = methods.make_method(c.method, c)
  clients = clients_per_round(c, method)
  chunk = c.clients_per_chunk if not auto_chunk else -(-clients // n_dev) * n_dev
  eval_batch = c.eval_batch_size or EVAL_BATCH_MAX
  d = Decision(0 if auto_chunk else chunk, eval_batch, automatic=True, clients=clients,
               devices=n_dev, limit=lim, limit_source=source, margin=margin,
               chosen_chunk=chunk)
  if lim is None:
    return d
  s = run_shapes(c, data)
  d.resident, d.data_source = s.resident, s.data.source
  per_device = -(-clients // n_dev)
  resident, budget = sum(d.resident.values()), lim * (1 - margin)
  if resident > budget:   # nothing to compile: the data alone does not fit
    raise ConfigError(
        f'one client does not fit in device memory: the resident data, backbone and server '
        f'state alone need {human(resident)}, {human(budget)} usable ({human(lim)} limit from '
        f'{source}, less {100 * margin:.0f}% margin); use fewer or smaller images '
        f'(dataset.train_per_class, dataset.store_size) or a larger device')
  # An explicit chunk is used as it is: only an automatic one is probed. In
  # sequential mode every client of a round runs in one lax.map call.
  counts = () if not auto_chunk else (per_device,) if sequential else (1, per_device)
  evals = (8, EVAL_BATCH_MAX) if auto_eval else ()
  t0 = time.time()
  probed = _probe_figures(s, tuple(sorted(set(counts))), evals, compile_fn)
  d.compile_seconds = time.time() - t0
  if probed is None:   # the backend reports nothing: no automatic sizing
    return d
  figures, data_args = probed
  eval_figs = figures.pop('predict', None)
  d.passes = fit_passes(figures, data_args)
  why = (f'{human(lim)} limit from {source}, less {100 * margin:.0f}% margin; resident data, '
         f'backbone and server state {human(resident)}')
  if auto_chunk:
    _choose_chunk(d, sequential, per_device, resident, budget, why)
  if eval_figs:
    _choose_eval(d, s, eval_figs, resident, budget, why)
  return d


def _probe_figures(s: Shapes, counts: tuple[int, ...], evals: tuple[int, ...],
                   compile_fn: Callable[[Probe], Any]
                   ) -> tuple[dict[str, dict[int, dict]], dict[str, int]] | None:
  """({pass: {count: program bytes}}, {pass: resident data argument bytes})
  of the run's probes as compile_fn compiles them; None when the backend
  reports no memory figures."""
  figures: dict[str, dict[int, dict]] = {}
  data_args: dict[str, int] = {}
  for p in probes(s, counts, evals):
    pb = compile_fn(p)
    pb = pb if isinstance(pb, dict) else program_bytes(pb)
    if pb is None:
      return None
    figures.setdefault(p.name, {})[p.count] = pb
    data_args[p.name] = p.data_arguments
  return figures, data_args


def _choose_chunk(d: Decision, sequential: bool, per_device: int, resident: float,
                  budget: float, why: str) -> None:
  """Sets d's chunk from its fitted passes; ConfigError when none fits."""
  n_dev = d.devices
  if sequential:
    chosen = per_device * n_dev
    if need_bytes(d.passes, resident, per_device, per_device) > budget:
      chosen = 0
  else:
    chosen = choose_clients_per_chunk(d.limit, d.passes, clients=d.clients, resident=resident,
                                      devices=n_dev, margin=d.margin)
  if chosen == 0:
    one = need_bytes(d.passes, resident, per_device, 1 if not sequential else per_device)
    raise ConfigError(
        f'{"one client does" if not sequential else f"the {per_device} clients of a round do"}'
        f' not fit in device memory: {human(one)} needed, {human(budget)} usable ({why}); lower '
        f'batch_size, image_size or model.rank, use model.dtype=bfloat16'
        + (', client_mode=vmap' if sequential else '') + ' or a larger device')
  d.chosen_chunk = chosen
  d.clients_per_chunk = 0 if chosen >= per_device * n_dev else chosen


def _choose_eval(d: Decision, s: Shapes, eval_figs: dict[int, dict], resident: float,
                 budget: float, why: str) -> None:
  """Sets d's evaluation batch from the prediction probes; ConfigError when
  not one image fits."""
  test_bytes = s.data.num_test * int(np.prod(s.data.image_shape))
  d.eval_line = fit_line({b: footprint(pb, test_bytes) for b, pb in eval_figs.items()})
  d.eval_batch_size = choose_eval_batch(d.limit, d.eval_line, resident=resident, margin=d.margin)
  if d.eval_batch_size == 0:
    raise ConfigError(f'one evaluation image does not fit in device memory: '
                      f'{human(resident + d.eval_line.at(1))} needed, {human(budget)} usable '
                      f'({why}); lower image_size or use a larger device')

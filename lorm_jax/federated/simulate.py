"""The federated class-incremental simulation: one readable loop.

  setup       validate the config, load data and weights, split clients
  for task:   begin_task (fresh LoRA) ...
    for round:
      train     every participant from the server state
      grams     the Gram pass through the method's Gram-pass model
      stats     a method's per-client statistic, if any (Fisher, prototypes)
      merge     the method's server update (lorm: closed-form merges)
      save      metrics line + orbax checkpoint
    end_task  cross-task merge, evaluation on all seen classes, checkpoint
  results     results.json, plots

`federated_round` and `finish_task` are the two halves; every per-client
pass goes through `Passes` to `runner.ClientRunner.map_clients`, which alone
knows about jit, vmap or lax.map, chunks, padding and devices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from lorm_jax import checkpointing, metric_writers, metrics, plotting, runtime
from lorm_jax.errors import DivergenceError
from lorm_jax import rng
from lorm_jax.federated import batching, client, setup, sizing
from lorm_jax.methods import interface
from lorm_jax.federated.runner import ClientRunner
from lorm_jax.federated.setup import Experiment, build_experiment, validate_config
from lorm_jax.methods import ClientResults, GramRequest, Method
from lorm_jax.models import functional as F


class Passes:
  """The per-client passes of a round, each one `ClientRunner.map_clients` call.

  Every pass takes a batch plan (`plan`): per client idx/mask (S, B) into the
  training set and a PRNG key, drawn from (seed, purpose, task, round, client).
  """

  def __init__(self, exp: Experiment, runner: ClientRunner,
               sizing_decision: sizing.Decision | None = None):
    self.exp, self.runner = exp, runner
    # Sequential clients skip padded steps at run time, so every pass can use
    # the run's largest step count: one compilation for the whole run. Vmapped
    # clients compute padded steps, so they pad only to the pass's largest client.
    self._max_client = max(len(ix) for clients in exp.split for ix in clients)
    self._fixed_steps = runner.sequential
    # The chunk and evaluation batch chosen for the run (None: not sized).
    self.sizing = sizing_decision

  def plan(self, purpose: str, task: int, rnd: int, ids: np.ndarray, epochs: int
           ) -> tuple[dict, np.ndarray]:
    """({'idx', 'mask', 'key'} with a leading client axis, work per client)
    of the clients `ids` of a task: `epochs` shuffled passes over their data."""
    c = self.exp.config
    clients = [self.exp.split[task][i] for i in ids]
    steps = (batching.steps_per_epoch(self._max_client, c.batch_size) * epochs
             if self._fixed_steps else None)
    idx, mask = batching.client_batch_plan(
        clients, c.batch_size, epochs, lambda ci: rng.numpy_rng(c.seed, purpose, task, rnd, ids[ci]),
        num_steps=steps)
    keys = rng.client_keys(rng.key(c.seed, purpose, task, rnd), ids)
    filled = mask.sum(-1)  # a step that fits in half a batch costs about half
    work = np.where(filled > c.batch_size / 2, 1.0, np.where(filled > 0, 0.5, 0.0)).sum(-1)
    return {'idx': idx, 'mask': mask, 'key': keys}, work

  def training_plan(self, task: int, rnd: int, ids: np.ndarray) -> tuple[dict, np.ndarray]:
    """The local training's plan: `local_epochs` shuffled passes per client."""
    return self.plan('shuffle', task, rnd, ids, self.exp.config.local_epochs)

  def train(self, rplan: interface.RoundPlan, frozen: F.Flat, server: dict, plan: tuple,
            class_mask: jax.Array):
    """Local training of the plan's clients from the server's a, b, head (or
    the round plan's per-client values) -> (a, b, head, stats, state), each
    with a leading client axis."""
    return self.runner.map_clients(*self._train_call(rplan, frozen, server, plan, class_mask))

  def compile_train_ahead(self, rplan: interface.RoundPlan, frozen: F.Flat, server: dict,
                          plan: tuple, class_mask: jax.Array):
    """Starts compiling `train`'s program for these arguments in the
    background (`ClientRunner.compile_ahead`); returns the thread."""
    return self.runner.compile_ahead(*self._train_call(rplan, frozen, server, plan, class_mask))

  def _train_call(self, rplan: interface.RoundPlan, frozen: F.Flat, server: dict, plan: tuple,
                  class_mask: jax.Array) -> tuple:
    """map_clients' arguments (fn, shared, per_client, work) of local training."""
    exp, runner = self.exp, self.runner
    fn = runner.bind(client.local_train, exp.model, exp.method.forward, rplan.spec,
                     exp.preprocess_train, runner.half_batches)
    shared = dict(frozen=frozen, images=exp.train_images, labels=exp.train_labels,
                  class_mask=class_mask, aux=rplan.aux, ctx=rplan.ctx)
    shared.update({k: server[k] for k in ('a', 'b', 'head') if k not in rplan.client_params})
    per_client = {**plan[0], **rplan.client_params}
    if rplan.client_state is not None:
      per_client['state'] = rplan.client_state
    return fn, shared, per_client, plan[1]

  def grams(self, request: GramRequest, frozen: F.Flat, params: dict, plan: tuple,
            per_client: bool):
    """Per-client Grams through frozen + params; params {'a', 'b', 'head'} are
    the clients' own (leading client axis) or, per_client=False, the server's."""
    exp, runner = self.exp, self.runner
    fn = runner.bind(client.gram_pass, exp.model, exp.preprocess_train, request.backbone,
                     request.head, runner.half_batches)
    shared = dict(frozen=frozen, images=exp.train_images)
    clients = dict(plan[0])
    (clients if per_client else shared).update(params)
    return runner.map_clients(fn, shared, clients, work=plan[1])

  def stats(self, stat_fn: interface.StatFn, frozen: F.Flat, params: dict, plan: tuple,
            class_mask: jax.Array, aux, ctx):
    """stat_fn sums per client, with the clients' own params {'a', 'b', 'head'}."""
    exp, runner = self.exp, self.runner
    fn = runner.bind(client.stats_pass, exp.model, exp.method.forward, exp.preprocess_train,
                     stat_fn, runner.half_batches)
    shared = dict(frozen=frozen, aux=aux, ctx=ctx, images=exp.train_images,
                  labels=exp.train_labels, class_mask=class_mask)
    return runner.map_clients(fn, shared, {**plan[0], **params}, work=plan[1])

  def predict(self, frozen: F.Flat, a: F.Flat, b: F.Flat, head: F.Flat, ctx,
              idx: np.ndarray) -> jax.Array:
    """Logits (S, B, K) of the test images idx (S, B), the S batches spread over devices."""
    exp, runner = self.exp, self.runner
    fn = runner.bind(client.predict, exp.model, exp.method.forward, exp.preprocess_test)
    shared = dict(frozen=frozen, a=a, b=b, head=head, ctx=ctx, images=exp.test_images)
    return runner.map_clients(fn, shared, {'idx': idx[:, None]})[:, 0]


def comm_bytes_per_client(server: dict, rplan: interface.RoundPlan, model: F.FunctionalViT
                          ) -> tuple[int, int]:
  """(upload, download) bytes of one client in one round, float32.

  Download: the server's a, b and head (those the plan hands out per client
  instead count as the client's own, `_round_record`). Upload: the trained
  factor(s) but those the plan keeps on the client, the head, and the
  requested Grams (diagonals or full) and head Gram.
  """
  own = set(rplan.client_params)
  down = F.tree_size_bytes({k: server[k] for k in ('a', 'b', 'head') if k not in own})
  up = F.tree_size_bytes([server[f] for f in rplan.spec.factors if f not in rplan.kept_local])
  up += F.tree_size_bytes(server['head']) if rplan.spec.train_head else 0
  request = rplan.gram
  if request is not None:
    if request.backbone is not None:
      up += sum(4 * (n if request.backbone == 'diag' else n ** 2)
                for k, n in model.layer_inputs.items() if k in server['b'])
    if request.head:
      up += 4 * model.cfg.width ** 2
  return up, down


@dataclasses.dataclass
class RunMeta:
  """The JSON half of a checkpoint: where the run is and what it measured."""
  step: int = 0
  task: int = 0
  round: int = 0
  task_begun: bool = False
  acc_matrix: list = dataclasses.field(default_factory=list)
  acc_after_task: list = dataclasses.field(default_factory=list)
  metrics_lines: int = 0
  comm_up: int = 0
  comm_down: int = 0
  merge_fallbacks: int = 0
  wall_seconds: float = 0.0


def evaluate(exp: Experiment, passes: Passes, method: Method, server, task: int,
             eval_batch: int) -> tuple[float, np.ndarray]:
  """Accuracy on the test sets of tasks 0..task (logits restricted to seen classes);
  eval_batch 0: the one sizing chose (`Passes.sizing`)."""
  if eval_batch < 1:
    eval_batch = passes.sizing.eval_batch_size if passes.sizing else sizing.EVAL_BATCH_MAX
  deltas, a, b = method.eval_model(server, task)
  frozen = add_deltas(exp.params.frozen, deltas)
  seen = np.concatenate(exp.task_classes[:task + 1])
  test_idx = np.flatnonzero(np.isin(exp.test_labels_np, seen))
  n = len(test_idx)
  # Fixed-size batches, one per device and call: one compilation serves every task.
  group = len(passes.runner.devices)
  padded = np.zeros((-(-n // (eval_batch * group)) * group, eval_batch), np.int32)
  padded.reshape(-1)[:n] = test_idx
  ctx = method.forward_ctx(server, task)
  logits = [passes.predict(frozen, a, b, server['head'], ctx, padded[i:i + group])
            for i in range(0, len(padded), group)]
  logits = np.concatenate([x.reshape(-1, x.shape[-1])
                           for x in passes.runner.host(logits)])[:n]
  seen_mask = np.zeros(exp.num_classes, bool)
  seen_mask[seen] = True
  return metrics.seen_class_accuracy(logits, exp.test_labels_np[test_idx], seen_mask,
                                     exp.task_of_label, task + 1)


_add_kernel_deltas = jax.jit(F.add_kernel_deltas)


def add_deltas(frozen: F.Flat, deltas: F.Flat) -> F.Flat:
  """frozen with W0 + delta for every layer in deltas (frozen itself when none)."""
  return _add_kernel_deltas(frozen, deltas) if deltas else frozen


def run(config: ConfigDict, workdir: str, *, max_rounds: int | None = None,
        progress: bool = True, keep_checkpoints: int = 2) -> dict[str, Any]:
  """Runs (or resumes) the simulation in `workdir`; returns the results dict.

  max_rounds: stop after this many rounds in this call (for kill/resume tests);
  returns {} if stopped early. keep_checkpoints: how many of the newest
  checkpoints stay (0: all).
  """
  # In a multi-process run every process runs this loop; process 0 alone
  # holds the workdir and writes metrics, results and plots (checkpoints go
  # through orbax's multi-process save).
  primary = runtime.is_primary()
  lock = checkpointing.WorkdirLock(workdir) if primary else None
  try:
    return _run(config, workdir, lock, max_rounds, progress and primary, keep_checkpoints)
  finally:
    if lock is not None:
      lock.release()


def initial_server(exp: Experiment) -> dict:
  """The server state before the first task: the method's, from the head's
  and the first LoRA's draws of (seed, 'head_init') and (seed, 'lora_init', 0)."""
  c = exp.config
  head = F.init_head(rng.key(c.seed, 'head_init'), exp.model.cfg.width, exp.num_classes)
  return exp.method.init_server(exp.params, head, rng.key(c.seed, 'lora_init', 0))


def begin_task(exp: Experiment, server: dict, t: int) -> dict:
  """The server state at the start of task t (a method's fresh LoRA drawn
  from (seed, 'lora_init', t))."""
  return exp.method.begin_task(server, t, rng.key(exp.config.seed, 'lora_init', t))


def prepare(config: ConfigDict, workdir: str, lock: checkpointing.WorkdirLock | None = None,
            write: bool = False) -> tuple[Experiment, Passes]:
  """The run's static inputs (the method's task structure applied, data on
  every device) and its client passes.

  model.dtype 'auto' is resolved first (`setup.resolve_compute_dtype`);
  clients_per_chunk / eval_batch_size 0 are sized to the device, from
  shapes alone (`sizing.size_run`): a run that cannot fit one client stops
  with one line before any data loads or downloads; `write` prints the choice.
  """
  auto_dtype = config.model.dtype == 'auto'
  config = setup.resolve_compute_dtype(config)
  validate_config(config)
  decision = sizing.size_run(config)
  if auto_dtype and write:
    print(setup.compute_dtype_line(config), flush=True)
  if decision.automatic and write:
    print(decision.line(), flush=True)
  exp = _apply_task_structure(build_experiment(config, workdir, lock, write=write))
  runner = ClientRunner(config.client_mode, decision.clients_per_chunk)
  exp = _replicate_inputs(exp, runner)
  return exp, Passes(exp, runner, decision)


def _run(config: ConfigDict, workdir: str, lock: checkpointing.WorkdirLock | None,
         max_rounds: int | None, progress: bool, keep_checkpoints: int) -> dict[str, Any]:
  t_start = time.time()
  primary = lock is not None
  exp, passes = prepare(config, workdir, lock, write=primary)
  c, method, runner = exp.config, exp.method, passes.runner  # exp.config: model.dtype resolved
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=keep_checkpoints or None)
  log = metrics.MetricsLog(os.path.join(workdir, 'metrics.jsonl'), write=primary,
                           writers=metric_writers.Writers(c, workdir) if primary else None)
  say = tqdm.write if primary else (lambda _: None)

  server = initial_server(exp)
  meta = RunMeta()
  restored = ckpt.restore_newest_readable(server, warn=say)
  if restored is not None:
    server = jax.tree.map(jnp.asarray, restored[0])
    meta = RunMeta(**restored[1])
    del restored  # its host copy of the server state would otherwise live for the whole run
  server = runner.replicate(server)
  log.truncate(meta.metrics_lines)
  if passes.sizing.automatic and meta.metrics_lines == 0:  # a fresh start; a resume prints it
    log.write(passes.sizing.record())
  wall_before = meta.wall_seconds

  num_tasks, rounds = len(exp.task_classes), c.rounds
  bar = tqdm(total=num_tasks * rounds, initial=min(meta.task, num_tasks) * rounds + meta.round,
             unit='round', disable=not progress, desc=method.name, dynamic_ncols=True)
  rounds_this_call = 0

  def save():
    metrics.release_free_memory()
    meta.metrics_lines = log.lines
    meta.wall_seconds = wall_before + time.time() - t_start
    meta.step += 1
    ckpt.save(meta.step, server, dataclasses.asdict(meta))

  while meta.task < num_tasks:
    t = meta.task
    if not meta.task_begun:
      server = runner.replicate(begin_task(exp, server, t))
      meta.task_begun = True
    while meta.round < rounds:
      if max_rounds is not None and rounds_this_call >= max_rounds:
        bar.close()
        ckpt.close()
        log.close()
        return {}
      server, record = federated_round(exp, passes, server, t, meta.round,
                                       compile_ahead=rounds_this_call == 0)
      meta.comm_up += record['upload_bytes_per_client'] * len(record['clients'])
      meta.comm_down += record['download_bytes_per_client'] * len(record['clients'])
      meta.merge_fallbacks += record['merge_fallbacks']
      log.write(record)
      bar.set_postfix(task=t, steps=record.pop('_steps'), loss=f"{record['train_loss']:.3f}",
                      acc=f"{record['train_accuracy']:.3f}")
      bar.update(1)
      meta.round += 1
      rounds_this_call += 1
      save()

    t0 = time.time()
    server, upload = finish_task(exp, passes, server, t, progress)
    meta.comm_up += upload
    acc, per_task = evaluate(exp, passes, method, server, t, c.eval_batch_size)
    row = [float(x) for x in per_task] + [None] * (num_tasks - t - 1)
    meta.acc_matrix.append(row)
    meta.acc_after_task.append(acc)
    log.write({'kind': 'eval', 'task': t, 'accuracy': acc, 'per_task_accuracy': row[:t + 1],
               'seconds_end_task': round(time.time() - t0, 3),
               **{k: float(v) for k, v in method.task_record(server, t).items()}})
    say(f'[{method.name}] after task {t + 1}/{num_tasks}: accuracy on seen classes '
        f'{100 * acc:.2f}%')
    meta.task, meta.round, meta.task_begun = t + 1, 0, False
    save()

  bar.close()
  ckpt.close()
  log.close()
  results = _results(exp, c, meta, wall_before + time.time() - t_start)
  if primary:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
    plotting.write_plots(workdir, results)
  return results


def federated_round(exp: Experiment, passes: Passes, server: dict, t: int, r: int,
                    shuffle_round: int | None = None, compile_ahead: bool = False
                    ) -> tuple[dict, dict]:
  """One round of task t: the participants train from the server state as the
  method's `round_plan` says, run its Gram and statistics passes, and the
  server aggregates.

  shuffle_round: the round index whose shuffles local training draws (None:
  r itself; `experiments.replay_round` redraws them). compile_ahead: also
  start compiling the next round's training (`compile_next_round_ahead`; the
  loop asks in the first round it runs). Returns the new server
  state and the round's metrics record (the record's '_steps' is for the
  progress bar). Raises DivergenceError, before anything is saved, on a
  non-finite loss, Gram or merged state.
  """
  method, timer = exp.method, _Timer()
  class_mask = _class_mask(exp, t)
  sizes, ids = _participants(exp, t, r)
  rplan = method.round_plan(server, t, r, ids)
  if compile_ahead:
    compile_next_round_ahead(exp, passes, server, t, r, rplan.spec)

  with timer('train'):
    frozen_train = add_deltas(exp.params.frozen, rplan.train_deltas)
    train_plan = passes.training_plan(t, r if shuffle_round is None else shuffle_round, ids)
    a_c, b_c, head_c, stats, state = jax.block_until_ready(
        passes.train(rplan, frozen_train, server, train_plan, class_mask))
  stats = passes.runner.host(stats)
  _check_finite('training loss', stats['loss_sum'], t, r, clients=ids)
  trained = {'a': a_c, 'b': b_c, 'head': head_c}

  grams, head_grams = {}, None
  with timer('gram'):
    if rplan.gram is not None:
      grams, head_grams = jax.block_until_ready(passes.grams(
          rplan.gram, add_deltas(exp.params.frozen, rplan.gram_deltas),
          rplan.gram_params(trained), passes.plan('gram', t, r, ids, 1), per_client=True))
  _check_finite('Gram', passes.runner.host((grams, head_grams)), t, r, clients=ids)

  client_stats = None
  with timer('stats'):
    if rplan.stats is not None:
      client_stats = jax.block_until_ready(passes.stats(
          rplan.stats, frozen_train, trained, passes.plan('stats', t, r, ids, 1), class_mask,
          rplan.aux, rplan.ctx))

  with timer('merge'):
    rep = lambda x: passes.runner.replicate(jnp.asarray(x))
    results = ClientResults(a_c, b_c, head_c, grams, head_grams,
                            rep(np.array([sizes[i] for i in ids], np.float32)), client_stats,
                            client_ids=rep(np.asarray(ids, np.int32)), state=state)
    server, info = method.aggregate(server, results, t, r)
    server = jax.block_until_ready(passes.runner.replicate(server))
  _check_finite('merged server state', passes.runner.host(server), t, r)
  return server, _round_record(exp, t, r, ids, rplan, server, stats, client_stats, info, timer)


def compile_next_round_ahead(exp: Experiment, passes: Passes, server: dict, t: int, r: int,
                             spec: interface.LocalSpec) -> threading.Thread | None:
  """Starts compiling round r + 1's local training in the background when it
  trains otherwise than round r's `spec` (LoRM's A- and B-rounds: two
  programs), so that the two compile side by side
  (`ClientRunner.compile_ahead`). Shapes only: nothing is trained, drawn or
  placed. Returns the thread, or None."""
  if r + 1 >= exp.config.rounds:
    return None
  _, ids = _participants(exp, t, r + 1)
  nxt = exp.method.round_plan(server, t, r + 1, ids)
  if nxt.spec == spec:
    return None
  frozen = jax.eval_shape(F.add_kernel_deltas, exp.params.frozen, nxt.train_deltas)
  class_mask = _class_mask(exp, t)
  return passes.compile_train_ahead(nxt, frozen, server, passes.training_plan(t, r + 1, ids),
                                    class_mask)


def _round_record(exp: Experiment, t: int, r: int, ids: np.ndarray, rplan: interface.RoundPlan,
                  server: dict, stats: dict, client_stats: Any, info: dict, timer: '_Timer'
                  ) -> dict:
  """The round's metrics line: losses, bytes per client, seconds per phase, memory."""
  up, down = comm_bytes_per_client(server, rplan, exp.model)
  # what clients need besides a, b, head (their own values kept by the
  # clients themselves are not sent); what they upload besides their factors
  down += F.tree_size_bytes((rplan.train_deltas, rplan.aux, rplan.ctx))
  down += F.row_size_bytes({k: v for k, v in rplan.client_params.items()
                            if k not in rplan.kept_local})
  up += F.row_size_bytes(client_stats)
  seen = float(jnp.sum(stats['seen']))
  return {'kind': 'round', 'task': t, 'round': r, 'factors': ''.join(rplan.spec.factors),
          'clients': [int(i) for i in ids],
          'train_loss': float(jnp.sum(stats['loss_sum'])) / max(seen, 1.0),
          'train_accuracy': float(jnp.sum(stats['correct'])) / max(seen, 1.0),
          'upload_bytes_per_client': up, 'download_bytes_per_client': down,
          'merge_fallbacks': int(info.get('merge_fallbacks', 0)),
          'seconds_train': round(timer['train'], 3),
          'train_gflops': round(seen * metrics.vit_train_flops(exp.model.cfg)
                                / max(timer['train'], 1e-9) / 1e9, 1),
          'seconds_gram': round(timer['gram'], 3), 'seconds_stats': round(timer['stats'], 3),
          'seconds_merge': round(timer['merge'], 4),
          'seconds_round': round(timer.total(), 3), **metrics.memory_record(),
          '_steps': int(jnp.sum(stats['steps']))}


def finish_task(exp: Experiment, passes: Passes, server: dict, t: int,
                progress: bool = False) -> tuple[dict, int]:
  """After the last round of task t: the method's end-of-task Gram pass (by the
  last round's participants, with the server's factors), its cross-task
  merge and its server-side work (`after_task`, which may show a progress bar
  if `progress`). Returns the new server state and the bytes the clients
  uploaded."""
  c, method = exp.config, exp.method
  plan, task_grams, upload = method.task_end_plan(server, t), None, 0
  if plan is not None:
    _, ids = _participants(exp, t, c.rounds - 1)
    per_client, _ = passes.grams(plan.gram, add_deltas(exp.params.frozen, plan.deltas),
                                 plan.params, passes.plan('task_gram', t, 0, ids, 1),
                                 per_client=False)
    task_grams = jax.tree.map(lambda x: jnp.sum(x, axis=0), per_client)
    upload = len(ids) * F.row_size_bytes(per_client)
  _check_finite('end-of-task Gram', passes.runner.host(task_grams), t, c.rounds - 1)
  server = method.end_task(server, t, task_grams)
  backbone = interface.ServerBackbone(exp.model, exp.params.frozen, exp.preprocess_train,
                                      progress)
  server = passes.runner.replicate(
      method.after_task(server, t, backbone, rng.key(c.seed, 'after_task', t)))
  _check_finite('cross-task merge', passes.runner.host(server), t, c.rounds - 1)
  return server, upload


def _class_mask(exp: Experiment, t: int) -> jax.Array:
  """(num_classes,) bool: the classes of task t, which local training scores."""
  return jnp.asarray(np.isin(np.arange(exp.num_classes), exp.task_classes[t]))


def _participants(exp: Experiment, t: int, r: int) -> tuple[list[int], np.ndarray]:
  """(samples of every client in task t, ids of round r's participants): all
  clients holding data of the task at participation_rate 1, else the seeded
  draw; each participant keeps its own RNG streams."""
  c = exp.config
  sizes = [len(ix) for ix in exp.split[t]]
  return sizes, rng.participants(c.seed, t, r, sizes, c.participation_rate, c.clients_per_round)


class _Timer:
  """Wall seconds of named phases: `with timer('train'): ...`, then timer['train']."""

  def __init__(self):
    self._start, self._seconds = time.time(), {}

  @contextlib.contextmanager
  def __call__(self, name: str):
    t0 = time.time()
    yield
    self._seconds[name] = time.time() - t0

  def __getitem__(self, name: str) -> float:
    return self._seconds[name]

  def total(self) -> float:
    return time.time() - self._start


def _check_finite(what: str, tree: Any, task: int, rnd: int,
                  clients: np.ndarray | None = None) -> None:
  """Raises DivergenceError (one line: task, round, client) if any leaf of tree
  is not finite; called before the round is saved, so no NaN reaches a checkpoint.
  clients: the ids along the leaves' leading client axis; the first bad one is named."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
  bad = [x for x in leaves if not np.isfinite(x).all()]
  if not bad:
    return
  where = f'task {task}, round {rnd}'
  if clients is not None:
    rows = sorted({int(c) for x in bad
                   for c in np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(1))})
    rows = [i for i in rows if i < len(clients)]  # padded clients carry no data
    if rows:
      where += f', client {int(clients[rows[0]])}' + (
          f' (and {len(rows) - 1} more)' if len(rows) > 1 else '')
  raise DivergenceError(f'non-finite {what} at {where}: the run diverged (a learning rate too '
                        'large?); nothing of this round was saved, the newest checkpoint holds the '
                        'last good one')


def _replicate_inputs(exp: Experiment, runner: ClientRunner) -> Experiment:
  """The data and parameters every pass reads, replicated over the devices once."""
  rep, p = runner.replicate, exp.params
  return dataclasses.replace(
      exp, params=F.Params(rep(p.frozen), rep(p.a), rep(p.b), rep(p.head)),
      train_images=rep(exp.train_images), train_labels=rep(exp.train_labels),
      test_images=rep(exp.test_images))


def _apply_task_structure(exp: Experiment) -> Experiment:
  """The method's grouping of tasks and clients (`Method.task_structure`)."""
  task_classes, split = exp.method.task_structure(exp.task_classes, exp.split)
  if task_classes is exp.task_classes and split is exp.split:
    return exp
  task_of_label = np.zeros(exp.num_classes, np.int32)
  for t, cls in enumerate(task_classes):
    task_of_label[cls] = t
  return dataclasses.replace(exp, task_classes=task_classes, split=split,
                             task_of_label=task_of_label)


def _results(exp: Experiment, c: ConfigDict, meta: RunMeta, wall: float) -> dict[str, Any]:
  t = len(meta.acc_matrix)
  acc = np.array([[np.nan if v is None else v for v in row] for row in meta.acc_matrix])
  return {
      'method': c.method, 'dataset': c.dataset.name, 'beta': c.beta, 'seed': c.seed,
      'num_tasks': t, 'num_clients': len(exp.split[0]), 'rounds': c.rounds,
      'local_epochs': c.local_epochs,
      'final_accuracy': meta.acc_after_task[-1],
      'accuracy_per_task_end': meta.acc_after_task,
      'accuracy_matrix': meta.acc_matrix,
      'per_task_accuracy': meta.acc_matrix[-1],
      'forgetting': metrics.forgetting(acc),
      'comm_bytes_total': meta.comm_up + meta.comm_down,
      'comm_bytes_upload': meta.comm_up, 'comm_bytes_download': meta.comm_down,
      'merge_fallbacks': meta.merge_fallbacks,
      'wall_seconds': wall,
      'devices': f'{jax.device_count()} x {jax.devices()[0].platform}',
      'machine': runtime.machine(),
      'adapter': c.model.adapter, 'compute_dtype': c.model.dtype,
  }

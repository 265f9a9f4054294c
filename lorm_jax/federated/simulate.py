"""The federated class-incremental simulation: one readable loop.

  setup       validate the config, load data and weights, split clients
  for task:   begin_task (fresh LoRA) ...
    for round:
      train     every client from the server state, vmapped over clients
      grams     the Gram pass through the method's Gram-pass model
      stats     a method's per-client statistic, if any (Fisher, prototypes)
      merge     the method's server update (lorm: closed-form merges)
      save      metrics line + orbax checkpoint
    end_task  cross-task merge, evaluation on all seen classes, checkpoint
  results     results.json, plots

Clients are processed in chunks of `clients_per_chunk` (padded with empty
clients), each chunk one jitted vmapped call; with several devices the client
axis of every chunk is sharded over a `clients` mesh axis and the frozen
backbone is replicated.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from lorm_jax import checkpointing, metrics, plotting
from lorm_jax.errors import DivergenceError
from lorm_jax.federated import batching, client, rng
from lorm_jax.federated.setup import Experiment, build_experiment
from lorm_jax.methods import ClientResults, GramRequest, Method
from lorm_jax.models import functional as F


class ClientRunner:
  """Jitted, vmapped, chunked and (optionally) sharded client computations."""

  def __init__(self, exp: Experiment, clients_per_chunk: int, mode: str = 'vmap'):
    self.exp = exp
    self.model = exp.model
    n_dev = jax.device_count()
    sequential = mode == 'sequential'
    self.mesh = Mesh(np.array(jax.devices()), ('clients',)) if n_dev > 1 and not sequential else None
    num_clients = max(len(clients) for clients in exp.split)  # 1 for a central method
    chunk = max(1, min(clients_per_chunk, num_clients))
    self.chunk = num_clients if sequential else -(-chunk // n_dev) * n_dev
    model, pre_train, pre_test = exp.model, exp.preprocess_train, exp.preprocess_test
    forward = exp.method.forward

    def over_clients(fn, in_axes, *args):
      """vmap over the client axis, or (sequential) lax.map, which really skips
      padded steps because their lax.cond is not turned into a select."""
      if not sequential:
        return jax.vmap(fn, in_axes=in_axes)(*args)
      per_client = tuple(x for x, ax in zip(args, in_axes) if ax == 0)
      def one(xs):
        it = iter(xs)
        return fn(*(next(it) if ax == 0 else x for x, ax in zip(args, in_axes)))
      return jax.lax.map(one, per_client)

    @functools.partial(jax.jit, static_argnames=('spec',))
    def train(spec, frozen, a, b, head, images, labels, idx, mask, keys, class_mask, aux, ctx):
      fn = functools.partial(client.local_train, model, forward, spec, pre_train)
      return over_clients(fn, (None,) * 6 + (0, 0, 0, None, None, None), frozen, a, b, head,
                          images, labels, idx, mask, keys, class_mask, aux, ctx)

    @functools.partial(jax.jit, static_argnames=('stat_fn',))
    def stats(stat_fn, frozen, a, b, head, aux, ctx, images, labels, idx, mask, keys,
              class_mask):
      fn = functools.partial(client.stats_pass, model, forward, pre_train, stat_fn)
      return over_clients(fn, (None, 0, 0, 0, None, None, None, None, 0, 0, 0, None), frozen,
                          a, b, head, aux, ctx, images, labels, idx, mask, keys, class_mask)

    @functools.partial(jax.jit, static_argnames=('gram_mode', 'head_gram', 'shared'))
    def grams(gram_mode, head_gram, shared, frozen, a, b, head, b_scale, images, idx, mask, keys):
      fn = functools.partial(client.gram_pass, model, pre_train, gram_mode, head_gram)
      b = jax.tree.map(lambda x: x * b_scale, b)
      ax = None if shared else 0
      return over_clients(fn, (None, ax, ax, ax, None, 0, 0, 0),
                          frozen, a, b, head, images, idx, mask, keys)

    self._train, self._grams, self._stats = train, grams, stats
    self.predict = jax.jit(functools.partial(client.predict, model, forward, pre_test))
    self.add_deltas = jax.jit(F.add_kernel_deltas)

  def _shard(self, *arrays):
    if self.mesh is None:
      return arrays
    sharding = NamedSharding(self.mesh, PartitionSpec('clients'))
    return tuple(jax.device_put(x, sharding) for x in arrays)

  def _chunks(self, idx: np.ndarray, mask: np.ndarray, keys: jax.Array):
    idx, mask = batching.pad_clients(idx, mask, self.chunk)
    pad = idx.shape[0] - keys.shape[0]
    if pad:
      keys = jnp.concatenate([keys, jax.random.split(jax.random.key(0), pad)])
    for c0 in range(0, idx.shape[0], self.chunk):
      sl = slice(c0, c0 + self.chunk)
      yield self._shard(jnp.asarray(idx[sl]), jnp.asarray(mask[sl]), keys[sl])

  @staticmethod
  def _concat(parts):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)

  def train(self, spec: client.LocalSpec, frozen, server, idx, mask, keys, class_mask, aux,
            ctx):
    parts = []
    for cidx, cmask, ckeys in self._chunks(idx, mask, keys):
      parts.append(self._train(spec, frozen, server['a'], server['b'], server['head'],
                               self.exp.train_images, self.exp.train_labels, cidx, cmask,
                               ckeys, class_mask, aux, ctx))
    return self._concat(parts)

  def stats(self, stat_fn: client.StatFn, frozen, a, b, head, aux, ctx, idx, mask, keys,
            class_mask):
    """Per-client stat_fn sums with the clients' own a/b/head (leading axis C)."""
    parts = []
    for i, (cidx, cmask, ckeys) in enumerate(self._chunks(idx, mask, keys)):
      sl = slice(i * self.chunk, (i + 1) * self.chunk)
      ca, cb, ch = (jax.tree.map(lambda x: x[sl], t) for t in (a, b, head))
      parts.append(self._stats(stat_fn, frozen, ca, cb, ch, aux, ctx, self.exp.train_images,
                               self.exp.train_labels, cidx, cmask, ckeys, class_mask))
    return self._concat(parts)

  def grams(self, request: GramRequest, frozen, a, b, head, b_scale, idx, mask, keys,
            shared: bool):
    """Per-client Grams; `shared` means a/b/head are the server's (no client axis)."""
    parts = []
    for i, (cidx, cmask, ckeys) in enumerate(self._chunks(idx, mask, keys)):
      if shared:
        ca, cb, ch = a, b, head
      else:
        sl = slice(i * self.chunk, (i + 1) * self.chunk)
        ca, cb, ch = (jax.tree.map(lambda x: x[sl], t) for t in (a, b, head))
      parts.append(self._grams(request.backbone, request.head, shared, frozen, ca, cb, ch,
                               b_scale, self.exp.train_images, cidx, cmask, ckeys))
    return self._concat(parts)


def _pad_clients_tree(tree, num: int):
  """Pads leaves (C, ...) to (num, ...) with zeros (empty clients)."""
  def pad(x):
    extra = num - x.shape[0]
    return x if extra == 0 else jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
  return jax.tree.map(pad, tree)


def comm_bytes_per_client(server: dict, spec: client.LocalSpec, request: GramRequest | None,
                          model: F.FunctionalViT) -> tuple[int, int]:
  """(upload, download) bytes of one client in one round, float32.

  Download: the server's a, b and head. Upload: the trained factor(s), the
  head, and the requested Grams (diagonals or full) and head Gram.
  """
  down = F.tree_size_bytes({'a': server['a'], 'b': server['b'], 'head': server['head']})
  up = F.tree_size_bytes([server[f] for f in spec.factors])
  up += F.tree_size_bytes(server['head']) if spec.train_head else 0
  if request is not None:
    if request.backbone is not None:
      up += sum(4 * (a.shape[0] if request.backbone == 'diag' else a.shape[0] ** 2)
                for a in server['a'].values())
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


def evaluate(exp: Experiment, runner: ClientRunner, method: Method, server, task: int,
             eval_batch: int) -> tuple[float, np.ndarray]:
  """Accuracy on the test sets of tasks 0..task (logits restricted to seen classes)."""
  deltas, a, b = method.eval_model(server, task)
  frozen = runner.add_deltas(exp.params.frozen, deltas) if deltas else exp.params.frozen
  seen = np.concatenate(exp.task_classes[:task + 1])
  test_idx = np.flatnonzero(np.isin(exp.test_labels_np, seen))
  n = len(test_idx)
  padded = np.zeros(-(-n // eval_batch) * eval_batch, np.int32)
  padded[:n] = test_idx
  # Fixed-size batches, one at a time: a single compilation serves every task.
  ctx = method.forward_ctx(server, task)
  logits = [runner.predict(frozen, a, b, server['head'], ctx, exp.test_images,
                           jnp.asarray(padded[i:i + eval_batch])[None])
            for i in range(0, len(padded), eval_batch)]
  logits = np.concatenate([np.asarray(x).reshape(-1, x.shape[-1]) for x in logits])[:n]
  seen_mask = np.zeros(exp.num_classes, bool)
  seen_mask[seen] = True
  return metrics.seen_class_accuracy(logits, exp.test_labels_np[test_idx], seen_mask,
                                     exp.task_of_label, task + 1)


def run(config: ConfigDict, workdir: str, *, max_rounds: int | None = None,
        progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) the simulation in `workdir`; returns the results dict.

  max_rounds: stop after this many rounds in this call (for kill/resume tests);
  returns {} if stopped early.
  """
  lock = checkpointing.WorkdirLock(workdir)
  try:
    return _run(config, workdir, lock, max_rounds, progress)
  finally:
    lock.release()


def _run(config: ConfigDict, workdir: str, lock: checkpointing.WorkdirLock,
         max_rounds: int | None, progress: bool) -> dict[str, Any]:
  t_start = time.time()
  exp = _apply_task_structure(build_experiment(config, workdir, lock))
  c = config
  method = exp.method
  runner = ClientRunner(exp, c.clients_per_chunk, c.client_mode)
  ckpt = checkpointing.Checkpointer(workdir)
  log = metrics.MetricsLog(os.path.join(workdir, 'metrics.jsonl'))

  server = method.init_server(exp.params, F.init_head(rng.key(c.seed, 'head_init'),
                                                      exp.model.cfg.width, exp.num_classes),
                              rng.key(c.seed, 'lora_init', 0))
  meta = RunMeta()
  restored = ckpt.restore_newest_readable(server, warn=tqdm.write)
  if restored is not None:
    server = jax.tree.map(jnp.asarray, restored[0])
    meta = RunMeta(**restored[1])
  log.truncate(meta.metrics_lines)
  wall_before = meta.wall_seconds

  num_tasks, rounds = len(exp.task_classes), c.rounds
  bar = tqdm(total=num_tasks * rounds, initial=min(meta.task, num_tasks) * rounds + meta.round,
             unit='round', disable=not progress, desc=method.name, dynamic_ncols=True)
  rounds_this_call = 0
  # Sequential clients skip padded steps at run time, so every round can use the
  # run's largest step count: one compilation for the whole run. Vmapped clients
  # compute padded steps, so they pad only to the round's largest client.
  max_client = max(len(ix) for clients in exp.split for ix in clients)
  fixed_steps = lambda epochs: (batching.steps_per_epoch(max_client, c.batch_size) * epochs
                                if c.client_mode == 'sequential' else None)

  def save():
    meta.metrics_lines = log.lines
    meta.wall_seconds = wall_before + time.time() - t_start
    meta.step += 1
    ckpt.save(meta.step, server, dataclasses.asdict(meta))

  while meta.task < num_tasks:
    t = meta.task
    class_mask = jnp.asarray(np.isin(np.arange(exp.num_classes), exp.task_classes[t]))
    sizes_t = [len(ix) for ix in exp.split[t]]
    if not meta.task_begun:
      server = method.begin_task(server, t, rng.key(c.seed, 'lora_init', t))
      meta.task_begun = True

    # ---- rounds ----------------------------------------------------------
    while meta.round < rounds:
      if max_rounds is not None and rounds_this_call >= max_rounds:
        bar.close()
        ckpt.close()
        return {}
      r = meta.round
      t0 = time.time()
      # Client sampling: the round's participants (all clients holding data of
      # the task at participation_rate 1); each keeps its own RNG streams.
      ids = rng.participants(c.seed, t, r, sizes_t, c.participation_rate)
      clients_t = [exp.split[t][i] for i in ids]
      num_samples = np.array([sizes_t[i] for i in ids], np.float32)
      spec = method.local_spec(t, r)
      idx, mask = batching.client_batch_plan(
          clients_t, c.batch_size, c.local_epochs,
          lambda ci: rng.numpy_rng(c.seed, 'shuffle', t, r, ids[ci]),
          num_steps=fixed_steps(c.local_epochs))
      keys = rng.client_keys(rng.key(c.seed, 'train', t, r), ids)
      deltas = method.train_deltas(server, t)
      frozen_train = runner.add_deltas(exp.params.frozen, deltas) if deltas else exp.params.frozen
      aux, ctx = method.train_aux(server, t), method.forward_ctx(server, t)
      a_c, b_c, head_c, stats = runner.train(spec, frozen_train, server, idx, mask, keys,
                                             class_mask, aux, ctx)
      jax.block_until_ready(head_c)
      t_train = time.time() - t0
      _check_finite('training loss', stats['loss_sum'], t, r, clients=ids)

      request = method.gram_request(t, r)
      grams, head_grams = {}, None
      t1 = time.time()
      if request is not None:
        gdeltas, b_scale = method.gram_model(server, t)
        frozen_gram = runner.add_deltas(exp.params.frozen, gdeltas) if gdeltas else exp.params.frozen
        gidx, gmask = batching.client_batch_plan(
            clients_t, c.batch_size, 1, lambda ci: rng.numpy_rng(c.seed, 'gram', t, r, ids[ci]),
            num_steps=fixed_steps(1))
        gkeys = rng.client_keys(rng.key(c.seed, 'gram', t, r), ids)
        grams, head_grams = runner.grams(request, frozen_gram, a_c, b_c, head_c, b_scale,
                                         gidx, gmask, gkeys, shared=False)
      jax.block_until_ready(grams)
      t_gram = time.time() - t1
      _check_finite('Gram', (grams, head_grams), t, r, clients=ids)
      t4 = time.time()
      stat_fn, client_stats = method.stats_request(t, r), None
      if stat_fn is not None:
        sidx, smask = batching.client_batch_plan(
            clients_t, c.batch_size, 1, lambda ci: rng.numpy_rng(c.seed, 'stats', t, r, ids[ci]),
            num_steps=fixed_steps(1))
        skeys = rng.client_keys(rng.key(c.seed, 'stats', t, r), ids)
        client_stats = runner.stats(stat_fn, frozen_train, a_c, b_c, head_c, aux, ctx, sidx,
                                    smask, skeys, class_mask)
      jax.block_until_ready(client_stats)
      t_stats = time.time() - t4

      t2 = time.time()
      n_pad = jax.tree.leaves(head_c)[0].shape[0]
      weights = jnp.asarray(np.pad(num_samples, (0, n_pad - len(num_samples))))
      results = ClientResults(a_c, b_c, head_c, grams, head_grams, weights, client_stats)
      server, info = method.aggregate(server, results, t, r)
      jax.block_until_ready(server)
      t_merge = time.time() - t2
      _check_finite('merged server state', server, t, r)

      up, down = comm_bytes_per_client(server, spec, request, exp.model)
      down += F.tree_size_bytes((deltas, aux, ctx))  # what clients need besides a, b, head
      up += F.tree_size_bytes(jax.tree.map(lambda x: x[0], client_stats))
      meta.comm_up += up * len(clients_t)
      meta.comm_down += down * len(clients_t)
      fallbacks = int(info.get('merge_fallbacks', 0))
      meta.merge_fallbacks += fallbacks
      seen = float(jnp.sum(stats['seen']))
      record = {'kind': 'round', 'task': t, 'round': r, 'factors': ''.join(spec.factors),
                'clients': [int(i) for i in ids],
                'train_loss': float(jnp.sum(stats['loss_sum'])) / max(seen, 1.0),
                'train_accuracy': float(jnp.sum(stats['correct'])) / max(seen, 1.0),
                'upload_bytes_per_client': up, 'download_bytes_per_client': down,
                'merge_fallbacks': fallbacks, 'seconds_train': round(t_train, 3),
                'train_gflops': round(seen * metrics.vit_train_flops(exp.model.cfg)
                                      / max(t_train, 1e-9) / 1e9, 1),
                'seconds_gram': round(t_gram, 3), 'seconds_stats': round(t_stats, 3),
                'seconds_merge': round(t_merge, 4),
                'seconds_round': round(time.time() - t0, 3), **metrics.memory_record()}
      log.write(record)
      bar.set_postfix(task=t, steps=int(jnp.sum(stats['steps'])),
                      loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
      bar.update(1)
      meta.round += 1
      rounds_this_call += 1
      save()

    # ---- end of task: cross-task merge and evaluation --------------------
    t3 = time.time()
    request = method.end_task_gram_request()
    task_grams = None
    if request is not None:  # by the last round's participants
      ids = rng.participants(c.seed, t, rounds - 1, sizes_t, c.participation_rate)
      clients_t = [exp.split[t][i] for i in ids]
      gdeltas, b_scale = method.gram_model(server, t)
      frozen_gram = runner.add_deltas(exp.params.frozen, gdeltas) if gdeltas else exp.params.frozen
      gidx, gmask = batching.client_batch_plan(
          clients_t, c.batch_size, 1, lambda ci: rng.numpy_rng(c.seed, 'task_gram', t, 0, ids[ci]),
          num_steps=fixed_steps(1))
      gkeys = rng.client_keys(rng.key(c.seed, 'task_gram', t), ids)
      per_client, _ = runner.grams(request, frozen_gram, server['a'], server['b'],
                                   server['head'], b_scale, gidx, gmask, gkeys, shared=True)
      task_grams = jax.tree.map(lambda x: jnp.sum(x, axis=0), per_client)
      meta.comm_up += len(clients_t) * F.tree_size_bytes(
          jax.tree.map(lambda x: x[0], per_client))
    _check_finite('end-of-task Gram', task_grams, t, rounds - 1)
    server = method.end_task(server, t, task_grams)
    _check_finite('cross-task merge', server, t, rounds - 1)
    acc, per_task = evaluate(exp, runner, method, server, t, c.eval_batch_size)
    row = [float(x) for x in per_task] + [None] * (num_tasks - t - 1)
    meta.acc_matrix.append(row)
    meta.acc_after_task.append(acc)
    log.write({'kind': 'eval', 'task': t, 'accuracy': acc, 'per_task_accuracy': row[:t + 1],
               'seconds_end_task': round(time.time() - t3, 3)})
    tqdm.write(f'[{method.name}] after task {t + 1}/{num_tasks}: accuracy on seen classes '
               f'{100 * acc:.2f}%')
    meta.task, meta.round, meta.task_begun = t + 1, 0, False
    save()

  bar.close()
  ckpt.close()
  results = _results(exp, c, meta, wall_before + time.time() - t_start)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  plotting.write_plots(workdir, results)
  return results


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
  }

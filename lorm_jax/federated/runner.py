"""One per-client pure function over a round's clients (FedJAX's `for_each_client`).

  out = runner.map_clients(fn, shared, per_client, work=steps)

`fn(**shared, **client)` handles ONE client: `shared` holds what every client
sees (the frozen backbone, the dataset, the server's factors), `per_client`
holds arrays with a leading client axis C (batch plans, keys, a client's own
factors); names, not positions, line them up. The result is fn's output
stacked over the C clients, in their order. The runner alone knows about jit,
padding, chunks and devices:

  vmap        a chunk of `clients_per_chunk` clients in one batched step
              (the accelerator mode; 0: all of them); padded steps are computed
              and discarded. `sizing.py` chooses the chunk from the device's memory.
  sequential  all clients in one call, one after another (`lax.map`); a step
              without samples is skipped (its `lax.cond` stays a branch), so
              uneven clients cost only their own steps (the CPU mode).

With several devices the client axis of each call is sharded over a 1-D
`clients` mesh (`shard_map`; shared inputs replicated, `replicate`), and so
are the outputs. In sequential mode the clients are first ordered so that
every device gets about the same number of steps (`balanced_order`), and the
outputs are put back in order.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CLIENT_MODES = ('vmap', 'sequential')

# Programs a pass leaves queued on the devices before it waits for the oldest.
# XLA:CPU launches and runs the programs of several CPU devices on one thread
# pool with as many threads as devices (or cores), and a launch holds its
# thread while its device already has 32 unfinished programs. A long queue
# behind a slow program, with one that holds a cross-device collective, can
# so leave every thread waiting: one at the collective for a device whose
# share cannot launch, the other at that launch, and none free to run the
# queue. Seen as a 2-device smoke run stuck for 10 minutes (CI), when every
# output array was reordered by its own eager gather (an all-to-all) queued
# behind the training pass; hence also `_stitch`, one program for them all.
MAX_UNFINISHED_CALLS = 2


def balanced_order(work: np.ndarray, groups: int) -> np.ndarray:
  """Clients laid out in `groups` consecutive blocks of equal length whose summed
  work is as even as longest-first assignment makes it.

  Returns indices into range(len(work)); -1 marks an empty padding client
  (work 0), added so that every block has the same length.
  """
  work = np.asarray(work, np.float64)
  blocks = [[] for _ in range(groups)]
  load = np.zeros(groups)
  for i in np.argsort(-work, kind='stable'):
    g = int(np.argmin(load))
    blocks[g].append(int(i))
    load[g] += work[i]
  width = max(1, max(len(b) for b in blocks))
  return np.array([i for b in blocks for i in sorted(b) + [-1] * (width - len(b))], np.int64)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  """x (C, ...) -> (rows, ...): zeros (an empty client: mask 0), or copies of
  the first key for PRNG key arrays (zeros are not keys)."""
  extra = rows - x.shape[0]
  if extra == 0:
    return x
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jnp.concatenate([x, jnp.repeat(x[:1], extra)])
  return jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])


def _put(tree: Any, sharding: NamedSharding) -> Any:
  """jax.device_put(tree, sharding). With several processes, an array held by
  this process alone goes through the host (every process computed the same
  value), as multi-process JAX places only host data or global arrays."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and x.is_fully_addressable:
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = one(np.asarray(jax.random.key_data(x)))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
      x = np.asarray(x)
    return jax.device_put(x, sharding)
  return jax.tree.map(one, tree)


class ClientRunner:
  """Jitted per-client passes, vmapped or mapped, chunked and sharded."""

  def __init__(self, mode: str, clients_per_chunk: int,
               devices: list[jax.Device] | None = None):
    if mode not in CLIENT_MODES:
      raise ValueError(f'unknown client_mode {mode!r}; expected one of {CLIENT_MODES}')
    self.sequential = mode == 'sequential'
    self.devices = list(devices or jax.devices())
    self.mesh = (Mesh(np.array(self.devices), ('clients',)) if len(self.devices) > 1
                 else None)
    self.clients_per_chunk = clients_per_chunk
    self._call = jax.jit(self._over_clients, static_argnums=0)
    self._bound: dict[tuple, Callable] = {}
    self._ahead: dict[tuple, tuple[threading.Thread, list]] = {}  # compile_ahead's programs

  def bind(self, fn: Callable, *args: Any) -> Callable:
    """functools.partial(fn, *args), the same object for equal arguments, so a
    pass rebuilt every round hits the jit cache (args must be hashable)."""
    key = (fn,) + args
    if key not in self._bound:
      self._bound[key] = functools.partial(fn, *args)
    return self._bound[key]

  @property
  def half_batches(self) -> bool:
    """Whether per-client passes may run a half-empty batch at half size (a
    real branch only when clients run sequentially; under vmap it would
    compute both sizes)."""
    return self.sequential

  def _over_clients(self, fn: Callable, shared: dict, per_client: dict) -> Any:
    def local(shared, per_client):
      one = lambda client: fn(**shared, **client)
      return jax.lax.map(one, per_client) if self.sequential else jax.vmap(one)(per_client)
    if self.mesh is None:
      return local(shared, per_client)
    return jax.shard_map(local, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec('clients')),
                         out_specs=PartitionSpec('clients'), check_vma=False)(shared, per_client)

  def replicate(self, tree: Any) -> Any:
    """tree with every array replicated over the devices (unchanged on one
    device). The server state lives so: its merges then see the same
    shardings every round (one compilation each), and their sums over the
    sharded client axis are cross-device reductions."""
    if self.mesh is None:
      return tree
    return _put(tree, NamedSharding(self.mesh, PartitionSpec()))

  def host(self, tree: Any) -> Any:
    """tree as numpy arrays; arrays sharded over several processes are
    gathered first (a process can only read what it holds)."""
    def one(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))
      return np.asarray(x)
    return jax.tree.map(one, tree)

  def _place(self, per_client: dict) -> dict:
    if self.mesh is None:
      return per_client
    return _put(per_client, NamedSharding(self.mesh, PartitionSpec('clients')))

  def chunk_size(self, num_clients: int) -> int:
    """Clients per call: all of them (sequential, or clients_per_chunk 0) or
    clients_per_chunk, rounded up to a multiple of the device count."""
    n_dev = len(self.devices)
    chunk = (num_clients if self.sequential or self.clients_per_chunk < 1
             else min(self.clients_per_chunk, num_clients))
    return -(-max(chunk, 1) // n_dev) * n_dev

  def _layout(self, num: int, work: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(order, chunk) of a call over `num` clients: the client index of every
    row of every chunk (`num` for an empty padding client), and the chunk size."""
    if self.sequential and self.mesh is not None and work is not None:
      order = balanced_order(work, len(self.devices))
    else:
      order = np.arange(num)
    chunk = self.chunk_size(len(order))
    order = np.concatenate([order, np.full(-len(order) % chunk, -1)])
    return np.where(order < 0, num, order), chunk

  def map_clients(self, fn: Callable, shared: dict, per_client: dict,
                  work: np.ndarray | None = None) -> Any:
    """fn(**shared, **client) for every client along per_client's leading axis.

    fn must be hashable and stable across calls (it is a static jit argument;
    build it once, e.g. with `bind`). work (C,): per-client cost, used to
    balance devices in sequential mode. Returns fn's outputs stacked over the
    C clients, in order.
    """
    num = jax.tree.leaves(per_client)[0].shape[0]
    order, chunk = self._layout(num, work)
    padded = jax.tree.map(lambda x: _pad_rows(jnp.asarray(x), num + 1)[order], per_client)
    shared = self.replicate(shared)  # fixed input shardings: one compilation per pass
    parts = []
    for c0 in range(0, len(order), chunk):
      if len(parts) >= MAX_UNFINISHED_CALLS:
        jax.block_until_ready(parts[-MAX_UNFINISHED_CALLS])
      parts.append(self._run(fn, shared,
                             self._place(jax.tree.map(lambda x: x[c0:c0 + chunk], padded))))
    if len(parts) == 1 and np.array_equal(order, np.arange(num)):
      return parts[0]
    position = np.empty(num, np.int32)
    real = order < num
    position[order[real]] = np.flatnonzero(real)
    return _stitch(parts, position)

  def compile_ahead(self, fn: Callable, shared: dict, per_client: dict,
                    work: np.ndarray | None = None) -> threading.Thread:
    """Compiles the program `map_clients(fn, shared, per_client, work)` would
    run, in a background thread, from the arguments' shapes alone (nothing is
    placed or computed); map_clients then runs the compiled program (waiting
    for the thread if it is still compiling). Compiling is single-threaded on
    the CPU: started while this thread compiles or trains, it uses a core
    that would otherwise wait. Returns the started thread."""
    num = jax.tree.leaves(per_client)[0].shape[0]
    _, chunk = self._layout(num, work)
    spread = NamedSharding(self.mesh, PartitionSpec('clients')) if self.mesh else None
    whole = NamedSharding(self.mesh, PartitionSpec()) if self.mesh else None

    def abstract(x, sharding, rows=None):
      x = x if hasattr(x, 'dtype') else jnp.asarray(x)
      shape = x.shape if rows is None else (rows,) + tuple(x.shape[1:])
      return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding,
                                  weak_type=getattr(x, 'weak_type', False))

    shared_s = jax.tree.map(lambda x: abstract(x, whole), shared)
    clients_s = jax.tree.map(lambda x: abstract(x, spread, chunk), per_client)
    done: list = []

    def compile_it():
      try:
        done.append(self._call.lower(fn, shared_s, clients_s).compile())
      except Exception:  # pylint: disable=broad-except
        pass  # the call compiles it again and reports what went wrong

    thread = threading.Thread(target=compile_it, name='compile_ahead', daemon=True)
    self._ahead[_signature(fn, shared_s, clients_s)] = (thread, done)
    thread.start()
    return thread

  def _run(self, fn: Callable, shared: dict, chunk: dict) -> Any:
    """One call of the jitted pass, through the program compile_ahead made
    for these shapes when there is one."""
    ahead = self._ahead.get(_signature(fn, shared, chunk))
    if ahead is None:
      return self._call(fn, shared, chunk)
    thread, done = ahead
    thread.join()
    if not done:
      del self._ahead[_signature(fn, shared, chunk)]
      return self._call(fn, shared, chunk)
    return done[0](shared, chunk)


@jax.jit
def _stitch(parts: list, position: np.ndarray) -> Any:
  """The chunks' outputs (each (chunk, ...)) concatenated along the client
  axis, then rows `position` (C,) of that: fn's outputs for the C clients in
  their order. One program for the whole tree (see MAX_UNFINISHED_CALLS)."""
  whole = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
  return jax.tree.map(lambda x: x[position], whole)


def _signature(fn: Callable, *trees: Any) -> tuple:
  """fn and the trees' structure, shapes and dtypes: what selects a compiled program."""
  leaves, treedef = jax.tree.flatten(trees)
  return fn, treedef, tuple((tuple(x.shape), x.dtype, bool(getattr(x, 'weak_type', False)))
                            for x in leaves)

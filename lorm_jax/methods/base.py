"""The strategy interface every federated method implements.

The loop in `lorm_jax.federated.simulate` owns data, batching, vmapping,
checkpointing and evaluation; a method only says, as pure functions over
pytrees (fedjax style):

  task_structure  how the run's tasks and client split are grouped (joint)
  begin_task    server state at the start of task t (e.g. fresh LoRA)
  local_spec    which parameters clients train in round r, learning rates
  gram_request  which Grams the clients collect after training
  gram_model    backbone kernel deltas and b scale of the Gram-pass model
  aggregate     server update from the stacked client results
  end_task      cross-task consolidation after the last round of a task
  eval_model    kernel deltas and LoRA the evaluated model uses

Optional hooks with do-nothing defaults: train_deltas (a kernel delta under
the local-training forward), train_aux (data for a LocalSpec.loss_term),
stats_request (a per-client statistic pass after training, e.g. a Fisher),
and `forward` with forward_ctx: how images become logits (default: W0 + a @ b,
class token, linear head; prompt and prototype methods replace it) and the
data it needs. Clients download a, b, head, train_deltas, train_aux and
forward_ctx every round.

The server state is a dict pytree {'a', 'b', 'head', 'extra'} of flat dicts
(see `lorm_jax.models.functional`). 'head' holds the linear classifier
{'kernel', 'bias'} and any other trained parameters outside the backbone's
layers that a method adds under its own keys (prompt pools, prototypes): the
loop trains, uploads and hands it to `aggregate` as one dict. a and b may
hold fewer layers than the model adapts, or none (`F.full_lora` fills the
rest with zeros). 'extra' holds method accumulators and is checkpointed with
the rest.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import numpy as np
from ml_collections import ConfigDict

from lorm_jax.methods import interface
from lorm_jax.methods.interface import (ClientResults, GramRequest, LocalSpec, RoundPlan,
                                        ServerBackbone, Server, StatFn, TaskEndPlan,
                                        linear_head_forward)
from lorm_jax.models import functional as F


@dataclasses.dataclass
class Method:
  """Base strategy: FedAvg-style defaults that subclasses override."""
  config: ConfigDict
  name: ClassVar[str] = 'base'
  # (model, frozen, a, b, head, ctx, x) -> (logits, feats); a module-level
  # function (static under jit), the same for training, statistics and evaluation.
  forward = staticmethod(linear_head_forward)

  @classmethod
  def hyperparameters(cls) -> dict[str, Any]:
    """The method's own hyperparameters with their defaults (the reference's
    values): its dataclass fields besides `config`. configs/base.py puts them
    under `config.<method name>` and `make_method` passes them back, so every
    one is reachable as `--config.<method>.<field>=...`."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != 'config'}

  @classmethod
  def validate(cls, config: ConfigDict) -> None:
    """Raises ValueError (one line) for a value of config this method cannot
    use; called with the rest of the config's validation, before any work.
    Default: nothing method-specific to check."""

  # -- run structure ---------------------------------------------------------
  def task_structure(self, task_classes: list[np.ndarray], split: list[list[np.ndarray]]
                     ) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """(classes per task, [task][client] sample indices) the run trains on.

    Default: the class-incremental tasks and Dirichlet split as built.
    """
    return task_classes, split

  # -- task boundaries -------------------------------------------------------
  def init_server(self, params: F.Params, head: F.Flat, key: jax.Array) -> Server:
    a, b = F.init_lora(key, params.a, params.b)
    return {'a': a, 'b': b, 'head': head, 'extra': self.init_extra(params)}

  def init_extra(self, params: F.Params) -> dict:
    return {}

  def begin_task(self, server: Server, task: int, key: jax.Array) -> Server:
    """Default: a fresh LoRA for every task (b = 0, a uniform)."""
    a, b = F.init_lora(key, server['a'], server['b'])
    return {**server, 'a': a, 'b': b}

  def end_task_gram_request(self) -> GramRequest | None:
    return None

  def end_task(self, server: Server, task: int, task_grams: F.Flat | None) -> Server:
    return server

  def task_end_plan(self, server: Server, task: int) -> TaskEndPlan | None:
    """The end-of-task Gram pass (`end_task_gram_request` through `gram_inputs`
    with the server's factors), or None when the method asks for none."""
    request = self.end_task_gram_request()
    if request is None:
      return None
    deltas, params = self.gram_inputs(
        server, task, {'a': server['a'], 'b': server['b'], 'head': server['head']})
    return TaskEndPlan(request, deltas, params)

  def after_task(self, server: Server, task: int, backbone: 'ServerBackbone',
                 key: jax.Array) -> Server:
    """Server-side work after `end_task` that needs the backbone itself (e.g.
    TARGET's data-free synthesis and distillation); `backbone` gives the model,
    its frozen weights and the training-time preprocessing. Default: nothing."""
    return server

  def task_record(self, server: Server, task: int) -> dict[str, float]:
    """Scalars about the task's end (e.g. a synthesis's seconds and FLOPs) that
    the loop adds to the task's 'eval' line of metrics.jsonl. Default none."""
    return {}

  # -- rounds ---------------------------------------------------------------
  def round_plan(self, server: Server, task: int, rnd: int, ids: np.ndarray) -> RoundPlan:
    """Everything the loop needs from the method for round `rnd` of `task`
    with participants `ids` (client indices into the task's split), asked
    once per round. The default assembles it from the finer hooks below
    (local_spec, train_deltas, train_aux, forward_ctx, gram_request,
    gram_inputs, stats_request); a method with another phase overrides this.
    """
    request = self.gram_request(task, rnd)
    gram_deltas, gram_params = {}, interface._same
    if request is not None:
      gram_deltas = self.gram_model(server, task)[0]
      gram_params = functools.partial(_gram_params, self, server, task)
    return RoundPlan(spec=self.local_spec(task, rnd), train_deltas=self.train_deltas(server, task),
                     aux=self.train_aux(server, task), ctx=self.forward_ctx(server, task),
                     gram=request, gram_deltas=gram_deltas, gram_params=gram_params,
                     stats=self.stats_request(task, rnd))

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    raise NotImplementedError

  def gram_request(self, task: int, rnd: int) -> GramRequest | None:
    return None

  def stats_request(self, task: int, rnd: int) -> StatFn | None:
    """A per-client statistic summed over the client's data after training
    (`client.stats_pass`); lands in ClientResults.stats. Default none."""
    return None

  def gram_model(self, server: Server, task: int) -> tuple[F.Flat, float]:
    """(kernel deltas added to W0, scale applied to b) for Gram passes."""
    return {}, 1.0

  def gram_inputs(self, server: Server, task: int, params: dict) -> tuple[F.Flat, dict]:
    """What a Gram pass over `params` ({'a', 'b', 'head'}: the clients' after
    training, or the server's at the task's end) runs through: (kernel deltas
    added to W0, the factors as the pass sees them), from `gram_model`."""
    deltas, b_scale = self.gram_model(server, task)
    return deltas, {**params, 'b': jax.tree.map(lambda x: x * b_scale, params['b'])}

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    raise NotImplementedError

  # -- training forward and evaluation ---------------------------------------
  def train_deltas(self, server: Server, task: int) -> F.Flat:
    """Kernel deltas on top of W0 in the local-training forward (default none)."""
    return {}

  def train_aux(self, server: Server, task: int) -> Any:
    """Pytree handed to LocalSpec.loss_term / the stats pass (shared by clients)."""
    return {}

  def forward_ctx(self, server: Server, task: int) -> Any:
    """Pytree the method's `forward` reads (shared by clients; default none)."""
    return {}

  def eval_model(self, server: Server, task: int) -> tuple[F.Flat, F.Flat, F.Flat]:
    """(kernel deltas, a, b) of the evaluated model; default: W0 + a @ b."""
    return {}, server['a'], server['b']


def _gram_params(method: Method, server: Server, task: int, params: dict) -> dict:
  return method.gram_inputs(server, task, params)[1]

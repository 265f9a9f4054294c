"""FedAvg of LoRA modules: the paper's naive baseline.

Clients train a and b together (and the head); the server takes the
sample-weighted mean of each. Averaging the factors separately is not
averaging the updates (mean(a_i) @ mean(b_i) != mean(a_i @ b_i)), which is the
problem LoRM's closed form solves.
"""
from __future__ import annotations

import dataclasses

from lorm_jax import merge
from lorm_jax.federated.client import LocalSpec
from lorm_jax.methods.base import ClientResults, Method, Server


@dataclasses.dataclass
class FedAvg(Method):
  name: str = 'fedavg'

  def local_spec(self, task: int, rnd: int) -> LocalSpec:
    c = self.config
    return LocalSpec(factors=('a', 'b'), lr_lora=c.lr_b, lr_head=c.lr_head,
                     weight_decay=c.weight_decay)

  def begin_task(self, server: Server, task: int, key) -> Server:
    """One LoRA trained on across tasks (initialised once, in `init_server`)."""
    return server

  def aggregate(self, server: Server, results: ClientResults, task: int, rnd: int
                ) -> tuple[Server, dict]:
    w = results.num_samples
    avg = lambda tree: merge.fedavg_tree(tree, w)
    return {**server, 'a': avg(results.a), 'b': avg(results.b), 'head': avg(results.head)}, {}

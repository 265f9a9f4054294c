"""Joint training, the upper bound: all classes in one task.

`joint` (central): one client holds every training sample and the class
split is a single task over all classes, so the run is ordinary centralised
LoRA fine-tuning (a, b and the head trained together, as `fedavg`, whose
sample-weighted mean of one client is the identity). The budget matches the
class-incremental runs: `rounds` x `local_epochs` passes over every sample,
a fresh AdamW per round, the same backbone, rank and learning rates.
Evaluation after the single task covers all classes.

`joint_fed`: the reference's protocol. fed-mammoth has no joint *method*; its
`joint-<dataset>` variants set N_TASKS = 1 and keep the federated loop (10
clients, Dirichlet split of the one task). Here client i holds the union of
its class-incremental shares (a per-class Dirichlet split of all classes,
every client with >= min_samples per task), trained by FedAvg of LoRA.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from lorm_jax.methods.fedavg import FedAvg


@dataclasses.dataclass
class Joint(FedAvg):
  name: ClassVar[str] = 'joint'
  central: ClassVar[bool] = True

  def task_structure(self, task_classes: list[np.ndarray], split: list[list[np.ndarray]]
                     ) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """One task over all classes; one client (central) or the K clients' unions."""
    classes = [np.concatenate([np.asarray(c) for c in task_classes])]
    clients = [np.concatenate([np.asarray(task[i]) for task in split])
               for i in range(len(split[0]))]
    if self.central:
      clients = [np.sort(np.concatenate(clients))]
    return classes, [clients]


@dataclasses.dataclass
class JointFed(Joint):
  name: ClassVar[str] = 'joint_fed'
  central: ClassVar[bool] = False

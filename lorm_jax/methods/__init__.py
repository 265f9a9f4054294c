"""Federated methods as strategy objects, selected by `config.method`."""
from __future__ import annotations

from ml_collections import ConfigDict

from lorm_jax.methods.base import ClientResults, GramRequest, Method
from lorm_jax.methods.ccvr import CCVR
from lorm_jax.methods.continual import EWC, FedProto, FisherAvg, LwF
from lorm_jax.methods.derpp import DERpp
from lorm_jax.methods.fedsum import FedSum
from lorm_jax.methods.ties import TIES
from lorm_jax.methods.fedavg import FedAvg, FFALoRA
from lorm_jax.methods.joint import Joint, JointFed
from lorm_jax.methods.lora_aggregators import FedExLoRA, FedSALoRA, FLoRA
from lorm_jax.methods.lorm import LoRM
from lorm_jax.methods.pilora import PILoRA
from lorm_jax.methods.prompts import L2P, CodaPrompt
from lorm_jax.methods.dualprompt import DualPrompt
from lorm_jax.methods.coda_lwf import CodaLwF
from lorm_jax.methods.regmean import RegMean
from lorm_jax.methods.target import TARGET

METHODS: dict[str, type[Method]] = {
    'lorm': LoRM,
    'fedavg': FedAvg,
    'ffa_lora': FFALoRA,
    'joint': Joint,
    'joint_fed': JointFed,
    'regmean': RegMean,
    'ewc': EWC,
    'lwf': LwF,
    'fedproto': FedProto,
    'fisheravg': FisherAvg,
    'ccvr': CCVR,
    'l2p': L2P,
    'coda_p': CodaPrompt,
    'dualprompt': DualPrompt,
    'coda_lwf': CodaLwF,
    'pilora': PILoRA,
    'derpp': DERpp,
    'fedsum': FedSum,
    'ties': TIES,
    'fedex_lora': FedExLoRA,
    'flora': FLoRA,
    'fedsa_lora': FedSALoRA,
    'target': TARGET,
}


def make_method(name: str, config: ConfigDict) -> Method:
  """The method `name` with its hyperparameters from `config.<name>` (their
    defaults where the config has no such section)."""
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}; available: {", ".join(sorted(METHODS))}')
  cls = METHODS[name]
  own = config.get(name) if cls.hyperparameters() else None
  return cls(config, **(own.to_dict() if own is not None else {}))


def hyperparameter_sections() -> dict[str, ConfigDict]:
  """{method name: ConfigDict of its hyperparameters' defaults} for every
  method that has any (configs/base.py adds them to every config)."""
  return {name: ConfigDict(cls.hyperparameters()) for name, cls in METHODS.items()
          if cls.hyperparameters()}


__all__ = ['ClientResults', 'GramRequest', 'Method', 'METHODS', 'hyperparameter_sections',
           'make_method']

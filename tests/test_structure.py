"""The codebase's shape: short functions, and a method added in one module."""
from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from conftest import smoke_config
from lorm_jax import methods
from lorm_jax.federated import simulate
from lorm_jax.methods import interface
from lorm_jax.methods.fedavg import FedAvg

ROOT = pathlib.Path(__file__).resolve().parents[1]
LONGEST = 60
EXEMPT = {('lorm_jax/federated/simulate.py', '_run')}   # the one readable loop


def test_no_function_in_the_package_is_over_60_lines():
  long = []
  for path in sorted((ROOT / 'lorm_jax').rglob('*.py')):
    rel = str(path.relative_to(ROOT))
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > LONGEST and (rel, node.name) not in EXEMPT:
          long.append(f'{rel}:{node.lineno} {node.name} ({lines} lines)')
  assert not long, long


@dataclasses.dataclass
class HeadFirstMedian(FedAvg):
  """A toy method with its own phase and merge, written without touching the
  loop: round 0 of every task trains the head alone, later rounds a, b and
  the head; the server takes the coordinate-wise median of the participants."""
  name: ClassVar[str] = 'head_first_median'

  def round_plan(self, server, task, rnd, ids):
    plan = super().round_plan(server, task, rnd, ids)
    if rnd == 0:
      plan = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, factors=()))
    return plan

  def aggregate(self, server, results, task, rnd):
    median = lambda tree: jax.tree.map(lambda x: jnp.median(x, axis=0), tree)
    factors = ('a', 'b') if rnd > 0 else ()
    new = {f: median(getattr(results, f)) for f in factors}
    return {**server, **new, 'head': median(results.head)}, {}


def test_adding_a_method_is_a_module_and_one_registry_line(tmp_path, monkeypatch):
  monkeypatch.setitem(methods.METHODS, HeadFirstMedian.name, HeadFirstMedian)
  c = smoke_config(method=HeadFirstMedian.name)
  results = simulate.run(c, str(tmp_path / 'run'), progress=False)
  rounds = [l for l in map(json.loads, open(tmp_path / 'run' / 'metrics.jsonl'))
            if l['kind'] == 'round']
  assert [r['factors'] for r in rounds] == ['', 'ab', '', 'ab']
  head_bytes = 4 * (64 * 10 + 10)   # the tiny ViT's head: width 64, 10 classes
  assert rounds[0]['upload_bytes_per_client'] == head_bytes
  assert rounds[1]['upload_bytes_per_client'] > head_bytes
  assert len(results['accuracy_per_task_end']) == 2
  assert np.isfinite(results['final_accuracy'])

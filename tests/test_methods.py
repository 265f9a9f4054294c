"""Properties of the baseline strategies (lorm_jax.methods), without the loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from lorm_jax import merge
from lorm_jax.methods import ClientResults, make_method
from lorm_jax.methods.regmean import lowrank_regmean_system


def _config(**overrides):
  c = smoke.get_config()
  c.unlock()
  for k, v in overrides.items():
    c[k] = v
  c.lock()
  return c


# ---------------------------------------------------------------- joint


def test_joint_is_one_task_one_client_with_every_sample():
  task_classes = [np.arange(0, 5), np.arange(5, 10)]
  split = [[np.array([0, 3]), np.array([1, 2, 7])], [np.array([4, 9]), np.array([5, 6, 8])]]
  classes, new = make_method('joint', _config()).task_structure(task_classes, split)
  assert len(classes) == 1 and classes[0].tolist() == list(range(10))
  assert len(new) == 1 and len(new[0]) == 1
  assert new[0][0].tolist() == list(range(10))


def test_joint_fed_keeps_each_clients_union():
  task_classes = [np.arange(0, 5), np.arange(5, 10)]
  split = [[np.array([0, 3]), np.array([1, 2, 7])], [np.array([4, 9]), np.array([5, 6, 8])]]
  classes, new = make_method('joint_fed', _config()).task_structure(task_classes, split)
  assert len(classes) == 1 and len(new) == 1 and len(new[0]) == 2
  assert sorted(new[0][0].tolist()) == [0, 3, 4, 9]
  assert sorted(new[0][1].tolist()) == [1, 2, 5, 6, 7, 8]


# -------------------------------------------------------------- regmean


def _random_clients(key, c, n, r, out, full: bool):
  ka, kb, kg = jax.random.split(key, 3)
  a = jax.random.normal(ka, (c, n, r))
  b = jax.random.normal(kb, (c, r, out))
  x = jax.random.normal(kg, (c, 3 * n, n))
  g = jnp.einsum('cti,ctj->cij', x, x)
  return a, b, (g if full else jnp.diagonal(g, axis1=1, axis2=2))


@pytest.mark.parametrize('alpha,full', [(0.0, False), (0.0, True), (0.5, True), (1.0, True)])
def test_lowrank_regmean_equals_regmean_of_the_full_deltas(alpha, full):
  """D + G~^-1 sum_i G~_i a_i b_i == merge.regmean of the stacked D + a_i b_i."""
  a, b, g = _random_clients(jax.random.key(0), 4, 6, 2, 5, full)
  w = jnp.array([1.0, 1.0, 0.0, 1.0])  # client 2 absent
  d = jax.random.normal(jax.random.key(1), (6, 5))
  gsum, rhs = lowrank_regmean_system({'l': a}, {'l': b}, {'l': g}, w, alpha)
  ours = d + merge.solve_psd_tree(gsum, rhs, ridge=0.0)['l']
  full_deltas = d[None] + jnp.einsum('cir,cro->cio', a, b)
  want = merge.regmean(full_deltas, g, alpha, weights=w, ridge=0.0)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=2e-4, atol=2e-4)


def _results(a, b, g, head_k, head_g, n):
  c = a.shape[0]
  return ClientResults(a={'l': a}, b={'l': b}, head={'kernel': head_k, 'bias': jnp.zeros((c, 3))},
                       grams={'l': g}, head_grams=head_g, num_samples=n)


def test_regmean_identical_clients_add_their_delta_and_restart_lora():
  m = make_method('regmean', _config())
  a1, b1, g1 = _random_clients(jax.random.key(2), 1, 6, 2, 5, False)
  c = 3
  rep = lambda x: jnp.repeat(x, c, axis=0)
  d0 = jax.random.normal(jax.random.key(3), (6, 5))
  head_k = rep(jax.random.normal(jax.random.key(4), (1, 4, 3)))
  xh = jax.random.normal(jax.random.key(5), (20, 4))
  head_g = rep((xh.T @ xh)[None])
  server = {'a': {'l': a1[0]}, 'b': {'l': jnp.zeros((2, 5))},
            'head': {'kernel': head_k[0], 'bias': jnp.zeros(3)}, 'extra': {'D': {'l': d0}}}
  new, info = m.aggregate(server, _results(rep(a1), rep(b1), rep(g1), head_k, head_g,
                                           jnp.array([3.0, 5.0, 7.0])), task=0, rnd=0)
  np.testing.assert_allclose(np.asarray(new['extra']['D']['l']),
                             np.asarray(d0 + a1[0] @ b1[0]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(new['head']['kernel']), np.asarray(head_k[0]),
                             rtol=1e-4, atol=1e-4)
  assert int(info['merge_fallbacks']) == 0
  # A fresh LoRA for the next round: b = 0, a redrawn; W0 + D is what clients train on.
  assert not np.any(np.asarray(new['b']['l']))
  assert not np.allclose(np.asarray(new['a']['l']), np.asarray(a1[0]))
  assert m.train_deltas(new, 0) is new['extra']['D']
  # Across tasks D is carried on (one continually fine-tuned model, as the reference).
  nxt = m.begin_task(new, 1, jax.random.key(9))
  assert nxt['extra']['D'] is new['extra']['D']
  deltas, _, b = m.eval_model(nxt, 1)
  assert deltas is new['extra']['D'] and not np.any(np.asarray(b['l']))

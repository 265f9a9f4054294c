"""FedEx-LoRA, FLoRA and FedSA-LoRA (lorm_jax/methods/lora_aggregators.py):
the aggregation rules as pure functions, then runs on the loop."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import smoke_config, strip_wall_time
from lorm_jax.methods import ClientResults, make_method
from lorm_jax.methods.lora_aggregators import stack_factors, stacked_products
from lorm_jax.models import functional as F

IN, R, OUT, N = 6, 2, 5, 4  # layer 'l': a (IN, R), b (R, OUT); N clients in the run


def _params() -> F.Params:
  return F.Params(frozen={}, a={'l': jnp.zeros((IN, R))}, b={'l': jnp.zeros((R, OUT))},
                  head={'kernel': jnp.zeros((3, 4)), 'bias': jnp.zeros(4)})


def _server(method, key=0):
  return method.init_server(_params(), _params().head, jax.random.key(key))


def _results(key, n, ids=None):
  """Random uploads of len(n) clients (row 2 NaN where n[2] == 0: absent)."""
  ka, kb, kh = jax.random.split(jax.random.key(key), 3)
  c = len(n)
  a = jax.random.normal(ka, (c, IN, R))
  b = jax.random.normal(kb, (c, R, OUT))
  n = jnp.asarray(n, jnp.float32)
  if c > 2 and float(n[2]) == 0:
    a, b = a.at[2].set(jnp.nan), b.at[2].set(jnp.nan)
  head = {'kernel': jax.random.normal(kh, (c, 3, 4)), 'bias': jnp.ones((c, 4))}
  return ClientResults(a={'l': a}, b={'l': b}, head=head, grams={}, head_grams=None,
                       num_samples=n, client_ids=None if ids is None else jnp.asarray(ids,
                                                                                      jnp.int32))


def _weighted_mean64(x, n):
  """sum_i p_i x_i in float64 over the clients with n_i > 0."""
  x, n = np.asarray(x, np.float64), np.asarray(n, np.float64)
  keep = n > 0
  return np.tensordot(n[keep] / n[keep].sum(), x[keep], axes=1)


# ------------------------------------------------------------- fedex_lora


def test_fedex_server_model_is_the_weighted_mean_of_the_client_models():
  """W0 + fold' + mean(a) mean(b) == sum_i p_i (W0 + fold + a_i b_i), over two
  rounds, against float64; the absent (NaN) client adds nothing."""
  m = make_method('fedex_lora', smoke_config())
  server = _server(m)
  for rnd, n in enumerate(([3.0, 5.0, 0.0, 7.0], [1.0, 2.0, 4.0, 8.0])):
    res = _results(10 + rnd, n)
    assert m.train_deltas(server, 0) is server['extra']['fold']
    clients64 = np.asarray(server['extra']['fold']['l'], np.float64)[None] + np.einsum(
        'cir,cro->cio', np.asarray(res.a['l'], np.float64), np.asarray(res.b['l'], np.float64))
    want = _weighted_mean64(clients64, n)
    server, _ = m.aggregate(server, res, task=0, rnd=rnd)
    got = np.asarray(server['extra']['fold']['l'], np.float64) + (
        np.asarray(server['a']['l'], np.float64) @ np.asarray(server['b']['l'], np.float64))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    np.testing.assert_allclose(server['a']['l'], _weighted_mean64(res.a['l'], n), atol=1e-6)
    np.testing.assert_allclose(server['b']['l'], _weighted_mean64(res.b['l'], n), atol=1e-6)
    np.testing.assert_allclose(server['head']['kernel'], _weighted_mean64(res.head['kernel'], n),
                               atol=1e-6)
  # The residual is not zero (FedAvg of the factors would have been inexact).
  assert np.abs(np.asarray(server['extra']['fold']['l'])).max() > 1e-2


def test_fedex_task_delta_is_fold_plus_lora_and_the_fold_restarts():
  m = make_method('fedex_lora', smoke_config())
  server = _server(m)
  deltas = []
  for t in range(2):
    server = m.begin_task(server, t, jax.random.key(t))
    server, _ = m.aggregate(server, _results(20 + t, [1.0, 2.0, 3.0]), task=t, rnd=0)
    deltas.append(np.asarray(server['extra']['fold']['l'] + server['a']['l'] @ server['b']['l']))
    server = m.end_task(server, t, None)
    assert not np.any(np.asarray(server['extra']['fold']['l']))
    d, _, b = m.eval_model(server, t)
    np.testing.assert_allclose(d['l'], np.mean(deltas, axis=0), atol=1e-5)
    assert not np.any(np.asarray(b['l']))


# ------------------------------------------------------------------ flora


def test_flora_stacked_product_is_the_weighted_sum_exactly():
  """a_s @ b_s == sum_i p_i a_i b_i bit for bit: integer factors and dyadic
  weights make every float32 operation exact. Rank C r; absent clients are 0."""
  rs = np.random.default_rng(0)
  c = 4
  a = jnp.asarray(rs.integers(-4, 5, (c, IN, R)), jnp.float32).at[2].set(jnp.nan)
  b = jnp.asarray(rs.integers(-4, 5, (c, R, OUT)), jnp.float32).at[2].set(jnp.inf)
  n = jnp.array([1.0, 1.0, 0.0, 2.0])  # p = 1/4, 1/4, 0, 1/2
  a_s, b_s = stack_factors(a, b, n)
  assert a_s.shape == (IN, c * R) and b_s.shape == (c * R, OUT)
  want = sum(float(p) * np.asarray(a[i], np.float64) @ np.asarray(b[i], np.float64)
             for i, p in enumerate([0.25, 0.25, 0.0, 0.5]) if p)
  np.testing.assert_array_equal(np.asarray(a_s @ b_s, np.float64), want)
  np.testing.assert_array_equal(np.asarray(stacked_products({'l': a}, {'l': b}, n)['l']),
                                np.float32(want))
  # The stacking itself: block i of a_s is p_i a_i, block i of b_s is b_i.
  np.testing.assert_array_equal(a_s[:, 3 * R:4 * R], 0.5 * a[3])
  np.testing.assert_array_equal(b_s[1 * R:2 * R], b[1])
  assert not np.any(np.asarray(a_s[:, 2 * R:3 * R])) and not np.any(np.asarray(b_s[2 * R:3 * R]))


def test_flora_folds_the_product_and_restarts_the_lora():
  m = make_method('flora', smoke_config())
  server = _server(m)
  n = [3.0, 5.0, 0.0, 7.0]
  res = _results(30, n)
  want = _weighted_mean64(np.einsum('cir,cro->cio', np.asarray(res.a['l'], np.float64),
                                    np.asarray(res.b['l'], np.float64)), n)
  new, _ = m.aggregate(server, res, task=0, rnd=0)
  np.testing.assert_allclose(new['extra']['fold']['l'], want, atol=1e-5)
  assert not np.any(np.asarray(new['b']['l']))
  assert not np.array_equal(np.asarray(new['a']['l']), np.asarray(server['a']['l']))
  assert m.train_deltas(new, 0) is new['extra']['fold']
  new2, _ = m.aggregate(new, res, task=0, rnd=1)  # the fold accumulates over rounds
  np.testing.assert_allclose(new2['extra']['fold']['l'], 2 * want, atol=2e-5)
  done = m.end_task(new2, 0, None)
  np.testing.assert_allclose(m.eval_model(done, 0)[0]['l'], 2 * want, atol=2e-5)
  assert not np.any(np.asarray(done['extra']['fold']['l']))


# ------------------------------------------------------------- fedsa_lora


def test_fedsa_keeps_each_clients_b_and_shares_a():
  m = make_method('fedsa_lora', smoke_config(num_clients=N))
  server = m.begin_task(_server(m), 0, jax.random.key(1))
  table0 = jax.random.normal(jax.random.key(2), (N, R, OUT))
  server = {**server, 'extra': {**server['extra'], 'b_clients': {'l': table0},
                                'n_clients': jnp.array([0.0, 4.0, 0.0, 6.0])}}
  ids = np.array([3, 1, 2])
  plan = m.round_plan(server, 0, 0, ids)
  np.testing.assert_array_equal(plan.client_params['b']['l'], table0[ids])
  assert set(plan.client_params) == {'b'} and plan.spec.factors == ('a', 'b')
  # Rows: client 3 (n 2), client 1 (n 5), a padded row claiming client 2 (n 0, NaN).
  n = [2.0, 5.0, 0.0]
  res = _results(40, n, ids=ids)
  new, _ = m.aggregate(server, res, task=0, rnd=0)
  table = np.asarray(new['extra']['b_clients']['l'])
  np.testing.assert_array_equal(table[[0, 2]], np.asarray(table0)[[0, 2]])  # unchanged
  np.testing.assert_array_equal(table[3], res.b['l'][0])
  np.testing.assert_array_equal(table[1], res.b['l'][1])
  np.testing.assert_array_equal(new['extra']['n_clients'], [0.0, 5.0, 0.0, 2.0])
  np.testing.assert_allclose(new['a']['l'], _weighted_mean64(res.a['l'], n), atol=1e-6)
  # The global b: the count-weighted mean of the B of the clients trained in the task.
  np.testing.assert_allclose(new['b']['l'], (5 * table[1] + 2 * table[3]) / 7, atol=1e-6)
  # ... so W0 + a b_global is the mean of the personalised models W0 + a B_i.
  personal = np.einsum('ir,cro->cio', np.asarray(new['a']['l']), table[[1, 3]])
  np.testing.assert_allclose(np.asarray(new['a']['l'] @ new['b']['l']),
                             np.tensordot([5 / 7, 2 / 7], personal, axes=1), atol=1e-5)
  # The task delta enters the mean of task deltas; the tables survive end_task
  # and restart (zeros) with the next task.
  done = m.end_task(new, 0, None)
  np.testing.assert_allclose(m.eval_model(done, 0)[0]['l'], new['a']['l'] @ new['b']['l'],
                             atol=1e-6)
  np.testing.assert_array_equal(done['extra']['b_clients']['l'], table)
  nxt = m.begin_task(done, 1, jax.random.key(3))
  assert not np.any(np.asarray(nxt['extra']['b_clients']['l']))
  assert not np.any(np.asarray(nxt['extra']['n_clients']))
  with pytest.raises(ValueError, match='client_ids'):
    m.aggregate(server, res._replace(client_ids=None), task=0, rnd=0)
  with pytest.raises(ValueError, match='keeps B for clients'):
    m.round_plan(server, 0, 0, np.array([N]))


def test_fedsa_tables_cover_every_client():
  m = make_method('fedsa_lora', smoke_config(num_clients=N))
  extra = _server(m)['extra']
  assert extra['b_clients']['l'].shape == (N, R, OUT) and extra['n_clients'].shape == (N,)
  assert dataclasses.replace(m.round_plan(_server(m), 0, 0, np.arange(N)),
                             client_params={}).client_params == {}


# --------------------------------------------------------- on the loop



@pytest.mark.parametrize('method', ['fedex_lora', 'flora', 'fedsa_lora'])
def test_runs_on_the_loop(method, tmp_path):
  from lorm_jax.federated import simulate  # pylint: disable=import-outside-toplevel
  res = simulate.run(smoke_config(method=method), str(tmp_path), progress=False)
  assert res['method'] == method and res['num_tasks'] == 2
  assert 0.0 <= res['final_accuracy'] <= 1.0
  rounds = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"round"' in l]
  assert len(rounds) == 4 and all(np.isfinite(r['train_loss']) for r in rounds)
  assert {r['factors'] for r in rounds} == {'ab'}
  ab_head_bytes = 4 * (2 * 1536 + 64 * 10 + 10)  # tiny ViT: a, b of 2 blocks; head
  if method == 'fedsa_lora':  # B stays on the client: a and the head travel, both ways
    a_head_bytes = 4 * (2 * 2 * (64 + 64 + 64 + 128) + 64 * 10 + 10)
    assert rounds[0]['upload_bytes_per_client'] == a_head_bytes
    assert rounds[0]['download_bytes_per_client'] == a_head_bytes
    return
  assert rounds[0]['upload_bytes_per_client'] == ab_head_bytes
  if method in ('fedex_lora', 'flora'):  # + the fold (full kernels of 2 blocks' LoRA layers)
    fold_bytes = 4 * 2 * (64 * 192 + 64 * 64 + 64 * 128 + 128 * 64)
    assert rounds[0]['download_bytes_per_client'] == ab_head_bytes + fold_bytes


def test_fedsa_with_sampled_participants_survives_kill_and_resume(tmp_path):
  """2 of 3 clients per round: the per-client B tables (extra) are
  checkpointed, and a resumed run equals an uninterrupted one."""
  from lorm_jax.federated import simulate  # pylint: disable=import-outside-toplevel
  cfg = smoke_config(method='fedsa_lora', clients_per_round=2)
  full = simulate.run(cfg, str(tmp_path / 'full'), progress=False)
  rounds = [json.loads(l) for l in open(tmp_path / 'full' / 'metrics.jsonl') if '"round"' in l]
  assert [len(r['clients']) for r in rounds] == [2, 2, 2, 2]
  workdir = str(tmp_path / 'resumed')
  assert simulate.run(cfg, workdir, max_rounds=1, progress=False) == {}  # mid-task
  assert simulate.run(cfg, workdir, max_rounds=2, progress=False) == {}
  assert strip_wall_time(simulate.run(cfg, workdir, progress=False)) == strip_wall_time(full)

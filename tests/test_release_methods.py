"""TIES, FedSum and DER++ (methods of the reference's release beyond the
paper's table): their merges, the reservoir buffer and the replay loss
against hand computations, then smoke runs on the loop."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import smoke_config
from lorm_jax.methods import ClientResults, make_method
from lorm_jax.methods import derpp as D
from lorm_jax.methods import interface
from lorm_jax.methods.ties import magnitude_quantile, ties_merge, ties_merge_lora


def _results(a, b, head, num_samples, client_ids=None, state=None) -> ClientResults:
  return ClientResults(a, b, head, {}, None, jnp.asarray(num_samples, jnp.float32),
                       client_ids=client_ids, state=state)


# ----------------------------------------------------------------- ties


def test_ties_trim_elect_disjoint_mean_by_hand():
  """Three clients, 11 entries each (leaves u (4,) and v (7,)); magnitudes a
  permutation of 1..11, so the 0.7 quantile over all 11 is exactly 8 and each
  client keeps its four entries of magnitude >= 8. Kept entries:
    c0: u0 +8, u1 +9, v0 -10, v1 +11
    c1: u0 -8, u1 +10, v1 +9, v2 +11
    c2: u0 -9, v0 +8, v2 -10, v3 +11
  Sums: u0 -9, u1 19, v0 -2, v1 20, v2 1, v3 11 -> signs - + - + + +.
  Disjoint means: u0 (-8 - 9) / 2, u1 (9 + 10) / 2, v0 -10, v1 (11 + 9) / 2,
  v2 11, v3 11; 0 elsewhere. A fourth client is absent (padding)."""
  c0 = [8, 9, 1, -2, -10, 11, 3, -4, 5, -6, 7]
  c1 = [-8, 10, -1, 2, 3, 9, 11, 4, -5, 6, -7]
  c2 = [-9, -1, 2, 3, 8, -4, -10, 11, 5, -6, 7]
  absent = [100.0] * 11
  rows = jnp.asarray([c0, c1, c2, absent], jnp.float32)
  tau = {'u': rows[:, :4], 'v': rows[:, 4:]}
  got = ties_merge(tau, jnp.array([True, True, True, False]), 0.7)
  np.testing.assert_allclose(np.asarray(got['u']), [-8.5, 9.5, 0.0, 0.0])
  np.testing.assert_allclose(np.asarray(got['v']), [-10.0, 10.0, 11.0, 11.0, 0.0, 0.0, 0.0])


def test_ties_quantile_interpolates_and_ties_in_the_sign_sum_give_zero():
  """Quantile 0.5 of |(1, -2, 3, -4)| is 2.5 (linear interpolation, numpy's
  default): entries 3 and -4 survive. Two clients with opposite kept entries
  cancel: their sum is 0, no sign is elected and the entry stays 0."""
  tau = {'w': jnp.array([[1.0, -2.0, 3.0, -4.0], [1.0, -2.0, -3.0, 4.0]])}
  got = ties_merge(tau, jnp.array([True, True]), 0.5)
  np.testing.assert_allclose(np.asarray(got['w']), [0.0, 0.0, 0.0, 0.0])
  one = ties_merge(tau, jnp.array([True, False]), 0.5)
  np.testing.assert_allclose(np.asarray(one['w']), [0.0, 0.0, 3.0, -4.0])


@pytest.mark.parametrize('n', [1, 2, 7, 1000])
@pytest.mark.parametrize('q', [0.0, 0.3, 0.7, 1.0])
def test_magnitude_quantile_is_jnp_quantile_bit_for_bit(n, q):
  """The sort-free quantile of |x| equals jnp.quantile's (linear, in the same
  jit) bit for bit: with repeated magnitudes, zeros, both signs; NaN gives NaN."""
  rng = np.random.default_rng(n)
  x = np.round(rng.normal(size=n) * 4) / 4                 # repeats and zeros
  x[: n // 3] = rng.normal(size=n // 3)                     # and distinct values
  x = jnp.asarray(x, jnp.float32)
  got = jax.jit(magnitude_quantile, static_argnums=1)(x, q)
  want = jax.jit(lambda v: jnp.quantile(jnp.abs(v), q))(x)
  assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
  assert np.isnan(magnitude_quantile(x.at[0].set(jnp.nan), q))


def test_ties_of_lora_factors_is_ties_of_the_stacked_task_vectors():
  """ties_merge_lora forms a_i @ b_i and head_i - head one client at a time;
  the result equals ties_merge of the explicitly stacked vectors (the
  quantile taken over all layers and the head together)."""
  ks = jax.random.split(jax.random.key(0), 6)
  c = 3
  a = {'l1': jax.random.normal(ks[0], (c, 5, 2)), 'l2': jax.random.normal(ks[1], (c, 3, 2))}
  b = {'l1': jax.random.normal(ks[2], (c, 2, 4)), 'l2': jax.random.normal(ks[3], (c, 2, 6))}
  head = {'kernel': jax.random.normal(ks[4], (c, 4, 3)), 'bias': jax.random.normal(ks[5], (c, 3))}
  server_head = {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}
  present = jnp.array([True, False, True])
  d, h = ties_merge_lora(a, b, head, server_head, present, 0.7)
  stacked = {'deltas': {k: jnp.einsum('cir,cro->cio', a[k], b[k]) for k in a},
             'head': {k: head[k] - server_head[k][None] for k in head}}
  want = ties_merge(stacked, present, 0.7)
  for k in a:
    np.testing.assert_allclose(np.asarray(d[k]), np.asarray(want['deltas'][k]), rtol=1e-6)
  for k in head:
    np.testing.assert_allclose(np.asarray(h[k]), np.asarray(want['head'][k]), rtol=1e-6)
  # 30% of each client's entries survive the trim, so the merge is sparse.
  total = sum(x.size for x in jax.tree.leaves((d, h)))
  kept = sum(int(jnp.sum(x != 0)) for x in jax.tree.leaves((d, h)))
  assert 0 < kept <= 2 * math.ceil(0.3 * total) + 2


def test_ties_aggregate_scales_by_0_4_and_restarts_the_lora():
  m = make_method('ties', smoke_config())
  assert (m.trim, m.scale) == (0.7, 0.4)
  # One client: the merge is its trimmed task vector; scale 0.4 on D and head.
  a = {'l': jnp.array([[[1.0], [2.0]]])}                  # (1, 2, 1)
  b = {'l': jnp.array([[[3.0, -1.0]]])}                   # (1, 1, 2): delta [[3, -1], [6, -2]]
  head = {'kernel': jnp.array([[[0.5]]]), 'bias': jnp.array([[0.0]])}
  server = {'a': {'l': jnp.zeros((2, 1))}, 'b': {'l': jnp.zeros((1, 2))},
            'head': {'kernel': jnp.array([[0.0]]), 'bias': jnp.array([0.0])},
            'extra': {'D': {'l': jnp.ones((2, 2))}}}
  new, _ = m.aggregate(server, _results(a, b, head, [4.0]), task=0, rnd=0)
  # |tau| = (3, 1, 6, 2, 0.5, 0): 0.7 quantile = 2 + 0.5 * (3 - 2) = 2.5 -> keeps 3 and 6.
  np.testing.assert_allclose(np.asarray(new['extra']['D']['l']),
                             [[1 + 0.4 * 3, 1.0], [1 + 0.4 * 6, 1.0]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new['head']['kernel']), [[0.0]])
  assert not np.any(np.asarray(new['b']['l'])) and np.any(np.asarray(new['a']['l']))
  deltas, _, b_eval = m.eval_model(new, 0)
  assert deltas is new['extra']['D'] and not np.any(np.asarray(b_eval['l']))


# --------------------------------------------------------------- fedsum


def test_fedsum_adds_every_present_clients_task_vector():
  rng = np.random.default_rng(0)
  c, n, r, o, dh, k = 4, 5, 2, 3, 4, 6
  a = rng.normal(size=(c, n, r)).astype(np.float32)
  b = rng.normal(size=(c, r, o)).astype(np.float32)
  hk = rng.normal(size=(c, dh, k)).astype(np.float32)
  hb = rng.normal(size=(c, k)).astype(np.float32)
  a[2] = np.nan  # a padded row may hold anything
  d0 = rng.normal(size=(n, o)).astype(np.float32)
  s_hk, s_hb = rng.normal(size=(dh, k)).astype(np.float32), np.zeros(k, np.float32)
  m = make_method('fedsum', smoke_config())
  server = {'a': {'l': jnp.zeros((n, r))}, 'b': {'l': jnp.zeros((r, o))},
            'head': {'kernel': jnp.asarray(s_hk), 'bias': jnp.asarray(s_hb)},
            'extra': {'D': {'l': jnp.asarray(d0)}}}
  new, _ = m.aggregate(server, _results({'l': jnp.asarray(a)}, {'l': jnp.asarray(b)},
                                        {'kernel': jnp.asarray(hk), 'bias': jnp.asarray(hb)},
                                        [10.0, 3.0, 0.0, 1.0]), task=1, rnd=2)
  use = [0, 1, 3]
  want_d = d0 + sum(a[i] @ b[i] for i in use)
  want_k = s_hk + sum(hk[i] - s_hk for i in use)
  want_b = s_hb + sum(hb[i] - s_hb for i in use)
  np.testing.assert_allclose(np.asarray(new['extra']['D']['l']), want_d, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new['head']['kernel']), want_k, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new['head']['bias']), want_b, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(new['b']['l']))
  assert make_method('fedsum', smoke_config()).train_deltas(new, 1) is new['extra']['D']


# ------------------------------------------------------- reservoir buffer


def _offer_stream(size: int, batches: np.ndarray, valid: np.ndarray, key: jax.Array) -> dict:
  """Offers the batches (S, n) of sample ids (valid (S, n)) to an empty buffer."""
  buf = D.empty_buffer(size, 2)
  for s in range(batches.shape[0]):
    ids = jnp.asarray(batches[s], jnp.int32)
    logits = jnp.stack([ids.astype(jnp.float32), -ids.astype(jnp.float32)], axis=1)
    buf = D.reservoir_add(buf, jax.random.fold_in(key, s), ids, ids % 7, logits,
                          jnp.asarray(valid[s]))
  return buf


def test_reservoir_counts_are_exact_and_the_first_samples_fill_in_order():
  batches = np.arange(24).reshape(4, 6)
  valid = np.ones((4, 6), bool)
  valid[1, 4:] = False  # padding at a batch's end
  valid[3, 2:] = False
  buf = _offer_stream(10, batches, valid, jax.random.key(0))
  offered = batches[valid]
  assert int(buf['count']) == len(offered) == 18
  # While s < M the s-th valid sample takes slot s (nothing is dropped yet).
  small = _offer_stream(20, batches, valid, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(small['idx'])[:18], offered)
  np.testing.assert_array_equal(np.asarray(small['y'])[:18], offered % 7)
  np.testing.assert_array_equal(np.asarray(small['logits'])[:18, 0], offered)
  # A full buffer holds M distinct offered samples, each with its own label and logits.
  held = np.asarray(buf['idx'])
  assert len(set(held.tolist())) == 10 and set(held.tolist()) <= set(offered.tolist())
  np.testing.assert_array_equal(np.asarray(buf['y']), held % 7)
  np.testing.assert_array_equal(np.asarray(buf['logits'])[:, 1], -held)


def test_reservoir_add_equals_offering_one_by_one():
  """The vectorised add (later samples win a slot drawn twice) gives what the
  sequential Algorithm R gives with the same draws r_j in [0, s_j]."""
  m, n = 3, 8
  buf = D.empty_buffer(m, 1)
  buf = {**buf, 'count': jnp.int32(5), 'idx': jnp.array([100, 101, 102], jnp.int32)}
  valid = np.array([1, 1, 0, 1, 1, 1, 1, 1], bool)
  ids = np.arange(n, dtype=np.int32)
  for seed in range(20):
    key = jax.random.key(seed)
    got = D.reservoir_add(buf, key, jnp.asarray(ids), jnp.asarray(ids), jnp.zeros((n, 1)),
                          jnp.asarray(valid))
    seen = 5 + np.cumsum(valid) - 1
    r = np.asarray(jax.random.randint(key, (n,), 0, np.maximum(seen, 0) + 1))
    want = [100, 101, 102]
    for j in range(n):
      if valid[j] and r[j] < m:
        want[r[j]] = ids[j]
    np.testing.assert_array_equal(np.asarray(got['idx']), want)
    assert int(got['count']) == 5 + valid.sum()


def test_reservoir_keeps_every_offered_sample_with_equal_probability():
  """Offering 20 samples (in batches of 4, with padding) to a buffer of 5,
  each sample ends up held with probability 5 / 20 over 3000 seeds (a loose
  bound: 5 standard deviations is 0.04); the buffer never exceeds 5 and
  never holds a sample twice."""
  size, trials = 5, 3000
  batches = np.arange(24).reshape(6, 4)
  valid = np.ones((6, 4), bool)
  valid[2, 3] = valid[4, 1:] = False      # 20 valid samples; padding dropped
  offered = batches[valid]

  def one(key):
    buf = D.empty_buffer(size, 1)
    for s in range(batches.shape[0]):
      ids = jnp.asarray(batches[s], jnp.int32)
      buf = D.reservoir_add(buf, jax.random.fold_in(key, s), ids, ids, jnp.zeros((4, 1)),
                            jnp.asarray(valid[s]))
    return buf['idx'], buf['count']

  held, count = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(42), trials))
  held = np.asarray(held)
  assert held.shape == (trials, size) and np.all(np.asarray(count) == 20)
  assert all(len(set(row)) == size for row in held.tolist())
  assert set(np.unique(held).tolist()) <= set(offered.tolist())
  freq = np.array([(held == i).any(axis=1).mean() for i in offered])
  assert np.all(np.abs(freq - size / 20) < 0.04), freq
  # padded positions never enter
  assert not np.isin(held, batches[~valid]).any()


def test_buffer_draw_is_distinct_and_among_the_filled_slots():
  buf = {**D.empty_buffer(6, 1), 'count': jnp.int32(4)}
  for seed in range(10):
    slots, valid = D.buffer_draw(buf, jax.random.key(seed), 5)
    slots, valid = np.asarray(slots), np.asarray(valid)
    assert valid.sum() == 4 and set(slots[valid].tolist()) == {0, 1, 2, 3}
  full = {**buf, 'count': jnp.int32(50)}
  slots, valid = D.buffer_draw(full, jax.random.key(0), 5)
  assert np.all(np.asarray(valid)) and len(set(np.asarray(slots).tolist())) == 5


# ------------------------------------------------------------ der++ loss


def test_replay_loss_by_hand():
  """Two drawn rows for the MSE (the second invalid), one for the CE; seen
  classes 0 and 1 of 3.
    MSE: row 0 over classes 0, 1: ((1 - 0)^2 + (2 - 4)^2) / 2 = 2.5
    CE:  logits (0, ln 3) over classes 0, 1, label 1: -ln(3 / 4)
  loss = 0.5 * 2.5 + 0.5 * ln(4 / 3)."""
  out = jnp.array([[1.0, 2.0, 50.0], [9.0, 9.0, 9.0]])
  stored = jnp.array([[0.0, 4.0, -50.0], [0.0, 0.0, 0.0]])
  out_lab = jnp.array([[0.0, math.log(3.0), 100.0]])
  seen = jnp.array([True, True, False])
  got = D.derpp_replay_loss(out, stored, jnp.array([True, False]), out_lab, jnp.array([1]),
                            jnp.array([True]), seen, 0.5, 0.5)
  np.testing.assert_allclose(float(got), 0.5 * 2.5 + 0.5 * math.log(4.0 / 3.0), rtol=1e-6)
  assert float(D.derpp_replay_loss(out, stored, jnp.array([False, False]), out_lab,
                                   jnp.array([1]), jnp.array([False]), seen, 0.5, 0.5)) == 0.0
  only_mse = D.derpp_replay_loss(out, stored, jnp.array([True, False]), out_lab, jnp.array([1]),
                                 jnp.array([True]), seen, 0.5, 0.0)
  np.testing.assert_allclose(float(only_mse), 1.25, rtol=1e-6)


def _derpp_batch(state, key=jax.random.key(3)):
  """A Batch whose forward is the head on given features and whose training
  set is a table: fetch(key, idx) -> (features[idx], labels[idx])."""
  feats = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  labels = jnp.array([0, 1, 2])
  head = {'kernel': jnp.array([[1.0, 2.0, 0.0], [3.0, -1.0, 5.0]]), 'bias': jnp.zeros(3)}
  forward = lambda a, b, h, x: (x @ h['kernel'] + h['bias'], x)
  fetch = lambda k, idx: (feats[idx], labels[idx])
  x, y = feats[:1], labels[:1]
  logits, _ = forward(None, None, head, x)
  return interface.Batch({'a': {}, 'b': {}, 'head': head}, {}, x, y, jnp.ones(1), logits, x,
                         jnp.array([False, True, False]), forward, None, state,
                         jnp.array([0]), key, fetch)


def test_derpp_loss_term_by_hand():
  """Buffer of 2 slots holding samples 0 and 1 (labels 0, 1) with stored
  logits (0, 0, 9) and (1, 5, 9); seen: class 0 (an earlier task) and class 1
  (the current one). The model's logits: sample 0 -> (1, 2, 0), sample 1 ->
  (3, -1, 5). With draw 2 both slots are drawn for each term, so
    MSE = ((1 - 0)^2 + (2 - 0)^2 + (3 - 1)^2 + (-1 - 5)^2) / 4
    CE  = mean(-log softmax(1, 2)[0], -log softmax(3, -1)[1])
  and the loss is 0.5 MSE + 0.5 CE."""
  state = {'idx': jnp.array([0, 1], jnp.int32), 'y': jnp.array([0, 1], jnp.int32),
           'logits': jnp.array([[0.0, 0.0, 9.0], [1.0, 5.0, 9.0]]),
           'count': jnp.int32(7), 'seen': jnp.array([1.0, 0.0, 0.0])}
  loss = D.DerppLoss(draw=2, alpha=0.5, beta=0.5)(_derpp_batch(state))
  # model logits: sample 0 -> (1, 2, 0), sample 1 -> (3, -1, 5)
  mse = ((1 - 0) ** 2 + (2 - 0) ** 2 + (3 - 1) ** 2 + (-1 - 5) ** 2) / 4
  ce0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(2)))    # label 0 over classes 0, 1
  ce1 = -math.log(math.exp(-1) / (math.exp(3) + math.exp(-1)))  # label 1 over classes 0, 1
  np.testing.assert_allclose(float(loss), 0.5 * mse + 0.5 * (ce0 + ce1) / 2, rtol=1e-5)
  # An empty buffer adds nothing (the reference's `len(buffer) > 0` guard).
  empty = {**state, 'count': jnp.int32(0)}
  assert float(D.DerppLoss(draw=2, alpha=0.5, beta=0.5)(_derpp_batch(empty))) == 0.0
  # Its gradient reaches the head through the replayed forward.
  g = jax.grad(lambda h: D.DerppLoss(2, 0.5, 0.5)(
      _derpp_batch(state)._replace(params={'a': {}, 'b': {}, 'head': h})))(
          _derpp_batch(state).params['head'])
  assert float(jnp.max(jnp.abs(g['kernel']))) > 0


def test_derpp_state_update_stores_the_steps_logits_and_joins_seen():
  state = {**D.empty_buffer(4, 3), 'seen': jnp.array([1.0, 0.0, 0.0])}
  batch = _derpp_batch(state)
  new = D.derpp_state_update(state, batch)
  assert int(new['count']) == 1 and int(new['idx'][0]) == 0 and int(new['y'][0]) == 0
  np.testing.assert_allclose(np.asarray(new['logits'][0]), np.asarray(batch.logits[0]))
  np.testing.assert_array_equal(np.asarray(new['seen']), [1.0, 1.0, 0.0])


def test_derpp_round_plan_hands_out_rows_and_aggregate_writes_them_back():
  cfg = smoke_config(num_clients=3)
  m = make_method('derpp', cfg)
  assert (m.buffer_size, m.alpha, m.beta) == (200, 0.5, 0.5)
  k = 4
  buffer = D.empty_buffer(5, k, (3,))
  buffer = {**buffer, 'count': jnp.array([1, 2, 3], jnp.int32),
            'idx': buffer['idx'].at[:, 0].set(jnp.array([10, 20, 30]))}
  server = {'a': {'l': jnp.zeros((2, 1))}, 'b': {'l': jnp.zeros((1, 2))},
            'head': {'kernel': jnp.zeros((2, k)), 'bias': jnp.zeros(k)},
            'extra': {'buffer': buffer, 'seen': jnp.array([1.0, 0.0, 0.0, 0.0])}}
  plan = m.round_plan(server, 1, 0, np.array([0, 2]))
  st = plan.client_state
  np.testing.assert_array_equal(np.asarray(st['count']), [1, 3])
  np.testing.assert_array_equal(np.asarray(st['idx'][:, 0]), [10, 30])
  assert st['seen'].shape == (2, k) and plan.spec.state_update is D.derpp_state_update
  assert plan.spec.loss_term == D.DerppLoss(min(cfg.batch_size, 200), 0.5, 0.5)
  # Results: rows for clients 2, 0 and a padded row (num_samples 0) claiming client 1.
  trained = {'idx': jnp.full((3, 5), 7, jnp.int32), 'y': jnp.ones((3, 5), jnp.int32),
             'logits': jnp.ones((3, 5, k)), 'count': jnp.array([9, 8, 99], jnp.int32),
             'seen': jnp.array([[1.0, 0, 1, 0], [1.0, 1, 0, 0], [1.0, 1, 1, 1]])}
  stack = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 3), t)
  res = _results(stack(server['a']), stack(server['b']), stack(server['head']), [4.0, 2.0, 0.0],
                 client_ids=jnp.array([2, 0, 1], jnp.int32), state=trained)
  new, _ = m.aggregate(server, res, 1, 0)
  nb = new['extra']['buffer']
  np.testing.assert_array_equal(np.asarray(nb['count']), [8, 2, 9])
  np.testing.assert_array_equal(np.asarray(nb['idx'][:, 0]), [7, 20, 7])
  np.testing.assert_array_equal(np.asarray(new['extra']['seen']), [1.0, 1.0, 1.0, 0.0])


# ----------------------------------------------------------- smoke runs


@pytest.mark.parametrize('method', ['ties', 'fedsum'])
def test_task_vector_methods_run_on_the_loop(method, tmp_path):
  from lorm_jax.federated import simulate  # pylint: disable=import-outside-toplevel
  res = simulate.run(smoke_config(method=method), str(tmp_path), progress=False)
  assert res['method'] == method and 0.0 <= res['final_accuracy'] <= 1.0


def _derpp_config():
  return smoke_config(method='derpp', **{'derpp.buffer_size': 10})


@pytest.fixture(scope='module')
def derpp_run(tmp_path_factory):
  """(workdir, results) of one uninterrupted DER++ smoke run, buffers of 10."""
  from lorm_jax.federated import simulate  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp('derpp'))
  return workdir, simulate.run(_derpp_config(), workdir, progress=False)


def test_derpp_runs_and_each_clients_buffer_saw_every_trained_sample(derpp_run):
  """After the run each client's count is the number of samples it trained on
  (every task, round and epoch), its buffer holds min(count, 10) of them."""
  from lorm_jax import checkpointing  # pylint: disable=import-outside-toplevel
  from lorm_jax.federated import simulate  # pylint: disable=import-outside-toplevel
  cfg = _derpp_config()
  workdir, res = derpp_run
  assert res['method'] == 'derpp' and 0.0 <= res['final_accuracy'] <= 1.0
  exp, _ = simulate.prepare(cfg, workdir)
  ckpt = checkpointing.Checkpointer(workdir)
  state, _ = ckpt.restore(simulate.initial_server(exp))
  ckpt.close()
  buf = state['extra']['buffer']
  per_client = [sum(len(exp.split[t][i]) for t in range(len(exp.split)))
                for i in range(cfg.num_clients)]
  want = [n * cfg.rounds * cfg.local_epochs for n in per_client]
  np.testing.assert_array_equal(np.asarray(buf['count']), want)
  for i in range(cfg.num_clients):
    mine = np.concatenate([exp.split[t][i] for t in range(len(exp.split))])
    assert set(np.asarray(buf['idx'][i]).tolist()) <= set(mine.tolist())
    np.testing.assert_array_equal(np.asarray(buf['y'][i]),
                                  np.asarray(exp.train_labels)[np.asarray(buf['idx'][i])])
  assert np.all(np.asarray(state['extra']['seen']) == 1.0)


def test_derpp_resumed_run_equals_the_uninterrupted_one(derpp_run, tmp_path):
  """The buffers travel in the checkpoints: stopping after round 1 and after
  the task end, then resuming, gives the uninterrupted run's results."""
  from conftest import strip_wall_time  # pylint: disable=import-outside-toplevel
  from lorm_jax.federated import simulate  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  assert simulate.run(_derpp_config(), workdir, max_rounds=1, progress=False) == {}
  assert simulate.run(_derpp_config(), workdir, max_rounds=2, progress=False) == {}
  resumed = simulate.run(_derpp_config(), workdir, progress=False)
  assert strip_wall_time(resumed) == strip_wall_time(derpp_run[1])


def test_config_validation_names_the_bad_value():
  from lorm_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from lorm_jax.federated import setup  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match='ties.trim must be in'):
    setup.validate_config(smoke_config(method='ties', **{'ties.trim': 1.5}))
  with pytest.raises(ConfigError, match='derpp.buffer_size must be at least 1'):
    setup.validate_config(smoke_config(method='derpp', **{'derpp.buffer_size': 0}))
  setup.validate_config(smoke_config(method='derpp'))

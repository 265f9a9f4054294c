"""VeRA and (IA)^3 wired into the model, LoRM and FedAvg (`config.model.adapter`).

The layer and the model are checked against W0 + the adapter's dense update
(`adapters.ADAPTERS[...].deltas`, the maths of tests/test_merge_adapters.py);
LoRM's server merge against `merge_adapters`' functions called on the same
inputs; the smoke runs end to end with each adapter and method, their bytes
from metrics.jsonl against the vectors and Grams a client sends. adapter='lora'
is checked by the smoke digest (docs/digests), not here.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import smoke_config
from lorm_jax import merge as M
from lorm_jax import merge_adapters as MA
from lorm_jax.errors import ConfigError
from lorm_jax.federated import setup, simulate
from lorm_jax.methods import ClientResults, make_method
from lorm_jax.models import adapters as AD
from lorm_jax.models import functional as F, lora, vit

ADAPTERS = ('lora', 'vera', 'ia3')
D, M_DIM, VERA_R = 16, 32, 8


def _cfg(adapter: str, **kw) -> vit.ViTConfig:
  return vit.ViTConfig(image_size=14, patch_size=7, width=D, depth=2, num_heads=2,
                       mlp_dim=M_DIM, num_classes=4, lora_rank=2, adapter=adapter,
                       vera_rank=VERA_R, vera_seed=5, **kw)


def _model(adapter: str, **kw) -> F.FunctionalViT:
  return F.FunctionalViT(vit.ViT(_cfg(adapter, **kw), rngs=nnx.Rngs(0)))


def _random_like(key: jax.Array, tree: F.Flat, around: float = 0.0) -> F.Flat:
  keys = jax.random.split(key, max(len(tree), 1))
  return {k: around + 0.3 * jax.random.normal(kk, v.shape) for kk, (k, v) in
          zip(keys, sorted(tree.items()))}


def _trained(fm: F.FunctionalViT, key: jax.Array) -> tuple[F.Flat, F.Flat]:
  """Nonzero adapter values: (IA)^3's vectors around 1, the others around 0."""
  p = fm.initial_params()
  around = 1.0 if fm.cfg.adapter == 'ia3' else 0.0
  ka, kb = jax.random.split(key)
  return _random_like(ka, p.a), _random_like(kb, p.b, around)


def _consts(fm: F.FunctionalViT) -> dict:
  """The adapter's server constants for fm's initial parameters (what its
  `deltas` reads besides a and b)."""
  p, spec = fm.initial_params(), fm.adapter
  return spec.server_constants(p.frozen, spec.update_shapes(p.a, p.b, p.frozen))


def _head() -> F.Flat:
  return F.init_head(jax.random.key(2), D, 4)


def _images(n: int = 3) -> jax.Array:
  return jax.random.normal(jax.random.key(3), (n, 14, 14, 3))


# ---------------------------------------------------------------- the layer


def _layer(adapter: str, kind: str, n: int, o: int, key: int = 0):
  """A LoRALinear of `kind` with nonzero adapter values, and its dense update (n, o)."""
  spec = AD.get(adapter)
  rank = VERA_R if adapter == 'vera' else 2
  pairs = spec.projections([(n, o)], rank, 5)
  proj = tuple(lora.VeraProjection(x) for x in pairs[(n, o)]) if pairs else None
  layer = lora.LoRALinear(n, o, rank, dtype='float32', rngs=nnx.Rngs(key), adapter=adapter,
                          kind=kind, projections=proj)
  ks = jax.random.split(jax.random.key(key + 1), 3)
  layer.bias.set_value(jax.random.normal(ks[0], (o,)))
  if layer.lora_a is not None:
    layer.lora_a.set_value(0.3 * jax.random.normal(ks[1], layer.lora_a.shape))
  if layer.lora_b is not None:
    around = 1.0 if adapter == 'ia3' else 0.0
    layer.lora_b.set_value(around + 0.3 * jax.random.normal(ks[2], layer.lora_b.shape))
  w0 = np.asarray(layer.kernel[...], np.float64)
  a = None if layer.lora_a is None else np.asarray(layer.lora_a[...], np.float64)
  b = None if layer.lora_b is None else np.asarray(layer.lora_b[...], np.float64)
  if adapter == 'lora':
    delta = a @ b
  elif adapter == 'vera':
    pa, pb = (np.asarray(x, np.float64) for x in pairs[(n, o)])
    delta = pa @ np.diag(a) @ pb @ np.diag(b)
  elif kind == 'qkv':
    delta = w0 @ np.diag(np.concatenate([np.ones(n), b]) - 1.0)
  elif kind == 'fc2':
    delta = np.diag(b - 1.0) @ w0
  else:
    delta = np.zeros((n, o))
  return layer, delta


LAYER_CASES = [('lora', 'fc1', D, M_DIM), ('vera', 'qkv', D, 3 * D), ('vera', 'fc2', M_DIM, D),
               ('ia3', 'qkv', D, 3 * D), ('ia3', 'fc2', M_DIM, D), ('ia3', 'proj', D, D),
               ('ia3', 'fc1', D, M_DIM)]


@pytest.mark.parametrize('adapter,kind,n,o', LAYER_CASES)
def test_layer_forward_is_the_base_kernel_plus_the_dense_update(adapter, kind, n, o):
  layer, delta = _layer(adapter, kind, n, o)
  x = jax.random.normal(jax.random.key(9), (2, 5, n))
  want = (np.asarray(x, np.float64) @ (np.asarray(layer.kernel[...], np.float64) + delta)
          + np.asarray(layer.bias[...], np.float64))
  np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('adapter,kind,n,o', LAYER_CASES)
def test_a_fresh_layer_computes_exactly_the_base_layer(adapter, kind, n, o):
  layer = _layer(adapter, kind, n, o)[0]
  spec = AD.get(adapter)
  a = None if layer.lora_a is None else {'l': layer.lora_a[...]}
  b = None if layer.lora_b is None else {'l': layer.lora_b[...]}
  if a is not None or b is not None:  # the adapter's values at a task's start
    fa, fb = spec.fresh(jax.random.key(4), a or {}, b or {})
    if a is not None:
      layer.lora_a.set_value(fa['l'])
    if b is not None:
      layer.lora_b.set_value(fb['l'])
  x = jax.random.normal(jax.random.key(9), (2, 5, n))
  base = jnp.dot(x, layer.kernel[...], preferred_element_type=jnp.float32) + layer.bias[...]
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(base))


def test_ia3_fc2_sows_the_gram_of_its_input_before_the_scaling_and_unadapted_layers_none():
  layer, _ = _layer('ia3', 'fc2', M_DIM, D)
  x = jax.random.normal(jax.random.key(9), (2, 5, M_DIM))
  layer(x, 'diag')
  want = np.sum(np.asarray(x, np.float64) ** 2, axis=(0, 1))
  np.testing.assert_allclose(np.asarray(layer.gram[...]), want, rtol=1e-5)
  plain, _ = _layer('ia3', 'proj', D, D)
  plain(jax.random.normal(jax.random.key(9), (2, 5, D)), 'full')
  assert not hasattr(plain, 'gram') and plain.lora_a is None and plain.lora_b is None


@pytest.mark.parametrize('adapter', ADAPTERS)
def test_model_equals_w0_plus_the_dense_updates_and_its_grams_cover_the_adapted_layers(adapter):
  fm = _model(adapter)
  p, spec = fm.initial_params(), fm.adapter
  a, b = _trained(fm, jax.random.key(1))
  consts = _consts(fm)
  deltas = spec.deltas(consts, a, b)
  x = _images()
  got, grams, _ = fm.apply(p.frozen, a, b, _head(), x, gram_mode='diag')
  want, _, _ = fm.apply(F.add_kernel_deltas(p.frozen, deltas), a, spec.neutral_b(b), _head(), x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  assert sorted(grams) == sorted(fm.layer_inputs) == sorted(deltas) == sorted(p.b)
  assert {k: v.shape[0] for k, v in grams.items()} == fm.layer_inputs
  kinds = {AD.layer_kind(k) for k in grams}
  assert kinds == ({'qkv', 'fc2'} if adapter == 'ia3' else set(AD.LAYERS))


@pytest.mark.parametrize('adapter', ADAPTERS)
def test_bfloat16_compute_stays_close_to_float32(adapter):
  f32, b16 = _model(adapter), _model(adapter, dtype='bfloat16')
  p = f32.initial_params()
  a, b = _trained(f32, jax.random.key(1))
  want = f32.apply(p.frozen, a, b, _head(), _images(), features_only=True)[0]
  got = b16.apply(b16.compute_view(p.frozen), a, b, _head(), _images(), features_only=True)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.05)


def test_every_adapter_holds_the_same_random_backbone_and_starts_as_it():
  models = {ad: _model(ad) for ad in ADAPTERS}
  frozen = {ad: fm.initial_params().frozen for ad, fm in models.items()}
  base = frozen['lora']
  for ad, fz in frozen.items():
    assert {k: v for k, v in fz.items() if not k.startswith(AD.PROJECTIONS)}.keys() == base.keys()
    for k, v in base.items():
      np.testing.assert_array_equal(np.asarray(fz[k]), np.asarray(v))
  out = {}
  for ad, fm in models.items():
    p = fm.initial_params()
    a, b = fm.adapter.fresh(jax.random.key(0), p.a, p.b)
    out[ad] = np.asarray(fm.apply(p.frozen, a, b, _head(), _images())[0])
  for ad in ADAPTERS:
    np.testing.assert_allclose(out[ad], out['lora'], rtol=1e-6, atol=1e-6)


def test_vera_projections_are_frozen_once_per_shape_and_regenerated_from_the_seed():
  fm = _model('vera')
  p = fm.initial_params()
  shapes = sorted(set(_cfg('vera').layer_shapes().values()))
  keys = sorted(k for k in p.frozen if k.startswith(AD.PROJECTIONS))
  assert keys == sorted(k for s in shapes for k in AD.projection_keys(*s))
  for s in shapes:
    for key, want in zip(AD.projection_keys(*s), AD.vera_projections(5, *s, VERA_R)):
      np.testing.assert_array_equal(np.asarray(p.frozen[key]), np.asarray(want))
  assert not any(AD.PROJECTIONS in k for k in list(p.a) + list(p.b))
  assert F.tree_size_bytes((p.a, p.b)) == 4 * 2 * (VERA_R + 3 * D + VERA_R + D + VERA_R
                                                   + M_DIM + VERA_R + D)
  # A model filled from a checkpoint (zeros for everything the file lacks)
  # gets its projections from the config again.
  model = nnx.eval_shape(lambda: vit.ViT(_cfg('vera'), rngs=nnx.Rngs(0)))
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      node.set_value(jnp.zeros(node.get_value().shape, jnp.float32))
  filled = F.FunctionalViT(model).initial_params().frozen
  for key in keys:
    np.testing.assert_array_equal(np.asarray(filled[key]), np.asarray(p.frozen[key]))


@pytest.mark.parametrize('adapter', ADAPTERS)
def test_scale_b_scales_the_update_and_neutral_b_makes_none(adapter):
  fm = _model(adapter)
  spec = fm.adapter
  a, b = _trained(fm, jax.random.key(1))
  consts = _consts(fm)
  full, third = spec.deltas(consts, a, b), spec.deltas(consts, a, spec.scale_b(b, 1 / 3))
  none = spec.deltas(consts, a, spec.neutral_b(b))
  for k in full:
    np.testing.assert_allclose(np.asarray(third[k]), np.asarray(full[k]) / 3, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(none[k]), 0.0)


# ------------------------------------------------------------------ LoRM


def _method(name: str, adapter: str, **kw):
  return make_method(name, smoke_config(method=name, **{'model.adapter': adapter}, **kw))


def _per_client(tree: F.Flat, key: jax.Array, clients: int, around: float) -> F.Flat:
  """Random values shaped like tree's leaves, stacked over a leading client axis."""
  rows = [_random_like(jax.random.fold_in(key, c), tree, around) for c in range(clients)]
  return {k: jnp.stack([r[k] for r in rows]) for k in tree}


def _round(adapter: str, key: jax.Array, clients: int = 3):
  """(fm, LoRM, server with trained values, ClientResults with random vectors
  and Gram diagonals, the second client absent)."""
  fm = _model(adapter)
  lorm = _method('lorm', adapter)
  p = fm.initial_params()
  server = lorm.init_server(p, _head(), jax.random.key(0))
  a, b = _trained(fm, jax.random.fold_in(key, 0))
  server = {**server, 'a': a, 'b': b}
  b_around = 1.0 if adapter == 'ia3' else 0.0
  grams = {k: jax.random.uniform(jax.random.fold_in(key, 3), (clients, n), minval=0.5,
                                 maxval=2.0) for k, n in fm.layer_inputs.items()}
  results = ClientResults(
      a=_per_client(a, jax.random.fold_in(key, 1), clients, 0.0),
      b=_per_client(b, jax.random.fold_in(key, 2), clients, b_around),
      head={'kernel': jax.random.normal(key, (clients, D, 4)), 'bias': jnp.zeros((clients, 4))},
      grams=grams, head_grams=jnp.stack([jnp.eye(D)] * clients),
      num_samples=jnp.array([3.0, 0.0, 2.0][:clients]))
  return fm, lorm, server, results


def test_lorm_vera_merges_b_then_d_by_merge_adapters():
  fm, lorm, server, res = _round('vera', jax.random.key(7))
  frozen, w = fm.initial_params().frozen, jnp.array([1.0, 0.0, 1.0])
  assert lorm.round_factors(0, 0) == ('b',) and lorm.round_factors(0, 1) == ('a',)
  assert lorm.round_factors(1, 0) == ('b',)
  for rnd in (0, 1):
    new, info = lorm.aggregate(server, res, 0, rnd)
    assert int(info['merge_fallbacks']) == 0
    for k in fm.layer_inputs:
      pa, pb = (frozen[x] for x in AD.projection_keys(*frozen[F.kernel_key(k)].shape))
      if rnd == 0:
        want = MA.vera_merge_b(res.b[k], server['a'][k], pa, pb, res.grams[k], weights=w)
        got, same = new['b'][k], (new['a'][k], server['a'][k])
      else:
        want = MA.vera_merge_d(res.a[k], server['b'][k], pa, pb, res.grams[k], weights=w)
        got, same = new['a'][k], (new['b'][k], server['b'][k])
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(*map(np.asarray, same))


def test_lorm_ia3_merges_every_vector_every_round_by_merge_adapters():
  fm, lorm, server, res = _round('ia3', jax.random.key(8))
  frozen, w = fm.initial_params().frozen, jnp.array([1.0, 0.0, 1.0])
  assert lorm.round_factors(0, 0) == lorm.round_factors(2, 3) == ('b',)
  assert lorm.local_spec(0, 1).factors == ('b',)
  new, info = lorm.aggregate(server, res, 0, 1)
  assert int(info['merge_fallbacks']) == 0 and new['a'] == {}
  for k in fm.layer_inputs:
    kernel = frozen[F.kernel_key(k)]
    if AD.layer_kind(k) == 'qkv':
      want = MA.ia3_merge_columns(res.b[k], kernel[:, D:], res.grams[k], weights=w)
    else:
      want = MA.ia3_merge_rows(res.b[k], kernel, res.grams[k], weights=w)
    np.testing.assert_allclose(np.asarray(new['b'][k]), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('adapter', ['vera', 'ia3'])
def test_lorm_cross_task_merge_folds_the_dense_update(adapter):
  """One task with Gram g: Q^-1 P = (g o dW) / g = dW; the evaluated model
  adds no adapter on top (neutral b) and the Gram-pass model scales the update."""
  fm, lorm, server, _ = _round(adapter, jax.random.key(9))
  spec = fm.adapter
  consts = _consts(fm)
  want = spec.deltas(consts, server['a'], server['b'])
  task_grams = {k: jnp.full((n,), 2.0) for k, n in fm.layer_inputs.items()}
  done = lorm.end_task(server, 0, task_grams)
  deltas, a, b = lorm.eval_model(done, 0)
  for k in want:
    np.testing.assert_allclose(np.asarray(deltas[k]), np.asarray(want[k]), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(spec.deltas(consts, a, b)[next(iter(b))]), 0.0)
  gram_deltas, params = lorm.gram_inputs(done, 1, {'a': a, 'b': server['b'], 'head': {}})
  half = spec.deltas(consts, params['a'], params['b'])
  for k in want:
    np.testing.assert_allclose(np.asarray(gram_deltas[k]), np.asarray(want[k]) / 2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(half[k]), np.asarray(want[k]) / 2, atol=1e-6)


def test_fedavg_averages_the_adapters_vectors():
  fm, _, server, res = _round('vera', jax.random.key(10))
  fedavg = _method('fedavg', 'vera')
  new, _ = fedavg.aggregate(server, res, 0, 0)
  for f in ('a', 'b'):
    want = M.fedavg_tree(getattr(res, f), res.num_samples)
    for k in want:
      np.testing.assert_allclose(np.asarray(new[f][k]), np.asarray(want[k]), rtol=1e-6)
  fm, _, server, res = _round('ia3', jax.random.key(11))
  ia3 = _method('fedavg', 'ia3')
  assert ia3.local_spec(0, 0).factors == ('b',)
  new, _ = ia3.aggregate(server, res, 0, 0)
  assert new['a'] == {}


def test_config_errors_are_one_line():
  for bad, msg in [({'model.adapter': 'dora'}, "unknown model.adapter 'dora'"),
                   ({'method': 'regmean', 'model.adapter': 'vera'},
                    'method regmean supports model.adapter lora'),
                   ({'model.adapter': 'ia3', 'schedule': 'per_task'}, 'trains every vector'),
                   ({'model.adapter': 'vera', 'model.vera_rank': 0}, 'model.vera_rank')]:
    with pytest.raises(ConfigError, match=msg) as e:
      setup.validate_config(smoke_config(**bad))
    assert '\n' not in str(e.value)


def test_run_architecture_reads_the_adapter_from_the_config():
  c = smoke_config(seed=3, **{'model.adapter': 'vera', 'model.vera_rank': 16})
  cfg = vit.run_architecture(c, 10)
  assert (cfg.adapter, cfg.vera_rank, cfg.vera_seed, cfg.adapter_rank) == ('vera', 16, 3, 16)
  assert vit.run_architecture(smoke_config(), 10).adapter == 'lora'


# ------------------------------------------------------------- smoke runs


def _rounds(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r.get('kind') == 'round']


@pytest.mark.parametrize('method', ['lorm', 'fedavg'])
@pytest.mark.parametrize('adapter', ['vera', 'ia3'])
def test_smoke_run_with_each_adapter_finishes_and_counts_its_bytes(tmp_path, method, adapter):
  c = smoke_config(method=method, **{'model.adapter': adapter})
  results = simulate.run(c, str(tmp_path), progress=False)
  assert np.isfinite(results['final_accuracy']) and results['merge_fallbacks'] == 0
  fm = F.FunctionalViT(vit.ViT(vit.run_architecture(c, 10), rngs=nnx.Rngs(0)))
  p = fm.initial_params()
  width, head = fm.cfg.width, F.tree_size_bytes(F.init_head(jax.random.key(0), 64, 10))
  assert width == 64
  down = F.tree_size_bytes((p.a, p.b)) + head   # VeRA's projections are never sent
  grams = 4 * sum(fm.layer_inputs.values()) + 4 * width ** 2 if method == 'lorm' else 0
  for r in _rounds(str(tmp_path)):
    factors = tuple(r['factors'])
    assert factors == {('lorm', 'vera'): ('b',) if r['round'] % 2 == 0 else ('a',),
                       ('lorm', 'ia3'): ('b',), ('fedavg', 'vera'): ('a', 'b'),
                       ('fedavg', 'ia3'): ('b',)}[method, adapter]
    assert r['download_bytes_per_client'] == down
    trained = F.tree_size_bytes([getattr(p, f) for f in factors])
    assert r['upload_bytes_per_client'] == trained + head + grams

"""The pure pieces of the PyTorch-reference harness (experiments/reference):
the backbone's conversion to timm's names and layout, the draws exported for
a replay, and reading the reference's printout. The harness's run itself needs
torch and is checked by its own `--check` and by replayed runs (docs/fidelity.md)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import smoke_config
from experiments.reference.export_inputs import replay_arrays, timm_state_dict
from experiments.reference.run_fed_mammoth import results_from_printout
from lorm_jax.federated import setup, simulate
from lorm_jax.models import vit

CFG = vit.ViTConfig(image_size=28, patch_size=14, width=16, depth=2, num_heads=2, mlp_dim=64,
                    num_classes=4, lora_rank=2, layerscale=True)


def _model_and_flat():
  model = vit.ViT(CFG, rngs=nnx.Rngs(3))
  flat = {'.'.join(map(str, k)): np.asarray(v.get_value())
          for k, v in nnx.to_flat_state(nnx.state(model))}
  return model, flat


def test_timm_names_are_the_vision_transformer_state_dict_less_the_head():
  _, flat = _model_and_flat()
  w = timm_state_dict(flat, CFG.depth)
  per_block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight',
               'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
               'mlp.fc2.weight', 'mlp.fc2.bias', 'ls1.gamma', 'ls2.gamma']
  want = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
          'norm.weight', 'norm.bias'} | {f'blocks.{i}.{n}' for i in range(CFG.depth) for n in per_block}
  assert set(w) == {'w:model.' + n for n in want}
  assert w['w:model.blocks.1.mlp.fc1.weight'].shape == (CFG.mlp_dim, CFG.width)  # (out, in)
  assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in w.values())


def test_exported_patch_convolution_and_linears_compute_what_the_model_does():
  model, flat = _model_and_flat()
  w = timm_state_dict(flat, CFG.depth)
  images = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
  # torch's Conv2d(stride = kernel = p) on NCHW with an OIHW weight, written out
  x = images.transpose(0, 3, 1, 2)
  k = w['w:model.patch_embed.proj.weight']
  p, g = CFG.patch_size, CFG.image_size // CFG.patch_size
  patches = x.reshape(2, 3, g, p, g, p)
  conv = np.einsum('bcipjq,ocpq->bijo', patches, k).reshape(2, g * g, -1) + w['w:model.patch_embed.proj.bias']
  tokens = conv + w['w:model.pos_embed'][:, 1:]
  ours = np.asarray(model.embed(jnp.asarray(images)))
  np.testing.assert_allclose(tokens, ours[:, 1:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w['w:model.cls_token'] + w['w:model.pos_embed'][:, :1], ours[:1, :1],
                             rtol=1e-6, atol=1e-6)
  # torch's Linear: y = x W^T + b
  v = np.random.default_rng(1).standard_normal((5, CFG.width)).astype(np.float32)
  qkv = model.blocks[0].attn.qkv
  ours_linear = v @ np.asarray(qkv.kernel.get_value()) + np.asarray(qkv.bias.get_value())
  np.testing.assert_allclose(v @ w['w:model.blocks.0.attn.qkv.weight'].T + w['w:model.blocks.0.attn.qkv.bias'],
                             ours_linear, rtol=1e-5, atol=1e-5)


def test_results_are_the_last_evaluation_before_each_task_ends():
  text = '\n'.join([
      'Round time: 10s',
      'Mean accuracy up to task 1: 80.5 % Task accuracies: [80.5]',
      'Mean accuracy up to task 1: 97.25 % Task accuracies: [97.25]',
      'Task 1 time: 1m 53s',
      'Mean accuracy up to task 2: 52.62 % Task accuracies: [92.25, 13.0]',
      'Mean accuracy up to task 2: 47.25 % Task accuracies: [24.0, 70.5]',
      'Task 2 time: 1m 57s',
  ])
  r = results_from_printout(text)
  assert r == {'accuracy_after_each_task': [97.25, 47.25], 'per_task_accuracy': [24.0, 70.5],
               'final_accuracy': 47.25}
  assert results_from_printout('no evaluation') == {
      'accuracy_after_each_task': [], 'per_task_accuracy': None, 'final_accuracy': None}


def test_replay_export_holds_what_the_run_draws(tmp_path, monkeypatch):
  """Every training pass's sample order, the server's LoRA A at each task's
  first round and the initial head, as a smoke run (2 local epochs, uneven
  clients) hands them to its training, are what the export writes."""
  c = smoke_config(local_epochs=2)
  seen = []
  original = simulate.Passes.train

  def recording(self, spec, frozen, server, plan, *args):
    seen.append((np.asarray(plan[0]['idx']), np.asarray(plan[0]['mask']),
                 {k: np.asarray(v) for k, v in server['a'].items()},
                 {k: np.asarray(v) for k, v in server['head'].items()}))
    return original(self, spec, frozen, server, plan, *args)

  monkeypatch.setattr(simulate.Passes, 'train', recording)
  simulate.run(c, str(tmp_path / 'run'), progress=False)
  exp = setup.build_experiment(c, '', write=False)
  z = replay_arrays(c, exp)
  assert len(seen) == c.num_tasks * c.rounds
  np.testing.assert_array_equal(z['replay:head.weight'], seen[0][3]['kernel'].T)
  np.testing.assert_array_equal(z['replay:head.bias'], seen[0][3]['bias'])
  for t, clients in enumerate(exp.split):
    a = seen[t * c.rounds][2]  # the first round of a task trains from the fresh A
    assert {f'replay:a{t}:model.{n}.weight' for n in a} <= set(z)
    for n, v in a.items():
      np.testing.assert_array_equal(z[f'replay:a{t}:model.{n}.weight'], v.T)
    for k, idx in enumerate(clients):
      orders = z[f'replay:order_{t}_{k}']
      assert orders.shape == (c.rounds * c.local_epochs, len(idx))
      assert all(sorted(o) == list(range(len(idx))) for o in orders)  # each epoch a permutation
      for r in range(c.rounds):
        idx_r, mask_r = seen[t * c.rounds + r][:2]
        trained = idx_r[k][mask_r[k] > 0]
        replayed = np.asarray(idx)[orders[r * c.local_epochs:(r + 1) * c.local_epochs]].ravel()
        np.testing.assert_array_equal(replayed, trained)

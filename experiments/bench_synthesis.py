"""Where TARGET's data-free synthesis spends its time, piece by compiled piece.

  python -m experiments.bench_synthesis                   # the embedded default's shapes
  python -m experiments.bench_synthesis --tiny            # tiny ViT, small generator (tests)
  python -m experiments.bench_synthesis --cpu-devices=2   # also: inputs replicated, as a run's

A synthesis (`lorm_jax.methods.target.Synthesizer.run`) is syn_round rounds of
g_steps generator steps, each step the generator's and the teacher's forward
and backward pass to the images, plus the student's from round `warmup` on (the
adversarial term), and kd_steps distillation steps of the student per round
after the warm-up. This script times, on a random ViT of the config's
architecture, image size and compute dtype (`model.dtype`, 'auto' resolved
here) with the config's `target.*` constants:

  generator       z (B, nz) -> images (B, S, S, C) and back to the generator and z
  teacher         images -> logits and back to the images, through W0 + B A (the
                  run's compute view of W0)
  student         the same through the student as the generator step gets it
                  (float32 parameters, cast in every step where the compute dtype
                  is narrower), and through a compute view of it (kernels cast once)
  gen_step        one generator step, adversarial term off and on
  kd_step         one distillation step of the student

each as one jitted call, median after a compiling call, with XLA's FLOP count
of it, and a synthesis projected from them. With several devices
(`--cpu-devices`, as `experiments.run` makes one per core), the generator
step once more with its inputs replicated over all of them, as a run's server
state is: such a step runs whole on every device (the synthesis therefore
moves its inputs to one device first, `target.on_one_device`). Writes the "TARGET synthesis"
section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from experiments import bench_common as bc
from lorm_jax import metrics, runtime
from lorm_jax.data import augment
from lorm_jax.federated.runner import ClientRunner
from lorm_jax.methods import make_method
from lorm_jax.methods import target as T
from lorm_jax.models import functional as F, generator as G, vit

NUM_CLASSES = 10


def _config(path: str, tiny: bool = False):
  c = importlib.import_module(path).get_config()
  c.unlock()
  c.method = 'target'
  if tiny:  # a generator small enough for a test
    c.target.ngf, c.target.nz = 8, 32
  if c.model.dtype == 'auto':
    c.model.dtype = runtime.auto_compute_dtype()[0]
  c.lock()
  return c


def synthesizer(config) -> tuple[T.Synthesizer, dict, dict]:
  """(Synthesizer on a random ViT of config's shapes, teacher, student) as
  `Synthesizer.run` builds them, with a non-zero B in the teacher."""
  cfg = vit.architecture(config.model.name, image_size=config.image_size,
                         num_classes=NUM_CLASSES, lora_rank=config.model.rank,
                         dtype=config.model.dtype)
  model = bc.random_model(cfg)
  method = make_method('target', config)
  spec = method.train_preprocess_spec()
  syn = T.Synthesizer(method.synthesis_spec(), model,
                      lambda k, x: augment.preprocess(k, x, spec),
                      spec.mean or (0.0, 0.0, 0.0), spec.std or (1.0, 1.0, 1.0))
  p = model.initial_params()
  a, b = F.init_lora(jax.random.key(1), p.a, p.b)
  b = jax.tree.map(lambda x: 0.02 * jax.random.normal(jax.random.key(2), x.shape), b)
  head = F.init_head(jax.random.key(3), cfg.width, NUM_CLASSES)
  a, b = F.full_lora(model, a, b)
  teacher = {'frozen': model.compute_view(p.frozen), 'a': a, 'b': b, 'head': head}
  student = T.reinit_student(p.frozen, head, jax.random.key(4))
  return syn, teacher, student


def _timed(fn: Callable, args: tuple, repeats: int, static: dict | None = None) -> dict:
  """Seconds per call (median after the compiling call) and XLA's FLOPs of fn(*args)."""
  compiled = jax.jit(fn, static_argnames=tuple(static or ())).lower(
      *args, **(static or {})).compile()
  flops, _ = metrics.compiled_cost(compiled)
  seconds = bc.time_fn(compiled, *args, repeats=repeats)
  return {'seconds': seconds, 'gflop': flops / 1e9, 'gflops': flops / seconds / 1e9}


def measure(config, repeats: int) -> dict[str, dict]:
  """{piece: {'seconds', 'gflop', 'gflops'}} of the module docstring's pieces."""
  syn, teacher, student = synthesizer(config)
  s = syn.spec
  keys = jax.random.split(jax.random.key(5), 4)
  meta = G.FunctionalGenerator(syn.new_generator(0)).initial_params()
  z = jax.random.normal(keys[0], (s.batch, s.nz))
  targets = jax.random.randint(keys[1], (s.batch,), 0, NUM_CLASSES)
  size = syn.model.cfg.image_size
  x = jax.random.uniform(keys[2], (s.batch, size, size, syn.channels))
  to_images = lambda g, zz: jnp.sum(syn.gen.apply(g, zz))
  through = lambda logits_fn, net: lambda xx: jax.grad(
      lambda v: jnp.sum(logits_fn(net, v)))(xx)
  carry = syn.init_inner(meta, z)
  pool = jnp.zeros((s.pool_size, size, size, syn.channels), jnp.uint8)
  rows = {
      'generator': _timed(jax.grad(to_images, argnums=(0, 1)), (meta, z), repeats),
      'teacher': _timed(through(syn.teacher_logits, teacher), (x,), repeats),
      'student': _timed(through(syn.student_logits, student), (x,), repeats),
      'student (compute view)': _timed(through(syn.student_logits, {
          'frozen': syn.model.compute_view(student['frozen']), 'head': student['head']}),
                                       (x,), repeats),
  }
  for adv_on in (False, True):
    rows[f'gen_step, adv {"on" if adv_on else "off"}'] = _timed(
        syn._gen_step, (carry, targets, keys[3], teacher, student), repeats,  # pylint: disable=protected-access
        {'adv_on': adv_on})
  if jax.device_count() > 1:
    # Replicated as a run replicates its server state.
    rep = ClientRunner(config.client_mode, 1).replicate(
        (carry, targets, keys[3], teacher, student))
    rows[f'gen_step, adv on, inputs replicated over {jax.device_count()} devices'] = _timed(
        syn._gen_step, rep, repeats, {'adv_on': True})  # pylint: disable=protected-access
  rows['kd_step'] = _timed(
      syn._kd_step, (student, syn.student_opt.init(student), pool, jnp.int32(s.pool_size),  # pylint: disable=protected-access
                     jnp.int32(0), keys[3], teacher), repeats)
  return rows


def projection(spec: T.SynthesisSpec, rows: dict[str, dict]) -> dict[str, float]:
  """Seconds and TFLOP of one synthesis from the per-call rows: rounds before
  `warmup` without the adversarial term, the rest with it, kd_steps student
  steps in each round after the warm-up (as `Synthesizer.run` schedules them)."""
  off = spec.warmup - 1
  on = spec.syn_round - off
  kd = (spec.syn_round - spec.warmup) * spec.kd_steps
  calls = {'gen_step, adv off': off * spec.g_steps, 'gen_step, adv on': on * spec.g_steps,
           'kd_step': kd}
  return {'seconds': sum(n * rows[k]['seconds'] for k, n in calls.items()),
          'tflop': sum(n * rows[k]['gflop'] for k, n in calls.items()) / 1e3}


def render(name: str, config, s: T.SynthesisSpec, rows: dict[str, dict],
           proj: dict[str, float], machine: str, cmd: str) -> str:
  lines = [f'Command: `{cmd}`  ', f'Machine: {machine}  ',
           f'{name}, compute dtype {config.model.dtype}; synthesis batch {s.batch}, generator '
           f'nz {s.nz}, ngf {s.ngf}; one jitted call per row, median of repeated calls after '
           'the compiling one; FLOPs by XLA\'s cost analysis.', '',
           '| piece | ms per call | GFLOP per call | GFLOP/s |', '|---|---|---|---|']
  for k, r in rows.items():
    lines.append(f"| {k} | {1e3 * r['seconds']:.1f} | {r['gflop']:.2f} | {r['gflops']:.0f} |")
  lines += ['', f'One synthesis projected from these rows ({s.syn_round} rounds x {s.g_steps} '
            f'steps, the adversarial term from round {s.warmup}, {s.kd_steps} student steps per '
            f'round after it): **{proj["seconds"]:.0f} s**, {proj["tflop"]:.1f} TFLOP.']
  return '\n'.join(lines)


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true',
                      help="the smoke config's tiny ViT at 28 px and a generator of ngf 8, "
                      "nz 32 (implies --no-write)")
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--no-write', action='store_true')
  parser.add_argument('--cpu-devices', type=int, default=None,
                      help='CPU devices to expose (0: one per core, as experiments.run does); '
                      'must come before anything else uses JAX in this process')
  args = parser.parse_args(argv)
  if args.cpu_devices is not None:
    runtime.set_cpu_devices(args.cpu_devices)
  config = _config('configs.smoke' if args.tiny else 'configs.default', args.tiny)
  name = ('tiny ViT @ 28 px (smoke)' if args.tiny else
          f'{config.model.name} @ {config.image_size} px (embedded default)')
  rows = measure(config, args.repeats)
  spec = make_method('target', config).synthesis_spec()
  proj = projection(spec, rows)
  cmd = 'python -m experiments.bench_synthesis' + (' --tiny' if args.tiny else '') + (
      f' --cpu-devices={args.cpu_devices}' if args.cpu_devices is not None else '')
  text = render(name, config, spec, rows, proj, bc.machine_description(), cmd)
  print(text)
  if not (args.no_write or args.tiny):
    bc.write_section('TARGET synthesis', text)
  return {'rows': rows, 'projection': proj}


if __name__ == '__main__':
  main()

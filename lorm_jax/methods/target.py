"""TARGET (Zhang et al., ICCV 2023): data-free synthetic replay for federated
class-incremental learning, as the reference (fed-mammoth `_models/target.py`)
runs it, on this harness's LoRA + head.

Clients (`SyntheticKD`, a LossTerm): from the second task on, every step adds
kd_alpha * soft-CE(teacher, student) at T = client_temp over the classes of the
previous tasks, on a batch of client_batch images drawn afresh from the
synthetic pool and put through the dataset's training preprocessing; the
teacher is the global model at the end of the previous task. The pool and
the teacher travel in `train_aux`. What the clients train is one LoRA (a, b)
+ head carried across tasks, as the other LoRA variants of the reference's
full fine-tuning (`continual.ContinualLoRA`); the server averages a, b and
head weighted by samples (the reference's FedAvg).

Server, after every task (`after_task` -> `Synthesizer.run`): a DCGAN-style
generator (`lorm_jax.models.generator`) is meta-learned with first-order MAML
against the global model (teacher) and a student, and the lowest-loss batch
of each synthesis round goes into the pool (uint8, as the reference's PNGs):

  for each of syn_round rounds (ep = round + 1):
    z ~ N(0, 1) (B, nz), targets ~ U{0, .., hi - 1} (B,)
    fast generator = the meta generator; inner Adam (lr_g, z at lr_z, betas 0.5/0.999)
    g_steps times: images = G(z); x = crop(pad 4) + flip + normalise(images)
      loss = oh CE(teacher(x), targets) + adv L_adv + bn L_bn
      L_adv = -mean(KL(teacher || student)(x) * [argmax agree]) if ep >= warmup else 0
      L_bn  = 0: the hooks of DeepInversion's BN-statistics loss sit on
              BatchNorm2d layers and a ViT has none, so the reference's sum is 0
      keep the batch with the lowest loss; meta gradient += d loss / d fast;
      inner step on (fast, z)
    meta Adam step (lr_g g_steps, betas 0.5/0.999) on the summed meta gradient
    pool += best batch, quantised like the reference's PNGs
    if round >= warmup: kd_steps SGD steps of the student on the pool so far:
      KL(teacher || student) at T = kd_temp, x T^2 (lr 0.002, momentum 0.9,
      coupled weight decay 1e-4, gradient clipped to norm 1)

The student is the global model with every Linear and the patch embedding
re-initialised as the reference's `weight_init` does (xavier-normal kernels,
N(0, 1) biases; norms, class token and position embedding kept), and it is
trained whole: it is server-side only and never sent to clients.

Every step is one compiled function (`jax.jit(...).lower(...).compile()`,
whose `cost_analysis()` gives its FLOPs and bytes): the generator step runs
the teacher (and from `warmup` on the student) forward and backward to the
images. The synthesis runs on one device (`on_one_device`): the server
state arrives replicated over the run's devices, and a step compiled for
replicated inputs runs whole on every device, which on a CPU share one
machine's cores (`python -m experiments.bench_synthesis --cpu-devices=2`).
`after_task` records the synthesis's wall seconds, compile seconds,
FLOPs and bytes accessed, and the last generator and student losses in
server['extra']['synthesis'] (float32 scalars).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from lorm_jax.data import augment, partition
from lorm_jax.metrics import compiled_cost
from lorm_jax.methods.base import Server
from lorm_jax.methods.continual import ContinualLoRA, _theta
from lorm_jax.methods.interface import Batch, LossTerm, ServerBackbone, linear_head
from lorm_jax.models import functional as F
from lorm_jax.models import generator as G

SYNTHESIS_KEYS = ('seconds', 'compile_seconds', 'flops', 'bytes_accessed', 'gen_loss', 'kd_loss')


# ---------------------------------------------------------------- client side


def soft_cross_entropy(student: jax.Array, teacher: jax.Array, mask: jax.Array,
                       temp: jax.Array) -> jax.Array:
  """-sum_c softmax(teacher/T)_c log softmax(student/T)_c over the classes in
  mask (K,), summed over the batch and divided by B: logits (B, K) -> scalar
  (the reference's `_KD_loss` on the logits sliced to those classes)."""
  t = jax.nn.softmax(jnp.where(mask, teacher, -1e9) / temp, axis=-1)
  logq = jax.nn.log_softmax(jnp.where(mask, student, -1e9) / temp, axis=-1)
  return -jnp.sum(jnp.where(mask, t * logq, 0.0)) / student.shape[0]


@dataclasses.dataclass(frozen=True)
class SyntheticKD:
  """The client's distillation on synthetic images, a LossTerm (hashable:
  the preprocessing spec is a frozen dataclass).

  aux: {'pool': uint8 (N, S, S, 3), 'teacher': {'a', 'b', 'head'},
  'old': (K,) bool (the previous tasks' classes), 'alpha', 'temp'}.
  Each step draws `batch` distinct pool images with the step's key, puts them
  through `spec` (the training preprocessing) and returns
  alpha * soft_cross_entropy(student, teacher, old, temp).
  """
  spec: augment.Preprocess
  batch: int = 16

  def __call__(self, b: Batch) -> jax.Array:
    aux = b.aux
    k_idx, k_aug = jax.random.split(jax.random.fold_in(b.key, 0x7A7))
    idx = jax.random.choice(k_idx, aux['pool'].shape[0], (self.batch,), replace=False)
    x = augment.preprocess(k_aug, aux['pool'][idx], self.spec)
    student, _ = b.forward(b.params['a'], b.params['b'], b.params['head'], x)
    t = aux['teacher']
    teacher, _ = b.forward(t['a'], t['b'], t['head'], x)
    kd = soft_cross_entropy(student, jax.lax.stop_gradient(teacher), aux['old'], aux['temp'])
    return aux['alpha'] * kd


# ---------------------------------------------------------------- server side


def kl_div(student: jax.Array, teacher: jax.Array, temp: float = 1.0) -> jax.Array:
  """Per-sample KL(softmax(teacher/T) || softmax(student/T)) * T^2 over all
  classes: logits (B, K) -> (B,) (the reference's `kldiv`, reduction 'none'
  summed over classes). Differentiable in both arguments."""
  logp = jax.nn.log_softmax(teacher / temp, axis=-1)
  logq = jax.nn.log_softmax(student / temp, axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1) * temp * temp


def synthesis_augment(key: jax.Array, images: jax.Array, mean: jax.Array, std: jax.Array,
                      pad: int = 4) -> jax.Array:
  """kornia RandomCrop(S, padding=pad) + RandomHorizontalFlip + normalisation,
  per sample, differentiable in the images: (B, S, S, C) in [0, 1] ->
  (B, S, S, C) = (crop - mean) / std; the padding is zeros."""
  b, s, _, c = images.shape
  k_top, k_left, k_flip = jax.random.split(key, 3)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  top = jax.random.randint(k_top, (b,), 0, 2 * pad + 1)
  left = jax.random.randint(k_left, (b,), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, t, l: jax.lax.dynamic_slice(im, (t, l, 0), (s, s, c)))(
      padded, top, left)
  flip = jax.random.uniform(k_flip, (b,)) < 0.5
  crop = jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)
  return (crop - mean) / std


def quantize(images: jax.Array) -> jax.Array:
  """[0, 1] float images -> uint8 as the reference saves them: clamp, x 255, truncate."""
  return jnp.floor(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def on_one_device(tree: Any) -> Any:
  """tree's arrays on this process's first device: a replicated array's local
  copy, any other array gathered there (every process of a multi-process run
  computes the same synthesis from the same replicated inputs)."""
  device = jax.local_devices()[0]

  def one(x):
    if isinstance(x, jax.Array) and x.sharding.is_fully_replicated:
      x = x.addressable_shards[0].data
    return jax.device_put(x, device)
  return jax.tree.map(one, tree)


def reinit_student(frozen: F.Flat, head: F.Flat, key: jax.Array) -> dict:
  """{'frozen', 'head'}: a copy of the backbone with every Linear kernel
  (in, out) and the patch embedding (p, p, C, D) redrawn xavier-normal
  (std sqrt(2 / (fan_in + fan_out)), a conv's fans times p^2) and their
  biases N(0, 1), and the head likewise (the reference's `weight_init` on
  the copied network); norms, class token, position embedding and LayerScale
  are kept."""
  def redraw(flat: F.Flat, k: jax.Array) -> F.Flat:
    out = {name: jnp.array(v, jnp.float32, copy=True) for name, v in flat.items()}
    for i, name in enumerate(sorted(flat)):
      if not name.endswith('kernel'):
        continue
      w = flat[name]
      receptive = int(np.prod(w.shape[:-2]))
      std = math.sqrt(2.0 / (receptive * (w.shape[-2] + w.shape[-1])))
      kw, kb = jax.random.split(jax.random.fold_in(k, i))
      out[name] = std * jax.random.normal(kw, w.shape, jnp.float32)
      bias = name[:-len('kernel')] + 'bias'
      if bias in flat:
        out[bias] = jax.random.normal(kb, flat[bias].shape, jnp.float32)
    return out
  k_body, k_head = jax.random.split(key)
  return {'frozen': redraw(frozen, k_body), 'head': redraw(head, k_head)}


class _Compiled:
  """A function compiled ahead of time (`jax.jit(...).lower(...).compile()`)
  once per argument signature (tree, shapes, dtypes, shardings, static
  keywords); every call adds its executable's cost to `flops` and
  `bytes_accessed`, and compiling adds to `compile_seconds`."""

  def __init__(self, fn: Callable, **jit_kwargs):
    self._jit = jax.jit(fn, **jit_kwargs)
    self._cache: dict = {}
    self.compile_seconds = self.flops = self.bytes_accessed = 0.0

  def __call__(self, *args, **static):
    leaves, tree = jax.tree.flatten(args)
    sig = (tree, tuple(sorted(static.items())),
           tuple((x.shape, x.dtype, getattr(x, 'sharding', None)) for x in leaves))
    if sig not in self._cache:
      t0 = time.perf_counter()
      exe = self._jit.lower(*args, **static).compile()
      self.compile_seconds += time.perf_counter() - t0
      self._cache[sig] = (exe, compiled_cost(exe))
    exe, (flops, nbytes) = self._cache[sig]
    self.flops += flops
    self.bytes_accessed += nbytes
    return exe(*args)


@dataclasses.dataclass(frozen=True)
class SynthesisSpec:
  """The synthesis's constants (the method's fields; reference values)."""
  nz: int
  ngf: int
  syn_round: int
  warmup: int
  g_steps: int
  batch: int
  lr_g: float
  lr_z: float
  oh: float
  adv: float
  bn: float
  reset_l0: bool
  kd_steps: int
  kd_batch: int
  kd_temp: float
  student_lr: float
  student_momentum: float
  student_wd: float
  student_clip: float
  pool_size: int


class Synthesizer:
  """TARGET's server-side synthesis on one backbone (module docstring).

  model/frozen: the ViT and W0 (teacher and student share the architecture);
  preprocess: the training preprocessing (key, uint8 (B, S, S, 3)) -> float32,
  used for the student's distillation on the pool; mean/std (3,): the
  normalisation the generator's images get before the networks (the
  dataset's, the reference's Normalizer).
  """

  def __init__(self, spec: SynthesisSpec, model: F.FunctionalViT,
               preprocess: Callable[[jax.Array, jax.Array], jax.Array],
               mean: tuple[float, ...], std: tuple[float, ...]):
    self.spec, self.model, self.preprocess = spec, model, preprocess
    self.channels = int(model.initial_params().frozen['patch_kernel'].shape[2])
    self.gen = G.FunctionalGenerator(nnx.eval_shape(lambda: self.new_generator(0)))
    self.mean = jnp.asarray(mean, jnp.float32)
    self.std = jnp.asarray(std, jnp.float32)
    adam = lambda lr: optax.adam(lr, b1=0.5, b2=0.999)
    self.opt_g, self.opt_z, self.meta_opt = adam(spec.lr_g), adam(spec.lr_z), adam(
        spec.lr_g * spec.g_steps)
    self.student_opt = optax.chain(optax.clip_by_global_norm(spec.student_clip),
                                   optax.add_decayed_weights(spec.student_wd),
                                   optax.sgd(spec.student_lr, momentum=spec.student_momentum))
    self.gen_step = _Compiled(self._gen_step, static_argnames=('adv_on',), donate_argnums=(0,))
    self.meta_step = _Compiled(self._meta_step)
    self.kd_step = _Compiled(self._kd_step, donate_argnums=(0, 1))
    self._steps = (self.gen_step, self.meta_step, self.kd_step)

  def new_generator(self, seed: int | jax.Array) -> G.Generator:
    """A freshly initialised generator (nz, ngf, the backbone's image size and channels)."""
    s = self.spec
    return G.Generator(s.nz, s.ngf, self.model.cfg.image_size, self.channels,
                       rngs=nnx.Rngs(seed))

  # -- networks -------------------------------------------------------------
  def teacher_logits(self, teacher: dict, x: jax.Array) -> jax.Array:
    """teacher {'frozen' (a compute view of W0), 'a', 'b', 'head'}; x (B, S, S, 3) -> (B, K)."""
    feats, _, _ = self.model.apply(teacher['frozen'], teacher['a'], teacher['b'],
                                   teacher['head'], x, features_only=True)
    return linear_head(teacher['head'], feats)

  def student_logits(self, student: dict, x: jax.Array) -> jax.Array:
    """student {'frozen' (every backbone parameter), 'head'}, no LoRA: x -> (B, K)."""
    init = self.model.initial_params()
    a = jax.tree.map(jnp.zeros_like, init.a)
    b = jax.tree.map(jnp.zeros_like, init.b)
    feats, _, _ = self.model.apply(student['frozen'], a, b, student['head'], x,
                                   features_only=True)
    return linear_head(student['head'], feats)

  # -- one generator step ---------------------------------------------------
  def gen_loss(self, gen: G.GenParams, z: jax.Array, targets: jax.Array, key: jax.Array,
               teacher: dict, student: dict, adv_on: bool
               ) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """The generator's loss on z (B, nz) and targets (B,): (loss, (images
    (B, S, S, C) in [0, 1], {'oh', 'adv', 'bn'}))."""
    s = self.spec
    images = self.gen.apply(gen, z)
    x = synthesis_augment(key, images, self.mean, self.std)
    t_out = self.teacher_logits(teacher, x)
    loss_oh = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(t_out, targets))
    loss_bn = jnp.float32(0.0)  # no BatchNorm2d in a ViT: the reference's hook sum is empty
    if adv_on:
      s_out = self.student_logits(student, x)
      agree = (jnp.argmax(s_out, -1) == jnp.argmax(t_out, -1)).astype(jnp.float32)
      loss_adv = -jnp.mean(kl_div(s_out, t_out) * agree)
    else:
      loss_adv = jnp.float32(0.0)
    loss = s.bn * loss_bn + s.oh * loss_oh + s.adv * loss_adv
    return loss, (images, {'oh': loss_oh, 'adv': loss_adv, 'bn': loss_bn})

  def init_inner(self, meta: G.GenParams, z: jax.Array) -> dict:
    """The carry of one synthesis round's generator steps."""
    b, s, c = z.shape[0], self.model.cfg.image_size, self.channels
    fast, z = jax.tree.map(jnp.copy, (meta, z))  # the step donates its carry
    return {'gen': fast, 'z': z, 'opt_g': self.opt_g.init(fast), 'opt_z': self.opt_z.init(z),
            'meta_grad': jax.tree.map(jnp.zeros_like, meta),
            'best_loss': jnp.float32(jnp.inf), 'best': jnp.zeros((b, s, s, c), jnp.float32)}

  def _gen_step(self, carry: dict, targets: jax.Array, key: jax.Array, teacher: dict,
                student: dict, adv_on: bool) -> tuple[dict, jax.Array]:
    """One inner step: loss and gradients at the current fast generator and z,
    best batch kept (strictly lower loss), the gradient added to the meta
    gradient (FOMAML), one Adam step on the fast generator and on z."""
    (loss, (images, parts)), (g_gen, g_z) = jax.value_and_grad(
        self.gen_loss, argnums=(0, 1), has_aux=True)(
            carry['gen'], carry['z'], targets, key, teacher, student, adv_on)
    better = loss < carry['best_loss']
    upd, opt_g = self.opt_g.update(g_gen, carry['opt_g'], carry['gen'])
    upd_z, opt_z = self.opt_z.update(g_z, carry['opt_z'], carry['z'])
    new = {'gen': optax.apply_updates(carry['gen'], upd),
           'z': optax.apply_updates(carry['z'], upd_z), 'opt_g': opt_g, 'opt_z': opt_z,
           'meta_grad': jax.tree.map(jnp.add, carry['meta_grad'], g_gen),
           'best_loss': jnp.where(better, loss, carry['best_loss']),
           'best': jnp.where(better, images, carry['best'])}
    return new, jnp.stack([loss, parts['oh'], parts['adv'], parts['bn']])

  def _meta_step(self, meta: G.GenParams, opt_state: Any, grad: G.GenParams):
    """The meta generator's Adam step on the round's summed inner gradients."""
    upd, opt_state = self.meta_opt.update(grad, opt_state, meta)
    return optax.apply_updates(meta, upd), opt_state

  # -- one student step -----------------------------------------------------
  def _kd_step(self, student: dict, opt_state: Any, pool: jax.Array, count: jax.Array,
               step: jax.Array, key: jax.Array, teacher: dict):
    """One SGD step of the student on B = kd_batch images of pool (N, S, S, C)
    uint8: positions step B .. step B + B - 1 of a stream of epochs over
    pool[:count] (count, step: int32 scalars), each epoch a fresh permutation
    (the reference's reshuffling DataLoader), put through the training
    preprocessing. Returns (student, opt_state, loss)."""
    s = self.spec
    cap = pool.shape[0]
    k_perm, k_aug = jax.random.split(key)
    pos = step * s.kd_batch + jnp.arange(s.kd_batch)
    epoch, within = pos // count, pos % count

    def pick(e, w):
      u = jax.random.uniform(jax.random.fold_in(k_perm, e), (cap,))
      return jnp.argsort(jnp.where(jnp.arange(cap) < count, u, 2.0))[w]
    idx = jax.vmap(pick)(epoch, within)
    x = self.preprocess(jax.random.fold_in(k_aug, step), pool[idx])
    t_out = jax.lax.stop_gradient(self.teacher_logits(teacher, x))

    def loss_fn(st):
      return jnp.mean(kl_div(self.student_logits(st, x), t_out, s.kd_temp))
    loss, grad = jax.value_and_grad(loss_fn)(student)
    upd, opt_state = self.student_opt.update(grad, opt_state, student)
    return optax.apply_updates(student, upd), opt_state, loss

  # -- the whole synthesis --------------------------------------------------
  def run(self, frozen: F.Flat, theta: dict, num_targets: int, key: jax.Array,
          progress: bool = False) -> tuple[jax.Array, dict]:
    """The task boundary's synthesis with teacher W0 + theta ({'a', 'b',
    'head'}): targets drawn from classes 0 .. num_targets - 1; `progress`
    shows a bar over the synthesis rounds. Returns (pool uint8 (pool_size, S,
    S, C), {name: float} of SYNTHESIS_KEYS)."""
    s = self.spec
    t0 = time.perf_counter()
    before = self.counters()
    frozen, theta, key = on_one_device((frozen, theta, key))
    k_gen, k_student, k_rounds = jax.random.split(key, 3)
    a, b = F.full_lora(self.model, theta['a'], theta['b'])
    teacher = {'frozen': self.model.compute_view(frozen), 'a': a, 'b': b, 'head': theta['head']}
    meta = G.FunctionalGenerator(self.new_generator(k_gen)).initial_params()
    meta_state = self.meta_opt.init(meta)
    student = reinit_student(frozen, theta['head'], k_student)
    student_state = self.student_opt.init(student)
    size = self.model.cfg.image_size
    pool = jnp.zeros((s.pool_size, size, size, self.channels), jnp.uint8)
    count = 0
    gen_loss = kd_loss = jnp.float32(0.0)
    bar = tqdm(total=s.syn_round, desc='synthesis', unit='round', leave=False,
               disable=not progress, dynamic_ncols=True)
    for rnd in range(s.syn_round):
      ep = rnd + 1
      k_z, k_t, k_steps, k_kd, k_reset = jax.random.split(jax.random.fold_in(k_rounds, rnd), 5)
      if s.reset_l0 and ep == 120 + s.warmup:
        meta = G.reset_l1(meta, k_reset)
      adv_on = s.adv > 0 and ep >= s.warmup
      z = jax.random.normal(k_z, (s.batch, s.nz))
      targets = jax.random.randint(k_t, (s.batch,), 0, num_targets)
      carry = self.init_inner(meta, z)
      for it in range(s.g_steps):
        carry, losses = self.gen_step(carry, targets, jax.random.fold_in(k_steps, it),
                                      teacher, student, adv_on=adv_on)
      gen_loss = losses[0]
      meta, meta_state = self.meta_step(meta, meta_state, carry['meta_grad'])
      take = min(s.batch, s.pool_size - count)
      if take > 0:
        pool = jax.lax.dynamic_update_slice(pool, quantize(carry['best'][:take]),
                                            (count, 0, 0, 0))
        count += take
      if rnd >= s.warmup:
        for i in range(s.kd_steps):
          student, student_state, kd_loss = self.kd_step(
              student, student_state, pool, jnp.int32(count), jnp.int32(i), k_kd, teacher)
      if progress:  # reading the losses waits for the round: the bar shows work done
        bar.set_postfix(gen_loss=f'{float(gen_loss):.3f}', kd_loss=f'{float(kd_loss):.3f}')
      bar.update(1)
    bar.close()
    pool = jax.block_until_ready(pool)
    after = self.counters()
    info = {'seconds': time.perf_counter() - t0,
            **{k: after[k] - before[k] for k in ('compile_seconds', 'flops', 'bytes_accessed')},
            'gen_loss': float(gen_loss), 'kd_loss': float(kd_loss)}
    return pool, info

  def counters(self) -> dict[str, float]:
    """Compile seconds, FLOPs and bytes accessed of every step so far."""
    return {k: sum(getattr(f, k) for f in self._steps)
            for k in ('compile_seconds', 'flops', 'bytes_accessed')}


# ---------------------------------------------------------------- the method


@dataclasses.dataclass
class TARGET(ContinualLoRA):
  """TARGET (LoRA variant; the reference fine-tunes the whole ViT). Fields:
  the reference's constants (`_models/target.py` module level and `Target`)."""
  name: ClassVar[str] = 'target'
  # generator and its meta-learning (GlobalSynthesizer)
  nz: int = 256                 # latent size (data_generation's nz)
  ngf: int = 64                 # generator width
  syn_round: int = 30           # synthesis rounds per task boundary
  warmup: int = 20              # rounds before the adversarial term and the student's KD
  g_steps: int = 80             # generator steps per round
  synthesis_batch: int = 16     # synthesis_batch_size
  lr_g: float = 0.002           # inner Adam on the generator (meta Adam: lr_g * g_steps)
  lr_z: float = 0.01            # inner Adam on z
  oh: float = 0.5               # weight of CE(teacher, targets)
  adv: float = 1.0              # weight of the adversarial term
  bn: float = 10.0              # weight of the BN-statistics term (0 on a ViT: no BatchNorm)
  reset_l0: bool = True         # redraw the generator's first Linear at round 120 + warmup
  # the student's distillation on the server (kd_train)
  kd_steps: int = 50
  kd_batch: int = 16            # sample_batch_size
  kd_temp: float = 20.0         # T of KLDiv
  student_lr: float = 0.002     # SGD
  student_momentum: float = 0.9
  student_wd: float = 1e-4
  student_clip: float = 1.0     # gradient-norm clip
  nums: int = 8000              # cap on the synthetic images read per task
  drop_last_class: bool = True  # targets ~ randint(0, last class index): never the newest class
  # the clients' distillation (Target.observe)
  kd_alpha: float = 25.0
  client_temp: float = 2.0      # _KD_loss's hard-coded T
  client_batch: int = 16        # get_syn_data_loader's syn_bs
  last_task_synthesis: bool = True  # the reference synthesises after the last task too

  @classmethod
  def validate(cls, config: ConfigDict) -> None:
    if config.image_size % 4:
      raise ValueError(f'target: the generator needs image_size a multiple of 4, got '
                       f'{config.image_size}')
    own = config.get('target')
    get = lambda k: getattr(cls, k) if own is None else own.get(k, getattr(cls, k))
    for k in ('syn_round', 'g_steps', 'synthesis_batch', 'kd_batch', 'client_batch', 'nums',
              'nz', 'ngf'):
      if int(get(k)) < 1:
        raise ValueError(f'target.{k} must be at least 1, got {get(k)}')
    if int(get('client_batch')) > _pool_size(get):
      raise ValueError(f'target.client_batch {get("client_batch")} exceeds the synthetic '
                       f'pool ({_pool_size(get)} images)')

  @property
  def pool_size(self) -> int:
    """Images kept per task: syn_round x synthesis_batch, capped by nums."""
    return _pool_size(lambda k: getattr(self, k))

  def synthesis_spec(self) -> SynthesisSpec:
    return SynthesisSpec(
        nz=self.nz, ngf=self.ngf, syn_round=self.syn_round, warmup=self.warmup,
        g_steps=self.g_steps, batch=self.synthesis_batch, lr_g=self.lr_g, lr_z=self.lr_z,
        oh=self.oh, adv=self.adv, bn=self.bn, reset_l0=self.reset_l0, kd_steps=self.kd_steps,
        kd_batch=self.kd_batch, kd_temp=self.kd_temp, student_lr=self.student_lr,
        student_momentum=self.student_momentum, student_wd=self.student_wd,
        student_clip=self.student_clip, pool_size=self.pool_size)

  def train_preprocess_spec(self) -> augment.Preprocess:
    """The dataset's training preprocessing, as `federated.setup.preprocessors` builds it."""
    c = self.config
    name = c.dataset.get('preprocess') or c.dataset.name
    return augment.preset(name, c.image_size, train=True, augment=c.augment)

  def task_classes(self, num_classes: int) -> list[np.ndarray]:
    """The run's class-incremental tasks (label order, as the loop builds them)."""
    c = self.config
    return partition.task_classes(num_classes, c.num_tasks, c.classes_per_task or None)

  def init_extra(self, params: F.Params) -> dict:
    s = self.config.image_size
    chan = int(params.frozen['patch_kernel'].shape[2])
    return {'teacher': jax.tree.map(jnp.zeros_like,
                                    {'a': params.a, 'b': params.b, 'head': params.head}),
            'pool': jnp.zeros((self.pool_size, s, s, chan), jnp.uint8),
            'synthesis': {k: jnp.float32(0.0) for k in SYNTHESIS_KEYS}}

  def loss_term(self, task: int) -> LossTerm | None:
    return SyntheticKD(self.train_preprocess_spec(), self.client_batch) if task > 0 else None

  def train_aux(self, server: Server, task: int) -> Any:
    if task == 0:
      return {}
    k = server['head']['kernel'].shape[1]
    old = np.isin(np.arange(k), np.concatenate(self.task_classes(k)[:task]))
    return {'pool': server['extra']['pool'], 'teacher': server['extra']['teacher'],
            'old': jnp.asarray(old), 'alpha': jnp.float32(self.kd_alpha),
            'temp': jnp.float32(self.client_temp)}

  def synthesizer(self, backbone: ServerBackbone) -> Synthesizer:
    """The Synthesizer of this backbone, built once per run so that its
    compiled steps serve every task boundary."""
    cached = getattr(self, '_synthesizer', None)
    if cached is None or cached.model is not backbone.model \
        or cached.preprocess is not backbone.preprocess:
      spec = self.train_preprocess_spec()
      mean = spec.mean if spec.mean is not None else (0.0, 0.0, 0.0)
      std = spec.std if spec.std is not None else (1.0, 1.0, 1.0)
      cached = Synthesizer(self.synthesis_spec(), backbone.model, backbone.preprocess, mean, std)
      self._synthesizer = cached
    return cached

  def after_task(self, server: Server, task: int, backbone: ServerBackbone,
                 key: jax.Array) -> Server:
    """Teacher snapshot of the global model, then (unless after the last
    task with last_task_synthesis off) the synthesis that refills the pool."""
    theta = _theta(server)
    extra = {**server['extra'], 'teacher': theta}
    if task == self.config.num_tasks - 1 and not self.last_task_synthesis:
      return {**server, 'extra': extra}
    k = server['head']['kernel'].shape[1]
    last = int(np.max(self.task_classes(k)[task]))
    num_targets = max(last if self.drop_last_class else last + 1, 1)
    pool, info = self.synthesizer(backbone).run(backbone.frozen, theta, num_targets, key,
                                                backbone.progress)
    extra = {**extra, 'pool': pool,
             'synthesis': {name: jnp.float32(info[name]) for name in SYNTHESIS_KEYS}}
    return {**server, 'extra': extra}

  def task_record(self, server: Server, task: int) -> dict[str, float]:
    """The task's synthesis figures as `synthesis_<name>` (seconds, compile
    seconds, FLOPs and bytes from XLA's cost analysis, final losses)."""
    return {f'synthesis_{k}': float(v) for k, v in server['extra']['synthesis'].items()}


def _pool_size(get: Callable[[str], Any]) -> int:
  """min(syn_round x synthesis_batch, nums) from a field getter."""
  return min(int(get('syn_round')) * int(get('synthesis_batch')), int(get('nums')))

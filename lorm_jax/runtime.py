"""Process-level set-up, done once before JAX starts its backends.

`set_cpu_devices`: one CPU device per core.
`enable_compilation_cache`: XLA programs cached on disk across runs.
`initialize_distributed`: several processes (hosts) as one JAX run.
`fast_bfloat16_matmuls`: whether bfloat16 matmuls beat float32 here (what
`model.dtype='auto'` resolves by).
`machine`: the kind of machine a run ran on, recorded beside its results.

On a CPU, XLA runs one program at a time per device and splits only its
larger operations over the cores, so the small matrices of a batch-16 ViT
step leave cores idle (a training step of ViT-S/14 at 56 px reaches 56% of
the 2-core matmul rate on one device). Declaring one CPU device per core lets
the client runner put whole clients on different cores instead
(`ClientRunner`, sequential mode, sharded with `shard_map`): measured 1.2x
on the 2-core development machine (BENCHMARKS.md).

A run compiles its programs (training steps, Gram passes, merges) in about
35 s on that machine; with the persistent compilation cache a second run of
the same shapes (another seed or method) loads most of them instead.
"""
from __future__ import annotations

import os
import platform as _platform
import re
from pathlib import Path

import jax

from lorm_jax.download import cache_dir

_FORCE_FLAG = '--xla_force_host_platform_device_count'
_COLLECTIVE_TIMEOUT_FLAG = '--xla_cpu_collective_call_terminate_timeout_seconds'
COLLECTIVE_TIMEOUT_S = 600


def available_cores() -> int:
  """Cores this process may run on (its CPU affinity), at least 1."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not Linux
    return max(1, os.cpu_count() or 1)


# CPU instructions that multiply bfloat16 natively: AMX tiles (Intel Sapphire
# Rapids on) and AVX-512 BF16 (Intel Cooper Lake on, AMD Zen 4 on). Without
# them XLA:CPU widens bfloat16 operands to float32 around its float32 kernels,
# and bfloat16 is slower than float32: on an AMD EPYC (Zen 3, AVX2 only) a
# 2048^3 matmul runs at 83 GFLOP/s in bfloat16 and 156 in float32, and the
# default's training step at 321 ms against 189 ms (BENCHMARKS.md).
FAST_BFLOAT16_CPU_FLAGS = ('amx_bf16', 'avx512_bf16')


def cpu_flags(cpuinfo: str = '/proc/cpuinfo') -> frozenset[str]:
  """The instruction-set flags of this machine's first CPU (Linux's
  /proc/cpuinfo); empty where the file is absent or has no flags line."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith('flags'):
          return frozenset(line.partition(':')[2].split())
  except OSError:
    pass
  return frozenset()


def fast_bfloat16_matmuls(platform: str | None = None,
                          flags: frozenset[str] | None = None) -> bool:
  """True where bfloat16 matmuls are faster than float32 ones: every
  accelerator backend (GPU, TPU), and a CPU with one of
  FAST_BFLOAT16_CPU_FLAGS. The PyTorch reference's precision setting
  ('medium') likewise computes in bfloat16 only where the hardware has a fast
  bfloat16 matmul. platform and flags default to this process's backend and
  CPU."""
  platform = platform or jax.default_backend()
  if platform != 'cpu':
    return True
  flags = cpu_flags() if flags is None else flags
  return any(f in flags for f in FAST_BFLOAT16_CPU_FLAGS)


def auto_compute_dtype() -> tuple[str, str]:
  """(dtype, why) that model.dtype='auto' resolves to in this process:
  'bfloat16' where `fast_bfloat16_matmuls`, else 'float32', and the reason
  in words (the backend, or which of FAST_BFLOAT16_CPU_FLAGS the CPU has)."""
  platform = jax.default_backend()
  have = [f for f in FAST_BFLOAT16_CPU_FLAGS if f in cpu_flags()]
  dtype = 'bfloat16' if fast_bfloat16_matmuls(platform, frozenset(have)) else 'float32'
  if platform != 'cpu':
    why = f'{platform} backend'
  elif have:
    why = f'this CPU has {", ".join(have)}'
  else:
    why = f'this CPU has none of {", ".join(FAST_BFLOAT16_CPU_FLAGS)}'
  return dtype, why


def cpu_model(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) Processor'), from
  /proc/cpuinfo where it exists."""
  try:
    match = re.search(r'^model name\s*:\s*(.+)$', Path(cpuinfo).read_text(), re.M)
    if match:
      return match.group(1).strip()
  except OSError:
    pass
  return _platform.processor() or _platform.machine()


# (cpuinfo flag, kind) from the widest matrix instructions down.
_WIDEST = (('amx_bf16', 'AMX'), ('avx512_bf16', 'AVX-512 BF16, no AMX'),
           ('avx512f', 'AVX-512, no BF16'), ('avx2', 'AVX2 only'))


def cpu_kind(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The CPU model and its widest matrix instructions, e.g. 'AMD EPYC, AVX2
  only': the kinds of machine whose timings are not comparable, and whose
  round-off differs (XLA:CPU's kernels follow the vector width)."""
  flags = cpu_flags(cpuinfo)
  widest = next((name for flag, name in _WIDEST if flag in flags), 'instruction set unknown')
  return f'{cpu_model(cpuinfo)}, {widest}'


def machine() -> str:
  """What computed this process's numbers: the CPU kind (`cpu_kind`) on the
  CPU backend, else the first device's kind ('NVIDIA H100 80GB HBM3', 'TPU v5
  lite') with the device count."""
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    return cpu_kind()
  return f'{jax.device_count()} x {dev.device_kind}'


def default_xla_flag(flag: str, value: object) -> None:
  """Appends `flag=value` to XLA_FLAGS (read when a backend starts) unless
  XLA_FLAGS already names the flag: a value given there wins."""
  flags = os.environ.get('XLA_FLAGS', '')
  if flag not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {flag}={value}'.strip()


def set_cpu_devices(count: int) -> int:
  """Makes the CPU backend expose `count` devices (0: one per available core).

  Must run before any JAX computation; an explicit
  --xla_force_host_platform_device_count in XLA_FLAGS wins. Also gives CPU
  collectives a longer wait (`_patient_cpu_collectives`). Accelerator
  backends are unaffected (their devices stay the default). Returns the
  count asked for.
  """
  _patient_cpu_collectives()
  if _FORCE_FLAG in os.environ.get('XLA_FLAGS', ''):
    return -1
  count = count or available_cores()
  jax.config.update('jax_num_cpu_devices', count)
  return count


def _patient_cpu_collectives() -> None:
  """Lets a CPU device wait up to COLLECTIVE_TIMEOUT_S at a collective for the
  others (XLA_FLAGS, read when the backend starts; a value already there wins).
  XLA:CPU's own limit, 40 s, aborts the whole process when one device's share
  of a program reaches a collective that much later than another's, which a
  busy machine can make happen without anything being wrong. (The 2-device
  aborts once seen here, in eager gathers over the devices, were not that but
  the stall that `runner.MAX_UNFINISHED_CALLS` prevents: traced with gdb, and
  a longer wait only turned them into hangs.)"""
  default_xla_flag(_COLLECTIVE_TIMEOUT_FLAG, COLLECTIVE_TIMEOUT_S)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
  """Turns on JAX's persistent compilation cache in `path` (default
  $JAX_COMPILATION_CACHE_DIR, else xla/ in the weights' cache folder:
  $LORM_JAX_CACHE or ~/.cache/lorm_jax), for programs that took at least a
  second to compile ($JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS when set:
  the test suite caches smaller ones too).
  Returns the folder, or None when it cannot be created."""
  path = path or os.environ.get('JAX_COMPILATION_CACHE_DIR') or cache_dir() / 'xla'
  path = Path(path).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None
  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', 1.0)))
  return path


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins this process to a multi-process JAX run (`jax.distributed.initialize`).

  Arguments left None are detected by JAX where it can (SLURM, Open MPI,
  Cloud TPU pods). CPU collectives go through gloo, so that the client sums
  of the merges can be reduced across processes without accelerators. Every
  process then sees all processes' devices in `jax.devices()`; the client
  runner's mesh spans them, so each process trains its share of the round's
  clients on its own devices.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0; always true
  for a single process)."""
  return jax.process_index() == 0

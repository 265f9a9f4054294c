"""Continual-learning metrics and the JSON-lines metrics log."""
from __future__ import annotations

import ctypes
import json
import os
import resource
from typing import Any

import jax
import numpy as np


def forgetting(acc: np.ndarray) -> float:
  """Mean over j < T-1 of acc[j, j] - acc[T-1, j] for a (T, T) accuracy matrix.

  acc[i, j] is the accuracy after task i on task j's test set (NaN for j > i).
  Returns 0.0 for a single task.
  """
  t = acc.shape[0]
  if t < 2:
    return 0.0
  return float(np.mean([acc[j, j] - acc[t - 1, j] for j in range(t - 1)]))


def vit_forward_flops(cfg: Any) -> float:
  """Matmul FLOPs of one image through a ViT (a `vit.ViTConfig`), 2 per multiply-add:
  patch embedding, per block qkv/proj/fc1/fc2 over all T tokens and the two
  attention products (2 T^2 D each), the head; LoRA's rank-r products are
  counted too. Norms, GELU and softmax are left out (no matmul)."""
  t, d, m, r = cfg.num_tokens, cfg.width, cfg.mlp_dim, cfg.lora_rank
  patch = 2 * (t - 1) * cfg.patch_size ** 2 * 3 * d
  dense = 2 * t * (d * 3 * d + d * d + d * m + m * d)
  lora = 2 * t * r * ((d + 3 * d) + (d + d) + (d + m) + (m + d))
  attention = 2 * 2 * t * t * d
  return float(patch + cfg.depth * (dense + lora + attention) + 2 * d * cfg.num_classes)


def compiled_cost(compiled: Any) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of a compiled executable, by XLA's cost analysis.

  `compiled` is what `jax.jit(f).lower(...).compile()` returns; its
  cost_analysis() is a dict, or a list of one dict per program in older jax.
  Either number is 0.0 where XLA gives none.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))


def vit_train_flops(cfg: Any) -> float:
  """Useful FLOPs of one image in a LoRA training step: the forward and the
  input gradient through every block (the same matmuls again, the patch
  embedding excepted: no gradient reaches the image), nothing for the frozen
  kernels' own gradients; the LoRA and head gradients are rank-r / D x K
  products, within the forward count's LoRA and head terms."""
  patch = 2 * (cfg.num_tokens - 1) * cfg.patch_size ** 2 * 3 * cfg.width
  fwd = vit_forward_flops(cfg)
  return 2 * fwd - patch


def seen_class_accuracy(logits: np.ndarray, labels: np.ndarray, seen_mask: np.ndarray,
                        task_of_label: np.ndarray, num_tasks_seen: int
                        ) -> tuple[float, np.ndarray]:
  """Accuracy with logits restricted to the seen classes.

  logits (N, K), labels (N,), seen_mask (K,) bool, task_of_label (K,) int.
  Returns (sample-weighted accuracy over all N, per-task accuracies (num_tasks_seen,)).
  """
  masked = np.where(seen_mask[None, :], logits, -np.inf)
  correct = np.argmax(masked, axis=-1) == labels
  tasks = task_of_label[labels]
  per_task = np.array([correct[tasks == j].mean() if np.any(tasks == j) else np.nan
                       for j in range(num_tasks_seen)])
  return float(correct.mean()), per_task


class MetricsLog:
  """Appends one JSON object per line to `path`; `truncate(n)` keeps the first n lines.

  Resuming a run truncates to the line count stored in the checkpoint, so a
  killed-and-resumed run writes the same file as an uninterrupted one.
  """

  def __init__(self, path: str, write: bool = True, writers: Any = None):
    """write=False (a process other than the primary) keeps the line count
    the primary's file has, without touching it. writers: a
    `metric_writers.Writers` that gets every record too (TensorBoard, W&B),
    opened at the first record written; only where write is True."""
    self.path = path
    self.enabled = write
    self.writers = writers if write and writers is not None and writers.enabled else None
    self.lines = 0
    if os.path.exists(path):
      with open(path) as f:
        self.lines = sum(1 for _ in f)

  def truncate(self, n: int) -> None:
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for _, line in zip(range(n), f)]
    if self.enabled:
      with open(self.path, 'w') as f:
        f.writelines(kept)
    self.lines = len(kept)

  def write(self, record: dict[str, Any]) -> None:
    if self.enabled:
      if self.writers is not None and not self.writers.is_open:
        self.writers.open(self.read())  # the lines kept so far: a resume's first record
      with open(self.path, 'a') as f:
        f.write(json.dumps(record, sort_keys=True) + '\n')
      if self.writers is not None:
        self.writers.write(record)
    self.lines += 1

  def close(self) -> None:
    """Flushes and closes the writers (metrics.jsonl itself is closed after every line)."""
    if self.writers is not None:
      self.writers.close()

  def read(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]


def release_free_memory() -> None:
  """Hands freed heap pages back to the OS (glibc's malloc_trim; a no-op
  elsewhere). XLA's compilations and the round's temporaries free hundreds of
  MB that glibc otherwise keeps mapped, so the process's resident size would
  only ever grow over a run (BENCHMARKS.md, peak RSS)."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def memory_record() -> dict[str, float]:
  """Peak memory so far: the process's resident set (MiB) and, on devices that
  report it (GPUs, TPUs), the largest peak of bytes in use on one device (MiB)."""
  out = {'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peaks = [s['peak_bytes_in_use'] for s in stats if 'peak_bytes_in_use' in s]
  if peaks:
    out['device_peak_mib'] = round(max(peaks) / 2**20, 1)
  return out


"""PNG plots written next to results.json."""
from __future__ import annotations

import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_curve_figure(accuracies: list[float], title: str) -> plt.Figure:
  """Accuracy over all seen classes after each task (tasks 1..T)."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  x = np.arange(1, len(accuracies) + 1)
  ax.plot(x, 100 * np.asarray(accuracies), marker='o')
  ax.set_xlabel('after task')
  ax.set_ylabel('accuracy on seen classes (%)')
  ax.set_xticks(x)
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def accuracy_matrix_figure(acc: np.ndarray, title: str) -> plt.Figure:
  """Heatmap of acc[i, j]: after task i (rows), on task j (columns), tasks 1..T."""
  t = acc.shape[0]
  fig, ax = plt.subplots(figsize=(1.0 + 0.6 * t, 0.8 + 0.6 * t))
  im = ax.imshow(100 * np.nan_to_num(acc, nan=0.0), vmin=0, vmax=100, cmap='viridis')
  for i in range(t):
    for j in range(i + 1):
      ax.text(j, i, f'{100 * acc[i, j]:.0f}', ha='center', va='center', fontsize=7,
              color='white' if acc[i, j] < 0.6 else 'black')
  ax.set_xlabel('on task')
  ax.set_ylabel('after task')
  ax.set_xticks(range(t), [str(k) for k in range(1, t + 1)])  # tasks 1..T, as the curve
  ax.set_yticks(range(t), [str(k) for k in range(1, t + 1)])
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  return fig


def _save(fig: plt.Figure, path: str) -> None:
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_plots(workdir: str, results: dict) -> list[str]:
  title = f"{results['method']} on {results['dataset']} (beta={results['beta']}, seed={results['seed']})"
  paths = [os.path.join(workdir, 'accuracy_per_task.png'),
           os.path.join(workdir, 'accuracy_matrix.png')]
  _save(accuracy_curve_figure(results['accuracy_per_task_end'], title), paths[0])
  _save(accuracy_matrix_figure(np.asarray(results['accuracy_matrix'], float), title), paths[1])
  return paths

"""The run's PNG plots: both name the tasks 1..T, as the results and the README do."""
import numpy as np

from lorm_jax import plotting


def _labels(ticks):
  return [t.get_text() for t in ticks]


def test_curve_and_matrix_label_tasks_from_one(tmp_path):
  acc = np.full((4, 4), np.nan)
  acc[np.tril_indices(4)] = np.linspace(0.2, 0.9, 10)
  curve = plotting.accuracy_curve_figure([0.9, 0.7, 0.5, 0.4], 't')
  matrix = plotting.accuracy_matrix_figure(acc, 't')
  for fig in (curve, matrix):
    fig.canvas.draw()  # tick texts are set at draw time
  expected = ['1', '2', '3', '4']
  assert _labels(curve.axes[0].get_xticklabels()) == expected
  assert _labels(matrix.axes[0].get_xticklabels()) == expected
  assert _labels(matrix.axes[0].get_yticklabels()) == expected
  paths = plotting.write_plots(str(tmp_path), {
      'method': 'lorm', 'dataset': 'd', 'beta': 0.5, 'seed': 0,
      'accuracy_per_task_end': [0.9, 0.7, 0.5, 0.4],
      'accuracy_matrix': [[None if np.isnan(x) else x for x in row] for row in acc]})
  assert all((tmp_path / p.split('/')[-1]).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' for p in paths)

"""The paper's cars196 benchmark (AugReg ViT-B/16, 10 clients), beta by argument.

  python -m experiments.run --config=configs/cars196.py --workdir=workdirs/cars196
  python -m experiments.run --config=configs/cars196.py:beta=0.5 --workdir=workdirs/cars196_b

Needs the prepared tfds dataset (docs/data.md) and the AugReg checkpoint
(docs/weights.md); a GPU or TPU for a run of reasonable length.
"""
from configs import paper


def get_config(arg=None):
  return paper.paper_config('cars196', arg)

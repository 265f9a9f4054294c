"""The paper's caltech_birds2011 benchmark (AugReg ViT-B/16, 10 clients), beta by argument.

  python -m experiments.run --config=configs/cub200.py --workdir=workdirs/cub200
  python -m experiments.run --config=configs/cub200.py:beta=0.5 --workdir=workdirs/cub200_b

Needs the prepared tfds dataset (docs/data.md) and the AugReg checkpoint
(docs/weights.md); a GPU or TPU for a run of reasonable length.
"""
from configs import paper


def get_config(arg=None):
  return paper.paper_config('caltech_birds2011', arg)

"""The paper's cifar100 benchmark (AugReg ViT-B/16, 10 clients), beta by argument.

  python -m experiments.run --config=configs/cifar100.py --workdir=workdirs/cifar100
  python -m experiments.run --config=configs/cifar100.py:beta=0.1 --workdir=workdirs/cifar100_b

Needs the prepared tfds dataset (docs/data.md) and the AugReg checkpoint
(docs/weights.md); a GPU or TPU for a run of reasonable length.
"""
from configs import paper


def get_config(arg=None):
  return paper.paper_config('cifar100', arg)

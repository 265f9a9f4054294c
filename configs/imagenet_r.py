"""The paper's imagenet_r benchmark (AugReg ViT-B/16, 10 clients), beta by argument.

  python -m experiments.run --config=configs/imagenet_r.py --workdir=workdirs/imagenet_r
  python -m experiments.run --config=configs/imagenet_r.py:beta=0.1 --workdir=workdirs/imagenet_r_b

Needs the prepared tfds dataset (docs/data.md) and the AugReg checkpoint
(docs/weights.md); a GPU or TPU for a run of reasonable length.
"""
from configs import paper


def get_config(arg=None):
  return paper.paper_config('imagenet_r', arg)

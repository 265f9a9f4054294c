"""The paper's cifar100 benchmark (AugReg ViT-B/16, 10 clients), beta by argument.

  python -m experiments.run --config=configs/cifar100.py --workdir=workdirs/cifar100
  python -m experiments.run --config=configs/cifar100.py:beta=0.1 --workdir=workdirs/cifar100_b

The first run downloads and prepares the dataset (lorm_jax/data/acquire.py, no TensorFlow)
and the AugReg checkpoint into their caches (needs a network once; or
`python -m experiments.prepare --config=...` beforehand); a GPU or TPU for a run of
reasonable length, sized to its memory before it starts.
"""
from configs import paper


def get_config(arg=None):
  return paper.paper_config('cifar100', arg)

"""The paper's caltech_birds2011 benchmark (AugReg ViT-B/16, 10 clients), beta by argument.

  python -m experiments.run --config=configs/cub200.py --workdir=workdirs/cub200
  python -m experiments.run --config=configs/cub200.py:beta=0.5 --workdir=workdirs/cub200_b

The first run downloads and prepares the dataset with tfds' own builder,
which needs TensorFlow (`pip install -e '.[tf]'`; lorm_jax/data/acquire.py),
and the AugReg checkpoint into their caches (needs a network once; or
`python -m experiments.prepare --config=...` beforehand); a GPU or TPU for a
run of reasonable length, sized to its memory before it starts.
"""
from configs import paper


def get_config(arg=None):
  return paper.paper_config('caltech_birds2011', arg)

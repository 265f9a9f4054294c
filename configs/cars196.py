"""The paper's cars196 benchmark (AugReg ViT-B/16, 10 clients), beta by argument.

  python -m experiments.run --config=configs/cars196.py --workdir=workdirs/cars196
  python -m experiments.run --config=configs/cars196.py:beta=0.5 --workdir=workdirs/cars196_b

The first run downloads and prepares the dataset with tfds' own builder,
which needs TensorFlow (`pip install -e '.[tf]'`; lorm_jax/data/acquire.py),
and the AugReg checkpoint into their caches (needs a network once; or
`python -m experiments.prepare --config=...` beforehand); a GPU or TPU for a
run of reasonable length, sized to its memory before it starts.
"""
from configs import paper


def get_config(arg=None):
  return paper.paper_config('cars196', arg)

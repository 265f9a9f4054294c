"""ImageNet-R-shaped run on synthetic pixels, for timing the paper's setting.

ViT-B/16 at 224 px (random weights: the AugReg file is not needed to time
it), 200 classes as 10 tasks of 20, 24,000 training images, 10 clients,
5 rounds x 5 local epochs, batch 16, Gram passes and merges included:

  python -m experiments.run --config=configs/bench_vit_b16.py --workdir=/tmp/vitb
  # one task only, the whole run extrapolated:
  python -m experiments.bench_round --config=configs/bench_vit_b16.py --whole-run

Accuracy means nothing here (the pixels are noise); the time does.
"""
from configs import paper


def get_config():
  c = paper.paper_config('imagenet_r')
  c.unlock()
  c.dataset.name = 'synthetic'
  c.dataset.preprocess = 'imagenet_r'
  c.dataset.store_size = 224
  c.dataset.test_per_class = 5
  c.model.weights = 'random'
  c.model.dtype = 'bfloat16'
  c.lock()
  return c

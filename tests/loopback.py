"""A mirror of the paper path's downloads, small, served on 127.0.0.1.

  with serve(folder) as base_url: ...     # HTTP with Range requests, in a thread
  write_tiny_mirror(folder)               # the files a tiny imagenet_r run fetches

The files are small fixtures in the real formats: the AugReg checkpoint's
file name holding an AugReg-layout .npz of the `augreg_tiny` architecture,
and `imagenet-r.tar` laid out as Berkeley's (imagenet-r/<wnid>/<file>.jpg,
200 classes), with a `SHA256SUMS` beside them (a mirror states what it
serves; lorm_jax/download.py). By hand, for a fresh clone:

  python tests/loopback.py /tmp/mirror --serve 8765 &
  LORM_JAX_MIRROR=http://127.0.0.1:8765 python -m experiments.run \\
      --config=configs/imagenet_r.py --workdir=/tmp/imr $(python tests/loopback.py --tiny-flags)
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import sys
import tarfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

AUGREG_B16_FILE = 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz'
IMAGES_PER_CLASS = 3

# experiments.run overrides that make configs/imagenet_r.py tiny: two blocks
# at 32 px, 2 tasks of 100 classes, 2 clients, 1 round of 1 epoch.
TINY_OVERRIDES = {
    'model.name': 'augreg_tiny', 'image_size': 32, 'dataset.store_size': 32,
    'num_tasks': 2, 'num_clients': 2, 'min_samples': 1, 'rounds': 1,
    'local_epochs': 1, 'batch_size': 8, 'eval_batch_size': 64, 'clients_per_chunk': 2,
}


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves a folder with single-range `Range: bytes=N-` support. The server's
  `cut_once` {file name: bytes} sends only that many bytes of the first full
  request of a file and then drops the connection (a broken download)."""

  def log_message(self, *args):  # quiet
    pass

  def do_GET(self):  # noqa: N802
    path = Path(self.translate_path(self.path))
    if not path.is_file():
      self.send_error(404)
      return
    data = path.read_bytes()
    start = 0
    rng = self.headers.get('Range', '')
    if rng.startswith('bytes=') and rng.endswith('-'):
      start = int(rng[6:-1])
      if start >= len(data):
        self.send_response(416)
        self.send_header('Content-Range', f'bytes */{len(data)}')
        self.end_headers()
        return
      self.send_response(206)
      self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
    else:
      self.send_response(200)
    body = data[start:]
    self.send_header('Content-Length', str(len(body)))
    self.send_header('Content-Type', 'application/octet-stream')
    self.end_headers()
    cut = self.server.cut_once.pop(path.name, None) if start == 0 else None
    self.server.requests.append((path.name, start))
    if cut is not None:
      self.wfile.write(body[:cut])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(body)


@contextlib.contextmanager
def serve(folder: str | os.PathLike, cut_once: dict[str, int] | None = None
          ) -> Iterator[http.server.ThreadingHTTPServer]:
  """Serves `folder` on 127.0.0.1 (a free port) in a daemon thread; yields the
  server (`server.url`, `server.requests` [(file, range start)], `server.cut_once`)."""
  handler = lambda *a, **kw: _Handler(*a, directory=os.fspath(folder), **kw)
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  server.daemon_threads = True
  server.cut_once = dict(cut_once or {})
  server.requests = []
  server.url = f'http://127.0.0.1:{server.server_address[1]}'
  thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05},
                            daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


# ------------------------------------------------------------------ fixtures


def augreg_arrays(rng: np.random.Generator | int = 0, patch: int = 8, width: int = 64,
                  depth: int = 2, heads: int = 2, mlp: int = 128, grid: int = 4,
                  scale: float = 0.05, prefix: str = '', pre_logits: bool = False
                  ) -> dict[str, np.ndarray]:
  """Random arrays with exactly the names and shape pattern of an AugReg
  (vit_models) .npz: `augreg_tiny` by default; `prefix` as some files have
  ('params/'); `pre_logits` adds that layer, which the loader ignores."""
  rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
  hd = width // heads

  def r(*shape):
    return (rng.standard_normal(shape) * scale).astype(np.float32)
  w = {'embedding/kernel': r(patch, patch, 3, width), 'embedding/bias': r(width),
       'cls': r(1, 1, width),
       'Transformer/posembed_input/pos_embedding': r(1, grid * grid + 1, width),
       'Transformer/encoder_norm/scale': 1 + r(width), 'Transformer/encoder_norm/bias': r(width),
       'head/kernel': r(width, 5), 'head/bias': r(5)}
  if pre_logits:
    w.update({'pre_logits/kernel': r(width, width), 'pre_logits/bias': r(width)})
  for i in range(depth):
    s = f'Transformer/encoderblock_{i}/'
    a = s + 'MultiHeadDotProductAttention_1/'
    for n in ('query', 'key', 'value'):
      w[a + f'{n}/kernel'] = r(width, heads, hd)
      w[a + f'{n}/bias'] = r(heads, hd)
    w[a + 'out/kernel'] = r(heads, hd, width)
    w[a + 'out/bias'] = r(width)
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      w[s + f'{ln}/scale'] = 1 + r(width)
      w[s + f'{ln}/bias'] = r(width)
    w[s + 'MlpBlock_3/Dense_0/kernel'] = r(width, mlp)
    w[s + 'MlpBlock_3/Dense_0/bias'] = r(mlp)
    w[s + 'MlpBlock_3/Dense_1/kernel'] = r(mlp, width)
    w[s + 'MlpBlock_3/Dense_1/bias'] = r(width)
  return {prefix + k: v for k, v in w.items()}


def imagenet_r_tar(path: str | os.PathLike, wnids: list[str], per_class: int = IMAGES_PER_CLASS,
                   seed: int = 0) -> None:
  """An imagenet-r.tar in Berkeley's layout: imagenet-r/<wnid>/<name>.jpg,
  JPEGs of a few sizes with a class-dependent colour and noise."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  with tarfile.open(path, 'w') as tar:
    for c, wnid in enumerate(wnids):
      for i in range(per_class):
        h, w = 36 + 4 * (i % 3), 40 + 8 * (c % 2)
        base = np.array([(c * 37) % 256, (c * 91) % 256, (c * 13) % 256], np.float32)
        arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format='JPEG', quality=90)
        info = tarfile.TarInfo(f'imagenet-r/{wnid}/art_{c}_{i}.jpg')
        info.size = buf.tell()
        buf.seek(0)
        tar.addfile(info, buf)


def imagenet_wnids() -> list[str]:
  """The 1000 ImageNet WordNet ids in label order (tfds' own list)."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common  # pylint: disable=import-outside-toplevel
  with open(imagenet_common.label_names_file()) as f:
    return [line.strip() for line in f if line.strip()]


def write_sums(folder: str | os.PathLike) -> None:
  """SHA256SUMS of every file in folder (the `sha256sum` format)."""
  folder = Path(folder)
  lines = [f'{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}'
           for p in sorted(folder.iterdir()) if p.is_file() and p.name != 'SHA256SUMS']
  (folder / 'SHA256SUMS').write_text('\n'.join(lines) + '\n')


def write_tiny_mirror(folder: str | os.PathLike) -> Path:
  """The AugReg checkpoint (augreg_tiny) and imagenet-r.tar (200 classes of
  ImageNet, every fifth id) in folder, with SHA256SUMS; returns folder."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  np.savez(folder / AUGREG_B16_FILE, **augreg_arrays())
  imagenet_r_tar(folder / 'imagenet-r.tar', imagenet_wnids()[::5])
  write_sums(folder)
  return folder


def tiny_flags() -> list[str]:
  return [f'--config.{k}={v}' for k, v in TINY_OVERRIDES.items()]


if __name__ == '__main__':
  if sys.argv[1:] == ['--tiny-flags']:
    print(' '.join(tiny_flags()))
    sys.exit(0)
  if len(sys.argv) not in (2, 4) or (len(sys.argv) == 4 and sys.argv[2] != '--serve'):
    sys.exit('usage: python tests/loopback.py FOLDER [--serve PORT] | --tiny-flags')
  out = write_tiny_mirror(sys.argv[1])
  print(f'mirror written to {out}')
  if len(sys.argv) == 4:
    handler = lambda *a, **kw: _Handler(*a, directory=os.fspath(out), **kw)
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[3])), handler)
    srv.cut_once, srv.requests = {}, []
    print(f'serving on http://127.0.0.1:{sys.argv[3]}', flush=True)
    srv.serve_forever()

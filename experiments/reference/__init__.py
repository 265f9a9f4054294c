"""Running the PyTorch reference (aimagelab/fed-mammoth) on this project's inputs.

`export_inputs` (this project's environment) writes one .npz with the
preprocessed images, the client split and the backbone in timm's names;
`run_fed_mammoth` (an environment with torch, timm and lightning) runs the
reference's own, unmodified `main.py` on it. docs/fidelity.md has the commands.
"""

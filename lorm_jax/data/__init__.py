"""Datasets, client partitions and on-device preprocessing.

Modules: ``errors`` (DataError), ``dataset`` (Dataset container, per-class
subsampling), ``fmnist`` (Fashion-MNIST idx files), ``tfds_source`` (the six
benchmarks via tensorflow-datasets without TensorFlow, registry, load_dataset),
``holdout`` (fixed 80/20 split rule), ``partition`` (tasks, Dirichlet client
splits, split files), ``augment`` (JAX preprocessing and presets).
Submodules are imported explicitly so that importing the package stays cheap.
"""

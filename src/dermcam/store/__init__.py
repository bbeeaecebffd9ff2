"""The store: where prepared data sets, runs and checkpoints live, written so that nothing is ever lost.

- :mod:`~dermcam.store.paths`: the store root (``DERMCAM_HOME`` or platformdirs) and its folders.
- :mod:`~dermcam.store.files`: atomic writes (temp file, fsync, rename), JSON reads, sha256.
- :mod:`~dermcam.store.locks`: advisory locks between concurrent commands.
- :mod:`~dermcam.store.tensors`: safetensors files and training state without pickle.
- :mod:`~dermcam.store.checkpoint`: :class:`~dermcam.store.checkpoint.Checkpoint` (weights + sidecar), ranking.
- :mod:`~dermcam.store.runs`: training runs (``run.json``, ``metrics.jsonl``).
- :mod:`~dermcam.store.references`: ``RUN:EPOCH``, ``best``, hash prefixes, paths -> a checkpoint.
- :mod:`~dermcam.store.manage`: ``dermcam ckpt list|prune|verify|restore``.
- :mod:`~dermcam.store.ensembles`: ensemble manifests (members by id and sha256), prune protection.
- :mod:`~dermcam.store.ensemble_exchange`: what an exported ensemble's document says.
- :mod:`~dermcam.store.exchange`: exported files: export and import.
- :mod:`~dermcam.store.exported`: an exported file read as untrusted input, validated before loading.
- :mod:`~dermcam.store.inference`: a model ready for prediction from a checkpoint or an exported file.
"""

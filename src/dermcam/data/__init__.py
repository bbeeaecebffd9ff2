"""Data: from a folder of dermoscopy images to a clean, lesion-grouped, cached data set.

- :mod:`~dermcam.data.sources`: readers of source layouts (HAM10000, ISIC, one folder per class, a CSV),
  each returning the same normalised table; :func:`~dermcam.data.sources.read_source` detects the layout.
- :mod:`~dermcam.data.classes`: class names, the default choice and the label order.
- :mod:`~dermcam.data.clean`: the cleaning every layout shares (duplicates, class choice, matching files).
- :mod:`~dermcam.data.problems`: every problem found in a source, fixed or skipped, never silent.
- :mod:`~dermcam.data.split`: train/val/test grouped so that no lesion and no patient is on two sides; the leakage audit.
- :mod:`~dermcam.data.images`: decoding image files (one reader for ``prepare`` and ``explain``).
- :mod:`~dermcam.data.geometry`: how a decoded image becomes the model's input (one place).
- :mod:`~dermcam.data.cache`: the memory-mapped uint8 image cache.
- :mod:`~dermcam.data.prepare`: ``dermcam prepare``: the steps above, atomically into the store.
- :mod:`~dermcam.data.dataset`: reading a prepared set (what training and evaluation use).
- :mod:`~dermcam.data.synthetic`: a small dermoscopy-like data set for demos and tests.

Nothing here imports torch at module level, and nothing here knows about models or checkpoints.
"""

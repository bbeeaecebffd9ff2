"""Training: transfer learning with an exact, crash-safe resume.

- :mod:`~dermcam.train.config`: :class:`~dermcam.train.config.TrainConfig` (every default, once), grids, TOML.
- :mod:`~dermcam.train.augment`: batch augmentations drawn from (seed, epoch, batch).
- :mod:`~dermcam.train.loss`, :mod:`~dermcam.train.ema`, :mod:`~dermcam.train.schedule`,
  :mod:`~dermcam.train.rng`: the loss, the weight average, the learning rate and image order, RNG state.
- :mod:`~dermcam.train.trainer`: the loop (:class:`~dermcam.train.trainer.Trainer`) and
  :func:`~dermcam.train.trainer.train`, :func:`~dermcam.train.trainer.train_configurations`.
- :mod:`~dermcam.train.distributed`: torchrun / DDP.
"""

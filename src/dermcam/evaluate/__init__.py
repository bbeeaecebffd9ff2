"""Evaluation: probabilities for a split, the metrics that matter in dermatology, and report files.

- :mod:`~dermcam.evaluate.predict`: batched class probabilities for rows of a prepared set's cache.
- :mod:`~dermcam.evaluate.metrics`: balanced accuracy, macro F1, per-class recall/precision/AUC.
- :mod:`~dermcam.evaluate.calibration`: temperature scaling on val, ECE/Brier/NLL, ``apply``.
- :mod:`~dermcam.evaluate.operating`: operating points (thresholds) and the decision every command makes.
- :mod:`~dermcam.evaluate.calibrate`: ``dermcam calibrate``, and training's calibration of its best checkpoint.
- :mod:`~dermcam.evaluate.report`: confusion matrix, reliability, ROC/PR and training curves as PNG, metrics as JSON.
- :mod:`~dermcam.evaluate.evaluation`: :func:`~dermcam.evaluate.evaluation.evaluate`, a checkpoint on a split.
"""

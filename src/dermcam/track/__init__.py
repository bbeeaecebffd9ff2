"""Experiment trackers as a side channel of training: TensorBoard and MLflow (``dermcam train --log``).

Above the store (a tracked run's identity is stored in ``run.json`` and in its sidecars) and below
``train`` and ``evaluate``, which call it; it imports neither. The store stays the record of a run:
a tracker that fails is reported once and left behind, and training goes on.

- :mod:`~dermcam.track.spec`: ``--log`` values parsed and checked, secrets masked (standard library only).
- :mod:`~dermcam.track.base`: the tracker interface, the fan-out that survives failures, parent runs.
- :mod:`~dermcam.track.tensorboard`, :mod:`~dermcam.track.mlflow_tracker`: the two trackers.
"""

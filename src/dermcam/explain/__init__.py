"""Explanations: where the model looked, as class activation maps drawn over the photo.

- :mod:`~dermcam.explain.cam`: :class:`~dermcam.explain.cam.CAM`, the machinery all methods share.
- :mod:`~dermcam.explain.methods`: Grad-CAM, Grad-CAM++, Score-CAM, Eigen-CAM (a few lines each).
- :mod:`~dermcam.explain.tta`: prediction and flip test-time augmentation for explain.
- :mod:`~dermcam.explain.faithfulness`: deletion / insertion AUC of a map.
- :mod:`~dermcam.explain.render`: overlays as PNG.
- :mod:`~dermcam.explain.pipeline`: :func:`~dermcam.explain.pipeline.explain`, files in, overlays and sidecars out.
"""

"""A checkpoint as a file that another runtime runs (ONNX), with dermcam's preprocessing and
calibration inside, so a deployment cannot feed the model a differently prepared image.

It sits above ``store`` (the checkpoint, the export records), ``data`` (the geometry), ``models``
and ``evaluate`` (calibration), unlike ``store.exchange``, whose safetensors files round-trip into
the store.
"""

"""Models: timm backbones, their pretrained weights, the CAM target layer, and where they run.

- :mod:`~dermcam.models.backbones`: building a backbone for a class set, freezing stages, its data config.
- :mod:`~dermcam.models.weights`: pretrained weights offline (Hugging Face cache, a file, lite packages).
- :mod:`~dermcam.models.layers`: the layer Grad-CAM explains in each family, token-to-map folding.
- :mod:`~dermcam.models.device`: CPU/CUDA choice and precision (bf16 only where it is native).

Importing these modules loads no torch or timm: they are imported inside the functions that need them.
"""

"""dermcam: dermoscopy image classification with explanations.

The package is a library first; :mod:`dermcam.cli` is a thin Typer layer over it.
Importing :mod:`dermcam` must stay cheap (no torch), so that ``dermcam --help`` is instant.
"""

__version__ = "0.1.0"

"""``dermcam serve``: one trained model behind a local web page and an HTTP API.

The model (a checkpoint, an ensemble or an exported file) is loaded once, through the same path
``explain`` uses, and answers ``POST /v1/predict`` with the same numbers ``dermcam explain --json``
prints. Concurrent requests are batched on one worker thread that owns the model
(:mod:`dermcam.serve.batching`); the ASGI app (:mod:`dermcam.serve.app`) only decodes, validates and
answers. The web framework and server (FastAPI, uvicorn, python-multipart) are the optional extra
``dermcam[serve]``: this package's ``__init__`` and :mod:`dermcam.serve.settings` import neither, so
the rest of dermcam, ``dermcam --help`` and the option checks never need them.
"""

from __future__ import annotations

import importlib.util

from dermcam.errors import BadInputError

# import name -> the distribution pip installs it from
EXTRA_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart"}
EXTRA_HINT = "pip install 'dermcam[serve]'"


def missing_extra() -> list[str]:
    """The distributions of the ``serve`` extra that are not installed (found without importing them)."""
    return [dist for module, dist in EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]


def require_extra() -> None:
    """A one-line :class:`BadInputError` (exit 2) naming the extra when any of its packages is missing."""
    missing = missing_extra()
    if missing:
        raise BadInputError(f"dermcam serve needs the 'serve' extra ({', '.join(missing)} missing): {EXTRA_HINT}")

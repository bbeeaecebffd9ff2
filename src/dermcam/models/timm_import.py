"""``import timm`` for a short-lived command: without a third of its cost, and with nothing else changed.

Importing timm takes about 2.3 s of a 3 s ``dermcam explain IMAGE`` on the 2-core VM
(benchmarks/bench_startup.py), and about 1 s of that is ``torch._dynamo``, the torch.compile front
end, which scoring an image never runs. Two lines import it while timm loads:

- ``torchvision.ops.roi_align`` does ``from torch._dynamo.utils import is_compile_supported`` (a
  function it calls only when a detection op runs without torchvision's C++ kernels);
- ``timm.models.naflexvit`` decorates three methods with ``torch.compiler.disable``, which imports
  ``torch._dynamo`` to build the decorator.

:func:`import_timm` serves those two names from placeholders for the length of the import and removes
the placeholders afterwards, so the first real use anywhere later (``torch.compile``, ONNX export, a
notebook) imports the real ``torch._dynamo`` as usual:

- ``is_compile_supported`` becomes a function that imports the real one when first called;
- a method decorated while the placeholder is in place is disabled on its first call (the real
  ``torch._dynamo.disable``); until then it behaves as the undecorated method, which is what a disabled
  method does outside torch.compile.

Anything else asked of a placeholder imports the real module on the spot and answers from it, so a
newer timm or torchvision that needs more of dynamo gets it (and only loses the time saved).
``DERMCAM_EAGER_DYNAMO=1`` turns the deferral off.
"""

from __future__ import annotations

import functools
import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

_PACKAGE = "torch._dynamo"
_UTILS = "torch._dynamo.utils"


def import_timm() -> ModuleType:
    """``import timm`` the first time with the cyclic garbage collector paused, everything the import
    built frozen (:func:`gc.freeze`) and ``torch._dynamo`` left for later (see the module docstring).

    The import creates about 375,000 objects (modules, classes, functions, dynamo's and sympy's tables)
    that live until the process exits. The collector would traverse them again and again while they
    are created, and once more while the interpreter shuts down: together about 1.7 s of a 5 s
    ``dermcam explain`` on the 2-core VM. Frozen objects are skipped by every later collection. The
    price: whatever else is alive at that moment and later becomes unreachable *cyclic* garbage is
    never freed; in a CLI process that is the import itself, and in a notebook it happens only if
    dermcam is the first to import timm.
    """
    if "timm" in sys.modules:
        return sys.modules["timm"]
    defer = os.environ.get("DERMCAM_EAGER_DYNAMO", "") in ("", "0")
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401  (imported outside the placeholders: a C extension imports once)

        with _dynamo_deferred() if defer and _PACKAGE not in sys.modules else nullcontext():
            import timm
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return timm


def _real(name: str) -> ModuleType:
    """The real module ``name`` (``torch._dynamo`` or its ``utils``), importing it now if needed."""
    _remove_placeholders()
    return importlib.import_module(name)


def _deferred_is_compile_supported(device_type: Any) -> Any:
    return _real(_UTILS).is_compile_supported(device_type)


def _deferred_disable(fn: Callable[..., Any] | None = None, recursive: bool = True, **kwargs: Any) -> Any:
    """``torch._dynamo.disable`` applied when ``fn`` is first called, not when it is decorated."""
    if fn is None:
        return functools.partial(_deferred_disable, recursive=recursive, **kwargs)
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **call_kwargs: Any) -> Any:
        if not disabled:
            disabled.append(_real(_PACKAGE).disable(fn, recursive, **kwargs))
        return disabled[0](*args, **call_kwargs)

    return call


_SERVED = {_PACKAGE: {"disable": _deferred_disable}, _UTILS: {"is_compile_supported": _deferred_is_compile_supported}}


class _Placeholder(ModuleType):
    """Stands in for ``torch._dynamo`` (or ``.utils``) in ``sys.modules`` while timm is imported."""

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        served = _SERVED[self.__name__].get(attribute)
        return served if served is not None else getattr(_real(self.__name__), attribute)


def _make_placeholder(name: str, package: bool) -> _Placeholder:
    module = _Placeholder(name)
    module.__spec__ = ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    return module


def _remove_placeholders() -> None:
    torch = sys.modules.get("torch")
    for name in (_UTILS, _PACKAGE):
        if isinstance(sys.modules.get(name), _Placeholder):
            del sys.modules[name]
    if torch is not None and isinstance(torch.__dict__.get("_dynamo"), _Placeholder):
        del torch._dynamo
    package = sys.modules.get(_PACKAGE)
    if package is not None and isinstance(package.__dict__.get("utils"), _Placeholder):
        del package.utils


@contextmanager
def _dynamo_deferred() -> Iterator[None]:
    sys.modules[_PACKAGE] = _make_placeholder(_PACKAGE, package=True)
    sys.modules[_UTILS] = _make_placeholder(_UTILS, package=False)
    try:
        yield
    finally:
        _remove_placeholders()

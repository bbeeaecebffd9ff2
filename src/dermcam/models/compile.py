"""``--compile``: torch.compile as an optional speed-up that never stops a run.

Whether torch.compile works depends on the machine more than on dermcam: the Python and torch
versions, a C++ compiler for CPU kernels, Triton and the GPU generation for CUDA ones, and the
backbone's operations. So asking for it is a wish, not a requirement: when it is unavailable or
fails, the caller keeps the eager module and gets a one-line note to show the user.

torch.compile is lazy: wrapping (:func:`maybe_compile`) seldom fails, compiling happens at the first
call. A caller that runs the module must therefore also catch a failure there and go back to the
module it passed in (the trainer does, on its first step: see ``Trainer._first_compiled_step``).
"""

from __future__ import annotations

from typing import Any

from dermcam.errors import first_line


def maybe_compile(module: Any, enabled: bool) -> tuple[Any, str | None]:
    """``(torch.compile(module), None)``, or ``(module, note)`` when compiling is off (no note),
    unavailable or refused. The compiled module shares the original's parameters and buffers."""
    if not enabled:
        return module, None
    import torch

    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        return module, f"--compile ignored: torch {torch.__version__} has no torch.compile; running eagerly"
    try:
        return compile_fn(module), None
    except Exception as exc:  # noqa: BLE001 - any failure means "run eagerly", never "stop the run"
        return module, compile_failed_note(exc)


def compile_failed_note(exc: BaseException) -> str:
    """The one line that says compiling failed, why, and that the run goes on without it."""
    return f"--compile failed, running eagerly: {type(exc).__name__}: {first_line(exc, 300)}"

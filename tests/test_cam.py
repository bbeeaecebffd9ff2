"""dermcam.cam: agreement with pytorch-grad-cam, sanity checks on a trained toy model, model hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from dermcam.errors import BadInputError
from dermcam.explain.cam import CAMResult, resolve_layer
from dermcam.explain.faithfulness import faithfulness
from dermcam.explain.methods import METHODS, EigenCAM, GradCAM, compute_cam, make_cam

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction  # noqa: E402


class _SignCorrectedEigenCAM(pgc.EigenCAM):
    """pytorch-grad-cam's Eigen-CAM with its own sign correction, the convention ours uses."""

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
        return get_2d_projection_with_sign_correction(activations)


REFERENCE = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "scorecam": pgc.ScoreCAM,
    "eigencam": _SignCorrectedEigenCAM,
}
LAYERS = {"test_efficientnet": "blocks.4", "test_resnet": "layer4", "test_convnext": "stages.3"}


def _vit_tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + h*w, C) ViT tokens -> (B, C, h, w), dropping the class token."""
    patches = tokens[:, 1:]
    side = int(patches.shape[1] ** 0.5)
    return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3).eval()


def _reference_maps(method: str, model: nn.Module, layer: str, x: torch.Tensor, targets: list[int],
                    reshape_transform=None) -> np.ndarray:
    with REFERENCE[method](model, [model.get_submodule(layer)], reshape_transform=reshape_transform) as ref:
        if method == "scorecam":
            ref.batch_size = 64
        return ref(x, [ClassifierOutputTarget(t) for t in targets])


def _assert_agree(ours: np.ndarray, theirs: np.ndarray) -> None:
    # Both sides end with a per-image min-max to [0, 1], so raw values compare directly.
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.max(axis=(1, 2)), 1, atol=1e-6)  # real maps, not all-zero ones
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99
    assert np.abs(ours - theirs).max() < 1e-4


# Score-CAM on test_efficientnet is left out on purpose: with random weights its softmax channel
# weights are uniform and the map is a near-total cancellation (max 1e-5 of terms ~1e-2), so float32
# summation order alone moves the min-max-scaled map by 5e-3 in either implementation.
AGREEMENT_CASES = [(name, method) for name in LAYERS for method in ("gradcam", "gradcam++", "eigencam")]
AGREEMENT_CASES += [("test_resnet", "scorecam"), ("test_convnext", "scorecam")]


@pytest.mark.parametrize(("name", "method"), AGREEMENT_CASES)
def test_agrees_with_pytorch_grad_cam(name: str, method: str) -> None:
    model = _model(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))  # no all-zero map
    targets = [1, 2]
    ours = METHODS[method](model, LAYERS[name])(x, targets)
    _assert_agree(ours.maps, _reference_maps(method, model, LAYERS[name], x, targets))
    assert ours.targets == targets and ours.method == method and ours.layer == LAYERS[name]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_agrees_on_a_vision_transformer_with_reshape_transform(method: str) -> None:
    model = _model("test_vit")
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    ours = METHODS[method](model, "blocks.5.norm1", _vit_tokens_to_map)(x, [0, 2])
    theirs = _reference_maps(method, model, "blocks.5.norm1", x, [0, 2], _vit_tokens_to_map)
    _assert_agree(ours.maps, theirs)


def test_result_shapes_and_default_target_is_the_prediction() -> None:
    model = _model("test_resnet")
    x = torch.randn(3, 3, 48, 40)
    result = compute_cam(model, x, "gradcam", target_layer="layer4")
    assert isinstance(result, CAMResult)
    assert result.maps.shape == (3, 48, 40) and result.maps.dtype == np.float32
    assert result.maps.min() >= 0 and result.maps.max() <= 1
    assert result.logits.shape == result.probs.shape == (3, 3)
    np.testing.assert_allclose(result.probs.sum(1), 1, atol=1e-6)
    assert result.targets == result.logits.argmax(1).tolist()


# --- sanity on a model that learned something -----------------------------------------------------

SIZE = 24


def _blob_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images; label 1 ones carry a bright Gaussian blob at a random place (returned as y, x)."""
    x = torch.randn(n, 3, SIZE, SIZE, generator=generator) * 0.5
    labels = torch.randint(0, 2, (n,), generator=generator)
    centres = torch.randint(5, SIZE - 5, (n, 2), generator=generator)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    dist2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    blob = 3 * torch.exp(-dist2 / 8.0)
    return x + labels[:, None, None, None] * blob[:, None], labels, centres


def _toy_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )


@pytest.fixture(scope="module")
def blob_model() -> nn.Sequential:
    """A toy net trained (a couple of seconds) to tell images with a bright blob from plain noise."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = _toy_net()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        x, labels, _ = _blob_batch(32, generator)
        loss = nn.functional.cross_entropy(model(x), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def blob_images() -> tuple[torch.Tensor, torch.Tensor]:
    x, labels, centres = _blob_batch(48, torch.Generator().manual_seed(123))
    return x[labels == 1], centres[labels == 1]


def test_trained_model_classifies_the_toy_task(blob_model, blob_images) -> None:
    x, _ = blob_images
    with torch.no_grad():
        assert (blob_model(x).argmax(1) == 1).float().mean() > 0.95


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam"])
def test_map_peaks_on_the_blob(blob_model, blob_images, method: str) -> None:
    x, centres = blob_images
    maps = make_cam(blob_model, method, "4")(x, 1).maps
    peaks = np.stack(np.unravel_index(maps.reshape(len(maps), -1).argmax(1), maps.shape[1:]), axis=1)
    distance = np.linalg.norm(peaks - centres.numpy(), axis=1)
    assert (distance <= 4).mean() >= 0.9  # the blob has a 2 px sigma; 4 px is its visible radius


def test_randomised_weights_change_the_map(blob_model, blob_images) -> None:
    """Adebayo et al. 2018: a map that survives weight randomisation explains the image, not the model."""
    from scipy.stats import spearmanr

    x, _ = blob_images
    trained = GradCAM(blob_model, "4")(x, 1).maps
    torch.manual_seed(99)
    randomised = GradCAM(_toy_net().eval(), "4")(x, 1).maps
    rho = [spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(trained, randomised)]
    assert np.median(rho) < 0.5


def test_deletion_auc_is_better_for_the_cam_than_for_a_random_map(blob_model, blob_images) -> None:
    x, _ = blob_images
    x = x[:4]
    cam = GradCAM(blob_model, "4")(x, 1).maps
    noise = np.random.default_rng(0).random(cam.shape).astype(np.float32)
    ours = faithfulness(blob_model, x, cam, 1, steps=10)
    baseline = faithfulness(blob_model, x, noise, 1, steps=10)
    assert len(ours["deletion_auc"]) == 4 and len(ours["deletion_curve"][0]) == 11
    assert all(0 <= a <= 1 for a in ours["deletion_auc"] + ours["insertion_auc"])
    assert np.mean(ours["deletion_auc"]) < np.mean(baseline["deletion_auc"]) - 0.2
    assert ours["deletion_curve"][0][0] == pytest.approx(ours["insertion_curve"][0][-1], abs=1e-6)


def test_faithfulness_rejects_a_map_of_the_wrong_size(blob_model, blob_images) -> None:
    x, _ = blob_images
    with pytest.raises(BadInputError, match="cam_map"):
        faithfulness(blob_model, x[:2], np.zeros((2, 5, 5), np.float32), 1)


# --- test-time augmentation -----------------------------------------------------------------------

def test_tta_averages_the_four_flips_and_is_flip_equivariant() -> None:
    model = _model("test_convnext")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    result = compute_cam(model, x, "gradcam", target_layer="stages.3", tta=True)
    with torch.no_grad():
        expected = torch.stack([model(x.flip(d) if d else x).softmax(1) for d in ((), (3,), (2,), (2, 3))])
    np.testing.assert_allclose(result.probs, expected.mean(0).numpy(), atol=1e-6)
    flipped = compute_cam(model, x.flip(3), "gradcam", target_layer="stages.3", tta=True)
    np.testing.assert_allclose(flipped.maps, result.maps[:, :, ::-1], atol=1e-4)
    assert flipped.targets == result.targets


# --- the model is left exactly as it was ------------------------------------------------------------

def _snapshot(model: nn.Module) -> tuple[dict, list, list, list]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [p.grad for p in model.parameters()])


def _assert_unchanged(model: nn.Module, before: tuple[dict, list, list, list]) -> None:
    state, modes, flags, grads = before
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(g is None for g in grads) and all(p.grad is None for p in model.parameters())


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("method", list(METHODS))
def test_model_is_unchanged_in_train_mode_with_batchnorm(method: str) -> None:
    model = _model("test_efficientnet").train()
    model.blocks[0].eval()  # a mixed state must come back exactly, not as all-train
    before = _snapshot(model)
    result = make_cam(model, method, "blocks.4")(torch.randn(2, 3, 32, 32), 0)
    assert result.maps.shape == (2, 32, 32)
    _assert_unchanged(model, before)  # BatchNorm running stats untouched: the CAM ran in eval mode
    assert _no_hooks(model)


def test_hooks_are_removed_and_model_restored_after_an_error() -> None:
    model = _model("test_resnet").train()
    before = _snapshot(model)
    with pytest.raises(BadInputError, match="out of range"):
        GradCAM(model, "layer4")(torch.randn(1, 3, 32, 32), target=7)
    assert _no_hooks(model)
    _assert_unchanged(model, before)

    class Exploding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.conv(x)
            raise RuntimeError("boom")

    exploding = Exploding()
    with pytest.raises(RuntimeError, match="boom"):
        GradCAM(exploding, "conv")(torch.randn(1, 3, 8, 8))
    assert _no_hooks(exploding) and exploding.training


def test_frozen_backbone_gives_the_same_map_as_a_trainable_one() -> None:
    model = _model("test_resnet")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    reference = GradCAM(model, "layer4")(x, [0, 1]).maps
    for param in model.parameters():
        param.requires_grad_(False)
    frozen = GradCAM(model, "layer4")(x, [0, 1]).maps
    assert frozen.max() == pytest.approx(1.0, abs=1e-5)  # a real map, not all zeros
    np.testing.assert_allclose(frozen, reference, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())


def test_runs_in_fp32_inside_bf16_autocast_and_no_grad() -> None:
    model = _model("test_convnext")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    reference = GradCAM(model, "stages.3")(x, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert model(x).dtype == torch.bfloat16  # the enclosing context really is bf16
        inside = GradCAM(model, "stages.3")(x, 1)
        from_bf16_input = GradCAM(model, "stages.3")(x.bfloat16(), 1)
    assert inside.logits.dtype == from_bf16_input.logits.dtype == np.float32
    np.testing.assert_allclose(inside.maps, reference.maps, atol=1e-6)
    np.testing.assert_allclose(inside.logits, reference.logits, atol=1e-6)
    # a bf16 input is cast up: identical to the fp32 run on the same (rounded) values
    np.testing.assert_allclose(from_bf16_input.maps, GradCAM(model, "stages.3")(x.bfloat16().float(), 1).maps,
                               atol=1e-6)


def test_inference_mode_callers_still_get_gradients() -> None:
    model = _model("test_resnet")
    x = torch.randn(1, 3, 32, 32)
    reference = GradCAM(model, "layer4")(x).maps
    with torch.inference_mode():
        inside = GradCAM(model, "layer4")(torch.as_tensor(x)).maps
    np.testing.assert_allclose(inside, reference, atol=1e-6)


def test_inplace_activation_after_the_target_layer_does_not_corrupt_the_map() -> None:
    torch.manual_seed(0)
    inplace = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 2))
    plain = nn.Sequential(inplace[0], nn.ReLU(), *inplace[2:])
    x = torch.randn(2, 3, 16, 16)
    np.testing.assert_allclose(EigenCAM(inplace, "0")(x).maps, EigenCAM(plain, "0")(x).maps, atol=1e-6)
    np.testing.assert_allclose(GradCAM(inplace, "0")(x).maps, GradCAM(plain, "0")(x).maps, atol=1e-6)


# --- clear errors ------------------------------------------------------------------------------------

def test_unknown_layer_suggests_close_names() -> None:
    with pytest.raises(BadInputError, match=r"layer 'layer5' not found .* did you mean 'layer4'"):
        resolve_layer(_model("test_resnet"), "layer5")


def test_unknown_method_and_bad_inputs_are_one_line_errors() -> None:
    model = _model("test_resnet")
    with pytest.raises(BadInputError, match="unknown CAM method 'lime'"):
        compute_cam(model, torch.randn(1, 3, 32, 32), "lime", target_layer="layer4")
    with pytest.raises(BadInputError, match=r"\(B, 3, H, W\)"):
        GradCAM(model, "layer4")(torch.randn(3, 32, 32))
    with pytest.raises(BadInputError, match="2 target classes for a batch of 1"):
        GradCAM(model, "layer4")(torch.randn(1, 3, 32, 32), [0, 1])
    with pytest.raises(BadInputError, match="not a .*feature map"):
        GradCAM(model, "fc")(torch.randn(1, 3, 32, 32))
    with pytest.raises(BadInputError, match="not used in the model's forward"):
        model.unused = nn.Conv2d(3, 3, 1)
        GradCAM(model, "unused")(torch.randn(1, 3, 32, 32))
    assert _no_hooks(model)


@pytest.mark.parametrize(("name", "layer", "size"),
                         [("test_efficientnet", "bn2", 64), ("test_vit", "blocks.5.norm1", 160)])
def test_default_layer_and_reshape_transform_come_from_the_model(name: str, layer: str, size: int) -> None:
    model = _model(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(6))
    result = compute_cam(model, x, "gradcam++")
    assert result.layer == layer and result.maps.shape == (1, size, size)
    if name == "test_vit":
        np.testing.assert_allclose(result.maps, METHODS["gradcam++"](model, layer, _vit_tokens_to_map)(x).maps,
                                   atol=1e-6)

"""The audit's engine (dermcam.audit.attention, .stress, .run) on synthetic models whose behaviour is known.

Images are drawn: skin with a darker ellipse (the lesion) in the middle, some with the black corners of a
dermoscope's field. The models are a few lines each: one that can only see the corners, one that only sees
the centre, one whose melanoma logit is the amount of violet in the image, one that reads the mean colour
of a small disc at the centre (so rotations, flips and anything painted at the edges cannot move it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dermcam.errors import BadInputError

H, W = 48, 64
CLASSES = ["bcc", "mel", "nv"]
SIDECAR = {"id": "synthetic:0", "backbone": "synthetic", "classes": CLASSES,
           "preprocessing": {"input_size": [3, H, W], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                             "cache_size": [W, H]}}


def draw(n: int = 12, seed: int = 0, vignette: bool = False) -> np.ndarray:
    """``n`` images: skin, a darker ellipse near the centre (9-12 x 12-16 px), optionally black corners."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.empty((n, H, W, 3), dtype=np.uint8)
    for i in range(n):
        image = np.array([205.0, 165.0, 145.0]) + rng.normal(0, 4, (H, W, 3))
        cy, cx = (H - 1) / 2 + rng.uniform(-2, 2), (W - 1) / 2 + rng.uniform(-2, 2)
        a, b = rng.uniform(9, 12), rng.uniform(12, 16)
        inside = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1
        image[inside] = np.array([95.0, 60.0, 45.0]) + rng.normal(0, 4, (int(inside.sum()), 3))
        if vignette:
            image[np.hypot(yy - (H - 1) / 2, xx - (W - 1) / 2) > 28] = 0.0
        out[i] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return out


class Gate(nn.Module):
    """Multiplies a feature map by a fixed spatial mask (corners or centre) at any input size: the CAM's
    target layer, so the model literally cannot see anything else."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h, w = f.shape[-2:]
        yy = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
        xx = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
        if self.where == "corners":
            near_y = (yy < 0.12 * h) | (yy >= 0.88 * h)
            near_x = (xx < 0.12 * w) | (xx >= 0.88 * w)
            mask = near_y & near_x
        else:
            mask = ((yy - (h - 1) / 2).abs() < 0.12 * h) & ((xx - (w - 1) / 2).abs() < 0.12 * w)
        return f * mask.to(f.dtype)


class Looker(nn.Module):
    """conv -> ReLU -> Gate -> mean -> linear, with positive weights: every class's evidence is wherever
    the gate lets features through, so its Grad-CAM is there and nowhere else."""

    def __init__(self, where: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.gate = Gate(where)
        self.head = nn.Linear(4, len(CLASSES))
        with torch.no_grad():
            self.conv.weight.uniform_(0.05, 0.15)
            self.conv.bias.fill_(0.5)
            self.head.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.act(self.conv(x))).mean(dim=(2, 3)))


def violet(x: torch.Tensor) -> torch.Tensor:
    """Per pixel, how much blue exceeds both red and green beyond 20 levels: violet ink, never skin,
    a brown lesion or a black corner."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    return torch.relu(b - torch.maximum(r, g) - 20 / 255)[:, None]


class Features(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return violet(x) + 0 * x[:, :1]


class VioletReader(nn.Module):
    """mel's logit is the share of violet in the image (x 3000); the other two are 0."""

    def __init__(self) -> None:
        super().__init__()
        self.features = Features()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amount = self.features(x).mean(dim=(1, 2, 3))
        zero = torch.zeros_like(amount)
        return torch.stack([zero, 3000 * amount - 1.0, zero - 0.5], dim=1)


class CentreDisc(nn.Module):
    """Logits from the mean colour of a disc of radius 15% of the short side at the centre: rotations and
    flips map it onto itself and edge artefacts never reach it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        yy = torch.arange(h, dtype=torch.float32)[:, None] - (h - 1) / 2
        xx = torch.arange(w, dtype=torch.float32)[None, :] - (w - 1) / 2
        disc = (yy ** 2 + xx ** 2 <= (0.15 * min(h, w)) ** 2).to(x.dtype)
        colour = (x * disc).sum(dim=(2, 3)) / disc.sum()
        return 10 * (colour - 0.3)


class Flat(nn.Module):
    """No spatial feature map anywhere: nothing for Grad-CAM to explain."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def run_audit(model: nn.Module, images: np.ndarray, **kwargs):
    from dermcam.audit.run import audit_model

    labels = np.arange(len(images)) % len(CLASSES)
    return audit_model(model.eval(), SIDECAR, images, np.arange(len(images)), labels, dataset="drawn", split="test",
                       **kwargs)


# --- part 1: where the attention goes ----------------------------------------------------------------------


def test_a_model_that_only_sees_the_corners_is_flagged() -> None:
    result = run_audit(Looker("corners"), draw(vignette=True), parts=("attention",))
    flagged = {f["region"] for f in result.attention.flags}
    assert {"border", "vignette", "off_lesion"} <= flagged
    summary = result.attention.region_summary(result.attention.images)
    assert summary["border"]["p50"] > 0.8 and summary["vignette"]["p50"] > 0.5
    assert len(result.attention.off_lesion_images) == summary["off_lesion"]["n"] > 0
    assert any("border band" in line for line in result.findings())


def test_a_model_that_looks_at_the_lesion_is_not_flagged() -> None:
    result = run_audit(Looker("centre"), draw(vignette=True), parts=("attention",))
    attention = result.attention
    assert attention.flags == []
    summary = attention.region_summary(attention.images)
    assert summary["border"]["p90"] < 0.05 and summary["vignette"]["p90"] < 0.05
    assert summary["off_lesion"]["n"] >= 10 and summary["off_lesion"]["p90"] < 0.2  # the lesion masks worked
    assert result.findings()[0].startswith("Attention: stable")
    assert result.stress is None


def test_off_lesion_errors_are_compared_with_intervals() -> None:
    from dermcam.audit.attention import newcombe, wilson

    low, high = wilson(0, 8)
    assert low == 0.0 and 0.3 < high < 0.4  # Wilson at 0 of 8: not the useless [0, 0]
    assert wilson(0, 0) is None
    diff = newcombe(8, 10, 1, 10)
    assert diff is not None and diff[0] > 0
    errors = run_audit(Looker("corners"), draw(vignette=True), parts=("attention",)).attention.errors()
    assert errors["off_lesion"]["n"] + errors["rest"]["n"] <= 12
    assert errors["verdict"] in ("more often wrong", "less often wrong", "no clear difference",
                                 "too few images to compare")


def test_a_model_without_a_cam_layer_is_refused_in_one_line_unless_only_stress() -> None:
    with pytest.raises(BadInputError, match=r"cannot audit where the model looks.*--only stress"):
        run_audit(Flat(), draw(4))
    result = run_audit(Flat(), draw(4), parts=("stress",), perturbations=["hflip"])
    assert result.attention is None and len(result.stress.results) == 1


# --- part 2: what changes the answer ---------------------------------------------------------------------


def test_a_model_that_reacts_to_violet_is_flagged_for_ink_and_not_for_rotations() -> None:
    result = run_audit(VioletReader(), draw(), parts=("stress",),
                       perturbations=["ink", "rot90", "rot180", "hflip", "vflip"])
    by_name = {r.name: r for r in result.stress.results}
    ink = by_name["ink"]
    assert result.stress.positive == "mel"
    assert ink.mean_delta > 0.1 and ink.flipped.sum() > 0 and not ink.stable
    assert ink.direction == "raises p(mel)"
    assert ink.to_dict()["to_positive"] == int(ink.flipped.sum())
    for name in ("rot90", "rot180", "hflip", "vflip"):
        assert by_name[name].stable, name
        assert by_name[name].direction is None  # acquisition changes have no direction
    assert result.stress.moving() == [ink]
    assert any(line.startswith("ink: p(mel) +") and "raises p(mel)" in line for line in result.findings())


def test_a_model_reading_only_the_centre_is_stable_under_rotations_flips_and_edge_artefacts() -> None:
    names = ["ruler", "vignette", "rot90", "rot180", "rot270", "hflip", "vflip"]
    result = run_audit(CentreDisc(), draw(), parts=("stress",), perturbations=list(reversed(names)))
    assert [r.name for r in result.stress.results] == names  # the table's order, whatever the order asked
    for r in result.stress.results:
        assert r.stable, (r.name, r.mean_abs_delta, r.flip_share)
    assert result.findings() == [(f"Perturbations: stable: none of {len(names)} moves p(mel) by 0.02 on average "
                                  "or flips 2% of the decisions.")]


def test_the_audit_is_deterministic_and_the_same_image_gets_the_same_perturbation_in_any_batch() -> None:
    images = draw(6)
    one = run_audit(VioletReader(), images, parts=("stress",), perturbations=["ink", "hair"], seed=3, batch_size=4)
    two = run_audit(VioletReader(), images, parts=("stress",), perturbations=["ink", "hair"], seed=3, batch_size=5)
    for a, b in zip(one.stress.results, two.stress.results):
        np.testing.assert_array_equal(a.delta, b.delta)
    other = run_audit(VioletReader(), images, parts=("stress",), perturbations=["ink"], seed=4)
    assert not np.array_equal(other.stress.results[0].delta, one.stress.results[0].delta)


def test_the_positive_class_is_the_operating_points_then_mel_then_the_first() -> None:
    from dermcam.audit.stress import positive_class

    assert positive_class(SIDECAR) == 1
    assert positive_class({**SIDECAR, "classes": ["a", "b"]}) == 0
    point = {"class": "nv", "metric": "sensitivity", "target": 0.9, "threshold": 0.3}
    assert positive_class({**SIDECAR, "calibration": {"method": "temperature", "temperature": 1.0},
                           "operating_point": point}) == 2


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"perturbations": ["sepia"]}, r"unknown perturbation 'sepia'; choose from ink, "),
    ({"limit": 0}, r"--limit must be a whole number from 1"),
    ({"parts": ("colour",)}, r"--only 'colour': choose attention or stress"),
    ({"seed": -1}, r"--seed must be"),
    ({"batch_size": 0}, r"--batch-size must be"),
])
def test_bad_options_are_one_line_errors_before_any_work(kwargs: dict, message: str) -> None:
    class Exploding(nn.Module):
        def forward(self, x):  # pragma: no cover - must never run
            raise AssertionError("the model ran")

    with pytest.raises(BadInputError, match=message) as caught:
        run_audit(Exploding(), draw(2), **kwargs)
    assert "\n" not in str(caught.value)


def test_an_empty_split_is_refused() -> None:
    from dermcam.audit.run import audit_model

    with pytest.raises(BadInputError, match="nothing to audit"):
        audit_model(Looker("centre"), SIDECAR, draw(2), np.array([], dtype=np.int64), np.array([], dtype=np.int64))


# --- what is written ---------------------------------------------------------------------------------


def test_audit_json_and_the_example_images_are_written(tmp_path: Path) -> None:
    from dermcam.audit.run import SCHEMA, read_audit

    result = run_audit(Looker("corners"), draw(8, vignette=True), perturbations=["ink", "rot90", "brighter"],
                       out_dir=tmp_path)
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["schema"] == SCHEMA and doc["n"] == 8 and doc["seed"] == 0 and doc["checkpoint"]["id"] == "synthetic:0"
    assert doc["dataset"] == "drawn" and doc["split"] == "test" and set(doc["versions"]) >= {"dermcam", "torch"}
    assert len(doc["attention"]["images"]) == 8 and doc["attention"]["flags"]
    assert [p["name"] for p in doc["stress"]["perturbations"]] == ["ink", "rot90", "brighter"]
    assert doc["findings"] == result.findings()
    examples = doc["examples"]["attention"]
    assert examples and all((tmp_path / e["photo"]).is_file() and (tmp_path / e["overlay"]).is_file()
                            for e in examples)
    assert (tmp_path / "audit" / "attention.png").is_file() and (tmp_path / "audit" / "stress.png").is_file()
    for e in doc["examples"]["stress"]:
        assert (tmp_path / e["before"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = read_audit(tmp_path)
    assert "audit/attention.png" in found["images"] and all(e["photo"] in found["images"] for e in examples)
    # a second audit replaces the first one's examples rather than leaving them beside its own
    (tmp_path / "audit" / "attention-99.cam.png").write_bytes(b"old")
    run_audit(Looker("centre"), draw(8), parts=("attention",), out_dir=tmp_path)
    assert not (tmp_path / "audit" / "attention-99.cam.png").exists()
    assert not (tmp_path / "audit" / "stress.png").exists()


def test_read_audit_reads_nothing_outside_its_folder(tmp_path: Path) -> None:
    from dermcam.audit.run import SCHEMA, read_audit
    from dermcam.errors import CorruptError

    assert read_audit(tmp_path) is None
    (tmp_path / "secret.png").write_bytes(b"secret")
    (tmp_path / "audit").mkdir()
    doc = {"schema": SCHEMA, "examples": {"attention": [{"photo": "secret.png", "overlay": "audit/../secret.png"}]}}
    (tmp_path / "audit.json").write_text(json.dumps(doc))
    assert read_audit(tmp_path)["images"] == {}
    (tmp_path / "audit.json").write_text("{not json")
    with pytest.raises(CorruptError, match="cannot be read"):
        read_audit(tmp_path)


def test_the_report_section_shows_the_findings_and_escapes_names(tmp_path: Path) -> None:
    from dermcam.audit.run import read_audit
    from dermcam.report.gallery import Gallery
    from dermcam.report.sections import ReportInputs, render

    run_audit(Looker("corners"), draw(8, vignette=True), perturbations=["ink", "rot90"], out_dir=tmp_path)
    audit = read_audit(tmp_path)
    audit["examples"]["attention"][0]["image_id"] = "<img src=x onerror=alert(1)>"
    metrics = {"checkpoint": "synthetic:0", "dataset": "drawn", "split": "test", "n": 8}
    text = render(ReportInputs(metrics, SIDECAR, None, None, {}, Gallery(), {}, "now", audit=audit))
    assert 'id="shortcuts"' in text and "Shortcuts and robustness" in text
    assert "<img src=x" not in text and "&lt;img src=x" in text
    assert "Where the attention goes" in text and "What changes the answer" in text
    assert text.count("data:image/png;base64,") >= 2 + 2 * len(audit["examples"]["attention"])
    plain = render(ReportInputs(metrics, SIDECAR, None, None, {}, Gallery(), {}, "now"))
    assert 'id="shortcuts"' not in plain


def test_an_ensemble_is_audited_with_its_mean_map_and_its_own_scoring() -> None:
    """Two corner-looking members at different input sizes: the ensemble's map (the members' maps for the
    ensemble's decision, averaged at the cache size) is still all in the corners; scoring goes through
    the ensemble's reported view, as evaluate runs it."""
    from dermcam.audit.run import audit_model
    from dermcam.audit.stress import score
    from dermcam.models.ensemble import EnsembleModel, MemberSpec

    pre = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "cache_size": [W, H]}
    specs = [MemberSpec({**pre, "input_size": [3, H, W]}, None, 1.0),
             MemberSpec({**pre, "input_size": [3, 32, 40]}, None, 1.0)]
    model = EnsembleModel([Looker("corners"), Looker("corners")], specs).eval()
    sidecar = {"id": "pair", "kind": "ensemble", "classes": CLASSES, "backbone": "ensemble(a+b)",
               "calibration": {"method": "members", "temperature": None},
               "members": [{"id": "a:0"}, {"id": "b:0"}],
               "preprocessing": {"input_size": [3, H, W], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                                 "cache_size": [W, H]}}
    images = draw(6, vignette=True)
    result = audit_model(model, sidecar, images, np.arange(6), np.zeros(6, dtype=np.int64), perturbations=["ink"])
    assert result.attention.layer == "a:0: gate; b:0: gate"
    assert {"border", "vignette"} <= {f["region"] for f in result.attention.flags}
    with torch.no_grad():
        direct = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).exp().numpy()
    np.testing.assert_allclose(result.baseline.probs, direct, atol=1e-6)
    np.testing.assert_allclose(score(model, sidecar, images, np.arange(6), device="cpu").probs, direct, atol=1e-6)

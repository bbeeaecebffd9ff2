"""report.html: self-contained, offline, escaped, and checked the way a person sees it (headless Chromium).

One tiny run (a synthetic set, 2 epochs of a tiny timm model, an operating point) is trained once for the
module; its report/ folder is what training wrote. The browser tests load a test-only copy of a page that
adds one inline script (allowed by its hash in the page's Content-Security-Policy): after the load event
it writes the number of images and of images that did not decode into ``document.title``, which
``--dump-dom`` prints. Any console message (a CSP violation, a script error) fails the test too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import run_json
from dermcam.report.html import CSP, esc

SECTIONS = ("summary", "data", "model", "metrics", "calibration", "operating-point", "training-curves",
            "confusion-matrix", "roc-pr", "subgroups", "gallery", "model-card")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(prepared_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with 'synth', 'other' (a second set with a class the model lacks) and one finished run."""
    from dermcam.data.prepare import prepare
    from dermcam.data.synthetic import write_synthetic_ham10000
    from dermcam.train.config import TrainConfig
    from dermcam.train.trainer import train

    root = tmp_path_factory.mktemp("report-home")
    shutil.copytree(prepared_store / "datasets", root / "datasets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMCAM_HOME", str(root))
        src = write_synthetic_ham10000(root.parent / "other-src", n_lesions_per_class=8, images_per_lesion=(1, 2),
                                       classes=("bcc", "mel", "nv"), size=(64, 48), seed=9)
        prepare(src, name="other", classes=["bcc", "mel", "nv"], cache_size=(64, 48), external=True, root=root)
        train(TrainConfig(dataset="synth", backbone="test_efficientnet", pretrained="none", image_size=48,
                          batch_size=16, epochs=2, operating_point="mel:sensitivity=0.9"), root=root)
    return root


@pytest.fixture
def run_report(store: Path) -> Path:
    [run] = sorted((store / "runs").iterdir())
    return run / "report" / "report.html"


class Page(HTMLParser):
    """What the structure tests look at: section ids, image sources, links, scripts, visible text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(str(found.get("id")))
        if tag == "img":
            self.images.append(str(found.get("src")))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_training_writes_a_self_contained_report(run_report: Path) -> None:
    text = run_report.read_text(encoding="utf-8")
    page = Page(text)
    assert list(page.sections) == list(SECTIONS)
    assert len(page.images) >= 6 + 2  # curves, confusion matrices, reliability, ROC, PR; gallery pairs
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)
    assert not re.search(r"https?://", text), "the page refers to the network"
    assert not {"script", "link", "iframe", "object"} & set(page.tags)
    words = " ".join(page.text)
    for phrase in ("not a medical device", "95% CI", "too few images", "Most confident errors", "Correct cases",
                   "Training configuration", "temperature"):
        assert phrase in words, phrase


def test_the_gallery_shows_confident_errors_and_correct_cases_with_their_overlays(run_report: Path) -> None:
    import numpy as np
    import pandas as pd

    from dermcam.report.gallery import answers, choose_cases

    predictions = pd.read_csv(run_report.parent / "predictions.csv", dtype=str, keep_default_na=False)
    classes = [c.removeprefix("p_") for c in predictions.columns if c.startswith("p_")]
    errors, correct = choose_cases(predictions, classes)
    answered, confidence = answers(predictions, classes)
    wrong = answered != predictions["true"].to_numpy(dtype=str)
    assert len(errors) == min(6, len(set(predictions["lesion_id"][wrong])))
    assert len(correct) == min(3, len(set(predictions["lesion_id"][~wrong])))
    lesions = predictions["lesion_id"].to_numpy(dtype=str)
    assert all(wrong[errors]) and not any(wrong[correct])
    assert len(set(lesions[errors])) == len(errors) and len(set(lesions[correct])) == len(correct)
    assert list(confidence[errors]) == sorted(confidence[errors], reverse=True)
    passed_over = [i for i in np.flatnonzero(wrong) if lesions[i] not in set(lesions[errors])]
    assert not passed_over or confidence[errors].min() >= confidence[passed_over].max()
    page = Page(run_report.read_text(encoding="utf-8"))
    assert len(page.images) == 6 + 2 * (len(errors) + len(correct))  # every case: photo and overlay


def test_names_from_the_data_are_escaped(run_report: Path) -> None:
    """A class or data set named like markup is shown as text: no element comes from the data."""
    from dermcam.report.gallery import Gallery
    from dermcam.report.sections import ReportInputs, render

    folder = run_report.parent
    metrics = json.loads((folder / "metrics.json").read_text())
    sidecar = json.loads(next(folder.parent.glob("epoch-*.json")).read_text())
    evil = '<img src=x onerror="alert(1)">'
    metrics["dataset"] = f"{evil}&'"
    sidecar["classes"] = [evil, "mel", "nv"]
    metrics["left_out"] = {evil: 3}
    text = render(ReportInputs(metrics, sidecar, None, None, {}, Gallery(note=evil), {"dermcam": evil}, "now"))
    page = Page(text)
    assert page.images == [] and "script" not in page.tags
    assert evil in " ".join(page.text) and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: "
                                                             "apt-get install chromium; .ci/run installs it)")
CHECK = ("addEventListener('load', () => { const broken = [...document.images].filter("
         "i => !i.complete || i.naturalWidth === 0).length; "
         "document.title = `images=${document.images.length} broken=${broken}`; });")


def open_in_chromium(page: Path, tmp_path: Path, change=lambda text: text) -> tuple[int, int, list[str]]:
    """Load a test-only copy of ``page`` (after ``change``) in headless Chromium, offline:
    (images, images that did not decode, console messages)."""
    digest = base64.b64encode(hashlib.sha256(CHECK.encode()).digest()).decode()
    text = page.read_text(encoding="utf-8")
    assert esc(CSP) in text
    checked = change(text).replace(esc(CSP), esc(f"{CSP}; script-src 'sha256-{digest}'"), 1).replace(
        "</head>", f"<script>{CHECK}</script></head>", 1)
    copy = tmp_path / "checked.html"
    copy.write_text(checked, encoding="utf-8")
    run = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-background-networking", "--no-first-run", "--enable-logging=stderr", "--v=0",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    title = re.search(r"<title>images=(\d+) broken=(\d+)</title>", run.stdout)
    assert title, f"the page did not load: {run.stderr[-2000:]}"
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    return int(title[1]), int(title[2]), console


@needs_chromium
def test_the_report_loads_in_a_browser_with_every_image_decoded(run_report: Path, tmp_path: Path) -> None:
    images, broken, console = open_in_chromium(run_report, tmp_path)
    assert images == len(Page(run_report.read_text(encoding="utf-8")).images) and broken == 0
    assert console == []


@needs_chromium
def test_the_browser_check_sees_a_broken_image_and_a_network_reference(run_report: Path, tmp_path: Path) -> None:
    """The check can fail: one image's PNG replaced by bytes that are no image, one image from the network."""
    def break_one(text: str) -> str:
        return re.sub(r'src="data:image/png;base64,[^"]+"', 'src="data:image/png;base64,AAAAAAAA"', text, count=1)

    _, broken, console = open_in_chromium(run_report, tmp_path, break_one)
    assert broken == 1 and console == []
    _, broken, console = open_in_chromium(
        run_report, tmp_path, lambda text: text.replace("</main>", '<img src="https://example.invalid/a.png"></main>'))
    assert broken == 1 and any("Content Security Policy" in line for line in console)


def test_report_reuses_a_current_evaluation_and_evaluates_again_when_asked(runner, store: Path, run_report: Path,
                                                                           monkeypatch) -> None:
    from dermcam.cli import app

    monkeypatch.setenv("DERMCAM_HOME", str(store))
    run_id = run_report.parents[1].name
    out = run_json(runner, ["report", run_id, "--json"])
    assert out["report"] == str(run_report) and out["evaluated"] is False
    plain = runner.invoke(app, ["report", run_id])
    assert plain.exit_code == 0 and plain.stdout.strip() == str(run_report)
    again = run_json(runner, ["report", run_id, "--reevaluate", "--json"])
    best = json.loads((run_report.parents[1] / "run.json").read_text())["best"]
    assert again["evaluated"] is True and again["checkpoint"] == best and again["report"] == str(run_report)


def test_evaluate_out_writes_the_report_naming_both_sets(runner, store: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DERMCAM_HOME", str(store))
    run_json(runner, ["evaluate", "--data", "other", "--resamples", "50", "--out", str(tmp_path / "ext"), "--json"])
    page = Page((tmp_path / "ext" / "report.html").read_text(encoding="utf-8"))
    words = " ".join(page.text)
    assert "external validation" in words and "other" in words and "synth" in words
    assert "Left out (classes the model does not know): bcc" in words
    assert "prepared with --external" in words and "training-curves" not in page.sections


def test_a_folder_without_an_evaluation_is_a_clear_error(runner, store: Path, tmp_path: Path, monkeypatch) -> None:
    from dermcam.errors import NotFoundError
    from dermcam.report.build import write_html_report

    monkeypatch.setenv("DERMCAM_HOME", str(store))
    with pytest.raises(NotFoundError, match="holds no evaluation"):
        write_html_report(tmp_path, "best", root=store)


def test_a_number_that_rounds_to_zero_has_no_minus_sign(run_report: Path) -> None:
    """A perfect model's NLL (-0.0 from -log(1)) or rounding noise (-1e-7) reads 0.0000 in the report's
    calibration table and 0.000 on the terminal, never -0.0000: both use one formatter."""
    import numpy as np

    from dermcam.cli.views import calibration_line
    from dermcam.evaluate.metrics import cross_entropy
    from dermcam.report.gallery import Gallery
    from dermcam.report.sections import ReportInputs, render

    assert str(cross_entropy(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]))) == "0.0"  # not "-0.0"
    folder = run_report.parent
    metrics = json.loads((folder / "metrics.json").read_text())
    sidecar = json.loads(next(folder.parent.glob("epoch-*.json")).read_text())
    assert metrics["calibration"]["applied"]
    metrics["calibration"].update(nll=-1e-7, ece=-0.0)
    metrics["calibration"]["raw"]["nll"] = -0.0
    text = render(ReportInputs(metrics, sidecar, None, None, {}, Gallery(), {}, "now"))
    negative_zero = re.compile(r"(?<![0-9])-0\.0+(?![0-9])")  # not the dash of an interval "0.000-0.000"
    assert "<td>NLL</td><td>0.0000</td><td>0.0000</td>" in text and not negative_zero.search(text)
    line = calibration_line(metrics["calibration"])
    assert " -> 0.000  Brier" in line and "NLL 0.000 -> 0.000" in line and not negative_zero.search(line)

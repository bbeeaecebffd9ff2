"""``dermcam distill ENSEMBLE``: a student trained on a tiny two-member ensemble through the CLI (the
teacher, a finished student and an interrupted one are made once per module; each test works on a copy),
then the loss, the soft-targets file and the option checks on their own."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers_train import stop_after_epoch

from conftest import run_json, weights_of
from dermcam.cli import app
from dermcam.errors import ExitCode

TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth", "--epochs", "1"]
STUDENT = ["--pretrained", "none", "--batch-size", "16", "--epochs", "3"]  # backbone and size: the teacher's


@dataclass(frozen=True)
class Store:
    """A store with the "synth" set, two tiny members ``a`` and ``b``, ensemble "duo" of them, a finished
    3-epoch student of it (``straight``, its --json result) and the same student stopped after epoch 1
    (run ``stopped``)."""

    home: Path
    a: str
    b: str
    straight: dict
    stopped: str

    def run_dir(self, run: str) -> Path:
        return self.home / "runs" / run


def idle_cpu(mp: pytest.MonkeyPatch) -> None:
    """``--threads auto`` (which training's final evaluate applies) always sees idle cores here: a thread
    count that followed the load of whatever else runs on the machine would change floating-point
    rounding between the runs that the resume tests compare."""
    import os

    mp.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0), raising=False)


@pytest.fixture(autouse=True)
def steady_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    idle_cpu(monkeypatch)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Store:
    from typer.testing import CliRunner

    from dermcam.data.prepare import prepare
    from dermcam.data.synthetic import write_synthetic_ham10000

    base = tmp_path_factory.mktemp("distill-module")
    src = write_synthetic_ham10000(base / "src", n_lesions_per_class=12, images_per_lesion=(1, 2), seed=1)
    root = base / "store"
    prepare(src, name="synth", cache_size=(64, 48), root=root)
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DERMCAM_HOME", str(root))
        idle_cpu(mp)
        a, b = (r["best_checkpoint"] for r in run_json(runner, ["train", *TINY, "--seed", "0", "--seed", "1",
                                                                "--json"]))
        run_json(runner, ["ensemble", "create", "duo", a, b, "--json"])
        straight = run_json(runner, ["distill", "duo", *STUDENT, "--json"])
        before = {p.name for p in (root / "runs").iterdir()}
        stop_after_epoch(mp)
        stopped = runner.invoke(app, ["distill", "ensemble:duo", *STUDENT])
        assert stopped.exit_code == ExitCode.INTERRUPTED, stopped.output
    [run] = {p.name for p in (root / "runs").iterdir()} - before
    return Store(root, a, b, straight, run)


@pytest.fixture
def store(made: Store, dermcam_home: Path) -> Store:
    """This test's DERMCAM_HOME: a copy of the module's store."""
    shutil.copytree(made.home, dermcam_home, dirs_exist_ok=True)
    return Store(dermcam_home, made.a, made.b, made.straight, made.stopped)


def manifest_sha(home: Path, name: str = "duo") -> str:
    import hashlib

    return hashlib.sha256((home / "ensembles" / f"{name}.json").read_bytes()).hexdigest()


def said(result) -> str:
    """What a command wrote on stderr, with rich's line wrapping undone."""
    return " ".join(result.stderr.split())


def one_line_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


# ------------------------------------------------------------------------------------ the command


def test_the_student_is_an_ordinary_checkpoint_that_records_its_teacher(runner, store: Store, tmp_path: Path) -> None:
    result = store.straight
    run_dir = store.run_dir(result["run_id"])
    assert result["config"]["teacher"] == "duo" and result["config"]["dataset"] == "synth"
    assert result["config"]["backbone"] == "test_efficientnet"  # the member listed first's, at its input size
    assert result["epochs_done"] == 3 and result["test_metrics"]["n"] > 0
    block = {"teacher": "ensemble:duo", "sha256": manifest_sha(store.home), "temperature": 2.0, "alpha": 0.3}
    for epoch in range(3):
        sidecar = json.loads((run_dir / f"epoch-{epoch:04d}.json").read_text())
        assert sidecar["distillation"] == block
        assert sidecar["preprocessing"]["input_size"] == [3, 48, 48]
    teacher = result["teacher"]
    assert teacher["id"] == "ensemble:duo" and teacher["members"] == 2 and teacher["soft_targets_seconds"] >= 0
    assert set(result["gap"]) == {"balanced_accuracy", "auc_macro"}
    for key, gap in result["gap"].items():
        assert gap == pytest.approx(result["test_metrics"][key] - teacher["test_metrics"][key])
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"

    # the soft targets are what `evaluate ensemble:duo` scores for the train images, row for row
    from safetensors.numpy import load_file

    stored = load_file(str(run_dir / "soft_targets.safetensors"))
    out = tmp_path / "teacher"
    assert runner.invoke(app, ["evaluate", "ensemble:duo", "--split", "train", "--resamples", "0",
                               "--out", str(out)]).exit_code == 0
    import pandas as pd

    scored = pd.read_csv(out / "predictions.csv")
    assert stored["probs"].shape == (len(scored), 3)
    np.testing.assert_allclose(stored["probs"], scored[["p_bkl", "p_mel", "p_nv"]].to_numpy(), atol=2e-6)

    # evaluate, explain and export take the student unchanged
    best = result["best_checkpoint"]
    evaluated = run_json(runner, ["evaluate", best, "--resamples", "0", "--json"])
    assert evaluated["checkpoint"] == best and evaluated["metrics"]["balanced_accuracy"] == \
        result["test_metrics"]["balanced_accuracy"]
    image = next((store.home / "datasets").rglob("images.npy"))
    from PIL import Image

    Image.fromarray(np.load(image, mmap_mode="r")[0].copy()).save(tmp_path / "lesion.png")
    explained = run_json(runner, ["explain", str(tmp_path / "lesion.png"), "-c", best, "-o", str(tmp_path / "cam"),
                                  "--json"])
    assert Path(explained["images"][0]["overlay"]).is_file()
    exported = run_json(runner, ["ckpt", "export", best, "-o", str(tmp_path / "student.safetensors"), "--json"])
    assert Path(exported["file"]).is_file()
    again = run_json(runner, ["evaluate", str(tmp_path / "student.safetensors"), "--data", "synth", "--resamples",
                              "0", "--json"])
    assert again["metrics"]["balanced_accuracy"] == evaluated["metrics"]["balanced_accuracy"]


def test_a_student_at_alpha_0_trains_exactly_as_the_plain_run(runner, store: Store,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """At alpha 0 the loss is the hard loss, and asking the teacher leaves the RNG as it was: the student's
    weights are those of ``dermcam train`` with the same settings. The soft targets still reach the loss."""
    from dermcam.train.loss import DistillationLoss

    calls = []
    original = DistillationLoss.__call__

    def spy(self, logits, target, soft=None):
        calls.append(None if soft is None else tuple(soft.shape))
        return original(self, logits, target, soft)

    monkeypatch.setattr(DistillationLoss, "__call__", spy)
    shown = runner.invoke(app, ["distill", "duo", *STUDENT[:-1], "1", "--alpha", "0"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "Teacher ensemble:duo (2 members; T 2, alpha 0" in text and "student against teacher" in text, text
    assert calls and all(c is not None and c[1] == 3 for c in calls)
    [plain] = run_json(runner, ["train", *TINY, "--json"])
    student = max((store.home / "runs").iterdir(), key=lambda p: (p / "run.json").stat().st_mtime
                  if p.name != plain["run_id"] else 0)
    assert json.loads((student / "epoch-0000.json").read_text())["distillation"]["alpha"] == 0
    a, b = weights_of(student, 0), weights_of(Path(plain["run_dir"]), 0)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_an_interrupted_student_resumes_exactly_from_its_stored_soft_targets(runner, store: Store,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from dermcam.train import distill

    def no_teacher(*args, **kwargs):
        raise AssertionError("the soft targets were computed again instead of read back")

    monkeypatch.setattr(distill, "compute_soft_targets", no_teacher)
    resumed = runner.invoke(app, ["train", "--resume", "--run", store.stopped, "--json"])
    assert resumed.exit_code == 0, resumed.output
    [result] = json.loads(resumed.stdout)
    assert result["resumed_from"] == f"{store.stopped}:1" and "read back" in said(resumed)
    a = weights_of(store.run_dir(store.straight["run_id"]), 2)
    b = weights_of(store.run_dir(store.stopped), 2)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert result["test_metrics"] == store.straight["test_metrics"]


@pytest.mark.parametrize("damage", ["nan", "truncated", "other-teacher"])
def test_damaged_soft_targets_are_never_used_silently(runner, store: Store, damage: str) -> None:
    from safetensors.numpy import load_file

    from dermcam.train.distill import write_soft_targets

    path = store.run_dir(store.stopped) / "soft_targets.safetensors"
    good = load_file(str(path))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        probs = good["probs"].copy()
        if damage == "nan":
            probs[3, 1] = np.nan
        write_soft_targets(path, probs, good["rows"], teacher="ensemble:duo",
                           sha256=("0" * 64 if damage == "other-teacher" else manifest_sha(store.home)),
                           fingerprint=json.loads((store.run_dir(store.stopped) / "epoch-0000.json").read_text())
                           ["dataset"]["fingerprint"], classes=["bkl", "mel", "nv"])
    resumed = runner.invoke(app, ["train", "--resume", "--run", store.stopped, "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert "cannot be used" in said(resumed) and "computing them again" in said(resumed)
    np.testing.assert_array_equal(load_file(str(path))["probs"], good["probs"])  # computed again, the same
    a, b = (weights_of(store.run_dir(run), 2) for run in (store.straight["run_id"], store.stopped))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resume_refuses_a_teacher_that_changed_or_is_gone(runner, store: Store) -> None:
    from dermcam.store.ensembles import new_manifest, save_ensemble
    from dermcam.store.references import resolve

    save_ensemble(new_manifest("duo", [resolve(store.a)], [1.0]), replace=True)  # one member now
    one_line_error(runner.invoke(app, ["train", "--resume", "--run", store.stopped]), ExitCode.CORRUPT,
                   "ensemble 'duo' changed since run", store.stopped)
    (store.home / "ensembles" / "duo.json").unlink()
    one_line_error(runner.invoke(app, ["train", "--resume", "--run", store.stopped]), ExitCode.NOT_FOUND,
                   f"run {store.stopped} distils ensemble 'duo', which is gone")


def test_a_damaged_distillation_block_is_a_damaged_checkpoint(runner, store: Store) -> None:
    path = store.run_dir(store.stopped) / "epoch-0001.json"
    sidecar = json.loads(path.read_text())
    sidecar["distillation"]["alpha"] = 2
    path.write_text(json.dumps(sidecar))
    one_line_error(runner.invoke(app, ["evaluate", f"{store.stopped}:1", "--resamples", "0"]), ExitCode.CORRUPT,
                   "distillation.alpha")


def test_a_student_can_read_patient_metadata_whatever_its_teacher_read(runner, store: Store) -> None:
    result = run_json(runner, ["distill", "duo", *STUDENT, "--epochs", "1", "--metadata", "age,sex,site", "--json"])
    best = result["best_checkpoint"]
    run, epoch = best.split(":")
    sidecar = json.loads((store.run_dir(run) / f"epoch-{int(epoch):04d}.json").read_text())
    assert sidecar["metadata"]["fields"] == ["age", "sex", "site"] and sidecar["config"]["metadata"] == "age,sex,site"
    assert sidecar["distillation"]["teacher"] == "ensemble:duo"  # the teacher's members read no metadata
    assert store.straight["config"]["metadata"] is None  # without the option: images only, as before
    out = run_json(runner, ["evaluate", best, "--resamples", "0", "--json"])
    assert out["metadata"]["fields"] == ["age", "sex", "site"] and out["metadata"]["without_metadata"] == 0
    assert out["metrics"]["balanced_accuracy"] == pytest.approx(result["test_metrics"]["balanced_accuracy"])


@pytest.mark.parametrize("args, code, words", [
    (["nope"], ExitCode.NOT_FOUND, "no ensemble 'nope'"),
    (["ensemble:nope"], ExitCode.NOT_FOUND, "no ensemble 'nope'"),
    (["../duo"], ExitCode.BAD_INPUT, "plain name"),
    (["best"], ExitCode.BAD_INPUT, "plain name"),
    (["duo", "--temperature", "0"], ExitCode.BAD_INPUT, "--temperature"),
    (["duo", "--temperature", "nan"], ExitCode.BAD_INPUT, "--temperature"),
    (["duo", "--temperature", "1000"], ExitCode.BAD_INPUT, "--temperature"),
    (["duo", "--alpha", "1.5"], ExitCode.BAD_INPUT, "--alpha"),
    (["duo", "--alpha", "-0.1"], ExitCode.BAD_INPUT, "--alpha"),
    (["duo", "--epochs", "0"], ExitCode.BAD_INPUT, "--epochs"),
    (["duo", "--backbone", "no_such_model"], ExitCode.BAD_INPUT, "no_such_model"),
    (["duo", "--image-size", "48by48"], ExitCode.BAD_INPUT, "--image-size"),
    (["duo", "--threads", "zero"], ExitCode.BAD_INPUT, "--threads"),
    (["duo", "--metadata", "dx_type"], ExitCode.BAD_INPUT, "--metadata"),  # leaks the label: never a feature
    (["duo", "--metadata", "height"], ExitCode.BAD_INPUT, "--metadata"),
])
def test_bad_options_are_one_line_before_any_work(runner, store: Store, args: list[str], code: int,
                                                   words: str) -> None:
    runs = sorted(p.name for p in (store.home / "runs").iterdir())
    one_line_error(runner.invoke(app, ["distill", *args]), code, words)
    assert sorted(p.name for p in (store.home / "runs").iterdir()) == runs


def test_an_option_that_is_not_a_number_is_a_usage_error(runner, store: Store) -> None:
    result = runner.invoke(app, ["distill", "duo", "--alpha", "half"])
    assert result.exit_code == ExitCode.BAD_INPUT and "Traceback" not in result.output


# ------------------------------------------------------------------------------------ the parts


def test_distillation_loss_alpha_zero_is_the_hard_loss_exactly() -> None:
    import torch

    from dermcam.train.loss import DistillationLoss, WeightedCrossEntropy

    torch.manual_seed(0)
    logits, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    soft = torch.softmax(torch.randn(8, 3), dim=1)
    for weights in (None, torch.tensor([0.5, 2.0, 1.0])):
        hard = WeightedCrossEntropy(weights, 0.1)
        assert torch.equal(DistillationLoss(hard, 3.0, 0.0)(logits, y, soft), hard(logits, y))
        assert torch.equal(DistillationLoss(hard, 3.0, 0.6)(logits, y), hard(logits, y))  # no soft targets given


def test_the_distillation_term_vanishes_when_the_student_answers_as_the_teacher() -> None:
    import torch

    from dermcam.train.loss import DistillationLoss, WeightedCrossEntropy

    torch.manual_seed(1)
    logits = torch.randn(6, 3, dtype=torch.float32).requires_grad_()
    y = torch.randint(0, 3, (6,))
    loss = DistillationLoss(WeightedCrossEntropy(torch.tensor([1.0, 3.0, 0.5]), 0.1), 1.0, 1.0)
    term = loss(logits, y, torch.softmax(logits.detach(), dim=1))
    term.backward()
    assert abs(float(term.detach())) < 1e-6 and float(logits.grad.abs().max()) < 1e-6
    # at T = 2 the same holds for a teacher equal to the student's softmax at T = 2 (p^(1/T) of softmax(z))
    logits.grad = None
    term = DistillationLoss(WeightedCrossEntropy(None, 0.0), 2.0, 1.0)(logits, y, torch.softmax(logits.detach(), 1))
    term.backward()
    assert abs(float(term.detach())) < 1e-6 and float(logits.grad.abs().max()) < 1e-6


def test_the_distillation_term_is_finite_for_teacher_probabilities_with_zeros() -> None:
    import torch

    from dermcam.train.loss import DistillationLoss, WeightedCrossEntropy

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-3.0, 4.0, 1.0]], requires_grad=True)
    soft = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    for t in (1.0, 2.0, 20.0):
        loss = DistillationLoss(WeightedCrossEntropy(None, 0.1), t, 0.7)(logits, torch.tensor([0, 1, 2]), soft)
        loss.backward()
        assert torch.isfinite(loss) and float(loss.detach()) > 0 and torch.isfinite(logits.grad).all()
        logits.grad = None
    # the KL term against a one-hot teacher at T = 1 is the student's cross-entropy on that class
    one_hot = torch.tensor([[1.0, 0.0, 0.0]]).repeat(3, 1)
    kd = DistillationLoss(WeightedCrossEntropy(None, 0.0), 1.0, 1.0)(logits, torch.tensor([0, 1, 2]), one_hot)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0]))
    assert torch.allclose(kd, expected)


def test_soft_target_checks_name_what_is_wrong(tmp_path: Path) -> None:
    from dermcam.errors import CorruptError
    from dermcam.train.distill import check_probabilities, read_soft_targets, write_soft_targets

    probs = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=np.float32)
    assert check_probabilities(probs, 2, 3) is None
    assert "shape" in check_probabilities(probs, 3, 3)
    assert "NaN" in check_probabilities(np.array([[np.nan, 0.5, 0.5]] * 2, dtype=np.float32), 2, 3)
    assert "sums to" in check_probabilities(np.array([[0.2, 0.2, 0.2]] * 2, dtype=np.float32), 2, 3)
    assert "outside" in check_probabilities(np.array([[1.5, -0.5, 0.0]] * 2, dtype=np.float32), 2, 3)
    path = tmp_path / "soft_targets.safetensors"
    rows = np.array([4, 7])
    write_soft_targets(path, probs, rows, teacher="ensemble:duo", sha256="a" * 64, fingerprint="f1",
                       classes=["bkl", "mel", "nv"])
    args = dict(sha256="a" * 64, fingerprint="f1", rows=rows, classes=["bkl", "mel", "nv"])
    np.testing.assert_array_equal(read_soft_targets(path, **args), probs)
    for change, words in ((dict(sha256="b" * 64), "sha256"), (dict(fingerprint="f2"), "fingerprint"),
                          (dict(rows=np.array([7, 4])), "rows"), (dict(classes=["a", "b", "c"]), "classes")):
        with pytest.raises(CorruptError, match=words):
            read_soft_targets(path, **{**args, **change})


@pytest.mark.parametrize("fields, words", [
    ({"teacher": "best"}, "plain name"), ({"teacher": "a/b"}, "plain name"),
    ({"teacher": "duo", "folds": 5}, "--folds"), ({"distill_temperature": -1.0}, "--temperature"),
    ({"distill_alpha": float("inf")}, "--alpha"), ({"distill_temperature": True}, "distill_temperature"),
])
def test_train_config_checks_the_distillation_fields(fields: dict, words: str) -> None:
    from dermcam.errors import BadInputError
    from dermcam.train.config import TrainConfig

    with pytest.raises(BadInputError, match=words):
        TrainConfig(**fields).validate()
    TrainConfig(teacher="ensemble:duo").check_distillation()

"""A cross-validation's record in the rest of the store: ``ckpt prune`` keeps every fold's best checkpoint
while the cross-validation runs and after its ensemble is removed (so ``evaluate cv:NAME`` and the resume
keep working), ``ckpt verify`` reports a damaged record or predictions file like a damaged checkpoint,
and ``evaluate cv:NAME`` of an unfinished one names the folds it lacks in one line."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_json
from dermcam.cli import app
from dermcam.errors import ExitCode
from helpers_cli import cli, refused

TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth", "--epochs", "2"]
AGGRESSIVE = ["ckpt", "prune", "--keep-best", "0", "--no-keep-latest", "--yes"]


@dataclass(frozen=True)
class Running:
    """A 2-fold cross-validation "duo" of 2 epochs a fold, stopped after fold 2's first checkpoint: fold 1
    finished (its predictions stored, no ensemble yet), fold 2 training."""

    home: Path
    runs: tuple[str, str]
    best: str  # fold 1's best checkpoint


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, prepared_store: Path) -> Running:
    from typer.testing import CliRunner

    from dermcam.train import trainer

    root = tmp_path_factory.mktemp("crossval-store")
    shutil.copytree(prepared_store / "datasets", root / "datasets")
    original = trainer.Trainer._save

    def save_then_stop(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.config.fold == 1 and self.epoch == 0:
            raise KeyboardInterrupt
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DERMCAM_HOME", str(root))
        mp.setattr(trainer.Trainer, "_save", save_then_stop)
        result = CliRunner().invoke(app, ["train", *TINY, "--folds", "2", "--ensemble", "duo"])
    assert result.exit_code == 130, result.output
    record = json.loads((root / "crossval" / "duo" / "cv.json").read_text())
    assert [f["status"] for f in record["fold_runs"]] == ["finished", "training"]
    assert not (root / "ensembles" / "duo.json").exists()
    first, second = (f["run"] for f in record["fold_runs"])
    return Running(root, (first, second), record["fold_runs"][0]["best"])


@pytest.fixture
def home(stopped: Running, dermcam_home: Path) -> Path:
    """This test's DERMCAM_HOME: a copy of the module's stopped cross-validation."""
    shutil.copytree(stopped.home, dermcam_home, dirs_exist_ok=True)
    return dermcam_home


def ids_of(home: Path) -> set[str]:
    return {f"{p.parent.name}:{int(p.stem.split('-')[1])}" for p in (home / "runs").glob("*/epoch-*.json")}


def test_prune_keeps_each_folds_best_while_running_and_after_the_ensemble_is_gone(runner, home: Path,
                                                                                stopped: Running) -> None:
    first, second = stopped.runs
    assert {f"{first}:0", f"{first}:1", f"{second}:0"} == ids_of(home)
    pruned = run_json(runner, [*AGGRESSIVE, "--json"])  # running: no ensemble protects fold 1's best yet
    kept = {k["id"]: k["reasons"] for k in pruned["kept"]}
    assert kept == {stopped.best: ["cross-validation duo"]}
    assert {r["id"] for r in pruned["removed"]} == ids_of(stopped.home) - {stopped.best}
    assert pruned["cv_folds_removed"] == [] and ids_of(home) == {stopped.best}

    unfinished = cli(runner, "evaluate", "cv:duo", "--resamples", "0")
    assert unfinished.exit_code == 0, unfinished.output
    warning = [line for line in unfinished.output.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1 and "1 of 2 folds" in warning[0] and f"fold 2 (run {second}, training)" in warning[0]

    out = run_json(runner, ["train", "--resume", "--run", "cv:duo", "--json"])  # fold 2 again, then the ensemble
    assert out["status"] == "finished" and out["fold_runs"][0]["best"] == stopped.best
    bests = {f["best"] for f in out["fold_runs"]}
    members = run_json(runner, ["ensemble", "show", "duo", "--json"])["members"]
    assert sorted(m["id"] for m in members) == sorted(bests)

    assert run_json(runner, ["ensemble", "rm", "duo", "--json"])["removed"] == "duo"
    text = cli(runner, *AGGRESSIVE)
    assert text.exit_code == 0 and "cross-validation duo" in text.output, text.output
    assert bests <= ids_of(home)
    estimate = run_json(runner, ["evaluate", "cv:duo", "--resamples", "0", "--json"])
    assert estimate["status"] == "finished" and estimate["images"] == out["images"]
    assert run_json(runner, ["train", "--resume", "--run", "cv:duo", "--json"])["runs"] == []
    assert cli(runner, "ckpt", "verify").exit_code == 0

    dry = cli(runner, *AGGRESSIVE, "--force", "--dry-run")
    assert dry.exit_code == 0 and "best checkpoint of cross-validation duo" in dry.output, dry.output
    forced = run_json(runner, [*AGGRESSIVE, "--force", "--json"])
    assert sorted(forced["cv_folds_removed"], key=lambda r: r["id"]) == [
        {"id": b, "cross_validations": ["duo"]} for b in sorted(bests)]
    assert cli(runner, "ckpt", "verify").exit_code == 0  # deleted on purpose is not damage (as for ensembles)
    assert cli(runner, "evaluate", "cv:duo", "--resamples", "0").exit_code == 0  # the predictions stay


def test_a_fold_whose_training_ended_keeps_its_best_before_the_record_names_it(runner, home: Path,
                                                                               stopped: Running) -> None:
    """Between a fold's last epoch and its stored predictions the record has no best for it yet: the
    best its run finished with is what the record is about to name, so prune keeps it too."""
    second = stopped.runs[1]
    run_json_path = home / "runs" / second / "run.json"
    info = json.loads(run_json_path.read_text())
    run_json_path.write_text(json.dumps({**info, "status": "finished", "best": f"{second}:0"}))
    pruned = run_json(runner, [*AGGRESSIVE, "--json"])
    assert {k["id"]: k["reasons"] for k in pruned["kept"]} == {stopped.best: ["cross-validation duo"],
                                                               f"{second}:0": ["cross-validation duo"]}


def verify_damage(runner, path: Path, *words: str) -> None:
    """``ckpt verify`` exits 4 and names ``path`` as damaged, in --json and in text."""
    result = cli(runner, "ckpt", "verify", "--json")
    assert result.exit_code == int(ExitCode.CORRUPT), result.output
    damaged = {d["path"]: d["problem"] for d in json.loads(result.stdout)["damaged"]}
    assert list(damaged) == [str(path)], damaged
    for word in words:
        assert word in damaged[str(path)], damaged
    text = cli(runner, "ckpt", "verify")
    assert text.exit_code == int(ExitCode.CORRUPT) and "damaged" in text.output and "Traceback" not in text.output


def test_verify_reports_a_damaged_record_or_predictions_file(runner, home: Path, stopped: Running) -> None:
    assert cli(runner, "ckpt", "verify").exit_code == 0  # a good (running) cross-validation passes
    record_path = home / "crossval" / "duo" / "cv.json"
    oof_path = home / "crossval" / "duo" / "oof.csv"
    record_text, oof_text = record_path.read_text(), oof_path.read_text()
    record = json.loads(record_text)

    record_path.write_text(record_text[: len(record_text) // 2])  # truncated
    verify_damage(runner, record_path, "cv.json")
    refused(cli(runner, *AGGRESSIVE), ExitCode.CORRUPT, "--force")  # prune cannot tell what it needs
    assert ids_of(home) == ids_of(stopped.home)

    first_fold = record["fold_runs"][0]
    for change, words in (({"images": first_fold["images"] + 1}, ["fold 1", str(first_fold["images"] + 1)]),
                          ({"best": f"{stopped.runs[0]}:{1 - int(stopped.best.split(':')[1])}"}, ["oof.csv"])):
        edited = [{**first_fold, **change}, record["fold_runs"][1]]
        record_path.write_text(json.dumps({**record, "fold_runs": edited}))
        verify_damage(runner, record_path, *words)
    record_path.write_text(json.dumps({**record, "classes": list(reversed(record["classes"]))}))
    verify_damage(runner, record_path)
    record_path.write_text(record_text)

    lines = oof_text.splitlines()
    oof_path.write_text("\n".join(lines[:-1]) + "\n")  # an image dropped
    verify_damage(runner, record_path, "oof.csv", "fold 1")
    oof_path.write_text(oof_text[: len(oof_text) - 40])  # truncated mid-line
    verify_damage(runner, record_path, "oof.csv")
    oof_path.unlink()
    verify_damage(runner, record_path, "missing")
    refused(cli(runner, "evaluate", "cv:duo"), ExitCode.CORRUPT, "oof.csv", "missing")
    oof_path.write_text(oof_text)

    shutil.move(home / "runs" / stopped.runs[0], home / "elsewhere")
    verify_damage(runner, record_path, "fold 1", stopped.runs[0])
    shutil.move(home / "elsewhere", home / "runs" / stopped.runs[0])
    assert cli(runner, "ckpt", "verify").exit_code == 0


def test_evaluate_of_a_cross_validation_without_a_finished_fold_names_the_folds(runner, home: Path,
                                                                               stopped: Running) -> None:
    record_path = home / "crossval" / "duo" / "cv.json"
    record = json.loads(record_path.read_text())
    pending = [{"fold": 0, "run": stopped.runs[0], "status": "pending", "best": None}, record["fold_runs"][1]]
    record_path.write_text(json.dumps({**record, "fold_runs": pending}))
    (home / "crossval" / "duo" / "oof.csv").unlink()
    refused(cli(runner, "evaluate", "cv:duo"), ExitCode.NOT_FOUND, f"fold 1 (run {stopped.runs[0]}, pending)",
            f"fold 2 (run {stopped.runs[1]}, training)", "train --resume --run cv:duo")

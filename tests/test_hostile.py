"""Hostile input through the CLI (issue 21): every abuse ends in a documented exit code and, for an error,
one line on stderr; never a traceback or a boxed usage message; and nothing changes outside the store and
the output that was asked for.

The sweep (:data:`CASES`) runs each class of abuse on every command it applies to: values out of range,
huge numbers, empty strings, newlines, output paths that are files or lie under a file, unknown options,
missing arguments. Each runs in a temporary store holding a prepared set and a checkpoint, from a
temporary working folder, so a command that got past its checks would have real work to do (and files
to write), which :func:`changes` would show.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermcam.cli import app

DOCUMENTED = {0, 2, 3, 4, 5, 6, 130}  # README / docs/concepts.md; 1 is "an unexpected failure inside dermcam"
ERRORS = {2, 3, 4, 6}  # the command did nothing: one line says why (5 finished, listing what it skipped)
HUGE = "1" + "0" * 23  # 10**23
TOO_BIG_FOR_TORCH = str(2**70)
TRAIN = ["--data", "synth", "--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48",
         "--epochs", "1", "--device", "cpu"]  # a valid run: only the hostile value stops it
CKPT = "5a3e00:1"


# --- the world each case runs in ------------------------------------------------------------------------

def _save(run_id: str, values: list[float], manifest: dict) -> list[Path]:
    """A run of random test_efficientnet checkpoints, one per monitored value, as training saves them."""
    import timm
    import torch

    from dermcam.store.checkpoint import save_checkpoint
    from dermcam.store.runs import create_run

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=len(manifest["classes"]))
    run = create_run({"backbone": "test_efficientnet", "dataset": manifest["name"]}, run_id=run_id)
    saved = []
    for epoch, value in enumerate(values):
        sidecar = {"backbone": "test_efficientnet", "classes": manifest["classes"],
                   "preprocessing": {"input_size": [3, 48, 48], "mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225], "interpolation": "bicubic",
                                     "cache_size": [manifest["cache"]["width"], manifest["cache"]["height"]]},
                   "dataset": {"name": manifest["name"], "fingerprint": manifest["fingerprint"]},
                   "metrics": {"balanced_accuracy": value},
                   "monitor": {"name": "val_balanced_accuracy", "mode": "max", "value": value}}
        saved.append(save_checkpoint(run, epoch=epoch, model_state=model.state_dict(), sidecar=sidecar).weights_path)
    return saved


@pytest.fixture(scope="session")
def source_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dermcam.data.synthetic import write_synthetic_ham10000

    return write_synthetic_ham10000(tmp_path_factory.mktemp("hostile-src") / "src", n_lesions_per_class=3,
                                    images_per_lesion=(1, 1), size=(64, 48), seed=2)


@pytest.fixture
def world(home: Path, tmp_path: Path, source_template: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A store (the prepared set "synth", run 5a3e00 with checkpoints 0 and 1, 1 the best) and a working
    folder holding a photo, a source folder, a plain file where a folder is expected, and a folder."""
    manifest = json.loads((home / "datasets" / "synth" / "manifest.json").read_text())
    weights = _save("5a3e00", [0.5, 0.9], manifest)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save("lesion.jpg")
    shutil.copytree(source_template, cwd / "src")
    Path("afile.txt").write_text("a file where a folder is expected\n")
    Path("adir").mkdir()
    (home / "locks").mkdir(exist_ok=True)  # lock files come and go there: the store's machinery, not its data
    return {"home": home, "cwd": cwd, "best_weights": weights[1]}


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots``: path -> (size, modification time); a folder's size is -1."""
    seen: dict[str, tuple[int, int]] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            seen[str(path)] = (-1 if path.is_dir() and not path.is_symlink() else info.st_size, info.st_mtime_ns)
    return seen


def changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Paths added, removed or modified between two snapshots (a folder counts when its entries changed)."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def invoke(runner, args: list[str], world: dict[str, Path], allowed: Callable[[str], bool] = lambda p: False):
    """Run ``dermcam args`` in ``world``; check what every hostile invocation must satisfy; return the result.

    ``allowed``: which changed paths are fine (the store's, the requested output's); by default none
    but lock files.
    """
    roots = (world["home"], world["cwd"])
    before = snapshot(*roots)
    result = runner.invoke(app, args, env={"COLUMNS": "100"})
    shown = result.output
    assert "Traceback" not in shown and 'File "' not in shown and "╭" not in shown, shown
    assert result.exit_code in DOCUMENTED, (result.exit_code, shown, result.exception)
    if result.exit_code in ERRORS:
        lines = [line for line in result.stderr.splitlines() if line.strip() and "━" not in line]
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    locks = str(world["home"] / "locks")
    changed = [p for p in changes(before, snapshot(*roots)) if not (allowed(p) or p.startswith(locks))]
    assert changed == [], changed
    return result


# --- the sweep: each abuse refused with exit 2 and one line, before any work ---------------------------

def _case(*args: str, words: str = "") -> tuple[list[str], str]:
    return list(args), words


CASES = {
    # numbers beyond what the option (or torch, numpy) accepts, or not numbers
    "train seed beyond torch": _case("train", *TRAIN, "--seed", TOO_BIG_FOR_TORCH, words="--seed must be a whole "
                                     "number from 0 to 4294967295"),
    "train huge epochs": _case("train", *TRAIN, "--epochs", HUGE, words="--epochs must be a whole number from 1"),
    "train huge batch": _case("train", *TRAIN, "--batch-size", HUGE, words="--batch-size must be"),
    "train huge freeze": _case("train", *TRAIN, "--freeze", HUGE, words="--freeze"),
    "train epochs not a number": _case("train", *TRAIN, "--epochs", "1.5", words="--epochs"),
    "evaluate huge seed": _case("evaluate", "--seed", HUGE, words="--seed must be a whole number from 0 to"),
    "evaluate negative seed": _case("evaluate", "--seed", "-1", words="--seed must be"),
    "evaluate huge batch": _case("evaluate", "--batch-size", HUGE, words="--batch-size must be"),
    "evaluate resamples not an int": _case("evaluate", "--resamples", "1e9", words="--resamples must be"),
    "explain huge batch": _case("explain", "lesion.jpg", "--batch-size", HUGE, words="--batch-size must be"),
    "prepare huge seed": _case("prepare", "src", "--name", "x", "--seed", TOO_BIG_FOR_TORCH, words="--seed"),
    "synthetic negative seed": _case("data", "synthetic", "out", "--seed", "-1", words="--seed"),
    "synthetic huge lesions": _case("data", "synthetic", "out", "--lesions-per-class", HUGE,
                                    words="--lesions-per-class must be"),
    "ensemble huge batch": _case("ensemble", "create", "e", CKPT, "--batch-size", HUGE, words="--batch-size"),
    "prune negative": _case("ckpt", "prune", "--keep-best", "-1", words="--keep-best"),
    # empty and blank values: an empty path is the current folder, an empty reference the default
    "train empty device": _case("train", *TRAIN, "--device", "", words="--device is empty"),
    "train empty data": _case("train", *TRAIN, "--data", "", words="--data is empty"),
    "evaluate empty checkpoint": _case("evaluate", "", words="CHECKPOINT is empty"),
    "evaluate blank device": _case("evaluate", "--device", " ", words="--device is empty"),
    "evaluate empty out": _case("evaluate", "-o", "", words="--out is empty"),
    "explain empty image": _case("explain", "", words="IMAGES is empty"),
    "explain empty checkpoint": _case("explain", "lesion.jpg", "-c", "", words="--checkpoint is empty"),
    "explain empty layer": _case("explain", "lesion.jpg", "--layer", "", words="--layer is empty"),
    "explain empty out": _case("explain", "lesion.jpg", "--out", "", words="--out is empty"),
    "report empty ref": _case("report", "", words="RUN|CKPT is empty"),
    "calibrate empty checkpoint": _case("calibrate", "", words="CHECKPOINT is empty"),
    "export empty checkpoint": _case("ckpt", "export", "", words="CKPT is empty"),
    "prepare empty source": _case("prepare", "", words="SRC is empty"),
    "synthetic empty dest": _case("data", "synthetic", "", words="DEST is empty"),
    "list empty run": _case("ckpt", "list", "--run", "", words="--run is empty"),
    "ensemble empty member": _case("ensemble", "create", "e", CKPT, "", words="CKPT is empty"),
    # control characters
    "train device with newline": _case("train", *TRAIN, "--device", "cpu\nx", words="--device 'cpu\\nx' contains"),
    "evaluate device with newline": _case("evaluate", "--device", "cpu\n", words="contains a control character"),
    "explain target with newline": _case("explain", "lesion.jpg", "--target", "mel\n", words="--target"),
    "prepare name with newline": _case("prepare", "src", "--name", "x\ny", words="--name"),
    "list run with escape": _case("ckpt", "list", "--run", "\x1b[31m", words="--run"),
    # output paths: a file where a folder is expected, a path under a file, a folder where a file is
    "evaluate out is a file": _case("evaluate", "-o", "afile.txt", words="--out afile.txt is a file"),
    "evaluate out under a file": _case("evaluate", "-o", "afile.txt/report", words="is a file, not a folder"),
    "report out is a file": _case("report", "-o", "afile.txt", words="--out afile.txt is a file"),
    "report out under a file": _case("report", "-o", "afile.txt/sub", words="is a file, not a folder"),
    "explain out is a file": _case("explain", "lesion.jpg", "-o", "afile.txt", words="--out afile.txt is a file"),
    "explain csv under a file": _case("explain", "lesion.jpg", "--csv", "afile.txt/r.csv", words="--csv"),
    "explain csv is a folder": _case("explain", "lesion.jpg", "--csv", "adir", words="--csv adir is a folder"),
    "export under a file": _case("ckpt", "export", CKPT, "-o", "afile.txt/x.safetensors", words="--output"),
    "synthetic dest is a file": _case("data", "synthetic", "afile.txt", words="DEST afile.txt is a file"),
    "demo out is a file": _case("demo", "-o", "afile.txt", words="--out afile.txt is a file"),
    # the command line's own errors: one line too, not Typer's box
    "unknown command": _case("nosuch", words="No such command"),
    "unknown subcommand": _case("ckpt", "nosuch", words="No such command"),
    "missing argument": _case("explain", words="Missing argument"),
    "missing option": _case("ckpt", "prune", words="Missing option '--keep-best'"),
    "extra argument": _case("data", "list", "extra", words="unexpected extra argument"),
}
COMMANDS = [["prepare", "src"], ["train"], ["evaluate"], ["calibrate"], ["report"], ["explain", "lesion.jpg"],
            ["demo"], ["data", "list"], ["data", "show", "synth"], ["data", "synthetic", "out"], ["ckpt", "list"],
            ["ckpt", "prune", "--keep-best", "1"], ["ckpt", "export"], ["ckpt", "restore", CKPT], ["ckpt", "verify"],
            ["ensemble", "create", "e", CKPT], ["ensemble", "list"], ["ensemble", "show", "e"], ["ensemble", "rm", "e"]]
CASES.update({f"unknown option: {' '.join(c[:2])}": _case(*c, "--bogus", words="No such option: --bogus")
              for c in COMMANDS})


@pytest.mark.parametrize("args, words", list(CASES.values()), ids=list(CASES))
def test_hostile_values_are_refused_in_one_line_before_any_work(runner, world, args: list[str], words: str) -> None:
    result = invoke(runner, args, world)
    assert result.exit_code == 2, result.output
    assert words in result.stderr, result.stderr


def test_a_huge_seed_for_a_python_caller_is_refused_like_on_the_command_line(home: Path) -> None:
    from dermcam.errors import BadInputError
    from dermcam.train.config import TrainConfig

    with pytest.raises(BadInputError, match="--seed must be a whole number from 0 to 4294967295"):
        TrainConfig(dataset="synth", backbone="test_efficientnet", seed=2**70).validate()
    with pytest.raises(BadInputError, match="--device is empty"):
        TrainConfig(dataset="synth", backbone="test_efficientnet", device="").validate()


@pytest.mark.parametrize("line, words", [(f"seed = {2**70}", "--seed must be"), ('device = ""', "--device is empty"),
                                         ('device = "cpu\\nx"', "--device"), ("epochs = 100000", "--epochs must be")])
def test_experiment_files_get_the_same_checks(runner, world, line: str, words: str) -> None:
    Path("exp.toml").write_text(f'backbone = "test_efficientnet"\npretrained = "none"\ndataset = "synth"\n'
                                f'image_size = 48\n{line}\n')
    result = invoke(runner, ["train", "--config", "exp.toml"], world)
    assert result.exit_code == 2 and words in result.stderr, result.stderr


@pytest.mark.parametrize("config", ["adir", "afile.txt/exp.toml"])
def test_an_experiments_path_that_is_no_file_is_one_line(runner, world, config: str) -> None:
    result = invoke(runner, ["train", "--config", config], world)
    assert result.exit_code == 2 and f"--config {config} cannot be read" in result.stderr


def test_a_grid_with_an_unknown_backbone_trains_nothing(runner, world) -> None:
    """Before, the runs before the bad name trained (and wrote their runs), then the bad one failed."""
    result = invoke(runner, ["train", *TRAIN, "--backbone", "no_such_net"], world)
    assert result.exit_code == 2 and "unknown backbone 'no_such_net'" in result.stderr


# --- output that was asked for: written where asked, nowhere else ---------------------------------------

def test_a_valid_output_folder_is_the_only_change(runner, world) -> None:
    """The sweep's counterpart: the same checks pass a usable folder, and the files appear only there."""
    out = world["cwd"] / "new" / "overlays"
    result = invoke(runner, ["explain", "lesion.jpg", "-o", str(out), "--csv", "new/rows.csv", "--device", "cpu"],
                    world, allowed=lambda p: p.startswith(str(world["cwd"] / "new")) or p == str(world["cwd"]))
    assert result.exit_code == 0, result.output
    assert (out / "lesion.cam.png").is_file() and Path("new/rows.csv").is_file()


@pytest.mark.parametrize("args, default", [(["report", "--device", "cpu"], "dermcam-report"),
                                           (["explain", "lesion.jpg", "--device", "cpu"], "dermcam-explain")])
def test_a_default_output_folder_that_is_a_file_is_refused(runner, world, args: list[str], default: str) -> None:
    Path(default).write_text("not a folder")
    result = invoke(runner, args, world)
    assert result.exit_code == 2 and f"--out {default} is a file, not a folder" in result.stderr, result.stderr


def test_the_output_checks_for_python_callers(tmp_path: Path) -> None:
    from dermcam.checks import check_output_dir, check_output_file
    from dermcam.errors import BadInputError

    (tmp_path / "f").write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert check_output_file(tmp_path / "new" / "r.csv", "--csv") == tmp_path / "new" / "r.csv"
    for call, words in [(lambda: check_output_dir(tmp_path / "f"), "is a file, not a folder"),
                        (lambda: check_output_dir(tmp_path / "f" / "sub"), f"{tmp_path / 'f'} is a file"),
                        (lambda: check_output_file(tmp_path, "--csv"), "is a folder; give a file name"),
                        (lambda: check_output_file(tmp_path / "f" / "r.csv", "--csv"), "is a file, not a folder"),
                        (lambda: check_output_dir(tmp_path / "a\0b"), "--out")]:
        with pytest.raises(BadInputError, match=words):
            call()
    assert not (tmp_path / "new").exists()  # a check creates nothing


# --- --help: flags take no value and show none ---------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["ckpt", "prune", "--help"], ["explain", "--help"]])
def test_help_shows_no_value_type_for_flags(runner, argv: list[str]) -> None:
    result = runner.invoke(app, argv, env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout, result.stdout
    assert "--help" in result.stdout
    if argv[0] == "train":
        assert "<int>" in result.stdout  # options that take a value still show its type


# --- the other parts of issue 21, in the sweep (their own tests: test_trust_store, test_trust_sources) ----

def test_a_damaged_best_checkpoint_is_not_silently_replaced(runner, world) -> None:
    """Checkpoint 5a3e00:1 is the best; its sidecar is cut short. Evaluating 'best' must not score
    5a3e00:0 in silence: it refuses (exit 4) or says what it passed over."""
    sidecar = world["best_weights"].with_suffix(".json")
    sidecar.write_bytes(sidecar.read_bytes()[: sidecar.stat().st_size // 2])
    result = invoke(runner, ["evaluate", "--device", "cpu", "--resamples", "0", "--json"], world)
    assert result.exit_code in (0, 4), result.output
    if result.exit_code == 0:
        assert json.loads(result.stdout)["checkpoint"] == "5a3e00:0"
        assert "Warning: " in result.stderr and "5a3e00:1" in result.stderr, result.stderr
    else:
        assert "5a3e00:1" in result.stderr or str(sidecar) in result.stderr, result.stderr


def test_prepare_never_reads_through_a_symlink_out_of_the_source(runner, world) -> None:
    outside = world["cwd"] / "outside"
    outside.mkdir()
    victim = next(Path("src").glob("HAM10000_images_part_*/*.jpg"))
    shutil.move(victim, outside / victim.name)
    os.symlink(outside / victim.name, victim)
    result = invoke(runner, ["prepare", "src", "--name", "linked", "--json"], world,
                    allowed=lambda p: p.startswith(str(world["home"])))
    assert result.exit_code in (2, 5), result.output
    index = world["home"] / "datasets" / "linked" / "index.csv"
    assert not index.exists() or victim.stem not in index.read_text()

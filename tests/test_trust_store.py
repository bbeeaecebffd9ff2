"""A request is never answered by something else, silently (issue 21, part A).

- ``ckpt verify`` and the loaders of evaluate/explain agree on what is damaged: every sidecar field,
  corrupted in several ways, is exit code 4 in all three, in one line naming the file, and leaves the
  store as it was (one validation function, :func:`dermcam.store.checkpoint.check_usable`).
- ``best``/``latest``/a run id/a hash prefix never pass over a damaged candidate in silence: when it can be
  seen to be the answer the command fails (exit 4, naming the file); otherwise it says what it skipped.
- A run whose run.json is damaged (or points at another run's checkpoint) is damaged whatever of it is
  named; an ensemble whose members are not what its manifest says is damaged for every command.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

from dermcam.cli import app
from test_ckpt import snapshot
from test_store_safety import _run_on, assert_clean_failure, edit_sidecar, set_key

SYNTH = {"dataset": {"name": "synth", "fingerprint": "f00d"}, "classes": ["bkl", "mel", "nv"]}
CALIBRATED = {"calibration": {"method": "temperature", "temperature": 1.5},
              "operating_point": {"class": "mel", "metric": "sensitivity", "target": 0.9, "threshold": 0.3}}
MISSING = object()


def cli(runner, *args: object):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def photo(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 30), (180, 90, 60)).save(path)
    return path


def refused(result, *words: str) -> str:
    """Exit code 4, ``Error: ...`` in exactly one line on stderr, containing ``words``."""
    assert_clean_failure(result, {4})
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    return result.stderr


def warned(result) -> list[str]:
    """The command succeeded; its ``Warning:`` lines."""
    assert result.exit_code == 0, result.output
    return [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]


def change(path: str, value: object):
    """An :func:`edit_sidecar` change: set the dotted ``path`` to ``value``, or delete it (MISSING)."""
    if value is not MISSING:
        return set_key(path, value)

    def delete(doc: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            doc = doc[key]
        del doc[last]

    return delete


# ------------------------------------------------------------------- verify and the loaders agree

# Every field of a sidecar that inference, ranking or the store's layout depends on, each corrupted in
# several ways: each must make the checkpoint damaged for verify, evaluate and explain alike.
DAMAGED_FIELDS = {
    "schema": [MISSING, 7, "", "dermcam.checkpoint/9"],
    "id": [MISSING, 7, "", "aaa111:5", "bbb222:0"],
    "run_id": [MISSING, 7, "", "../aaa111", "bbb222"],
    "epoch": [MISSING, "0", -1, 0.0, 3],
    "weights": [MISSING, "epoch-0000.safetensors"],
    "weights.file": [MISSING, "", "../epoch-0000.safetensors", "epoch-0001.safetensors"],
    "weights.sha256": [MISSING, "", "abc"],
    "weights.size": [5, "big"],
    "backbone": [MISSING, 7, "", "no_such_net", "../x", "test_resnet"],
    "classes": [MISSING, "bkl", [], ["bkl", "mel"], ["bkl", "mel", "nv", "df"], ["bkl", "mel", "mel"],
                ["bkl", "mel", "../nv"], ["bkl", "mel", "n/v"], ["bkl", "mel", "nv;"], ["bkl", "mel", ""],
                ["bkl", "mel", " nv"],
                ["bkl", "mel", "n\nv"], ["bkl", "mel", 3]],
    "preprocessing": [MISSING, []],
    "preprocessing.input_size": [MISSING, [3, 0, 0], [3, 5000, 5000], [1, 32, 32], [3, 32]],
    "preprocessing.mean": [MISSING, [0.5, 0.5], [math.nan, 0.5, 0.5], ["a", 0.5, 0.5]],
    "preprocessing.std": [MISSING, [0.0, 1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0], [math.inf, 1.0, 1.0]],
    "preprocessing.cache_size": [[0, 0], [64], [99999, 48]],
    "preprocessing.color_constancy": ["grey-world", None],
    "calibration": ["x", {}],
    "calibration.method": [MISSING, "platt"],
    "calibration.temperature": [MISSING, 0, -1.0, math.nan, math.inf, "1.5", 1e9],
    "operating_point.class": [MISSING, "zzz", "../mel"],
    "operating_point.metric": ["accuracy"],
    "operating_point.target": [0, 1, math.nan],
    "operating_point.threshold": [1.5, math.nan],
    "monitor": ["x"],
    "monitor.value": [math.nan, math.inf, "0.5"],
    "monitor.mode": ["up"],
    "dataset.name": ["../synth", ""],
    "config.dataset": ["../synth"],
    "state.file": ["../x", "epoch-0001.state.safetensors"],
    "created": [5],
    "step": [-1],
}
CASES = [(field, value) for field, values in DAMAGED_FIELDS.items() for value in values]
IDS = [f"{field}={'missing' if value is MISSING else json.dumps(value)}" for field, value in CASES]


@pytest.fixture
def calibrated(home: Path) -> Path:
    """A store with the prepared synthetic set and one calibrated checkpoint, aaa111:0, that fits it."""
    return _run_on("aaa111", [0.5], **SYNTH, **CALIBRATED)


@pytest.mark.parametrize(("field", "value"), CASES, ids=IDS)
def test_verify_and_the_loaders_agree_on_every_sidecar_field(runner, calibrated: Path, tmp_path: Path,
                                                             field: str, value: object) -> None:
    sidecar = edit_sidecar(calibrated, 0, change(field, value))
    before = snapshot(calibrated)

    verify = cli(runner, "ckpt", "verify", "--json")
    assert verify.exit_code == 4, verify.output
    assert [d["path"] for d in json.loads(verify.stdout)["damaged"]] == [str(sidecar)]
    out = tmp_path / "out"
    refused(cli(runner, "evaluate", "aaa111:0", "--resamples", "0", "--out", out), sidecar.name)
    refused(cli(runner, "explain", photo(tmp_path / "x.png"), "-c", "aaa111:0", "-o", out), sidecar.name)
    refused(cli(runner, "evaluate", sidecar, "--resamples", "0"), sidecar.name)  # named by path: the same
    assert not out.exists()
    assert snapshot(calibrated) == before
    listed = json.loads(cli(runner, "ckpt", "list", "--json").stdout)
    assert [(r["id"], r["flags"]) for r in listed] == [("aaa111:0", ["damaged"])]


# Fields that change nothing inference reads: accepted by all three alike.
HARMLESS = {"preprocessing.interpolation": "nearest", "metrics": {}, "label_encoding": None, "versions": {}}


@pytest.mark.parametrize("field", list(HARMLESS))
def test_what_inference_does_not_read_is_accepted_by_all_alike(runner, calibrated: Path, tmp_path: Path,
                                                               field: str) -> None:
    edit_sidecar(calibrated, 0, change(field, HARMLESS[field]))
    assert cli(runner, "ckpt", "verify").exit_code == 0
    explained = cli(runner, "explain", photo(tmp_path / "x.png"), "-c", "aaa111:0", "--no-cam", "-o", tmp_path / "o")
    assert explained.exit_code == 0, explained.output


def test_the_loader_itself_refuses_what_verify_refuses(calibrated: Path) -> None:
    """The library's loader, not only the commands: one CorruptError, nothing built."""
    from dermcam.errors import CorruptError
    from dermcam.store.inference import load_for_inference

    edit_sidecar(calibrated, 0, set_key("backbone", "no_such_net"))
    with pytest.raises(CorruptError, match="epoch-0000.json: unknown backbone 'no_such_net'"):
        load_for_inference("aaa111:0")


def test_class_names_are_those_a_prepared_set_can_have() -> None:
    """The store's class-name rule is data.classes' (written out: the store may not import data)."""
    from dermcam.data.classes import _PLAIN
    from dermcam.store.schema import CLASS_NAME_PATTERN

    assert CLASS_NAME_PATTERN.pattern == _PLAIN.pattern


# ------------------------------------------------------------------ best, latest, run ids, hashes


@pytest.fixture
def two_runs(home: Path) -> tuple[Path, Path]:
    """aaa111 (0.5, 0.9: its epoch 1 is 'best') and bbb222 (0.7, newer: 'latest'), on the synthetic set."""
    first = _run_on("aaa111", [0.5, 0.9], **SYNTH)
    time.sleep(0.01)
    return first, _run_on("bbb222", [0.7], **SYNTH)


def test_a_damaged_best_is_an_error_never_another_answer(runner, two_runs, tmp_path: Path) -> None:
    """The example of the issue: the best checkpoint's calibration temperature is 0."""
    first, _ = two_runs
    sidecar = edit_sidecar(first, 1, set_key("calibration", {"method": "temperature", "temperature": 0}))
    before = snapshot(first.parent)
    image = photo(tmp_path / "x.png")
    for args in (["evaluate", "--resamples", "0"], ["evaluate", "best", "--resamples", "0"],
                 ["explain", image, "-o", tmp_path / "o"], ["explain", image, "-c", "best", "-o", tmp_path / "o"],
                 ["evaluate", "aaa111", "--resamples", "0"], ["evaluate", "aaa111:best"], ["calibrate"],
                 ["report", "--out", tmp_path / "r"], ["ckpt", "export", "best", "-o", tmp_path / "b.safetensors"],
                 ["ensemble", "create", "duo", "best", "bbb222:0"]):
        message = refused(cli(runner, *args), str(sidecar), "calibration.temperature")
        assert "would be checkpoint aaa111:1" in message
    assert snapshot(first.parent) == before
    assert not (tmp_path / "b.safetensors").exists() and not (first.parent.parent / "ensembles").exists()


def test_a_damaged_candidate_that_would_not_have_won_is_named_when_skipped(runner, two_runs, tmp_path: Path) -> None:
    from dermcam.store.references import find_checkpoint

    first, _ = two_runs
    sidecar = edit_sidecar(first, 0, set_key("preprocessing.std", [0, 1, 1]))  # 0.5: never the best

    found = find_checkpoint("best")
    assert found.checkpoint.id == "aaa111:1"
    [line] = found.warnings
    assert line.startswith("skipped damaged checkpoint aaa111:0") and str(sidecar) in line
    explained = cli(runner, "explain", photo(tmp_path / "x.png"), "--no-cam", "-o", tmp_path / "o", "--json")
    assert warned(explained) == [f"Warning: {line}"]
    report = json.loads(explained.stdout)
    assert report["checkpoint"]["id"] == "aaa111:1" and report["warnings"] == [line]
    assert warned(cli(runner, "ckpt", "export", "best", "-o", tmp_path / "b.safetensors")) == [f"Warning: {line}"]
    # evaluate also warns that this store's synthetic set is not the one the checkpoints were made on
    assert warned(cli(runner, "evaluate", "aaa111", "--resamples", "0"))[0] == f"Warning: {line}"
    named = cli(runner, "ckpt", "export", "aaa111:1", "-o", tmp_path / "n.safetensors")  # nothing was skipped
    assert warned(named) == [] and named.stderr == ""


def test_a_garbled_sidecar_says_nothing_so_it_is_skipped_and_named(runner, two_runs, tmp_path: Path) -> None:
    first, _ = two_runs
    (first / "epoch-0001.json").write_text('{"schema": "dermcam.checkpoint/1", "monitor": {"val')
    result = cli(runner, "ckpt", "export", "best", "-o", tmp_path / "b.safetensors", "--json")
    [line] = warned(result)
    assert "skipped damaged checkpoint aaa111:1" in line and "not readable JSON" in line
    assert json.loads(result.stdout)["id"] == "bbb222:0"


def test_latest_and_run_latest_refuse_a_newer_damaged_checkpoint(runner, two_runs, tmp_path: Path) -> None:
    first, second = two_runs
    newest = edit_sidecar(second, 0, set_key("backbone", "no_such_net"))
    refused(cli(runner, "ckpt", "export", "latest", "-o", tmp_path / "l.safetensors"), str(newest),
            "would be checkpoint bbb222:0")
    older = edit_sidecar(first, 1, set_key("classes", ["bkl", "mel", "m el"]))
    refused(cli(runner, "ckpt", "export", "aaa111:latest", "-o", tmp_path / "l.safetensors"), str(older))
    refused(cli(runner, "ckpt", "export", "bbb222", "-o", tmp_path / "l.safetensors"), str(newest))


def test_a_hash_prefix_of_a_damaged_checkpoint_is_refused(runner, two_runs, tmp_path: Path) -> None:
    first, _ = two_runs
    # all three checkpoints hold the same weights, so a real prefix names each of them: give 0 its own
    sidecar = edit_sidecar(first, 0, lambda doc: {**doc, "weights": {**doc["weights"], "sha256": "ab" * 32},
                                                  "epoch": "zero"})
    refused(cli(runner, "ckpt", "export", "abababab", "-o", tmp_path / "h.safetensors"), str(sidecar))


@pytest.mark.parametrize("damage", [{"created": 5}, {"resume_from": "bbb222:0"}, {"best": "../../x:1"},
                                    {"resume_from": "aaa111:1/../../x"}, "{garbled"],
                         ids=["created", "resume-from-other-run", "best-path", "resume-from-path", "garbled"])
def test_a_damaged_run_json_makes_every_reference_into_its_run_fail(runner, two_runs, tmp_path: Path,
                                                                    damage) -> None:
    first, _ = two_runs
    run_json = first / "run.json"
    info = json.loads(run_json.read_text())
    run_json.write_text(damage if isinstance(damage, str) else json.dumps({**info, **damage}))
    before = snapshot(first.parent)

    image = photo(tmp_path / "x.png")
    for args in (["evaluate", "--resamples", "0"], ["explain", image, "-o", tmp_path / "o"],
                 ["evaluate", "aaa111", "--resamples", "0"], ["evaluate", "aaa1", "--resamples", "0"],
                 ["evaluate", "aaa111:0", "--resamples", "0"], ["evaluate", first / "epoch-0000.json"],
                 ["ckpt", "export", "aaa111:1", "-o", tmp_path / "e.safetensors"], ["calibrate", "aaa111:1"],
                 ["ckpt", "restore", "aaa111:0", "--yes"], ["train", "--resume", "--run", "aaa111"]):
        refused(cli(runner, *args), str(run_json))
    assert snapshot(first.parent) == before
    verify = cli(runner, "ckpt", "verify", "--json")
    assert verify.exit_code == 4 and str(run_json) in [d["path"] for d in json.loads(verify.stdout)["damaged"]]


def test_a_damaged_run_that_would_not_have_won_is_skipped_and_named(runner, two_runs, tmp_path: Path) -> None:
    _, second = two_runs
    (second / "run.json").write_text("[]")  # bbb222's 0.7 is below aaa111's 0.9
    [line] = warned(cli(runner, "ckpt", "export", "best", "-o", tmp_path / "b.safetensors"))
    assert line.startswith("Warning: skipped damaged run bbb222") and "run.json" in line


def test_pointers_in_run_json_name_checkpoints_of_the_run(runner, two_runs) -> None:
    """What dermcam itself writes there stays valid; a pointer elsewhere cannot be written."""
    from dermcam.errors import CorruptError
    from dermcam.store.runs import read_run, update_run

    first, _ = two_runs
    assert cli(runner, "ckpt", "restore", "aaa111:0", "--yes").exit_code == 0
    assert read_run(first)["resume_from"] == "aaa111:0"
    before = (first / "run.json").read_text()
    with pytest.raises(CorruptError, match="another run"):
        update_run(first, resume_from="bbb222:0")
    with pytest.raises(CorruptError, match="resume_from"):
        update_run(first, resume_from="../../x")
    assert (first / "run.json").read_text() == before


# --------------------------------------------------------------------------------------- ensembles


@pytest.fixture
def duo(two_runs) -> Path:
    from dermcam.store.ensembles import new_manifest, save_ensemble
    from dermcam.store.references import resolve

    return save_ensemble(new_manifest("duo", [resolve("aaa111:1"), resolve("bbb222:0")], [1.0, 1.0])).path


@pytest.mark.parametrize("where", ["manifest", "member"])
def test_an_ensemble_whose_classes_differ_from_its_members_is_damaged_everywhere(runner, duo: Path, tmp_path: Path,
                                                                                 where: str) -> None:
    first = duo.parent.parent / "runs" / "aaa111"
    if where == "manifest":
        manifest = json.loads(duo.read_text())
        duo.write_text(json.dumps({**manifest, "classes": ["mel", "bkl", "nv"]}))
    else:  # the member's sidecar now answers in another order; its weights (and their hash) are unchanged
        edit_sidecar(first, 1, set_key("classes", ["mel", "bkl", "nv"]))
    before = snapshot(duo.parent.parent)
    for args in (["evaluate", "ensemble:duo", "--resamples", "0"],
                 ["explain", photo(tmp_path / "x.png"), "-c", "duo", "-o", tmp_path / "o"],
                 ["ckpt", "export", "ensemble:duo", "-o", tmp_path / "e.safetensors"]):
        refused(cli(runner, *args), "member aaa111:1 has classes mel, bkl, nv" if where == "member"
                else "the manifest says mel, bkl, nv")
    verify = cli(runner, "ckpt", "verify", "--json")
    assert verify.exit_code == 4, verify.output
    assert str(duo) in [d["path"] for d in json.loads(verify.stdout)["damaged"]]
    assert snapshot(duo.parent.parent) == before


def test_an_ensemble_with_a_damaged_member_is_damaged_for_verify_too(runner, duo: Path) -> None:
    first = duo.parent.parent / "runs" / "aaa111"
    sidecar = edit_sidecar(first, 1, set_key("calibration", {"method": "temperature", "temperature": -1}))
    verify = cli(runner, "ckpt", "verify", "--json")
    damaged = {d["path"]: d["problem"] for d in json.loads(verify.stdout)["damaged"]}
    assert verify.exit_code == 4 and set(damaged) == {str(sidecar), str(duo)}
    assert "member aaa111:1 is damaged" in damaged[str(duo)]
    refused(cli(runner, "evaluate", "ensemble:duo", "--resamples", "0"), "ensemble 'duo'", str(sidecar))


def test_a_pruned_member_is_not_damage(runner, duo: Path) -> None:
    """prune --force says the ensemble will no longer load; verify does not call that damage."""
    shutil.rmtree(duo.parent.parent / "runs" / "bbb222")
    assert cli(runner, "ckpt", "verify").exit_code == 0
    assert_clean_failure(cli(runner, "evaluate", "ensemble:duo"), {3})

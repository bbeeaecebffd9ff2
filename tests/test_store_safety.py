"""A store that cannot be talked into damage: nothing read from the store (or typed as a run id) reaches
outside it or crashes a command; imported runs are never retrained; ``best`` compares like with like.

Every store here lives in ``tmp_path/store`` with a sentinel file beside it, the file a hostile sidecar
aims at.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from dermcam.cli import app
from dermcam.store.checkpoint import save_checkpoint
from dermcam.store.locks import store_lock
from dermcam.store.runs import create_run, read_metrics, resumable_run
from test_ckpt import epochs, invoke, list_json, make_run, model_state, sidecar, snapshot
from test_export import export, with_meta

EXIT_CODES = {0, 2, 3, 4, 5, 6}  # docs/cli.md: every outcome but an unexpected failure (1)
SENTINEL_TEXT = "precious: must survive every command\n"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path/store`` as DERMCAM_HOME, with ``tmp_path/precious.txt`` beside it."""
    home = tmp_path / "store"
    home.mkdir()
    monkeypatch.setenv("DERMCAM_HOME", str(home))
    (tmp_path / "precious.txt").write_text(SENTINEL_TEXT)
    return home


def sentinel(store: Path) -> Path:
    return store.parent / "precious.txt"


def edit_sidecar(run_dir: Path, epoch: int, change) -> Path:
    """Apply ``change(doc)`` to a sidecar (it may return a replacement document) and write it back."""
    path = run_dir / f"epoch-{epoch:04d}.json"
    doc = json.loads(path.read_text())
    doc = change(doc) or doc
    path.write_text(json.dumps(doc))
    return path


def assert_clean_failure(result, codes: set[int] = EXIT_CODES) -> None:
    """No traceback, an exit code from the documented set, at most a one-line error."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in codes, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code != 0 and result.stderr.startswith("Error: "):
        assert result.stderr.count("\n") == 1, result.stderr


def set_key(path: str, value):
    """A change for :func:`edit_sidecar` that sets the dotted ``path`` (``weights.file``, ``preprocessing.mean.0``)."""
    def change(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


# ---------------------------------------------------------------------------------- section 2: paths


@pytest.mark.parametrize("target", ["../../../precious.txt", "ABSOLUTE", "epoch-0001.safetensors"],
                         ids=["traversal", "absolute", "another-checkpoints-weights"])
def test_prune_never_deletes_what_a_sidecar_points_at(runner, store: Path, target: str) -> None:
    run = make_run("aaa111", [0.5, 0.9, 0.6])
    name = str(sentinel(store)) if target == "ABSOLUTE" else target
    edit_sidecar(run, 0, set_key("weights.file", name))
    epoch1 = (run / "epoch-0001.safetensors").read_bytes()

    result = invoke(runner, "prune", "--keep-best", "1", "--no-keep-latest", "--yes", "--json")
    assert_clean_failure(result, {0})
    report = json.loads(result.stdout)
    assert {"id": "aaa111:0", "reasons": ["damaged"]} in report["kept"]
    assert [r["id"] for r in report["removed"]] == ["aaa111:2"]
    assert sentinel(store).read_text() == SENTINEL_TEXT
    assert (run / "epoch-0001.safetensors").read_bytes() == epoch1
    assert (run / "epoch-0000.json").exists()  # damaged: reported, never deleted

    verify = invoke(runner, "verify", "--json")
    assert verify.exit_code == 4
    [damage] = json.loads(verify.stdout)["damaged"]
    assert damage["path"].endswith("epoch-0000.json")
    for command in (["evaluate", "aaa111:0"], ["evaluate", str(run / "epoch-0000.safetensors")],
                    ["explain", str(sentinel(store)), "-c", "aaa111:0"], ["ckpt", "export", "aaa111:0"]):
        result = runner.invoke(app, command)
        assert_clean_failure(result, {4})
        assert "damaged" in result.stderr
    assert sentinel(store).read_text() == SENTINEL_TEXT


def test_run_ids_on_the_command_line_are_names_not_paths(runner, store: Path) -> None:
    make_run("aaa111", [0.5, 0.9])
    outside = store.parent / "evil"
    shutil.move(str(make_run("evil", [0.5, 0.9, 0.6])), outside)  # a complete run, outside the store
    before = snapshot(outside), snapshot(store / "runs")
    for args in (["list", "--run", "../../evil"], ["list", "--run", ".."],
                 ["prune", "--keep-best", "0", "--no-keep-latest", "--run", "../../evil", "--yes"],
                 ["restore", "../../evil:0", "--yes"], ["restore", "..:0", "--yes"]):
        result = invoke(runner, *args)
        assert_clean_failure(result, {2, 3})
        assert (snapshot(outside), snapshot(store / "runs")) == before, args
    refused = invoke(runner, "list", "--run", "../../evil")
    assert refused.exit_code == 2 and "not a plain name" in refused.stderr
    train = runner.invoke(app, ["train", "--resume", "--run", "../../evil"])
    assert train.exit_code == 2 and (snapshot(outside), snapshot(store / "runs")) == before


def test_a_run_folder_linking_outside_the_store_is_reported_never_entered(runner, store: Path) -> None:
    make_run("aaa111", [0.5, 0.9])
    outside = store.parent / "elsewhere"
    shutil.move(str(make_run("linked", [0.5, 0.9, 0.6])), outside)
    (outside / "epoch-0001.json").unlink()  # an orphan that verify --clean would delete inside the store
    (store / "runs" / "linked").symlink_to(outside, target_is_directory=True)
    bare = store.parent / "bare"  # what a killed run start leaves, but outside
    bare.mkdir()
    (store / "runs" / "bare").symlink_to(bare, target_is_directory=True)
    _age(bare)
    before = snapshot(store.parent / "elsewhere"), snapshot(bare)

    rows = list_json(runner)
    assert {r["id"] for r in rows if r["flags"] == ["damaged"]} == {"linked", "bare"}
    for args in (["prune", "--keep-best", "0", "--no-keep-latest", "--yes"], ["verify", "--clean"]):
        result = invoke(runner, *args)
        assert_clean_failure(result, {0, 4})
    assert result.exit_code == 4 and "leads outside" in result.stdout
    assert (snapshot(store.parent / "elsewhere"), snapshot(bare)) == before and bare.is_dir()


# ---------------------------------------------------------------------------------- section 2: schemas


DAMAGE = {
    "weights-is-a-string": set_key("weights", "epoch-0000.safetensors"),
    "epoch-is-text": set_key("epoch", "zero"),
    "negative-epoch": set_key("epoch", -5),
    "short-sha256": set_key("weights.sha256", "abc"),
    "nan-mean": set_key("preprocessing.mean.0", math.nan),
    "zero-std": set_key("preprocessing.std.2", 0.0),
    "tiny-input": set_key("preprocessing.input_size", [3, 2, 2000000]),
    "duplicate-classes": set_key("classes", ["nv", "nv", "mel"]),
    "infinite-monitor": set_key("monitor.value", math.inf),
    "dataset-path": set_key("dataset.name", "../../../precious"),
    "state-malformed": set_key("state.json", {"__map__": [[["a"], 1]]}),
    "state-best-not-a-map": set_key("state.json", {"__map__": [["best", 7]]}),
    "other-runs-id": set_key("run_id", "bbb222"),
    "not-an-object": lambda doc: [doc],
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_one_damaged_sidecar_is_reported_and_skipped_by_every_command(runner, store: Path, damage: str) -> None:
    run = make_run("aaa111", [0.5, 0.9, 0.6])
    other = make_run("bbb222", [0.7])
    edit_sidecar(run, 0, DAMAGE[damage])

    rows = list_json(runner)
    damaged = [r for r in rows if r["flags"] == ["damaged"]]
    assert [r["id"] for r in damaged] == ["aaa111:0"] and damaged[0]["problem"]
    assert rows[-1] is damaged[-1]  # listed last
    table = invoke(runner, "list")
    assert table.exit_code == 0 and "damaged" in table.stdout

    verify = invoke(runner, "verify")
    assert verify.exit_code == 4 and "epoch-0000.json" in verify.stdout
    assert invoke(runner, "export", "best", "-o", str(store.parent / "best.safetensors")).exit_code == 0
    for command in (["evaluate", "aaa111:0"], ["explain", str(sentinel(store)), "-c", "aaa111:0"],
                    ["ckpt", "restore", "aaa111:0", "--yes"]):
        assert_clean_failure(runner.invoke(app, command), {4})
    # resume skips the damaged epoch; it then stops cleanly because this store has no prepared data
    assert_clean_failure(runner.invoke(app, ["train", "--resume", "--run", "aaa111"]), {3})
    other_files = snapshot(other)
    prune = invoke(runner, "prune", "--keep-best", "1", "--yes")
    assert prune.exit_code == 0 and "aaa111:0 (damaged)" in prune.stdout
    assert epochs(run) == [1, 2] and (run / "epoch-0000.json").exists()
    assert snapshot(other) == other_files
    assert invoke(runner, "restore", "aaa111:1", "--yes").exit_code == 0
    assert sentinel(store).read_text() == SENTINEL_TEXT


@pytest.mark.parametrize(("change", "field"), [({"created": 5}, "created"),
                                               ({"config": {"dataset": "../../precious"}}, "config.dataset"),
                                               ({"run_id": "bbb222"}, "bbb222")], ids=["created", "dataset", "run-id"])
def test_a_damaged_run_json_is_listed_and_its_run_left_alone(runner, store: Path, change: dict, field: str) -> None:
    run = make_run("aaa111", [0.5, 0.9, 0.6])
    make_run("bbb222", [0.7])
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, **change}))
    before = snapshot(run)

    rows = list_json(runner)
    assert [(r["id"], r["flags"]) for r in rows] == [("bbb222:0", ["best", "run-best", "latest"]),
                                                     ("aaa111", ["damaged"])]
    assert field in rows[-1]["problem"]
    assert invoke(runner, "prune", "--keep-best", "0", "--no-keep-latest", "--yes").exit_code == 0
    assert_clean_failure(invoke(runner, "prune", "--keep-best", "0", "--run", "aaa111", "--yes"), {0})
    assert_clean_failure(invoke(runner, "restore", "aaa111:0", "--yes"), {4})
    assert_clean_failure(runner.invoke(app, ["train", "--resume", "--run", "aaa111"]), {4})
    assert snapshot(run) == before
    assert invoke(runner, "verify").exit_code == 4


def test_damaged_metrics_lines_are_skipped_and_reported(runner, store: Path) -> None:
    run = make_run("aaa111", [0.5, 0.9])
    (run / "metrics.jsonl").write_text('{"epoch": 0, "train_loss": 1.0}\n{"epoch": "one"}\n[1, 2]\n{"epo\n'
                                       '{"epoch": 1, "train_loss": 0.5}\n')
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1]
    verify = invoke(runner, "verify", "--json")
    assert verify.exit_code == 4
    problems = [d["problem"] for d in json.loads(verify.stdout)["damaged"]]
    assert len(problems) == 3 and all("metrics.jsonl line" in p for p in problems)


# ---------------------------------------------------------------------------------- section 2: imports


def _export_elsewhere(runner, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file exported from a scratch store, so that importing it into ``store`` would create a run."""
    monkeypatch.setenv("DERMCAM_HOME", str(tmp_path / "scratch"))
    make_run("aaa111", [0.5, 0.9])
    exported = export(runner, "aaa111:1", tmp_path / "m.safetensors")
    monkeypatch.setenv("DERMCAM_HOME", str(store))
    return Path(exported["file"])


@pytest.mark.parametrize(("change", "field"), [
    ({"source": {"id": "aaa111:1", "epoch": -5}}, "source.epoch"),
    ({"preprocessing": {"input_size": [3, 32, 32], "mean": [math.nan, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}},
     "preprocessing.mean[0]"),
    ({"preprocessing": {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.4], "std": [0.2, math.inf, 0.2]}},
     "preprocessing.std[1]"),
    ({"preprocessing": {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.4], "std": [0.2, 0.2, 0.0]}},
     "preprocessing.std[2]"),
    ({"dataset": {"name": "../../outside"}}, "dataset.name"),
], ids=["negative-epoch", "nan-mean", "inf-std", "zero-std", "dataset-path"])
def test_import_refuses_what_a_sidecar_may_not_hold(runner, store: Path, tmp_path: Path, monkeypatch,
                                                    change: dict, field: str) -> None:
    good = _export_elsewhere(runner, store, tmp_path, monkeypatch)
    bad = with_meta(good, tmp_path / "bad.safetensors", **change)
    before = snapshot(store)
    for command in (["ckpt", "restore", str(bad)], ["evaluate", str(bad)], ["explain", str(good), "-c", str(bad)]):
        result = runner.invoke(app, command)
        assert_clean_failure(result, {4})
        assert f"'{field}'" in result.stderr and "damaged" in result.stderr, result.stderr
        assert snapshot(store) == before
    assert invoke(runner, "restore", str(good)).exit_code == 0 and snapshot(store) != before  # the control


# ---------------------------------------------------------------------------------- section 2: leftovers


def _age(path: Path, seconds: float = 3600) -> None:
    """Make a folder and everything in it look ``seconds`` old."""
    then = time.time() - seconds
    for p in [*path.iterdir(), path]:
        os.utime(p, (then, then))


def test_verify_clean_removes_run_folders_that_a_killed_start_left(runner, store: Path) -> None:
    real = make_run("aaa111", [0.5, 0.9])
    runs = store / "runs"
    (runs / "empty1").mkdir()  # killed right after mkdir
    (runs / "tmponly").mkdir()
    (runs / "tmponly" / ".run.json.x1y2.tmp").write_text('{"schema": "dermc')  # killed mid-write
    create_run({}, run_id="bare01")  # killed before the first epoch finished
    create_run({}, run_id="locked")  # training its first epoch right now
    for name in ("empty1", "tmponly", "bare01", "locked"):
        _age(runs / name)
    (runs / "fresh1").mkdir()  # may be being created this very moment

    with store_lock("run-locked"):
        before = invoke(runner, "verify", "--json")
        assert before.exit_code == 0, before.output
        notes = {Path(e["path"]).name: e["note"] for e in json.loads(before.stdout)["incomplete"]}
        assert notes == {"empty1": "", "tmponly": "", "bare01": "", "locked": "run is training; left alone",
                         "fresh1": "may be a write in progress; left alone"}
        cleaned = invoke(runner, "verify", "--clean", "--json")
    assert cleaned.exit_code == 0, cleaned.output
    assert sorted(p.name for p in runs.iterdir()) == ["aaa111", "fresh1", "locked"]
    assert epochs(real) == [0, 1]
    assert invoke(runner, "verify").exit_code == 0


# ---------------------------------------------------------------------------------- section 4: runs


def _imported_store(runner, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``store`` holding one imported checkpoint."""
    result = invoke(runner, "restore", str(_export_elsewhere(runner, store, tmp_path, monkeypatch)), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_resume_never_trains_inside_an_imported_run(runner, store: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    imported = _imported_store(runner, store, tmp_path, monkeypatch)
    before = snapshot(store / "runs")

    latest = runner.invoke(app, ["train", "--resume"])
    assert latest.exit_code == 3 and "no resumable training runs" in latest.stderr
    named = runner.invoke(app, ["train", "--resume", "--run", imported["run_id"]])
    assert named.exit_code == 2 and "imported" in named.stderr and named.stderr.count("\n") == 1
    assert snapshot(store / "runs") == before

    trained = make_run("bbb222", [0.5])  # an older-style run beside it is what --resume continues
    assert resumable_run(None) == trained
    create_run({}, run_id="ccc333")
    newest = store / "runs" / imported["run_id"]
    info = json.loads((newest / "run.json").read_text())
    (newest / "run.json").write_text(json.dumps({**info, "created": "9999-01-01T00:00:00+00:00"}))
    assert resumable_run(None).name == "ccc333"  # the imported run is newest, but skipped


def test_resume_finishes_when_the_recorded_best_was_pruned(runner, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import run_json
    from dermcam.train import trainer
    from test_train import TINY

    # epoch 0 is always best, so pruning with --keep-best 0 removes exactly the recorded best
    monkeypatch.setattr(trainer.Trainer, "_monitor_value", lambda self, metrics: 1.0 - 0.1 * self.epoch)
    [first] = run_json(runner, ["train", *TINY, "--epochs", "2", "--json"])
    assert first["best_checkpoint"].endswith(":0")
    assert invoke(runner, "prune", "--keep-best", "0", "--yes").exit_code == 0

    resumed = runner.invoke(app, ["train", "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    [result] = json.loads(resumed.stdout)
    assert result["best_checkpoint"] == f"{first['run_id']}:1" and result["test_metrics"]
    assert f"Best checkpoint {first['best_checkpoint']} no longer exists" in resumed.stderr


# ---------------------------------------------------------------------------------- section 4: best


def _run_on(run_id: str, values: list[float], **changes) -> Path:
    """A run like make_run's, whose sidecars differ by ``changes`` (data set, classes, ...)."""
    run_dir = create_run({}, run_id=run_id)
    for epoch, value in enumerate(values):
        side = {**sidecar(value, epoch=epoch), **changes}
        if "classes" in changes:
            side["label_encoding"] = {c: i for i, c in enumerate(changes["classes"])}
        save_checkpoint(run_dir, epoch=epoch, model_state=model_state(), sidecar=side, train_state={"epoch": epoch})
    return run_dir


@pytest.mark.parametrize("changes", [{"dataset": {"name": "other", "fingerprint": "beef"}},
                                     {"classes": ["bkl", "mel", "nv"]}], ids=["data-set", "classes"])
def test_best_ranks_only_checkpoints_like_the_newest(runner, store: Path, changes: dict) -> None:
    make_run("aaa111", [0.5, 0.95])
    time.sleep(0.01)
    _run_on("bbb222", [0.6, 0.4], **changes)

    rows = {r["id"]: r for r in list_json(runner)}
    assert "best" in rows["bbb222:0"]["flags"]  # 0.6 < 0.95, but 0.95 was scored on something else
    assert "best" not in rows["aaa111:1"]["flags"] and "run-best" in rows["aaa111:1"]["flags"]
    assert rows["aaa111:1"]["rank_group"] != rows["bbb222:0"]["rank_group"]
    table = invoke(runner, "list")
    assert "best ranks only checkpoints like the newest one" in " ".join(table.stdout.split())
    assert json.loads(invoke(runner, "export", "best", "-o", str(store.parent / "b.safetensors"),
                             "--json").stdout)["id"] == "bbb222:0"
    mixed = invoke(runner, "prune", "--keep-best", "1", "--global", "--yes")
    assert mixed.exit_code == 2 and "different data sets or classes" in mixed.stderr


# ---------------------------------------------------------------------------------- fuzz


_VALUES = ["zero", "", [], {}, None, True, -5, 1e308, 10**30, math.nan, math.inf, -math.inf,
           "../../../precious.txt", "/etc/passwd", "ABSOLUTE", "..", "epoch-0001.safetensors", [3, 8], {"file": ".."}]


def _paths(node, prefix=()) -> list[tuple]:
    """Every key path inside a JSON document."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return []
    return [p for key, value in items for p in [(*prefix, key), *_paths(value, (*prefix, key))]]


def _mutate(rng: random.Random, doc, absolute: str) -> str:
    """One random damage to a sidecar or run.json document, as the text to write."""
    doc = copy.deepcopy(doc)
    kind = rng.choice(["delete", "replace", "replace", "replace", "non-dict", "truncate"])
    if kind == "non-dict":
        return json.dumps(rng.choice([[doc], "sidecar", 7, None, []]))
    if kind == "truncate":
        text = json.dumps(doc)
        return text[: rng.randrange(len(text))]
    path = rng.choice(_paths(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    else:
        value = rng.choice(_VALUES)
        parent[path[-1]] = absolute if value == "ABSOLUTE" else value
    return json.dumps(doc)


def test_fuzzed_sidecars_never_crash_or_escape_the_store(runner, home: Path, tmp_path: Path, monkeypatch) -> None:
    """Seeded: each round damages one document of a pristine store and runs every reading command.

    The checkpoints match the prepared synthetic set, so ``evaluate`` gets as far as predicting.
    """
    synth = {"dataset": {"name": "synth", "fingerprint": "f00d"}, "classes": ["bkl", "mel", "nv"]}
    _run_on("aaa111", [0.5, 0.9], **synth)
    _run_on("bbb222", [0.7], **synth)  # the other, valid checkpoint: its files must never change
    targets = ["runs/aaa111/epoch-0000.json", "runs/aaa111/epoch-0001.json", "runs/aaa111/run.json"]
    rng = random.Random(20240612)
    deadline = time.monotonic() + 4.0
    rounds = 0
    while rounds < 6 or (time.monotonic() < deadline and rounds < 60):
        base = tmp_path / f"round{rounds}"
        store = base / "store"
        shutil.copytree(home, store)  # the pristine store
        (base / "precious.txt").write_text(SENTINEL_TEXT)
        monkeypatch.setenv("DERMCAM_HOME", str(store))
        target = store / rng.choice(targets[:2] if rounds % 3 else targets)
        target.write_text(_mutate(rng, json.loads(target.read_text()), str(base / "precious.txt")))
        other = snapshot(store / "runs" / "bbb222")
        other_weights = {k: v for k, v in other.items() if k.startswith("epoch-")}
        commands = [["ckpt", "list", "--json"], ["ckpt", "list"], ["ckpt", "verify"], ["evaluate", "aaa111:0"],
                    ["evaluate"], ["ckpt", "export", "aaa111:1", "-o", str(base / "out.safetensors"), "--force"],
                    ["ckpt", "prune", "--keep-best", "1", "--yes"]]
        for command in commands:
            result = runner.invoke(app, command, env={"COLUMNS": "200"})
            assert_clean_failure(result)
            assert (base / "precious.txt").read_text() == SENTINEL_TEXT, (rounds, command)
            assert {p.name for p in base.iterdir()} <= {"out.safetensors", "precious.txt", "store"}
            now = snapshot(store / "runs" / "bbb222")
            assert {k: v for k, v in now.items() if k.startswith("epoch-")} == other_weights, (rounds, command)
        shutil.rmtree(base)
        rounds += 1

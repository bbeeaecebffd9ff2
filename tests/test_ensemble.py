"""Ensembles: ``dermcam ensemble create|list|show|rm``, ``evaluate``/``explain`` of ``ensemble:NAME``,
prune protection and every refusal, through the CLI on three tiny trained runs (trained once per
module); then greedy selection and EnsembleModel on hand-made numbers."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import run_json
from dermcam.cli import app
from dermcam.errors import ExitCode
from helpers_cli import cli, refused

TINY = ["--pretrained", "none", "--batch-size", "16", "--data", "synth", "--epochs", "1"]
EFFICIENTNET = ["--backbone", "test_efficientnet", "--image-size", "48", *TINY]
RESNET = ["--backbone", "test_resnet", "--image-size", "56x40", *TINY]  # another architecture and input size
NO_CI = ["--resamples", "0"]


@dataclass(frozen=True)
class Store:
    """A store with three trained runs on "synth": ``a`` and ``b`` (test_efficientnet, seeds 0 and 1)
    and ``c`` (test_resnet at 56x40), each the best checkpoint of its run; plus two more prepared sets,
    "twoclass" (mel, nv only) and "wide" (an 80x60 cache), and the source images of them all."""

    home: Path
    src: Path
    a: str
    b: str
    c: str

    def sidecar_path(self, ckpt: str) -> Path:
        run, epoch = ckpt.split(":")
        return self.home / "runs" / run / f"epoch-{int(epoch):04d}.json"

    def weights_path(self, ckpt: str) -> Path:
        return self.sidecar_path(ckpt).with_suffix(".safetensors")

    def sidecar(self, ckpt: str) -> dict:
        return json.loads(self.sidecar_path(ckpt).read_text())

    def manifest(self, name: str) -> Path:
        return self.home / "ensembles" / f"{name}.json"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Prepare the sets and train the three runs once for the module (tests get a copy, see ``store``)."""
    from typer.testing import CliRunner

    from dermcam.data.prepare import prepare
    from dermcam.data.synthetic import write_synthetic_ham10000

    base = tmp_path_factory.mktemp("ensemble-module")
    src = write_synthetic_ham10000(base / "src", n_lesions_per_class=12, images_per_lesion=(1, 2), seed=1)
    root = base / "store"
    prepare(src, name="synth", cache_size=(64, 48), root=root)
    prepare(src, name="twoclass", classes=["mel", "nv"], cache_size=(64, 48), root=root)
    prepare(src, name="wide", cache_size=(80, 60), root=root)
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DERMCAM_HOME", str(root))
        pair = run_json(runner, ["train", *EFFICIENTNET, "--seed", "0", "--seed", "1", "--json"])
        (resnet,) = run_json(runner, ["train", *RESNET, "--seed", "2", "--json"])
    a, b = (r["best_checkpoint"] for r in pair)
    return Store(root, src, a, b, resnet["best_checkpoint"])


@pytest.fixture
def store(trained: Store, dermcam_home: Path) -> Store:
    """This test's DERMCAM_HOME: a copy of the module's trained store."""
    shutil.copytree(trained.home, dermcam_home, dirs_exist_ok=True, ignore=shutil.ignore_patterns("report"))
    return Store(dermcam_home, trained.src, trained.a, trained.b, trained.c)


def snapshot(root: Path) -> dict[str, str]:
    """Every stored file and its sha256 (lock files aside): what a refused command must leave alone."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "locks" not in p.relative_to(root).parts}


def predictions(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """image_id -> probabilities (in class order) and image_id -> decision, from evaluate's predictions.csv."""
    with open(folder / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in rows[0] if c.startswith("p_")]
    probs = {r["image_id"]: np.array([float(r[c]) for c in columns]) for r in rows}
    return probs, {r["image_id"]: r.get("decision") or r["predicted"] for r in rows}


def evaluate(runner, ref: str, out: Path, *extra: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    result = cli(runner, "evaluate", ref, "--out", out, *NO_CI, *extra)
    assert result.exit_code == 0, result.output
    return predictions(out)


def create(runner, name: str, *args: str) -> dict:
    return run_json(runner, ["ensemble", "create", name, *args, "--json"])


def stored(name: str, *ckpts: str) -> None:
    """An ensemble of ``ckpts`` stored through the library, skipping create's validation pass (for
    tests about what happens to an ensemble afterwards)."""
    from dermcam.store.ensembles import new_manifest, save_ensemble
    from dermcam.store.references import resolve

    save_ensemble(new_manifest(name, [resolve(c) for c in ckpts], [1.0] * len(ckpts)))


# ------------------------------------------------------------------------------- create, list, show, rm


def test_create_from_named_checkpoints_then_list_show_rm(runner, store: Store) -> None:
    made = create(runner, "pair", store.a, store.c, "--weights", "3,1")
    assert made["name"] == "pair" and made["id"] == "ensemble:pair"
    assert [m["id"] for m in made["members"]] == [store.a, store.c]
    assert [m["weight"] for m in made["members"]] == [3.0, 1.0]
    assert [m["sha256"] for m in made["members"]] == [store.sidecar(c)["weights"]["sha256"] for c in (store.a, store.c)]
    assert made["selection"]["method"] == "all"
    assert 0.0 <= made["val_metrics"]["balanced_accuracy"] <= 1.0 and made["operating_point"] is None
    assert made["selection"]["val_metrics"]["balanced_accuracy"] == made["val_metrics"]["balanced_accuracy"]
    assert Path(made["path"]) == store.manifest("pair") and store.manifest("pair").is_file()
    assert not list(store.home.glob("ensembles/*.safetensors"))  # a manifest: no weights copied

    listing = run_json(runner, ["ensemble", "list", "--json"])
    assert listing["damaged"] == [] and [e["name"] for e in listing["ensembles"]] == ["pair"]
    (entry,) = listing["ensembles"]
    assert entry["problem"] is None and entry["dataset"] == "synth"
    assert [(m["id"], m["weight"]) for m in entry["members"]] == [(store.a, 0.75), (store.c, 0.25)]
    table = cli(runner, "ensemble", "list")
    assert table.exit_code == 0 and "pair" in table.output and store.a in table.output and "ok" in table.output

    for name in ("pair", "ensemble:pair"):
        shown = run_json(runner, ["ensemble", "show", name, "--json"])
        assert shown["id"] == "ensemble:pair" and shown["classes"] == store.sidecar(store.a)["classes"]
        assert [m["backbone"] for m in shown["members"]] == ["test_efficientnet", "test_resnet"]
        assert [m["input_size"] for m in shown["members"]] == [[3, 48, 48], [3, 40, 56]]
        assert shown["members"][0]["calibration"] == "temperature"  # training calibrated each best checkpoint
        assert shown["val_metrics"] == made["selection"]["val_metrics"] and shown["problem"] is None
    text = cli(runner, "ensemble", "show", "pair")
    assert text.exit_code == 0 and store.a in text.output and store.c in text.output and "0.750" in text.output

    before = {c: store.weights_path(c).read_bytes() for c in (store.a, store.c)}
    removed = run_json(runner, ["ensemble", "rm", "ensemble:pair", "--json"])
    assert removed == {"removed": "pair", "path": str(store.manifest("pair"))}
    assert not store.manifest("pair").exists()
    assert {c: store.weights_path(c).read_bytes() for c in before} == before  # the members stay
    assert run_json(runner, ["ensemble", "list", "--json"]) == {"ensembles": [], "damaged": []}
    assert "No ensembles" in cli(runner, "ensemble", "list").output
    refused(cli(runner, "ensemble", "show", "pair"), ExitCode.NOT_FOUND, "pair")
    refused(cli(runner, "ensemble", "rm", "pair"), ExitCode.NOT_FOUND, "pair")
    refused(cli(runner, "evaluate", "ensemble:pair", *NO_CI), ExitCode.NOT_FOUND, "pair")


def test_create_from_the_top_runs(runner, store: Store) -> None:
    value = {c: store.sidecar(c)["monitor"]["value"] for c in (store.a, store.b, store.c)}
    made = create(runner, "top2", "--top", "2")
    members = [m["id"] for m in made["members"]]
    assert len(members) == 2 and set(members) < set(value)
    left_out = (set(value) - set(members)).pop()
    assert value[left_out] <= min(value[m] for m in members)  # the two best runs
    assert [m["weight"] for m in made["members"]] == [1.0, 1.0]
    everything = create(runner, "all", "--top", "9")  # fewer runs than asked: all of them
    assert sorted(m["id"] for m in everything["members"]) == sorted(value)
    assert create(runner, "synthonly", "--top", "3", "--data", "synth")["members"] == everything["members"]
    refused(cli(runner, "ensemble", "create", "none", "--top", "2", "--data", "wide"), ExitCode.BAD_INPUT, "wide")


def test_greedy_selection_on_validation(runner, store: Store) -> None:
    made = create(runner, "greedy", "--top", "3", "--select", "greedy")
    sel = made["selection"]
    assert sel["method"] == "greedy" and sel["split"] == "val" and sel["metric"] == "balanced_accuracy"
    assert sorted(sel["candidates"]) == sorted([store.a, store.b, store.c])
    counts = dict(zip(sel["candidates"], sel["counts"]))
    # members are the candidates greedy took, weighted by how often it took them
    assert [(m["id"], m["weight"]) for m in made["members"]] == [(c, float(n)) for c, n in counts.items() if n]
    assert 1 <= sum(sel["counts"]) <= 25
    assert sel["score"] >= sel["best_single"]["score"]  # never worse than the best single model on val
    assert sel["best_single"]["id"] in sel["candidates"] and sel["history"][0] == sel["best_single"]["score"]
    assert sel["score"] == max(sel["history"])
    # the stored ensemble, run as evaluate runs it, scores on val what greedy selection measured
    assert made["val_metrics"]["balanced_accuracy"] == pytest.approx(sel["score"], abs=1e-6)
    shown = run_json(runner, ["ensemble", "show", "greedy", "--json"])
    assert shown["selection"]["counts"] == sel["counts"]
    assert sum(m["weight"] for m in shown["members"]) == pytest.approx(1.0)
    assert "Greedy selection" in cli(runner, "ensemble", "create", "greedy2", "--top", "3",
                                     "--select", "greedy").output


def test_replace(runner, store: Store) -> None:
    create(runner, "pair", store.a, store.b)
    before = store.manifest("pair").read_bytes()
    refused(cli(runner, "ensemble", "create", "pair", store.a, store.c), ExitCode.BAD_INPUT, "pair", "--replace")
    assert store.manifest("pair").read_bytes() == before
    replaced = create(runner, "pair", store.a, store.c, "--replace")
    assert [m["id"] for m in replaced["members"]] == [store.a, store.c]
    assert [m["id"] for m in run_json(runner, ["ensemble", "show", "pair", "--json"])["members"]] == [store.a, store.c]


def test_a_name_that_already_names_a_checkpoint_is_refused(runner, store: Store) -> None:
    """A bare NAME is looked up as an ensemble first, so an ensemble named like a run (or a weights hash
    prefix) would silently answer for that checkpoint in evaluate and explain."""
    run_b = store.b.split(":")[0]
    sha_b = store.sidecar(store.b)["weights"]["sha256"][:8]
    for name in (run_b, run_b[:4], sha_b):
        before = snapshot(store.home)
        refused(cli(runner, "ensemble", "create", name, store.a, store.c), ExitCode.BAD_INPUT, name)
        assert snapshot(store.home) == before
    assert run_json(runner, ["evaluate", run_b, *NO_CI, "--json"]) == run_json(
        runner, ["evaluate", store.b, *NO_CI, "--json"])


# ------------------------------------------------------------------------------------------ refusals


@pytest.fixture
def odd_members(store: Store) -> dict[str, str]:
    """Checkpoints that cannot join "synth" members: other classes (the "twoclass" set) and another
    cache size (the "wide" set), saved as training saves them."""
    from test_same_answer import saved_checkpoint

    def manifest(name: str) -> dict:
        return json.loads((store.home / "datasets" / name / "manifest.json").read_text())

    return {"OTHER_CLASSES": saved_checkpoint(manifest("twoclass"), run_id="0c1a55", input_size=[3, 48, 48]),
            "OTHER_CACHE": saved_checkpoint(manifest("wide"), run_id="0ca5e0", input_size=[3, 48, 48])}


REFUSALS = {
    "other-classes": (["mixed", "A", "OTHER_CLASSES"], ExitCode.BAD_INPUT, "classes"),
    "other-cache": (["mixed", "A", "OTHER_CACHE"], ExitCode.BAD_INPUT, "cache"),
    "dotdot-name": (["../x", "A", "B"], ExitCode.BAD_INPUT, "plain name"),
    "path-name": (["a/b", "A", "B"], ExitCode.BAD_INPUT, "plain name"),
    "reserved-best": (["best", "A", "B"], ExitCode.BAD_INPUT, "plain name"),
    "reserved-latest": (["latest", "A", "B"], ExitCode.BAD_INPUT, "plain name"),
    "weights-too-few": (["w", "A", "B", "--weights", "1"], ExitCode.BAD_INPUT, "--weights"),
    "weights-too-many": (["w", "A", "B", "--weights", "1,1,1"], ExitCode.BAD_INPUT, "--weights"),
    "weight-zero": (["w", "A", "B", "--weights", "1,0"], ExitCode.BAD_INPUT, "--weights"),
    "weight-negative": (["w", "A", "B", "--weights", "1,-2"], ExitCode.BAD_INPUT, "--weights"),
    "weight-nan": (["w", "A", "B", "--weights", "1,nan"], ExitCode.BAD_INPUT, "--weights"),
    "weight-inf": (["w", "A", "B", "--weights", "1,inf"], ExitCode.BAD_INPUT, "--weights"),
    "weight-text": (["w", "A", "B", "--weights", "one,two"], ExitCode.BAD_INPUT, "--weights"),
    "weights-and-greedy": (["w", "A", "B", "--weights", "1,2", "--select", "greedy"], ExitCode.BAD_INPUT, "greedy"),
    "ckpt-and-top": (["t", "A", "--top", "2"], ExitCode.BAD_INPUT, "--top"),
    "neither": (["n"], ExitCode.BAD_INPUT, "--top"),
    "twice": (["twice", "A", "A"], ExitCode.BAD_INPUT, "twice"),
    "unknown-point-class": (["p", "A", "B", "--operating-point", "akiec:sensitivity=0.9"], ExitCode.BAD_INPUT,
                            "akiec"),
    "bad-point": (["p", "A", "B", "--operating-point", "mel:recall=0.9"], ExitCode.BAD_INPUT, "--operating-point"),
    "unknown-select": (["s", "A", "B", "--select", "best"], ExitCode.BAD_INPUT, "--select"),
    "unknown-member": (["u", "A", "ffffff:0"], ExitCode.NOT_FOUND, "ffffff"),
}


@pytest.mark.parametrize(("args", "code", "word"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_are_one_line_and_write_nothing(runner, store: Store, odd_members: dict[str, str],
                                                 args: list[str], code: ExitCode, word: str) -> None:
    names = {"A": store.a, "B": store.b, **odd_members}
    before = snapshot(store.home)
    refused(cli(runner, "ensemble", "create", *[names.get(a, a) for a in args]), code, word)
    assert snapshot(store.home) == before
    assert not (store.home / "ensembles").exists() or not list((store.home / "ensembles").iterdir())


def test_a_name_is_never_a_path(runner, store: Store) -> None:
    stored("pair", store.a, store.b)
    for bad in ("ensemble:../pair", "ensemble:../ensembles/pair", "ensemble:a/b"):
        refused(cli(runner, "evaluate", bad, *NO_CI), ExitCode.BAD_INPUT)
        refused(cli(runner, "ensemble", "show", bad), ExitCode.BAD_INPUT)
    refused(cli(runner, "ensemble", "rm", "../ensembles/pair"), ExitCode.BAD_INPUT)
    assert store.manifest("pair").is_file()


# -------------------------------------------------------------------------------------- evaluate


Probabilities = dict[str, dict[str, np.ndarray]]  # member -> image_id -> probabilities


def _members_alone(store: Store, split: str) -> tuple[Probabilities, Probabilities, list[str]]:
    """image_id -> each member's own calibrated and raw probabilities on ``split`` (what ``dermcam evaluate
    MEMBER`` reports), computed through the library, in the classes' order."""
    from dermcam.evaluate.ensemble import member_probabilities
    from dermcam.evaluate.evaluation import scored_split
    from dermcam.evaluate.predict import predict
    from dermcam.store.inference import model_from_checkpoint
    from dermcam.store.references import resolve

    ckpts = [resolve(store.a), resolve(store.c)]
    scored = scored_split(ckpts[0].sidecar, None, split, None)
    ids = scored.index["image_id"].tolist()
    calibrated = member_probabilities(ckpts, scored, device="cpu")
    raw = [predict(model_from_checkpoint(c), scored.data.images, scored.rows, preprocessing=c.sidecar["preprocessing"],
                   device="cpu") for c in ckpts]
    return ({"a": dict(zip(ids, calibrated[0])), "c": dict(zip(ids, calibrated[1]))},
            {"a": dict(zip(ids, raw[0])), "c": dict(zip(ids, raw[1]))}, ids)


def test_evaluate_gives_the_weighted_mean_of_the_members(runner, store: Store, tmp_path: Path) -> None:
    create(runner, "pair", store.a, store.c, "--weights", "3,1")
    calibrated, _ = evaluate(runner, "ensemble:pair", tmp_path / "calibrated")
    raw, _ = evaluate(runner, "pair", tmp_path / "raw", "--no-calibration")  # a bare NAME names it too
    alone, alone_raw, ids = _members_alone(store, "test")
    assert set(calibrated) == set(raw) == set(ids) and len(ids) == 10
    for image in ids:  # each member calibrated by its own temperature, then averaged 3:1
        expected = (3 * alone["a"][image] + alone["c"][image]) / 4
        assert calibrated[image] == pytest.approx(expected, abs=1e-5), image
        assert raw[image] == pytest.approx((3 * alone_raw["a"][image] + alone_raw["c"][image]) / 4, abs=1e-5), image
    # not trivially true: the members disagree, and calibration changes their answers
    assert max(np.abs(alone["a"][i] - alone["c"][i]).max() for i in ids) > 1e-2
    assert max(np.abs(calibrated[i] - raw[i]).max() for i in ids) > 1e-2
    by_prefix = run_json(runner, ["evaluate", "ensemble:pair", *NO_CI, "--json"])
    by_name = run_json(runner, ["evaluate", "pair", *NO_CI, "--json"])
    assert by_prefix == by_name and "ensemble:pair" in json.dumps(by_prefix)
    # the members calibrate inside; one pass also gives the raw view: the mean of their raw softmaxes,
    # exactly what --no-calibration reports (not the calibrated numbers twice)
    cal = by_prefix["metrics"]["calibration"]
    plain = run_json(runner, ["evaluate", "pair", *NO_CI, "--json", "--no-calibration"])["metrics"]["calibration"]
    assert cal["applied"] and cal["method"] == "members" and not plain["applied"]
    for key in ("ece", "brier", "nll"):
        assert cal["raw"][key] == pytest.approx(plain[key], abs=1e-6), key
    assert abs(cal["raw"]["nll"] - cal["nll"]) > 1e-3
    text = runner.invoke(app, ["evaluate", "pair", *NO_CI], env={"COLUMNS": "200"})
    assert text.exit_code == 0 and "raw -> calibrated" in text.stdout, text.output


def test_the_report_of_an_ensemble_lists_its_members_and_compares_raw_and_calibrated(runner, store: Store,
                                                                                   tmp_path: Path) -> None:
    import html as html_lib

    create(runner, "pair", store.a, store.c, "--weights", "3,1", "--operating-point", "mel:sensitivity=0.8")
    result = runner.invoke(app, ["report", "pair", "-o", str(tmp_path / "rep"), "--json"])
    assert result.exit_code == 0, result.output
    page = html_lib.unescape((tmp_path / "rep" / "report.html").read_text(encoding="utf-8"))
    model = page[page.index('id="model"'):page.index('id="metrics"')]
    for text in ("Members", store.a, store.c, "weighted mean of the members' calibrated probabilities",
                 "0.750", "0.250", "mel:sensitivity=0.8"):
        assert text in model, text
    assert "Training configuration" not in model and "epoch" not in model
    calibration = page[page.index('id="calibration"'):page.index('id="operating-point"')]
    assert "uncalibrated probabilities" in calibration and ">raw<" in calibration


# --------------------------------------------------------------------------------------- explain


def test_evaluate_and_explain_give_the_same_answer(runner, store: Store, tmp_path: Path) -> None:
    made = create(runner, "op", store.a, store.c, "--operating-point", "mel:sensitivity=0.8")
    point = made["operating_point"]
    assert point["class"] == "mel" and point["validation"]["sensitivity"] >= 0.8
    assert run_json(runner, ["ensemble", "show", "op", "--json"])["operating_point"] == point
    probs, decided = evaluate(runner, "ensemble:op", tmp_path / "eval")
    files = sorted(p for p in store.src.rglob("*.jpg") if p.stem in probs)
    assert len(files) == len(probs)

    report = run_json(runner, ["explain", *map(str, files), "-c", "ensemble:op", "--no-cam", "--json",
                               "-o", str(tmp_path / "nocam")])
    assert report["operating_point"]["threshold"] == point["threshold"]
    assert [m["id"] for m in report["checkpoint"]["members"]] == [store.a, store.c]
    classes = report["classes"]
    for row in report["images"]:
        image = Path(row["image"]).stem
        explained = np.array([row["probabilities"][k] for k in classes])
        assert np.abs(explained - probs[image]).max() < 1e-4, image
        if abs(row["probabilities"]["mel"] - point["threshold"]) > 1e-4:
            assert row["decision"] == decided[image], image

    # the overlay explains the ensemble's decision; its sidecar names the members
    image = files[0]
    out = tmp_path / "cam"
    shown = run_json(runner, ["explain", str(image), "-c", "ensemble:op", "--score", "--json", "-o", str(out)])
    (row,) = shown["images"]
    assert Path(row["overlay"]).is_file() and Path(row["overlay"]).stat().st_size > 0
    assert row["decision"] == decided[image.stem] and row["target"] == row["decision"]
    assert 0.0 <= row["faithfulness"]["deletion_auc"] <= 1.0 and 0.0 <= row["faithfulness"]["insertion_auc"] <= 1.0
    meta = json.loads(Path(row["sidecar"]).read_text())
    assert meta["checkpoint"]["id"] == "ensemble:op"
    assert [(m["id"], m["sha256"]) for m in meta["checkpoint"]["members"]] == [
        (c, store.sidecar(c)["weights"]["sha256"]) for c in (store.a, store.c)]
    assert store.a in meta["target_layer"] and store.c in meta["target_layer"]
    assert meta["decision"] == decided[image.stem] and meta["target_class"] == meta["decision"]
    assert meta["faithfulness"] == row["faithfulness"]
    text = cli(runner, "explain", image, "-c", "op", "-o", tmp_path / "text")  # a bare NAME, rendered
    assert text.exit_code == 0, text.output
    assert (tmp_path / "text" / f"{image.stem}.cam.png").is_file()


def test_explain_refuses_a_layer_for_an_ensemble(runner, store: Store, tmp_path: Path) -> None:
    stored("pair", store.a, store.c)
    image = next(store.src.rglob("*.jpg"))
    out = tmp_path / "out"
    refused(cli(runner, "explain", image, "-c", "ensemble:pair", "--layer", "conv_stem", "-o", out),
            ExitCode.BAD_INPUT, "--layer")
    assert not out.exists() or not list(out.iterdir())


# ------------------------------------------------------------------------------------------ safety


def test_a_damaged_member_is_an_error_never_an_answer(runner, store: Store, tmp_path: Path) -> None:
    stored("pair", store.a, store.c)
    weights = store.weights_path(store.c)
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the tensors, past the header
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    refused(cli(runner, "evaluate", "ensemble:pair", "--out", out, *NO_CI), ExitCode.CORRUPT,
            store.c.split(":")[0], "sha256")
    assert not (out / "predictions.csv").exists()
    image = next(store.src.rglob("*.jpg"))
    refused(cli(runner, "explain", image, "-c", "pair", "-o", tmp_path / "ex"), ExitCode.CORRUPT)


def test_a_member_with_a_changed_sidecar_hash_is_refused(runner, store: Store) -> None:
    stored("pair", store.a, store.c)
    path = store.sidecar_path(store.a)
    sidecar = json.loads(path.read_text())
    sidecar["weights"]["sha256"] = "0" * 64
    path.write_text(json.dumps(sidecar))
    refused(cli(runner, "evaluate", "ensemble:pair", *NO_CI), ExitCode.CORRUPT, store.a)
    listing = run_json(runner, ["ensemble", "list", "--json"])  # the manifest is fine; the member is not
    assert store.a in listing["ensembles"][0]["problem"]


def _good_manifest(store: Store) -> dict:
    return json.loads(store.manifest("pair").read_text())


def _write(store: Store, name: str, content: dict | str) -> None:
    store.manifest(name).write_text(content if isinstance(content, str) else json.dumps(content))


def _first_member(**change: object):
    return lambda store, m: {**m, "members": [{**m["members"][0], **change}, *m["members"][1:]]}


DAMAGE = {
    "invalid-json": lambda store, m: "{not json",
    "member-path": _first_member(id="../../x"),
    "member-absolute-path": lambda store, m: _first_member(id=str(store.home.parent / "x.json"))(store, m),
    "name-mismatch": lambda store, m: {**m, "name": "other"},
    "zero-weight": _first_member(weight=0),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_manifest_is_listed_and_refused(runner, store: Store, monkeypatch: pytest.MonkeyPatch,
                                                  damage) -> None:
    from dermcam.store import references

    stored("pair", store.a, store.c)
    stored("fine", store.a, store.b)
    # a checkpoint outside the store that a path in a manifest could lead to: it must never be read
    outside = store.home.parent
    shutil.copy(store.sidecar_path(store.a), outside / "x.json")
    shutil.copy(store.weights_path(store.a), outside / "x.safetensors")
    followed: list[Path] = []
    original = references.checkpoint_from_path
    monkeypatch.setattr(references, "checkpoint_from_path", lambda p: followed.append(p) or original(p))
    _write(store, "pair", damage(store, _good_manifest(store)))

    listing = cli(runner, "ensemble", "list", "--json")
    assert listing.exit_code == ExitCode.CORRUPT, listing.output
    result = json.loads(listing.stdout)
    assert [e["name"] for e in result["ensembles"]] == ["fine"]
    assert [d["path"] for d in result["damaged"]] == [str(store.manifest("pair"))]
    text = cli(runner, "ensemble", "list")
    assert text.exit_code == ExitCode.CORRUPT and "damaged" in text.output and "fine" in text.output
    refused(cli(runner, "evaluate", "ensemble:pair", *NO_CI), ExitCode.CORRUPT)
    refused(cli(runner, "ensemble", "show", "pair"), ExitCode.CORRUPT)
    assert cli(runner, "evaluate", "ensemble:fine", *NO_CI).exit_code == 0  # the others still work
    assert followed == []


def test_a_damaged_manifest_can_be_removed(runner, store: Store) -> None:
    """What prune's refusal advises (dermcam ensemble rm NAME) works on a manifest that does not read."""
    stored("pair", store.a, store.c)
    _write(store, "pair", "{not json")
    assert run_json(runner, ["ensemble", "rm", "pair", "--json"])["removed"] == "pair"
    assert run_json(runner, ["ensemble", "list", "--json"]) == {"ensembles": [], "damaged": []}
    assert cli(runner, "ckpt", "prune", "--keep-best", "0", "--no-keep-latest", "--yes").exit_code == 0


def test_ckpt_verify_reports_a_damaged_manifest(runner, store: Store) -> None:
    stored("pair", store.a, store.c)
    _write(store, "pair", "{not json")
    result = cli(runner, "ckpt", "verify")
    assert result.exit_code == ExitCode.CORRUPT and "pair" in result.output


def test_a_symlinked_manifest_leading_outside_is_damaged(runner, store: Store) -> None:
    stored("pair", store.a, store.c)
    outside = store.home.parent / "evil.json"
    outside.write_text(json.dumps({**_good_manifest(store), "name": "evil"}))
    store.manifest("evil").symlink_to(outside)
    listing = cli(runner, "ensemble", "list", "--json")
    assert listing.exit_code == ExitCode.CORRUPT
    assert [e["name"] for e in json.loads(listing.stdout)["ensembles"]] == ["pair"]
    refused(cli(runner, "evaluate", "ensemble:evil", *NO_CI), ExitCode.CORRUPT, "outside")
    refused(cli(runner, "evaluate", "evil", *NO_CI), ExitCode.CORRUPT, "outside")


# -------------------------------------------------------------------------------- prune protection


def test_prune_keeps_members_and_deletes_the_rest(runner, store: Store, tmp_path: Path) -> None:
    stored("pair", store.a, store.c)
    pruned = run_json(runner, ["ckpt", "prune", "--keep-best", "0", "--no-keep-latest", "--yes", "--json"])
    assert [r["id"] for r in pruned["removed"]] == [store.b]
    kept = {k["id"]: k["reasons"] for k in pruned["kept"]}
    assert kept.keys() == {store.a, store.c} and all("ensemble pair" in r for r in kept.values())
    assert pruned["ensemble_members_removed"] == []
    assert not store.sidecar_path(store.b).exists()
    assert store.weights_path(store.a).is_file() and store.weights_path(store.c).is_file()
    assert cli(runner, "evaluate", "ensemble:pair", *NO_CI).exit_code == 0


def test_a_forced_prune_deletes_members_and_says_so(runner, store: Store) -> None:
    stored("pair", store.a, store.c)
    dry = cli(runner, "ckpt", "prune", "--keep-best", "0", "--no-keep-latest", "--force", "--dry-run")
    assert dry.exit_code == 0 and "member of ensemble pair" in dry.output and "Would remove" in dry.output
    pruned = run_json(runner, ["ckpt", "prune", "--keep-best", "0", "--no-keep-latest", "--force", "--yes", "--json"])
    assert sorted(r["id"] for r in pruned["removed"]) == sorted([store.a, store.b, store.c])
    assert pruned["ensemble_members_removed"] == [{"id": store.a, "ensembles": ["pair"]},
                                                  {"id": store.c, "ensembles": ["pair"]}]
    refused(cli(runner, "evaluate", "ensemble:pair", *NO_CI), ExitCode.NOT_FOUND, store.a, "ensemble rm")
    listing = run_json(runner, ["ensemble", "list", "--json"])  # listed, with why it no longer loads
    assert store.a in listing["ensembles"][0]["problem"]


def test_a_damaged_manifest_stops_a_prune(runner, store: Store) -> None:
    stored("pair", store.a, store.c)
    _write(store, "pair", "{not json")
    before = snapshot(store.home)
    refused(cli(runner, "ckpt", "prune", "--keep-best", "0", "--no-keep-latest", "--yes"), ExitCode.CORRUPT,
            "--force")
    assert snapshot(store.home) == before
    forced = run_json(runner, ["ckpt", "prune", "--keep-best", "0", "--no-keep-latest", "--force", "--yes", "--json"])
    assert len(forced["removed"]) == 3


# ------------------------------------------------------------------------------ greedy selection


def _two_class(*rows: float) -> np.ndarray:
    """Probabilities of class 1 -> (N, 2) probabilities."""
    p1 = np.array(rows, dtype=np.float64)
    return np.stack([1 - p1, p1], axis=1)


# Five images, labels 0 1 0 1 1. A alone: balanced accuracy 0.75 (misses image 0); B alone: 0.667.
# A+B fixes image 0 and 4 but breaks image 1; 2A+B gets every image right.
Y = np.array([0, 1, 0, 1, 1])
A = _two_class(0.6, 0.7, 0.1, 0.9, 0.8)
B = _two_class(0.1, 0.2, 0.1, 0.9, 0.4)


def _balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    predicted = probs.argmax(axis=1)
    return float(np.mean([(predicted[y == k] == k).mean() for k in np.unique(y)]))


def test_greedy_starts_from_the_best_single_model_and_can_take_one_twice() -> None:
    from dermcam.evaluate.ensemble import greedy_select

    assert _balanced_accuracy(Y, A) == 0.75 and _balanced_accuracy(Y, B) == pytest.approx(2 / 3)
    picked = greedy_select([B, A], Y, ["b", "a"], rounds=3)
    assert picked.best_single == ("a", 0.75) and picked.history[0] == 0.75
    assert picked.counts == [1, 2]  # a twice: a weight of 2/3
    assert picked.members == [("b", 1), ("a", 2)] and picked.score == 1.0
    assert _balanced_accuracy(Y, (B + 2 * A) / 3) == 1.0
    longer = greedy_select([B, A], Y, ["b", "a"])  # 25 rounds: still perfect, still A more than B
    assert longer.score == 1.0 and longer.counts[1] > longer.counts[0] >= 1
    alone = greedy_select([A], Y, ["a"])
    assert alone.members[0][0] == "a" and alone.score == 0.75


def test_greedy_keeps_the_best_prefix() -> None:
    """Later rounds that make the mixture worse are dropped: the counts are those of the best round."""
    from dermcam.evaluate.ensemble import greedy_select

    y = np.array([0, 0, 1, 0, 1, 1])
    a = _two_class(0.05, 0.9, 0.1, 0.1, 0.3, 0.95)
    b = _two_class(0.9, 0.05, 0.1, 0.4, 0.5, 0.3)
    c = _two_class(0.1, 0.5, 0.4, 0.9, 0.5, 0.2)
    picked = greedy_select([a, b, c], y, ["a", "b", "c"], rounds=4)
    assert picked.history[1] > picked.history[0] and picked.history[-1] < picked.history[1]  # up, then down
    assert picked.counts == [1, 1, 0] and picked.score == pytest.approx(2 / 3) == max(picked.history)
    assert _balanced_accuracy(y, (a + b) / 2) == pytest.approx(2 / 3)
    # a perfect model alone: adding anything else only hurts, so it stays alone
    perfect = _two_class(0.45, 0.55, 0.45, 0.55)
    wrong = _two_class(0.9, 0.1, 0.9, 0.1)
    alone = greedy_select([wrong, perfect], np.array([0, 1, 0, 1]), ["wrong", "perfect"], rounds=4)
    assert [m for m, _ in alone.members] == ["perfect"] and alone.score == 1.0


def test_greedy_keeps_the_first_best_round_not_an_equal_later_one() -> None:
    from dermcam.evaluate.ensemble import greedy_select

    assert greedy_select([A], Y, ["a"]).counts == [1]
    assert greedy_select([B, A], Y, ["b", "a"], rounds=3).counts == [1, 2]


@pytest.mark.parametrize("seed", range(20))
def test_greedy_is_never_worse_than_the_best_single_model(seed: int) -> None:
    from dermcam.evaluate.ensemble import greedy_select

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 30)
    probs = [rng.dirichlet(np.ones(3), size=30) for _ in range(4)]
    picked = greedy_select(probs, y, list("abcd"), rounds=8)
    best_single = max(_balanced_accuracy(y, p) for p in probs)
    assert picked.best_single[1] == pytest.approx(best_single)
    assert picked.score >= best_single - 1e-12
    # the counts are the members: their weighted mean scores what the selection says
    mixture = sum(n * p for n, p in zip(picked.counts, probs)) / sum(picked.counts)
    assert _balanced_accuracy(y, mixture) == pytest.approx(picked.score)
    assert picked.score == pytest.approx(max(picked.history)) and sum(picked.counts) <= 8


# --------------------------------------------------------------------------------- EnsembleModel


CALIBRATIONS = {
    "none": None,
    "temperature": {"method": "temperature", "temperature": 2.5},
    "vector": {"method": "vector", "temperature": 1.3, "scale": [0.5, 1.5, 1.0], "bias": [0.3, -0.2, 0.0]},
}


@pytest.mark.parametrize("calibration", CALIBRATIONS.values(), ids=CALIBRATIONS.keys())
def test_one_member_ensemble_is_that_member_calibrated(calibration: dict | None) -> None:
    import timm
    import torch

    from dermcam.data.geometry import batch_input, to_float
    from dermcam.evaluate.calibration import rescale
    from dermcam.models.ensemble import EnsembleModel, MemberSpec, WithRaw

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(30)  # spread-out probabilities, so calibration shows
    pre = {"input_size": [3, 40, 56], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    pixels = np.random.default_rng(0).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)  # cache-sized
    ensemble = EnsembleModel([model], [MemberSpec(pre, calibration, 1.0)]).eval()
    with torch.no_grad():
        raw = model(batch_input(pixels, pre)).softmax(1).double().numpy()
        out = ensemble(to_float(pixels)).softmax(1).double().numpy()
    expected = raw if calibration is None else rescale(raw, calibration)
    assert np.abs(out - expected).max() < 1e-5
    if calibration is not None:
        assert np.abs(raw - expected).max() > 1e-2  # the calibration changed something
        uncalibrated = EnsembleModel([model], [MemberSpec(pre, calibration, 1.0)], calibrated=False).eval()
        with torch.no_grad():
            assert np.abs(uncalibrated(to_float(pixels)).softmax(1).double().numpy() - raw).max() < 1e-5
    # evaluate's one pass for both views: the reported half is the ensemble's, the other half the raw mean
    with torch.no_grad():
        both = WithRaw(ensemble)(to_float(pixels))
    assert both.shape == (4, 6)
    assert np.abs(both[:, :3].softmax(1).double().numpy() - expected).max() < 1e-5
    assert np.abs(both[:, 3:].softmax(1).double().numpy() - raw).max() < 1e-5


def test_the_ensemble_sees_the_cache_image_as_geometry_hands_it_over() -> None:
    """The store and models cannot import dermcam.data (tests/test_architecture.py), so they spell out
    its identity preprocessing and resize; these must stay what dermcam.data.geometry says (the resize
    is checked against batch_input above)."""
    import torch

    from dermcam.data import geometry
    from dermcam.store.ensembles import DEFAULT_CACHE_SIZE, Ensemble, scoring_document

    assert DEFAULT_CACHE_SIZE == geometry.DEFAULT_CACHE_SIZE
    member = {"id": "abc123:0", "sha256": "0" * 64, "backbone": "test_efficientnet", "weight": 1.0,
              "preprocessing": {"input_size": [3, 40, 56], "mean": [0.5] * 3, "std": [0.2] * 3, "cache_size": [64, 48]}}
    manifest = {"name": "x", "classes": ["bkl", "mel", "nv"], "rule": "mean of calibrated probabilities",
                "members": [member]}
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 48, 64, 3), dtype=np.uint8)
    document = scoring_document(Ensemble(Path("x.json"), manifest))
    assert geometry.cache_size(document["preprocessing"]) == (64, 48)
    assert torch.equal(geometry.batch_input(pixels, document["preprocessing"]), geometry.to_float(pixels))
    old = {**member, "preprocessing": {k: v for k, v in member["preprocessing"].items() if k != "cache_size"}}
    document = scoring_document(Ensemble(Path("x.json"), {**manifest, "members": [old]}))
    assert geometry.cache_size(document["preprocessing"]) == tuple(geometry.DEFAULT_CACHE_SIZE)


def test_a_training_comparison_offers_and_stores_its_best_ensemble(runner, home: Path) -> None:
    """Several runs in one `dermcam train`: the table's last row is their greedy ensemble, and
    --ensemble NAME stores it (checked before any run starts: a reserved name trains nothing)."""
    refused = cli(runner, "train", "--backbone", "test_efficientnet", *TINY, "--seed", "0", "--seed", "1",
                  "--ensemble", "best")
    assert refused.exit_code == ExitCode.BAD_INPUT and not (home / "runs").exists()
    result = cli(runner, "train", "--backbone", "test_efficientnet", *TINY, "--image-size", "48", "--seed", "0",
                 "--seed", "1", "--ensemble", "duo")
    assert result.exit_code == 0, result.output
    assert "ensemble" in result.output and "ensemble:duo" in result.output
    shown = run_json(runner, ["ensemble", "show", "duo", "--json"])
    assert shown["selection"]["method"] == "greedy" and len(shown["selection"]["candidates"]) == 2
    assert {m["id"] for m in shown["members"]} <= set(shown["selection"]["candidates"])
    assert shown["problem"] is None

"""Patient metadata (age, sex, site) fused with the image: the encoding, the model, training, evaluate.

The encoding and the model run on hand-made tables and tiny timm models; training and evaluate run
through the CLI on the tiny synthetic set (its rows have age, sex and localization, and dx_type).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_train import stop_after_epoch
import torch

from conftest import run_json, weights_of
from dermcam.cli import app
from dermcam.data.metadata import encode, fit_spec, known, model_metadata, summary
from dermcam.errors import BadInputError, CorruptError
from dermcam.metadata_spec import MetadataSpec, parse_fields, spec_problem
from helpers_cli import refused

TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth"]
META = ["--metadata", "age,sex,site"]


def table(n: int = 8, seed: int = 0) -> pd.DataFrame:
    """Index-like rows with every column a prepared set has, dx_type included."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "image_id": [f"I{i}" for i in range(n)], "dx": rng.choice(["mel", "nv", "bkl"], n),
        "age": rng.choice(["35.0", "50", "", "80.0", "unknown"], n), "sex": rng.choice(["male", "female", "", "F"], n),
        "localization": rng.choice(["back", "face", "Lower Extremity", "unknown", ""], n),
        "dx_type": rng.choice(["histo", "follow_up", "consensus"], n), "label": rng.integers(0, 3, n).astype(str)})


# -- the fields ------------------------------------------------------------------------------------


def test_fields_are_parsed_in_feature_order() -> None:
    assert parse_fields("site, AGE") == ("age", "site")
    assert parse_fields("age,sex,site") == ("age", "sex", "site")


@pytest.mark.parametrize("text, words", [
    ("dx_type", "leaks the label"), ("age,dx_type", "leaks the label"), ("diagnosis_confirm_type", "leaks"),
    ("dx", "leaks"), ("foo", "not a metadata field"), ("age,age", "more than once"), ("", "empty"),
    ("age,", "empty field")])
def test_bad_fields_are_refused_in_one_line(text: str, words: str) -> None:
    with pytest.raises(BadInputError) as caught:
        parse_fields(text)
    assert words in str(caught.value) and "\n" not in str(caught.value)


# -- the encoding ----------------------------------------------------------------------------------


def test_missing_values_are_a_learned_unknown_never_an_error() -> None:
    train = pd.DataFrame({"age": ["40", "60", "", "abc", "999"], "sex": ["male", "female", "unknown", "", "M"],
                          "localization": ["back", "face", "unknown", "", "Back"]})
    spec = fit_spec("age,sex,site", train)
    assert spec.sites == ("back", "face") and spec.age_mean == 50.0 and spec.age_std == 10.0
    assert spec.features == ["age", "age=unknown", "sex=female", "sex=male", "sex=unknown", "site=back",
                             "site=face", "site=unknown"]
    x = encode(spec, train)
    assert x.dtype == np.float32 and x.shape == (5, spec.dim)
    np.testing.assert_array_equal(x[0], [-1, 0, 0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(x[1], [1, 0, 1, 0, 0, 0, 1, 0])
    for row in x[2:4]:  # nothing known: the unknown row, exactly what the model sees without metadata
        np.testing.assert_array_equal(row, spec.unknown())
    np.testing.assert_array_equal(x[4], [0, 1, 0, 1, 0, 1, 0, 0])  # age 999 unknown; "M" is male, "Back" back


def test_an_unseen_site_is_unknown_and_a_set_without_columns_is_all_unknown() -> None:
    spec = fit_spec("age,sex,site", pd.DataFrame({"age": ["50"], "sex": ["male"], "localization": ["back"]}))
    other = pd.DataFrame({"age": ["50"], "sex": ["female"], "localization": ["palms"]})
    assert encode(spec, other)[0, -1] == 1.0 and not known(spec, other)["site"][0]
    bare = pd.DataFrame({"image_id": ["a", "b"]})
    np.testing.assert_array_equal(encode(spec, bare), np.array([spec.unknown()] * 2, dtype=np.float32))
    assert summary({"metadata": spec.to_dict()}, bare) == {
        "fields": ["age", "sex", "site"], "images": 2, "known": {"age": 0, "sex": 0, "site": 0}, "without_metadata": 2}
    assert summary({"id": "x"}, bare) is None and model_metadata({"id": "x"}, bare) is None


def test_dx_type_never_influences_the_features() -> None:
    """The diagnosis method leaks the label: a table whose dx_type *is* the label encodes byte for byte
    as one with dx_type shuffled or removed, for every field set, and the spec is the same."""
    rows = table(200, seed=3)
    leaking = rows.assign(dx_type=rows["dx"])
    shuffled = rows.assign(dx_type=np.random.default_rng(1).permutation(rows["dx"].to_numpy()))
    removed = rows.drop(columns=["dx_type"])
    for fields in ("age", "sex", "site", "age,sex,site"):
        specs = [fit_spec(fields, t) for t in (leaking, shuffled, removed)]
        assert specs[0] == specs[1] == specs[2]
        encoded = [encode(specs[0], t).tobytes() for t in (leaking, shuffled, removed)]
        assert encoded[0] == encoded[1] == encoded[2]
        assert not any("dx" in name for name in specs[0].features)
    with pytest.raises(BadInputError, match="leaks the label"):
        fit_spec("age,dx_type", rows)


def test_the_spec_round_trips_and_a_damaged_block_is_corrupt() -> None:
    spec = fit_spec("age,sex,site", table(50))
    block = json.loads(json.dumps(spec.to_dict()))
    assert MetadataSpec.from_dict(block) == spec and spec_problem(block) is None
    damaged = [{**block, "dim": block["dim"] + 1}, {**block, "sites": block["sites"] + block["sites"][:1]},
               {**block, "age": {"mean": float("nan"), "std": 1.0}}, {**block, "fields": ["site", "age"]},
               {**block, "fields": ["age", "dx_type"]}, {**block, "hidden": 0}, {**block, "encoding": "x"}, []]
    for value in damaged:
        assert spec_problem(value) is not None, value
        with pytest.raises(CorruptError):
            MetadataSpec.from_dict(value)


# -- the model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> MetadataSpec:
    return fit_spec("age,sex,site", table(40))


def test_the_fusion_model_answers_with_and_without_metadata(spec: MetadataSpec) -> None:
    from dermcam.models.backbones import build_model, build_with_weights, data_config
    from dermcam.models.layers import find_target_layer
    from dermcam.models.metadata import MetadataFusion

    torch.manual_seed(0)
    model = build_model("test_efficientnet", 3, spec.to_dict()).eval()
    assert isinstance(model, MetadataFusion) and model.fields == ("age", "sex", "site")
    x = torch.rand(4, 3, 48, 48)
    meta = torch.from_numpy(encode(spec, table(4, seed=5)))
    with torch.no_grad():
        plain = model(x)
        assert plain.shape == (4, 3)
        unknown = torch.tensor([spec.unknown()] * 4)
        torch.testing.assert_close(plain, model(x, unknown))  # None means "nothing known"
        assert not torch.allclose(plain, model(x, meta))  # the metadata counts
    assert find_target_layer(model) == "backbone.bn2"
    assert data_config(model) == data_config(build_model("test_efficientnet", 3))
    reloaded = build_with_weights("test_efficientnet", 3, model.state_dict(), "test", spec.to_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, meta), model(x, meta))
    with pytest.raises(CorruptError):  # strict: a plain model's weights do not fit a fusion model
        build_with_weights("test_efficientnet", 3, build_model("test_efficientnet", 3).state_dict(), "test",
                           spec.to_dict())
    assert "unknown" not in model.state_dict()  # rebuilt from the sidecar's spec, not stored


def test_pretrained_weights_load_into_the_backbone_and_the_head_learns_at_the_head_rate(
        spec: MetadataSpec, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from dermcam.models.backbones import build_model, create_model, freeze_stages
    from dermcam.train.config import TrainConfig
    from dermcam.train.schedule import param_groups

    source = build_model("test_resnet", 1000).state_dict()
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "w.safetensors"))
    model, prov = create_model("test_resnet", 3, str(tmp_path / "w.safetensors"), metadata=spec.to_dict())
    assert sorted(prov["dropped_keys"]) == ["fc.bias", "fc.weight"]
    loaded = model.state_dict()
    for key, tensor in source.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(loaded[f"backbone.{key}"], tensor)
    assert not model.head.weight.any()  # a new head starts at zero: every class at equal odds
    groups = param_groups(model, TrainConfig(lr=1e-3, head_lr_scale=10.0))
    fast = {id(p) for g in groups if g["lr"] == pytest.approx(1e-2) for p in g["params"]}
    assert fast == {id(p) for p in [*model.metadata.parameters(), *model.head.parameters()]}
    freeze_stages(model, 1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1.")) for n in frozen)
    plain = build_model("test_resnet", 3)
    freeze_stages(plain, 1)
    assert {f"backbone.{n}" for n, p in plain.named_parameters() if not p.requires_grad} == frozen
    with pytest.raises(BadInputError, match="only 4 stages"):
        freeze_stages(build_model("test_resnet", 3, spec.to_dict()), 5)


def test_an_ensemble_passes_each_member_its_own_metadata(spec: MetadataSpec) -> None:
    from dermcam.models.backbones import build_model
    from dermcam.models.ensemble import EnsembleModel, MemberSpec, WithRaw

    torch.manual_seed(1)
    pre = {"input_size": [3, 48, 48], "mean": [0.5] * 3, "std": [0.25] * 3}
    fused, plain = build_model("test_efficientnet", 3, spec.to_dict()).eval(), build_model("test_resnet", 3).eval()
    ensemble = EnsembleModel([fused, plain], [MemberSpec(pre, None, 1.0)] * 2).eval()
    x = torch.rand(3, 3, 48, 48)
    meta = torch.from_numpy(encode(spec, table(3, seed=2)))
    with torch.no_grad():
        z = (x - 0.5) / 0.25
        expected = ((fused(z, meta).softmax(1) + plain(z).softmax(1)) / 2).log()
        torch.testing.assert_close(ensemble(x, [meta, None]), expected)
        torch.testing.assert_close(ensemble(x), ensemble(x, [torch.tensor([spec.unknown()] * 3), None]))
        torch.testing.assert_close(WithRaw(ensemble)(x, [meta, None])[:, :3], expected)
        with pytest.raises(ValueError):
            ensemble(x, [meta])


def test_predict_passes_each_batch_its_rows_of_metadata(spec: MetadataSpec) -> None:
    from dermcam.evaluate.predict import predict
    from dermcam.models.backbones import build_model

    torch.manual_seed(2)
    model = build_model("test_efficientnet", 3, spec.to_dict()).eval()
    images = np.random.default_rng(0).integers(0, 255, (7, 24, 32, 3), dtype=np.uint8)
    rows = np.array([6, 0, 3, 1, 5])
    meta = encode(spec, table(5, seed=4))
    pre = {"input_size": [3, 48, 48], "mean": [0.5] * 3, "std": [0.25] * 3}
    batched = predict(model, images, rows, preprocessing=pre, device=torch.device("cpu"), batch_size=2, metadata=meta)
    whole = predict(model, images, rows, preprocessing=pre, device=torch.device("cpu"), batch_size=5, metadata=meta)
    np.testing.assert_allclose(batched, whole, atol=1e-6)
    for i in range(len(rows)):
        one = predict(model, images, rows[i:i + 1], preprocessing=pre, device=torch.device("cpu"),
                      metadata=meta[i:i + 1])
        np.testing.assert_allclose(one[0], whole[i], atol=1e-6)
    with pytest.raises(ValueError):
        predict(model, images, rows, preprocessing=pre, device=torch.device("cpu"), metadata=meta[:2])


# -- training and evaluate through the CLI ----------------------------------------------------------


@pytest.mark.parametrize("value, words", [("dx_type", ("leaks the label",)), ("foo", ("foo", "age, sex, site")),
                                          ("age,age", ("more than once",))])
def test_bad_metadata_options_exit_2_in_one_line_before_any_run(runner, home: Path, value: str,
                                                                 words: tuple[str, ...]) -> None:
    refused(runner.invoke(app, ["train", *TINY, "--metadata", value]), 2, "--metadata", *words)
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_train_with_metadata_records_it_and_evaluate_reads_the_sets_own_columns(runner, home: Path,
                                                                                 tmp_path: Path) -> None:
    from test_layouts import class_folders

    [result] = run_json(runner, ["train", *TINY, *META, "--epochs", "2", "--ema", "--json"])
    run_dir = Path(result["run_dir"])
    best = int(result["best_checkpoint"].split(":")[1])
    path = run_dir / f"epoch-{best:04d}.json"
    sidecar = json.loads(path.read_text())
    block = sidecar["metadata"]
    assert block["fields"] == ["age", "sex", "site"] and block["columns"]["site"] == "localization"
    assert block["dim"] == len(block["features"]) and block["sites"]  # the synthetic rows have sites
    assert "dx" not in json.dumps(block["features"])
    assert sidecar["config"]["metadata"] == "age,sex,site" and sidecar["calibration"]  # the best was calibrated
    assert any(k.startswith("metadata.") for k in weights_of(run_dir, best))
    test = result["test_metrics"]
    assert 0 <= test["balanced_accuracy"] <= 1

    out = run_json(runner, ["evaluate", result["best_checkpoint"], "--resamples", "0", "--json"])
    assert out["metadata"]["fields"] == ["age", "sex", "site"] and out["metadata"]["without_metadata"] == 0
    assert out["metadata"]["images"] == out["metrics"]["n"]
    assert out["metrics"]["balanced_accuracy"] == pytest.approx(test["balanced_accuracy"])
    human = runner.invoke(app, ["evaluate", result["best_checkpoint"], "--resamples", "0"], env={"COLUMNS": "200"})
    assert human.exit_code == 0 and "Metadata: the model reads age, sex, site" in human.stdout

    # A set without the columns: answered from the image alone, and it says so
    src = class_folders(tmp_path / "folders", {"mel": 5, "nv": 5})
    prepared = runner.invoke(app, ["prepare", str(src), "--name", "bare", "--external", "--cache-size", "64x48"])
    assert prepared.exit_code == 0, prepared.output
    bare = run_json(runner, ["evaluate", result["best_checkpoint"], "--data", "bare", "--resamples", "0", "--json"])
    assert bare["metadata"]["without_metadata"] == bare["metadata"]["images"] == bare["metrics"]["n"] == 10
    human = runner.invoke(app, ["evaluate", result["best_checkpoint"], "--data", "bare", "--resamples", "0"],
                          env={"COLUMNS": "200"})
    assert human.exit_code == 0 and "every image had none" in human.stdout

    # A model without metadata ignores the columns and reports nothing about them
    [plain] = run_json(runner, ["train", *TINY, "--epochs", "1", "--json"])
    assert run_json(runner, ["evaluate", plain["best_checkpoint"], "--resamples", "0", "--json"])["metadata"] is None

    # An ensemble of the two: each member reads its own encoding (one of them none)
    created = run_json(runner, ["ensemble", "create", "mixed", result["best_checkpoint"], plain["best_checkpoint"],
                                "--json"])
    assert created["val_metrics"] is not None
    mixed = run_json(runner, ["evaluate", "ensemble:mixed", "--resamples", "0", "--json"])
    assert mixed["metadata"]["fields"] == ["age", "sex", "site"] and mixed["metadata"]["without_metadata"] == 0

    # A damaged metadata block makes the checkpoint damaged (exit 4), never a silently other model
    path.write_text(json.dumps({**sidecar, "metadata": {**block, "dim": block["dim"] + 1}}))
    refused(runner.invoke(app, ["evaluate", result["best_checkpoint"], "--resamples", "0"]), 4, "metadata")


def test_resume_of_a_metadata_run_matches_a_straight_run(runner, home: Path, monkeypatch) -> None:
    args = ["train", *TINY, *META, "--epochs", "3", "--json"]
    [straight] = run_json(runner, args)
    resume_normally = stop_after_epoch(monkeypatch)
    assert runner.invoke(app, args).exit_code == 130
    resume_normally()
    run_id = next(p.name for p in (home / "runs").iterdir() if p.name != straight["run_id"])
    [resumed] = run_json(runner, ["train", "--resume", "--run", run_id, "--json"])
    assert resumed["resumed_from"] == f"{run_id}:1"
    a, b = weights_of(Path(straight["run_dir"]), 2), weights_of(Path(resumed["run_dir"]), 2)
    assert a.keys() == b.keys() and any(k.startswith("metadata.") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert resumed["test_metrics"] == straight["test_metrics"]

"""dermcam ckpt export / restore FILE and export.load_exported: self-contained files, untrusted input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dermcam.errors import BadInputError, CorruptError
from dermcam.store.exported import MAX_HEADER_BYTES, load_exported
from dermcam.store.inference import load_for_inference, model_from_checkpoint
from dermcam.store.paths import home
from dermcam.store.references import resolve
from test_ckpt import CLASSES, invoke, list_json, make_run, snapshot


def logits(model) -> list[float]:
    import torch

    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32)).flatten().tolist()


def export(runner, ref: str, out: Path, *extra: str) -> dict:
    result = invoke(runner, "export", ref, "-o", str(out), "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def split_file(path: Path) -> tuple[dict, bytes]:
    """(header JSON, data bytes) of a safetensors file, to build tampered copies."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_file(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def with_meta(src: Path, dst: Path, **changes) -> Path:
    header, data = split_file(src)
    meta = json.loads(header["__metadata__"]["dermcam"])
    meta.update(changes)
    header["__metadata__"]["dermcam"] = json.dumps(meta)
    return join_file(dst, header, data)


def test_export_header_and_exported_flag(runner, tmp_path: Path) -> None:
    make_run("aaa111", [0.5, 0.9, 0.6])
    out = tmp_path / "model.safetensors"
    result = export(runner, "aaa111:1", out)
    assert result["id"] == "aaa111:1" and result["dtype"] == "float32" and Path(result["file"]) == out

    header, _ = split_file(out)
    meta = json.loads(header["__metadata__"]["dermcam"])
    assert meta["schema"] == "dermcam.export/1"
    assert meta["backbone"] == "test_efficientnet" and meta["classes"] == CLASSES
    assert meta["label_encoding"] == {"nv": 0, "bkl": 1, "mel": 2}
    assert meta["preprocessing"]["input_size"] == [3, 32, 32]
    assert meta["metrics"]["balanced_accuracy"] == 0.9 and meta["config"]["lr"] == 0.001
    assert meta["source"]["id"] == "aaa111:1"
    assert meta["source"]["sha256"] == resolve("aaa111:1").sidecar["weights"]["sha256"]
    assert {"dermcam", "torch", "timm"} <= set(meta["versions"])

    rows = {r["id"]: r for r in list_json(runner)}
    assert "exported" in rows["aaa111:1"]["flags"] and rows["aaa111:1"]["exports"][0]["file"] == str(out)
    assert "exported" not in rows["aaa111:0"]["flags"]

    again = invoke(runner, "export", "aaa111:1", "-o", str(out))
    assert again.exit_code == 2 and "--force" in again.stderr
    assert invoke(runner, "export", "aaa111:1", "-o", str(out), "--force").exit_code == 0


def test_export_loads_with_plain_timm_and_safetensors(runner, tmp_path: Path) -> None:
    make_run("aaa111", [0.5, 0.9])
    expected = logits(model_from_checkpoint(resolve("aaa111:1")))
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    export(runner, "aaa111:1", full)
    export(runner, "best", half, "--half")
    assert half.stat().st_size < 0.6 * full.stat().st_size

    snippet = textwrap.dedent("""
        import json, sys
        import timm, torch
        from safetensors import safe_open
        from safetensors.torch import load_file

        out = {}
        for path in sys.argv[1:]:
            with safe_open(path, framework="pt") as f:
                meta = json.loads(f.metadata()["dermcam"])
            model = timm.create_model(meta["backbone"], num_classes=len(meta["classes"]), pretrained=False)
            model.load_state_dict(load_file(path))
            model.eval()
            torch.manual_seed(1)
            with torch.no_grad():
                out[path] = model(torch.randn(2, 3, 32, 32)).flatten().tolist()
        out["dermcam_imported"] = any(m.startswith("dermcam") for m in sys.modules)
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", snippet, str(full), str(half)], capture_output=True, text=True,
                          cwd=tmp_path, check=True)
    got = json.loads(proc.stdout)
    assert got["dermcam_imported"] is False
    assert got[str(full)] == pytest.approx(expected, abs=1e-5)
    assert got[str(half)] == pytest.approx(expected, abs=5e-2)


def test_load_exported_and_load_for_inference(runner, tmp_path: Path) -> None:
    make_run("aaa111", [0.5, 0.9])
    out = tmp_path / "m.safetensors"
    export(runner, "aaa111:1", out, "--bf16")
    model, info = load_exported(out)
    assert not model.training
    assert info["id"] == "m.safetensors" and info["source_id"] == "aaa111:1" and info["dtype"] == "bfloat16"
    assert info["classes"] == CLASSES and info["backbone"] == "test_efficientnet"
    assert info["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and len(info["sha256"]) == 64
    model2, info2 = load_for_inference(out)
    assert info2["sha256"] == info["sha256"]
    assert logits(model2) == pytest.approx(logits(model_from_checkpoint(resolve("aaa111:1"))), abs=0.1)


def test_export_refuses_a_damaged_checkpoint(runner, tmp_path: Path) -> None:
    run = make_run("aaa111", [0.5])
    weights = run / "epoch-0000.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = invoke(runner, "export", "aaa111:0", "-o", str(tmp_path / "x.safetensors"))
    assert result.exit_code == 4 and "sha256" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_export_from_one_store_restore_into_another(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_run("aaa111", [0.5, 0.9])
    expected = logits(model_from_checkpoint(resolve("aaa111:1")))
    out = tmp_path / "shared.safetensors"
    export(runner, "aaa111:1", out, "--half")

    monkeypatch.setenv("DERMCAM_HOME", str(tmp_path / "store-b"))
    result = invoke(runner, "restore", str(out), "--json")
    assert result.exit_code == 0, result.output
    imported = json.loads(result.stdout)
    assert imported["created"] and imported["source_id"] == "aaa111:1"
    rows = list_json(runner)
    assert [r["id"] for r in rows] == [imported["id"]]
    assert "imported" in rows[0]["flags"] and not rows[0]["resumable"]
    assert rows[0]["metrics"]["balanced_accuracy"] == 0.9 and rows[0]["dataset"] == "tiny"

    ckpt = resolve(imported["id"])
    assert ckpt.sidecar["imported"]["source_id"] == "aaa111:1"
    assert all(not v.is_floating_point() or str(v.dtype) == "torch.float32" for v in ckpt.load_weights().values())
    model, sidecar = load_for_inference(imported["id"])
    assert sidecar["classes"] == CLASSES
    assert logits(model) == pytest.approx(expected, abs=5e-2)
    assert invoke(runner, "verify").exit_code == 0

    twice = invoke(runner, "restore", str(out))
    assert twice.exit_code == 0 and "already in the store" in twice.stdout
    assert len(list_json(runner)) == 1
    not_resumable = invoke(runner, "restore", imported["id"], "--yes")
    assert not_resumable.exit_code == 2 and "imported" in not_resumable.stderr


def _bad_files(good: Path, folder: Path) -> dict[str, tuple[Path, int, str]]:
    """name -> (file, expected exit code, words of the message): every way an untrusted file can be wrong."""
    raw = good.read_bytes()
    header, data = split_file(good)
    files: dict[str, tuple[Path, int, str]] = {}

    def put(name: str, content: bytes, code: int, words: str) -> None:
        (folder / name).write_bytes(content)
        files[name] = (folder / name, code, words)

    def meta(name: str, code: int, words: str, **changes) -> None:
        files[name] = (with_meta(good, folder / name, **changes), code, words)

    def raw_header(name: str, new_header: dict, code: int, words: str) -> None:
        files[name] = (join_file(folder / name, new_header, data), code, words)

    put("empty.safetensors", b"", 2, "not a safetensors file")
    put("text.txt", b"just some text, not a model at all\n" * 4, 2, "not a dermcam export")
    put("truncated-data.safetensors", raw[: len(raw) - 100], 4, "truncated: 100 bytes")
    put("truncated-header.safetensors", raw[:40], 2, "truncated")
    put("huge-header.safetensors", struct.pack("<Q", MAX_HEADER_BYTES + 1) + raw[8:], 2, "limit")
    put("huge-claim.safetensors", struct.pack("<Q", 1 << 40) + raw[8:], 2, "limit")
    tampered = bytearray(raw)
    tampered[-5] ^= 0x55
    put("tampered-weights.safetensors", bytes(tampered), 4, "do not match the digest")
    meta("wrong-classes.safetensors", 4, "classifier.weight has shape", classes=["nv", "mel"])
    meta("wrong-backbone.safetensors", 4, "do not match backbone test_resnet", backbone="test_resnet")
    meta("unknown-backbone.safetensors", 2, "unknown backbone", backbone="no_such_net")
    meta("bad-types.safetensors", 4, "preprocessing.input_size", preprocessing={"input_size": "big"})
    meta("bad-classes.safetensors", 4, "'classes'", classes="nv,mel")
    meta("other-schema.safetensors", 2, "unsupported export schema", schema="dermcam.export/99")
    big = dict(header)
    big["__metadata__"] = {**header["__metadata__"], "dermcam": header["__metadata__"]["dermcam"][:-1]
                           + ', "pad": "' + "x" * (1 << 20) + '"}'}
    raw_header("huge-metadata.safetensors", big, 2, "metadata is over")
    raw_header("foreign.safetensors", {**header, "__metadata__": {"format": "pt"}}, 2, "not a dermcam export")
    raw_header("weights-copy.safetensors", {**header, "__metadata__": {"format": "pt", "dermcam": "dermcam.checkpoint/1"}},
               2, "weights file of a store checkpoint")
    renamed = {("head.bias" if k == "classifier.bias" else k): v for k, v in header.items()}
    raw_header("renamed.safetensors", renamed, 4, "unexpected ['head.bias']")
    return files


def test_restore_refuses_bad_files_and_leaves_the_store_unchanged(runner, tmp_path: Path) -> None:
    make_run("aaa111", [0.5, 0.9])
    good = tmp_path / "good.safetensors"
    export(runner, "aaa111:1", good)
    invoke(runner, "restore", "aaa111:1", "--yes")  # leave the store as a user would have it
    before = snapshot(home())
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, (path, code, words) in _bad_files(good, bad).items():
        result = invoke(runner, "restore", str(path))
        assert result.exit_code == code, (name, result.output)
        assert words in result.stderr, (name, result.stderr)
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, (name, result.stderr)
        assert "Traceback" not in result.output
        assert snapshot(home()) == before, name
    # the same checks guard inference on an exported file
    with pytest.raises(CorruptError, match="digest"):
        load_exported(bad / "tampered-weights.safetensors")
    with pytest.raises(CorruptError, match="truncated"):
        load_for_inference(bad / "truncated-data.safetensors")
    with pytest.raises(BadInputError, match="not a dermcam export"):
        load_for_inference(bad / "foreign.safetensors")

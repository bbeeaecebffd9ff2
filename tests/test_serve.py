"""dermcam serve: the API through FastAPI's TestClient, the batcher, the command's checks, and one real server.

What a user of the API sees is tested: status codes, one-line JSON errors, the numbers (equal to
``dermcam explain --json`` on the same file and checkpoint), and that the server keeps answering after
every kind of bad input.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermcam.cli import app as cli_app
from test_explain_cli import CLASSES, INPUT
from test_explain_cli import checkpoint as explain_checkpoint  # noqa: F401  (a fixture)

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'dermcam[serve]'")
pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

TOKEN = "t0ken-with-enough-characters"
LOCAL = "http://127.0.0.1"


# --- a checkpoint, images, an app ----------------------------------------------------------------------

@pytest.fixture
def checkpoint(explain_checkpoint: dict) -> str:  # noqa: F811  (a fixture of the imported fixture)
    """explain's test checkpoint (a random test_efficientnet), calibrated, with an operating point on mel
    whose threshold is low enough that the decision often differs from the argmax, and a metric that
    could not be computed (NaN: JSON has none)."""
    from dermcam.store.checkpoint import annotate_checkpoint
    from dermcam.store.references import find_checkpoint

    annotate_checkpoint(find_checkpoint("c0ffee:0").checkpoint, {
        "dataset": {"name": "synth"}, "metrics": {"balanced_accuracy": 0.5, "auc_mel": float("nan")},
        "calibration": {"method": "temperature", "temperature": 1.7},
        "operating_point": {"class": "mel", "metric": "sensitivity", "target": 0.9, "threshold": 0.3}})
    return "c0ffee:0"


def photo_bytes(size: tuple[int, int] = (90, 60), seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A 100-byte PNG whose header claims 400 megapixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def make_app(ref: str, **options):
    from dermcam.serve.app import build_app
    from dermcam.serve.model import ServedModel
    from dermcam.serve.settings import serve_settings

    return build_app(ServedModel.load(ref, device="cpu"), serve_settings(**options))


@pytest.fixture
def client(checkpoint: str):
    with TestClient(make_app(checkpoint), base_url=LOCAL) as test_client:
        yield test_client


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "image/jpeg")) for name, data in items]


def one_line_error(response) -> str:
    """The error of a response that must be one line of JSON, ``{"error": "..."}``, with no traceback."""
    text = response.text
    assert "\n" not in text.strip() and "Traceback" not in text, text
    body = json.loads(text)
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    return body["error"]


# --- the numbers: the same as dermcam explain --------------------------------------------------------------

def test_predictions_equal_explain_json(runner, checkpoint, client, tmp_path) -> None:
    images = {"a.jpg": photo_bytes((90, 60), 0), "b.png": photo_bytes((50, 70), 1, "PNG"),
              "c.jpg": photo_bytes((200, 150), 2)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    result = runner.invoke(cli_app, ["explain", *(str(tmp_path / n) for n in images), "-c", checkpoint, "--no-cam",
                                      "-o", str(tmp_path / "out"), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    explained = {Path(r["image"]).name: r for r in json.loads(result.stdout)["images"]}
    response = client.post("/v1/predict", files=files(*images.items()))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["id"] == checkpoint and body["classes"] == CLASSES
    assert body["calibration"]["temperature"] == 1.7 and body["operating_point"]["class"] == "mel"
    assert [r["name"] for r in body["images"]] == list(images)
    for served in body["images"]:
        expected = explained[served["name"]]
        np.testing.assert_allclose([served["probabilities"][c] for c in CLASSES],
                                   [expected["probabilities"][c] for c in CLASSES], atol=1e-5)
        assert served["decision"] == expected["decision"] and served["predicted"] == expected["predicted"]
        assert served["operating_point"] == expected["operating_point"]
        assert "threshold 0.300" in served["operating_point"]
        assert served["cam"] is None


def test_cam_overlay_is_explains_overlay(runner, checkpoint, client, tmp_path) -> None:
    data = photo_bytes((480, 320), 3)  # overlays of photos 480 to 1024 pixels wide are drawn at their size
    (tmp_path / "x.jpg").write_bytes(data)
    assert runner.invoke(cli_app, ["explain", str(tmp_path / "x.jpg"), "-c", checkpoint, "-o", str(tmp_path / "out"),
                                   "--device", "cpu"]).exit_code == 0
    response = client.post("/v1/predict", params={"cam": "1"}, files=files(("x.jpg", data)))
    assert response.status_code == 200, response.text
    image = response.json()["images"][0]
    cam = image["cam"]
    assert cam["method"] == "gradcam" and cam["layer"] == "bn2" and cam["target"] == image["decision"]
    overlay = Image.open(io.BytesIO(base64.b64decode(cam["png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (480, 320) == (cam["width"], cam["height"])
    expected = np.asarray(Image.open(tmp_path / "out" / "x.cam.png"), dtype=np.float32)
    assert np.abs(np.asarray(overlay.convert("RGB"), dtype=np.float32) - expected).mean() < 0.5


@pytest.mark.parametrize("size, overlay", [((2400, 1800), (1024, 768)), ((90, 60), (540, 360)),
                                           ((300, 1000), (300, 1000))])
def test_overlays_are_shrunk_to_1024_and_small_ones_enlarged(client, size, overlay) -> None:
    """A 2400 px photo is not sent back whole; a 90 px one is enlarged by a whole factor so the legend reads."""
    response = client.post("/v1/predict?cam=true", files=files(("photo.jpg", photo_bytes(size, 4))))
    assert response.status_code == 200, response.text
    cam = response.json()["images"][0]["cam"]
    assert (cam["width"], cam["height"]) == overlay


def test_the_model_card(client) -> None:
    card = client.get("/v1/model").json()
    assert card["id"] == "c0ffee:0" and card["classes"] == CLASSES and card["input_size"] == [3, INPUT, INPUT]
    assert card["calibration"]["described"] == "temperature 1.7"
    assert card["operating_point"] == {"class": "mel", "metric": "sensitivity", "target": 0.9, "threshold": 0.3}
    assert card["dataset"] == {"name": "synth"} and card["metrics"] == {"balanced_accuracy": 0.5, "auc_mel": None}
    assert card["dermcam_version"] and "not a medical device" in card["disclaimer"]
    assert card["stats"]["batches"] == 0 and card["cam"] == {"method": "gradcam", "layer": "bn2"}
    assert client.get("/healthz").json() == {"status": "ok", "model": "c0ffee:0"}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(paths) and client.get("/docs").status_code == 200


def test_an_exported_file_is_served_like_its_checkpoint(runner, checkpoint, client, tmp_path) -> None:
    exported = tmp_path / "model.safetensors"
    assert runner.invoke(cli_app, ["ckpt", "export", checkpoint, "-o", str(exported)]).exit_code == 0
    data = files(("a.jpg", photo_bytes()))
    with TestClient(make_app(str(exported)), base_url=LOCAL) as other:
        served = other.post("/v1/predict", files=data).json()["images"][0]
    assert served["probabilities"] == pytest.approx(client.post("/v1/predict", files=data).json()["images"][0]
                                                    ["probabilities"], abs=1e-5)


def test_an_ensemble_is_served_as_explain_explains_it(runner, checkpoint, tmp_path) -> None:
    """``ensemble:NAME``: the mean of the members' calibrated probabilities, the mean of their maps."""
    import timm
    import torch

    from dermcam.store.checkpoint import save_checkpoint
    from dermcam.store.ensembles import new_manifest, save_ensemble
    from dermcam.store.references import find_checkpoint, resolve

    first = find_checkpoint(checkpoint).checkpoint
    torch.manual_seed(1)
    other = timm.create_model("test_efficientnet", num_classes=len(CLASSES))
    save_checkpoint(first.run_dir, epoch=1, model_state=other.state_dict(),
                    sidecar={k: first.sidecar[k] for k in ("backbone", "classes", "preprocessing", "monitor")})
    save_ensemble(new_manifest("pair", [resolve(checkpoint), resolve("c0ffee:1")], [1.0, 1.0]))
    data = photo_bytes((480, 320), 6)
    (tmp_path / "x.jpg").write_bytes(data)
    result = runner.invoke(cli_app, ["explain", str(tmp_path / "x.jpg"), "-c", "ensemble:pair", "--device", "cpu",
                                      "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    expected = json.loads(result.stdout)["images"][0]
    with TestClient(make_app("ensemble:pair"), base_url=LOCAL) as client:
        assert client.get("/v1/model").json()["kind"] == "ensemble"
        served = client.post("/v1/predict?cam=1", files=files(("x.jpg", data))).json()["images"][0]
    assert served["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    assert served["decision"] == expected["decision"] == served["cam"]["target"]
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(served["cam"]["png_base64"]))), dtype=np.float32)
    assert np.abs(overlay - np.asarray(Image.open(tmp_path / "out" / "x.cam.png"), dtype=np.float32)).mean() < 0.5


# --- bad input: a 4xx with one line of JSON, and the server goes on -------------------------------------------

BAD = {
    "not an image": (lambda c: c.post("/v1/predict", files=files(("a.jpg", b"this is text"))), 400, "not an image"),
    "empty file": (lambda c: c.post("/v1/predict", files=files(("a.jpg", b""))), 400, "empty file"),
    "truncated jpeg": (lambda c: c.post("/v1/predict", files=files(("t.jpg", photo_bytes((300, 200))[:400]))), 400,
                       "t.jpg"),
    "decompression bomb": (lambda c: c.post("/v1/predict", files=files(("bomb.png", png_bomb()))), 400,
                           "decompression bomb"),
    "one bad file among good ones": (lambda c: c.post("/v1/predict", files=files(("ok.jpg", photo_bytes()),
                                                                                 ("bad.jpg", b"nope"))),
                                     400, "bad.jpg"),
    "body over the cap": (lambda c: c.post("/v1/predict", files=files(("big.jpg", b"x" * (3 << 20)))), 413,
                          "over the 1 MB limit"),
    "wrong content type": (lambda c: c.post("/v1/predict", json={"image": "a.jpg"}), 415, "multipart/form-data"),
    "no content type": (lambda c: c.post("/v1/predict", content=b"raw bytes"), 415, "multipart/form-data"),
    "missing file field": (lambda c: c.post("/v1/predict", files=[("image", ("a.jpg", photo_bytes(), "image/jpeg"))]),
                           422, "body file: Field required"),
    "a text field, not a file": (lambda c: c.post("/v1/predict", data={"file": "a.jpg"},
                                                  files=[("other", ("a.jpg", b"x", "image/jpeg"))]), 422, "file"),
    "broken multipart": (lambda c: c.post("/v1/predict", content=b"--x\r\nnonsense",
                                          headers={"content-type": "multipart/form-data"}), 400, ""),
    "malformed query": (lambda c: c.post("/v1/predict?cam=maybe", files=files(("a.jpg", photo_bytes()))), 422,
                        "query cam"),
    "too many files": (lambda c: c.post("/v1/predict", files=files(*[(f"{i}.jpg", b"x") for i in range(5)])), 413,
                       "5 files in one request; at most 4"),
    "unknown path": (lambda c: c.get("/v2/predict"), 404, "no such path: /v2/predict"),
    "wrong method": (lambda c: c.get("/v1/predict"), 405, "GET is not allowed on /v1/predict"),
    "bad content length": (lambda c: c.post("/v1/predict", content=b"abc", headers={"content-length": "-1"}), 400,
                           "Content-Length"),
    "a content length of other digits": (lambda c: c.post("/v1/predict", content=b"abc",
                                                          headers={"content-length": b"\xb2"}), 400, "Content-Length"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_4xx_with_one_line_of_json_and_the_server_goes_on(checkpoint, name: str) -> None:
    send, status, words = BAD[name]
    with TestClient(make_app(checkpoint, max_upload_mb=1, max_files=4), base_url=LOCAL) as client:
        response = send(client)
        assert response.status_code == status, response.text
        assert words in one_line_error(response)
        again = client.post("/v1/predict", files=files(("ok.jpg", photo_bytes())))
        assert again.status_code == 200, again.text


def test_the_body_cap_is_enforced_while_the_body_is_read(checkpoint) -> None:
    """A body without a Content-Length (chunked) is stopped at the cap, not read to its end: the app is
    driven through ASGI directly, since the test client buffers a body before the app sees it."""
    app = make_app(checkpoint, max_upload_mb=1)
    received: list[int] = []
    sent: list[dict] = []
    chunk = b"x" * (256 * 1024)

    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'

    async def receive() -> dict:
        body = chunk if received else head + chunk  # one file part that goes on and on
        received.append(len(body))
        return {"type": "http.request", "body": body, "more_body": len(received) < 200}  # 50 MB offered

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"multipart/form-data; boundary=b")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body == {"error": "the request body is over the 1 MB limit (--max-upload-mb)"}
    assert sum(received) <= (1 << 20) + len(head) + len(chunk)  # stopped at the cap


def test_a_bug_is_a_500_without_a_traceback_and_the_server_goes_on(checkpoint) -> None:
    app = make_app(checkpoint)
    served = app.state.served
    real = served.predict
    served.predict = lambda uploads: 1 / 0
    app.state.batcher._run_batch = served.predict
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        response = client.post("/v1/predict", files=files(("a.jpg", photo_bytes())))
        assert response.status_code == 500
        assert one_line_error(response) == ("internal error (ZeroDivisionError): a bug in dermcam; the server log has "
                                            "the details")
        app.state.batcher._run_batch = real
        assert client.post("/v1/predict", files=files(("a.jpg", photo_bytes()))).status_code == 200


# --- the token and the Host header ---------------------------------------------------------------------------

@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def test_with_a_token_every_request_but_the_page_needs_it(checkpoint, token_file) -> None:
    app = make_app(checkpoint, host="0.0.0.0", token_file=token_file)
    data = files(("a.jpg", photo_bytes()))
    with TestClient(app, base_url="http://lab-server.example:8000") as client:
        for method, path in [("GET", "/healthz"), ("GET", "/v1/model"), ("POST", "/v1/predict"), ("GET", "/docs"),
                             ("GET", "/openapi.json"), ("GET", "/nosuch")]:
            for headers in [{}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}]:
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert "Authorization: Bearer" in one_line_error(response)
                assert response.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/healthz", headers=good).status_code == 200
        assert client.post("/v1/predict", files=data, headers=good).status_code == 200
        assert client.get("/").status_code == 200  # the page itself: static, asks for the token


def test_without_a_token_only_loopback_names_are_answered(client) -> None:
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 must not reach the API."""
    for host in ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"]:
        assert client.get("/healthz", headers={"host": host}).status_code == 200, host
    for host in ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""]:
        response = client.get("/healthz", headers={"host": host})
        assert response.status_code == 400 and "127.0.0.1 or localhost only" in one_line_error(response)


def test_every_response_has_the_security_headers_and_the_page_a_strict_policy(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["x-content-type-options"] == "nosniff"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "'unsafe-inline'" not in policy and "connect-src 'self'" in policy
    assert client.get("/nosuch").headers["cache-control"] == "no-store"


def test_the_page_is_self_contained(client) -> None:
    """No CDN, no external font or script, server text inserted as text, the disclaimer shown."""
    html = client.get("/").text
    assert "http://" not in html and "https://" not in html and "@import" not in html and "src=\"//" not in html
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html
    assert "Research software, not a medical device, not for diagnosis." in html


# --- batching ---------------------------------------------------------------------------------------------------

def test_the_batcher_batches_keeps_order_runs_calls_on_its_thread_and_reports_errors() -> None:
    from dermcam.serve.batching import MicroBatcher

    seen: list[int] = []
    threads: set[int] = set()

    def run_batch(items: list[int]) -> list[int]:
        threads.add(threading.get_ident())
        seen.append(len(items))
        if -1 in items:
            raise ValueError("bad item")
        return [i * 10 for i in items]

    batcher = MicroBatcher(run_batch, max_batch=4, max_wait_s=0.2)
    futures = [batcher.submit(i) for i in range(10)]
    assert [f.result(timeout=10) for f in futures] == [i * 10 for i in range(10)]
    assert seen == [4, 4, 2]
    call = batcher.call(threading.get_ident)
    assert call.result(timeout=10) in threads and len(threads) == 1
    failed = [batcher.submit(-1), batcher.submit(3)]
    for future in failed:
        with pytest.raises(ValueError, match="bad item"):
            future.result(timeout=10)
    assert batcher.submit(5).result(timeout=10) == 50  # the worker goes on after a failed batch
    stats = batcher.stats()
    assert stats["largest_batch"] == 4 and stats["images"] == 13 and stats["cam_calls"] == 1
    batcher.stop()


def test_concurrent_requests_form_batches_with_the_same_answers(checkpoint) -> None:
    import httpx2 as httpx

    images = [(f"{i}.jpg", photo_bytes((90, 60), i)) for i in range(8)]
    app = make_app(checkpoint, max_batch=8, max_wait_ms=300)
    with TestClient(app, base_url=LOCAL) as client:
        sequential = [client.post("/v1/predict", files=files(image)).json()["images"][0] for image in images]
        before = client.get("/v1/model").json()["stats"]
    assert before["largest_batch"] == 1 and before["batches"] == 8

    async def together() -> list[dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as client:
            responses = await asyncio.gather(*(client.post("/v1/predict", files=files(image)) for image in images))
            return [r.json()["images"][0] for r in responses]

    concurrent = asyncio.run(together())
    stats = app.state.batcher.stats()
    app.state.batcher.stop()
    assert stats["largest_batch"] > 1 and stats["batches"] < 16, stats
    for one, other in zip(sequential, concurrent):
        assert one["name"] == other["name"] and one["decision"] == other["decision"]
        assert one["probabilities"] == pytest.approx(other["probabilities"], abs=1e-5)


# --- the command: checks before any work -------------------------------------------------------------------------

def serve_cli(runner, *args: str):
    return runner.invoke(cli_app, ["serve", *args], env={"COLUMNS": "200"})


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, code, words", [
    (["--host", "0.0.0.0"], 2, "--host 0.0.0.0 lets other machines connect, so it needs --token-file"),
    (["--host", "192.168.1.10"], 2, "needs --token-file"),
    (["--host", "0.0.0.0", "--token-file", "missing.txt"], 3, "--token-file missing.txt: no such file"),
    (["--port", "65536"], 2, "--port must be a whole number from 0 to 65535"),
    (["--max-batch", "0"], 2, "--max-batch must be"),
    (["--max-wait-ms", "-1"], 2, "--max-wait-ms must be"),
    (["--max-upload-mb", "0"], 2, "--max-upload-mb must be"),
    (["--max-files", "100000"], 2, "--max-files must be"),
    (["--threads", "0"], 2, "--threads must be"),
    (["--host", ""], 2, "--host is empty"),
    (["--host", "local host"], 2, "without spaces"),
    (["nosuch:3"], 3, "no run 'nosuch'"),
])
def test_bad_options_are_one_line_before_any_work(runner, checkpoint, tmp_path, monkeypatch, args, code, words) -> None:
    monkeypatch.chdir(tmp_path)
    result = serve_cli(runner, *args, "--port", "0") if "--port" not in args else serve_cli(runner, *args)
    assert result.exit_code == code, result.output
    assert words in error_line(result)


@pytest.mark.parametrize("content, words", [("", "is empty"), ("   \n", "is empty"), ("a" * 20 + "\nb" * 2, "one line"),
                                            ("short\n", "the token has 5 characters; use at least 16"),
                                            ("has a space in it, long enough\n", "visible ASCII")])
def test_a_token_file_must_hold_one_good_line(runner, checkpoint, tmp_path, content: str, words: str) -> None:
    (tmp_path / "token").write_text(content)
    result = serve_cli(runner, "--host", "0.0.0.0", "--port", "0", "--token-file", str(tmp_path / "token"))
    assert result.exit_code == 2 and words in error_line(result)


def test_a_port_in_use_is_one_line(runner, checkpoint) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_cli(runner, checkpoint, "--port", str(port))
    assert result.exit_code == 2
    assert error_line(result) == f"Error: port {port} on 127.0.0.1 is in use (another server?); choose one with --port"


def test_a_damaged_model_is_exit_4_before_listening(runner, checkpoint, dermcam_home, monkeypatch) -> None:
    """The port is bound first (a port in use fails fast) but listens only once the model loaded: while
    the damaged model is read, a connection to the port is refused."""
    from dermcam.serve import server
    from dermcam.serve.model import ServedModel

    weights = dermcam_home / "runs" / "c0ffee" / "epoch-0000.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    ports: list[int] = []
    refused: list[bool] = []
    real_bind, real_load = server.bind, ServedModel.load.__func__

    def watched_bind(host: str, port: int) -> socket.socket:
        sock = real_bind(host, port)
        ports.append(sock.getsockname()[1])
        return sock

    def watched_load(cls, *args, **kwargs):
        with socket.socket() as probe:
            refused.append(probe.connect_ex(("127.0.0.1", ports[0])) != 0)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(server, "bind", watched_bind)
    monkeypatch.setattr(ServedModel, "load", classmethod(watched_load))
    result = serve_cli(runner, checkpoint, "--port", "0", "--device", "cpu")
    assert result.exit_code == 4, result.output
    assert "damaged or modified" in error_line(result) and refused == [True]


def test_an_onnx_file_is_not_served_yet(runner, tmp_path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    result = serve_cli(runner, str(tmp_path / "model.onnx"))
    assert result.exit_code == 2 and "serving an ONNX model is not supported yet" in error_line(result)


def test_without_the_extra_the_command_names_it(runner, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = serve_cli(runner)
    assert result.exit_code == 2
    assert error_line(result) == ("Error: dermcam serve needs the 'serve' extra (uvicorn missing): "
                                  "pip install 'dermcam[serve]'")


def test_help_imports_neither_torch_nor_the_web_framework() -> None:
    """``python -X importtime`` lists every module the help imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dermcam", "serve", "--help"],
                          capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"})
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "dermcam" in imported and not imported & {"torch", "timm", "fastapi", "uvicorn", "starlette"}
    assert "--token-file" in proc.stdout and "--max-batch" in proc.stdout


def test_only_the_serve_package_imports_the_web_framework() -> None:
    source = Path(__file__).resolve().parents[1] / "src" / "dermcam"
    users = sorted(str(p.relative_to(source)) for p in source.rglob("*.py")
                   if any(f"import {m}" in p.read_text() or f"from {m}" in p.read_text()
                          for m in ("fastapi", "uvicorn", "starlette")))
    assert users == ["serve/app.py", "serve/server.py"]


# --- the real command ---------------------------------------------------------------------------------------------

def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """``dermcam serve ARGS --port 0`` in a real process; (process, its URL) once it answers /healthz."""
    proc = subprocess.Popen([sys.executable, "-m", "dermcam", "serve", *args, "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    line = proc.stdout.readline() if proc.stdout else ""
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"no URL announced: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    url = line[line.index("http://"):].split()[0]
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=5) as response:
                assert response.status == 200
                return proc, url
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                proc.kill()
                raise


@pytest.mark.slow
def test_the_real_server_answers_and_stops_on_ctrl_c(checkpoint, client) -> None:
    data = photo_bytes((90, 60), 5)
    expected = client.post("/v1/predict", files=files(("a.jpg", data))).json()["images"][0]
    proc, url = start_server(checkpoint, "--threads", "1")
    try:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "healthz", timeout=10) as response:
            assert json.loads(response.read()) == {"status": "ok", "model": checkpoint}
        with urllib.request.urlopen(url + "v1/model", timeout=10) as response:
            assert json.loads(response.read())["threads"] == 1
        body, kind = multipart("a.jpg", data)
        request = urllib.request.Request(url + "v1/predict", data=body, headers={"Content-Type": kind})
        with urllib.request.urlopen(request, timeout=30) as response:
            served = json.loads(response.read())["images"][0]
        assert served["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
        junk, kind = multipart("x.jpg", b"junk")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url + "v1/predict", data=junk,
                                                          headers={"Content-Type": kind}), timeout=30)
        assert refused.value.code == 400
        assert json.loads(refused.value.read()) == {"error": "x.jpg: not an image Pillow can read"}
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr
        assert "Interrupted." in stderr and "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

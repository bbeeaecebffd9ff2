"""The ASGI app of ``dermcam serve``: the page, the versioned API, and the rules every request meets.

Routes: ``GET /`` (the page, :mod:`dermcam.serve.page`), ``POST /v1/predict``, ``GET /v1/model``,
``GET /healthz``, and FastAPI's generated ``/docs`` and ``/openapi.json``. ``/v1/predict`` also takes the
optional form fields ``age``, ``sex`` and ``site`` (once for every image, or once per image) for a model
trained with patient metadata (:func:`dermcam.serve.model.form_rows`).

Every error is one line of JSON, ``{"error": "..."}``, with a 4xx status for anything a client sent
wrong (not an image, a truncated or empty file, a decompression bomb, a body over the cap, a wrong
content type, an unknown path, a malformed query, too many files): the framework's own validation and
HTTP errors are rendered that way too. A 500 means a bug in dermcam; its response names the exception
type and never carries a traceback (the server's log has it).

Two ASGI middlewares run before any route: :class:`Guard` (the ``Host`` header and the bearer token,
:mod:`dermcam.serve.settings`) and :class:`BodyLimit`, which counts the bytes of a request body as
they arrive and stops at ``--max-upload-mb`` with a 413, so a 50 MB upload is refused after 20 MB
have been read, not after all of it was buffered.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dermcam import __version__
from dermcam.errors import DermcamError, ExitCode, first_line
from dermcam.serve.batching import MicroBatcher
from dermcam.serve.model import Answer, ServedModel, Upload, form_rows, read_upload, upload_name
from dermcam.serve.settings import ServeSettings

log = logging.getLogger("dermcam.serve")

FIELD = "file"  # the multipart field that carries the images (repeat it for several)
PUBLIC = {("GET", "/"), ("HEAD", "/")}  # the page: static, the same for everyone, no data in it
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store")]
STATUS_OF = {ExitCode.BAD_INPUT: 400, ExitCode.NOT_FOUND: 404}  # other library errors: a bug here, 500


# -- what the API returns (for the OpenAPI page; the handlers build plain dicts) ----------------------

class Cam(BaseModel):
    method: str = Field(description="CAM method (gradcam)")
    layer: str = Field(description="the layer explained (an ensemble: each member's)")
    target: str = Field(description="the class explained: the decision")
    width: int
    height: int
    png_base64: str = Field(description="the overlay PNG (photo at most 1024 px on its longer side), base64")


class ImageMetadata(BaseModel):
    fields: list[str] = Field(description="the metadata fields the model reads (age, sex, site)")
    known: list[str] = Field(description="those this image was given a usable value for (a site the model never "
                                         "saw is unknown)")
    answered: str = Field(description="in words: 'answered with age, site (sex unknown)', 'answered without "
                                      "metadata'")
    source: str | None = Field(default=None, description="'form' when fields were sent, else null")


class ImageResult(BaseModel):
    name: str = Field(description="the uploaded file's name (or 'image N')")
    predicted: str = Field(description="the most probable class")
    decision: str = Field(description="the operating point's decision (the most probable class without one)")
    operating_point: str | None = Field(description="what the operating point made of this image, e.g. "
                                                    "'mel: above threshold 0.231'")
    probabilities: dict[str, float] = Field(description="calibrated probability per class (6 decimals)")
    cam: Cam | None = Field(default=None, description="with cam=1: the Grad-CAM overlay")
    metadata: ImageMetadata | None = Field(default=None, description="a model that reads patient metadata (or "
                                                                     "fields sent to one that does not): what it "
                                                                     "read for this image")


class Prediction(BaseModel):
    model: dict[str, Any] = Field(description="what identifies the weights: id, sha256, backbone (members)")
    classes: list[str]
    calibration: dict[str, Any] | None
    operating_point: dict[str, Any] | None
    images: list[ImageResult]


class Error(BaseModel):
    error: str = Field(description="what was wrong, one line")


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Error, "description": text} for code, text in (
    (400, ("an image that cannot be used (not an image, empty, truncated, over the pixel cap), or a bad "
           "age, sex or site field")),
    (401, "missing or wrong bearer token (servers started with --token-file)"),
    (413, "request body over --max-upload-mb, or more files than --max-files"),
    (415, "not multipart/form-data"), (422, "a malformed query or form"))}


# -- errors: one line of JSON, always -----------------------------------------------------------------

def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": message}`` (JSON escapes any line break, so the body is one line)."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """``query cam: Input should be a valid boolean`` from the framework's list of errors."""
    parts = []
    for error in exc.errors()[:3]:
        where = " ".join(str(p) for p in error.get("loc", ()))
        hint = f" (send each image as the multipart field '{FIELD}')" if where == f"body {FIELD}" else ""
        parts.append(f"{where}: {error.get('msg', 'invalid')}{hint}")
    return "; ".join(parts) or "invalid request"


def _http_message(request: Request, exc: HTTPException) -> str:
    path = request.url.path[:100]
    if exc.status_code == 404 and exc.detail == "Not Found":
        return f"no such path: {path} (the API: POST /v1/predict, GET /v1/model, GET /healthz; docs at /docs)"
    if exc.status_code == 405:
        return f"{request.method} is not allowed on {path}"
    return str(exc.detail)


def install_error_handlers(app: FastAPI) -> None:
    """Framework errors, library errors and bugs, each as one line of JSON."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, _http_message(request, exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc))

    @app.exception_handler(DermcamError)
    async def dermcam_error(request: Request, exc: DermcamError) -> JSONResponse:
        status = STATUS_OF.get(exc.exit_code, 500)
        if status == 500:
            log.error("dermcam error while answering %s: %s", request.url.path, exc)
        return error_response(status, first_line(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:  # the server's log has the traceback
        return error_response(500, f"internal error ({type(exc).__name__}): a bug in dermcam; the server log "
                                   "has the details")


# -- the two middlewares --------------------------------------------------------------------------------

async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                  headers: dict[str, str] | None = None) -> None:
    await error_response(status, message, headers)(scope, receive, send)


class Guard:
    """Who may ask: the ``Host`` header must name this server as settings allow, and with a token every
    request but the page must carry ``Authorization: Bearer <token>`` (compared in constant time).
    Adds the security headers to every response."""

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings
        self.token = settings.token.encode("ascii") if settings.token is not None else None

    def authorized(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        given = value.strip().encode("ascii", "replace")
        return self.token is not None and scheme.lower() == "bearer" and hmac.compare_digest(given, self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.settings.allowed_host(host):
            await _refuse(scope, receive, secured, 400, f"this server answers requests to 127.0.0.1 or localhost "
                                                        f"only, not to host {host[:80]!r}")
            return
        public = (scope["method"], scope["path"]) in PUBLIC
        if self.token is not None and not public and not self.authorized(headers.get("authorization")):
            await _refuse(scope, receive, secured, 401, "missing or wrong token: send the header "
                          "'Authorization: Bearer <token>' with the token of the server's --token-file",
                          {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, secured)


class BodyLimit:
    """At most ``max_bytes`` of request body: a larger Content-Length is refused before anything is
    read, and a body without one (chunked) is counted as it arrives and stopped at the cap (413)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"the request body is over the {max_bytes // (1024 * 1024)} MB limit (--max-upload-mb)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and not re.fullmatch(r"\s*[0-9]{1,19}\s*", length):  # ASCII digits only ('²' is a digit)
            await _refuse(scope, receive, send, 400, "bad Content-Length header")
            return
        if length is not None and int(length) > self.max_bytes:
            await _refuse(scope, receive, send, 413, self.message)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message)  # the route's body parser passes it on as it is
            return message

        await self.app(scope, counted, send)


# -- the page -------------------------------------------------------------------------------------------

def page() -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy: nothing from elsewhere, and only the page's own
    inline script and style run (allowed by their hashes, so an injected one would not)."""
    html = resources.files("dermcam.serve").joinpath("page/index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return html, csp


# -- the app --------------------------------------------------------------------------------------------

def require_multipart(request: Request) -> None:
    """415 for a body that is not multipart/form-data, before the form is looked at."""
    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith("multipart/form-data"):
        raise HTTPException(415, f"send the images as multipart/form-data (field '{FIELD}'), not "
                                 f"{kind[:60] or 'a body without a content type'}")


def build_app(served: ServedModel, settings: ServeSettings) -> FastAPI:
    """The app for one loaded model. Its batcher's worker starts with the app (lifespan) and stops with
    it; ``app.state.batcher.stats()`` (also in ``GET /v1/model``) counts the batches it ran."""
    batcher: MicroBatcher[Upload, Answer] = MicroBatcher(served.predict, max_batch=settings.max_batch,
                                                          max_wait_s=settings.max_wait_ms / 1000)
    html, csp = page()
    card = served.card()
    identity = served.identity()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="dermcam", version=__version__, lifespan=lifespan,
                  description="Predictions and Grad-CAM overlays of one dermoscopy model. " + card["disclaimer"])
    app.state.batcher = batcher
    app.state.served = served
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(Guard, settings=settings)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": csp, "X-Frame-Options": "DENY"})

    @app.get("/healthz", summary="Liveness: the server is up and its model loaded")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "model": str(card.get("id"))}

    @app.get("/v1/model", summary="The served model: classes, input size, calibration, operating point, "
                                  "training data, metrics, version; batching statistics")
    async def model() -> dict[str, Any]:
        return {**card, "stats": batcher.stats()}

    @app.post("/v1/predict", response_model=Prediction, responses=ERRORS,
              summary="Calibrated class probabilities and the decision for one or more images",
              dependencies=[Depends(require_multipart)])
    async def predict(file: list[UploadFile] = File(..., description="one or more image files (repeat the field)"),
                      cam: bool = Query(False, description="also return the Grad-CAM overlay of each image's "
                                                           "decision, as a base64 PNG (slower: run one by one)"),
                      age: list[str] | None = Form(None, description="patient age in years, 0-120 (once, or once "
                                                                      "per file); empty: unknown"),
                      sex: list[str] | None = Form(None, description="female, male or unknown (once, or once per "
                                                                      "file)"),
                      site: list[str] | None = Form(None, description="anatomical site, e.g. back (once, or once "
                                                                       "per file); GET /v1/model lists the sites "
                                                                       "the model knows")
                      ) -> dict[str, Any]:
        if len(file) > settings.max_files:
            raise HTTPException(413, f"{len(file)} files in one request; at most {settings.max_files} (--max-files)")
        rows = form_rows(len(file), age, sex, site)  # checked before any image is decoded
        named = [(upload_name(f.filename, i), await f.read()) for i, f in enumerate(file)]
        uploads = await run_in_threadpool(
            lambda: [dataclasses.replace(read_upload(name, data, served.preprocessing, photo=cam), metadata=row)
                     for (name, data), row in zip(named, rows)])
        if cam:  # one by one on the model's thread; the overlays drawn beside it
            answers = []
            for upload in uploads:
                answer, cam_map = await asyncio.wrap_future(batcher.call(functools.partial(served.explain, upload)))
                answers.append(await run_in_threadpool(served.overlay, upload, answer, cam_map))
        else:
            answers = await asyncio.gather(*(asyncio.wrap_future(batcher.submit(u)) for u in uploads))
        return {"model": identity, "classes": served.classes, "calibration": card["calibration"],
                "operating_point": card["operating_point"], "images": [a.to_dict() for a in answers]}

    return app

"""``dermcam serve``: a local web page and HTTP API for one model (logic in :mod:`dermcam.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dermcam.cli.common import THREADS_OPTION, console, handle_errors, show_warnings
from dermcam.serve import require_extra
from dermcam.serve import settings as s


@handle_errors
def serve_command(
    model: Optional[str] = typer.Argument(None, metavar="[CKPT|ensemble:NAME|FILE]",
                                          help="Checkpoint id (RUN:EPOCH), run id, 'best', 'latest', an ensemble "
                                               "(ensemble:NAME) or an exported .safetensors file (default: best "
                                               "in the store)."),
    host: str = typer.Option(s.DEFAULT_HOST, "--host", help="Address to listen on. Anything but a loopback "
                                                             "address (127.0.0.1, ::1, localhost) needs --token-file."),
    port: int = typer.Option(s.DEFAULT_PORT, "--port", min=0, max=65535, help="Port (0: any free port)."),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda | cuda:N."),
    max_batch: int = typer.Option(s.DEFAULT_MAX_BATCH, "--max-batch", min=1, max=s.MAX_BATCH,
                                  help="Most images per forward pass when requests arrive together."),
    max_wait_ms: int = typer.Option(s.DEFAULT_MAX_WAIT_MS, "--max-wait-ms", min=0, max=s.MAX_WAIT_MS,
                                    help="Longest an image waits for others to join its batch."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", metavar="FILE",
                                              help="File holding a bearer token (one line, 16+ characters) that "
                                                   "every request must send; required off loopback."),
    max_upload_mb: int = typer.Option(s.DEFAULT_MAX_UPLOAD_MB, "--max-upload-mb", min=1, max=s.MAX_UPLOAD_MB,
                                      help="Largest request body; larger ones get 413 while they are read."),
    max_files: int = typer.Option(s.DEFAULT_MAX_FILES, "--max-files", min=1, max=s.MAX_FILES,
                                  help="Most images in one request."),
    threads: str = THREADS_OPTION,
) -> None:
    """Serve a model: a web page to drop images on, and an HTTP API (POST /v1/predict) for other software.

    The model loads once; predictions equal 'dermcam explain --json' for the same file. Concurrent
    requests are batched. API documentation: http://HOST:PORT/docs. Ctrl-C stops the server (exit 130).

    Research software, not a medical device, not for diagnosis. Needs the serve extra:
    pip install 'dermcam\\[serve]'. See docs/serve.md.
    """
    require_extra()  # before anything else: the one line that names the extra
    settings = s.serve_settings(host=host, port=port, device=device, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                max_upload_mb=max_upload_mb, max_files=max_files, threads=threads,
                                token_file=token_file)
    show_warnings(w for w in [s.token_file_warning(token_file)] if w)
    from dermcam.serve.server import Started, serve

    def started(info: Started) -> None:
        show_warnings(info.warnings)
        console.print(f"Serving {info.model} ({info.backbone}; {', '.join(info.classes)}) on {info.device} at "
                      f"{info.url}", highlight=False, soft_wrap=True)
        console.print(f"API docs: {info.url}docs. Research software, not a medical device, not for diagnosis. "
                      "Ctrl-C stops.", highlight=False, soft_wrap=True)
        console.file.flush()

    serve(model, settings, on_started=started)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)

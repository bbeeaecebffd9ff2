"""``dermcam serve`` end to end: bind the port, load the model, listen, serve until Ctrl-C.

The order is what makes failures clear and cheap: the port is bound first (a port in use is one line,
exit 2, before the model's seconds of loading), then the model is loaded and validated (a damaged
file is exit 4, and nothing has listened yet), then the socket listens and the URL is announced:
a client that reads it can connect at once (connections wait in the backlog until uvicorn accepts
them). Ctrl-C stops uvicorn gracefully; uvicorn then raises the signal again, so the command ends as
every interrupted dermcam command does (exit 130).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dermcam.errors import BadInputError
from dermcam.serve import require_extra
from dermcam.serve.settings import ServeSettings

BACKLOG = 128
GRACEFUL_SHUTDOWN_S = 5  # open keep-alive connections do not hold Ctrl-C up longer than this


@dataclass(frozen=True)
class Started:
    """What the command announces once the server listens."""

    url: str
    model: str
    backbone: str
    classes: list[str]
    device: str
    warnings: list[str] = field(default_factory=list)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: any free one), not yet listening; a port in use or an
    address this machine does not have is one line (BadInputError)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BadInputError(f"--host {host}: not an address or name this machine can resolve ({exc.strerror})") \
            from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart at once
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BadInputError(f"port {port} on {host} is in use (another server?); choose one with --port") \
                from None
        raise BadInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(ref: str | Path | None, settings: ServeSettings, *, root: Path | None = None,
          on_started: Callable[[Started], None] = lambda started: None) -> None:
    """Serve ``ref`` (anything ``explain -c`` takes; default: the store's best) until interrupted.

    Raises BadInputError (2: the extra missing, a port in use), NotFoundError (3), CorruptError (4)
    before listening; KeyboardInterrupt after a graceful stop on Ctrl-C.
    """
    require_extra()
    import uvicorn

    from dermcam.serve.app import build_app
    from dermcam.serve.model import ServedModel

    sock = bind(settings.host, settings.port)
    try:
        from dermcam.models.device import apply_threads

        apply_threads(settings.threads)  # before the model exists: oneDNN sizes its pools on first use
        served = ServedModel.load(ref, device=settings.device, root=root)
        app = build_app(served, settings)
        sock.listen(BACKLOG)
        on_started(Started(url_of(sock), str(served.identity().get("id")), str(served.sidecar.get("backbone")),
                           served.classes, str(served.device), served.warnings))
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", ws="none",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()

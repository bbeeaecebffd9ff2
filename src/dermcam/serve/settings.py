"""What ``dermcam serve`` is started with, checked before the model loads or a port is bound.

One function, :func:`serve_settings`, checks every value (ranges, the host, the token file) for the
command line and for Python callers alike, so a bad value is one line and exit code 2 (3 for a token
file that does not exist) before any work. Standard library only: the CLI imports this module for its
defaults, and ``dermcam --help`` must not pay for the web framework.

Security rules (docs/serve.md):

- The server binds 127.0.0.1 by default. A loopback address (127.0.0.1, ::1, localhost) is reachable
  only from this machine; any other address (0.0.0.0, a LAN address) needs ``--token-file``, and then
  every request but the static page must send ``Authorization: Bearer <token>``.
- The token is read from a file, never from the command line (where ``ps`` and shell histories show it):
  one line of at least :data:`MIN_TOKEN_LENGTH` visible ASCII characters.
- Without a token the server answers only requests addressed to a loopback name (the ``Host`` header),
  so a web page elsewhere cannot reach it through DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import stat
from dataclasses import dataclass, field
from pathlib import Path

from dermcam.checks import check_int, check_text, check_threads, shown
from dermcam.errors import BadInputError, NotFoundError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 16  # images per forward pass
DEFAULT_MAX_WAIT_MS = 10  # how long the first queued image waits for others to join its batch
DEFAULT_MAX_UPLOAD_MB = 20  # request body cap; a dermatoscope JPEG is 1-10 MB
DEFAULT_MAX_FILES = 16  # images per request
MAX_BATCH = 1024
MAX_WAIT_MS = 1000
MAX_UPLOAD_MB = 1024
MAX_FILES = 256
MIN_TOKEN_LENGTH = 16
TOKEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE"
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServeSettings:
    """Checked settings of one server (build them with :func:`serve_settings`)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    device: str = "auto"
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: int = DEFAULT_MAX_WAIT_MS
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    max_files: int = DEFAULT_MAX_FILES
    threads: int | str = "auto"  # torch's intra-op threads, or auto: the cores not busy (models.device.resolve_threads)
    token: str | None = field(default=None, repr=False)  # never in a repr, a log or a traceback

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def local_only(self) -> bool:
        """Bound to a loopback address: only this machine can connect."""
        return is_loopback(self.host)

    def allowed_host(self, header: str) -> bool:
        """Whether a request's ``Host`` header may be answered: any with a token (the token is the
        guard), else only a loopback name or address, so that a page elsewhere cannot reach this
        server through a name it made resolve to 127.0.0.1 (DNS rebinding)."""
        if self.token is not None:
            return True
        name = header.strip().lower()
        if name.startswith("["):  # [::1]:8000
            name = name[1:].split("]", 1)[0]
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        return is_loopback(name)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``: an address other machines cannot connect to."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_settings(*, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "auto",
                   max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: int = DEFAULT_MAX_WAIT_MS,
                   max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB, max_files: int = DEFAULT_MAX_FILES,
                   threads: int | str = "auto", token_file: Path | str | None = None) -> ServeSettings:
    """Every option checked, the token read; a one-line :class:`BadInputError` (or
    :class:`NotFoundError` for a missing token file) naming the option otherwise."""
    check_text(host, "--host")
    check_text(device, "--device")
    if host.strip() != host or " " in host:
        raise BadInputError(f"--host {shown(host)} must be an address or a name without spaces")
    token = read_token(Path(check_text(str(token_file), "--token-file"))) if token_file is not None else None
    if token is None and not is_loopback(host):
        raise BadInputError(f"--host {host} lets other machines connect, so it needs --token-file FILE: a bearer "
                            f"token every request must send (make one with: {TOKEN_HINT})")
    return ServeSettings(host=host, port=check_int(port, "--port", 0, 65535), device=device,
                         max_batch=check_int(max_batch, "--max-batch", 1, MAX_BATCH),
                         max_wait_ms=check_int(max_wait_ms, "--max-wait-ms", 0, MAX_WAIT_MS),
                         max_upload_mb=check_int(max_upload_mb, "--max-upload-mb", 1, MAX_UPLOAD_MB),
                         max_files=check_int(max_files, "--max-files", 1, MAX_FILES),
                         threads=check_threads(threads),
                         token=token)


def read_token(path: Path) -> str:
    """The bearer token in ``path``: the file must exist and hold one line of at least
    :data:`MIN_TOKEN_LENGTH` visible ASCII characters (what an HTTP header carries unchanged)."""
    if not path.exists():
        raise NotFoundError(f"--token-file {path}: no such file")
    if not path.is_file():
        raise BadInputError(f"--token-file {path} is not a file")
    try:
        text = path.read_bytes().decode("ascii")
    except OSError as exc:
        raise BadInputError(f"--token-file {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise BadInputError(f"--token-file {path}: the token must be ASCII characters") from None
    lines = text.splitlines()
    if not text.strip():
        raise BadInputError(f"--token-file {path} is empty; write a token into it ({TOKEN_HINT})")
    if len(lines) != 1:
        raise BadInputError(f"--token-file {path} must hold the token on one line, not {len(lines)}")
    token = lines[0].strip()
    if not all(33 <= ord(c) <= 126 for c in token):
        raise BadInputError(f"--token-file {path}: the token must be visible ASCII characters without spaces")
    if len(token) < MIN_TOKEN_LENGTH:
        raise BadInputError(f"--token-file {path}: the token has {len(token)} characters; use at least "
                            f"{MIN_TOKEN_LENGTH} ({TOKEN_HINT})")
    return token


def token_file_warning(path: Path | str | None) -> str | None:
    """A line to show when the token file can be read by other users of this machine."""
    if path is None:
        return None
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"--token-file {path} can be read by other users of this machine (chmod 600 {path})"
    return None

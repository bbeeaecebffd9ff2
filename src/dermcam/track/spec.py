"""``--log`` values: ``tensorboard[:DIR]`` and ``mlflow[:TRACKING_URI]``, parsed, checked and masked.

Standard library only: option checks run this before any work, and ``dermcam --help`` never imports a
tracker. A value is checked for its form and for the extra that provides the tracker
(``dermcam[tensorboard]``, ``dermcam[mlflow]``), found without importing it.

Secrets: a tracking URI may hold a password (``https://user:PASSWORD@host``) or a token in its query.
Nothing that dermcam writes or prints may show it, so every value is stored and shown *masked*
(``https://user:***@host``); the real value is kept in this process's memory only, keyed by its masked
form (:func:`reveal`), so the runs of one command (a grid, the folds of a cross-validation) still reach
the server. A later process (``train --resume``, ``evaluate``) gets the credentials the way MLflow
documents it, from ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``/``MLFLOW_TRACKING_TOKEN``,
or from ``--log`` given again.
"""

from __future__ import annotations

import importlib.util
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from dermcam.errors import BadInputError

KINDS = ("tensorboard", "mlflow")
# kind -> (the module that must be importable, the extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "dermcam[tensorboard]"), "mlflow": ("mlflow", "dermcam[mlflow]")}
MASK = "***"
MAX_TARGET = 2000  # characters of a DIR or URI
# Query parameters whose value is a secret (a token in the URI: ?token=..., ?X-Amz-Signature=...).
_SECRET_PARAM = re.compile(r"token|pass|pwd|secret|key|auth|credential|signature|sig", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_REVEAL: dict[str, str] = {}  # masked URI -> the URI as given (this process only)


@dataclass(frozen=True)
class LogSpec:
    """One ``--log`` value: the tracker ``kind`` and its ``target`` (TensorBoard: a folder, absolute;
    MLflow: a tracking URI as given, secrets included; None: the tracker's default)."""

    kind: str
    target: str | None = None

    @property
    def shown_target(self) -> str | None:
        """The target as dermcam stores and prints it (secrets masked)."""
        return None if self.target is None else mask_uri(self.target)

    @property
    def shown(self) -> str:
        """The value as stored in a run's configuration: ``kind`` or ``kind:TARGET`` (masked)."""
        return self.kind if self.target is None else f"{self.kind}:{self.shown_target}"

    @property
    def label(self) -> str:
        return "TensorBoard" if self.kind == "tensorboard" else "MLflow"


def mask_uri(uri: str) -> str:
    """``uri`` with its password (or a bare user token) and secret query values replaced by ``***``.

    >>> mask_uri("https://alice:s3cret@mlflow.example.org/?token=abc&x=1")
    'https://alice:***@mlflow.example.org/?token=***&x=1'
    """
    if not _SCHEME.match(uri):
        return uri  # a path: nothing secret in it
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        # user:password keeps the user name; a lone user part may be a token (https://TOKEN@host)
        netloc = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = "&".join(f"{urllib.parse.quote(k, safe='')}="
                             + (MASK if _SECRET_PARAM.search(k) else urllib.parse.quote(v, safe=""))
                             for k, v in pairs)
    if netloc == parts.netloc and query == parts.query:
        return uri  # nothing secret: exactly as given (urlunsplit would turn sqlite:////abs into sqlite://abs)
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def without_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user:password@, user, password)`` for an http(s) URI: MLflow gets a tracking
    server's credentials from the environment, never inside the URI it prints (MLflow prints run links
    with the URI it was given). Other URIs (a database's) are returned as they are: their driver reads
    the credentials from the URI itself."""
    if not re.match(r"^https?://", uri, re.IGNORECASE):
        return uri, None, None
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    clean = uri.replace(f"{parts.netloc}", host, 1)  # only the user part goes; the rest exactly as given
    user, password = urllib.parse.unquote(user), urllib.parse.unquote(password) if colon else None
    if password is None:  # https://TOKEN@host: a token in the user part
        return clean, None, user if user != MASK else None
    return clean, (user or None), (password if password != MASK else None)


def reveal(target: str | None) -> str | None:
    """The target as the user gave it in this process, for a masked one (else ``target`` itself)."""
    if target is None:
        return None
    return _REVEAL.get(target, target)


def scrub(text: str) -> str:
    """``text`` (an error message, a log line) with every secret this process knows masked."""
    for shown, real in _REVEAL.items():
        if real != shown:
            text = text.replace(real, shown)
            _, _, password = without_userinfo(real)
            if password and len(password) >= 3:
                text = text.replace(password, MASK)
    return text


def parse_log(value: object, option: str = "--log") -> LogSpec:
    """One ``--log`` value -> :class:`LogSpec` (BadInputError naming the option otherwise). A TensorBoard
    folder becomes absolute (a resume from another folder writes to the same place); so does an MLflow
    target that is a plain path (a local file store)."""
    if not isinstance(value, str):
        raise BadInputError(f"{option} must be text such as tensorboard or mlflow:URI, not {type(value).__name__}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BadInputError(f"{option} {mask_uri(value)!r} holds a control character")
    kind, colon, target = value.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise BadInputError(f"{option} {mask_uri(value)!r}: the tracker must be tensorboard[:DIR] or "
                            "mlflow[:TRACKING_URI]")
    target = target.strip()
    if colon and not target:
        raise BadInputError(f"{option} {kind}: nothing after ':' (give {'a folder' if kind == 'tensorboard' else 'a tracking URI'}, "
                            f"or {kind} alone for the default)")
    if not target:
        return LogSpec(kind)
    if len(target) > MAX_TARGET:
        raise BadInputError(f"{option} {kind}: the {'folder' if kind == 'tensorboard' else 'URI'} is longer than "
                            f"{MAX_TARGET} characters")
    if kind == "tensorboard":
        if _SCHEME.match(target):
            raise BadInputError(f"{option} tensorboard:{mask_uri(target)}: give a folder; dermcam writes event files "
                                "on this machine")
        return LogSpec(kind, str(Path(target).expanduser().resolve()))
    if not _SCHEME.match(target) and ":" not in target and target != "databricks":
        target = str(Path(target).expanduser().resolve())  # a local file store (a folder)
    elif _SCHEME.match(target):
        scheme = target.split(":", 1)[0].lower()
        if scheme in ("http", "https") and not urllib.parse.urlsplit(target).hostname:
            raise BadInputError(f"{option} mlflow:{mask_uri(target)}: the URI names no host")
    spec = LogSpec(kind, target)
    shown = spec.shown_target
    if shown is not None and shown != target and MASK not in target:
        _REVEAL[shown] = target  # kept for this process: the stored, masked form reaches the server too
    return spec


def parse_logs(values: object, option: str = "--log") -> list[LogSpec]:
    """Every ``--log`` value (a list; None or [] is none). The same tracker twice is refused: it would
    record every number twice."""
    if values is None:
        return []
    if not isinstance(values, (list, tuple)):
        raise BadInputError(f"{option} must be a list of values such as [\"tensorboard\", \"mlflow:URI\"], "
                            f"not {type(values).__name__}")
    specs = [parse_log(v, option) for v in values]
    seen: set[tuple[str, str | None]] = set()
    for spec in specs:
        key = (spec.kind, spec.shown_target)
        if key in seen:
            raise BadInputError(f"{option} {spec.shown} is given twice")
        seen.add(key)
    return specs


def missing_extra(kind: str) -> str | None:
    """Why tracker ``kind`` cannot run here (its package is not installed), or None. Found without
    importing it: importing MLflow takes seconds."""
    module, extra = EXTRAS[kind]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    label = "TensorBoard" if kind == "tensorboard" else "MLflow"
    return f"--log {kind} needs {label}: pip install '{extra}'"


def check_log(values: object, log_model: object = False, option: str = "--log") -> list[LogSpec]:
    """Everything ``--log``/``--log-model`` need, before any work: valid values, their extras installed,
    and an MLflow tracker when the model is to be logged."""
    specs = parse_logs(values, option)
    if not isinstance(log_model, bool):
        raise BadInputError(f"--log-model must be true or false, not {type(log_model).__name__}")
    for spec in specs:
        problem = missing_extra(spec.kind)
        if problem:
            raise BadInputError(problem)
    if log_model and not any(s.kind == "mlflow" for s in specs):
        raise BadInputError("--log-model logs the exported model as an MLflow artefact; it needs --log mlflow[:URI]")
    return specs


def shown_values(values: list[str] | None) -> list[str]:
    """``--log`` values as a run stores them: parsed (a folder made absolute) and masked. A value that
    does not parse is kept as it is: :func:`check_log` reports it."""
    out = []
    for value in values or []:
        try:
            out.append(parse_log(value).shown)
        except BadInputError:
            out.append(mask_uri(value) if isinstance(value, str) else value)
    return out

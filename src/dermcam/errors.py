"""Errors that the CLI turns into a one-line message and a meaningful exit code.

Library code raises these instead of printing, so a Python caller gets an exception it can catch
and the CLI user gets ``Error: <message>`` with an exit code scripts can branch on.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of every dermcam command (documented in docs/cli.md)."""

    OK = 0
    FAILURE = 1  # an unexpected failure inside dermcam
    BAD_INPUT = 2  # bad arguments or an input file dermcam cannot use (also Typer's usage errors)
    NOT_FOUND = 3  # a data set, run, checkpoint or weights file that does not exist
    CORRUPT = 4  # a stored file failed its integrity check (hash, header, sidecar)
    PARTIAL = 5  # the command finished, but some inputs were skipped (listed in its output)
    LOCKED = 6  # another dermcam process holds the store lock
    INTERRUPTED = 130  # Ctrl-C


class DermcamError(Exception):
    """Base class: ``str(error)`` is the one line shown to the user."""

    exit_code: ExitCode = ExitCode.FAILURE


class BadInputError(DermcamError):
    exit_code = ExitCode.BAD_INPUT


class NotFoundError(DermcamError):
    exit_code = ExitCode.NOT_FOUND


class CorruptError(DermcamError):
    exit_code = ExitCode.CORRUPT


class LockedError(DermcamError):
    exit_code = ExitCode.LOCKED


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (or its class name when it has none), at most ``limit``
    characters: what a one-line error shows of a library's multi-line message."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text[:limit] if limit else text

"""What every command shares: one-line errors with exit codes, JSON output, the console."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from dermcam.checks import is_control
from dermcam.errors import DermcamError, ExitCode

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def one_line(message: str) -> str:
    """``message`` on one line whatever it quotes: a control character (a newline in a value someone
    typed, in a file name; see :func:`dermcam.checks.is_control`) is shown escaped, as Python writes it
    in a string (``\\n``)."""
    return "".join(c.encode("unicode_escape").decode() if is_control(c) else c for c in message)


def print_error(message: str) -> None:
    """``Error: <message>`` as one line on stderr (never wrapped, never read as markup)."""
    err_console.print(f"[bold red]Error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = ExitCode.BAD_INPUT) -> NoReturn:
    """:func:`print_error`, then exit with ``code``: how every error ends."""
    print_error(message)
    raise typer.Exit(int(code))


def handle_errors(func: F) -> F:
    """Turn library exceptions into ``Error: <one line>`` on stderr and the matching exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DermcamError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/]")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout, nothing else mixed in."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def show_warnings(warnings: Iterable[str]) -> None:
    """``Warning: <line>`` on stderr for each of a library result's warnings, one line each (never
    wrapped: a script reads them line by line)."""
    for warning in warnings:
        err_console.print(f"[yellow]Warning:[/] {escape(one_line(warning))}", highlight=False, soft_wrap=True)


def show_result(result: Any, json_output: bool, render: Callable[[Any], None]) -> None:
    """A library result's warnings on stderr, then ``result.to_dict()`` as JSON or ``render(result)``."""
    show_warnings(getattr(result, "warnings", []))
    if json_output:
        print_json(result.to_dict())
    else:
        render(result)


JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON on stdout (for scripts).")

def threads_option(default: str | None = "auto") -> Any:
    """``--threads N|auto``, the one definition serve, explain, evaluate and train share (checked by
    :func:`dermcam.checks.check_threads` in the library, before any work). ``default=None``: torch's own
    count unless given (train: see docs/training.md)."""
    what = ("auto (default): the cores not already busy" if default == "auto"
            else "auto: the cores not already busy. Default: torch's own (one per core)")
    return typer.Option(default, "--threads", metavar="N|auto",
                        help=f"Torch CPU threads: a number, or {what} (cores minus the 1-minute load average, at "
                             "least 1), so that work sharing the machine does not slow both down.")


THREADS_OPTION = threads_option()

NO_CALIBRATION_OPTION = typer.Option(False, "--no-calibration",
                                     help="Show the model's raw softmax probabilities and argmax decisions, "
                                          "ignoring the checkpoint's calibration and operating point.")

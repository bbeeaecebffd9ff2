"""The ``dermcam`` command itself: where the command line is parsed, so where its own errors are shaped.

Typer prints a usage error (an unknown option, a missing argument, a value of the wrong type or out
of range) as a usage line, a hint and a boxed message: five lines, unlike the one line every library
error gets. :class:`RootGroup` catches them for every subcommand at any depth and prints the same
``Error: <one line>`` (exit code 2). It also reads the words typed for a command before Typer converts
them, since conversion hides the two values no option accepts: an empty one (an empty path becomes
``.``, the current folder; an empty checkpoint or device, the default) and one with a control character.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from typer.core import TyperGroup, TyperOption

from dermcam.checks import check_text, describe_range, shown
from dermcam.cli.common import fail
from dermcam.errors import DermcamError

try:  # Typer 0.2x ships its own copy of Click; older Typer runs on Click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors  # type: ignore[no-redef]


def param_label(param: Any) -> str:
    """How a message names a parameter: an option by its long name (``--data``, not ``-d``), an argument
    by its metavar or name in capitals (``CHECKPOINT``)."""
    if param.param_type_name == "option":
        return max(param.opts, key=len)
    return (param.metavar or param.name or "argument").strip("[].").upper()


def usage_error_line(exc: Any) -> str:
    """A usage error as one line: ``--seed must be a whole number from 0 to 4294967295, not -1`` for an
    option with a range, ``--epochs: <why> (got abc)`` for another bad value, else Click's message and
    where the help is (``No such option: --bogus (see: dermcam train --help)``)."""
    param = getattr(exc, "param", None)
    if isinstance(exc, click_errors.BadParameter) and not isinstance(exc, click_errors.MissingParameter) \
            and param is not None:
        errors = getattr(exc.__cause__, "errors", None)  # Typer 0.2x: the ValidationError of the value
        given = errors()[0].get("input") if callable(errors) and errors() else None
        typed = given if isinstance(given, str) and len(given) <= 40 else shown(given)  # as typed, unquoted
        low, high = getattr(param, "min", None), getattr(param, "max", None)
        if low is not None or high is not None:
            return f"{param_label(param)} must be {describe_range(low, high)}" + (
                f", not {typed}" if given is not None else "")
        return f"{param_label(param)}: {exc.message.rstrip('.')}" + (f" (got {typed})" if given is not None else "")
    ctx = getattr(exc, "ctx", None)
    return exc.format_message() + (f" (see: {ctx.command_path} --help)" if ctx is not None else "")


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Errors raised while the command line is parsed (Click's, or a library check's), one line each."""
    try:
        yield
    except click_errors.NoArgsIsHelpError:
        raise  # a group given no arguments: its help is the answer
    except click_errors.UsageError as exc:
        fail(usage_error_line(exc), exc.exit_code)
    except click_errors.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except DermcamError as exc:
        fail(str(exc), exc.exit_code)


def check_typed_values(command: Any, parent: Any, name: str, args: list[str]) -> None:
    """Every value typed for ``command`` (and, for a group, for its subcommand), read as typed, passes
    :func:`dermcam.checks.check_text`. Words the parser cannot place are left to the real parse, which
    reports them with the command's usage."""
    probe = command.context_class(command, info_name=name, parent=parent)
    try:
        opts, rest, _ = command.make_parser(probe).parse_args(list(args))
    except click_errors.UsageError:
        return
    for param in command.get_params(probe):
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            continue
        value = opts.get(param.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str):
                check_text(item, param_label(param))
    if isinstance(command, TyperGroup) and rest and (sub := command.get_command(probe, rest[0])) is not None:
        check_typed_values(sub, probe, rest[0], rest[1:])


class RootGroup(TyperGroup):
    """``dermcam``: one-line usage errors, and typed values checked before any command runs (see the module)."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with one_line_errors():
            return super().invoke(ctx)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not ctx.resilient_parsing:
            check_typed_values(command, ctx, name, rest)
        return name, command, rest


def flags_show_no_value() -> None:
    """Typer 0.29's rich help writes a value type after every option, flags included (``--json <bool>``),
    though a flag takes no value; its plain help and the generated docs/cli.md already leave flags
    bare. This makes the rich help agree, for every command at once. Older Typers never showed it."""
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "flags_bare", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else original(self, ctx)

    display_type_rich.flags_bare = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]

"""A tiny progress interface so library loops can report progress without depending on a UI.

Library functions take ``progress: Progress | None``; the CLI passes :func:`rich_progress`, a
Python caller passes nothing and gets silence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class Progress:
    """No-op progress; subclass and override to show something."""

    def start(self, description: str, total: int | None = None) -> None:
        """Begin a new task (a new bar)."""

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Advance the current task; ``fields`` are live values to show (loss, metric, ...)."""

    def log(self, message: str) -> None:
        """A line of text shown above the bar."""

    def finish(self) -> None:
        """End the current task."""


class RichProgress(Progress):
    """Progress bars on stderr, so ``--json`` output on stdout stays clean."""

    def __init__(self, progress: Any, console: Any) -> None:
        self._progress = progress
        self._console = console
        self._task: Any = None
        self.live = False

    def start(self, description: str, total: int | None = None) -> None:
        self.finish()
        if not self.live:  # started lazily: a command that fails early prints no empty bar line
            self._progress.start()
            self.live = True
        self._task = self._progress.add_task(description, total=total, info="")

    def advance(self, n: int = 1, **fields: Any) -> None:
        if self._task is None:
            return
        info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._progress.update(self._task, advance=n, **({"info": info} if fields else {}))

    def log(self, message: str) -> None:
        self._console.print(message)

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop_task(self._task)
            self._task = None


@contextlib.contextmanager
def rich_progress(enabled: bool = True) -> Iterator[Progress]:
    """A :class:`Progress` that draws rich bars on stderr (or nothing when ``enabled`` is false)."""
    if not enabled:
        yield Progress()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as RichBar

    console = Console(stderr=True)
    bar = RichBar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )
    reporter = RichProgress(bar, console)
    try:
        yield reporter
    finally:
        if reporter.live:
            bar.stop()

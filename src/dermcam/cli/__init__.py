"""The ``dermcam`` command: a thin Typer layer over the library.

Each command module (``dermcam.cli.<topic>``) parses options, calls one library function and renders
the result. Nothing here imports torch at module level: ``dermcam --help`` must stay instant.
"""

from __future__ import annotations

import importlib

import typer

from dermcam import __version__
from dermcam.cli.root import RootGroup, flags_show_no_value

flags_show_no_value()
app = typer.Typer(
    name="dermcam",
    cls=RootGroup,  # every usage error one line, every typed value checked (see dermcam.cli.root)
    help=(
        "Dermoscopy image classification with explanations.\n\n"
        "Typical workflow: dermcam prepare ./ham10000 -> dermcam train -> dermcam ckpt list -> "
        "dermcam explain lesion.jpg. Try it all on built-in data with: dermcam demo"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Command modules, registered in this order; each defines ``register(app)``.
COMMAND_MODULES: list[str] = ["data", "train", "distill", "evaluate", "calibrate", "report", "ckpt", "ensemble",
                              "explain", "audit", "serve", "demo"]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dermcam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Dermoscopy image classification with explanations."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"dermcam.cli.{_name}").register(app)


def main() -> None:
    app()

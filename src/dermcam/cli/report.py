"""``dermcam report``: the self-contained report.html of a run or a checkpoint, regenerated."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dermcam.checks import check_output_dir
from dermcam.cli import views
from dermcam.cli.common import JSON_OPTION, handle_errors, show_result


@handle_errors
def report_command(
    ref: Optional[str] = typer.Argument(None, metavar="[RUN|CKPT]",
                                        help="Run id (its best checkpoint), checkpoint id (RUN:EPOCH), hash prefix, "
                                             "path or exported file (default: best)."),
    data: Optional[str] = typer.Option(None, "--data", "-d",
                                       help="Evaluate on this prepared set (default: the one it was trained on): "
                                            "external validation, classes matched by name."),
    split: str = typer.Option("test", help="train | val | test."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Report folder (default: the run's report/ folder for a run's best "
                                            "checkpoint on its own test split, else ./dermcam-report)."),
    reevaluate: bool = typer.Option(False, "--reevaluate",
                                    help="Evaluate again even when the folder holds the checkpoint's current "
                                         "evaluation."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (for the evaluation)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Write report.html, one self-contained page that opens offline: data and splits, configuration and
    versions, metrics with 95% intervals, calibration, operating point, curves, subgroups, a gallery of
    the most confident errors with Grad-CAM overlays, and a model card. Prints its path.

    The checkpoint is evaluated again (as evaluate --out does) unless the folder already holds its
    current evaluation; training and evaluate --out write the page too.
    """
    from dermcam.progress import rich_progress
    from dermcam.report.build import report

    if out is not None:
        check_output_dir(out, "--out")  # before the model loads: nothing is written when it is unusable
    with rich_progress(enabled=not json_output) as progress:
        result = report(ref, dataset=data, split=split, out_dir=out, reevaluate=reevaluate, device=device,
                        progress=progress)
    show_result(result, json_output, views.report_path)


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)

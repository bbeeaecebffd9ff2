"""``dermcam evaluate``: a checkpoint scored on a split of a prepared data set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dermcam.cli import views
from dermcam.cli.common import JSON_OPTION, console, err_console, handle_errors, print_json


@handle_errors
def evaluate_command(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint id (RUN:EPOCH), run id, exported file (default: best)."),
    split: str = typer.Option("test", help="train | val | test."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data set (default: the one it was trained on)."),
    tta: bool = typer.Option(False, help="Average predictions over the four flips (as explain --tta does)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default: no files, print only)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto (fp32: the same scores as explain, on every machine) | bf16 | fp16 | fp32."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Evaluate a checkpoint on a split: balanced accuracy, macro F1, per-class recall, AUC, confusion matrix."""
    from dermcam.evaluate.evaluation import evaluate
    from dermcam.progress import rich_progress

    with rich_progress() as progress:
        result = evaluate(checkpoint, split=split, dataset=data, tta=tta, device=device, precision=precision,
                          out_dir=out, progress=progress)
    for warning in result.warnings:
        err_console.print(f"[yellow]Warning:[/] {warning}")
    if json_output:
        print_json(result.to_dict())
        return
    views.evaluation(result)
    if result.files:
        console.print(f"Report: {result.report_dir}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)

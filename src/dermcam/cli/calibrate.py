"""``dermcam calibrate``: fit temperature scaling (and an operating point) on a checkpoint's val split."""

from __future__ import annotations

from typing import Optional

import typer

from dermcam.cli import views
from dermcam.cli.common import JSON_OPTION, handle_errors, show_result


@handle_errors
def calibrate_command(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint id (RUN:EPOCH), run id, 'best', 'latest' "
                                                          "(default: best)."),
    data: Optional[str] = typer.Option(None, "--data", "-d",
                                       help="Fit on the val split of this prepared set (default: the one it was "
                                            "trained on); classes are matched by name."),
    operating_point: Optional[str] = typer.Option(None, "--operating-point", metavar="CLASS:METRIC=T",
                                                  help="Also choose a threshold on the calibrated probability of "
                                                       "CLASS that reaches METRIC (sensitivity or specificity) T "
                                                       "on val, e.g. mel:sensitivity=0.90 (default: keep the "
                                                       "stored one, chosen again)."),
    vector: bool = typer.Option(False, "--vector",
                                help="Also try per-class vector scaling; kept only where it predicts held-out "
                                     "val lesions better. Unlike a temperature it can change predicted classes."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto (fp32, as validation scores) | bf16 | fp16 | fp32."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Calibrate a checkpoint's probabilities on the validation split and store it in its sidecar.

    Temperature scaling (with --vector, also vector scaling where it predicts held-out val lesions better), with
    ECE, Brier score and NLL before and after. evaluate and explain then show calibrated
    probabilities (--no-calibration: raw). Training does this for its best checkpoint; use this for
    checkpoints trained before, for another set's val split, or to set an operating point.
    """
    from dermcam.evaluate.calibrate import calibrate
    from dermcam.progress import rich_progress

    with rich_progress(enabled=not json_output) as progress:
        result = calibrate(checkpoint, dataset=data, operating_point=operating_point, vector=vector, device=device,
                           precision=precision, progress=progress)
    show_result(result, json_output, views.calibration_result)


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_command)

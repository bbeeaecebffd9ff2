"""``dermcam distill ENSEMBLE``: the options, as a dict, to :func:`dermcam.train.student.distill`.

Like ``dermcam train`` every option defaults to None ("not given"): the defaults live in
``TrainConfig`` (and, for the backbone and input size, in the teacher), and the help quotes them.
The training options' help is ``dermcam train``'s own (:data:`dermcam.cli.train.HELP`).
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from dermcam.cli import views
from dermcam.cli.common import JSON_OPTION, handle_errors, print_json, threads_option
from dermcam.cli.train import D, HELP, _h


@handle_errors
def distill_command(
    ensemble: str = typer.Argument(..., metavar="ENSEMBLE",
                                   help="The teacher: a stored ensemble, NAME or ensemble:NAME "
                                        "(see dermcam ensemble)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b",
                                           help="The student, any timm model name (default: the backbone of the "
                                                "teacher's member listed first, at that member's input size and "
                                                "colour constancy: the student then costs exactly one member's "
                                                "inference and sees images as that member did)."),
    temperature: Optional[float] = typer.Option(None, "--temperature",
                                                help="Softens the teacher's calibrated probabilities (p^(1/T), "
                                                     "renormalised) and the student's softmax before their KL term, "
                                                     f"which is scaled by T^2 (default: {D.distill_temperature:g})."),
    alpha: Optional[float] = typer.Option(None, "--alpha",
                                          help="Weight of the distillation term, 0 to 1; 1 - alpha weighs the "
                                               "class-weighted, label-smoothed loss on the true labels "
                                               f"(default: {D.distill_alpha:g})."),
    epochs: Optional[int] = typer.Option(None, help=_h("epochs")),
    lr: Optional[float] = typer.Option(None, "--lr", help=_h("lr")),
    batch_size: Optional[int] = typer.Option(None, help=_h("batch_size")),
    image_size: Optional[str] = typer.Option(None, "--image-size",
                                             help="Model input: 192 (square) or WIDTHxHEIGHT (default: the teacher's "
                                                  "first member's with its backbone, else the backbone's)."),
    freeze: Optional[int] = typer.Option(None, help=_h("freeze")),
    metadata: Optional[str] = typer.Option(None, "--metadata", metavar="FIELDS",
                                           help=HELP["metadata"] + ". The student's own choice, whatever its teacher "
                                                "used (default: none, images only)."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help=_h("ema")),
    seed: Optional[int] = typer.Option(None, "--seed", help=_h("seed")),
    pretrained: Optional[str] = typer.Option(None, help=_h("pretrained")),
    patience: Optional[int] = typer.Option(None, help=_h("patience")),
    device: Optional[str] = typer.Option(None, help=_h("device")),
    precision: Optional[str] = typer.Option(None, help=HELP["precision"] + f" (default: {D.precision})."),
    threads: Optional[str] = threads_option(None),
    json_output: bool = JSON_OPTION,
) -> None:
    """Train one student model on a teacher ensemble's calibrated probabilities (knowledge distillation).

    The student learns from the teacher's answers for the train images (soft targets, computed once
    at the start and kept in the run folder) together with the true labels, on the data set the
    teacher was trained on. It is an ordinary run: the same augmentation, checkpoints and sidecars
    (each records the teacher under "distillation"), calibrated on val and scored on test at the end,
    resumed with dermcam train --resume --run ID; evaluate, explain, ckpt export and serve take it like
    any checkpoint. The teacher is scored on the same test split so the result shows the gap.
    """
    from dermcam.progress import rich_progress
    from dermcam.train.student import distill

    given: dict[str, Any] = {
        "backbone": backbone, "distill_temperature": temperature, "distill_alpha": alpha, "epochs": epochs, "lr": lr,
        "batch_size": batch_size, "image_size": image_size, "freeze": freeze, "ema": ema, "seed": seed,
        "pretrained": pretrained, "patience": patience, "device": device, "precision": precision,
        "metadata": metadata,
    }
    with rich_progress() as progress:
        result = distill(ensemble, {k: v for k, v in given.items() if v is not None}, threads=threads,
                         progress=progress)
    if json_output:
        print_json(result.to_dict())
        return
    views.distill_result(result)


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_command)

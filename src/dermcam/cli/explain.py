"""``dermcam explain``: predictions and Grad-CAM overlays for images (logic in :mod:`dermcam.explain.pipeline`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dermcam.checks import MAX_BATCH_SIZE, check_output_dir, check_output_file
from dermcam.cli import views
from dermcam.cli.common import (
    JSON_OPTION,
    NO_CALIBRATION_OPTION,
    THREADS_OPTION,
    console,
    handle_errors,
    print_error,
    print_json,
    show_warnings,
)
from dermcam.errors import ExitCode
from dermcam.explain.methods import METHODS
from dermcam.progress import rich_progress


@handle_errors
def explain_command(
    images: list[Path] = typer.Argument(..., help="Image files and/or folders of images."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", metavar="ID|FILE",
                                             help="Checkpoint id (RUN:EPOCH), run id, 'best', 'latest', an "
                                                  "ensemble (ensemble:NAME) or a .safetensors / exported file "
                                                  "(default: best in the store)."),
    out: Path = typer.Option(Path("dermcam-explain"), "--out", "-o", help="Folder for overlays and sidecars."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also look into sub-folders of folders."),
    method: str = typer.Option("gradcam", "--method", metavar="|".join(METHODS),
                               help="CAM method: gradcam (default), gradcam++, scorecam (gradient-free, "
                                    "slower), eigencam (class-agnostic)."),
    target: Optional[str] = typer.Option(None, "--target", metavar="CLASS",
                                         help="Explain this class (name or index) instead of the prediction."),
    layer: Optional[str] = typer.Option(None, "--layer", metavar="NAME",
                                        help="Module to explain, e.g. stages.3 (default: the backbone's last "
                                             "feature map)."),
    tta: bool = typer.Option(False, "--tta", help="Average predictions and maps over flips (4x slower)."),
    no_cam: bool = typer.Option(False, "--no-cam", help="Predictions and sidecars only, no overlays."),
    npy: bool = typer.Option(False, "--npy", help="Also save each map as <name>.cam.npy (model input size)."),
    score: bool = typer.Option(False, "--score", help="Measure map faithfulness: deletion / insertion AUC "
                                                      "(about 40 extra forward passes per image)."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", metavar="FILE", help="Write one row per image."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", metavar="FILE",
                                            help="CSV of the images' patient metadata (an image column with the "
                                                 "file name or stem; age, sex, site columns) for a model trained "
                                                 "with --metadata (default: a metadata.csv beside the images)."),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda | cuda:N. Maps are computed in fp32."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=MAX_BATCH_SIZE, help="Images per forward/backward pass."),
    threads: str = THREADS_OPTION,
    no_calibration: bool = NO_CALIBRATION_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Classify dermoscopy images and save Grad-CAM overlays showing where the model looked.

    Per image, into --out: NAME.cam.png (the overlay, at the photo's own size) and NAME.json
    (checkpoint, method, layer, probabilities).

    With an ensemble the prediction is the ensemble's and the map is the mean of its members' maps for
    the ensemble's decision (each at its own default layer); NAME.json lists the members.

    Probabilities are calibrated when the checkpoint is; with an operating point each image also
    shows its decision ("mel: above threshold 0.231"), and the overlay explains the decided class.

    A model trained with patient metadata reads each image's age, sex and site from --metadata FILE (or
    a metadata.csv beside the images); the prediction and the map both use it, and NAME.json says which
    fields the image had ("answered without metadata" when none). Other models ignore it.

    Unreadable files are reported and skipped: exit code 5 when some failed, 2 when none could be used.
    """
    from dermcam.explain.pipeline import explain, write_csv

    check_output_dir(out, "--out")  # before the model loads: nothing is written when a path is unusable
    if csv_path is not None:
        check_output_file(csv_path, "--csv")
    with rich_progress(enabled=not json_out) as progress:
        report = explain(images, checkpoint=checkpoint, out_dir=out, recursive=recursive, method=method,
                         target=target, layer=layer, tta=tta, cam=not no_cam, save_npy=npy, score=score,
                         calibrated=not no_calibration, device=device, batch_size=batch_size, threads=threads,
                         progress=progress, metadata=metadata)
    if csv_path is not None:
        write_csv(report, csv_path)
    show_warnings(report.warnings)
    if json_out:
        print_json(report.to_dict())
    else:
        if report.results:
            console.print(views.explain_table(report, console.width))
        what = f"{report.method} on {report.layer}" if report.method else "predictions only"
        console.print(f"{len(report.results)} explained ({what}) -> {report.out_dir}", highlight=False)
        if report.metadata is not None:
            console.print(metadata_words(report.metadata_summary() or {}), highlight=False, markup=False)
    for failure in report.failures:
        print_error(failure.error)
    if report.exit_code != ExitCode.OK:
        raise typer.Exit(int(report.exit_code))


def metadata_words(summary: dict) -> str:
    """``Metadata: the model reads age, sex, site; from meta.csv; 1 of 3 images answered without metadata``."""
    files = summary.get("files") or []
    where = f"from {', '.join(files)}" if files else "no metadata file (--metadata FILE, or metadata.csv beside the images)"
    return (f"Metadata: the model reads {', '.join(summary['fields'])}; {where}; {summary['without_metadata']} of "
            f"{summary['images']} images answered without metadata")


def register(app: typer.Typer) -> None:
    app.command("explain")(explain_command)

"""``dermcam audit``: where a model looks and what changes its answer (logic in :mod:`dermcam.audit.run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dermcam.checks import MAX_BATCH_SIZE, SEED_MAX, check_output_dir
from dermcam.cli import views
from dermcam.cli.common import JSON_OPTION, THREADS_OPTION, handle_errors, show_result

# The names of dermcam.audit.perturb.PERTURBATIONS, for the help only (importing it here would load
# Pillow and scipy for every dermcam command); the library checks the names given against the real table.
PERTURBATION_HELP = ("ink, ruler, vignette, hair, rot90, rot180, rot270, hflip, vflip, brighter, darker, "
                     "more_contrast, less_contrast, jpeg30, blur, half_res")


@handle_errors
def audit_command(
    checkpoint: Optional[str] = typer.Argument(None, metavar="[CKPT]",
                                               help="Checkpoint id (RUN:EPOCH), run id, ensemble (ensemble:NAME) "
                                                    "or exported file (default: best)."),
    data: Optional[str] = typer.Option(None, "--data", "-d",
                                       help="Data set (default: the one it was trained on); any prepared set, "
                                            "classes matched by name."),
    split: str = typer.Option("test", help="train | val | test."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1,
                                        help="Audit this many images of the split, drawn with --seed (default: all)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX,
                             help="Seed of the perturbations and of the --limit draw."),
    perturbation: Optional[list[str]] = typer.Option(None, "--perturbation", "-p", metavar="NAME",
                                                     help=f"Run only this perturbation (repeatable): "
                                                          f"{PERTURBATION_HELP}. Default: all."),
    only: Optional[str] = typer.Option(None, "--only", metavar="attention|stress",
                                       help="Run one part: attention (where the Grad-CAM mass falls) or stress "
                                            "(what perturbations do to the answer). Default: both."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Folder for audit.json and audit/ (default: where dermcam report "
                                            "writes this checkpoint's report.html)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=MAX_BATCH_SIZE, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the scoring passes: about a minute "
                                                          "compiling, the same answers; measured no faster on a "
                                                          "2-core CPU (docs/audit.md), for GPUs and bigger "
                                                          "models (falls back to eager with a warning)."),
    threads: str = THREADS_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    """Audit a model for shortcuts: does its Grad-CAM fall on the lesion or on the photograph (the border,
    the dark vignette, ink marks), and do painted artefacts (ink, ruler, vignette, hair) or acquisition
    changes (rotations, flips, brightness, contrast, JPEG, blur, resolution) change its calibrated
    probabilities and decisions?

    Writes audit.json and an audit/ folder of charts and examples; report.html, when the folder holds
    the checkpoint's evaluation, gets a "Shortcuts and robustness" section (rewritten now, or by the
    next dermcam report). Deterministic for a given --seed. See docs/audit.md for every rule.
    """
    from dermcam.audit.run import PARTS, audit
    from dermcam.progress import rich_progress

    parts = PARTS if only is None else (only,)
    if out is not None:
        check_output_dir(out, "--out")  # before the model loads: nothing is written when it is unusable
    with rich_progress(enabled=not json_output) as progress:
        result = audit(checkpoint, dataset=data, split=split, limit=limit, seed=seed, out_dir=out, parts=parts,
                       perturbations=perturbation or None, batch_size=batch_size, threads=threads, device=device,
                       compile=compile, progress=progress)
    from dermcam.report.build import refresh_report

    page = refresh_report(result.out_dir, checkpoint) if result.out_dir is not None else None
    if page is not None:
        result.files.append(page)
    show_result(result, json_output, views.audit_result)


def register(app: typer.Typer) -> None:
    app.command("audit")(audit_command)

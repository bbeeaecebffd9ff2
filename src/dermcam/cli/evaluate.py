"""``dermcam evaluate``: a checkpoint scored on a split of a prepared data set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dermcam.checks import MAX_BATCH_SIZE, SEED_MAX, check_output_dir
from dermcam.cli import views
from dermcam.cli.common import JSON_OPTION, NO_CALIBRATION_OPTION, THREADS_OPTION, handle_errors, show_result
from dermcam.data.overlap import OVERLAP_THRESHOLD
from dermcam.errors import BadInputError
from dermcam.evaluate.bootstrap import DEFAULT_RESAMPLES


@handle_errors
def evaluate_command(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint id (RUN:EPOCH), run id, ensemble (ensemble:NAME), "
                                                          "exported file (default: best); or cv:NAME, a "
                                                          "cross-validation's out-of-fold estimate."),
    split: Optional[str] = typer.Option(None, help="train | val | test (default: test)."),
    data: Optional[str] = typer.Option(None, "--data", "-d",
                                       help="Data set (default: the one it was trained on). Any prepared set works, "
                                            "e.g. one prepared with --external: classes are matched by name."),
    tta: bool = typer.Option(False, help="Average predictions over the four flips (as explain --tta does)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default: no files, print only)."),
    resamples: int = typer.Option(DEFAULT_RESAMPLES, "--resamples", min=0, max=100_000,
                                  help="Bootstrap resamples of lesions for the 95% intervals (0: no intervals)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed of the bootstrap resampling."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto (fp32: the same scores as explain, on every machine) | bf16 | fp16 | fp32."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, max=MAX_BATCH_SIZE, help="Images per forward pass."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model: slower start, faster "
                                                          "passes; worth it for large sets (falls back to "
                                                          "eager with a warning)."),
    keep_overlap: bool = typer.Option(False, "--keep-overlap",
                                      help="Score images that are copies of training images too (default: on "
                                           "a set other than the training set they are left out and listed in "
                                           "overlap.csv)."),
    overlap_threshold: float = typer.Option(OVERLAP_THRESHOLD, "--overlap-threshold",
                                            help="Fingerprint distance under which an image counts as a copy of "
                                                 "a training image (0 to 0.2; 0: byte-identical copies only)."),
    against: Optional[str] = typer.Option(None, "--against", metavar="cv:NAME",
                                          help="With a cv:NAME checkpoint: compare it with another "
                                               "cross-validation of the same data set, metric by metric, on "
                                               "the images both predicted out of fold (the difference's 95% "
                                               "interval over the same resampled lesions). Chooses between "
                                               "recipes without reading the test split."),
    threads: str = THREADS_OPTION,
    no_calibration: bool = NO_CALIBRATION_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    """Evaluate a checkpoint on a split: balanced accuracy, macro F1, per-class recall and precision, AUC,
    each with a 95% bootstrap interval over lesions, plus subgroups (sex, age, site, source) when recorded.

    With --data OTHER this is external validation: the model's classes are matched by name, images of
    other classes are counted and left out, and so are images that are copies of the model's training
    images (byte-identical or near-duplicate; listed in overlap.csv; --keep-overlap scores them).

    Probabilities are calibrated when the checkpoint is (ECE, Brier and NLL before and after are
    reported); with an operating point its sensitivity and specificity are reported too. --out also
    writes reliability.png, roc.png, pr.png and report.html (see dermcam report).
    """
    from dermcam.evaluate.evaluation import evaluate
    from dermcam.progress import rich_progress
    from dermcam.store.crossval import cv_name

    if cv_name(checkpoint) is not None:  # stored out-of-fold predictions: no model runs, no split is read
        from dermcam.evaluate.crossval import cv_estimate

        given = [flag for flag, used in (
            ("--split", split is not None), ("--data", data is not None), ("--tta", tta), ("--out", out is not None),
            ("--compile", compile), ("--keep-overlap", keep_overlap), ("--no-calibration", no_calibration),
            ("--overlap-threshold", overlap_threshold != OVERLAP_THRESHOLD), ("--device", device != "auto"),
            ("--precision", precision != "auto"), ("--batch-size", batch_size != 64)) if used]
        if given:
            raise BadInputError(f"{given[0]} does not apply to {checkpoint}: a cross-validation is scored from its "
                                "stored out-of-fold predictions of the train and val images (never the test split; "
                                f"score its models on test with: dermcam evaluate ensemble:{cv_name(checkpoint)})")
        if against is None:
            show_result(cv_estimate(str(cv_name(checkpoint)), resamples=resamples, seed=seed), json_output,
                        views.crossval_estimate)
            return
        from dermcam.evaluate.crossval import compare_cv

        if cv_name(against) is None:
            raise BadInputError(f"--against {against}: give a cross-validation as cv:NAME")
        show_result(compare_cv(str(cv_name(checkpoint)), str(cv_name(against)), resamples=resamples, seed=seed),
                    json_output, views.crossval_comparison)
        return
    if against is not None:
        raise BadInputError(f"--against compares two cross-validations: give one as the checkpoint too "
                            f"(dermcam evaluate cv:NAME --against {against})")
    split = split or "test"
    if out is not None:
        check_output_dir(out, "--out")  # before the model loads: nothing is written when it is unusable
    with rich_progress() as progress:
        result = evaluate(checkpoint, split=split, dataset=data, tta=tta, device=device, precision=precision,
                          batch_size=batch_size, resamples=resamples, seed=seed, calibrated=not no_calibration,
                          compile=compile, keep_overlap=keep_overlap, overlap_threshold=overlap_threshold,
                          out_dir=out, threads=threads, progress=progress)
        if out is not None:
            from dermcam.report.build import write_html_report

            result.files.append(write_html_report(out, checkpoint))
    show_result(result, json_output, views.evaluation)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)

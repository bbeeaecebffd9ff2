"""``dermcam distill ENSEMBLE``: one student run trained on an ensemble's calibrated probabilities.

The soft targets, their file and the teacher's checks are :mod:`dermcam.train.distill` (which the
trainer uses); this module is the command's library function: it picks the student's defaults from the
teacher, trains it as an ordinary run and scores the teacher on the same test split for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermcam.errors import BadInputError
from dermcam.progress import Progress
from dermcam.store.ensembles import PREFIX, Ensemble, member_checkpoints, read_ensemble
from dermcam.train.config import TrainResult
from dermcam.train.distill import (SOFT_TARGETS_FILE, manifest_sha256, soft_targets_seconds, teacher_dataset,
                                   teacher_name)


# The training options a student takes from the command line (see dermcam.cli.distill); every other
# TrainConfig field keeps its default, and the teacher decides the data set.
STUDENT_OPTIONS = ("backbone", "pretrained", "epochs", "batch_size", "lr", "image_size", "freeze", "ema", "seed",
                   "patience", "device", "precision", "distill_temperature", "distill_alpha", "metadata")


@dataclass
class DistillResult:
    """The student's run, and its teacher measured on the same test split (when both were scored)."""

    run: TrainResult
    teacher: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> dict[str, float] | None:
        """Student minus teacher on the test split: balanced accuracy and macro AUC (the issue's goal:
        both within 0.01)."""
        student, teacher = self.run.test_metrics or {}, self.teacher.get("test_metrics") or {}
        keys = ("balanced_accuracy", "auc_macro")
        if not all(isinstance(student.get(k), (int, float)) and isinstance(teacher.get(k), (int, float))
                   for k in keys):
            return None
        return {k: float(student[k]) - float(teacher[k]) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        """What ``dermcam distill --json`` prints: ``dermcam train --json``'s run, plus the teacher and the gap."""
        return {**self.run.to_dict(), "teacher": self.teacher, "gap": self.gap}


def student_defaults(ensemble: Ensemble, given: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    """What a student takes from its teacher unless given: the backbone of the member listed first, and
    (when the backbone is that member's) its input size and colour constancy, so the default student
    sees images as that member did and costs exactly one member's inference."""
    first = member_checkpoints(ensemble, root)[0]
    defaults: dict[str, Any] = {}
    if "backbone" not in given:
        defaults["backbone"] = first.sidecar["backbone"]
    if given.get("backbone", first.sidecar["backbone"]) == first.sidecar["backbone"]:
        channels, height, width = first.sidecar["preprocessing"]["input_size"]
        if "image_size" not in given:
            defaults["image_size"] = f"{int(width)}x{int(height)}"
        member_config = first.sidecar.get("config") or {}
        if isinstance(member_config.get("color_constancy"), str):
            defaults["color_constancy"] = member_config["color_constancy"]
    return defaults


def distill(ensemble: str, options: dict[str, Any] | None = None, *, root: Path | None = None,
            threads: int | str | None = None, score_teacher: bool = True,
            progress: Progress | None = None) -> DistillResult:
    """Train one student on ensemble ``ensemble``'s calibrated probabilities (``dermcam distill``).

    ``options``: :class:`~dermcam.train.config.TrainConfig` fields the user gave (see
    :data:`STUDENT_OPTIONS`); the data set is the teacher's, and :func:`student_defaults` fills in the
    backbone and input size. Everything is checked before any work: the ensemble exists and loads
    (NotFoundError, exit 3), the options are valid (BadInputError, exit 2). The student is an ordinary
    run (resume it with ``dermcam train --resume --run ID``); at the end the teacher is scored on the same
    test split (no bootstrap) so the result shows how far the student is from it; ``score_teacher=False``
    skips that (a caller that scores the teacher on test itself, such as the recipe benchmark, would
    otherwise run all its members over the test split twice), and the result then has no gap.
    """
    from dermcam.train.config import TrainConfig
    from dermcam.train.trainer import train_configurations

    progress = progress or Progress()
    given = dict(options or {})
    unknown = sorted(set(given) - set(STUDENT_OPTIONS))
    if unknown:
        raise BadInputError(f"not a distillation option: {', '.join(unknown)}")
    name = teacher_name(ensemble)
    TrainConfig.from_dict(given).validate()  # the numbers and names given, before the store is read
    teacher = read_ensemble(name, root)
    dataset = teacher_dataset(teacher, root)
    config = {**student_defaults(teacher, given, root), **given, "teacher": name, "dataset": dataset["name"]}
    [result] = train_configurations(config, root=root, threads=threads, progress=progress)
    summary: dict[str, Any] = {"id": PREFIX + name, "sha256": manifest_sha256(teacher),
                               "members": len(teacher.manifest["members"]),
                               "soft_targets_seconds": soft_targets_seconds(result.run_dir / SOFT_TARGETS_FILE),
                               "test_metrics": None}
    if result.test_metrics is not None and score_teacher:
        summary["test_metrics"] = teacher_test_metrics(name, result, root=root, progress=progress)
    return DistillResult(result, summary)


def teacher_test_metrics(name: str, result: TrainResult, *, root: Path | None = None,
                         progress: Progress | None = None) -> dict[str, Any]:
    """The teacher's headline metrics on the student's test split (as ``dermcam evaluate ensemble:NAME``)."""
    import torch

    from dermcam.evaluate.evaluation import evaluate

    scored = evaluate(PREFIX + name, split="test", dataset=result.config.dataset, device=result.config.device,
                      precision=result.config.precision, resamples=0, root=root,
                      threads=torch.get_num_threads(), progress=progress)  # the thread count training used
    keys = ("balanced_accuracy", "macro_f1", "auc_macro", "accuracy", "n")
    return {k: scored.metrics.get(k) for k in keys}

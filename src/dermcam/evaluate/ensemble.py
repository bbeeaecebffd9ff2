"""Making ensembles: which checkpoints, with which weights, chosen on the validation split only.

Two ways to choose: take the named (or ``--top K``) checkpoints with equal weights, or greedy
forward selection with replacement (Caruana et al., 2004, "Ensemble selection from libraries of
models"): start from the best single model, then repeatedly add whichever candidate most improves
the validation score of the averaged probabilities; a model added twice counts twice, which is how
the weights arise. Only the validation split is read, so the test split stays unseen until
``evaluate``.

The score is the checkpoints' own monitored metric where it can be computed from probabilities
(balanced accuracy by default); ties are broken by the lower log loss, which keeps the choice stable
when a few images decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermcam.errors import BadInputError, DermcamError
from dermcam.progress import Progress
from dermcam.store.checkpoint import Checkpoint

SELECTIONS = ("all", "greedy")
MAX_ROUNDS = 25
SCORE_METRIC = "balanced_accuracy"
SUMMARY = ("balanced_accuracy", "macro_f1", "recall_mel", "auc_macro")


@dataclass
class Selection:
    """Candidates, how often greedy selection took each (0: not a member) and the validation scores."""

    candidates: list[str]
    counts: list[int]
    score: float  # SCORE_METRIC of the chosen combination on validation
    best_single: tuple[str, float]  # the best candidate alone and its score
    history: list[float] = field(default_factory=list)  # score after each greedy round
    singles: list[float] = field(default_factory=list)  # each candidate's own score

    @property
    def members(self) -> list[tuple[str, int]]:
        return [(c, n) for c, n in zip(self.candidates, self.counts) if n]

    def to_dict(self) -> dict[str, Any]:
        return {"metric": SCORE_METRIC, "split": "val", "score": round(self.score, 6),
                "candidates": self.candidates, "counts": self.counts,
                "best_single": {"id": self.best_single[0], "score": round(self.best_single[1], 6)},
                "history": [round(h, 6) for h in self.history], "singles": [round(v, 6) for v in self.singles]}


def _score(y_true: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(balanced accuracy, -log loss) of argmax decisions: larger is better in both."""
    predicted = probs.argmax(axis=1)
    recalls = [float((predicted[y_true == k] == k).mean()) for k in np.unique(y_true)]
    picked = probs[np.arange(len(y_true)), y_true]
    return float(np.mean(recalls)), float(np.log(np.clip(picked, 1e-12, 1.0)).mean())


TOLERANCE = 1e-9  # averaging a model with itself changes the log loss by rounding only: not a gain


def _beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Is score ``a`` better than ``b`` by more than rounding? Balanced accuracy first, then log loss."""
    if abs(a[0] - b[0]) > TOLERANCE:
        return a[0] > b[0]
    return a[1] > b[1] + TOLERANCE


def _first_best(scores: list[tuple[float, float]]) -> int:
    """Index of the best score; among scores equal up to rounding, the first (the earlier candidate)."""
    best = 0
    for i in range(1, len(scores)):
        if _beats(scores[i], scores[best]):
            best = i
    return best


def greedy_select(probs: list[np.ndarray], y_true: np.ndarray, ids: list[str],
                  rounds: int = MAX_ROUNDS) -> Selection:
    """Caruana's forward selection with replacement over candidates' validation probabilities.

    Runs ``rounds`` additions and keeps the best prefix (the first one reaching the top score), so a
    later addition that does not help is never kept.
    """
    if not probs:
        raise BadInputError("greedy selection needs at least one candidate")
    y_true = np.asarray(y_true, dtype=np.int64)
    singles = [_score(y_true, p) for p in probs]
    start = _first_best(singles)
    counts = np.zeros(len(probs), dtype=np.int64)
    counts[start] = 1
    total = probs[start].astype(np.float64).copy()
    history, best_counts, best = [singles[start][0]], counts.copy(), singles[start]
    for _ in range(max(0, rounds - 1)):
        n = counts.sum()
        trials = [_score(y_true, (total + p) / (n + 1)) for p in probs]
        pick = _first_best(trials)
        counts[pick] += 1
        total += probs[pick]
        history.append(trials[pick][0])
        if _beats(trials[pick], best):
            best, best_counts = trials[pick], counts.copy()
    return Selection(list(ids), [int(c) for c in best_counts], best[0], (ids[start], singles[start][0]), history,
                     [s[0] for s in singles])


def top_checkpoints(k: int, dataset: str | None = None, root: Path | None = None,
                    notes: list[str] | None = None) -> list[Checkpoint]:
    """The best checkpoint of each of the ``k`` best runs (by their monitored metric) on ``dataset``
    (default: the data set of the best checkpoint in the store), among runs of the same classes.
    ``notes`` gets one line per damaged checkpoint or run left out of the ranking."""
    from dermcam.store.checkpoint import best_of, rank_key
    from dermcam.store.references import skipped_line
    from dermcam.store.runs import scan_checkpoints

    if k < 1:
        raise BadInputError("--top must be 1 or more")
    everything, damaged = scan_checkpoints(root)
    if notes is not None:
        notes.extend(skipped_line(d) for d in damaged)
    if dataset is not None:
        everything = [c for c in everything if (c.sidecar.get("dataset") or {}).get("name") == dataset]
    overall = best_of(everything)
    if overall is None:
        where = f" trained on data set '{dataset}'" if dataset else ""
        raise BadInputError(f"no checkpoint with a monitored metric{where}; train one with: dermcam train")
    group = overall.rank_group
    by_run: dict[str, list[Checkpoint]] = {}
    for ckpt in everything:
        if ckpt.rank_group == group:
            by_run.setdefault(ckpt.run_id, []).append(ckpt)
    bests = [b for b in (best_of(c) for c in by_run.values()) if b is not None]
    return sorted(bests, key=rank_key)[:k]


@dataclass
class EnsembleResult:
    """What ``ensemble create`` made: the stored ensemble, how it was chosen and how it scores on val."""

    name: str
    path: Path
    members: list[dict[str, Any]]
    selection: dict[str, Any]
    val_metrics: dict[str, Any] | None
    operating_point: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "id": f"ensemble:{self.name}", "path": str(self.path), "members": self.members,
                "selection": self.selection, "val_metrics": self.val_metrics,
                "operating_point": self.operating_point, "warnings": self.warnings}


def _validation(ckpts: list[Checkpoint], dataset: str | None, root: Path | None) -> Any:
    """The validation split all candidates are judged on: their common training set, unchanged since."""
    from dermcam.evaluate.evaluation import scored_split

    names = {(c.sidecar.get("dataset") or {}).get("name") for c in ckpts}
    target = dataset or (names.pop() if len(names) == 1 else None)
    if target is None or any((c.sidecar.get("dataset") or {}).get("name") != target for c in ckpts):
        raise BadInputError("choosing members or an operating point reads the validation split of the set the "
                            "members were trained on, and these were trained on different sets "
                            f"({', '.join(sorted(str(n) for n in names))}); use --select all without "
                            "--operating-point, or members of one set")
    return scored_split(ckpts[0].sidecar, target, "val", root)


def member_probabilities(ckpts: list[Checkpoint], split: Any, *, device: str = "auto", batch_size: int = 64,
                         progress: Progress | None = None) -> list[np.ndarray]:
    """Each checkpoint's calibrated probabilities on the split's images (as it alone would report them)."""
    from dermcam.data.metadata import model_metadata
    from dermcam.evaluate.operating import model_outputs
    from dermcam.evaluate.predict import predict
    from dermcam.models.device import select_device
    from dermcam.store.inference import model_from_checkpoint

    dev = select_device(device)
    out = []
    for ckpt in ckpts:
        model = model_from_checkpoint(ckpt).to(dev)
        raw = predict(model, split.data.images, split.rows, preprocessing=ckpt.sidecar["preprocessing"], device=dev,
                      batch_size=batch_size, progress=progress, description=f"val {ckpt.id}",
                      metadata=model_metadata(ckpt.sidecar, split.index))
        out.append(model_outputs(raw, ckpt.sidecar).probs)
    return out


def select_members(ckpts: list[Checkpoint], *, dataset: str | None = None, device: str = "auto",
                   batch_size: int = 64, rounds: int = MAX_ROUNDS, root: Path | None = None,
                   progress: Progress | None = None) -> Selection:
    """Greedy selection over ``ckpts`` on their validation split (what ``--select greedy`` and the
    training comparison do)."""
    split = _validation(ckpts, dataset, root)
    probs = member_probabilities(ckpts, split, device=device, batch_size=batch_size, progress=progress)
    return greedy_select(probs, split.y_true, [c.id for c in ckpts], rounds)


def offer_ensemble(checkpoint_ids: list[str], *, device: str = "auto", batch_size: int = 64,
                   root: Path | None = None, progress: Progress | None = None) -> Selection | None:
    """The best ensemble of the runs a training comparison just made (their best checkpoints), by
    greedy selection on validation; None when fewer than two of them can be combined (other data
    sets, classes or caches than the first)."""
    from dermcam.store.ensembles import check_members
    from dermcam.store.references import resolve

    def fits(first: Checkpoint, ckpt: Checkpoint) -> bool:
        try:
            check_members([first, ckpt])
        except BadInputError:
            return False
        return ckpt.rank_group == first.rank_group

    ckpts = [resolve(i, root) for i in dict.fromkeys(checkpoint_ids)]
    if not ckpts:
        return None
    combinable = [ckpts[0]] + [c for c in ckpts[1:] if fits(ckpts[0], c)]
    if len(combinable) < 2:
        return None
    return select_members(combinable, device=device, batch_size=batch_size, root=root, progress=progress)


def create_ensemble(name: str, refs: list[str] | None = None, *, top: int | None = None,
                    dataset: str | None = None, weights: list[float] | None = None, select: str = "all",
                    operating_point: str | None = None, replace: bool = False, device: str = "auto",
                    batch_size: int = 64, preselected: Selection | None = None, root: Path | None = None,
                    progress: Progress | None = None) -> EnsembleResult:
    """Make and store an ensemble of ``refs`` (or of the ``top`` best runs), scored on validation.

    ``select="greedy"`` keeps the members (and weights) that greedy selection picks; ``weights`` gives
    them by hand instead. ``operating_point`` (``mel:sensitivity=0.90``) is chosen on the ensemble's
    own validation probabilities, the same ones ``evaluate`` will compute. ``preselected``: a greedy
    selection already made over ``refs`` (by :func:`offer_ensemble`), so it is not computed again.
    """
    from dermcam.data.metadata import model_metadata
    from dermcam.evaluate.metrics import compute_metrics
    from dermcam.evaluate.operating import check_labels, choose, parse_operating_point
    from dermcam.evaluate.predict import predict
    from dermcam.models.device import select_device
    from dermcam.store.ensembles import check_members, check_new_name, new_manifest, save_ensemble
    from dermcam.store.files import utc_now
    from dermcam.store.inference import load_ensemble
    from dermcam.store.references import find_checkpoint

    check_new_name(name, root)  # every option is checked before any model is loaded
    if select not in SELECTIONS:
        raise BadInputError(f"--select must be one of {', '.join(SELECTIONS)}, not '{select}'")
    if bool(refs) == (top is not None):
        raise BadInputError("name the member checkpoints, or give --top K (not both)")
    if weights is not None and select == "greedy":
        raise BadInputError("--weights and --select greedy both set the weights; give one")
    spec = parse_operating_point(operating_point) if operating_point else None
    warnings: list[str] = []  # damaged checkpoints passed over in choosing the members
    if refs:
        found = [find_checkpoint(r, root) for r in refs]
        ckpts = [f.checkpoint for f in found]
        warnings += list(dict.fromkeys(w for f in found for w in f.warnings))
    else:
        ckpts = top_checkpoints(int(top or 0), dataset, root, warnings)
    check_members(ckpts)
    if weights is not None and len(weights) != len(ckpts):
        raise BadInputError(f"--weights needs {len(ckpts)} numbers, one per member (got {len(weights)})")
    try:
        split = _validation(ckpts, dataset, root)
    except DermcamError:
        if select == "greedy" or spec is not None:
            raise
        split = None  # members of different sets (or a set since deleted): stored without a validation score
    if spec is not None:
        check_labels(spec, list(ckpts[0].sidecar["classes"]), split.y_true, "the validation split")
    selection: dict[str, Any] = {"method": select}
    chosen, chosen_weights = ckpts, list(weights or [1.0] * len(ckpts))
    if select == "greedy":
        if preselected is not None and preselected.candidates == [c.id for c in ckpts]:
            picked = preselected
        else:
            probs = member_probabilities(ckpts, split, device=device, batch_size=batch_size, progress=progress)
            picked = greedy_select(probs, split.y_true, [c.id for c in ckpts])
        chosen = [c for c, n in zip(ckpts, picked.counts) if n]
        chosen_weights = [float(n) for n in picked.counts if n]
        selection.update(picked.to_dict())
    ensemble = new_manifest(name, chosen, chosen_weights, selection=selection, root=root)
    val_metrics = point = None
    if split is not None:  # the ensemble as evaluate will run it, on validation
        from dermcam.evaluate.operating import model_outputs

        model, document = load_ensemble(ensemble, root)
        dev = select_device(device)
        raw = predict(model.to(dev), split.data.images, split.rows, preprocessing=document["preprocessing"],
                      device=dev, batch_size=batch_size, progress=progress, description=f"val ensemble:{name}",
                      metadata=model_metadata(document, split.index))
        probs = model_outputs(raw, document).probs
        classes = list(ensemble.manifest["classes"])
        val_metrics = compute_metrics(split.y_true, probs, classes)
        if spec is not None:
            c = classes.index(spec.name)
            point = {**choose(probs[:, c], split.y_true == c, spec), "created": utc_now()}
            ensemble.manifest["operating_point"] = point
        ensemble.manifest["selection"]["val_metrics"] = {k: val_metrics[k] for k in SUMMARY if k in val_metrics}
    ensemble = save_ensemble(ensemble, replace=replace, root=root)
    if val_metrics is not None:  # each tracked member's run learns the ensemble it is in (dermcam.track)
        from dermcam.track.base import numbers
        from dermcam.track.hooks import log_result

        members = ",".join(c.id for c in chosen)
        for ckpt in chosen:
            log_result(ckpt.sidecar, f"ensemble/{name}/val", numbers(val_metrics),
                       tags={f"dermcam.ensemble.{name}": members}, root=root, progress=progress)
    if point is not None and not point["validation"]["reached"]:
        warnings.append(f"operating point {spec}: no threshold reaches the target on validation")
    return EnsembleResult(name, ensemble.path, ensemble.manifest["members"], selection, val_metrics, point, warnings)

"""Patient metadata alone, for perspective: what age, sex and site predict without any image.

    python benchmarks/metadata_baseline.py [--home /tmp/dermcam-meta] [--seed 0]

Prepares ../shared/data/ham10000-lite (lesion-grouped 70/15/15 split, seed 0) in a store of its own,
encodes the rows exactly as ``dermcam train --metadata`` does (:mod:`dermcam.data.metadata`: the
encoding fitted on the train split) and fits scikit-learn's HistGradientBoostingClassifier (balanced
class weights, as ``--balance loss``) on the train split, scored on val and test with dermcam's own
metrics. One row per field set: each field alone and the three together.

A last row shows why ``--metadata dx_type`` is refused: the diagnosis method alone (one-hot, encoded
here by hand, never by dermcam) scores far above the patient fields, because it is decided by the
diagnosis (follow-up images are nearly all nv, every melanoma is histo). A model given it would learn
the answer sheet, not the lesion.

Results go to benchmarks/results/metadata_baseline.json. Runs in seconds once the set is prepared.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from _common import LITE, report

FIELD_SETS = ("age", "sex", "site", "age,sex,site")
HEADLINE = ("balanced_accuracy", "recall_mel", "auc_macro", "macro_f1")


def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, evaluations: dict[str, tuple[np.ndarray, np.ndarray]],
                  classes: list[str], seed: int) -> dict[str, dict[str, float]]:
    """HistGradientBoosting on ``x_train``; dermcam's headline metrics on each evaluation split."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from dermcam.evaluate.metrics import compute_metrics

    model = HistGradientBoostingClassifier(class_weight="balanced", random_state=seed, max_iter=200,
                                           learning_rate=0.05, early_stopping=False)
    model.fit(x_train, y_train)
    out = {}
    for split, (x, y) in evaluations.items():
        probs = np.zeros((len(x), len(classes)))
        probs[:, model.classes_] = model.predict_proba(x)
        metrics = compute_metrics(y, probs, classes)
        out[split] = {k: float(metrics[k]) for k in HEADLINE}
    return out


def dx_type_features(index, vocabulary: list[str]) -> np.ndarray:
    """The diagnosis method one-hot (plus other): for the leak demonstration only."""
    values = index["dx_type"].fillna("").astype(str).str.strip().str.lower().to_numpy()
    position = {v: i for i, v in enumerate(vocabulary)}
    out = np.zeros((len(values), len(vocabulary) + 1), dtype=np.float32)
    out[np.arange(len(values)), [position.get(v, len(vocabulary)) for v in values]] = 1.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("/tmp/dermcam-meta"))
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (prepare) and the model's")
    parser.add_argument("--name", default="ham10000-lite")
    args = parser.parse_args()

    os.environ["DERMCAM_HOME"] = str(args.home)
    from dermcam.data.dataset import list_prepared, load_prepared
    from dermcam.data.metadata import encode, fit_spec
    from dermcam.progress import rich_progress

    start = time.monotonic()
    if not any(m["name"] == args.name for m in list_prepared()):
        from dermcam.data.prepare import prepare

        with rich_progress() as progress:
            prepare(LITE, name=args.name, seed=args.seed, progress=progress)
    prepared = time.monotonic()
    data = load_prepared(args.name)
    classes = list(data.classes)
    splits = {split: data.split(split) for split in ("train", "val", "test")}
    index = {split: data.index.iloc[rows].reset_index(drop=True) for split, (rows, _) in splits.items()}
    labels = {split: y for split, (_, y) in splits.items()}

    rows, scores = [], {}
    for fields in FIELD_SETS:
        t0 = time.monotonic()
        spec = fit_spec(fields, index["train"])  # fitted on train only, as training does
        x = {split: encode(spec, index[split]) for split in splits}
        result = fit_and_score(x["train"], labels["train"], {s: (x[s], labels[s]) for s in ("val", "test")},
                               classes, args.seed)
        scores[fields] = result
        rows.append(_row(fields, spec.dim, result, time.monotonic() - t0))
    vocabulary = sorted(set(index["train"]["dx_type"].str.strip().str.lower()) - {""})
    x = {split: dx_type_features(index[split], vocabulary) for split in splits}
    leak = fit_and_score(x["train"], labels["train"], {s: (x[s], labels[s]) for s in ("val", "test")}, classes,
                         args.seed)
    rows.append(_row("dx_type (refused: leaks the label)", len(vocabulary) + 1, leak, 0.0))
    report("metadata_baseline", rows,
           {"data": {"name": data.name, "fingerprint": data.fingerprint, "seed": args.seed, "classes": classes,
                     "n": {s: int(len(labels[s])) for s in splits}},
            "model": "sklearn HistGradientBoostingClassifier(class_weight='balanced', max_iter=200, "
                     "learning_rate=0.05)",
            "scores": scores, "dx_type_leak": leak, "prepare_s": round(prepared - start, 1)})


def _row(fields: str, dim: int, result: dict[str, dict[str, float]], seconds: float) -> dict[str, object]:
    row: dict[str, object] = {"fields": fields, "features": dim}
    for split in ("val", "test"):
        row[f"{split}_bal_acc"] = result[split]["balanced_accuracy"]
        row[f"{split}_mel_recall"] = result[split]["recall_mel"]
        row[f"{split}_auc"] = result[split]["auc_macro"]
    row["fit_s"] = round(seconds, 2)
    return row


if __name__ == "__main__":
    main()

"""The sections of report.html, one function each, from what an evaluation wrote and the checkpoint.

Every function takes :class:`ReportInputs` and returns its section (or ``None`` when it has nothing
to show: no operating point, no training curves); :func:`render` puts them in reading order. The
order follows how a reader checks a result: what was tested on what, how good, how well calibrated,
where it fails (subgroups, the gallery), and last what the model is for (the model card).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dermcam.report.gallery import Case, Gallery
from dermcam.report.html import (
    Markup,
    Section,
    columns,
    figure,
    image,
    join,
    key_values,
    number,
    page,
    paragraph,
    table,
    tag,
    with_ci,
)

DISCLAIMER = ("Research software. dermcam is not a medical device: this model must not be used to diagnose, "
              "triage or reassure patients.")
INTENDED_USE = f"Research on automated classification of dermoscopy images and on how such models fail. {DISCLAIMER}"
NOT_INTENDED = ("Clinical decisions of any kind; images other than dermoscopy of the model's classes; populations, "
                "clinics or devices the training data does not represent.")
CAVEATS = ("Intervals resample lesions of one set and do not cover other clinics, devices or populations. "
           "Calibration was fitted on a validation split and may not transfer to another set.")
FIGURE_FILES = ("curves.png", "confusion_matrix.png", "confusion_matrix_operating_point.png", "reliability.png",
                "roc.png", "pr.png")


@dataclass
class ReportInputs:
    """Everything the page shows: ``metrics`` is the folder's metrics.json, ``figures`` its PNGs by
    file name, ``evaluated``/``training`` the manifests of the two data sets (None where the set is
    not in this store), ``versions`` the library versions that built the page."""

    metrics: dict[str, Any]
    sidecar: dict[str, Any]
    evaluated: dict[str, Any] | None
    training: dict[str, Any] | None
    figures: dict[str, bytes]
    gallery: Gallery
    versions: dict[str, str]
    generated: str
    audit: dict[str, Any] | None = None  # the folder's audit.json with its images (dermcam.audit.run.read_audit)

    @property
    def classes(self) -> list[str]:
        return list(self.sidecar["classes"])

    @property
    def checkpoint(self) -> str:
        return str(self.metrics.get("checkpoint") or self.sidecar.get("id"))

    @property
    def dataset(self) -> str:
        return str(self.metrics["dataset"])

    @property
    def trained_on(self) -> str | None:
        return self.metrics.get("trained_on") or (self.sidecar.get("dataset") or {}).get("name")

    @property
    def intervals(self) -> dict[str, list[float]]:
        return (self.metrics.get("ci") or {}).get("intervals") or {}

    @property
    def title(self) -> str:
        return f"{self.checkpoint} on {self.dataset}/{self.metrics['split']}"


def _external(inputs: ReportInputs) -> bool:
    return inputs.trained_on is not None and inputs.trained_on != inputs.dataset


def summary(inputs: ReportInputs) -> Section:
    """The disclaimer and the headline numbers, each with its interval."""
    m, ci = inputs.metrics, inputs.intervals
    boxes = [_headline(name, m.get(key), ci.get(key)) for name, key in (
        ("balanced accuracy", "balanced_accuracy"), ("macro F1", "macro_f1"), ("AUC (macro)", "auc_macro"),
        ("accuracy (for comparison only)", "accuracy"), ("images", "n"))]
    what = (f"Checkpoint {inputs.checkpoint}, trained on {inputs.trained_on or 'an unknown set'}, evaluated on the "
            f"{m['split']} split of {inputs.dataset}" + (" (external validation)." if _external(inputs) else "."))
    scored = m.get("scored_classes")
    notes = [paragraph(what)]
    if scored and len(scored) < len(inputs.classes):
        notes.append(paragraph(f"This set has only some of the model's classes: balanced accuracy and macro F1 "
                               f"average over {', '.join(scored)}."))
    overlap = m.get("overlap") or {}
    if overlap.get("images"):
        notes.append(paragraph(f"{overlap['images']} of the evaluated images are copies of training images: "
                               + ("kept in these numbers (--keep-overlap)." if overlap.get("kept") else
                                  "left out of these numbers (see Data).")))
    return Section("summary", "Summary", tag("div", DISCLAIMER, class_="warning"),
                   tag("div", *boxes, class_="headline"),
                   *notes)


def _headline(name: str, value: object, interval: list[float] | None) -> Markup:
    """One box of the summary: the value large, its interval under it, then what it is."""
    span = tag("span", f"95% CI {number(interval[0])}-{number(interval[1])}" if interval else "", class_="ci")
    return tag("div", tag("b", number(value)), span, tag("span", name))


def _counts_table(manifest: dict[str, Any], caption: str) -> Section:
    """Images per split and class of a prepared set, with the number of groups (lesions) per split."""
    classes, counts = manifest["classes"], manifest["counts"]
    rows = [[split, sum(per.values()), manifest.get("lesions", {}).get(split, "-"), *(per.get(c, 0) for c in classes)]
            for split, per in counts.items()]
    rows.append(["total", sum(sum(per.values()) for per in counts.values()), sum(manifest.get("lesions", {}).values()),
                 *(sum(per.get(c, 0) for per in counts.values()) for c in classes)])
    return table(["split", "images", "groups", *classes], rows, caption)


def _grouping(manifest: dict[str, Any]) -> str:
    grouping = manifest.get("grouping") or {}
    kinds = ", ".join(f"{n} by {kind}" for kind, n in grouping.items() if n)
    return ("Images are grouped by lesion, else by patient, else each image alone"
            + (f" ({kinds} groups)" if kinds else "")
            + ": no group is on two sides of a split, and the bootstrap resamples whole groups.")


def overlap_text(overlap: dict[str, Any] | None) -> str:
    """What the evaluation found and did about images that are copies of training images ('' when the
    evaluated set is the training set, or the evaluation predates the check)."""
    if not overlap or not (overlap.get("compared_with") or overlap.get("unchecked")):
        return ""
    sets = " and ".join(overlap.get("compared_with") or [])
    unchecked = "; ".join(f"{name} not checked: {why}" for name, why in (overlap.get("unchecked") or {}).items())
    if not sets:
        return f"Overlap with the training set: {unchecked}."
    found = overlap.get("images", 0)
    text = f"Overlap with the training set {sets} (fingerprint threshold {overlap.get('threshold')}): "
    if not found:
        text += "no evaluated image is a copy of a training image."
    else:
        splits = ", ".join(f"{s} {n}" for s, n in (overlap.get("by_split") or {}).items() if n)
        text += (f"{found} of {overlap.get('compared')} images are copies of training images "
                 f"({overlap.get('exact', 0)} byte-identical; in its {splits}), "
                 + ("kept in every metric (--keep-overlap): they measure what the model has seen."
                    if overlap.get("kept") else "left out of every metric here; they are listed in overlap.csv."))
        if overlap.get("mostly"):
            text += " Most of this set is in the training set: as external validation it says little."
    return text + (f" {unchecked}." if unchecked else "")


def data(inputs: ReportInputs) -> Section:
    """Which sets, how many images of each class in each split, how they are grouped, what was left out
    (classes the model does not know; copies of training images)."""
    m = inputs.metrics
    sets = table(
        ["", "data set", "split", "layout", "images"],
        [["evaluated on", inputs.dataset, m["split"], (inputs.evaluated or {}).get("layout", "-"), m["n"]],
         ["trained on", inputs.trained_on or "-", "train", (inputs.training or {}).get("layout", "-"),
          sum(((inputs.training or {}).get("counts") or {}).get("train", {}).values()) if inputs.training else "-"]])
    support = table(["class", "images evaluated"], [[c, m.get(f"support_{c}", 0)] for c in inputs.classes],
                    "images of each of the model's classes in the evaluated split")
    left_out = (paragraph("Left out (classes the model does not know): "
                          + ", ".join(f"{c} ({n})" for c, n in m["left_out"].items())) if m.get("left_out") else "")
    overlap = overlap_text(m.get("overlap"))
    overlap_note = paragraph(overlap, class_="warning" if (m.get("overlap") or {}).get("mostly") else None) \
        if overlap else ""
    splits: list[object] = []
    for title, manifest in (("evaluated", inputs.evaluated), ("training", inputs.training)):
        if manifest is None:
            splits.append(paragraph(f"The {title} set is not in this store; its splits cannot be shown.",
                                    class_="muted"))
        elif title == "evaluated" or _external(inputs):  # one table when both are the same set
            external = " (prepared with --external: evaluation only)" if manifest.get("external") else ""
            splits += [tag("h3", f"{manifest['name']}{external}: images per split"),
                       _counts_table(manifest, _grouping(manifest))]
    return Section("data", "Data", columns(join([sets, support, left_out, overlap_note]), join(splits)))


def _config_value(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else "-" if value is None else str(value)


def model(inputs: ReportInputs) -> Section:
    """The checkpoint, its training configuration and the versions then and now (for an ensemble: its
    rule, members and how they were chosen)."""
    from dermcam.evaluate.calibration import describe

    s = inputs.sidecar
    if s.get("kind") == "ensemble":
        return _ensemble_model(inputs)
    pre = s.get("preprocessing") or {}
    size = pre.get("input_size") or []
    point = s.get("operating_point")
    facts = [("checkpoint", s.get("id")), ("backbone", s.get("backbone")),
             ("classes", ", ".join(inputs.classes)),
             ("input", f"{size[2]}x{size[1]} px (width x height)" if len(size) == 3 else "-"),
             ("epoch", number(s.get("epoch")) if s.get("epoch") is not None else "-"),
             ("created", s.get("created", "-")),
             ("weights sha256", ((s.get("weights") or {}).get("sha256") or s.get("sha256") or "-")[:16]),
             ("calibration", describe(s.get("calibration"))),
             ("operating point", f"{point['class']}:{point['metric']}={point['target']:g}, threshold "
                                 f"{point['threshold']:.3f}" if point else "none"),
             *metadata_facts(inputs)]
    config = sorted((s.get("config") or {}).items())
    trained = s.get("versions") or {}
    names = sorted(set(trained) | set(inputs.versions))
    versions = table(["library", "trained with", "this report"],
                     [[n, trained.get(n, "-"), inputs.versions.get(n, "-")] for n in names])
    settings = (key_values((k, _config_value(v)) for k, v in config) if config
                else paragraph("not recorded", class_="muted"))
    return Section("model", "Model, configuration and versions",
                   columns(join([key_values(facts), tag("h3", "Versions"), versions]),
                           join([tag("h3", "Training configuration"), settings])))


def _ensemble_model(inputs: ReportInputs) -> Section:
    """An ensemble has no epoch, weights file or training configuration of its own: the page lists its
    members instead (each with its own input size and calibration, applied before the weighted mean)."""
    from dermcam.evaluate.calibration import describe

    s = inputs.sidecar
    point, selection = s.get("operating_point"), s.get("selection") or {}
    width, height = (s.get("preprocessing") or {}).get("cache_size") or ("?", "?")
    facts = [("ensemble", s.get("id")), ("rule", "weighted mean of the members' calibrated probabilities"),
             ("classes", ", ".join(inputs.classes)),
             ("input", f"the {width}x{height} px cache image; each member resizes it to its own input"),
             ("created", s.get("created") or s.get("exported") or "-"),
             ("members chosen", {"greedy": "greedy forward selection on the validation split",
                                 "all": "all candidates"}.get(str(selection.get("method")), "as listed")
              + (f" (validation balanced accuracy {selection['score']:.3f})"
                 if isinstance(selection.get("score"), (int, float)) else "")),
             ("operating point", f"{point['class']}:{point['metric']}={point['target']:g}, threshold "
                                 f"{point['threshold']:.3f}" if point else "none"),
             *metadata_facts(inputs)]
    rows, total = [], sum(float(m.get("weight") or 0) for m in s.get("members") or []) or 1.0
    for m in s.get("members") or []:
        size = m.get("input_size") or []
        rows.append([m.get("id", "-"), m.get("backbone", "-"),
                     f"{size[2]}x{size[1]}" if len(size) == 3 else "-",
                     describe(m.get("calibration")), number(float(m.get("weight") or 0) / total, 3),
                     (m.get("sha256") or "-")[:12]])
    members = table(["member", "backbone", "input", "calibration", "weight", "weights sha256"], rows,
                    "Each member's calibration is applied to its own probabilities before the weighted mean.")
    names = sorted(inputs.versions)
    versions = table(["library", "this report"], [[n, inputs.versions.get(n, "-")] for n in names])
    return Section("model", "Model, configuration and versions",
                   join([key_values(facts), tag("h3", "Members"), members, tag("h3", "Versions"), versions]))


def metadata_facts(inputs: ReportInputs) -> list[tuple[str, str]]:
    """The patient metadata the model reads (an ensemble: any member; "none: the image only"), and what
    the evaluation gave it, as evaluate recorded it: per field how many images had a value, and how many
    had none (answered from the image alone)."""
    from dermcam.data.metadata_input import model_fields

    fields = model_fields(inputs.sidecar)
    facts = [("patient metadata", ", ".join(fields) + " (fused with the image features)" if fields
              else "none: the image only")]
    summary = inputs.metrics.get("metadata")
    if fields and isinstance(summary, dict) and summary.get("images"):
        images, known = int(summary["images"]), summary.get("known") or {}
        counts = ", ".join(f"{f} {int(known.get(f, 0))}/{images}" for f in summary.get("fields") or fields)
        none = int(summary.get("without_metadata", 0))
        facts.append(("metadata in this evaluation",
                      f"known: {counts}; {none} of {images} images had none (answered from the image alone)"))
    return facts


def metrics(inputs: ReportInputs) -> Section:
    """Per-class recall, precision, F1 and AUC with their 95% intervals."""
    m, ci = inputs.metrics, inputs.intervals
    rows = [[c, with_ci(m.get(f"recall_{c}"), ci.get(f"recall_{c}")),
             with_ci(m.get(f"precision_{c}"), ci.get(f"precision_{c}")), number(m.get(f"f1_{c}")),
             with_ci(m.get(f"auc_{c}"), ci.get(f"auc_{c}")), m.get(f"support_{c}", 0)] for c in inputs.classes]
    rows.append([tag("b", "balanced accuracy / macro"), with_ci(m.get("balanced_accuracy"), ci.get("balanced_accuracy")),
                 "", with_ci(m.get("macro_f1"), ci.get("macro_f1")), with_ci(m.get("auc_macro"), ci.get("auc_macro")),
                 m["n"]])
    info = m.get("ci") or {}
    caption = (f"In brackets: {info.get('level', 0.95):.0%} bootstrap interval over {info.get('resamples')} resamples "
               f"of {info.get('unit', 'lesion')}s; none where a metric is undefined in too many resamples."
               if info else "No intervals (evaluated with --resamples 0).")
    caption += " Balanced accuracy is the mean recall; accuracy alone says little on imbalanced data."
    return Section("metrics", "Metrics", table(["class", "recall (sensitivity)", "precision", "F1", "AUC", "images"],
                                               rows, caption))


def calibration(inputs: ReportInputs) -> Section | None:
    """ECE, Brier and NLL of the raw and the reported (calibrated) probabilities, and the diagram."""
    from dermcam.evaluate.calibration import describe

    cal = inputs.metrics.get("calibration")
    if not cal:
        return None
    raw = cal["raw"]
    rows = [[name, number(raw[key], 4), number(cal[key], 4) if cal["applied"] else "-"]
            for name, key in (("ECE (15 bins)", "ece"), ("Brier", "brier"), ("NLL", "nll"))]
    if not cal["applied"]:
        applied = "No calibration applied: raw probabilities."
    elif cal["method"] == "members":
        applied = (f"Calibration applied: {describe(cal)}, each fitted on the validation split; raw is the "
                   "weighted mean of the members' uncalibrated probabilities.")
    else:
        applied = f"Calibration applied: {describe(cal)}, fitted on the validation split."
    body: list[object] = [paragraph(applied), table(["", "raw", "calibrated (reported)"], rows, "lower is better")]
    if "reliability.png" in inputs.figures:
        body.append(figure(inputs.figures["reliability.png"], "reliability diagram",
                           "Accuracy against confidence in 15 bins; a calibrated model follows the diagonal."))
    return Section("calibration", "Calibration", *body)


def operating_point(inputs: ReportInputs) -> Section | None:
    """The stored threshold, what it reached on validation and what its decisions score here."""
    point = inputs.metrics.get("operating_point")
    if not point:
        return None
    intervals = (point.get("ci") or {}).get("intervals") or {}
    val = point.get("validation") or {}
    rows = [["validation (where it was chosen)", number(val.get("sensitivity")), number(val.get("specificity")),
             val.get("positives", "-"), val.get("n", "-")],
            [f"{inputs.dataset}/{inputs.metrics['split']}", with_ci(point["sensitivity"], intervals.get("sensitivity")),
             with_ci(point["specificity"], intervals.get("specificity")), point["positives"], point["n"]]]
    body: list[object] = [
        paragraph(f"Predict {point['class']} when its calibrated probability is at least {point['threshold']:.3f}, "
                  f"else the most probable other class; chosen for {point['metric']} {point['target']:g} on the "
                  "validation split. The headline metrics above stay those of the argmax."),
        table(["", "sensitivity", "specificity", f"{point['class']} images", "images"], rows)]
    if "confusion_matrix_operating_point.png" in inputs.figures:
        body.append(figure(inputs.figures["confusion_matrix_operating_point.png"],
                           "confusion matrix of the operating point's decisions", "Decisions at the operating point."))
    return Section("operating-point", "Operating point", *body)


def _figure_section(section_id: str, title: str, files: tuple[tuple[str, str], ...],
                    inputs: ReportInputs) -> Section | None:
    present = [figure(inputs.figures[name], alt) for name, alt in files if name in inputs.figures]
    return Section(section_id, title, tag("div", *present, class_="figures")) if present else None


def training_curves(inputs: ReportInputs) -> Section | None:
    return _figure_section("training-curves", "Training curves",
                           (("curves.png", "training loss and validation metrics per epoch"),), inputs)


def confusion_matrix(inputs: ReportInputs) -> Section | None:
    return _figure_section("confusion-matrix", "Confusion matrix",
                           (("confusion_matrix.png", "confusion matrix (argmax)"),), inputs)


def roc_pr(inputs: ReportInputs) -> Section | None:
    return _figure_section("roc-pr", "ROC and precision-recall curves",
                           (("roc.png", "one-vs-rest ROC curves"), ("pr.png", "precision-recall curves")), inputs)


def subgroups(inputs: ReportInputs) -> Section:
    """The headline metrics per sex, age band, site and source; small groups say so instead."""
    entries = inputs.metrics.get("subgroups") or []
    if not entries:
        return Section("subgroups", "Subgroups", paragraph(
            "The evaluated set records no subgroup (sex, age, anatomical site, source) with at least two values."))
    keys = ("balanced_accuracy", "macro_f1", "auc_macro", *(f"recall_{c}" for c in inputs.classes))
    rows = []
    for entry in entries:
        name = f"{entry['title']}: {entry['value']}"
        if "metrics" not in entry:
            rows.append([name, entry["n"], tag("span", entry.get("note", ""), class_="muted"),
                         *([""] * (len(keys) - 1))])
        else:
            ci = entry.get("ci") or {}
            rows.append([name, entry["n"], *(with_ci(entry["metrics"].get(k), ci.get(k)) for k in keys)])
    return Section("subgroups", "Subgroups", table(
        ["group", "images", "bal. accuracy", "macro F1", "AUC", *(f"{c} recall" for c in inputs.classes)], rows,
        "A subgroup with too few images shows no numbers: its interval would be too wide to read."))


def _case(case: Case) -> Markup:
    verdict = "correct" if case.correct else f"wrong: true class {case.true}"
    return tag("div",
               tag("div", image(case.photo, f"image {case.image_id}"),
                   image(case.overlay, f"Grad-CAM of {case.answer} for image {case.image_id}"), class_="pair"),
               paragraph(tag("b", case.answer), f" {case.confidence:.1%} — {verdict}"),
               paragraph(f"{case.image_id} (lesion {case.lesion_id})", class_="muted"),
               class_="case" + ("" if case.correct else " error"))


def gallery(inputs: ReportInputs) -> Section:
    """The most confident errors, then a few correct cases: each photo beside its Grad-CAM overlay."""
    g = inputs.gallery
    body: list[object] = [paragraph(
        "Each image as the model saw it (left) and the Grad-CAM of the class it answered (right; the operating "
        "point's decision when there is one). Grad-CAM shows "
        "where the model looked, not why, and is no evidence that an answer is right.")]
    if g.note:
        body.append(paragraph(g.note, class_="muted"))
    for title, cases in (("Most confident errors", g.errors), ("Correct cases", g.correct)):
        if cases:
            body += [tag("h3", title), tag("div", *(_case(c) for c in cases), class_="gallery")]
    return Section("gallery", "Gallery", *body)


REGION_WORDS = {"border": "border band", "vignette": "dark vignette", "ink": "ink-like marks",
                "off_lesion": "off the lesion"}


def _signed(value: object, digits: int = 3) -> str:
    """``+0.123`` / ``-0.045``: a change, its sign always shown, never ``-0.000`` (:func:`number`'s rule)."""
    text = number(value, digits)
    return text if text in ("-", "0." + "0" * digits) or text.startswith("-") else "+" + text


def _share_interval(value: object, interval: list[float] | None, digits: int = 3, sign: bool = False) -> Markup:
    show = _signed if sign else number
    if not interval:
        return join([show(value, digits)])
    return join([show(value, digits), tag("span", f"({show(interval[0], digits)} to {show(interval[1], digits)})",
                                          class_="ci")], " ")


def _audit_attention(audit: dict[str, Any], attention: dict[str, Any]) -> list[object]:
    rules = attention.get("rules") or {}
    body: list[object] = [tag("h3", "Where the attention goes")]
    if "audit/attention.png" in audit["images"]:
        body.append(figure(audit["images"]["audit/attention.png"], "share of the Grad-CAM mass per region",
                           "Each box: one region's share of the map's mass over the images where the region exists "
                           "(whiskers 5-95%)."))
    flagged = {f["region"] for f in attention.get("flags") or []}
    rows = []
    for region, s in (attention.get("overall") or {}).items():
        rows.append([REGION_WORDS.get(region, region), s.get("n", 0), number(s.get("p50")), number(s.get("p90")),
                     f"{s.get('most', 0)} ({number(s.get('most_share'))})" if s.get("n") else "-",
                     tag("b", "flagged") if region in flagged else "no"])
    body.append(table(["region", "images", "median share", "90th percentile", "most of the map (share)", "flag"], rows,
                      f"Share: the fraction of the {attention.get('method', 'Grad-CAM')} map's mass (of the decided "
                      f"class) in the region. Most of the map: a share above {rules.get('most', 0.5):g}. A region is "
                      f"flagged when it holds most of the map in at least {rules.get('flag_share', 0.2):.0%} of the "
                      "images where it exists; off the lesion counts only images whose lesion mask worked "
                      f"({attention.get('lesion_mask_failed', 0)} did not)."))
    by_class = attention.get("by_class") or {}
    if by_class:
        regions = list(attention.get("overall") or {})
        body.append(table(["true class", "images", *(f"median {REGION_WORDS.get(r, r)}" for r in regions)],
                          [[name, c["n"], *(number((c["regions"].get(r) or {}).get("p50")) for r in regions)]
                           for name, c in by_class.items()]))
    off = attention.get("off_lesion") or {}
    if (off.get("off_lesion") or {}).get("n") and (off.get("rest") or {}).get("n"):
        rows = [[label, g["n"], g["wrong"], with_ci(g["rate"], g["ci"])]
                for label, g in (("most of the map off the lesion", off["off_lesion"]), ("the others", off["rest"]))]
        body.append(table(["images", "n", "wrong", "error rate"], rows,
                          join([f"Are off-lesion images more often wrong? {off.get('verdict', '-')}: difference ",
                                _share_interval(off.get("difference"), off.get("difference_ci"), sign=True),
                                " (Wilson intervals; Newcombe's for the difference)."], "")))
    cases = []
    for example in audit.get("examples", {}).get("attention") or []:
        photo, overlay = audit["images"].get(example.get("photo")), audit["images"].get(example.get("overlay"))
        if photo is None or overlay is None:
            continue
        verdict = "correct" if example.get("correct") else f"wrong: true class {example.get('true')}"
        cases.append(tag("div", tag("div", image(photo, f"image {example['image_id']}, lesion mask outlined"),
                                    image(overlay, f"Grad-CAM of {example['decision']} for image {example['image_id']}"),
                                    class_="pair"),
                         paragraph(tag("b", f"{REGION_WORDS.get(example['finding'], example['finding'])} "
                                            f"{example['share']:.0%}"), f" — decided {example['decision']}, {verdict}"),
                         paragraph(str(example["image_id"]), class_="muted"),
                         class_="case" + ("" if example.get("correct") else " error")))
    if cases:
        body += [tag("h4", "Images where the map is off the lesion or on a flagged region"),
                 paragraph("Left: the image with the lesion mask outlined in white (when the rule found one); right: "
                           "the Grad-CAM of the decided class.", class_="muted"),
                 tag("div", *cases, class_="gallery")]
    return body


def _audit_stress(audit: dict[str, Any], stress: dict[str, Any]) -> list[object]:
    positive = stress.get("positive_class", "?")
    rules = stress.get("rules") or {}
    body: list[object] = [tag("h3", "What changes the answer")]
    if "audit/stress.png" in audit["images"]:
        body.append(figure(audit["images"]["audit/stress.png"], f"change of p({positive}) and flipped decisions",
                           "Red: outside the stable rule. Bars: 95% intervals."))
    rows = []
    for r in stress.get("perturbations") or []:
        verdict = "stable" if r["stable"] else (r.get("direction") or "moves")
        rows.append([r["name"], r["kind"], _share_interval(r["mean_delta"], r.get("mean_delta_ci"), sign=True),
                     number(r["mean_abs_delta"]), with_ci(r["flip_share"], r.get("flip_ci")),
                     f"{r['flipped']}/{r['n']}", f"{r['to_positive']}/{r['from_positive']}",
                     verdict if r["stable"] else tag("b", verdict)])
    body.append(table(["perturbation", "kind", f"mean change of p({positive})", "mean |change|", "flipped (share)",
                       "flipped", f"to/from {positive}", "verdict"], rows,
                      f"Calibrated p({positive}) and decisions as evaluate computes them, perturbed minus original. "
                      f"Stable: mean |change| under {rules.get('stable_mean_abs_delta', 0.02):g} and under "
                      f"{rules.get('stable_flip_share', 0.02):.0%} of the decisions flipped. For artefacts the verdict "
                      "says whether the interval of the mean change lies above or below zero."))
    cases = []
    for example in audit.get("examples", {}).get("stress") or []:
        before, after = audit["images"].get(example.get("before")), audit["images"].get(example.get("after"))
        if before is None or after is None:
            continue
        cases.append(tag("div", tag("div", image(before, f"image {example['image_id']}"),
                                    image(after, f"image {example['image_id']} with {example['perturbation']}"),
                                    class_="pair"),
                         paragraph(tag("b", example["perturbation"]),
                                   f" p({positive}) {example['p_before']:.3f} → {example['p_after']:.3f}; decided "
                                   f"{example['decision_before']} → {example['decision_after']}"),
                         paragraph(str(example["image_id"]), class_="muted"),
                         class_="case" + (" error" if example["decision_before"] != example["decision_after"] else "")))
    if cases:
        body += [tag("h4", "The image each moving perturbation changes most (before, after)"),
                 tag("div", *cases, class_="gallery")]
    return body


def shortcuts(inputs: ReportInputs) -> Section | None:
    """``dermcam audit``'s findings when the folder holds an audit of this checkpoint: where the
    Grad-CAM mass falls (border, vignette, ink, off the lesion) and what perturbations do to the answer."""
    audit = inputs.audit
    if not audit:
        return None
    if "error" in audit:
        return Section("shortcuts", "Shortcuts and robustness", paragraph(audit["error"], class_="muted"))
    limited = f" ({audit['n']} of {audit['available']}, drawn with seed {audit['seed']})" \
        if audit.get("available") and audit["available"] != audit["n"] else f" (seed {audit.get('seed')})"
    where = f"{audit.get('dataset')}/{audit.get('split')}"
    other = "" if where == f"{inputs.dataset}/{inputs.metrics['split']}" else " (not the split evaluated above)"
    findings = audit.get("findings") or []
    alarming = bool((audit.get("attention") or {}).get("flags") or (audit.get("stress") or {}).get("moving"))
    body: list[object] = [
        paragraph(f"dermcam audit of {where}{other}: {audit.get('n')} images{limited}, {audit.get('created', '')}. "
                  "Does the model look at the lesion, and does its answer depend on the photograph (ink marks, "
                  "rulers, the dermoscope's dark vignette, hair, orientation, exposure, compression)?"),
        tag("ul", *(tag("li", line) for line in findings), class_="warning" if alarming else None)]
    if audit.get("attention"):
        body += _audit_attention(audit, audit["attention"])
    if audit.get("stress"):
        body += _audit_stress(audit, audit["stress"])
    return Section("shortcuts", "Shortcuts and robustness", *body)


def _subgroup_summary(entries: list[dict[str, Any]]) -> str:
    """``sex female: balanced accuracy 0.781; ...; 2 subgroups with too few images`` (the table has the rest)."""
    if not entries:
        return "not recorded in the evaluated set"
    measured = [f"{e['title']} {e['value']}: balanced accuracy {number(e['metrics']['balanced_accuracy'])}"
                for e in entries if "metrics" in e]
    small = len(entries) - len(measured)
    return "; ".join(measured + ([f"{small} subgroup(s) with too few images to report"] if small else []))


def model_card(inputs: ReportInputs) -> Section:
    """Intended use, data and results in the shape of a model card (Mitchell et al., 2019), shortened."""
    m, ci = inputs.metrics, inputs.intervals
    sidecar = inputs.sidecar
    training = inputs.training
    train_counts = (training or {}).get("counts", {}).get("train", {})
    trained = (f"{inputs.trained_on}: {sum(train_counts.values())} training images "
               f"({', '.join(f'{c} {n}' for c, n in train_counts.items())}), grouped by lesion; validation split "
               "for early stopping and calibration" if training else
               f"{inputs.trained_on or 'unknown'} (not in this store)")
    items = [
        ("intended use", INTENDED_USE),
        ("not intended for", NOT_INTENDED),
        ("model", f"{sidecar.get('backbone')} fine-tuned for {', '.join(inputs.classes)}"),
        ("training data", trained),
        ("evaluation data", f"{inputs.dataset}/{m['split']}, {m['n']} images"
                            + (" (external validation)" if _external(inputs) else "")),
        ("results", join(["balanced accuracy", with_ci(m.get("balanced_accuracy"), ci.get("balanced_accuracy"))], " ")),
        ("subgroup results", _subgroup_summary(m.get("subgroups") or [])),
        ("caveats", CAVEATS),
    ]
    return Section("model-card", "Model card", key_values(items))


SECTIONS: tuple[Callable[[ReportInputs], Section | None], ...] = (
    summary, data, model, metrics, calibration, operating_point, training_curves, confusion_matrix, roc_pr,
    subgroups, gallery, shortcuts, model_card)


def render(inputs: ReportInputs) -> str:
    """The whole page, its sections in reading order."""
    subtitle = (f"trained on {inputs.trained_on or 'unknown'} · generated {inputs.generated} · "
                f"dermcam {inputs.versions.get('dermcam', '?')}")
    return page(f"dermcam report: {inputs.title}", subtitle,
                [s for s in (build(inputs) for build in SECTIONS) if s is not None])

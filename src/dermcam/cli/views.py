"""How results look in the terminal: tables and summaries shared by the commands and ``dermcam demo``.

Each function takes what a library call returned and prints it (or returns a rich Table); none of
them computes anything a Python user of the library would need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from dermcam.cli.common import console

_SHORT = {"balanced_accuracy": "bal.acc", "macro_f1": "F1", "auc_macro": "AUC", "accuracy": "acc",
          "loss": "loss"}


def human_bytes(n: float) -> str:
    """Three significant digits: 420 KB, 21.3 MB, 1.05 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 999.5 or unit == "GB":
            return f"{n:.3g} {unit}" if n >= 1 else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.3g} GB"


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def metric_cell(value: Any) -> str:
    from dermcam.evaluate.metrics import format_value

    return format_value(float(value)) if isinstance(value, (int, float)) else "-"


def monitor_cell(monitor: dict[str, Any]) -> str:
    name = str(monitor.get("name") or "").removeprefix("val_")
    short = _SHORT.get(name) or (f"{name.removeprefix('recall_')} rec." if name.startswith("recall_") else name)
    return f"{metric_cell(monitor.get('value'))} {short}".strip() if monitor else "-"


def checkpoint_table(rows: list[dict[str, Any]]) -> Table:
    """The ``ckpt list`` table (also shown by ``dermcam demo``); damaged entries last, with their problem."""
    from rich.markup import escape

    from dermcam.store.manage import LIST_METRICS
    from dermcam.store.paths import runs_dir

    intact = [r for r in rows if not r.get("problem")]
    extra_monitor = any(str(r["monitor"].get("name", "")).removeprefix("val_") not in LIST_METRICS for r in intact)
    group = next((r["rank_group"] for r in intact if "best" in r["flags"]), None)
    caption = "bold value: the monitored metric (what best and run-best rank by)"
    if group:
        caption += f"\nbest ranks only checkpoints like the newest one: {group}"
    table = Table(title=f"Checkpoints in {runs_dir()}", title_justify="left", box=None, header_style="bold underline",
                  caption=caption, caption_justify="left", padding=(0, 1), collapse_padding=True, pad_edge=False)
    table.add_column("ID", no_wrap=True)
    # a backbone name cut in two reads as two words: it gets the room it needs (up to 24), flags wrap
    width = max([len(str(r.get("backbone", ""))) for r in intact] + [10])
    table.add_column("Backbone / data", overflow="ellipsis", no_wrap=True, min_width=min(width, 24))
    if extra_monitor:
        table.add_column("Monitored", justify="right", min_width=5)
    for header in ("Bal.acc", "F1", "Mel rec", "AUC"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("Size", justify="right", no_wrap=True)
    table.add_column("Age", justify="right", no_wrap=True)
    table.add_column("Flags", min_width=8)
    for row in rows:  # damaged entries come last (see list_checkpoint_rows)
        if row.get("problem"):
            table.add_row(row["id"], f"[red]{escape(row['problem'])}[/]", *["-"] * (len(LIST_METRICS) + extra_monitor),
                          human_bytes(row["size"]), "?", "[bold red]damaged[/]")
            continue
        monitored = str(row["monitor"].get("name", "")).removeprefix("val_")
        cells = [f"[bold]{metric_cell(row['metrics'].get(k))}[/]" if k == monitored else metric_cell(row["metrics"].get(k))
                 for k in LIST_METRICS]
        flags = " ".join(f"[bold green]{f}[/]" if f == "best" else f for f in row["flags"])
        table.add_row(row["id"], f"{row['backbone']}\n[dim]{row['dataset'] or '-'}[/]",
                      *([monitor_cell(row["monitor"])] if extra_monitor else []), *cells,
                      human_bytes(row["size"]), human_age(row["age_seconds"]), flags)
    return table


def splits_table(manifest: dict[str, Any]) -> Table:
    classes = manifest["classes"]
    table = Table(title="Splits (grouped: no lesion or patient on two sides)", title_justify="left")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("groups", justify="right")
    for code in classes:
        table.add_column(f"{code} ({manifest['label_encoding'][code]})", justify="right")
    for split, counts in manifest["counts"].items():
        table.add_row(split, str(sum(counts.values())), str(manifest["lesions"][split]),
                      *(str(counts[c]) for c in classes))
    totals = [sum(manifest["counts"][s][c] for s in manifest["counts"]) for c in classes]
    table.add_row("[bold]total", f"[bold]{sum(totals)}", f"[bold]{sum(manifest['lesions'].values())}",
                  *(f"[bold]{n}" for n in totals))
    return table


def dataset_summary(manifest: dict[str, Any], path: Path) -> None:
    """The parts of a summary that come from the manifest alone (shared by prepare and show)."""
    from dermcam.data.problems import PROBLEM_ACTIONS

    console.print(splits_table(manifest))
    leakage = manifest["leakage"]
    verdict = "[green]OK[/]" if not any(leakage.values()) else "[bold red]LEAK[/]"
    console.print("Leakage audit (lesions shared): "
                  + ", ".join(f"{pair} {n}" for pair, n in leakage.items()) + f"  {verdict}")
    near = manifest.get("near_duplicates")
    if isinstance(near, dict):
        console.print(near_duplicates_line(near), highlight=False)
    else:
        from dermcam.data.dataset import prepare_command

        console.print("Near-duplicates: not searched (prepared before they existed); to search them: "
                      + prepare_command(manifest, str(manifest.get("name", path.name))), highlight=False, markup=False)
    if manifest["problems"]:
        problems = Table(title="Problems found in the source", title_justify="left")
        for column in ("kind", "action", "count"):
            problems.add_column(column, justify="right" if column == "count" else "left")
        for kind, count in manifest["problems"].items():
            action = PROBLEM_ACTIONS.get(kind, "?")
            problems.add_row(kind, f"[yellow]{action}[/]" if action == "skipped" else action, str(count))
        console.print(problems)
        console.print(f"Full list: {path / 'problems.csv'}", highlight=False)
    else:
        console.print("No problems found in the source.")
    cache = manifest["cache"]
    size = (path / cache["file"]).stat().st_size if (path / cache["file"]).exists() else 0
    console.print(f"Cache: {cache['file']} {size / 1e6:.1f} MB, {cache['width']}x{cache['height']} "
                  f"{cache['dtype']} {cache['layout']}; fingerprint {manifest['fingerprint'][:12]}", highlight=False)


def near_duplicates_line(near: dict[str, Any]) -> str:
    """The manifest's ``near_duplicates`` counts in one line (prepare, data show, data duplicates)."""
    if not near.get("threshold"):
        return "Near-duplicates: not grouped (--duplicate-threshold 0)"

    def count(n: int, noun: str) -> str:
        return f"{n} {noun}{'' if n == 1 else 's'}"

    return (f"Near-duplicates: {count(near['pairs'], 'pair')} in {count(near['clusters'], 'cluster')} "
            f"({near['cross_lesion_clusters']} across lesion ids, {count(near['label_conflicts'], 'label conflict')}), "
            "kept on one side")


def duplicates_report(result: dict[str, Any]) -> None:
    """``dermcam data duplicates``: the counts, then one row per cluster and one line per image in it
    (image, lesion id, label), so nothing is cut at 80 columns."""
    from rich.markup import escape

    summary, clusters = result["summary"], result["clusters"]
    console.print(near_duplicates_line(summary) + f"; threshold {summary['threshold']}", highlight=False)
    if not clusters:
        what = "near-duplicate clusters" if result["all"] else "clusters across lesion ids (--all lists the others)"
        console.print(f"No {what} in {result['name']}.", highlight=False, markup=False)
        return
    kind = "Near-duplicate clusters" if result["all"] else "Near-duplicate clusters across lesion ids"
    table = Table(title=f"{kind} in {escape(result['name'])}", title_justify="left", box=None,
                  header_style="bold underline", padding=(0, 1), collapse_padding=True, pad_edge=False)
    for header, justify in (("#", "right"), ("image", "left"), ("lesion", "left"), ("label", "left"),
                            ("split", "left"), ("dist.", "right"), ("note", "left")):
        table.add_column(header, justify=justify, no_wrap=header != "note")  # type: ignore[arg-type]
    for cluster in clusters:
        images = cluster["images"]
        notes = (["[bold red]label conflict[/]"] if cluster["conflict"] else []) + (
            [] if cluster["cross_lesion"] else ["[dim]one lesion[/]"])
        table.add_row(str(cluster["cluster"]), escape("\n".join(i["image_id"] for i in images)),
                      escape("\n".join(i["lesion_id"] or "-" for i in images)),
                      escape("\n".join(i["dx"] for i in images)),
                      cluster["split"], f"{cluster['max_distance']:.3f}", "\n".join(notes))
    console.print(table)
    console.print("dist.: the cluster's largest fingerprint distance (0: the same pixels). Near the threshold "
                  "most pairs of real photos are look-alikes, not copies: look at them before relabelling.\n"
                  f"Pairs: {result['path']}/{summary['file']}", highlight=False, markup=False)


def prepare_report(report: Any) -> None:
    if report.up_to_date:
        console.print(f"Data set [bold]{report.name}[/] is up to date, reused cache ({report.path})", highlight=False)
    else:
        console.print(f"Prepared data set [bold]{report.name}[/] at {report.path}", highlight=False)
        console.print(f"Images: {report.images} kept; decoded {report.decoded}, reused {report.reused} "
                      "from the previous cache", highlight=False)
    if report.excluded or report.capped:
        console.print(f"Left out: {report.excluded} rows of other classes, {report.capped} by --max-per-class",
                      highlight=False)
    dataset_summary(report.manifest, report.path)
    console.print(f"Time: {report.seconds:.1f} s")


def short_path(path: Path) -> str:
    """A path as short as it can be while still pointing at the file (relative when under the cwd)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class WrapAt:
    """A table cell that breaks only after ``after``'s characters: a path after its separators, a list
    after its commas. Rich wraps at spaces and folds anything else mid-word, which cuts a path or a
    class name in two at 80 columns. When a piece is wider than the column, the start is left out
    instead, whole pieces kept (``…/end/of/path``): the end names the folder, and ``…`` says there is
    more (``dermcam data show`` prints it whole). Plain text, never read as markup."""

    def __init__(self, text: str, after: str = "/\\", style: str = "") -> None:
        import re

        self.text, self.style = text, style
        self.pieces = [p for p in re.split(f"(?<=[{re.escape(after)}])", text) if p] or [""]

    def __rich_measure__(self, console: Any, options: Any) -> Any:
        from rich.cells import cell_len
        from rich.measure import Measurement

        return Measurement(min(cell_len(self.text), 8), cell_len(self.text))

    def lines(self, width: int) -> list[str]:
        """The text in lines of at most ``width`` cells (see the class)."""
        from rich.cells import cell_len, set_cell_size

        lines = [""]
        for piece in self.pieces:
            if lines[-1] and cell_len(lines[-1] + piece) > width:
                lines.append("")
            lines[-1] += piece
        if all(cell_len(line) <= width for line in lines):
            return lines
        tail, cut = "", ""  # the whole pieces that fit after "…", and the last piece left out
        for piece in reversed(self.pieces):
            if cell_len("…" + piece + tail) > width:
                cut = piece
                break
            tail = piece + tail
        if not tail:  # the last piece alone is too wide: its end, still marked as cut
            return ["…" + set_cell_size(self.pieces[-1][::-1], max(width - 1, 0))[::-1]]
        # "…/end" rather than "…end": the separator the left-out piece ended with, when it fits
        return ["…" + (cut[-1:] + tail if cell_len("…" + cut[-1:] + tail) <= width else tail)]

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        yield Text("\n".join(self.lines(options.max_width)), style=self.style, no_wrap=True, overflow="ignore")


def dataset_list_table(manifests: list[dict[str, Any]], where: Path) -> Table:
    """``dermcam data list``: one row per prepared set, its source under its name (as ``ckpt list`` puts
    the data set under the backbone), so a long path gets the width of the row's widest column rather
    than what is left beside the others. Names break only after - _ . , classes after commas, sources
    after separators: at 80 columns nothing is cut mid-word."""
    from rich.console import Group

    table = Table(title=f"Prepared data sets in {where}", title_justify="left", box=None,
                  header_style="bold underline", padding=(0, 1), collapse_padding=True, pad_edge=False)
    table.add_column("name / source")  # the widest column: rich narrows it first
    table.add_column("images", justify="right", no_wrap=True)
    table.add_column("classes")
    table.add_column("cache", no_wrap=True)
    table.add_column("created")  # between the date and the time, on a narrow terminal
    for m in manifests:
        images = sum(sum(c.values()) for c in m["counts"].values())
        name_source = Group(WrapAt(m["name"], "-_.", style="bold"), WrapAt(str(m["source"]), style="dim"))
        table.add_row(name_source, str(images), WrapAt(",".join(m["classes"]), ","),
                      f"{m['cache']['width']}x{m['cache']['height']}", str(m["created"])[:16].replace("T", " "))
    return table


def explain_table(report: Any, width: int = 80) -> Table:
    """One row per image: predicted class in bold, then every class probability, the decision at the
    operating point, the overlay and the faithfulness scores. Nothing is cut to fit ``width``: the
    overlay column is left out first (the caption names the files), then image names wrap."""
    from dermcam.evaluate.calibration import describe

    title = f"checkpoint {report.checkpoint['id']}, calibration: {describe(report.calibration)}"
    point = report.operating_point
    if point:  # the rule once in the title; each row shows only its decision
        title += (f"\noperating point: {point['class']} when p({point['class']}) >= {point['threshold']:.3f} "
                  f"({point['metric']} {point['target']:g} on validation), else the most probable other class")
    names = [Path(r.image).name for r in report.results]
    by_name = len(set(names)) == len(names)  # file names say which image; full paths wrap in 80 columns
    images = [name if by_name else short_path(r.image) for name, r in zip(names, report.results)]
    overlays = [r.overlay.name if r.overlay else "-" for r in report.results]
    show_scores = any(r.faithfulness for r in report.results)
    # columns and the one space between them, as wide as their widest cell or header
    fixed = (max(map(len, ["predicted", *[r.predicted for r in report.results]])) + 1 + 7 * len(report.classes)
             + (max(map(len, ["decision", *[str(r.decision) for r in report.results]])) + 1 if point else 0)
             + (20 if show_scores else 0) + 4)
    image_width = min(max(map(len, ["image", *images])), 24)
    show_overlay = bool(report.method) and fixed + image_width + max(map(len, ["overlay", *overlays])) + 1 <= width
    caption = None
    if report.method and not show_overlay:
        caption = "Overlays: <image name>.cam.png in the output folder (a wider terminal lists them here)."
    table = Table(box=box.SIMPLE_HEAVY, title=title, title_justify="left", padding=(0, 1), collapse_padding=True,
                  caption=caption, caption_justify="left")
    table.add_column("image", overflow="fold", min_width=12)
    table.add_column("predicted", no_wrap=True)
    for name in report.classes:
        table.add_column(f"p({name})", justify="right", no_wrap=True)
    if point:
        table.add_column("decision", no_wrap=True)
    if show_overlay:
        table.add_column("overlay", overflow="fold")
    if show_scores:
        table.add_column("del. AUC↓", justify="right", no_wrap=True)
        table.add_column("ins. AUC↑", justify="right", no_wrap=True)
    for row, image, overlay in zip(report.results, images, overlays):
        cells = [image, f"[bold]{row.predicted}[/]"]
        cells += [f"{row.probabilities[c]:.3f}" for c in report.classes]
        if point:
            cells.append(f"[bold]{row.decision}[/]")
        if show_overlay:
            cells.append(overlay)
        if show_scores:
            scores = row.faithfulness or {}
            cells += [f"{scores.get('deletion_auc', float('nan')):.3f}",
                      f"{scores.get('insertion_auc', float('nan')):.3f}"]
        table.add_row(*cells)
    return table


def train_result(result: Any) -> None:
    from rich.table import Table

    from dermcam.evaluate.metrics import format_value

    console.print(f"\n[bold]Run {result.run_id}[/] ({result.config.backbone}, {result.epochs_done} epochs"
                  f"{', stopped early' if result.stopped_early else ''}, {result.seconds / 60:.1f} min)")
    if result.best_id is None:
        console.print("No checkpoint was saved.")
        return
    console.print(f"Best checkpoint: [bold]{result.best_id}[/] "
                  f"({result.config.monitor} = {format_value(result.best_value, 4)})")
    if result.test_metrics:
        metrics = result.test_metrics
        table = Table(title="Test split (best checkpoint)")
        for column in ("balanced acc", "macro F1", "AUC (macro)", "accuracy"):
            table.add_column(column, justify="right")
        table.add_row(*(format_value(metrics.get(k)) for k in ("balanced_accuracy", "macro_f1", "auc_macro", "accuracy")))
        console.print(table)
        recalls = "  ".join(f"{k.removeprefix('recall_')} {v:.3f}" for k, v in metrics.items() if k.startswith("recall_"))
        console.print(f"Per-class recall: {recalls}")
        if metrics.get("calibration"):
            console.print(calibration_line(metrics["calibration"]), highlight=False)
        if metrics.get("operating_point"):
            console.print(operating_point_line(metrics["operating_point"]), highlight=False)
    if result.report_files:
        console.print(f"Report: {result.report_files[0].parent}")


def distill_result(result: Any) -> None:
    """A student run as ``dermcam train`` shows a run, then its teacher on the same test split and the gap."""
    from rich.table import Table

    from dermcam.evaluate.metrics import format_value

    train_result(result.run)
    teacher = result.teacher
    config = result.run.config
    seconds = teacher.get("soft_targets_seconds")
    console.print(f"Teacher {teacher['id']} ({teacher['members']} members; T {config.distill_temperature:g}, "
                  f"alpha {config.distill_alpha:g}"
                  + (f"; soft targets took {seconds:.1f} s" if seconds is not None else "") + ")", highlight=False)
    metrics = teacher.get("test_metrics")
    if not metrics or not result.run.test_metrics:
        return
    table = Table(title="Test split: student against teacher")
    table.add_column("")
    for column in ("balanced acc", "AUC (macro)"):
        table.add_column(column, justify="right")
    keys = ("balanced_accuracy", "auc_macro")
    table.add_row("student", *(format_value(result.run.test_metrics.get(k)) for k in keys))
    table.add_row("teacher", *(format_value(metrics.get(k)) for k in keys))
    gap = result.gap or {}
    table.add_row("gap", *(f"{gap[k]:+.3f}" if k in gap else "-" for k in keys))
    console.print(table)


def train_comparison(results: list[Any], best: Any, offer: Any = None, created: Any = None) -> None:
    """The runs side by side, and the best ensemble of them (``offer``, a greedy selection on val),
    marked * instead of the best run when it beats it on validation."""
    from rich.table import Table

    from dermcam.evaluate.metrics import format_value

    ensemble_wins = offer is not None and best is not None and best.best_value is not None \
        and offer.score > offer.best_single[1] and best.config.monitor == "val_balanced_accuracy"
    # only what differs between the runs gets a column; what they share goes in the caption
    settings = {"backbone": lambda r: r.config.backbone, "lr": lambda r: f"{r.config.lr:g}",
                "size": lambda r: str(r.config.image_size or "default"), "seed": lambda r: str(r.config.seed),
                "epochs": lambda r: str(r.epochs_done)}
    varying = [k for k, get in settings.items() if len({get(r) for r in results}) > 1]
    shared = ", ".join(f"{k} {get(results[0])}" for k, get in settings.items() if k not in varying and results)
    table = Table(title="Comparison (best on validation marked *)", title_justify="left", box=box.SIMPLE_HEAVY,
                  caption=f"Every run: {shared}." if shared else None, caption_justify="left")
    for column in ("", "run", *varying, "best val", "test bal.acc", "test mel recall"):
        table.add_column(column, no_wrap=column in ("run", "backbone"),
                         justify="right" if column in ("best val", "test bal.acc", "test mel recall") else "left")
    for r in results:
        test = r.test_metrics or {}
        marked = best is not None and r.run_id == best.run_id and not ensemble_wins
        table.add_row("*" if marked else "", r.run_id, *(settings[k](r) for k in varying),
                      format_value(r.best_value), format_value(test.get("balanced_accuracy")),
                      format_value(test.get("recall_mel")))
    if offer is not None:
        table.add_row("*" if ensemble_wins else "", "ensemble", *([""] * len(varying)),
                      format_value(offer.score), "-", "-")
    console.print(table)
    if best is not None:
        console.print(f"Best run: [bold]{best.best_id}[/] — explain and evaluate use the best checkpoint by default.")
    if created is not None:
        console.print(f"Stored the ensemble as [bold]ensemble:{created.name}[/]; evaluate it on test with: "
                      f"dermcam evaluate ensemble:{created.name}", highlight=False)
    elif offer is not None and len(offer.members) > 1:
        weights = ",".join(str(n) for _, n in offer.members)
        console.print(f"Ensemble of the runs (greedy on val, balanced accuracy {offer.score:.3f} vs best single "
                      f"{offer.best_single[1]:.3f}); store it with: dermcam ensemble create NAME "
                      f"{' '.join(i for i, _ in offer.members)} --weights {weights}", highlight=False)
    elif offer is not None:
        console.print(f"The ensemble row is {offer.members[0][0]} alone: greedy selection on val found no "
                      "combination of the runs that does better.", highlight=False)


def with_ci(value: Any, ci: list[float] | None) -> str:
    """``0.781 (0.752-0.809)``; just the value when there is no interval."""
    from dermcam.evaluate.metrics import format_value

    text = format_value(value)
    return f"{text} [dim]({format_value(ci[0])}-{format_value(ci[1])})[/]" if ci and value is not None else text


def evaluation(result: Any) -> None:
    """``dermcam evaluate``: per-class table, headline metrics with intervals, subgroups."""
    from dermcam.evaluate.metrics import format_value

    metrics = result.metrics
    ci = (metrics.get("ci") or {}).get("intervals") or {}
    table = Table(title=f"{result.title} (n={metrics['n']})", title_justify="left",
                  caption="(95% bootstrap interval over lesions)" if ci else None, caption_justify="left")
    table.add_column("class")
    for column in ("recall", "precision", "F1", "AUC", "support"):
        table.add_column(column, justify="right")
    for code in result.classes:
        table.add_row(code, with_ci(metrics.get(f"recall_{code}"), ci.get(f"recall_{code}")),
                      with_ci(metrics.get(f"precision_{code}"), ci.get(f"precision_{code}")),
                      format_value(metrics.get(f"f1_{code}")),
                      with_ci(metrics.get(f"auc_{code}"), ci.get(f"auc_{code}")),
                      format_value(metrics.get(f"support_{code}")))
    console.print(table)
    console.print(f"balanced accuracy {with_ci(metrics['balanced_accuracy'], ci.get('balanced_accuracy'))}   "
                  f"macro F1 {with_ci(metrics['macro_f1'], ci.get('macro_f1'))}   "
                  f"AUC (macro) {with_ci(metrics['auc_macro'], ci.get('auc_macro'))}   "
                  f"accuracy {format_value(metrics['accuracy'])}")
    if result.scored_classes and len(result.scored_classes) < len(result.classes):
        console.print(f"Scored on the classes this set has: {', '.join(result.scored_classes)}", highlight=False)
    if getattr(result, "overlap", None) and result.overlap.get("compared_with"):
        console.print(evaluation_overlap_line(result.overlap, result.report_dir), highlight=False, markup=False)
    if getattr(result, "metadata", None):
        console.print(metadata_line(result.metadata), highlight=False, markup=False)
    if metrics.get("calibration"):
        console.print(calibration_line(metrics["calibration"]), highlight=False)
    if metrics.get("operating_point"):
        point = metrics["operating_point"]
        console.print(operating_point_line(point), highlight=False)
        console.print(confusion_table(point["confusion_matrix"], result.classes,
                                      f"Decisions at the operating point ({point['class']} >= {point['threshold']:.3f})"))
    if result.subgroups:
        console.print(subgroup_table(result.subgroups, result.classes, console.width))
    if result.files:
        console.print(f"Report: {result.report_dir}", highlight=False)


def metadata_line(summary: dict[str, Any]) -> str:
    """``Metadata: age, sex, site (age 310/312, sex 312/312, site 300/312); 0 images had none of them``."""
    known = ", ".join(f"{f} {summary['known'][f]}/{summary['images']}" for f in summary["fields"])
    none = summary["without_metadata"]
    tail = ("every image had none: the model answered from the image alone (its 'unknown' metadata)"
            if none == summary["images"] else f"{none} image{'s' if none != 1 else ''} had none of them")
    return f"Metadata: the model reads {', '.join(summary['fields'])} (known: {known}); {tail}"


def calibration_line(report: dict[str, Any]) -> str:
    """``Calibration (temperature 1.83): ECE 0.210 -> 0.041  Brier ...  NLL ...`` (raw -> reported)."""
    from dermcam.evaluate.calibration import describe
    from dermcam.evaluate.metrics import format_value as fmt

    raw = report["raw"]
    if not report["applied"]:
        return (f"Calibration: none applied (raw probabilities): ECE {fmt(raw['ece'])}  Brier {fmt(raw['brier'])}  "
                f"NLL {fmt(raw['nll'])}")
    return (f"Calibration: {describe(report)}; raw -> calibrated: ECE {fmt(raw['ece'])} -> {fmt(report['ece'])}  "
            f"Brier {fmt(raw['brier'])} -> {fmt(report['brier'])}  NLL {fmt(raw['nll'])} -> {fmt(report['nll'])}")


def operating_point_line(point: dict[str, Any]) -> str:
    """``Operating point mel:sensitivity=0.9 (threshold 0.231): sensitivity 0.88 (0.80-0.95) ...``."""
    intervals = (point.get("ci") or {}).get("intervals") or {}
    target = f"{point['class']}:{point['metric']}={point['target']:g}"
    return (f"Operating point {target} (threshold {point['threshold']:.3f}, chosen on val): "
            f"sensitivity {with_ci(point['sensitivity'], intervals.get('sensitivity'))}  "
            f"specificity {with_ci(point['specificity'], intervals.get('specificity'))}  "
            f"({point['positives']} {point['class']} of {point['n']})")


def confusion_table(matrix: list[list[int]], classes: list[str], title: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE)
    table.add_column("true \\ decided")
    for name in classes:
        table.add_column(name, justify="right")
    for name, row in zip(classes, matrix):
        table.add_row(name, *(str(v) for v in row))
    return table


def calibration_result(result: Any) -> None:
    """``dermcam calibrate``: what was fitted, before and after on the val split, the operating point."""
    from dermcam.evaluate.calibration import describe
    from dermcam.evaluate.metrics import format_value

    cal = result.calibration
    fitted = cal["fitted_on"]
    console.print(f"Calibrated [bold]{result.checkpoint_id}[/] on {fitted['dataset']}/{fitted['split']} "
                  f"({fitted['n']} images, {fitted['lesions']} lesions): [bold]{describe(cal)}[/]", highlight=False)
    table = Table(box=box.SIMPLE, title="On the val split", title_justify="left")
    for column in ("", "ECE (15 bins)", "Brier", "NLL"):
        table.add_column(column, justify="right" if column else "left")
    for name in ("before", "after"):
        table.add_row(name, *(format_value(cal[name][k], 4) for k in ("ece", "brier", "nll")))
    console.print(table)
    check = cal.get("vector_check") or {}
    if "temperature_nll" in check:
        console.print("Vector scaling, held-out NLL on each half of the val lesions: "
                      + ", ".join(f"{format_value(v, 4)} vs temperature {format_value(t, 4)}" for v, t in
                                  zip(check["vector_nll"], check["temperature_nll"]))
                      + (" -> kept" if check["kept"] else " -> not kept (temperature only)"), highlight=False)
    elif check.get("note"):
        console.print(f"Vector scaling not tried: {check['note']}", highlight=False)
    point = result.operating_point
    if point:
        val = point["validation"]
        console.print(f"Operating point {point['class']}:{point['metric']}={point['target']:g}: threshold "
                      f"[bold]{point['threshold']:.4f}[/] on p({point['class']}); on val sensitivity "
                      f"{val['sensitivity']:.3f}, specificity {val['specificity']:.3f} ({val['positives']} "
                      f"{point['class']} of {val['n']})", highlight=False)
    for note in result.notes:
        console.print(note, highlight=False)


def subgroup_table(subgroups: list[dict[str, Any]], classes: list[str], width: int = 80) -> Table:
    """One row per subgroup under a row naming its kind (sex, age band, site). Intervals are shown when
    the terminal is wide enough to show them whole (``width``); otherwise the caption says where they are.
    A subgroup with too few images shows its n and a dash."""
    intervals = width >= 150
    caption = ("In brackets: 95% bootstrap interval." if intervals else
               "95% intervals: a wider terminal, --json, metrics.json or report.html.")
    if any("metrics" not in entry for entry in subgroups):
        caption += " -: too few images for a number (fewer than 30)."
    table = Table(title="Subgroups", title_justify="left", caption=caption, caption_justify="left",
                  box=box.SIMPLE, padding=(0, 1), pad_edge=False)
    table.add_column("group", no_wrap=True, max_width=24, overflow="ellipsis")
    for column in ("n", "bal. acc", "macro F1", "AUC", *(f"{c} recall" for c in classes)):
        table.add_column(column, justify="right")
    kind = None
    for entry in subgroups:
        if entry["title"] != kind:
            kind = entry["title"]
            table.add_row(f"[bold]{kind}[/]")
        name = f"  {entry['value']}"
        if "metrics" not in entry:
            table.add_row(name, str(entry["n"]), *(["[dim]-[/]"] * (3 + len(classes))))
            continue
        m, ci = entry["metrics"], (entry.get("ci") or {}) if intervals else {}
        table.add_row(name, str(entry["n"]), *(with_ci(m.get(k), ci.get(k)) for k in (
            "balanced_accuracy", "macro_f1", "auc_macro", *(f"recall_{c}" for c in classes))))
    return table


def report_path(result: Any) -> None:
    """``dermcam report``: the page's path alone on stdout, so ``xdg-open "$(dermcam report)"`` works."""
    console.print(str(result.path), markup=False, highlight=False, soft_wrap=True)


def prune_result(result: dict[str, Any], out: Any = console) -> None:
    """``dermcam ckpt prune``: what was (or would be) removed and kept, and why."""
    verb = "Would remove" if result["dry_run"] else "Removed"
    if not result["removed"]:
        out.print("Nothing to remove: every checkpoint is protected by a keep rule.")
    else:
        table = Table(title=f"{verb} {len(result['removed'])} checkpoint(s)", title_justify="left")
        for name in ("ID", "Monitored", "Size"):
            table.add_column(name)
        for row in result["removed"]:
            table.add_row(row["id"], monitor_cell(row["monitor"]), human_bytes(row["bytes"]))
        out.print(table)
    kept = ", ".join(f"{k['id']} ({'+'.join(dict.fromkeys(k['reasons']))})" for k in result["kept"])
    out.print(f"Kept {len(result['kept'])}: {kept or 'none'}")
    for gone in result.get("ensemble_members_removed", []):
        out.print(f"[yellow]{'Would remove' if result['dry_run'] else 'Removed'} {gone['id']}, a member of ensemble "
                  f"{', '.join(gone['ensembles'])}[/] (--force): that ensemble will no longer load.", highlight=False)
    for gone in result.get("cv_folds_removed", []):
        out.print(f"[yellow]{'Would remove' if result['dry_run'] else 'Removed'} {gone['id']}, a fold's best "
                  f"checkpoint of cross-validation {', '.join(gone['cross_validations'])}[/] (--force): its "
                  "out-of-fold predictions stay, an unfinished one can no longer finish.", highlight=False)
    if result["active_runs"]:
        out.print(f"Training now (their latest and best are always kept): {', '.join(result['active_runs'])}")
    freed = human_bytes(result["bytes_freed"])
    out.print(f"{'Would free' if result['dry_run'] else 'Freed'} {freed}."
              + (" Nothing was changed (dry run)." if result["dry_run"] else ""))


def _members_cell(members: list[dict[str, Any]]) -> str:
    """``a1b2c3:7 (0.50) + d4e5f6:9 (0.50)``."""
    return " + ".join(f"{m['id']} ({m['weight']:.2f})" for m in members)


def ensemble_created(result: Any) -> None:
    """``dermcam ensemble create``: the members kept, how they were chosen, the validation score."""

    selection = result.selection
    total = sum(m["weight"] for m in result.members)
    members = [{"id": m["id"], "weight": m["weight"] / total} for m in result.members]
    console.print(f"Created ensemble [bold]{result.name}[/]: {_members_cell(members)}", highlight=False)
    if selection.get("method") == "greedy":
        single = selection["best_single"]
        console.print(f"Greedy selection on val from {len(selection['candidates'])} candidates: balanced accuracy "
                      f"{selection['score']:.3f} (best single {single['id']}: {single['score']:.3f})", highlight=False)
    if result.val_metrics:
        console.print(validation_line(result.val_metrics), highlight=False)
    if result.operating_point:
        point, val = result.operating_point, result.operating_point["validation"]
        console.print(f"Operating point {point['class']}:{point['metric']}={point['target']:g}: threshold "
                      f"{point['threshold']:.3f} (val sensitivity {val['sensitivity']:.3f}, specificity "
                      f"{val['specificity']:.3f})", highlight=False)
    console.print(f"Evaluate it on the test split with: dermcam evaluate ensemble:{result.name}", highlight=False)


def validation_line(metrics: dict[str, Any]) -> str:
    """``Validation split: bal.acc 0.701  macro F1 0.622  mel recall 0.660  AUC 0.883``."""
    from dermcam.evaluate.metrics import format_value

    return "Validation split: " + "  ".join(
        f"{label} {format_value(metrics.get(key))}" for label, key in
        (("bal.acc", "balanced_accuracy"), ("macro F1", "macro_f1"), ("mel recall", "recall_mel"),
         ("AUC", "auc_macro")) if key in metrics)


def ensemble_imported(result: dict[str, Any]) -> None:
    """``dermcam ckpt restore`` of an exported ensemble: the ensemble and where each member came from."""
    if not result["created"]:
        console.print(f"{result['file']} is already in the store as {result['id']}; nothing imported.",
                      highlight=False, soft_wrap=True)
        return
    new = sum(m["created"] for m in result["members"])
    console.print(f"Imported {result['file']} as [bold]{result['id']}[/] ({result['backbone']}; exported from "
                  f"{result['source_id']}): {new} member checkpoint(s) imported, "
                  f"{len(result['members']) - new} already in this store.", highlight=False, soft_wrap=True)
    for member in result["members"]:
        console.print(f"  {member['id']}  {member['backbone']}  {'imported' if member['created'] else 'in store'}",
                      highlight=False)
    console.print(f"  Use it with: dermcam evaluate {result['id']}  /  dermcam explain IMAGE -c {result['id']}",
                  highlight=False, soft_wrap=True)


def ensemble_table(listing: dict[str, Any]) -> None:
    """``dermcam ensemble list``."""
    from dermcam.evaluate.metrics import format_value

    table = Table(title="Ensembles", title_justify="left")
    for column in ("name", "members (weight)", "data set", "val bal.acc", "operating point", "status"):
        table.add_column(column)
    for e in listing["ensembles"]:
        point = e["operating_point"]
        table.add_row(e["name"], _members_cell(e["members"]), e["dataset"] or "-",
                      format_value((e["val_metrics"] or {}).get("balanced_accuracy")),
                      f"{point['class']}:{point['metric']}={point['target']:g}" if point else "-",
                      "ok" if e["problem"] is None else f"[red]{e['problem']}[/]")
    console.print(table)
    for d in listing["damaged"]:
        console.print(f"[red]damaged[/] {d['problem']}", highlight=False, soft_wrap=True)


def ensemble_details(info: dict[str, Any]) -> None:
    """``dermcam ensemble show``."""

    console.print(f"[bold]{info['id']}[/] ({info['rule']}), classes {', '.join(info['classes'])}, "
                  f"data set {info['dataset'] or '-'}, created {info['created']}", highlight=False)
    table = Table(box=box.SIMPLE)
    for column in ("member", "backbone", "weight", "input", "calibration", "monitored"):
        table.add_column(column, no_wrap=column != "monitored")
    for m in info["members"]:
        size = m["input_size"]
        table.add_row(m["id"], m["backbone"], f"{m['weight']:.3f}", f"{size[2]}x{size[1]}", m["calibration"] or "none",
                      monitor_cell(m["monitor"] or {}))
    console.print(table)
    if info["val_metrics"]:
        console.print(validation_line(info["val_metrics"]), highlight=False)
    if info["operating_point"]:
        point = info["operating_point"]
        console.print(f"Operating point {point['class']}:{point['metric']}={point['target']:g}, threshold "
                      f"{point['threshold']:.3f}", highlight=False)
    if info["problem"]:
        console.print(f"[red]Does not load:[/] {info['problem']}", highlight=False, soft_wrap=True)


def _splits_text(by_split: dict[str, int]) -> str:
    """``train 10, val 2`` (splits with a match only)."""
    return ", ".join(f"{split} {n}" for split, n in by_split.items() if n)


def evaluation_overlap_line(overlap: dict[str, Any], folder: Path | None) -> str:
    """``dermcam evaluate``: how many scored images are copies of training images, and what was done."""
    sets = " and ".join(f"'{n}'" for n in overlap["compared_with"])
    head = f"Overlap with training set {sets} (threshold {overlap['threshold']:g}): "
    if not overlap["images"]:
        return head + "none of the images evaluated is a copy of a training image"
    found = (f"{overlap['images']} of {overlap['compared']} images are copies of training images "
             f"({overlap['exact']} byte-identical; in its {_splits_text(overlap['by_split'])})")
    listed = f" (list: {overlap['file']})" if folder is not None and overlap.get("file") else ""
    if overlap["kept"]:
        return head + found + ", kept in the metrics (--keep-overlap)" + listed
    return head + found + ", left out of every metric" + listed + "; --keep-overlap scores them"


def overlap_report(overlap: dict[str, Any], limit: int = 50) -> None:
    """``dermcam data overlap A B``: the counts, then one row per pair (the first ``limit``)."""
    from rich.markup import escape

    head = (f"{overlap['images']} of {overlap['compared']} images of {overlap['name']} have a copy in "
            f"{overlap['other']} ({overlap['exact']} byte-identical; threshold {overlap['threshold']:g})")
    console.print(head + (f"; by split of {overlap['other']}: {_splits_text(overlap['by_split'])}"
                          if overlap["images"] else ""), highlight=False, markup=False)
    if overlap["mostly"]:
        console.print(f"Most of {overlap['name']} is in {overlap['other']}: a model trained on {overlap['other']} "
                      f"and evaluated on {overlap['name']} is mostly scored on its own training images.",
                      highlight=False, markup=False)
    pairs = overlap["pairs"]
    if not pairs:
        return
    table = Table(box=None, header_style="bold underline", padding=(0, 1), collapse_padding=True, pad_edge=False)
    for header, justify in ((f"image ({overlap['name']})", "left"), ("label", "left"), ("split", "left"),
                            (f"copy in {overlap['other']}", "left"), ("label", "left"), ("split", "left"),
                            ("dist.", "right")):
        table.add_column(escape(header), justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for pair in pairs[:limit]:
        table.add_row(*(escape(str(pair[k])) for k in ("image_id", "dx", "split", "matched_image_id", "matched_dx",
                                                       "matched_split")),
                      "same file" if pair["exact"] else f"{pair['distance']:.3f}")
    console.print(table)
    more = f"{len(pairs) - limit} more pairs: --json lists them all. " if len(pairs) > limit else ""
    console.print(f"{more}dist.: fingerprint distance (0: the same pixels); near the threshold some pairs are "
                  "look-alikes, not copies (docs/evaluation.md).", highlight=False, markup=False)


def store_overlap_lines(result: dict[str, Any]) -> None:
    """After ``prepare --external``: one line per set of the store it overlaps, and per set not compared."""
    overlapping = result["overlaps"]
    for o in overlapping:
        console.print(f"Overlap: {o['images']} of {o['compared']} images of {result['name']} are in {o['other']} "
                      f"({o['exact']} byte-identical; {_splits_text(o['by_split'])}): evaluate a model trained on "
                      f"{o['other']} here and they are left out (list: dermcam data overlap {result['name']} "
                      f"{o['other']})" + ("; most of this set is in it" if o["mostly"] else ""),
                      highlight=False, markup=False)
    if result["compared"] and not overlapping:
        console.print(f"Overlap: none with {', '.join(result['compared'])} (threshold {result['threshold']:g})",
                      highlight=False, markup=False)
    for name, why in result["unchecked"].items():
        console.print(f"Overlap with {name} not checked: {why}", highlight=False, markup=False)


def crossval_estimate(estimate: Any) -> None:
    """``dermcam evaluate cv:NAME``: the out-of-fold estimate, per class and overall, with intervals."""
    from dermcam.evaluate.metrics import format_value

    metrics = estimate.metrics
    ci = (metrics.get("ci") or {}).get("intervals") or {}
    table = Table(title=f"{estimate.title} (n={estimate.images} images, {estimate.groups} groups)",
                  title_justify="left", caption="(95% bootstrap interval over lesion groups)" if ci else None,
                  caption_justify="left")
    table.add_column("class")
    for column in ("recall", "precision", "AUC", "support"):
        table.add_column(column, justify="right")
    for code in estimate.classes:
        table.add_row(code, with_ci(metrics.get(f"recall_{code}"), ci.get(f"recall_{code}")),
                      with_ci(metrics.get(f"precision_{code}"), ci.get(f"precision_{code}")),
                      with_ci(metrics.get(f"auc_{code}"), ci.get(f"auc_{code}")),
                      format_value(metrics.get(f"support_{code}")))
    console.print(table)
    console.print(f"balanced accuracy {with_ci(metrics['balanced_accuracy'], ci.get('balanced_accuracy'))}   "
                  f"macro F1 {with_ci(metrics['macro_f1'], ci.get('macro_f1'))}   "
                  f"AUC (macro) {with_ci(metrics['auc_macro'], ci.get('auc_macro'))}")
    runs = "  ".join(f"{r['fold'] + 1}: {r.get('best') or r['run']} ({r['status']})" for r in estimate.fold_runs)
    console.print(f"Folds: {runs}", highlight=False)
    if estimate.ensemble:
        console.print(f"The {estimate.folds} fold models: ensemble:{estimate.ensemble} (dermcam evaluate "
                      f"ensemble:{estimate.ensemble} scores it on the test split)", highlight=False)


def crossval_comparison(comparison: Any) -> None:
    """``dermcam evaluate cv:NAME --against cv:OTHER``: both values of each metric (A the reference, B
    the one compared), B - A with its paired interval, and what that interval supports; under 80 columns."""
    from dermcam.evaluate.metrics import format_value

    paired = comparison.resamples > 0
    a, b = f"cv:{comparison.against}", f"cv:{comparison.name}"
    table = Table(title=f"{comparison.title}\nA = {a}, B = {b}", title_justify="left", caption_justify="left",
                  box=None, header_style="bold underline", padding=(0, 1), pad_edge=False,
                  caption="B - A: 95% interval over the same resampled lesion groups for both" if paired else None)
    table.add_column("metric", no_wrap=True)
    table.add_column("A", justify="right", no_wrap=True)
    table.add_column("B", justify="right", no_wrap=True)
    table.add_column("B - A", justify="right", no_wrap=True)
    if paired:
        table.add_column("supports", no_wrap=True)
    short = {f"{a} higher": "A higher", f"{b} higher": "B higher"}
    for row in comparison.rows:
        difference = row["difference"]
        shown = "-" if difference is None else f"{difference:+.3f}"
        if row["ci"] is not None:
            shown += f" [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}]"
        cells = [row["metric"].replace("_", " "), format_value(row["against"]), format_value(row["cv"]), shown]
        verdict = row["verdict"]
        table.add_row(*cells, *([short.get(verdict, verdict or "-")] if paired else []))
    console.print(table)


def crossval_trained(result: Any) -> None:
    """``dermcam train --folds K``: the fold runs of this call, then the out-of-fold estimate."""
    for run in result.runs:
        train_result(run)
    console.print()
    crossval_estimate(result.estimate)


def audit_tables(result: Any) -> list[Table]:
    """``dermcam audit``'s two tables, each under 80 columns: the regions (median and 90th percentile of
    their share of the map, the images they hold most of it in, the flag) and the perturbations (mean
    change of p(positive), mean absolute change, flipped decisions, the verdict)."""
    from rich.markup import escape

    from dermcam.audit.run import signed
    from dermcam.evaluate.metrics import format_value

    tables = []
    if result.attention is not None:
        attention = result.attention
        flagged = {f["region"] for f in attention.flags}
        table = Table(title=f"Where the attention goes ({attention.method}, {len(attention.images)} images)",
                      title_justify="left", box=box.SIMPLE, padding=(0, 1), pad_edge=False,
                      caption="share: of the map's mass; most: images where the share is above 0.5",
                      caption_justify="left")
        table.add_column("region", no_wrap=True)
        for column in ("images", "median", "p90", "most"):
            table.add_column(column, justify="right", no_wrap=True)
        table.add_column("flag", no_wrap=True)
        for region, s in attention.region_summary(attention.images).items():
            most = f"{s['most']} ({s['most_share']:.0%})" if s["n"] else "-"
            table.add_row(region.replace("_", "-"), str(s["n"]), format_value(s["p50"]), format_value(s["p90"]),
                          most, "[bold red]flagged[/]" if region in flagged else "no")
        tables.append(table)
    if result.stress is not None:
        stress = result.stress
        positive = escape(stress.positive)
        table = Table(title=f"What changes the answer ({len(stress.baseline_decisions)} images, seed {stress.seed})",
                      title_justify="left", box=box.SIMPLE, padding=(0, 1), pad_edge=False,
                      caption="stable: mean |change| < 0.02 and < 2% of the decisions flipped",
                      caption_justify="left")
        table.add_column("perturbation", no_wrap=True)
        table.add_column(f"Δp({positive})", justify="right", no_wrap=True)
        table.add_column("|Δ|", justify="right", no_wrap=True)
        table.add_column("flipped", justify="right", no_wrap=True)
        table.add_column("verdict", overflow="fold")
        for r in stress.results:
            flips = int(r.flipped.sum())
            verdict = "[green]stable[/]" if r.stable else f"[bold red]{escape(r.direction or 'moves')}[/]"
            table.add_row(r.name, signed(r.mean_delta), f"{r.mean_abs_delta:.3f}",
                          f"{flips}/{r.n} ({flips / r.n:.0%})" if r.n else "-", verdict)
        tables.append(table)
    return tables


def audit_result(result: Any) -> None:
    """``dermcam audit``: the findings in words, the two tables, where the files are."""
    console.print(f"Audit of {result.title}: {result.n} images"
                  + (f" (of {result.available}, --limit {result.limit})" if result.n != result.available else ""),
                  highlight=False, markup=False)
    for line in result.findings():
        console.print(f"  {line}", highlight=False, markup=False)
    for table in audit_tables(result):
        console.print(table)
    if result.out_dir is not None:
        console.print(f"Audit: {result.out_dir / 'audit.json'}", highlight=False, markup=False, soft_wrap=True)

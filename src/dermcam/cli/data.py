"""``dermcam prepare`` and ``dermcam data list|show|duplicates|overlap|synthetic``: wrappers of :mod:`dermcam.data`.

The library is imported inside each command so ``dermcam --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dermcam.cli import views
from dermcam.checks import SEED_MAX, check_output_dir
from dermcam.cli.common import JSON_OPTION, console, handle_errors, print_json
from dermcam.data.classes import DEFAULT_CLASSES
from dermcam.data.fingerprint import DEFAULT_THRESHOLD
from dermcam.data.overlap import OVERLAP_THRESHOLD
from dermcam.data.geometry import DEFAULT_CACHE_SIZE
from dermcam.data.split import DEFAULT_FRACTIONS
from dermcam.errors import BadInputError, ExitCode
from dermcam.progress import rich_progress

data_app = typer.Typer(help="See prepared data sets, or write a synthetic one to try dermcam.",
                       no_args_is_help=True)


def _split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BadInputError(f"{what} is empty")
    return items


def _parse_fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in _split_list(text, "--fractions")]
    except ValueError:
        raise BadInputError(f"--fractions '{text}' must be three numbers like 0.7,0.15,0.15") from None


def _source_lines(manifest: dict) -> list[str]:
    """What the manifest says about the source (layout, classes, grouping, external); [] for older sets."""
    if "layout" not in manifest:
        return []
    how = {"option": "--classes", "default": f"default {','.join(DEFAULT_CLASSES)}: the source has all three",
           "found": "every class the source has"}.get(manifest.get("classes_from", ""), "")
    lines = [f"Layout: {manifest['layout']}, {manifest.get('layout_detail', '')}",
             f"Classes: {', '.join(manifest['classes'])} ({how})"]
    other = manifest.get("other_classes") or {}
    if other:
        lines.append("Other classes left out (images): " + ", ".join(f"{c} {n}" for c, n in other.items()))
    grouping = manifest.get("grouping") or {}
    lines.append("Groups (none on two sides of a split; index.csv column group): "
                 + ", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in grouping.items() if n))
    lines += _several_sources_lines(manifest)
    if manifest.get("external"):
        lines.append("External set: every image is in the test split; evaluation only, never trained on.")
    return lines


def _several_sources_lines(manifest: dict) -> list[str]:
    """A set of several sources: the images each gave (index.csv column dataset) and what two of them
    shared; [] for a set of one source."""
    sources, across = manifest.get("sources"), manifest.get("across_sources") or {}
    if not sources:
        return []
    lines = ["Sources (index.csv column dataset): " + ", ".join(f"{s['name']} {s['images']}" for s in sources)]
    lines.append(f"Across sources: {across.get('identical_files', 0)} identical files and "
                 f"{across.get('near_duplicates_removed', 0)} near-duplicates counted once (duplicate_across_sources), "
                 f"{across.get('near_duplicates_grouped', 0)} near-duplicate pairs with different labels "
                 "kept on one side")
    return lines


def _print_source(manifest: dict) -> None:
    for line in _source_lines(manifest):
        console.print(line, highlight=False, markup=False)


@handle_errors
def prepare_command(
    src: list[Path] = typer.Argument(..., help="Source: a HAM10000 or ISIC folder, one folder per class, a folder "
                                     "with one CSV of image paths and labels, or that CSV file (see docs/data.md). "
                                     "Several sources make one set (--name required): an image found in two "
                                     "counts once."),
    name: Optional[str] = typer.Option(None, "--name", help="Data set name (default: the source folder's name; "
                                       "required with several sources)."),
    layout: Optional[str] = typer.Option(None, "--layout",
                                         help="ham10000 | isic | folders | csv (default: detected; with several "
                                              "sources, forced on every one)."),
    classes: Optional[str] = typer.Option(None, "--classes",
                                          help="Comma-separated class names (default: nv,bkl,mel when the source "
                                               "has all three, else every class found); labels are the names "
                                               "sorted alphabetically (bkl=0, mel=1, nv=2)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed for the split and for --max-per-class."),
    fractions: Optional[str] = typer.Option(None, "--fractions",
                                            help=f"train,val,test fractions (default: "
                                                 f"{','.join(map(str, DEFAULT_FRACTIONS))})."),
    external: bool = typer.Option(False, "--external",
                                  help="Evaluation-only set: every image in the test split, never trained on."),
    image_col: Optional[str] = typer.Option(None, "--image-col", help="csv layout: column of image paths "
                                            "(relative to the CSV's folder)."),
    label_col: Optional[str] = typer.Option(None, "--label-col", help="csv layout: column of class names."),
    group_col: Optional[str] = typer.Option(None, "--group-col", help="csv layout: column whose images stay on "
                                            "one side of the split (a lesion id; same as --lesion-col)."),
    lesion_col: Optional[str] = typer.Option(None, "--lesion-col", help="csv layout: column of lesion ids."),
    patient_col: Optional[str] = typer.Option(None, "--patient-col", help="csv layout: column of patient ids "
                                              "(groups images without a lesion id)."),
    max_per_class: Optional[int] = typer.Option(None, "--max-per-class", min=1,
                                                help="Cap images per class, sampling whole lesions "
                                                     "(550 gives the usual balanced subset)."),
    cache_size: str = typer.Option("x".join(map(str, DEFAULT_CACHE_SIZE)), "--cache-size",
                                   help="Cached image size, WIDTHxHEIGHT."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Decoding threads (default: CPU count, at most 4)."),
    near_duplicate_threshold: float = typer.Option(
        DEFAULT_THRESHOLD, "--duplicate-threshold",
        help="Images whose fingerprints are closer than this share a split group whatever their ids "
             "(0 to 0.2; 0: off). See dermcam data duplicates."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Clean, split (by lesion, else patient, else image) and cache a source as a data set in the store.

    The layout (HAM10000, ISIC, one folder per class, a CSV of paths and labels) is detected, per source.

    Exit code 5 when some rows or images were skipped (listed in problems.csv).
    """
    from dermcam.data.prepare import prepare

    with rich_progress() as progress:
        report = prepare(src, name=name, classes=None if classes is None else _split_list(classes, "--classes"),
                         seed=seed, fractions=None if fractions is None else _parse_fractions(fractions),
                         max_per_class=max_per_class, cache_size=cache_size, workers=workers,
                         progress=progress, layout=layout, external=external, image_col=image_col,
                         label_col=label_col, group_col=group_col, lesion_col=lesion_col, patient_col=patient_col,
                         near_duplicate_threshold=near_duplicate_threshold)
    overlap = None
    if report.manifest.get("external") is True:  # the sets a model evaluated here may have been trained on
        from dermcam.data.overlap import store_overlap

        overlap = store_overlap(report.name).to_dict()
    if json_out:
        print_json(report.to_dict() if overlap is None else {**report.to_dict(), "overlap": overlap})
    else:
        views.prepare_report(report)
        _print_source(report.manifest)
        if overlap is not None:
            views.store_overlap_lines(overlap)
    if any(p.action == "skipped" for p in report.problems):
        raise typer.Exit(int(ExitCode.PARTIAL))


@data_app.command("list")
@handle_errors
def list_command(json_out: bool = JSON_OPTION) -> None:
    """List prepared data sets."""
    from dermcam.data.dataset import list_prepared
    from dermcam.store.paths import datasets_dir

    manifests = list_prepared()
    if json_out:
        print_json(manifests)
        return
    if not manifests:
        console.print(f"No prepared data sets in {datasets_dir()}. Run: dermcam prepare SRC", highlight=False)
        return
    console.print(views.dataset_list_table(manifests, datasets_dir()))


@data_app.command("show")
@handle_errors
def show_command(name: str = typer.Argument(..., help="Data set name (see dermcam data list)."),
                 json_out: bool = JSON_OPTION) -> None:
    """Show one prepared data set: splits, leakage audit, problems, cache."""
    from dermcam.data.dataset import load_prepared

    dataset = load_prepared(name)
    if json_out:
        print_json({**dataset.manifest, "path": str(dataset.path)})
        return
    m = dataset.manifest
    console.print(f"[bold]{m['name']}[/] at {dataset.path}", highlight=False)
    console.print(f"Source: {m['source']}  created {m['created']} (dermcam {m['dermcam_version']})", highlight=False)
    console.print(f"Seed {m['seed']}, fractions {m['fractions']}, max per class {m['max_per_class']}", highlight=False)
    _print_source(m)
    views.dataset_summary(m, dataset.path)


@data_app.command("duplicates")
@handle_errors
def duplicates_command(name: str = typer.Argument(..., help="Data set name (see dermcam data list)."),
                       all_clusters: bool = typer.Option(False, "--all", help="Also list clusters within one "
                                                         "lesion id (several photos of one lesion: expected)."),
                       json_out: bool = JSON_OPTION) -> None:
    """List near-duplicate clusters: one photograph under several lesion ids (kept on one side of the
    split by prepare); a cluster whose images carry different labels is a label conflict."""
    from dermcam.data.dataset import load_prepared
    from dermcam.data.near_duplicates import duplicate_clusters

    result = duplicate_clusters(load_prepared(name), include_same_lesion=all_clusters)
    if json_out:
        print_json(result)
        return
    views.duplicates_report(result)


@data_app.command("overlap")
@handle_errors
def overlap_command(a: str = typer.Argument(..., help="Data set whose images are looked up (see dermcam data list)."),
                    b: str = typer.Argument(..., help="Data set they are looked up in."),
                    threshold: float = typer.Option(OVERLAP_THRESHOLD, "--threshold",
                                                    help="Fingerprint distance under which two images are copies "
                                                         "(0 to 0.2; 0: byte-identical copies only)."),
                    json_out: bool = JSON_OPTION) -> None:
    """List the images of A that are copies of images of B: the same file, or the same photograph
    re-encoded, resized, cropped, flipped or rotated (near-duplicate fingerprints).

    A model trained on B and evaluated on A leaves these out (dermcam evaluate --keep-overlap keeps them).
    """
    from dermcam.data.dataset import load_prepared
    from dermcam.data.overlap import check_overlap_threshold, find_overlap

    threshold = check_overlap_threshold(threshold, "--threshold")
    result = find_overlap(load_prepared(a), load_prepared(b), threshold).to_dict()
    if json_out:
        print_json(result)
        return
    views.overlap_report(result)


@data_app.command("synthetic")
@handle_errors
def synthetic_command(
    dest: Path = typer.Argument(..., help="Folder to write (Kaggle HAM10000 layout)."),
    lesions_per_class: int = typer.Option(40, "--lesions-per-class", min=1, max=10_000, help="Lesions per class."),
    classes: str = typer.Option("nv,bkl,mel", "--classes", help="Comma-separated class codes."),
    size: str = typer.Option("200x150", "--size", help="Image size, WIDTHxHEIGHT."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed: the same seed writes the same files."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Write a small synthetic dermoscopy-like data set (1-3 images per lesion) to try dermcam on."""
    from dermcam.data.geometry import parse_size
    from dermcam.data.synthetic import write_synthetic_ham10000

    check_output_dir(dest, "DEST")
    path = write_synthetic_ham10000(dest, n_lesions_per_class=lesions_per_class,
                                    classes=tuple(_split_list(classes, "--classes")),
                                    size=parse_size(size, "--size"), seed=seed)
    images = len((path / "HAM10000_metadata.csv").read_text().splitlines()) - 1
    if json_out:
        print_json({"path": str(path.resolve()), "images": images})
        return
    console.print(f"Wrote {images} synthetic images to {path}. Next: dermcam prepare {path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare_command)
    app.add_typer(data_app, name="data")

"""``dermcam prepare`` and ``dermcam data list|show|synthetic``: thin wrappers over :mod:`dermcam.data`.

The library is imported inside each command so ``dermcam --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from dermcam.cli import views
from dermcam.cli.common import JSON_OPTION, console, handle_errors, print_json
from dermcam.data.classes import CLASS_CODES, DEFAULT_CLASSES
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


@handle_errors
def prepare_command(
    src: Path = typer.Argument(..., help="HAM10000 folder: HAM10000_metadata.csv plus "
                               "HAM10000_images_part_1/ and _2/ (or images/)."),
    name: Optional[str] = typer.Option(None, "--name", help="Data set name (default: the source folder's name)."),
    classes: str = typer.Option(",".join(DEFAULT_CLASSES), "--classes",
                                help=f"Comma-separated codes from {','.join(CLASS_CODES)}; labels are "
                                     "the codes sorted alphabetically (bkl=0, mel=1, nv=2)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for the split and for --max-per-class."),
    fractions: str = typer.Option(",".join(map(str, DEFAULT_FRACTIONS)), "--fractions",
                                  help="train,val,test fractions."),
    max_per_class: Optional[int] = typer.Option(None, "--max-per-class", min=1,
                                                help="Cap images per class, sampling whole lesions "
                                                     "(550 gives the usual balanced subset)."),
    cache_size: str = typer.Option("x".join(map(str, DEFAULT_CACHE_SIZE)), "--cache-size",
                                   help="Cached image size, WIDTHxHEIGHT."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Decoding threads (default: CPU count, at most 4)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Clean, split (by lesion) and cache a HAM10000 folder as a data set in the store.

    Exit code 5 when some rows or images were skipped (listed in problems.csv).
    """
    from dermcam.data.prepare import prepare

    with rich_progress() as progress:
        report = prepare(src, name=name, classes=_split_list(classes, "--classes"), seed=seed,
                         fractions=_parse_fractions(fractions), max_per_class=max_per_class,
                         cache_size=cache_size, workers=workers,
                         progress=progress)
    if json_out:
        print_json(report.to_dict())
    else:
        views.prepare_report(report)
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
    table = Table(title=f"Prepared data sets in {datasets_dir()}", title_justify="left")
    for column in ("name", "images", "classes", "cache", "created", "source"):
        table.add_column(column, justify="right" if column == "images" else "left")
    for m in manifests:
        images = sum(sum(c.values()) for c in m["counts"].values())
        table.add_row(m["name"], str(images), ",".join(m["classes"]),
                      f"{m['cache']['width']}x{m['cache']['height']}", m["created"], m["source"])
    console.print(table)


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
    views.dataset_summary(m, dataset.path)


@data_app.command("synthetic")
@handle_errors
def synthetic_command(
    dest: Path = typer.Argument(..., help="Folder to write (Kaggle HAM10000 layout)."),
    lesions_per_class: int = typer.Option(40, "--lesions-per-class", min=1, help="Lesions per class."),
    classes: str = typer.Option("nv,bkl,mel", "--classes", help="Comma-separated class codes."),
    size: str = typer.Option("200x150", "--size", help="Image size, WIDTHxHEIGHT."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed writes the same files."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Write a small synthetic dermoscopy-like data set (1-3 images per lesion) to try dermcam on."""
    from dermcam.data.geometry import parse_size
    from dermcam.data.synthetic import write_synthetic_ham10000

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

"""``dermcam ensemble``: create, list, show and remove ensembles (logic in dermcam.evaluate.ensemble and
dermcam.store.ensembles)."""

from __future__ import annotations

from typing import Optional

import typer

from dermcam.checks import MAX_BATCH_SIZE
from dermcam.cli import views
from dermcam.cli.common import JSON_OPTION, console, handle_errors, print_json, show_result
from dermcam.errors import BadInputError, ExitCode

ensemble_app = typer.Typer(
    help=(
        "Combine trained checkpoints into one model: the mean of their calibrated probabilities.\n\n"
        "An ensemble is a small manifest in the store naming its members (no weights are copied). "
        "evaluate, explain and ckpt export accept it wherever they accept a checkpoint: ensemble:NAME "
        "(or NAME alone)."
    ),
    no_args_is_help=True,
)


def _weights(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise BadInputError(f"--weights {text!r} is not a comma-separated list of numbers") from None


@ensemble_app.command("create")
@handle_errors
def create_cmd(
    name: str = typer.Argument(..., help="Name of the new ensemble (a plain name)."),
    checkpoints: Optional[list[str]] = typer.Argument(None, metavar="[CKPT]...",
                                                      help="Member checkpoints (RUN:EPOCH, run id, sha prefix)."),
    top: Optional[int] = typer.Option(None, "--top", metavar="K", min=1,
                                      help="Instead of naming members: the best checkpoint of each of the K best runs."),
    data: Optional[str] = typer.Option(None, "--data", "-d",
                                       help="With --top: only runs trained on this prepared set (default: the set "
                                            "of the best checkpoint)."),
    select: str = typer.Option("all", "--select", metavar="all|greedy",
                               help="all: every candidate, equal weights. greedy: Caruana's forward selection with "
                                    "replacement on the validation split (members and weights)."),
    weights: Optional[str] = typer.Option(None, "--weights", metavar="W1,W2,...",
                                          help="Weights of the members, in order (normalised to sum to 1)."),
    operating_point: Optional[str] = typer.Option(None, "--operating-point", metavar="CLASS:METRIC=T",
                                                  help="Choose a threshold on the ensemble's probability of CLASS "
                                                       "on the validation split, e.g. mel:sensitivity=0.90."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite an ensemble of the same name."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (for the validation pass)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, max=MAX_BATCH_SIZE, help="Images per forward pass."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Make an ensemble of checkpoints and score it on the validation split.

    Members must have the same classes in the same order and be trained on the same image cache.
    Only the validation split is read; evaluate it on test with: dermcam evaluate ensemble:NAME
    """
    from dermcam.evaluate.ensemble import create_ensemble
    from dermcam.progress import rich_progress
    from dermcam.store.ensembles import check_new_name, manifest_path

    path = manifest_path(check_new_name(name))  # refused before the validation pass, not after it
    if not replace and path.exists():
        raise BadInputError(f"ensemble '{name}' exists; choose another name or add --replace")
    with rich_progress(enabled=not json_output) as progress:
        result = create_ensemble(name, checkpoints or None, top=top, dataset=data, weights=_weights(weights),
                                 select=select, operating_point=operating_point, replace=replace, device=device,
                                 batch_size=batch_size, progress=progress)
    show_result(result, json_output, views.ensemble_created)


@ensemble_app.command("list")
@handle_errors
def list_cmd(as_json: bool = JSON_OPTION) -> None:
    """List ensembles with their members, validation score and whether they load (exit 4 if a manifest is damaged)."""
    from dermcam.store.ensembles import list_ensembles
    from dermcam.store.paths import ensembles_dir

    listing = list_ensembles()
    if as_json:
        print_json(listing)
    elif not listing["ensembles"] and not listing["damaged"]:
        console.print(f"No ensembles in {ensembles_dir()}; make one with: dermcam ensemble create NAME CKPT CKPT...")
    else:
        views.ensemble_table(listing)
    if listing["damaged"]:
        raise typer.Exit(int(ExitCode.CORRUPT))


@ensemble_app.command("show")
@handle_errors
def show_cmd(name: str = typer.Argument(..., help="Ensemble name (or ensemble:NAME)."),
             as_json: bool = JSON_OPTION) -> None:
    """Show one ensemble: members, weights, how they were chosen, validation metrics, operating point."""
    from dermcam.store.ensembles import PREFIX, describe_ensemble, read_ensemble

    info = describe_ensemble(read_ensemble(name.removeprefix(PREFIX)))
    if as_json:
        print_json(info)
    else:
        views.ensemble_details(info)


@ensemble_app.command("rm")
@handle_errors
def rm_cmd(name: str = typer.Argument(..., help="Ensemble name (or ensemble:NAME)."),
           as_json: bool = JSON_OPTION) -> None:
    """Remove an ensemble's manifest. Its member checkpoints stay (ckpt prune may remove them afterwards)."""
    from dermcam.store.ensembles import PREFIX, remove_ensemble

    path = remove_ensemble(name.removeprefix(PREFIX))
    if as_json:
        print_json({"removed": name.removeprefix(PREFIX), "path": str(path)})
    else:
        console.print(f"Removed ensemble {name.removeprefix(PREFIX)} ({path}); its members are kept.", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(ensemble_app, name="ensemble")

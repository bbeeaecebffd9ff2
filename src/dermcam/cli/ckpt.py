"""``dermcam ckpt``: list, prune, export, restore and verify checkpoints (logic in dermcam.store.manage and dermcam.store.exchange)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from dermcam.cli import views
from dermcam.cli.common import JSON_OPTION, console, err_console, handle_errors, print_json, show_warnings
from dermcam.errors import BadInputError, ExitCode

ckpt_app = typer.Typer(
    help=(
        "Manage checkpoints: list, prune, export, restore, verify.\n\n"
        "A checkpoint is named RUN:EPOCH (3fa9c1:7); every command also accepts a run id or prefix "
        "(its best checkpoint), a sha256 prefix, 'best', 'latest' or a path."
    ),
    no_args_is_help=True,
)


def _interactive() -> bool:
    return sys.stdin.isatty()


@ckpt_app.command("list")
@handle_errors
def list_cmd(
    run: Optional[str] = typer.Option(None, "--run", help="Only this run (id or unique prefix)."),
    sort: Optional[str] = typer.Option(None, "--sort", metavar="METRIC",
                                       help="Sort best first by a validation metric (balanced_accuracy, macro_f1, "
                                            "recall_mel, auc_macro, loss, ...), 'monitor', or epoch/age/size."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List every checkpoint with its metrics, size, age and flags.

    Flags: best (what 'best' resolves to), run-best (best of its run), latest (its run's resume point),
    exported, imported, training (its run is training right now).
    """
    from dermcam.store.manage import list_checkpoint_rows
    from dermcam.store.paths import runs_dir

    rows = list_checkpoint_rows(run=run, sort=sort)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print(f"No checkpoints in {runs_dir()}; train one with: dermcam train")
        return
    console.print(views.checkpoint_table(rows))


@ckpt_app.command("prune")
@handle_errors
def prune_cmd(
    keep_best: int = typer.Option(..., "--keep-best", min=0, metavar="N",
                                  help="Keep the N best by the monitored metric (per run; overall with --global)."),
    keep_last: int = typer.Option(0, "--keep-last", min=0, metavar="M", help="Also keep each run's last M epochs."),
    run: Optional[str] = typer.Option(None, "--run", help="Only prune this run."),
    global_rank: bool = typer.Option(False, "--global", help="Rank all runs together (they must monitor the same metric)."),
    keep_latest: bool = typer.Option(True, "--keep-latest/--no-keep-latest",
                                     help="Keep each run's resume point (default). Runs training right now keep "
                                          "their latest and best regardless."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be removed; change nothing."),
    force: bool = typer.Option(False, "--force", help="Also delete members of ensembles (those ensembles stop "
                                                      "loading) and cross-validation folds' best checkpoints; "
                                                      "without it they are kept and listed."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete checkpoints that no keep rule protects (weights, training state and sidecar).

    Kept: the N best by the monitored metric in their sidecars, each run's resume point, its last M,
    every member of an ensemble and each cross-validation fold's best checkpoint (unless --force).
    A run that is training right now always keeps its latest and its best checkpoint.
    Asks before deleting when run from a terminal, unless --yes.
    """
    from dermcam.store.manage import prune

    options = {"keep_best": keep_best, "keep_last": keep_last, "run": run, "global_rank": global_rank,
               "keep_latest": keep_latest, "force": force}
    only = None
    if not dry_run and not yes and _interactive():
        preview = prune(dry_run=True, **options)
        views.prune_result(preview, err_console if as_json else console)
        if not preview["removed"]:
            return
        if not typer.confirm(f"Delete these {len(preview['removed'])} checkpoint(s)?", default=False, err=True):
            err_console.print("Nothing deleted.")
            raise typer.Exit(int(ExitCode.OK))
        only = {r["id"] for r in preview["removed"]}
    result = prune(dry_run=dry_run, only=only, **options)
    if as_json:
        print_json(result)
    else:
        views.prune_result(result)


@ckpt_app.command("export")
@handle_errors
def export_cmd(
    ckpt: str = typer.Argument("best", metavar="CKPT",
                               help="Checkpoint or ensemble to export (RUN:EPOCH, run, sha prefix, best, latest, "
                                    "ensemble:NAME)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="File (or folder) to write; default ./dermcam-<backbone>-<run>-e<epoch>"
                                               ".safetensors (or .onnx; an ensemble: ./dermcam-ensemble-<name>...)"),
    fmt: str = typer.Option("safetensors", "--format", "-f", metavar="safetensors|onnx",
                            help="safetensors: weights + metadata for timm/dermcam. onnx: one graph for ONNX Runtime "
                                 "(resize, normalisation and calibration inside; needs dermcam\\[onnx])."),
    half: bool = typer.Option(False, "--half", help="Store float16 weights (half the size; safetensors only)."),
    bf16: bool = typer.Option(False, "--bf16", help="Store bfloat16 weights (half the size, float32's range; safetensors only)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write one self-contained file for inference anywhere: .safetensors (loads with plain timm too) or .onnx.

    Its metadata holds backbone, classes, preprocessing, calibration and operating point, metrics,
    training config and versions, plus the source checkpoint's id and sha256 (JSON under the
    "dermcam" key of the safetensors header or of the ONNX model's metadata_props).

    An ensemble (ensemble:NAME) exports as one file too: every member's weights (under members.0.,
    members.1., ...), and per member its backbone, preprocessing, calibration and weight, plus the
    combination rule and the ensemble's operating point. evaluate and explain take the file as they
    take ensemble:NAME; ckpt restore does not import it.
    """
    if half and bf16:
        raise BadInputError("choose one of --half and --bf16")
    if fmt.lower() == "onnx":
        from dermcam.deploy.onnx_export import export_onnx

        if half or bf16:
            raise BadInputError("--half and --bf16 apply to safetensors exports; an ONNX export is float32")
        result = export_onnx(ckpt, output, force=force)
    elif fmt.lower() == "safetensors":
        from dermcam.store.exchange import export_checkpoint

        result = export_checkpoint(ckpt, output, dtype="float16" if half else "bfloat16" if bf16 else "float32",
                                   force=force)
    else:
        raise BadInputError(f"unknown --format '{fmt}' (choose safetensors or onnx)")
    show_warnings(result.get("warnings", []))
    if as_json:
        print_json(result)
        return
    use = (f"ONNX Runtime and PyTorch agree within {result['check_gap']:.1g} in probability. Run it with ONNX "
           "Runtime: input 'image' is uint8 RGB pixels at the cache size (docs/checkpoints.md)"
           if result["format"] == "onnx" else
           f"Use it with: dermcam explain IMAGE -c {result['file']}  or: dermcam evaluate {result['file']}; "
           "import it elsewhere with: dermcam ckpt restore FILE (plain timm + safetensors: docs/checkpoints.md)"
           if result.get("kind") == "ensemble" else
           f"Use it with: dermcam explain IMAGE -c {result['file']}  or import it elsewhere with: dermcam ckpt restore FILE")
    console.print(f"Exported {result['id']} ({result['backbone']}, {result['format']}, {result['dtype']}) to {result['file']}\n"
                  f"  {views.human_bytes(result['size'])} (checkpoint weights: {views.human_bytes(result['source_size'])}), "
                  f"sha256 {result['file_sha256'][:16]}...\n  {use}", highlight=False, soft_wrap=True)


@ckpt_app.command("restore")
@handle_errors
def restore_cmd(
    target: str = typer.Argument(..., metavar="FILE|CKPT", help="An exported .safetensors file, or a checkpoint."),
    name: Optional[str] = typer.Option(None, "--name", help="For an exported ensemble: the name it gets in this "
                                                            "store (default: the name it was exported with)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import an exported FILE into the store, or roll a run back to CKPT.

    FILE: a file written by 'dermcam ckpt export' (on this machine or another one).
    It is validated completely, then copied into the store as a new run marked 'imported'.
    It lists, explains and evaluates like any checkpoint, and its weights file can start a new run
    (dermcam train --pretrained PATH), but it has no training state, so it cannot be resumed.
    An exported ensemble becomes one such run per member (or the checkpoint it came from, when this
    store has it) and the ensemble itself (dermcam ensemble list), answering exactly as the file does.
    A bad file is refused with a one-line error and the store is left untouched; importing the same
    file twice changes nothing.

    CKPT: an existing checkpoint becomes the point 'dermcam train --resume' continues from.
    Nothing is deleted: the run's later checkpoints stay until training writes those epochs again.
    """
    from dermcam.store.exported import is_exported_file
    from dermcam.store.manage import restore, rollback_plan

    if not is_exported_file(target) and not yes and _interactive():
        plan = rollback_plan(target)
        if plan["later"]:
            err_console.print(f"Run {plan['run_id']} will resume after epoch {plan['epoch']}; its later "
                              f"checkpoints ({', '.join(plan['later'])}) stay until training overwrites them.")
            if not typer.confirm(f"Make {plan['id']} the resume point?", default=False, err=True):
                err_console.print("Nothing changed.")
                raise typer.Exit(int(ExitCode.OK))
    result = restore(target, name=name)
    show_warnings(result.get("warnings", []))
    if as_json:
        print_json(result)
    elif result.get("kind") == "ensemble":
        views.ensemble_imported(result)
    elif result["action"] == "import" and not result["created"]:
        console.print(f"{result['file']} is already in the store as {result['id']}; nothing imported.")
    elif result["action"] == "import":
        console.print(f"Imported {result['file']} as checkpoint [bold]{result['id']}[/] ({result['backbone']}; "
                      f"exported from {result['source_id']}). Not resumable: no training state.\n"
                      f"  Use it with: dermcam explain IMAGE -c {result['id']}; fine-tune from it with: "
                      f"dermcam train --pretrained {result['weights']}", highlight=False, soft_wrap=True)
    else:
        later = (f" Later checkpoints ({', '.join(result['later'])}) stay until training overwrites them."
                 if result["later"] else "")
        console.print(f"Run {result['run_id']} now resumes from [bold]{result['id']}[/] (was "
                      f"{result['previous'] or 'none'}): dermcam train --resume --run {result['run_id']}.{later}",
                      highlight=False)


@ckpt_app.command("verify")
@handle_errors
def verify_cmd(
    clean: bool = typer.Option(False, "--clean", help="Delete leftovers of interrupted writes (never a complete checkpoint)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Re-hash every checkpoint file and check every sidecar.

    Damaged: a hash or size mismatch, an unreadable sidecar, a missing file, an ensemble or cross-validation
    record that fails its checks (exit code 4).
    Incomplete: weights without a sidecar and temporaries of interrupted writes (--clean deletes them).
    """
    from dermcam.progress import rich_progress
    from dermcam.store.manage import verify_store

    with rich_progress(enabled=not as_json) as progress:
        report = verify_store(clean=clean, progress=progress)
    if as_json:
        print_json(report)
    else:
        _render_verify(report, clean)
    if report["damaged"]:
        raise typer.Exit(int(ExitCode.CORRUPT))


def _render_verify(report: dict[str, Any], clean: bool) -> None:
    console.print(f"Checked {report['checked']} checkpoint(s): {len(report['ok'])} intact, "
                  f"{len(report['damaged'])} damaged, {len(report['incomplete'])} incomplete file(s).")
    for item in report["damaged"]:
        console.print(f"[red]damaged[/] {item['problem']}", highlight=False, soft_wrap=True)
    for item in report["incomplete"]:
        state = "removed" if item["cleaned"] else item["note"] or "leftover of an interrupted write"
        console.print(f"[yellow]incomplete[/] {item['path']} ({views.human_bytes(item['bytes'])}): {state}",
                      highlight=False, soft_wrap=True)
    if clean and report["cleaned_bytes"]:
        console.print(f"Freed {views.human_bytes(report['cleaned_bytes'])}.")
    elif report["incomplete"] and not clean:
        console.print("Remove the leftovers with: dermcam ckpt verify --clean")


def register(app: typer.Typer) -> None:
    app.add_typer(ckpt_app, name="ckpt")

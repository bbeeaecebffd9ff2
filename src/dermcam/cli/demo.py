"""``dermcam demo``: the whole pipeline on built-in synthetic data, each step shown as the command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from dermcam.checks import check_output_dir
from dermcam.cli import views
from dermcam.cli.common import console, handle_errors


class _ConsoleObserver:
    """Prints each step as the command a user would type, then renders its result like that command."""

    def step(self, command: str) -> None:
        console.print(f"\n[bold cyan]$ {command}[/]", highlight=False)

    def note(self, message: str) -> None:
        console.print(f"[dim]{message}[/]", highlight=False)

    def done(self, name: str, result: Any) -> None:
        if name == "prepare":
            views.prepare_report(result)
        elif name == "train":
            views.train_result(result)
        elif name == "ckpt list":
            console.print(views.checkpoint_table(result))
        elif name == "explain":
            console.print(views.explain_table(result, console.width))


@handle_errors
def demo_command(
    out: Path = typer.Option(Path("dermcam-demo"), "--out", "-o", help="Folder for the demo's data, store and overlays."),
) -> None:
    """Run prepare -> train -> ckpt list -> explain on a built-in synthetic data set (offline, CPU, minutes).

    The demo keeps its own store under OUT/store, so it never mixes with your runs; running it again
    reuses what is already done.
    """
    from dermcam.demo import run_demo
    from dermcam.progress import rich_progress

    check_output_dir(out, "--out")
    console.print("[bold]dermcam demo[/]: the whole pipeline on a synthetic, dermoscopy-like data set. "
                  f"Everything goes to {out}/ (its own store: DERMCAM_HOME={out}/store).")
    with rich_progress() as progress:
        result = run_demo(out, observer=_ConsoleObserver(), progress=progress)
    train_result = result.results["train"]
    test = train_result.test_metrics or {}
    console.print("\n[bold green]Done[/] in {:.0f} s.".format(result.seconds))
    console.print(f"Best checkpoint {train_result.best_id}: test balanced accuracy "
                  f"{test.get('balanced_accuracy', float('nan')):.3f}, melanoma recall {test.get('recall_mel', float('nan')):.3f}"
                  f", AUC {test.get('auc_macro') or float('nan'):.3f}", highlight=False)
    console.print(f"Overlays: {os.path.relpath(result.explain_dir)}/   Report: "
                  f"{os.path.relpath(train_result.run_dir / 'report')}/", highlight=False)
    console.print("\nNext, on the real data (Kaggle's HAM10000 folder, see README):\n"
                  "  dermcam prepare ./ham10000\n"
                  "  dermcam train --backbone efficientnet_lite0 --image-size 192x144 --epochs 14 --lr 5e-4\n"
                  "  dermcam explain lesion.jpg", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)

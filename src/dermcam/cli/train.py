"""``dermcam train`` and ``dermcam evaluate``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

from dermcam.cli._common import JSON_OPTION, console, err_console, handle_errors, print_json

GRID = "Repeat to compare configurations (each combination becomes a run)"


@handle_errors
def train_command(
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Prepared data set name (default: the latest prepared)."),
    backbone: list[str] = typer.Option([], "--backbone", "-b", help=f"Any timm model name (default: convnext_tiny). {GRID}."),
    pretrained: str = typer.Option("auto", help="auto | hub | none | PATH to a .safetensors / state-dict file."),
    epochs: int = typer.Option(12, help="Training epochs (the cosine schedule spans all of them)."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    lr: list[float] = typer.Option([], "--lr", help=f"Learning rate (default: 3e-4). {GRID}."),
    head_lr_scale: float = typer.Option(1.0, help="The new classifier head learns at this multiple of --lr."),
    freeze: int = typer.Option(0, help="Keep the stem and this many first stages at their pretrained weights (faster: no backward pass through them)."),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay (not on norms and biases)."),
    warmup_epochs: float = typer.Option(1.0, help="Linear warmup before the cosine decay."),
    label_smoothing: float = typer.Option(0.1, help="Label smoothing of the cross-entropy loss."),
    balance: str = typer.Option("loss", help="Class imbalance: loss (weighted loss) | sampler (balanced sampling) | none."),
    augment: bool = typer.Option(True, help="Dermoscopy augmentations: any rotation, flips, mild zoom and colour jitter."),
    image_size: list[str] = typer.Option([], "--image-size", help=f"Model input: 192 (square) or WIDTHxHEIGHT such as 192x144 for 4:3 images (default: the backbone's). {GRID}."),
    accumulate: int = typer.Option(1, help="Gradient accumulation steps (effective batch = batch size x this)."),
    ema: bool = typer.Option(False, help="Keep an exponential moving average of the weights and evaluate/save it."),
    ema_decay: float = typer.Option(0.998, help="EMA decay per optimizer step (with --ema)."),
    patience: int = typer.Option(5, help="Early stopping: epochs without improvement of --monitor."),
    monitor: str = typer.Option("val_balanced_accuracy", help="Metric that selects the best checkpoint."),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 where the hardware supports it) | bf16 | fp16 | fp32."),
    channels_last: bool = typer.Option(True, help="channels_last memory format (faster convolutions)."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="Under torchrun on CUDA: synchronise BatchNorm statistics across processes."),
    seed: list[int] = typer.Option([], "--seed", help=f"Random seed (default: 0). {GRID}."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of configurations: shared keys + [[run]] tables."),
    resume: bool = typer.Option(False, "--resume", help="Continue the latest run (or --run ID) exactly where it stopped."),
    run: Optional[str] = typer.Option(None, "--run", help="With --resume: the run id (or a unique prefix) to continue."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Fine-tune an ImageNet-pretrained backbone on a prepared data set.

    Every epoch writes a checkpoint (safetensors + JSON sidecar) to the store; a killed run continues
    with --resume. Several --backbone/--lr/--image-size/--seed values, or --config FILE, train one run
    per configuration and print a comparison table.
    """
    from dermcam.progress import rich_progress
    from dermcam.training import TrainConfig, best_result, expand_grid, load_experiments, train, train_many

    base = TrainConfig(dataset=data, pretrained=pretrained, head_lr_scale=head_lr_scale, freeze=freeze, epochs=epochs, batch_size=batch_size,
                       weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                       balance=balance, augment=augment, accumulate=accumulate, ema=ema, ema_decay=ema_decay, patience=patience,
                       monitor=monitor, device=device, precision=precision, channels_last=channels_last,
                       sync_bn=sync_bn)
    with rich_progress() as progress:
        if resume:
            results = [train(base, resume=True, run=run, progress=progress)]
        else:
            configs = load_experiments(config, base) if config else expand_grid(
                base, backbone=backbone, lr=lr, seed=seed,
                image_size=[int(v) if v.isdigit() else v for v in image_size])
            for cfg in configs:
                cfg.validate()
            results = train_many(configs, progress=progress)
    best = best_result(results)
    if json_output:
        print_json([_result_dict(r, best) for r in results])
        return
    for result in results:
        _print_result(result)
    if len(results) > 1:
        _print_comparison(results, best)


def _result_dict(result: Any, best: Any) -> dict[str, Any]:
    return {"run_id": result.run_id, "run_dir": str(result.run_dir), "best_checkpoint": result.best_id,
            "best_value": result.best_value, "monitor": result.config.monitor, "epochs_done": result.epochs_done,
            "stopped_early": result.stopped_early, "resumed_from": result.resumed_from,
            "test_metrics": result.test_metrics, "report": [str(p) for p in result.report_files],
            "config": dataclasses.asdict(result.config), "pretrained": result.pretrained,
            "seconds": round(result.seconds, 1), "is_best": best is not None and result.run_id == best.run_id}


def _print_result(result: Any) -> None:
    from rich.table import Table

    from dermcam.metrics import format_value

    console.print(f"\n[bold]Run {result.run_id}[/] ({result.config.backbone}, {result.epochs_done} epochs"
                  f"{', stopped early' if result.stopped_early else ''}, {result.seconds / 60:.1f} min)")
    if result.best_id is None:
        console.print("No checkpoint was saved.")
        return
    console.print(f"Best checkpoint: [bold]{result.best_id}[/] ({result.config.monitor} = {result.best_value:.4f})")
    if result.test_metrics:
        metrics = result.test_metrics
        table = Table(title="Test split (best checkpoint)")
        for column in ("balanced acc", "macro F1", "AUC (macro)", "accuracy"):
            table.add_column(column, justify="right")
        table.add_row(*(format_value(metrics.get(k)) for k in ("balanced_accuracy", "macro_f1", "auc_macro", "accuracy")))
        console.print(table)
        recalls = "  ".join(f"{k.removeprefix('recall_')} {v:.3f}" for k, v in metrics.items() if k.startswith("recall_"))
        console.print(f"Per-class recall: {recalls}")
    if result.report_files:
        console.print(f"Report: {result.report_files[0].parent}")


def _print_comparison(results: list[Any], best: Any) -> None:
    from rich.table import Table

    from dermcam.metrics import format_value

    table = Table(title="Comparison (best run marked *)")
    for column in ("", "run", "backbone", "lr", "size", "seed", "epochs", "best val", "test bal.acc", "test mel recall"):
        table.add_column(column)
    for r in results:
        test = r.test_metrics or {}
        table.add_row("*" if best is not None and r.run_id == best.run_id else "", r.run_id, r.config.backbone,
                      f"{r.config.lr:g}", str(r.config.image_size or "default"), str(r.config.seed),
                      str(r.epochs_done), format_value(r.best_value), format_value(test.get("balanced_accuracy")),
                      format_value(test.get("recall_mel")))
    console.print(table)
    if best is not None:
        console.print(f"Best: [bold]{best.best_id}[/] — explain and evaluate use the best checkpoint by default.")


@handle_errors
def evaluate_command(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint id (RUN:EPOCH), run id, exported file (default: best)."),
    split: str = typer.Option("test", help="train | val | test."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data set (default: the one it was trained on)."),
    tta: bool = typer.Option(False, help="Average predictions over the four flips (as explain --tta does)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default: no files, print only)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto | bf16 | fp16 | fp32."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Evaluate a checkpoint on a split: balanced accuracy, macro F1, per-class recall, AUC, confusion matrix."""
    from rich.table import Table

    from dermcam.evaluation import evaluate
    from dermcam.metrics import format_value
    from dermcam.progress import rich_progress

    with rich_progress() as progress:
        result = evaluate(checkpoint, split=split, dataset=data, tta=tta, device=device, precision=precision,
                          out_dir=out, progress=progress)
    for warning in result.warnings:
        err_console.print(f"[yellow]Warning:[/] {warning}")
    if json_output:
        print_json({"checkpoint": result.checkpoint_id, "dataset": result.dataset, "split": result.split,
                    "metrics": result.metrics, "files": [str(p) for p in result.files]})
        return
    metrics = result.metrics
    table = Table(title=f"{result.checkpoint_id} on {result.dataset}/{result.split} (n={metrics['n']})")
    table.add_column("class")
    for column in ("recall", "precision", "F1", "AUC", "support"):
        table.add_column(column, justify="right")
    for code in result.classes:
        table.add_row(code, *(format_value(metrics.get(f"{k}_{code}")) for k in ("recall", "precision", "f1", "auc", "support")))
    console.print(table)
    console.print(f"balanced accuracy {format_value(metrics['balanced_accuracy'])}   macro F1 "
                  f"{format_value(metrics['macro_f1'])}   AUC (macro) {format_value(metrics['auc_macro'])}   "
                  f"accuracy {format_value(metrics['accuracy'])}")
    if result.files:
        console.print(f"Report: {result.report_dir}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)

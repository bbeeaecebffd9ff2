"""``dermcam train``: the options, as a dict, to :func:`dermcam.train.trainer.train_configurations`.

Defaults live in ``TrainConfig`` alone: every option here defaults to None ("not given"), the help
text quotes the dataclass's default, and only the options a user typed reach the library. That is
also how ``--resume`` knows which options were given and can say which of them it ignores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from dermcam.checks import MAX_BATCH_SIZE, MAX_EPOCHS, SEED_MAX
from dermcam.cli import views
from dermcam.cli.common import JSON_OPTION, handle_errors, print_json, show_result, threads_option
from dermcam.train.config import TrainConfig

D = TrainConfig()  # the defaults, quoted in the help below
GRID = "Repeat to compare configurations (each combination becomes a run)"
HELP = {  # option help; _h() appends TrainConfig's default
    "backbone": "Any timm model name",
    "pretrained": "auto | hub | none | PATH to a .safetensors / state-dict file",
    "epochs": f"Training epochs, 1 to {MAX_EPOCHS}; the cosine schedule spans all of them",
    "batch_size": f"Images per batch, 1 to {MAX_BATCH_SIZE}",
    "lr": "Learning rate",
    "head_lr_scale": "The new classifier head learns at this multiple of --lr",
    "freeze": "Keep the stem and this many first stages at their pretrained weights "
              "(faster: no backward pass through them)",
    "weight_decay": "AdamW weight decay, not on norms and biases",
    "warmup_epochs": "Linear warmup before the cosine decay",
    "label_smoothing": "Label smoothing of the cross-entropy loss",
    "balance": "Class imbalance: loss (weighted loss) | sampler (balanced sampling) | none",
    "augment": "Dermoscopy augmentations: any rotation, flips, mild zoom and colour jitter",
    "accumulate": "Gradient accumulation steps; effective batch = batch size x this",
    "ema": "Keep an exponential moving average of the weights and evaluate/save it",
    "ema_decay": "EMA decay per optimizer step, with --ema",
    "patience": "Early stopping: epochs without improvement of --monitor",
    "monitor": "Metric that selects the best checkpoint",
    "device": "auto (CUDA when present) | cpu | cuda | cuda:N",
    "precision": "auto (bf16 where the hardware supports it) | bf16 | fp16 | fp32",
    "channels_last": "channels_last memory format, faster convolutions",
    "compile": "torch.compile the training forward (the first step compiles; later ones may be faster on a "
               "GPU); where it is unavailable or fails, training goes on eagerly with a note",
    "seed": f"Random seed, 0 to {SEED_MAX}",
    "color_constancy": "Colour constancy at the cache size, before augmentation, recorded in the checkpoint "
                       "so evaluate, explain, serve and ONNX apply it too: none | shades-of-gray (Shades of "
                       "Gray, p=6)",
    "operating_point": "After training, calibrate the best checkpoint on val and choose this threshold on "
                       "its calibrated probabilities: CLASS:sensitivity=T or CLASS:specificity=T",
    "metadata": "Patient metadata fused with the image features: any of age,sex,site (the data set's own "
                "columns; a missing value is a learned 'unknown'; never dx_type, which leaks the label)",
}


def _h(name: str, grid: bool = False) -> str:
    """Help text quoting TrainConfig's default for ``name``."""
    return f"{HELP[name]} (default: {getattr(D, name)})." + (f" {GRID}." if grid else "")


@handle_errors
def train_command(
    data: Optional[str] = typer.Option(None, "--data", "-d",
                                       help="Prepared data set name (default: the latest prepared)."),
    backbone: list[str] = typer.Option([], "--backbone", "-b", help=_h("backbone", grid=True)),
    pretrained: Optional[str] = typer.Option(None, help=_h("pretrained")),
    epochs: Optional[int] = typer.Option(None, help=_h("epochs")),
    batch_size: Optional[int] = typer.Option(None, help=_h("batch_size")),
    lr: list[float] = typer.Option([], "--lr", help=_h("lr", grid=True)),
    head_lr_scale: Optional[float] = typer.Option(None, help=_h("head_lr_scale")),
    freeze: Optional[int] = typer.Option(None, help=_h("freeze")),
    weight_decay: Optional[float] = typer.Option(None, help=_h("weight_decay")),
    warmup_epochs: Optional[float] = typer.Option(None, help=_h("warmup_epochs")),
    label_smoothing: Optional[float] = typer.Option(None, help=_h("label_smoothing")),
    balance: Optional[str] = typer.Option(None, help=_h("balance")),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help=_h("augment")),
    image_size: list[str] = typer.Option([], "--image-size",
                                         help="Model input: 192 (square) or WIDTHxHEIGHT such as 192x144 for 4:3 "
                                              f"images (default: the backbone's). {GRID}."),
    accumulate: Optional[int] = typer.Option(None, help=_h("accumulate")),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help=_h("ema")),
    ema_decay: Optional[float] = typer.Option(None, help=_h("ema_decay")),
    patience: Optional[int] = typer.Option(None, help=_h("patience")),
    monitor: Optional[str] = typer.Option(None, help=_h("monitor")),
    device: Optional[str] = typer.Option(None, help=_h("device")),
    precision: Optional[str] = typer.Option(None, help=_h("precision")),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help=_h("channels_last")),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help=_h("compile")),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn", help="Under torchrun on CUDA: synchronise BatchNorm "
                                                                    "statistics across processes."),
    seed: list[int] = typer.Option([], "--seed", help=_h("seed", grid=True)),
    operating_point: Optional[str] = typer.Option(None, "--operating-point", metavar="CLASS:METRIC=T",
                                                  help=_h("operating_point")),
    color_constancy: Optional[str] = typer.Option(None, "--color-constancy", metavar="none|shades-of-gray",
                                                   help=_h("color_constancy")),
    metadata: Optional[str] = typer.Option(None, "--metadata", metavar="FIELDS", help=_h("metadata")),
    folds: Optional[int] = typer.Option(None, "--folds", metavar="K",
                                        help="Cross-validate: train+val cut into K grouped, stratified folds (2 to "
                                             "20), one run per fold validated on its held-out fold, the test split "
                                             "untouched; the out-of-fold estimate is stored as cv:NAME (dermcam "
                                             "evaluate cv:NAME) and the K fold models as ensemble:NAME (NAME: "
                                             "--ensemble, default DATASET-Kfold-XXXXXX)."),
    config: Optional[Path] = typer.Option(None, "--config",
                                          help="TOML file of configurations: shared keys + [[run]] tables."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue the latest run (or --run ID) exactly where it stopped; a fold "
                                     "of a cross-validation continues with its next folds."),
    run: Optional[str] = typer.Option(None, "--run",
                                      help="With --resume: the run id (or a unique prefix) to continue, or cv:NAME "
                                           "for a cross-validation's next unfinished fold."),
    ensemble: Optional[str] = typer.Option(None, "--ensemble", metavar="NAME",
                                           help="When several runs are compared: store their best ensemble (greedy "
                                                "selection on validation) as NAME; see dermcam ensemble. With "
                                                "--folds: the name of the cross-validation and its ensemble."),
    log: list[str] = typer.Option([], "--log", metavar="tensorboard[:DIR]|mlflow[:URI]",
                                  help="Also track the run in TensorBoard (event files in the run folder, or "
                                       "DIR/<run id>) or MLflow (MLflow's default tracking URI, or URI): curves, "
                                       "configuration, test metrics and report; a tracker that fails is reported "
                                       "once and training goes on. Repeat for both. Needs dermcam\\[tensorboard] or "
                                       "dermcam\\[mlflow]; see docs/training.md, Tracking runs."),
    log_model: Optional[bool] = typer.Option(None, "--log-model",
                                             help="With --log mlflow: also log the exported best model as an "
                                                  "artefact."),
    threads: Optional[str] = threads_option(None),
    json_output: bool = JSON_OPTION,
) -> None:
    """Fine-tune an ImageNet-pretrained backbone on a prepared data set.

    Every epoch writes a checkpoint (safetensors + JSON sidecar) to the store; a killed run continues
    with --resume. At the end the best checkpoint is calibrated on the val split (temperature
    scaling; see dermcam calibrate) and evaluated on the test split. Several --backbone/--lr/--image-size/--seed values, or --config FILE, train one run
    per configuration and print a comparison table, with the best ensemble of the runs (greedy
    selection on validation) as its last row; --ensemble NAME stores it (--json prints the runs only).
    --folds K cross-validates one configuration instead (see docs/training.md, Cross-validation).
    """
    from dermcam.progress import rich_progress
    from dermcam.train.crossval import train_or_cross_validate
    from dermcam.train.trainer import best_result, ensemble_offer

    if ensemble is not None:
        from dermcam.store.ensembles import check_new_name

        check_new_name(ensemble)  # before any run starts
    if log or log_model:
        from dermcam.track.spec import check_log

        check_log(log, bool(log_model and log))  # before any run starts (a resume's too: its run may have mlflow)

    given: dict[str, Any] = {
        "dataset": data, "pretrained": pretrained, "epochs": epochs, "batch_size": batch_size,
        "head_lr_scale": head_lr_scale, "freeze": freeze, "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs, "label_smoothing": label_smoothing, "balance": balance, "augment": augment,
        "accumulate": accumulate, "ema": ema, "ema_decay": ema_decay, "patience": patience, "monitor": monitor,
        "device": device, "precision": precision, "channels_last": channels_last, "compile": compile,
        "sync_bn": sync_bn, "operating_point": operating_point, "folds": folds, "color_constancy": color_constancy,
        "metadata": metadata, "log": log or None, "log_model": log_model,
    }
    grid = {"backbone": backbone, "lr": lr, "seed": seed, "image_size": image_size}
    with rich_progress() as progress:
        results = train_or_cross_validate({k: v for k, v in given.items() if v is not None},
                                          grid={k: v for k, v in grid.items() if v}, config_file=config,
                                          resume=resume, run=run, threads=threads,
                                          cv_name=ensemble if folds is not None else None, progress=progress)
        if not isinstance(results, list):  # a cross-validation (--folds, or the resume of one of its folds)
            show_result(results, json_output, views.crossval_trained)
            return
        offer, created = (ensemble_offer(results, save_as=ensemble, progress=progress)
                          if len(results) > 1 and (ensemble or not json_output) else (None, None))
    best = best_result(results)
    if json_output:
        print_json([r.to_dict(best) for r in results])
        return
    for result in results:
        views.train_result(result)
    if len(results) > 1:
        views.train_comparison(results, best, offer, created)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)

"""What defines a training run: :class:`TrainConfig` (defaults defined here, once), grids and TOML experiment files."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermcam.checks import MAX_BATCH_SIZE, MAX_EPOCHS, SEED_MAX, check_int, check_text
from dermcam.color import COLOR_CONSTANCY_METHODS
from dermcam.data.geometry import parse_size
from dermcam.errors import BadInputError

MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 32, 2048  # model input, pixels per side
MAX_FREEZE = 100  # --freeze counts stages; no timm backbone has nearly as many
MIN_FOLDS, MAX_FOLDS = 2, 20  # cross-validation: --folds K
MAX_DISTILL_TEMPERATURE = 100.0
MONITORS = ("val_balanced_accuracy", "val_macro_f1", "val_auc_macro", "val_recall_mel", "val_accuracy", "val_loss")


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in run.json and every sidecar."""

    dataset: str | None = None
    backbone: str = "convnext_tiny"
    pretrained: str = "auto"
    epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-4
    head_lr_scale: float = 1.0
    freeze: int = 0  # the stem and this many first stages keep their pretrained weights
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    balance: str = "loss"
    augment: bool = True
    image_size: int | str | None = None  # 192 (square) or "192x144" (WIDTHxHEIGHT)
    accumulate: int = 1
    ema: bool = False
    ema_decay: float = 0.998
    patience: int = 5
    monitor: str = "val_balanced_accuracy"
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False  # torch.compile the training forward; falls back to eager with a note
    sync_bn: bool = False
    seed: int = 0
    operating_point: str | None = None  # "mel:sensitivity=0.90": chosen on val after calibration
    color_constancy: str = "none"  # "shades-of-gray": each image's illuminant divided out (p=6), everywhere
    metadata: str | None = None  # "age,sex,site": patient metadata fused with the image features
    folds: int | None = None  # cross-validation: train+val cut into this many grouped folds ...
    fold: int | None = None  # ... and this run holds out fold `fold` (0-based) as its validation
    teacher: str | None = None  # distillation: the ensemble whose calibrated probabilities are the soft targets
    # Distillation defaults, measured on ham10000-lite's val split (benchmarks/distill_defaults.py, docs/results.md):
    # alpha=0.3 beat Hinton et al.'s "considerably lower weight on the true labels" (0.7) by +0.026 balanced
    # accuracy (paired 95% interval +0.003 to +0.048), no metric lower; T=1 and T=4 did not differ clearly from
    # T=2, which stays: the teacher's probabilities on its own training images are more confident than its
    # calibration (fitted on val) assumes, and p^(1/2) gives the runner-up classes back some weight.
    distill_temperature: float = 2.0  # softens teacher and student before their KL term
    distill_alpha: float = 0.3  # weight of the distillation term; 1 - alpha weighs the true labels
    # Experiment trackers (dermcam.track): "tensorboard[:DIR]", "mlflow[:URI]". Where the run is mirrored, not
    # what it computes: a resume may change them. Stored masked (no password), see dermcam.train.tracking.
    log: list[str] = field(default_factory=list)
    log_model: bool = False  # with an MLflow tracker: the exported best model as an artefact

    def __post_init__(self) -> None:
        if isinstance(self.image_size, str) and self.image_size.strip().isdigit():
            self.image_size = int(self.image_size)  # "192" and 192 are the same square size

    def validate(self) -> None:
        """Refuse a bad value before any work starts (a run folder, a model, a data set read)."""
        _check_types(self)
        for name in ("dataset", "backbone", "pretrained", "balance", "monitor", "device", "precision",
                     "operating_point"):
            if getattr(self, name) is not None:  # a TOML file can hold "" or a newline as well as a shell
                check_text(getattr(self, name), option_name(name))
        for name, low, high in (("epochs", 1, MAX_EPOCHS), ("batch_size", 1, MAX_BATCH_SIZE), ("seed", 0, SEED_MAX),
                                ("patience", 0, MAX_EPOCHS), ("accumulate", 1, MAX_BATCH_SIZE),
                                ("freeze", 0, MAX_FREEZE)):
            check_int(getattr(self, name), option_name(name), low, high)
        finite = {name: _finite(getattr(self, name))
                  for name in ("lr", "head_lr_scale", "weight_decay", "warmup_epochs", "label_smoothing", "ema_decay")}
        checks = [
            (finite["lr"] and self.lr > 0, "--lr must be a positive number"),
            (finite["head_lr_scale"] and self.head_lr_scale > 0, "--head-lr-scale must be a positive number"),
            (finite["weight_decay"] and self.weight_decay >= 0, "--weight-decay must be a number, 0 or more"),
            (finite["warmup_epochs"] and 0 <= self.warmup_epochs <= self.epochs,
             "--warmup-epochs must be a number from 0 to --epochs"),
            (self.balance in ("loss", "sampler", "none"), "--balance must be loss, sampler or none"),
            (self.monitor in MONITORS or self.monitor.startswith("val_recall_"),
             f"--monitor must be one of {', '.join(MONITORS)} or val_recall_<class>"),
            (finite["label_smoothing"] and 0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (finite["ema_decay"] and 0 < self.ema_decay < 1, "--ema-decay must be in (0, 1)"),
            (self.color_constancy in COLOR_CONSTANCY_METHODS,
             f"--color-constancy {self.color_constancy!r} must be {' or '.join(COLOR_CONSTANCY_METHODS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInputError(message)
        if self.image_size is not None:
            self.input_size()
        self.check_folds()
        self.check_distillation()
        from dermcam.track.spec import check_log  # standard library only: no tracker is imported

        check_log(self.log, self.log_model)
        if self.metadata is not None:  # "age,sex,site"; the diagnosis method (dx_type) leaks the label: refused
            from dermcam.metadata_spec import parse_fields

            parse_fields(self.metadata, "--metadata")
        if self.operating_point is not None:
            from dermcam.evaluate.operating import parse_operating_point

            parse_operating_point(self.operating_point)
        from dermcam.models.backbones import check_backbone  # imports timm: the last check

        check_backbone(self.backbone)

    def check_folds(self) -> None:
        """``folds`` K from 2 to 20; ``fold`` (the held-out fold of one cross-validation run) from 0 to K-1,
        and only with ``folds``: a fold number means nothing without the K that cut the folds."""
        if self.folds is not None:
            check_int(self.folds, "--folds", MIN_FOLDS, MAX_FOLDS)
        if self.fold is not None:
            if self.folds is None:
                raise BadInputError("--fold needs --folds: a fold is one of K folds")
            check_int(self.fold, "--fold", 0, self.folds - 1)

    def check_distillation(self) -> None:
        """``teacher`` an ensemble name (``NAME`` or ``ensemble:NAME``); the temperature a finite number
        above 0 (at most 100: beyond it both distributions are uniform and the KL term says nothing);
        alpha in [0, 1]. Checked for every run, so a TOML file cannot slip in a bad value either."""
        if not (_finite(self.distill_temperature) and 0 < self.distill_temperature <= MAX_DISTILL_TEMPERATURE):
            raise BadInputError(f"--temperature (distill_temperature) must be a number above 0, at most "
                                f"{MAX_DISTILL_TEMPERATURE:g}")
        if not (_finite(self.distill_alpha) and 0 <= self.distill_alpha <= 1):
            raise BadInputError("--alpha (distill_alpha) must be a number from 0 to 1")
        if self.teacher is None:
            return
        from dermcam.store.ensembles import PREFIX, check_name

        check_text(self.teacher, "teacher")
        check_name(self.teacher.removeprefix(PREFIX))
        if self.folds is not None:
            raise BadInputError("a distilled student is one model: --folds does not go with a teacher")

    def input_size(self, default: tuple[int, int] | None = None) -> tuple[int, int]:
        """The model input as ``(height, width)`` (torch's order): ``image_size``, else ``default``."""
        if self.image_size is None:
            if default is None:
                raise BadInputError("no --image-size and no default input size for this backbone")
            return int(default[0]), int(default[1])
        width, height = parse_size(self.image_size, "--image-size", low=MIN_IMAGE_SIDE, high=MAX_IMAGE_SIDE)
        return height, width

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInputError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)


def _finite(value: float) -> bool:
    """A finite float; an int too large for one (a TOML file may hold 10**400) is not."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def option_name(field_name: str) -> str:
    """The ``dermcam train`` option of a TrainConfig field, as messages name it: ``batch_size`` -> ``--batch-size``."""
    return "--data" if field_name == "dataset" else "--" + field_name.replace("_", "-")


# Python types each annotation admits (an int is a valid float; a bool is not a valid int).
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                       "str | None": (str, type(None)), "int | None": (int, type(None)),
                                       "int | str | None": (int, str, type(None)), "list[str]": (list,)}


def _check_types(config: TrainConfig) -> None:
    """A TOML file or a Python caller can pass any type: name the option and the type it needs."""
    for f in dataclasses.fields(config):
        value, allowed = getattr(config, f.name), _TYPES[str(f.type)]
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            wanted = " or ".join(t.__name__ for t in allowed if t is not type(None))
            raise BadInputError(f"training option '{f.name}' must be {wanted}, not {type(value).__name__} "
                                f"({value!r})")


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    config: TrainConfig
    best_id: str | None
    best_value: float | None
    epochs_done: int
    stopped_early: bool
    test_metrics: dict[str, Any] | None
    report_files: list[Path] = field(default_factory=list)
    resumed_from: str | None = None
    seconds: float = 0.0
    pretrained: dict[str, Any] | None = None

    def to_dict(self, best: TrainResult | None = None) -> dict[str, Any]:
        """JSON-ready summary (what ``dermcam train --json`` prints); ``is_best`` compares with ``best``."""
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "best_checkpoint": self.best_id,
                "best_value": self.best_value, "monitor": self.config.monitor, "epochs_done": self.epochs_done,
                "stopped_early": self.stopped_early, "resumed_from": self.resumed_from,
                "test_metrics": self.test_metrics, "report": [str(p) for p in self.report_files],
                "config": dataclasses.asdict(self.config), "pretrained": self.pretrained,
                "seconds": round(self.seconds, 1), "is_best": best is not None and self.run_id == best.run_id}


def monitor_mode(name: str) -> str:
    return "min" if name.endswith("loss") else "max"


def expand_grid(base: TrainConfig, **choices: list[Any]) -> list[TrainConfig]:
    """Every combination of the repeatable options (``--backbone a --backbone b --lr 1e-4 --lr 3e-4``)."""
    import itertools

    keys = [k for k, v in choices.items() if v]
    combos = itertools.product(*(choices[k] for k in keys)) if keys else [()]
    return [dataclasses.replace(base, **dict(zip(keys, values))) for values in combos]


def load_experiments(path: Path, base: TrainConfig) -> list[TrainConfig]:
    """Configurations from a TOML file: top-level keys are shared, each ``[[run]]`` table one run."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise BadInputError("TOML experiment files need Python 3.11 or newer") from None
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"no such experiments file: {path}") from None
    except OSError as exc:  # a folder, a path under a file, no permission
        raise BadInputError(f"--config {path} cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not valid TOML ({exc})") from None
    runs = data.pop("run", [{}])
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise BadInputError(f"{path}: 'run' must be an array of tables ([[run]])")
    shared = {**dataclasses.asdict(base), **data}
    configs = [TrainConfig.from_dict({**shared, **run}) for run in runs]
    for cfg in configs:
        cfg.validate()
    return configs

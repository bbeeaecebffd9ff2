"""The training loop: transfer learning with an exact, crash-safe resume.

Exactness comes from making every random choice a function of where training is, not of history:
the epoch's image order is drawn from ``(seed, epoch)``, each batch's augmentation from
``(seed, epoch, batch)``, and the learning rate is a pure function of the optimizer step. What little
global state remains (optimizer moments, EMA, dropout RNG, early-stopping counters) is saved with
every epoch checkpoint, tensors in safetensors and the rest in JSON. A run killed at any moment
resumes from its last complete checkpoint and ends with the same weights as an uninterrupted run.

Under torchrun (see :mod:`dermcam.train.distributed`) the same definitions hold for the *global* batch:
every rank draws the same epoch order and batch augmentation, takes its slice of each global batch,
scales its loss so DistributedDataParallel's gradient average equals the single-process loss over
the global batch, and predicts its shard of the validation split. Rank 0 alone writes the run. The
saved state does not depend on the number of processes, so a run resumes with any number of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from dermcam.errors import BadInputError, first_line
from dermcam.progress import Progress
from dermcam.train import distributed
from dermcam.train import tracking as run_tracking
from dermcam.train.config import TrainConfig, TrainResult, expand_grid, load_experiments, monitor_mode
from dermcam.train.ema import EMA
from dermcam.train.loss import DistillationLoss, WeightedCrossEntropy, class_weights
from dermcam.train.pipeline import BatchPipeline
from dermcam.train.rng import rng_state, seed_everything, seed_rank, set_rng_state
from dermcam.train.schedule import epoch_order, lr_multiplier, param_groups


def check_distributed(config: TrainConfig, dist: distributed.DistContext) -> None:
    """What a multi-process run needs beyond a single-process one (errors before any work is done)."""
    if not dist.enabled:
        return
    if config.batch_size % dist.world_size:
        raise BadInputError(f"--batch-size {config.batch_size} is the global batch size and must be divisible "
                            f"by the number of processes ({dist.world_size})")
    if config.sync_bn and dist.device.type != "cuda":
        raise BadInputError("sync_bn needs CUDA: SyncBatchNorm does not run on the CPU")


def check_operating_point(config: TrainConfig, classes: list[str], val_labels: np.ndarray, dataset: str) -> None:
    """``--operating-point`` names a class of the data set whose val split has images of it and of other
    classes (a threshold needs both); refused before any epoch rather than after the last."""
    if config.operating_point is None:
        return
    from dermcam.evaluate.operating import check_labels, parse_operating_point

    check_labels(parse_operating_point(config.operating_point), classes, val_labels,
                 f"the val split of data set '{dataset}'")


def _mark_stopped(run_dir: Path, exc: BaseException) -> None:
    """A run stopped by an error or Ctrl-C says so in run.json instead of staying "running"; it can
    still be resumed from its last checkpoint. (A SIGKILL leaves "running": resume handles that too.)"""
    from dermcam.store.runs import update_run

    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    message = first_line(exc)
    with contextlib.suppress(Exception):  # never hide the original error behind a second one
        update_run(run_dir, status=status, error=message)


class DivergedError(BadInputError):
    """The loss became NaN or infinite: the settings (usually the learning rate) make training diverge.
    Stopped before the optimizer applies the non-finite gradients, so no checkpoint holds NaN weights."""


# What a resumed run takes from the command line: where and how it runs, never what it computes.
# Everything else is the run's own; Trainer._open_run says why device and compile; log and log_model
# say where the run is mirrored (dermcam.track), which a resume may change too.
RESUME_OPTIONS = ("device", "compile", "log", "log_model")


class Trainer:
    """One run: owns the model, optimizer and loop state; :meth:`fit` runs it to the end."""

    def __init__(self, config: TrainConfig | None, *, root: Path | None = None, progress: Progress | None = None,
                 resume: bool = False, run: str | None = None, overrides: dict[str, Any] | None = None,
                 new_run_id: str | None = None) -> None:
        self.root = root
        # the id a new run gets (None: a random one); cross-validation names each fold run before it
        # starts, so that a fold interrupted at any moment is found again (dermcam.train.crossval)
        self.new_run_id = new_run_id
        self.dist = distributed.current()
        self.progress = (progress or Progress()) if self.dist.is_main else Progress()
        self.resume = resume
        self.run_ref = run
        self.config = run_tracking.public_config(config or TrainConfig())  # no tracker secret is ever stored
        self.overrides = run_tracking.public_overrides(dict(overrides or {}))
        self.resume_ckpt: Any = None

    # -- setup -------------------------------------------------------------------------------------

    def _open_run(self) -> None:
        """Find the run to resume; a new run's folder is only created once its model is built.

        A resumed run keeps its configuration except :data:`RESUME_OPTIONS`, ``device`` and ``compile``:
        they say how the run executes, not what it computes (data, order, augmentation, model,
        optimizer and schedule stay the run's own). Resuming with the same values is exact; changing
        either changes only floating-point rounding (another device's kernels, or the fused kernels
        of torch.compile), as resuming a GPU run on a CPU does. ``compile`` must be changeable for the
        reason ``device`` is: a run started with ``--compile`` where it works has to be resumable
        where it does not (or with ``--no-compile`` when compiling did not pay), and a CPU run moved
        to a GPU may want it. A failed compile falls back to eager, so it never stops a resume either.
        """
        from dermcam.store.runs import find_run, read_run, resumable_run, resume_point

        if self.resume:
            picked = ""
            if self.dist.is_main:  # rank 0 decides which run "latest" is; the others follow it
                picked = resumable_run(self.run_ref, self.root).name  # never an imported run
            self.run_dir = find_run(self.dist.broadcast_str(picked), self.root)
            info = read_run(self.run_dir)
            self.config = TrainConfig.from_dict(info["config"])
            applied = {k: v for k, v in self.overrides.items() if k in RESUME_OPTIONS}
            self.config = dataclasses.replace(self.config, **applied)
            ignored = sorted(set(self.overrides) - set(applied))
            if ignored:
                self.progress.log(f"Resuming run {self.run_dir.name} with its own configuration; ignored: "
                                  + ", ".join("--" + k.replace("_", "-") for k in ignored))
            self.resume_ckpt = resume_point(self.run_dir)
        else:
            self.config.validate()
            if self.config.folds is not None and self.config.fold is None:  # a run is one fold, never all of them
                raise BadInputError("folds without fold is a whole cross-validation: dermcam train --folds K "
                                    "(dermcam.train.crossval.cross_validate)")

    def build(self) -> None:
        """Data, model, optimizer and loss; public so benchmarks can time the loop's parts."""
        import torch

        from dermcam.data.dataset import load_prepared
        from dermcam.data.folds import split_rows
        from dermcam.models.backbones import build_model, create_model, data_config, freeze_stages
        from dermcam.models.compile import maybe_compile
        from dermcam.models.device import emulated_bf16_note, resolve_precision, select_device

        cfg = self.config
        self.data = load_prepared(cfg.dataset, self.root)
        if self.data.external:
            raise BadInputError(f"data set '{self.data.name}' was prepared with --external: it is for evaluation "
                                "only, never trained on (score a model on it: dermcam evaluate CHECKPOINT "
                                f"--data {self.data.name})")
        if cfg.dataset is None:
            cfg.dataset = self.data.name
        self.classes = list(self.data.classes)
        if cfg.monitor.startswith("val_recall_") and cfg.monitor.removeprefix("val_recall_") not in self.classes:
            raise BadInputError(f"--monitor {cfg.monitor} names no class of data set '{self.data.name}' "
                                f"({', '.join(self.classes)})")
        check_distributed(cfg, self.dist)
        self.device = self.dist.device if self.dist.enabled else select_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device, backbone=cfg.backbone)
        emulated = emulated_bf16_note(self.precision, self.device)
        if emulated:
            self.progress.log(f"Note: {emulated}")
        # Validation scores images as evaluate and explain do (fp32 unless bf16/fp16 was asked for).
        self.scoring_precision = resolve_precision(cfg.precision, self.device, scoring=True)
        seed_everything(cfg.seed)
        self.metadata = self._metadata_spec()  # --metadata: fitted on this run's training rows
        if self.resume_ckpt is None:
            self.model, self.pretrained = create_model(cfg.backbone, len(self.classes), cfg.pretrained,
                                                       progress=self.progress, metadata=self._metadata_block())
        else:
            self.model = build_model(cfg.backbone, len(self.classes), self._metadata_block())
            self.pretrained = self.resume_ckpt.sidecar.get("pretrained")
        freeze_stages(self.model, cfg.freeze)
        dc = data_config(self.model)
        height, width = cfg.input_size(default=dc["input_size"][-2:])
        cache = [int(self.data.manifest["cache"]["width"]), int(self.data.manifest["cache"]["height"])]
        self.preprocessing = {"input_size": [3, int(height), int(width)], "mean": list(dc["mean"]),
                              "std": list(dc["std"]), "interpolation": "bilinear", "cache_size": cache,
                              "resize": "photo cropped at the centre to the cache_size aspect ratio (cover), "
                                        "then the whole of it resized to input_size",
                              "color_constancy": cfg.color_constancy}  # "none" written out too
        if width > cache[0] or height > cache[1]:
            needed = f"{max(width, cache[0])}x{max(height, cache[1])}"
            self.progress.log(f"Note: --image-size {width}x{height} is larger than the cache of data set "
                              f"'{self.data.name}' ({cache[0]}x{cache[1]}): the model trains on upsampled pixels. "
                              f"For full detail, prepare it with --cache-size {needed} or larger.")
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # eager_model: what trains without --compile (the bare model, or DDP around it); train_model: what
        # the training forward calls, the same or its compiled form until the first step proves it works.
        self.eager_model = self._wrap_ddp() if self.dist.enabled else self.model
        self.train_model, self.compile_note = maybe_compile(self.eager_model, cfg.compile)
        self.compile_pending = self.train_model is not self.eager_model
        if self.compile_note:
            self.progress.log(f"Note: {self.compile_note}")
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema else None
        # a cross-validation fold run: train+val minus fold `fold`, validated on that fold (data/folds.py)
        self.train_rows, self.train_labels = split_rows(self.data, "train", cfg.folds, cfg.fold, cfg.seed)
        self.val_rows, self.val_labels = split_rows(self.data, "val", cfg.folds, cfg.fold, cfg.seed)
        if len(self.train_rows) == 0 or len(self.val_rows) == 0:
            raise BadInputError(f"data set '{self.data.name}' has an empty train or val split; "
                                "prepare it with more images")
        weights = class_weights(self.train_labels, len(self.classes)) if cfg.balance == "loss" else None
        self.sample_weights = (np.ones(len(self.train_labels)) if weights is None
                               else weights[self.train_labels].astype(np.float64))
        if self.dist.enabled and len(self.train_rows) < cfg.batch_size:
            raise BadInputError(f"the train split has {len(self.train_rows)} images, fewer than --batch-size "
                                f"{cfg.batch_size}; every process needs its share of a full batch")
        self.loss_fn = WeightedCrossEntropy(None if weights is None else torch.from_numpy(weights).to(self.device),
                                            cfg.label_smoothing)
        self.teacher = self._teacher() if cfg.teacher is not None else None
        if self.teacher is not None:  # distillation: the teacher's soft targets ride with the labels to the loss
            self.loss_fn = DistillationLoss(self.loss_fn, cfg.distill_temperature, cfg.distill_alpha)
        extras = {"soft": self.teacher.targets} if self.teacher is not None else {}
        self.val_metadata = None
        if self.metadata is not None:  # each row's encoded patient metadata, fused with its image in the model
            from dermcam.data.metadata import encode

            extras["meta"] = encode(self.metadata, self.data.index.iloc[self.train_rows])
            self.val_metadata = encode(self.metadata, self.data.index.iloc[self.val_rows])
        self.pipeline = BatchPipeline(self.data.images, self.train_rows, self.train_labels,
                                      batch_size=cfg.batch_size, preprocessing=self.preprocessing,
                                      augment=cfg.augment, seed=cfg.seed, device=self.device,
                                      channels_last=cfg.channels_last, shard=self.dist.shard,
                                      extras=extras)
        n = len(self.train_rows)
        self.batches_per_epoch = max(1, n // cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.accumulate)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        # Loop state (overwritten on resume)
        self.epoch = 0
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.bad_epochs = 0
        self.stopped = False
        self.history: list[dict[str, Any]] = []

    def _teacher(self) -> Any:
        """A student run's teacher and the soft targets of its train rows (:mod:`dermcam.train.distill`):
        computed for a new run (written to the run folder once it exists, in :meth:`fit`), read back on
        resume, and checked against what the checkpoint being resumed recorded."""
        from dermcam.train.distill import prepare_teacher

        recorded = self.resume_ckpt.sidecar.get("distillation") if self.resume_ckpt is not None else None
        return prepare_teacher(self.config, self.data, self.train_rows, self.classes,
                               run_dir=self.run_dir if self.resume else None, recorded=recorded, device=self.device,
                               precision=self.scoring_precision, batch_size=max(32, self.config.batch_size),
                               root=self.root, progress=self.progress)

    def _metadata_spec(self) -> Any:
        """The run's patient-metadata encoding (``--metadata``; None without it): for a new run fitted on
        its training rows (age scaling, site vocabulary), for a resumed one the encoding its checkpoint
        recorded, which its model was built with."""
        cfg = self.config
        if cfg.metadata is None:
            return None
        from dermcam.data.folds import split_rows
        from dermcam.data.metadata import MetadataSpec, fit_spec, known

        if self.resume_ckpt is not None and self.resume_ckpt.sidecar.get("metadata") is not None:
            return MetadataSpec.from_dict(self.resume_ckpt.sidecar["metadata"], f"checkpoint {self.resume_ckpt.id}")
        rows = self.data.index.iloc[split_rows(self.data, "train", cfg.folds, cfg.fold, cfg.seed)[0]]
        spec = fit_spec(cfg.metadata, rows)
        masks = list(known(spec, rows).values())
        none = int((~np.logical_or.reduce(masks)).sum()) if masks else len(rows)
        self.progress.log(f"Metadata: {', '.join(spec.fields)} ({spec.dim} features"
                          + (f", {len(spec.sites)} sites" if "site" in spec.fields else "")
                          + f"); {none} of {len(rows)} training images have none of them")
        return spec

    def _metadata_block(self) -> dict[str, Any] | None:
        """The metadata encoding as the sidecar records it (None without metadata)."""
        return None if self.metadata is None else self.metadata.to_dict()

    def _wrap_ddp(self) -> Any:
        """DistributedDataParallel around the model for the training forward; ``self.model`` stays the
        bare module, which is what is evaluated, saved (no ``module.`` prefix) and averaged by EMA."""
        from torch.nn.parallel import DistributedDataParallel

        if self.config.sync_bn:
            from timm.layers import convert_sync_batchnorm

            self.model = convert_sync_batchnorm(self.model)  # same parameter and buffer names
        return DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def _restore(self) -> None:
        from dermcam.store.runs import read_metrics
        from dermcam.store.tensors import join_state

        ckpt = self.resume_ckpt
        if ckpt is None:
            return
        if ckpt.sidecar.get("dataset", {}).get("fingerprint") != self.data.fingerprint:
            raise BadInputError(f"data set '{self.data.name}' changed since run {self.run_id} started; "
                                "resume needs the same data (start a new run instead)")
        skeleton, tensors = ckpt.load_state()
        state = join_state(skeleton, tensors)
        model_state = state.get("model") or ckpt.load_weights()
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.state = {k: v.to(self.device) for k, v in state["ema"].items()}
        set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best = state.get("best")
        self.bad_epochs = int(state["bad_epochs"])
        self.stopped = bool(state["stopped"])
        self.history = [h for h in read_metrics(self.run_dir) if h["epoch"] <= self.epoch]

    # -- the loop ----------------------------------------------------------------------------------

    def _set_lr(self) -> None:
        mult = lr_multiplier(self.step, self.total_steps, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * mult

    def _optimizer_step(self) -> None:
        self._set_lr()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)

    def make_batch(self, order: np.ndarray, b: int) -> tuple[Any, Any]:
        """Batch ``b`` of this epoch, cache rows -> augmented, normalised tensors on the device, computed
        now (no prefetch): for benchmarks and tests; the loop reads :meth:`BatchPipeline.epoch`."""
        return self.pipeline.batch(order, self.epoch, b)

    def loss_scale(self, order: np.ndarray, b: int) -> float:
        """Factor that turns this rank's mean loss into its share of the global batch's mean loss.

        The (class-weighted, label-smoothed) mean is a weighted sum over the batch divided by the sum
        of its samples' class weights. A rank's mean times ``local weight sum / global weight sum`` is
        its part of that global sum, and DDP's average over ``world_size`` ranks is undone by the
        ``world_size`` factor: the gradients are those of one process on the whole batch. Every rank
        knows the whole global batch, so no communication is needed; a single process gets 1.0.
        """
        picks = order[b * self.config.batch_size:(b + 1) * self.config.batch_size]
        local = float(self.sample_weights[picks[self.dist.shard(len(picks))]].sum())
        return self.dist.world_size * local / float(self.sample_weights[picks].sum())

    def forward_backward(self, x: Any, y: Any, extras: dict[str, Any] | None = None, scale: float = 1.0) -> float:
        """Loss and gradients of one micro-batch (the bare model step that benchmarks compare with).

        ``extras``: the batch's per-image extras (:class:`~dermcam.train.pipeline.BatchPipeline`);
        ``scale`` is :meth:`loss_scale` (distributed training only); the returned loss is unscaled.
        """
        from dermcam.models.device import autocast

        extras = extras or {}
        with autocast(self.device, self.precision):
            # "meta": patient metadata the model fuses with the image; "soft": a teacher's targets for the loss
            logits = (self.train_model(x, extras["meta"]) if "meta" in extras else self.train_model(x)).float()
            loss = self.loss_fn(logits, y, extras["soft"]) if "soft" in extras else self.loss_fn(logits, y)
        scaled = loss if scale == 1.0 else loss * scale
        self.scaler.scale(scaled / self.config.accumulate).backward()
        return float(loss.detach())

    def _first_compiled_step(self, x: Any, y: Any, extras: dict[str, Any], scale: float) -> float:
        """The first :meth:`forward_backward` of a compiled model, with a way back to eager.

        torch.compile compiles at the first call (forward) and the first backward, so a backend that
        cannot handle this model or machine fails here, not in :meth:`build`. The step is then undone
        (RNG state, BatchNorm statistics and gradients as they were before it: a failed compiled
        forward may have run part of the model) and redone eagerly, so the run continues exactly as
        an eager run would, with the note logged and written to every sidecar. It is always the
        epoch's first micro-batch, right after ``zero_grad``, so no earlier gradient is lost.
        """
        import torch

        from dermcam.models.compile import compile_failed_note

        self.compile_pending = False
        rng = rng_state()
        buffers = {name: t.detach().clone() for name, t in self.model.named_buffers()}
        try:
            return self.forward_backward(x, y, extras, scale)
        except Exception as exc:  # noqa: BLE001 - a compile failure means "train eagerly"; a real error recurs below
            with torch.no_grad():
                for name, t in self.model.named_buffers():
                    t.copy_(buffers[name])
            set_rng_state(rng)
            self.optimizer.zero_grad(set_to_none=True)
            self.train_model = self.eager_model
            self.compile_note = compile_failed_note(exc)
            self.progress.log(f"Note: {self.compile_note}")
            return self.forward_backward(x, y, extras, scale)

    def train_one_epoch(self) -> float:
        cfg = self.config
        order = epoch_order(len(self.train_rows), self.train_labels, cfg.seed, self.epoch, cfg.balance,
                            len(self.classes))
        self.model.train()
        if self.dist.enabled:
            seed_rank(cfg.seed, self.epoch, self.dist.rank)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, seen = 0.0, 0
        self.progress.start(f"epoch {self.epoch + 1}/{cfg.epochs}", total=self.batches_per_epoch)
        with self.pipeline.epoch(order, self.epoch, self.batches_per_epoch) as batches:
            for b, (x, y, extras) in enumerate(batches):
                step = (b + 1) % cfg.accumulate == 0 or b + 1 == self.batches_per_epoch
                scale = self.loss_scale(order, b) if self.dist.enabled else 1.0
                # Between optimizer steps DDP need not average gradients: they only accumulate locally.
                with contextlib.nullcontext() if step or not self.dist.enabled else self.eager_model.no_sync():
                    loss = (self._first_compiled_step(x, y, extras, scale) if self.compile_pending
                            else self.forward_backward(x, y, extras, scale))
                if not math.isfinite(loss):
                    raise DivergedError(
                        f"training diverged: the loss is {loss} at epoch {self.epoch + 1}, batch {b + 1} (the "
                        f"last checkpoint is intact; lower --lr (now {cfg.lr:g}) or --weight-decay and train again)")
                if step:
                    self._optimizer_step()
                total_loss += loss * scale * len(y)
                seen += len(y)
                self.progress.advance(1, loss=total_loss / seen, lr=self.optimizer.param_groups[0]["lr"])
        self.progress.finish()
        total_loss, seen = self.dist.all_reduce_sum([total_loss, seen])
        return total_loss / max(1, seen)

    def eval_model(self) -> Any:
        """The weights that are evaluated and saved: the EMA when enabled, else the live model."""
        if self.ema is None:
            return self.model
        from dermcam.models.backbones import build_model

        shadow = build_model(self.config.backbone, len(self.classes), self._metadata_block()).to(self.device)
        shadow.load_state_dict(self.ema.state)
        if self.config.channels_last:
            import torch

            shadow.to(memory_format=torch.channels_last)
        return shadow

    def validate(self) -> dict[str, Any]:
        from dermcam.evaluate.metrics import compute_metrics, cross_entropy
        from dermcam.evaluate.predict import predict

        part = self.dist.shard(len(self.val_rows))  # each rank predicts its shard, all get every row
        probs = predict(self.eval_model(), self.data.images, self.val_rows[part],
                        preprocessing=self.preprocessing, device=self.device, precision=self.scoring_precision,
                        batch_size=max(32, self.config.batch_size), channels_last=self.config.channels_last,
                        progress=self.progress, description="validate",
                        metadata=None if self.val_metadata is None else self.val_metadata[part])
        probs = self.dist.all_gather_rows(probs.reshape(-1, len(self.classes)), len(self.val_rows))
        metrics = compute_metrics(self.val_labels, probs, self.classes)
        metrics["loss"] = cross_entropy(self.val_labels, probs)
        return metrics

    def _monitor_value(self, metrics: dict[str, Any]) -> float:
        key = self.config.monitor.removeprefix("val_")
        value = metrics.get(key)
        if value is None:
            raise BadInputError(f"--monitor {self.config.monitor} is not available for classes {self.classes}")
        return float(value)

    def _save(self, metrics: dict[str, Any], train_loss: float) -> Any:
        from dermcam.store.checkpoint import save_checkpoint
        from dermcam.store.locks import store_lock
        from dermcam.store.runs import update_run

        cfg = self.config
        value = self._monitor_value(metrics)
        train_state = {
            "epoch": self.epoch, "step": self.step, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.ema.state if self.ema is not None else None,
            "model": self.model.state_dict() if self.ema is not None else None,
            "rng": rng_state(), "best": self.best, "bad_epochs": self.bad_epochs, "stopped": self.stopped,
        }
        sidecar = {
            "backbone": cfg.backbone, "classes": self.classes,
            "label_encoding": {c: i for i, c in enumerate(self.classes)},
            "preprocessing": self.preprocessing, "metrics": metrics, "train_loss": train_loss,
            "monitor": {"name": cfg.monitor, "mode": monitor_mode(cfg.monitor), "value": value},
            "config": dataclasses.asdict(cfg), "step": self.step,
            "dataset": {"name": self.data.name, "fingerprint": self.data.fingerprint},
            "pretrained": self.pretrained, "precision": self.precision, "device": self.device.type,
            "compiled": self.train_model is not self.eager_model, "compile_note": self.compile_note,
            "world_size": self.dist.world_size,  # information only: the state does not depend on it
        }
        if self.metadata is not None:  # the fields and encoding the model reads (rebuilds the network)
            sidecar["metadata"] = self._metadata_block()
        if self.teacher is not None:
            sidecar["distillation"] = self.teacher.block()
        sidecar.update(run_tracking.sidecar_fields(self))  # where the run is tracked (MLflow run id, ...)
        with store_lock("store", shared=True, root=self.root):
            weights = self.ema.state if self.ema is not None else self.model.state_dict()  # what eval_model() holds
            ckpt = save_checkpoint(self.run_dir, epoch=self.epoch, model_state=weights,
                                   sidecar=sidecar, train_state=train_state)
            update_run(self.run_dir, resume_from=ckpt.id)
        return ckpt

    def _record_epoch(self, metrics: dict[str, Any], train_loss: float, seconds: float) -> None:
        from dermcam.store.runs import append_metrics

        record = {"epoch": self.epoch, "step": self.step, "train_loss": train_loss, "seconds": round(seconds, 2),
                  "lr": self.optimizer.param_groups[0]["lr"]}
        record.update({f"val_{k}": v for k, v in metrics.items() if k != "confusion_matrix"})
        self.history.append(record)
        if self.dist.is_main:
            append_metrics(self.run_dir, record)

    def _update_best(self, value: float) -> None:
        improved = self.best is None or (value < self.best["value"] if monitor_mode(self.config.monitor) == "min"
                                         else value > self.best["value"])
        if improved:
            self.best = {"epoch": self.epoch, "value": value, "id": f"{self.run_id}:{self.epoch}"}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
            self.stopped = self.bad_epochs >= self.config.patience

    def fit(self) -> TrainResult:
        from dermcam.store.locks import store_lock
        from dermcam.store.paths import runs_dir
        from dermcam.store.runs import create_run, update_run

        started = time.monotonic()
        main = self.dist.is_main
        self._open_run()
        self.build()
        check_operating_point(self.config, self.classes, self.val_labels, self.data.name)
        if not self.resume:  # rank 0 creates the run; the others learn its id
            created = create_run(dataclasses.asdict(self.config), self.root, self.new_run_id) if main else None
            run_id = self.dist.broadcast_str(created.name if created else "")
            self.run_dir = created or runs_dir(self.root) / run_id
        self.run_id = self.run_dir.name
        with store_lock(f"run-{self.run_id}", timeout=1.0, root=self.root) if main else contextlib.nullcontext():
            try:
                result = self._run_epochs()
            except BaseException as exc:
                if main:
                    _mark_stopped(self.run_dir, exc)
                    run_tracking.stopped(self, exc)
                raise
        result.seconds = time.monotonic() - started
        if main:
            update_run(self.run_dir, status="finished", best=result.best_id, test_metrics=result.test_metrics,
                       stopped_early=result.stopped_early)
            run_tracking.finished(self, result)
        return result

    def _run_epochs(self) -> TrainResult:
        """Restore (on resume), train and validate until the last epoch or early stop, then finish."""
        from dermcam.store.runs import update_run

        self._restore()
        if self.teacher is not None and self.dist.is_main:  # soft targets computed now: kept for a resume
            self.teacher.save(self.run_dir)
        resumed_from = self.resume_ckpt.id if self.resume_ckpt else None
        if resumed_from:
            self.epoch += 1
            self.progress.log(f"Resuming run {self.run_id} from checkpoint {resumed_from}")
        if self.dist.is_main:
            update_run(self.run_dir, status="running", error=None)
        self.tracking = run_tracking.start(self)  # TensorBoard/MLflow (--log): told what they missed on resume
        while self.epoch < self.config.epochs and not self.stopped:
            t0 = time.monotonic()
            train_loss = self.train_one_epoch()
            metrics = self.validate()
            self._update_best(self.dist.broadcast_float(self._monitor_value(metrics)))
            self._record_epoch(metrics, train_loss, time.monotonic() - t0)
            if self.dist.is_main:
                self._save(metrics, train_loss)
                run_tracking.epoch(self)  # after the store has the epoch: a tracker is a side channel
            self.progress.log(
                f"epoch {self.epoch + 1}/{self.config.epochs}: loss {train_loss:.4f}  "
                f"val bal.acc {metrics['balanced_accuracy']:.3f}  macro F1 {metrics['macro_f1']:.3f}"
                + (f"  mel recall {metrics['recall_mel']:.3f}" if "recall_mel" in metrics else ""))
            self.epoch += 1
        return self._finish(resumed_from)

    def _calibrate(self, best: Any) -> None:
        """Calibrate the best checkpoint on the validation split (and choose ``--operating-point``), so
        the test report and every later command read calibrated probabilities; see
        :mod:`dermcam.evaluate.calibrate`. Only the best is calibrated: it is what commands use by
        default, and any other checkpoint can be calibrated later with ``dermcam calibrate``."""
        from dermcam.evaluate.calibrate import calibrate_checkpoint
        from dermcam.evaluate.calibration import describe
        from dermcam.evaluate.operating import parse_operating_point

        spec = parse_operating_point(self.config.operating_point) if self.config.operating_point else None
        result = calibrate_checkpoint(best, spec, device=self.config.device, precision=self.config.precision,
                                      root=self.root, progress=self.progress)
        before, after = result.calibration["before"], result.calibration["after"]
        point = result.operating_point
        self.progress.log(f"Calibrated {best.id} on val: {describe(result.calibration)}, NLL {before['nll']:.3f} -> "
                          f"{after['nll']:.3f}, ECE {before['ece']:.3f} -> {after['ece']:.3f}"
                          + (f"; operating point {spec}: threshold {point['threshold']:.3f}" if point else ""))
        for warning in result.warnings:
            self.progress.log(f"Warning: {warning}")

    def _finish(self, resumed_from: str | None) -> TrainResult:
        """Calibrate the run's best checkpoint, evaluate it on the test split and write the report
        (report.html last: it shows the other files). A cross-validation fold calibrates on its held-out
        fold (its val) and stops there: the test split is not read."""
        from dermcam.evaluate.evaluation import evaluate
        from dermcam.evaluate.report import plot_curves
        from dermcam.report.build import write_html_report
        from dermcam.store.runs import best_remaining

        report_dir = self.run_dir / "report"
        test_metrics, files = None, []
        best = best_remaining(self.run_dir, self.best["id"]) if self.best is not None and self.dist.is_main else None
        if best is not None and best.id != self.best["id"]:  # a prune or rollback removed the recorded best
            self.progress.log(f"Best checkpoint {self.best['id']} no longer exists (pruned or rolled back); "
                              f"evaluating {best.id}, the best one left in run {self.run_id}")
            self.best = {"epoch": best.epoch, "value": best.monitor_value, "id": best.id}
        if best is not None:
            self._calibrate(best)
            if self.config.folds is not None:  # a cross-validation fold never reads the test split: its
                # score is its held-out fold (dermcam.train.crossval), so its report is the curves alone
                if self.history:
                    files.append(plot_curves(self.history, report_dir / "curves.png", title=f"run {self.run_id}"))
                return self._result(resumed_from, None, files)
            result = evaluate(best.id, split="test", device=self.config.device,
                              precision=self.config.precision, out_dir=report_dir, root=self.root,
                              progress=self.progress)
            test_metrics, files = result.metrics, list(result.files)
            if self.history:
                files.append(plot_curves(self.history, report_dir / "curves.png", title=f"run {self.run_id}"))
            files.append(write_html_report(report_dir, best.sidecar_path, root=self.root))
        return self._result(resumed_from, test_metrics, files)

    def _result(self, resumed_from: str | None, test_metrics: dict[str, Any] | None, files: list[Path]) -> TrainResult:
        epochs_done = self.history[-1]["epoch"] + 1 if self.history else 0
        return TrainResult(
            run_id=self.run_id, run_dir=self.run_dir, config=self.config,
            best_id=self.best["id"] if self.best else None, best_value=self.best["value"] if self.best else None,
            epochs_done=epochs_done, stopped_early=self.stopped and epochs_done < self.config.epochs,
            test_metrics=test_metrics, report_files=files, resumed_from=resumed_from, pretrained=self.pretrained)


def train(config: TrainConfig | None = None, *, resume: bool = False, run: str | None = None,
          overrides: dict[str, Any] | None = None, root: Path | None = None,
          progress: Progress | None = None, new_run_id: str | None = None) -> TrainResult:
    """Train one configuration (or resume a run) to the end; see :class:`Trainer`.

    A resumed run keeps the configuration it was started with (anything else would break the exact
    resume); of ``overrides`` it applies only :data:`RESUME_OPTIONS` and logs which it ignored.
    Under torchrun this process joins the job's process group (see :mod:`dermcam.train.distributed`).
    """
    device = (overrides or {}).get("device") or (config.device if config else "auto")
    with distributed.session(device):
        return Trainer(config, root=root, progress=progress, resume=resume, run=run, overrides=overrides,
                       new_run_id=new_run_id).fit()


def train_configurations(options: dict[str, Any], *, grid: dict[str, list[Any]] | None = None,
                         config_file: Path | None = None, resume: bool = False, run: str | None = None,
                         root: Path | None = None, threads: int | str | None = None,
                         progress: Progress | None = None) -> list[TrainResult]:
    """What ``dermcam train`` does: one run per configuration, or the resume of one run.

    ``options`` are the given :class:`TrainConfig` fields; ``grid`` maps fields to several values (every
    combination becomes a run); ``config_file`` is a TOML file of ``[[run]]`` tables instead of a
    grid. Every configuration is validated before the first run starts.

    ``threads``: torch CPU threads (:func:`dermcam.models.device.resolve_threads`), set before any work;
    None keeps torch's own count. Not part of the configuration: it changes speed, not what is trained
    (a resume may use another count).
    """
    if threads is not None:
        from dermcam.models.device import apply_threads

        apply_threads(threads)
    grid = {k: v for k, v in (grid or {}).items() if v}
    if resume:
        if config_file is not None:
            raise BadInputError("--resume continues one run with its own configuration; drop --config")
        flat = {**options, **{k: v[-1] for k, v in grid.items()}}
        return [train(resume=True, run=run, overrides=flat, root=root, progress=progress)]
    if run is not None:
        raise BadInputError("--run names the run to continue and needs --resume")
    base = TrainConfig.from_dict(options)
    configs = load_experiments(config_file, base) if config_file else expand_grid(base, **grid)
    for cfg in configs:
        cfg.validate()
        if cfg.operating_point is not None:  # its class is checked against the data before the first run
            from dermcam.data.dataset import load_prepared

            data = load_prepared(cfg.dataset, root)
            check_operating_point(cfg, list(data.classes), data.split("val")[1], data.name)
    return train_many(configs, root=root, progress=progress)


def train_many(configs: list[TrainConfig], *, root: Path | None = None,
               progress: Progress | None = None) -> list[TrainResult]:
    """Each configuration becomes a run; compare them with :func:`best_result`."""
    with distributed.session(configs[0].device if configs else "auto"), \
            run_tracking.configurations(configs, progress):  # one MLflow parent run over several runs
        return [train(cfg, root=root, progress=progress) for cfg in configs]


def best_result(results: list[TrainResult]) -> TrainResult | None:
    scored = [r for r in results if r.best_value is not None]
    if not scored:
        return None
    sign = -1 if monitor_mode(scored[0].config.monitor) == "min" else 1
    return max(scored, key=lambda r: sign * r.best_value)


def ensemble_offer(results: list[TrainResult], *, save_as: str | None = None, root: Path | None = None,
                   progress: Progress | None = None) -> tuple[Any, Any]:
    """The best ensemble of the compared runs (greedy selection over their best checkpoints on
    validation) and, with ``save_as``, that ensemble stored under this name: ``(selection, created)``;
    ``(None, None)`` when fewer than two runs can be combined."""
    from dermcam.evaluate.ensemble import create_ensemble, offer_ensemble

    ids = [r.best_id for r in results if r.best_id]
    if len(ids) < 2:
        return None, None
    selection = offer_ensemble(ids, root=root, progress=progress)
    if selection is None or save_as is None:
        return selection, None
    created = create_ensemble(save_as, selection.candidates, select="greedy", preselected=selection, root=root,
                              progress=progress)
    return selection, created

"""MLflow: a run's configuration, metrics, tags and artefacts (``dermcam train --log mlflow[:URI]``).

Each dermcam run is one MLflow run in experiment ``dermcam`` (or ``$MLFLOW_EXPERIMENT_NAME``):
the configuration as parameters; per epoch (step = epoch) ``train_loss``, ``lr``, every ``val_*``
metric, ``epoch_seconds`` and ``images_per_second``; tags naming the dermcam version, the data set and
its fingerprint, the backbone, the run id and folder, the latest and the best checkpoint; at the end
``test_*`` metrics and, as artefacts, ``report/`` (report.html, its plots, metrics.json),
``checkpoint/`` (the best checkpoint's sidecar) and with ``--log-model`` ``model/`` (the exported
model, as ``dermcam ckpt export`` writes it).

Only :class:`mlflow.MlflowClient` is used (never the fluent API's process-wide active run), with short
timeouts: a tracking server that is down or hangs costs one request of
``MLFLOW_HTTP_REQUEST_TIMEOUT`` seconds (default here 10, one retry), then the fan-out leaves it out.
Variables the user set are kept. Credentials reach MLflow through its environment variables, never
inside the URI, because MLflow prints run links with the URI it was given.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dermcam.track.base import RunEnd, RunInfo, Tracker, epoch_scalars, numbers, spec_key
from dermcam.track.spec import LogSpec, mask_uri, reveal, without_userinfo

DEFAULT_EXPERIMENT = "dermcam"
# Short enough that a dead or hung server costs seconds, not the minutes of MLflow's defaults (120 s, 7
# retries with exponential backoff); the user's own settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
MAX_PARAM = 6000  # characters of a parameter value the MLflow server accepts (2.x and later)
BATCH = 100  # parameters per log_batch request (the REST limit; metrics allow 1000)
REPORT_SUFFIXES = (".html", ".png", ".json")  # report/ artefacts: the page, its plots, metrics.json
MAX_TAG = 5000  # characters of a tag value every MLflow version accepts
# What MLflow accepts in a metric name; a class such as "a+b" gives val_recall_a+b, logged as val_recall_a_b
# (one bad name would refuse the whole batch, and with it the rest of the run).
_NOT_IN_NAME = re.compile(r"[^\w.\- :/]")


def metric_name(name: str) -> str:
    return _NOT_IN_NAME.sub("_", name)


def configure_environment() -> None:
    """Short HTTP timeouts unless the user chose others, and no run links printed to stdout (they
    would break ``--json`` output and show the URI)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def client_for(target: str | None) -> tuple[Any, str]:
    """``(MlflowClient, the tracking URI masked)`` for a ``--log mlflow`` target (None: MLflow's own
    default, ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the current folder).

    A masked target (``https://user:***@host`` from a stored run) becomes the URI without its user
    part: the password then comes from ``MLFLOW_TRACKING_PASSWORD``, as MLflow documents it."""
    configure_environment()
    from mlflow import MlflowClient

    uri = reveal(target)
    if uri is not None:
        uri, user, password = without_userinfo(uri)
        if password is not None and user is None:
            os.environ["MLFLOW_TRACKING_TOKEN"] = password
        elif password is not None:
            os.environ["MLFLOW_TRACKING_USERNAME"] = user or ""
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    client = MlflowClient(tracking_uri=uri)
    shown = mask_uri(str(client.tracking_uri)) if target is None else mask_uri(target)
    return client, shown


def experiment_id(client: Any, name: str | None = None) -> str:
    """The experiment's id, created when missing (another process may create it at the same moment)."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def params_of(config: Mapping[str, Any]) -> dict[str, str]:
    """The configuration as MLflow parameters (text; lists and None as JSON)."""
    out = {}
    for key, value in config.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[str(key)] = text[:MAX_PARAM]
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


class MlflowTracker(Tracker):
    kind = "mlflow"

    def __init__(self, spec: LogSpec, *, log_model: bool = False) -> None:
        super().__init__(spec)
        self.log_model = log_model
        self.client: Any = None
        self.uri: str | None = spec.shown_target  # masked; MLflow's default is resolved on start
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    @classmethod
    def reopen(cls, identity: Mapping[str, Any]) -> MlflowTracker:
        """The tracker of a stored identity (its run exists), to add a later command's result."""
        tracker = cls(LogSpec("mlflow", identity.get("uri")))
        tracker.run_id = identity.get("run_id")
        tracker.experiment_id = identity.get("experiment_id")
        tracker.parent_run_id = identity.get("parent_run_id")
        return tracker

    @property
    def where(self) -> str:
        return self.uri or "MLflow's default tracking URI"

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id,
                "parent_run_id": self.parent_run_id}

    def matches(self, stored: Mapping[str, Any]) -> bool:
        return stored.get("kind") == self.kind and stored.get("uri") == self.uri

    def describe(self) -> str:
        return f"MLflow run {self.run_id} (experiment {self.experiment_id}) at {self.uri}"

    def _client(self) -> Any:
        if self.client is None:
            self.client, self.uri = client_for(self.spec.target)
        return self.client

    def start(self, run: RunInfo) -> None:
        from mlflow.entities import Param

        client = self._client()
        previous = next((p for p in run.previous if self.matches(p) and p.get("run_id")), None)
        logged: set[int] = set()
        if previous is not None:  # a resume: the same MLflow run, running again
            self.run_id, self.experiment_id = previous["run_id"], previous.get("experiment_id")
            self.parent_run_id = previous.get("parent_run_id")
            client.update_run(self.run_id, status="RUNNING")
            logged = {int(m.step) for m in client.get_metric_history(self.run_id, "train_loss")}
        else:
            parent = run.parents.get(spec_key(self.spec))
            self.parent_run_id = parent.get("run_id") if parent else None
            self.experiment_id = (parent or {}).get("experiment_id") or experiment_id(client)
            tags = self.run_tags(run)
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            fold = run.config.get("fold")
            name = f"{run.run_id} {run.backbone}" + (f" fold {int(fold) + 1}/{run.config.get('folds')}"
                                                     if fold is not None else "")
            created = client.create_run(self.experiment_id, run_name=name, tags=tags)
            self.run_id = created.info.run_id
            params = [Param(k, v) for k, v in params_of(run.config).items()]
            for i in range(0, len(params), BATCH):
                client.log_batch(self.run_id, params=params[i:i + BATCH])
        missing = [r for r in run.history if int(r["epoch"]) not in logged]
        if missing:
            self._log_metrics([(int(r["epoch"]), epoch_scalars(r, run.images_per_epoch)) for r in missing])

    @staticmethod
    def run_tags(run: RunInfo) -> dict[str, str]:
        from dermcam import __version__

        tags = {"dermcam.version": __version__, "dermcam.run_id": run.run_id, "dermcam.run_dir": str(run.run_dir),
                "dermcam.dataset": str(run.dataset.get("name")),
                "dermcam.dataset_fingerprint": str(run.dataset.get("fingerprint")),
                "dermcam.backbone": run.backbone, "dermcam.classes": ",".join(run.classes),
                "mlflow.source.name": "dermcam train", "mlflow.source.type": "LOCAL"}
        return {k: v[:MAX_TAG] for k, v in tags.items()}

    def _log_metrics(self, steps: list[tuple[int, Mapping[str, float]]], tags: Mapping[str, str] | None = None,
                     prefix: str = "") -> None:
        from mlflow.entities import Metric, RunTag

        now = _now_ms()
        metrics = [Metric(metric_name(f"{prefix}{k}"), float(v), now, step)
                   for step, values in steps for k, v in values.items()]
        run_tags = [RunTag(k, str(v)[:MAX_TAG]) for k, v in (tags or {}).items()]
        for i in range(0, max(len(metrics), 1), 1000):
            chunk = metrics[i:i + 1000]
            if chunk or (run_tags and i == 0):
                self._client().log_batch(self.run_id, metrics=chunk, tags=run_tags if i == 0 else [])

    def log_epoch(self, epoch: int, scalars: Mapping[str, float], tags: Mapping[str, str]) -> None:
        self._log_metrics([(epoch, scalars)], tags)

    def finish(self, end: RunEnd, tags: Mapping[str, str]) -> None:
        client = self._client()
        step = end.best_epoch if end.best_epoch is not None else 0
        self._log_metrics([(step, numbers(end.test_metrics or {}, depth=1))], tags, prefix="test_")
        for path in end.files:
            if path.suffix in REPORT_SUFFIXES and path.is_file():
                client.log_artifact(self.run_id, str(path), "report")
        if end.best_sidecar is not None and end.best_sidecar.is_file():
            client.log_artifact(self.run_id, str(end.best_sidecar), "checkpoint")
        if self.log_model and end.model_file is not None and end.model_file.is_file():
            client.log_artifact(self.run_id, str(end.model_file), "model")
        client.set_terminated(self.run_id, "FINISHED")

    def stop(self, status: str) -> None:
        if self.run_id is not None:
            self._client().set_terminated(self.run_id, "KILLED" if status == "interrupted" else "FAILED")

    def log_result(self, name: str, step: int, scalars: Mapping[str, float], files: list[Path],
                   tags: Mapping[str, str]) -> None:
        self._log_metrics([(step, scalars)], tags, prefix=f"{name}/")
        for path in files:
            if path.is_file():
                self._client().log_artifact(self.run_id, str(path), name)


class MlflowParent:
    """The parent run of several runs of one command (a grid, a cross-validation)."""

    label = "MLflow"

    def __init__(self, spec: LogSpec) -> None:
        self.spec = spec
        self.client: Any = None
        self.uri: str | None = spec.shown_target
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    @property
    def where(self) -> str:
        return self.uri or "MLflow's default tracking URI"

    def open(self, title: str, tags: dict[str, str], reuse: str | None) -> None:
        from dermcam import __version__

        self.client, self.uri = client_for(self.spec.target)
        if reuse:
            self.run_id = reuse
            self.experiment_id = self.client.get_run(reuse).info.experiment_id
            self.client.update_run(reuse, status="RUNNING")
            return
        self.experiment_id = experiment_id(self.client)
        created = self.client.create_run(self.experiment_id, run_name=title,
                                         tags={"dermcam.version": __version__, "mlflow.source.name": "dermcam train",
                                               **tags})
        self.run_id = created.info.run_id

    def identity(self) -> dict[str, Any]:
        return {"kind": "mlflow", "uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def log(self, scalars: Mapping[str, float], tags: dict[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(metric_name(k), float(v), now, 0) for k, v in scalars.items()],
                              tags=[RunTag(k, str(v)[:MAX_TAG]) for k, v in tags.items()])

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)

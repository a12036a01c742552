"""MLflow experiment tracking for the bundle's workflows (``--tracking mlflow``), robust to tracking-server outages.

``python -m monai.bundle run ... --tracking mlflow`` makes MONAI append a :class:`monai.handlers.MLFlowHandler` to
the trainer, the validator and the evaluator (loss per iteration, learning rate, validation metrics). The handlers
of this module sit in the same handler lists, ahead of MONAI's. When their engine starts they

* wrap every event handler of that MLFlowHandler so that a tracking failure (server down, timeout, rejected value)
  is logged as a warning and the workflow goes on; after a failure tracking calls are skipped for a while
  (``cooldown`` seconds, doubling while failures repeat) so that an unreachable server does not slow training;
* log what MONAI does not: parameters, tags (bundle version, git commit), the executed config, the training loss
  per epoch, the best metric, validation overlays, the best checkpoint, the log file and the evaluate tables.

Without ``--tracking`` no MLFlowHandler is attached and these handlers do nothing.
"""

from __future__ import annotations

import copy
import datetime
import inspect
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from monai.handlers import MLFlowHandler
from monai.utils import min_version, optional_import

from scripts.severity_calibration import file_sha256 as sha256_of

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

logger = logging.getLogger(__name__)

# MLflow's defaults (7 retries with exponential backoff, 120 s timeout) can stall a workflow for minutes per call
# when the server is gone; these apply when the environment does not set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def limit_http_retries(defaults: Mapping[str, str] = HTTP_DEFAULTS) -> None:
    """Set MLflow's HTTP retry/timeout environment variables to small values where they are unset."""
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def timestamped_name(prefix: str, suffix: str = "") -> str:
    """``<prefix>_YYYYmmdd_HHMMSS[_<suffix>]``, e.g. a default MLflow run name.

    Custom: one name rule for every workflow's MLflow runs (MONAI names runs by time stamp without a prefix).
    """
    name = f"{prefix}_{datetime.datetime.now().strftime('%Y%m%d_%H%M%S')}"
    return f"{name}_{suffix}" if suffix else name


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's content, or an empty string when it cannot be read."""
    try:
        return sha256_of(path)
    except OSError:
        return ""


def git_commit(folder: str) -> str:
    """Commit hash of the git checkout holding ``folder``, or an empty string."""
    try:
        result = subprocess.run(
            ["git", "-C", folder or ".", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def executed_config() -> dict | None:
    """Raw content (overrides and tracking settings applied) of the ConfigParser instantiating the caller, or None.

    MONAI exports this content itself (``save_execute_config``) but resolves the output folder twice for that, which
    with a time-stamped ``run_name`` or an ``--output_dir`` override puts the file where the run never looks.
    """
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, ConfigParser):
                return copy.deepcopy(candidate.get())
            frame = frame.f_back
    except Exception:  # noqa: BLE001 - best effort: the config is a convenience artifact
        return None
    finally:
        del frame
    return None


class TrackingGuard:
    """Run tracking calls, turning exceptions into warnings; after a failure skip calls for a cooldown."""

    def __init__(self, cooldown: float = 60.0, max_cooldown: float = 900.0):
        self.cooldown, self.max_cooldown = cooldown, max_cooldown
        self.failures = 0
        self.resume_at = 0.0

    def call(self, function: Callable, *args, **kwargs):
        """``function(*args, **kwargs)``, or None when it fails or tracking is paused."""
        if time.monotonic() < self.resume_at:
            return None
        try:
            result = function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - tracking must never stop the workflow
            self.failures += 1
            pause = min(self.cooldown * 2 ** (self.failures - 1), self.max_cooldown)
            self.resume_at = time.monotonic() + pause
            message = " ".join(str(error).split())[:300]
            logger.warning(
                f"MLflow tracking failed in {getattr(function, '__name__', function)} ({type(error).__name__}: "
                f"{message}); the workflow goes on, tracking calls are skipped for {pause:.0f} s"
            )
            return None
        self.failures = 0
        return result


class _GuardedHandler:
    """An MLFlowHandler event handler run through a :class:`TrackingGuard`, restarting its run if none is active."""

    def __init__(self, function: Callable, owner: MLFlowHandler, guard: TrackingGuard, after_start=None):
        self.function, self.owner, self.guard, self.after_start = function, owner, guard, after_start
        self.__name__ = getattr(function, "__name__", "mlflow_handler")

    def __call__(self, *args, **kwargs):
        if self.__name__ not in ("start", "close") and self.owner.cur_run is None:
            if not args:  # complete() and close() get no engine: nothing to log without a run
                return None
            self.guard.call(self.owner.start, args[0])
            if self.owner.cur_run is None:
                return None
            if self.after_start is not None:
                self.guard.call(self.after_start, self.owner)
        result = self.guard.call(self.function, *args, **kwargs)
        if self.__name__ == "start" and self.owner.cur_run is not None and self.after_start is not None:
            self.guard.call(self.after_start, self.owner)
        return result


def guard_mlflow_handlers(engine, guard: TrackingGuard, after_start=None) -> list[MLFlowHandler]:
    """Wrap the event handlers of every MLFlowHandler attached to ``engine``; return those MLFlowHandlers.

    ``after_start(mlflow_handler)`` runs once its run is active (after ``start``, or a restart after an outage).
    """
    found: list[MLFlowHandler] = []
    for entries in getattr(engine, "_event_handlers", {}).values():
        for index, (function, args, kwargs) in enumerate(entries):
            owner = getattr(function, "__self__", None)
            if isinstance(owner, MLFlowHandler):
                entries[index] = (_GuardedHandler(function, owner, guard, after_start), args, kwargs)
                if owner not in found:
                    found.append(owner)
            elif isinstance(function, _GuardedHandler) and function.owner not in found:
                found.append(function.owner)
    return found


class _RunLogger:
    """Shared logic: find MONAI's MLFlowHandler on an engine and log to its run through a guard."""

    def __init__(self, tags: Mapping | None, bundle_root: str | None, cooldown: float):
        limit_http_retries()
        self.guard = TrackingGuard(cooldown=cooldown)
        self.tags = {key: str(value) for key, value in (tags or {}).items() if value is not None}
        self.bundle_root = bundle_root
        self.mlflow: MLFlowHandler | None = None
        self._prepared_runs: set[str] = set()

    @property
    def run_id(self) -> str | None:
        run = None if self.mlflow is None else self.mlflow.cur_run
        return None if run is None else run.info.run_id

    def _find_mlflow(self, engine) -> bool:
        handlers = guard_mlflow_handlers(engine, self.guard, after_start=self._run_started)
        if handlers and self.mlflow is None:
            self.mlflow = handlers[0]
        return self.mlflow is not None

    def _run_started(self, handler: MLFlowHandler) -> None:
        run_id = handler.cur_run.info.run_id
        if run_id not in self._prepared_runs:
            self._prepared_runs.add(run_id)
            experiment = handler.experiment
            if experiment is not None and EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
                # the MLflow 3 UI then shows the experiment as "machine learning" (charts) rather than GenAI (traces)
                self.guard.call(
                    handler.client.set_experiment_tag, experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                )
            self.on_run_started(handler)

    def on_run_started(self, handler: MLFlowHandler) -> None:
        """Log parameters and tags once per run; subclasses extend."""

    def log_params(self, params: Mapping) -> None:
        """Log parameters not yet in the run (MLflow refuses to change a logged value: those keep theirs, warned)."""
        import mlflow.entities

        if self.run_id is None or not params:
            return
        client, run_id = self.mlflow.client, self.run_id
        logged = client.get_run(run_id).data.params
        changed = {
            key: (logged[key], str(value))
            for key, value in params.items()
            if key in logged and logged[key] != str(value)
        }
        if changed:
            logger.warning(
                f"MLflow run {run_id} keeps earlier values of parameters {changed} (logged value, new value)"
            )
        new = [mlflow.entities.Param(key, str(value)[:6000]) for key, value in params.items() if key not in logged]
        for start in range(0, len(new), 100):
            client.log_batch(run_id, params=new[start : start + 100])

    def log_tags(self, tags: Mapping) -> None:
        if self.run_id is not None:
            for key, value in tags.items():
                self.mlflow.client.set_tag(self.run_id, key, str(value))

    def log_metrics(self, metrics: Mapping, step: int) -> None:
        """Log finite numeric values at ``step``."""
        import mlflow.entities

        if self.run_id is None:
            return
        timestamp = int(time.time() * 1000)
        values = [
            mlflow.entities.Metric(key, float(value), timestamp, int(step))
            for key, value in metrics.items()
            if isinstance(value, (int, float, np.number)) and math.isfinite(float(value))
        ]
        if values:
            self.mlflow.client.log_batch(self.run_id, metrics=values)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.run_id is not None and path and os.path.isfile(path):
            self.mlflow.client.log_artifact(self.run_id, path, artifact_path)

    def guarded(self, function: Callable, *args, **kwargs):
        """Run a logging call when a run is active, through the guard."""
        if self.run_id is None:
            return None
        return self.guard.call(function, *args, **kwargs)

    def log_run_details(self, params: Mapping) -> None:
        """Parameters (with the datalist path and its sha256), tags and the executed config of a new run.

        Subclasses set ``datalist`` (path or None) and ``config`` (a :class:`_ConfigArtifact`).
        """
        params = dict(params)
        if self.datalist:
            params.update(datalist=self.datalist, datalist_sha256=file_sha256(self.datalist))
        self.guard.call(self.log_params, params)
        self.guard.call(self.log_tags, self.common_tags())
        config = self.config.write()
        if config:
            self.guard.call(self.log_artifact, config, "config")

    def common_tags(self) -> dict:
        tags = dict(self.tags)
        commit = git_commit(self.bundle_root) if self.bundle_root else ""
        if commit:
            tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
        return tags


class _ConfigArtifact:
    """Write the executed config, captured when the handler is built, to ``<output_dir>/config_<time>.json``."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.content = executed_config()
        self.path: str | None = None

    def write(self) -> str | None:
        if self.content is None or self.path is not None:
            return self.path
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, f"config_{time.strftime('%Y%m%d_%H%M%S')}.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.content, handle, indent=2, default=str)
        self.path = path
        return path


def _default_loss(output) -> float | None:
    item = output[0] if isinstance(output, (list, tuple)) and output else output
    loss = item.get("loss") if isinstance(item, Mapping) else None
    return None if loss is None else float(loss)


class TrainingTracker(_RunLogger):
    """Trainer handler: parameters, tags, executed config, per-epoch loss, checkpoint, log file and registered model.

    Beside MONAI's MLFlowHandler (metrics only): parameters, datalist hash, config and files; a failing server is
    logged, never fatal.

    Args:
        params: run parameters (values logged as strings), e.g. learning rate, batch size, image size.
        datalist: datalist file; its path and the sha256 of its content are logged as ``datalist``/``datalist_sha256``.
        output_dir: the run's output folder (the executed config is written there).
        artifacts: ``{artifact folder: [file, ...]}`` logged when training completes (missing files are skipped).
        tags: run tags, e.g. the bundle version; the git commit of ``bundle_root`` is added when available.
        loss_transform: ``engine.state.output`` to the iteration's loss (default: ``output[0]["loss"]``).
        cooldown: seconds tracking calls are skipped after a failure (doubling while failures repeat).
        registered_model: when training completes, ``{"name": ..., "network": <the trained network>,
            "weights": <the chosen checkpoint>, "image_size": [...], "num_classes": n}`` is logged as the run's MLflow
            Model and registered under ``name`` (:mod:`scripts.mlflow_model`); None: no model is logged.
    """

    def __init__(
        self,
        params: Mapping | None = None,
        datalist: str | None = None,
        output_dir: str = ".",
        artifacts: Mapping[str, Sequence[str]] | None = None,
        tags: Mapping | None = None,
        bundle_root: str | None = None,
        loss_transform: Callable | None = None,
        cooldown: float = 60.0,
        registered_model: Mapping | None = None,
    ):
        super().__init__(tags, bundle_root, cooldown)
        self.registered_model = dict(registered_model) if registered_model else None
        self.params = dict(params or {})
        self.datalist = datalist
        self.artifacts = {folder: list(paths) for folder, paths in (artifacts or {}).items()}
        self.loss_transform = loss_transform or _default_loss
        self.config = _ConfigArtifact(output_dir)
        self._losses: list[float] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine) -> None:
        if self._find_mlflow(engine):
            logger.info("MLflow tracking enabled; tracking failures are reported as warnings and training goes on")

    def on_run_started(self, handler: MLFlowHandler) -> None:
        self.log_run_details({**self.params, **(_datalist_counts(self.datalist) if self.datalist else {})})
        if self.datalist and os.path.isfile(self.datalist):
            self.guard.call(self.log_datasets, handler.client)

    def log_datasets(self, client) -> None:
        """The datalist's splits as the run's dataset inputs (the UI's "Datasets used")."""
        from scripts.mlflow_model import datalist_inputs

        client.log_inputs(self.run_id, datasets=datalist_inputs(self.datalist))

    def epoch_started(self, engine) -> None:
        self._losses = []

    def iteration_completed(self, engine) -> None:
        if self.mlflow is not None:
            loss = self.loss_transform(engine.state.output)
            if loss is not None and math.isfinite(float(loss)):
                self._losses.append(float(loss))

    def epoch_completed(self, engine) -> None:
        if self.mlflow is None:
            return
        metrics = {"train_loss_epoch": float(np.mean(self._losses)) if self._losses else math.nan}
        self.guarded(self.log_metrics, metrics, engine.state.epoch)  # the learning rate: MONAI's lr_group_0

    def completed(self, engine) -> None:
        if self.mlflow is None:
            return
        for folder, paths in self.artifacts.items():
            for path in paths:
                if path and os.path.isfile(path):
                    self.guarded(self.log_artifact, path, folder)
        if self.registered_model and os.path.isfile(self.registered_model["weights"]):
            self.guarded(self.register_model)

    def register_model(self) -> None:
        """Log the chosen checkpoint as the run's MLflow Model, register it and tag the run with its version."""
        from scripts.mlflow_model import log_registered_model

        model = self.registered_model
        version = log_registered_model(
            self.mlflow.client.tracking_uri, self.run_id, model["network"], model["weights"], model["image_size"],
            model["num_classes"], model["name"],
        )  # fmt: skip
        self.log_tags({"registered_model": f"{version.name}/{version.version}"})


def _datalist_counts(datalist: str) -> dict:
    try:
        with open(datalist, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, ValueError):
        return {}
    return {f"num_{key}": len(value) for key, value in content.items() if isinstance(value, list)}


class ValidationTracker(_RunLogger):
    """Validator handler: best key metric and its epoch after each validation, and overlays every few epochs.

    Beside MONAI's MLFlowHandler (metrics only): the best epoch and overlay images.

    Overlays (prediction left, label right: lung outline, opacity fill) of the first ``overlay_count`` validation
    images are written to ``<overlay_dir>/epoch_NNNN/`` and logged under ``overlays/epoch_NNNN`` at the first
    validation and whenever the epoch is a multiple of ``overlay_interval`` (0 turns overlays off).
    """

    def __init__(
        self,
        overlay_dir: str,
        overlay_interval: int = 10,
        overlay_count: int = 4,
        bundle_root: str | None = None,
        cooldown: float = 60.0,
    ):
        super().__init__(None, bundle_root, cooldown)
        self.overlay_dir = overlay_dir
        self.overlay_interval, self.overlay_count = int(overlay_interval), int(overlay_count)
        self._validations = 0
        self._overlays: list[tuple[str, np.ndarray]] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _overlay_epoch(self, engine) -> bool:
        if self.overlay_interval <= 0 or self.overlay_count <= 0:
            return False
        return self._validations == 1 or engine.state.epoch % self.overlay_interval == 0

    def started(self, engine) -> None:
        self._find_mlflow(engine)
        self._validations += 1
        self._overlays = []

    def iteration_completed(self, engine) -> None:
        if self.mlflow is None or not self._overlay_epoch(engine) or len(self._overlays) >= self.overlay_count:
            return
        for item in engine.state.output:
            if len(self._overlays) < self.overlay_count:
                try:
                    self._overlays.append(validation_overlay(item, engine.state.epoch))
                except (KeyError, ValueError, TypeError, IndexError) as error:
                    logger.warning(f"no validation overlay ({type(error).__name__}: {error})")
                    self.overlay_count = 0

    def completed(self, engine) -> None:
        if self.mlflow is None:
            return
        epoch = engine.state.epoch
        name = getattr(engine.state, "key_metric_name", None)
        best_epoch = getattr(engine.state, "best_metric_epoch", -1)
        if name and best_epoch is not None and best_epoch >= 0:
            self.guarded(self.log_metrics, {f"best_{name}": engine.state.best_metric, "best_epoch": best_epoch}, epoch)
        if self._overlays:
            folder = os.path.join(self.overlay_dir, f"epoch_{epoch:04d}")
            from scripts.label_io import write_png

            for stem, image in self._overlays:
                path = os.path.join(folder, f"{stem}.png")
                write_png(path, image)
                self.guarded(self.log_artifact, path, f"overlays/epoch_{epoch:04d}")
            self._overlays = []


def validation_overlay(item: Mapping, epoch: int, min_size: int = 256) -> tuple[str, np.ndarray]:
    """(file stem, RGB image) of one validation output: prediction overlay left, label overlay right."""
    from scripts.labels import BACKGROUND, OPACITY
    from scripts.overlay import draw_overlay

    image = np.asarray(item["image"].detach().cpu() if hasattr(item["image"], "detach") else item["image"])[0]
    predicted = np.rint(np.asarray(item["pred"].detach().cpu() if hasattr(item["pred"], "detach") else item["pred"]))[0]
    label = np.rint(np.asarray(item["label"].detach().cpu() if hasattr(item["label"], "detach") else item["label"]))[0]
    scale = max(1, math.ceil(min_size / max(image.shape)))
    grow = lambda array: np.kron(array, np.ones((scale, scale), dtype=array.dtype))  # noqa: E731
    display = grow(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
    panels = []
    for caption, classes in ((f"prediction, epoch {epoch}", predicted), ("label", label)):
        classes = grow(classes.astype(np.uint8))
        panels.append(draw_overlay(display, classes != BACKGROUND, classes == OPACITY, caption))
    name = getattr(item["image"], "meta", {}).get("filename_or_obj", "image")
    stem = os.path.splitext(os.path.basename(str(name)))[0] or "image"
    return stem, np.concatenate(panels, axis=1)


class EvaluationTracker(_RunLogger):
    """Evaluator handler: parameters, tags, executed config, summary metrics and the result tables as artifacts.

    Beside MONAI's MLFlowHandler (metrics only): parameters, config and tables, and a failing server never stops a run.

    Runs after the metrics and severity writers (put it after them in the handler list): when the evaluator
    completes it logs the mean and median of every figure of ``metrics_summary.json`` (``<figure>_mean``,
    ``<figure>_median``, ``images``) and the files in ``artifacts`` that exist. With ``weights_file`` the run is
    tagged with its sha256 and, when a registered model version holds those weights, with that version and the
    training run that logged it (``registered_model``, ``training_run_id``).
    """

    def __init__(
        self,
        output_dir: str,
        params: Mapping | None = None,
        datalist: str | None = None,
        artifacts: Sequence[str] = (
            "metrics.csv",
            "metrics_summary.json",
            "severity.csv",
            "severity.json",
            "score_agreement.json",
        ),
        tags: Mapping | None = None,
        bundle_root: str | None = None,
        cooldown: float = 60.0,
        weights_file: str | None = None,
    ):
        super().__init__(tags, bundle_root, cooldown)
        self.weights_file = weights_file
        self.output_dir = output_dir
        self.params = dict(params or {})
        self.datalist = datalist
        self.artifacts = list(artifacts)
        self.config = _ConfigArtifact(output_dir)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine) -> None:
        self._find_mlflow(engine)

    def on_run_started(self, handler: MLFlowHandler) -> None:
        self.log_run_details(self.params)
        if self.weights_file and os.path.isfile(self.weights_file):
            self.guard.call(self.log_tags, self.lineage_tags(handler.client))

    def lineage_tags(self, client) -> dict:
        """The sha256 of the evaluated weights and, when registered, their model version and training run."""
        from scripts.mlflow_model import model_version_of

        tags = {"weights_sha256": file_sha256(self.weights_file)}
        version = model_version_of(client, tags["weights_sha256"])
        if version is not None:
            tags.update(registered_model=f"{version.name}/{version.version}", training_run_id=version.run_id)
        return tags

    def completed(self, engine) -> None:
        if self.mlflow is None:
            return
        summary_path = os.path.join(self.output_dir, "metrics_summary.json")
        if os.path.isfile(summary_path):
            with open(summary_path, encoding="utf-8") as handle:
                self.guarded(self.log_metrics, summary_metrics(json.load(handle)), 0)
        for name in self.artifacts:
            self.guarded(self.log_artifact, os.path.join(self.output_dir, name))


def summary_metrics(summary: Mapping) -> dict:
    """Flatten ``metrics_summary.json`` to ``{"images": n, "<figure>_mean": ..., "<figure>_median": ...}``; a group's
    figures as ``<group>/<figure>_mean`` (e.g. ``covid-qu-ex present/opacity_dice_mean``)."""
    metrics = {}
    for key, value in summary.items():
        if key == "groups":
            for group, figures in value.items():
                name = group.replace(",", "")
                metrics.update({f"{name}/{figure}": number for figure, number in summary_metrics(figures).items()})
        elif isinstance(value, Mapping):
            for statistic in ("mean", "median"):
                if isinstance(value.get(statistic), (int, float)):
                    metrics[f"{key}_{statistic}"] = value[statistic]
        elif isinstance(value, (int, float)):
            metrics[key] = value
    return metrics

"""MLflow tracking of the bundle's workflows (``--tracking mlflow``): every run in a local store first.

``--tracking mlflow`` makes MONAI add its MLFlowHandler to the trainer, the validator and the evaluator (loss per
iteration, learning rate, validation metrics, and the executed config, which MONAI also writes into the run folder).
:class:`TrackingStore` decides where those handlers write: the requested store (``--tracking_uri``, else
``MLFLOW_TRACKING_URI``) when it is local, else the bundle's local store, which it copies to the server in a background
thread (:mod:`scripts.mlflow_mirror`), so a server that is down, restarted or hung costs the workflow nothing and
loses nothing. The trackers open the run that MONAI's handlers then continue (the unfinished run of the same
experiment and run name) and log what MONAI does not: parameters, tags, dataset inputs, system metrics, the mean loss
per epoch, the best metric, validation overlays, files, the registered model and the evaluate tables.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil
from monai.utils import min_version, optional_import

from scripts.mlflow_mirror import PARENT_TAG, RunMirror, is_server
from scripts.severity_calibration import file_sha256

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
MlflowClient, _ = optional_import("mlflow", name="MlflowClient")  # an optional feature: needed with tracking only
entities, _ = optional_import("mlflow.entities")

logger = logging.getLogger(__name__)

# MLflow 3.17's UI ignores it (GenAI pages unless ?workflowType=machine_learning); kept for versions that read it
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class TrackingStore:
    """Where a workflow's MLflow run is written, what every run holds, and the run's copy to a tracking server.

    Args:
        tracking_uri: the requested store; ``MLFLOW_TRACKING_URI`` wins, as it does for MONAI's handler.
        local_uri: the local store that holds the runs meant for a server (a SQLite URI: artifacts beside it).
        enabled: whether ``--tracking mlflow`` is on; the configs pass ``isinstance(@save_execute_config, str)``,
            which MONAI turns from a flag into the executed config's path when tracking is on.
        experiment_name, run_name: the run MONAI's handlers log to.
        output_dir: the run folder, where MONAI wrote the executed config (logged here: MONAI's own handler misses
            it when ``--output_dir`` is a plain path).
        datalist: logged as parameters (path, sha256, items per split) and as the run's dataset inputs.
        bundle_root: its git commit is tagged (``git_commit``) when it is a checkout.
        parent_run_id: a run of the same store to nest the run under (``mlflow.parentRunId``), or None.
        mirror_interval: seconds between background copies of the run to a server.
        final_wait: seconds the workflow's end waits for a server that refuses connections (restarting) for the
            last copy; a hung server is not waited for.
    """

    def __init__(
        self,
        tracking_uri: str,
        local_uri: str,
        enabled: bool,
        experiment_name: str,
        run_name: str,
        output_dir: str,
        datalist: str | None = None,
        bundle_root: str | None = None,
        parent_run_id: str | None = None,
        mirror_interval: float = 30.0,
        final_wait: float = 30.0,
    ):
        requested = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
        self.enabled, self.experiment_name, self.run_name = bool(enabled), experiment_name, run_name
        self.output_dir, self.datalist = output_dir, datalist
        self.bundle_root, self.parent_run_id = bundle_root, parent_run_id
        self.server_uri = requested if is_server(requested) else None
        self.uri = local_uri if self.server_uri else requested
        self.mirror_interval, self.final_wait, self.mirror = float(mirror_interval), float(final_wait), None
        self.run_id: str | None = None
        self.client = MlflowClient(self.uri) if self.enabled else None
        self._previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if self.enabled:
            os.environ["MLFLOW_TRACKING_URI"] = self.uri  # MONAI's MLFlowHandler prefers it to its argument

    def open_run(self, params: Mapping | None = None, tags: Mapping | None = None) -> str:
        """The run MONAI's handlers continue: the oldest unfinished run of this experiment and name (a resumed
        training goes on in its run), else a new one, from now on copied to a server; logs ``params`` and ``tags``
        with the datalist, git commit, parent run and executed config."""
        if self.run_id is None:
            experiment_id = self._experiment_id()
            runs = self.client.search_runs([experiment_id], f"attributes.run_name = '{self.run_name}'")
            runs = [run for run in runs if run.info.status != "FINISHED"]
            run = runs[-1] if runs else self.client.create_run(experiment_id, run_name=self.run_name)
            self.run_id = run.info.run_id
            self.log_artifact(executed_config(self.output_dir))
            if self.datalist and not self.client.get_run(self.run_id).inputs.dataset_inputs:
                from scripts.mlflow_model import datalist_inputs

                self.client.log_inputs(self.run_id, datasets=datalist_inputs(self.datalist))
            if self.server_uri:
                self.mirror = RunMirror(self.uri, self.server_uri, self.run_id, self.mirror_interval).start()
        self.log_params({**(params or {}), **datalist_params(self.datalist)})
        commit = git_commit(self.bundle_root) if self.bundle_root else ""
        run_tags = {"git_commit": commit, "mlflow.source.git.commit": commit, PARENT_TAG: self.parent_run_id}
        self.log_tags({**(tags or {}), **{key: value for key, value in run_tags.items() if value}})
        return self.run_id

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            for key, value in EXPERIMENT_TAGS.items():
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
            return experiment.experiment_id
        folder = Path(self.uri[len("sqlite:///") :]).parent / "mlruns"  # artifacts beside the database, as MONAI does
        location = folder.as_uri() if self.uri.startswith("sqlite:///") else None
        return self.client.create_experiment(self.experiment_name, location, EXPERIMENT_TAGS)

    def finish(self) -> None:
        """The workflow's last step (``finalize``, after MONAI's handlers closed the run): the last copy to a server."""
        if self.mirror is not None:
            self.mirror.finish(self.final_wait)
        if self.enabled and self._previous_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        elif self.enabled:
            os.environ["MLFLOW_TRACKING_URI"] = self._previous_uri

    def log_params(self, params: Mapping) -> None:
        """Parameters not yet in the run (a resumed run keeps the values it logged first, with a warning)."""
        logged = self.client.get_run(self.run_id).data.params
        changed = {
            key: (logged[key], str(value)) for key, value in params.items() if logged.get(key, str(value)) != str(value)
        }
        if changed:
            logger.warning(f"MLflow run {self.run_id} keeps its first values of {changed} (first, now)")
        new = [entities.Param(key, str(value)[:6000]) for key, value in params.items() if key not in logged]
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def log_tags(self, tags: Mapping) -> None:
        items = [entities.RunTag(key, str(value)) for key, value in tags.items() if value is not None]
        self.client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics: Mapping, step: int) -> None:
        """The finite values of ``metrics`` at ``step`` (an undefined figure, NaN, is left out)."""
        now = int(time.time() * 1000)
        values = [
            entities.Metric(key, float(value), now, int(step)) for key, value in metrics.items() if _finite(value)
        ]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def log_artifact(self, path: str | None, folder: str | None = None) -> None:
        """A file as an artifact (in ``folder``), if it exists."""
        if path and os.path.isfile(path):
            self.client.log_artifact(self.run_id, path, folder)


def executed_config(folder: str) -> str | None:
    """The newest ``config_*.json`` that MONAI wrote into ``folder`` since this process started, or None."""
    started = psutil.Process().create_time() - 1
    files = [path for path in Path(folder).glob("config_*.json") if path.stat().st_mtime >= started]
    return str(max(files, key=lambda path: path.stat().st_mtime)) if files else None


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def git_commit(folder: str) -> str:
    """Commit hash of the git checkout holding ``folder``, or an empty string."""
    try:
        result = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def datalist_params(datalist: str | None) -> dict:
    """The datalist's path, the sha256 of its content and its number of items per split (``num_training``, ...)."""
    if not datalist or not os.path.isfile(datalist):
        return {}
    with open(datalist, encoding="utf-8") as handle:
        content = json.load(handle)
    counts = {f"num_{key}": len(value) for key, value in content.items() if isinstance(value, list)}
    return {"datalist": datalist, "datalist_sha256": file_sha256(datalist), **counts}


class TrainingTracker:
    """Trainer handler (nothing unless ``store.enabled``): opens the run with ``params`` and ``tags``, samples system
    metrics every ``system_metrics_interval`` seconds (``system/...``), logs ``train_loss_epoch``; when training
    completes, the files of ``artifacts`` (``{artifact folder: [file, ...]}``) and, with ``registered_model``
    (``{"name", "network", "weights", "image_size", "num_classes"}``), ``weights`` in ``network`` as the run's MLflow
    Model registered under ``name`` (:mod:`scripts.mlflow_model`)."""

    def __init__(
        self,
        store: TrackingStore,
        params: Mapping | None = None,
        tags: Mapping | None = None,
        artifacts: Mapping[str, Sequence[str]] | None = None,
        registered_model: Mapping | None = None,
        system_metrics_interval: float = 10.0,
    ):
        self.store, self.params, self.tags, self.artifacts = store, params, tags, dict(artifacts or {})
        self.registered_model, self.system_metrics_interval = registered_model, system_metrics_interval
        self.monitor, self.losses = None, []

    def attach(self, engine) -> None:
        if self.store.enabled:
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine) -> None:
        run_id = self.store.open_run(self.params, self.tags)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as error:  # psutil missing
            logger.warning(f"no MLflow system metrics ({error})")
        else:
            self.monitor = SystemMetricsMonitor(run_id, self.system_metrics_interval, tracking_uri=self.store.uri)
            self.monitor.start()

    def iteration_completed(self, engine) -> None:
        output = engine.state.output
        loss = output[0].get("loss") if isinstance(output, list) and output and isinstance(output[0], Mapping) else None
        if loss is not None:
            self.losses.append(float(loss))

    def epoch_completed(self, engine) -> None:
        self.store.log_metrics({"train_loss_epoch": sum(self.losses) / max(1, len(self.losses))}, engine.state.epoch)
        self.losses = []

    def completed(self, engine) -> None:
        for folder, paths in self.artifacts.items():
            for path in paths:
                self.store.log_artifact(path, folder)
        model = self.registered_model
        if model and os.path.isfile(model["weights"]):
            from scripts.mlflow_model import log_registered_model

            version = log_registered_model(
                self.store.uri, self.store.run_id, model["network"], model["weights"], model["image_size"],
                model["num_classes"], model["name"],
            )  # fmt: skip
            self.store.log_tags({"registered_model": f"{version.name}/{version.version}"})
        if self.monitor is not None:
            self.monitor.finish()


class ValidationTracker:
    """Validator handler: the best key metric and its epoch after each validation (restored with the rest of the
    record when training resumes) and overlays of the first ``overlay_count`` validation images (prediction left,
    label right), written to ``<overlay_dir>/epoch_NNNN/`` and logged under ``overlays/epoch_NNNN`` at the first
    validation and every ``overlay_interval`` epochs (0: none)."""

    def __init__(self, store: TrackingStore, overlay_dir: str, overlay_interval: int = 10, overlay_count: int = 4):
        self.store, self.overlay_dir = store, overlay_dir
        self.overlay_interval, self.overlay_count = int(overlay_interval), int(overlay_count)
        self.validations, self.overlays = 0, []

    def attach(self, engine) -> None:
        if self.store.enabled:
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine) -> None:
        self.validations += 1
        self.overlays = []

    def iteration_completed(self, engine) -> None:
        from scripts.validation_overlays import validation_overlay

        epoch = engine.state.epoch
        wanted = self.overlay_interval > 0 and (self.validations == 1 or epoch % self.overlay_interval == 0)
        for item in engine.state.output if wanted else []:
            if len(self.overlays) < self.overlay_count:
                self.overlays.append(validation_overlay(item, epoch))

    def completed(self, engine) -> None:
        from scripts.label_io import write_png

        state, folder = engine.state, f"epoch_{engine.state.epoch:04d}"
        if state.best_metric_epoch >= 0:
            best = {f"best_{state.key_metric_name}": state.best_metric, "best_epoch": state.best_metric_epoch}
            self.store.log_metrics(best, state.epoch)
        for stem, image in self.overlays:
            write_png(os.path.join(self.overlay_dir, folder, f"{stem}.png"), image)
            self.store.log_artifact(os.path.join(self.overlay_dir, folder, f"{stem}.png"), f"overlays/{folder}")


class EvaluationTracker:
    """Evaluator handler, after the metrics and severity writers (nothing unless ``store.enabled``): opens the run
    with ``params`` and ``tags`` plus the sha256 of ``weights_file`` and, when a registered version holds those
    weights, that version and its training run; logs the mean and median of every figure of
    ``<output_dir>/metrics_summary.json`` and the result files ``artifacts``."""

    def __init__(
        self,
        store: TrackingStore,
        output_dir: str,
        params: Mapping | None = None,
        tags: Mapping | None = None,
        weights_file: str | None = None,
        artifacts: Sequence[str] = (
            "metrics.csv", "metrics_summary.json", "severity.csv", "severity.json", "score_agreement.json",
        ),  # fmt: skip
    ):
        self.store, self.output_dir, self.params, self.tags = store, output_dir, params, dict(tags or {})
        self.weights_file, self.artifacts = weights_file, artifacts

    def attach(self, engine) -> None:
        if self.store.enabled:
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine) -> None:
        from scripts.mlflow_model import lineage_tags

        lineage = lineage_tags(self.store.client, file_sha256(self.weights_file)) if self.weights_file else {}
        self.store.open_run(self.params, {**self.tags, **lineage})

    def completed(self, engine) -> None:
        summary = os.path.join(self.output_dir, "metrics_summary.json")
        if os.path.isfile(summary):
            with open(summary, encoding="utf-8") as handle:
                self.store.log_metrics(summary_metrics(json.load(handle)), 0)
        for name in self.artifacts:
            self.store.log_artifact(os.path.join(self.output_dir, name))


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
            metrics.update({f"{key}_{name}": value[name] for name in ("mean", "median") if _finite(value.get(name))})
        elif _finite(value):
            metrics[key] = value
    return metrics

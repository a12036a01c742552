"""Copy MLflow runs from a local store to a tracking server, so that no server outage loses or stalls anything.

:func:`copy_run` compares the server's copy of a run (found by its ``mirror.source_run_id`` tag) with the local run
and sends what is missing: parameters, tags, dataset inputs, every metric point, artifacts, the registered model
version; the end status goes last, once everything else is there. It keeps no state, so a copy that failed halfway,
a restarted server or a second copy never loses or doubles a value. :class:`RunMirror` repeats it in a background
thread while a workflow runs. A run that could not be sent is sent later with (from the bundle folder)::

    python -m scripts.mlflow_mirror --from sqlite:///runs/mlruns.db --to http://<server>:5000 --run-id <id> [...]
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
import urllib.parse
import urllib.request

from monai.utils import optional_import

from scripts.mlflow_model import WEIGHTS_SHA256_TAG, lineage_tags

logger = logging.getLogger(__name__)
MlflowClient, _ = optional_import("mlflow", name="MlflowClient")
entities, _ = optional_import("mlflow.entities")

SOURCE_TAG = "mirror.source_run_id"
PARENT_TAG = "mlflow.parentRunId"
# per request, unless the environment sets them: a hung server must not hold the end of a workflow for long
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def is_server(uri: str | None) -> bool:
    """Whether ``uri`` names a tracking server (``http(s)://``, ``databricks``) rather than a local store."""
    return bool(uri) and urllib.parse.urlparse(uri).scheme in ("http", "https", "databricks")


def server_answers(uri: str, wait: float = 0.0) -> bool:
    """Whether an ``http(s)`` MLflow server answers its health check, trying for up to ``wait`` seconds while it
    refuses connections (e.g. restarting); a server that does not answer within 2 s (hung) is not waited for.
    Other URIs: True."""
    if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
        return True
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=2) as response:
                return response.status == 200
        except TimeoutError:
            return False
        except OSError as error:
            if isinstance(getattr(error, "reason", None), TimeoutError) or time.monotonic() >= deadline:
                return False
        time.sleep(1)


def _batches(items: list, size: int):
    return (items[start : start + size] for start in range(0, len(items), size))


def copy_run(local: MlflowClient, server: MlflowClient, run_id: str) -> str:
    """Send what ``server`` lacks of the local run ``run_id`` (and of its parent run); returns the server's run id."""
    run = local.get_run(run_id)
    experiment = local.get_experiment(run.info.experiment_id)
    remote_experiment = server.get_experiment_by_name(experiment.name)
    experiment_id = remote_experiment.experiment_id if remote_experiment else server.create_experiment(experiment.name)
    for key, value in experiment.tags.items():
        if remote_experiment is None or remote_experiment.tags.get(key) != value:
            server.set_experiment_tag(experiment_id, key, value)
    found = server.search_runs(
        [experiment_id], f"tags.`{SOURCE_TAG}` = '{run_id}'", entities.ViewType.ALL, max_results=1
    )
    if not found:
        found = [server.create_run(experiment_id, run.info.start_time, {SOURCE_TAG: run_id}, run.info.run_name)]
    remote_id = found[0].info.run_id
    remote = server.get_run(remote_id)

    tags = {key: value for key, value in run.data.tags.items() if key != "mlflow.runName"}
    if PARENT_TAG in tags:
        tags[PARENT_TAG] = copy_run(local, server, tags[PARENT_TAG])
    # the local store's model versions and run ids mean nothing on the server: its own are sent at the end
    lineage = {key: tags.pop(key) for key in ("registered_model", "training_run_id") if key in tags}
    finished = run.info.status != "RUNNING"
    if finished and WEIGHTS_SHA256_TAG in tags:  # an evaluate run: the server's version and run of its weights
        tags.update(lineage_tags(server, tags[WEIGHTS_SHA256_TAG]))
    elif finished and "registered_model" in lineage:  # a training run: its model version, registered there too
        tags["registered_model"] = copy_model_version(local, server, lineage["registered_model"], remote_id)
    new_tags = [entities.RunTag(key, value) for key, value in tags.items() if remote.data.tags.get(key) != value]
    new_params = [entities.Param(key, value) for key, value in run.data.params.items() if key not in remote.data.params]
    for batch in _batches(new_tags, 100):
        server.log_batch(remote_id, tags=batch)
    for batch in _batches(new_params, 100):
        server.log_batch(remote_id, params=batch)

    sent = {item.dataset.digest for item in remote.inputs.dataset_inputs} if remote.inputs else set()
    datasets = [item for item in (run.inputs.dataset_inputs if run.inputs else []) if item.dataset.digest not in sent]
    if datasets:
        server.log_inputs(remote_id, datasets=datasets)
    for key in run.data.metrics:
        sent = {(point.step, point.timestamp) for point in server.get_metric_history(remote_id, key)}
        points = [point for point in local.get_metric_history(run_id, key) if (point.step, point.timestamp) not in sent]
        metrics = [entities.Metric(key, point.value, point.timestamp, point.step) for point in points]
        for batch in _batches(metrics, 1000):
            server.log_batch(remote_id, metrics=batch)
    copy_artifacts(local, server, run_id, remote_id)
    if finished and remote.info.status != run.info.status:
        server.set_terminated(remote_id, run.info.status, run.info.end_time)
    return remote_id


def _local_path(uri: str) -> str:
    parsed = urllib.parse.urlparse(uri)
    return urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else uri


def copy_artifacts(local: MlflowClient, server: MlflowClient, run_id: str, remote_id: str) -> None:
    """Upload the local run's artifact files that the server's run lacks (or holds with another size)."""

    def listed(path=None) -> dict:
        files = {}
        for item in server.list_artifacts(remote_id, path):
            files.update(listed(item.path) if item.is_dir else {item.path: item.file_size})
        return files

    root = _local_path(local.get_run(run_id).info.artifact_uri)
    on_server = listed()
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if on_server.get(relative) != os.path.getsize(path):
                server.log_artifact(remote_id, path, os.path.dirname(relative) or None)


def copy_model_version(local: MlflowClient, server: MlflowClient, name_version: str, remote_run_id: str) -> str:
    """Register the local model version ``<name>/<version>`` on the server as a version of the same name logged by
    ``remote_run_id`` (once per run); returns the server's ``<name>/<version>``."""
    name, number = name_version.split("/", 1)
    version = local.get_model_version(name, number)
    found = server.search_model_versions(f"name = '{name}' and run_id = '{remote_run_id}'")
    existing = found[0] if found else None
    if existing is None:
        model = local.get_logged_model(version.model_id or version.source[len("models:/") :])
        experiment_id = server.get_run(remote_run_id).info.experiment_id
        copy = server.create_logged_model(experiment_id, model.name, remote_run_id, model.tags, model.params)
        server.log_model_artifacts(copy.model_id, _local_path(model.artifact_location))
        server.finalize_logged_model(copy.model_id, "READY")
        if not server.search_registered_models(f"name = '{name}'"):
            server.create_registered_model(name)
        existing = server.create_model_version(
            name, f"models:/{copy.model_id}", remote_run_id, version.tags, model_id=copy.model_id
        )
    return f"{name}/{existing.version}"


class RunMirror:
    """Copies one run to a server every ``interval`` seconds in a background thread, and a last time at the end."""

    def __init__(self, local_uri: str, server_uri: str, run_id: str, interval: float = 30.0):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.local, self.server = MlflowClient(local_uri), MlflowClient(server_uri)
        self.local_uri, self.server_uri, self.run_id, self.interval = local_uri, server_uri, run_id, interval
        self.failing, self.server_run_id, self.link = False, None, ""
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._repeat, name="mlflow-mirror", daemon=True)

    def start(self) -> RunMirror:
        self._thread.start()
        return self

    def _repeat(self) -> None:
        while not self._stop.wait(self.interval):
            self.copy()

    def copy(self) -> bool:
        """One copy; a failure is logged once per outage (the run goes on in the local store)."""
        with self._lock:
            try:
                self.server_run_id = copy_run(self.local, self.server, self.run_id)
                experiment_id = self.server.get_run(self.server_run_id).info.experiment_id
                self.link = (
                    f"{self.server_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.server_run_id}"
                    "/model-metrics?workflowType=machine_learning"
                )  # the UI's training view of the run
            except Exception as error:  # noqa: BLE001 - whatever the server does, the workflow goes on
                if not self.failing:
                    message = " ".join(str(error).split())[:200]
                    logger.warning(
                        f"copying MLflow run {self.run_id} to {self.server_uri} failed ({type(error).__name__}: "
                        f"{message}); the run goes on in the local store {self.local_uri} and is copied again later"
                    )
                self.failing = True
                return False
            if self.failing:
                logger.info(f"MLflow run {self.run_id} copied to {self.server_uri} again")
            self.failing = False
            return True

    def finish(self, wait: float = 30.0) -> bool:
        """Stop the repeats and copy the run a last time once the server answers (waiting up to ``wait`` s for a
        server that refuses connections, not for a hung one); if it does not, a warning says how to send the run
        later. Returns whether the server holds the whole run."""
        self._stop.set()
        if server_answers(self.server_uri, wait) and self.copy():
            logger.info(f"MLflow run {self.run_id} copied to {self.server_uri}: {self.link}")
            return True
        logger.warning(
            f"MLflow run {self.run_id} is complete in the local store {self.local_uri} but not on the server "
            f"{self.server_uri}; send it when the server is back with (from the bundle folder): python -m "
            f"scripts.mlflow_mirror --from {self.local_uri} --to {self.server_uri} --run-id {self.run_id}"
        )
        return False


def main(argv: list[str] | None = None) -> int:
    """Copy runs from a local store to a server: ``--from <local store> --to <server> --run-id <id> [<id> ...]``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--from", dest="local_uri", required=True, help="local store, e.g. sqlite:///runs/mlruns.db")
    parser.add_argument("--to", dest="server_uri", required=True, help="tracking server, e.g. http://host:5000")
    parser.add_argument("--run-id", nargs="+", required=True, help="local run ids")
    args = parser.parse_args(argv)
    local, server = MlflowClient(args.local_uri), MlflowClient(args.server_uri)
    for run_id in args.run_id:
        print(f"run {run_id}: on {args.server_uri} as {copy_run(local, server, run_id)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())

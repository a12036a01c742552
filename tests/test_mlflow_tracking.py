"""``--tracking mlflow`` for the training and evaluate workflows, checked against a real ``mlflow server``.

Every workflow runs as a subprocess on a tiny phantom dataset (4 training and 2 validation images, 64x64, one torch
thread). The server runs in its own process group and is always stopped.
"""

import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import phantoms
from conftest import BUNDLE, PHANTOM_IMAGE_SIZE, bundle_command, config_files

CONFIGS = BUNDLE / "configs"
EXPERIMENT = "cxr_lung_opacity"
TRAIN_IMAGES, BATCH_SIZE = 4, 2
ITERATIONS_PER_EPOCH = TRAIN_IMAGES // BATCH_SIZE
TINY = [
    "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]", "--batch_size", str(BATCH_SIZE),
    "--val_interval", "1", "--num_workers", "0", "--mlflow_overlay_interval", "1", "--mlflow_overlay_count", "2",
    "--initialize#1", "$torch.set_num_threads(1)",  # threads fighting over 2 busy cores make torch many times slower
    "--mlflow_mirror_interval", "2", "--mlflow_system_metrics_interval", "1",
]  # fmt: skip
WORKFLOW_TIMEOUT = 300
SEED_3 = ("--seed", "3")  # other weights than the other runs' (the server's versions are found by their weights)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a free local port with a SQLite store, in its own process group."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.process: subprocess.Popen | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 180) -> None:
        """Start (or restart, on the same port and store) the server."""
        self.folder.mkdir(parents=True, exist_ok=True)
        port = self.port
        executable = Path(sys.executable).with_name("mlflow")
        command = [str(executable)] if executable.exists() else [sys.executable, "-m", "mlflow"]
        command += [
            "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
        ]  # fmt: skip
        environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(
            command,
            cwd=self.folder,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not answer /health in time")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server's process group (``SIGKILL`` simulates a crash)."""
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=15)


@pytest.fixture(scope="module")
def server_pool(tmp_path_factory):
    """One server for the module, restarted when a test stopped it; always stopped at the end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(server_pool):
    if not server_pool.running:
        server_pool.start()
    return server_pool


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Phantom images and label maps (0 background, 1 clear lung, 2 opacity) with datalist.json."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_phantoms")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    items = []
    for index in range(TRAIN_IMAGES + 2):
        phantom = phantoms.make_phantom(96, 80, seed=100 + index, opacity=index % 2 == 0)
        Image.fromarray(np.rint(phantom.image * 255).astype(np.uint8)).save(root / "images" / f"p{index}.png")
        Image.fromarray(phantom.label_map()).save(root / "labels" / f"p{index}.png")
        items.append({"image": str(root / "images" / f"p{index}.png"), "label": f"labels/p{index}.png"})
    (root / "datalist.json").write_text(
        json.dumps({"training": items[:TRAIN_IMAGES], "validation": items[TRAIN_IMAGES:]})
    )
    clear = [item for index, item in enumerate(items) if index % 2]  # p1, p3, p5: no opacity
    training = [item for item in items if item not in clear[:2]]
    (root / "datalist_clear_validation.json").write_text(json.dumps({"training": training, "validation": clear[:2]}))
    return root


def run_workflow(arguments, cwd, env=None, on_line=None, timeout=WORKFLOW_TIMEOUT, bundle_root=None) -> tuple[int, str]:
    """Run ``python -m monai.bundle ...``; ``on_line(line)`` sees each output line as it comes. ``bundle_root``
    replaces the bundle's folder as the config's ``bundle_root`` (where the default MLflow store lies)."""
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    environment.update(env or {})
    command = bundle_command(*arguments)
    if bundle_root is not None:
        command[command.index("--bundle_root") + 1] = str(bundle_root)
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read():
        for line in process.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
    return process.returncode, "".join(lines)


def train(dataset: Path, output: Path, epochs: int, *extra: str, on_line=None, bundle_root=None) -> tuple[int, str]:
    """Tracked training; without ``bundle_root`` its local store is ``<output's parent>/local/mlruns.db`` (not the
    repository's)."""
    arguments = [
        "run", "training", "--config_file", config_files("training"), "--dataset_dir", str(dataset),
        "--output_dir", str(output), "--num_epochs", str(epochs), *TINY, "--tracking", "mlflow", *extra,
    ]  # fmt: skip
    if bundle_root is None:
        arguments += ["--local_tracking_uri", local_store_of(output.parent)]
    return run_workflow(arguments, cwd=output.parent, on_line=on_line, bundle_root=bundle_root)


def local_store_of(folder: Path) -> str:
    return f"sqlite:///{folder / 'local' / 'mlruns.db'}"


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """Every file artifact of a run, recursively."""
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return found


def only_run(client: MlflowClient, run_name: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r}"
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, [run.info.run_name for run in runs]
    return runs[0]


@pytest.fixture(scope="module")
def local_training(tiny_dataset, tmp_path_factory):
    """A 2-epoch training tracked to the default store (no URI given) of a bundle root of its own (so that the
    repository's store is left alone): returns its output folder, whose parent is that bundle root."""
    bundle_root = tmp_path_factory.mktemp("local_store")
    output = bundle_root / "run"
    code, log = train(tiny_dataset, output, 2, bundle_root=bundle_root)
    assert code == 0, log[-4000:]
    return output


def test_training_is_tracked_on_a_server(mlflow_server, tiny_dataset, tmp_path):
    epochs = 2
    code, log = train(
        tiny_dataset, tmp_path / "run", epochs, "--tracking_uri", mlflow_server.url, "--run_name", "server_run"
    )
    assert code == 0, log[-4000:]
    assert "MLflow tracking failed" not in log

    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = only_run(client, "server_run")
    assert run.info.status == "FINISHED"
    assert client.get_experiment_by_name(EXPERIMENT).tags["mlflow.experimentKind"] == "custom_model_development"

    config = {
        **yaml.safe_load((CONFIGS / "common.yaml").read_text()),
        **yaml.safe_load((CONFIGS / "train.yaml").read_text()),
    }
    params = run.data.params
    expected = {
        "learning_rate": config["learning_rate"], "seed": config["seed"], "dice_weight": config["dice_weight"],
        "synthetic_opacity_prob": config["synthetic_opacity_prob"], "rand_prob": config["rand_prob"],
        "encoder": config["network_def"]["backbone"], "network": config["network_def"]["_target_"],
        "loss": config["loss"]["_target_"], "weight_decay": config["optimizer"]["weight_decay"],
        "batch_size": BATCH_SIZE, "max_epochs": epochs, "val_interval": 1,
        "image_size": [PHANTOM_IMAGE_SIZE, PHANTOM_IMAGE_SIZE],
        "datalist": str(tiny_dataset / "datalist.json"),
        "datalist_sha256": hashlib.sha256((tiny_dataset / "datalist.json").read_bytes()).hexdigest(),
        "num_training": TRAIN_IMAGES, "num_validation": 2,
    }  # fmt: skip
    assert {key: params.get(key) for key in expected} == {key: str(value) for key, value in expected.items()}

    for name in ("train_loss", "lr_group_0"):  # per iteration (MONAI's handler)
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(point.step for point in history) == list(range(1, epochs * ITERATIONS_PER_EPOCH + 1)), name
    validation_figures = ("val_lung_dice", "val_opacity_dice", "val_selection_score", "best_val_selection_score")
    for name in ("train_loss_epoch", *validation_figures):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(point.step for point in history) == list(range(1, epochs + 1)), name
    assert run.data.metrics["best_epoch"] in range(1, epochs + 1)

    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert run.data.tags["bundle_version"] == metadata["version"]
    commit = subprocess.run(["git", "-C", str(BUNDLE), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        assert run.data.tags["git_commit"] == commit.stdout.strip()

    artifacts = artifact_paths(client, run.info.run_id)
    configs = [path for path in artifacts if re.fullmatch(r"config_\d{8}_\d{6}\.json", path)]
    assert len(configs) == 1, artifacts
    executed = json.loads(Path(client.download_artifacts(run.info.run_id, configs[0], str(tmp_path))).read_text())
    assert str(executed["num_epochs"]) == str(epochs)
    assert {f"overlays/epoch_{epoch:04d}/p{index}.png" for epoch in (1, 2) for index in (4, 5)} <= set(artifacts)
    assert {"checkpoints/model.pt", "logs/log.txt"} <= set(artifacts)
    # the server's copy of the registered model, and the local store's run it was copied from
    version = registered_version(client, tmp_path / "run" / "model.pt")
    assert version.run_id == run.info.run_id
    assert run.data.tags["registered_model"] == f"cxr_lung_opacity/{version.version}"
    local = only_run(MlflowClient(local_store_of(tmp_path)), "server_run")
    assert run.data.tags["mirror.source_run_id"] == local.info.run_id


def test_default_store_is_one_sqlite_database_for_every_run(local_training, tiny_dataset):
    """Without a URI, runs land in <bundle_root>/runs/mlruns.db (artifacts beside it): a second run joins the first."""
    bundle_root = local_training.parent
    # another seed: its weights differ from the first run's (the registry tests find versions by weights); no
    # validation image with opacity: its opacity Dice is undefined, not 0
    datalist = str(tiny_dataset / "datalist_clear_validation.json")
    code, log = train(
        tiny_dataset, bundle_root / "second_run", 1, "--seed", "1", "--datalist", datalist, bundle_root=bundle_root
    )
    assert code == 0, log[-4000:]
    database = bundle_root / "runs" / "mlruns.db"
    assert database.is_file() and not (local_training / "mlruns.db").exists()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{database}")
    try:
        runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")
    finally:
        mlflow.set_tracking_uri(previous)
    assert len(runs) == 2
    for run in runs:
        assert re.fullmatch(r"train_\d{8}_\d{6}", run.info.run_name), run.info.run_name
        assert {"train_loss", "train_loss_epoch", "val_lung_dice", "lr_group_0"} <= set(run.data.metrics)
        assert "learning_rate" not in run.data.metrics and "num_epochs" not in run.data.params  # MONAI logs them
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert sorted(run.data.params["max_epochs"] for run in runs) == ["1", "2"]
    undefined = {run.data.params["max_epochs"]: run.data.metrics.get("val_opacity_dice") for run in runs}
    assert math.isfinite(undefined["2"]) and (undefined["1"] is None or math.isnan(undefined["1"])), undefined
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    inputs = client.get_run(runs[0].info.run_id).inputs.dataset_inputs  # the datalist's splits
    rows = {item.tags[0].value: json.loads(item.dataset.profile)["num_rows"] for item in inputs}
    assert rows == {"training": TRAIN_IMAGES, "validation": 2} and all(item.dataset.digest for item in inputs)
    assert (bundle_root / "runs" / "mlruns").is_dir()  # the artifacts sit next to the database
    assert list((bundle_root / "runs" / "mlruns").rglob("config_*.json"))
    assert list(local_training.glob("config_*.json")) and (local_training / "model.pt").is_file()


def test_evaluate_is_tracked(mlflow_server, local_training, tiny_dataset, tmp_path):
    output = tmp_path / "evaluate"
    arguments = [
        "run", "--config_file", config_files("evaluate"),
        "--dataset_dir", str(tiny_dataset), "--output_dir", str(output),
        "--ckpt_path", str(local_training / "model.pt"),
        "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]", "--initialize#0", "$torch.set_num_threads(1)",
        "--tracking", "mlflow", "--local_tracking_uri", local_store_of(tmp_path),
    ]  # fmt: skip
    code, log = run_workflow(arguments, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert code == 0, log[-4000:]
    assert not (output / "mlruns.db").exists()  # MLFLOW_TRACKING_URI wins over the default store

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = [run for run in client.search_runs([experiment.experiment_id]) if run.info.run_name.startswith("evaluate_")]
    assert len(runs) == 1
    run = runs[0]
    assert re.fullmatch(r"evaluate_\d{8}_\d{6}", run.info.run_name)
    summary = json.loads((output / "metrics_summary.json").read_text())
    assert run.data.metrics["images"] == 2
    assert run.data.metrics["lung_dice_mean"] == pytest.approx(summary["lung_dice"]["mean"])
    assert run.data.metrics["lung_dice_median"] == pytest.approx(summary["lung_dice"]["median"])
    assert "opacity_dice_mean" in run.data.metrics or summary["opacity_dice"]["mean"] is None
    assert run.data.params["ckpt_path"] == str(local_training / "model.pt")
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"metrics.csv", "metrics_summary.json", "severity.csv"} <= set(artifacts)
    assert any(path.startswith("config_") for path in artifacts)


def test_a_server_killed_and_restarted_gets_every_value_and_the_run_finishes(mlflow_server, tiny_dataset, tmp_path):
    """The server is killed once epoch 1 ends and restarted at once (same port and store; it takes seconds to come
    up): afterwards it holds every iteration's loss and every epoch's figures, and the run is FINISHED."""
    epochs = 5
    killed = threading.Event()

    def outage(line: str) -> None:
        if not killed.is_set() and "SupervisedTrainer - INFO - Epoch[1] Complete" in line:
            mlflow_server.stop(signal.SIGKILL)
            killed.set()
            threading.Thread(target=mlflow_server.start, daemon=True).start()

    code, log = train(
        tiny_dataset, tmp_path / "run", epochs, "--tracking_uri", mlflow_server.url, "--run_name", "outage",
        on_line=outage,
    )  # fmt: skip
    assert killed.is_set(), log[-4000:]
    assert code == 0, log[-4000:]
    assert f"to {mlflow_server.url} failed" in log
    assert (tmp_path / "run" / f"checkpoint_epoch={epochs}.pt").is_file()

    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = only_run(client, "outage")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(point.step for point in history) == list(range(1, epochs * ITERATIONS_PER_EPOCH + 1))
    for name in ("train_loss_epoch", "val_lung_dice", "val_selection_score", "best_val_selection_score"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(point.step for point in history) == list(range(1, epochs + 1)), name


def test_a_hung_server_costs_training_under_10_seconds_and_loses_nothing(mlflow_server, tiny_dataset, tmp_path):
    """A server that accepts connections and never answers: training takes less than 10 s longer than with a local
    store, the run is complete in the local store, and sending it later gives the server the whole run."""
    started = time.monotonic()
    code, log = train(tiny_dataset, tmp_path / "baseline", 2, "--run_name", "baseline", *SEED_3)
    assert code == 0, log[-4000:]
    baseline = time.monotonic() - started

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes the connections; nothing reads or answers
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        started = time.monotonic()
        code, log = train(tiny_dataset, tmp_path / "hung", 2, "--tracking_uri", url, "--run_name", "hung", *SEED_3)
        elapsed = time.monotonic() - started
    assert code == 0, log[-4000:]
    assert elapsed - baseline < 10, (elapsed, baseline)
    assert "python -m scripts.mlflow_mirror" in log  # how to send the run later

    local = MlflowClient(local_store_of(tmp_path))
    run = only_run(local, "hung")
    assert run.info.status == "FINISHED"
    command = [
        sys.executable, "-m", "scripts.mlflow_mirror", "--from", local_store_of(tmp_path), "--to", mlflow_server.url,
        "--run-id", run.info.run_id,
    ]  # fmt: skip
    sent = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr[-3000:]
    server = MlflowClient(mlflow_server.url)
    copy = only_run(server, "hung")
    assert copy.info.status == "FINISHED"
    assert set(copy.data.metrics) == set(run.data.metrics)
    for name in ("train_loss", "val_selection_score", "system/cpu_utilization_percentage"):
        assert len(server.get_metric_history(copy.info.run_id, name)) == len(
            local.get_metric_history(run.info.run_id, name)
        )
    assert copy.data.params == run.data.params
    assert set(artifact_paths(server, copy.info.run_id)) == set(artifact_paths(local, run.info.run_id))
    assert registered_version(server, tmp_path / "hung" / "model.pt").run_id == copy.info.run_id


def registered_version(client: MlflowClient, weights: Path):
    """The one registered version of ``weights`` (found by the sha256 tag every version carries)."""
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    versions = client.search_model_versions(f"name = 'cxr_lung_opacity' and tags.weights_sha256 = '{sha256}'")
    assert len(versions) == 1
    return versions[0]


def local_store(training_output: Path) -> str:
    """The default store of a training run whose bundle root is its output folder's parent (``local_training``)."""
    return f"sqlite:///{training_output.parent / 'runs' / 'mlruns.db'}"


def test_training_registers_a_model_that_predicts_like_the_bundle(local_training, tiny_dataset):
    """The chosen checkpoint is an MLflow Model in the registry; pyfunc gives the bundle's class probabilities."""
    import torch
    from monai.bundle import ConfigParser

    client = MlflowClient(tracking_uri=local_store(local_training))
    version = registered_version(client, local_training / "model.pt")
    run = client.get_run(version.run_id)
    assert run.data.tags["registered_model"] == f"cxr_lung_opacity/{version.version}"
    assert run.info.run_name.startswith("train_")

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in ("common.yaml", "inference.yaml")])
    parser.update({"image_size": [PHANTOM_IMAGE_SIZE, PHANTOM_IMAGE_SIZE]})
    loading = [parser.get_parsed_content("load_radiograph"), *parser.get_parsed_content("network_input")]
    image = {"image": str(tiny_dataset / "images" / "p4.png")}
    for transform in loading:
        image = transform(image)
    batch = np.asarray(image["image"], dtype=np.float32)[None]
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(local_training / "model.pt", map_location="cpu", weights_only=True))
    with torch.no_grad():
        expected = torch.softmax(network.eval()(torch.from_numpy(batch)), dim=1).numpy()

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(local_store(local_training))
    try:
        model = mlflow.pyfunc.load_model(f"models:/cxr_lung_opacity/{version.version}")
    finally:
        mlflow.set_tracking_uri(previous)
    predicted = model.predict(batch)
    assert predicted.shape == (1, 3, PHANTOM_IMAGE_SIZE, PHANTOM_IMAGE_SIZE)
    assert np.abs(predicted - expected).max() < 1e-5


def test_evaluate_names_the_training_run_of_its_weights(local_training, tiny_dataset, tmp_path):
    output = tmp_path / "evaluate"
    arguments = [
        "run", "--config_file", config_files("evaluate"), "--dataset_dir", str(tiny_dataset),
        "--output_dir", str(output), "--ckpt_path", str(local_training / "model.pt"),
        "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]", "--initialize#0", "$torch.set_num_threads(1)",
        "--tracking", "mlflow",
    ]  # fmt: skip
    code, log = run_workflow(arguments, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": local_store(local_training)})
    assert code == 0, log[-4000:]
    client = MlflowClient(tracking_uri=local_store(local_training))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (evaluation,) = [
        run for run in client.search_runs([experiment.experiment_id]) if run.info.run_name.startswith("evaluate_")
    ]
    version = registered_version(client, local_training / "model.pt")
    assert evaluation.data.tags["training_run_id"] == version.run_id
    assert evaluation.data.tags["registered_model"] == f"cxr_lung_opacity/{version.version}"


def test_shipping_a_registered_version_writes_its_weights_and_tags_it(local_training, tmp_path):
    import torch
    from ship_model import main as ship_model

    store = local_store(local_training)
    client = MlflowClient(tracking_uri=store)
    version = registered_version(client, local_training / "model.pt")
    shipped = tmp_path / "models" / "model.pt"
    uri = f"models:/cxr_lung_opacity/{version.version}"
    assert ship_model(["--checkpoint", uri, "--tracking-uri", store, "--output", str(shipped), "--fp32"]) == 0
    trained = torch.load(local_training / "model.pt", map_location="cpu", weights_only=True)  # a plain state dict
    written = torch.load(shipped, map_location="cpu", weights_only=True)
    assert sorted(written) == sorted(trained)
    assert all(torch.equal(written[key], trained[key]) for key in trained)
    tags = client.get_model_version("cxr_lung_opacity", version.version).tags
    assert tags["shipped_weights_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_tracking_store_writes_locally_for_a_server_and_continues_the_unfinished_run_of_its_name(tmp_path, monkeypatch):
    """A server URI sends MONAI's handlers (through MLFLOW_TRACKING_URI) to the local store; a run of the same name
    is continued until it is FINISHED; an undefined figure (NaN) is not logged."""
    from scripts.mlflow_tracking import TrackingStore

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = f"sqlite:///{tmp_path / 'mlruns.db'}"
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused at once

    def store(run_name: str) -> TrackingStore:
        return TrackingStore(
            server, local, True, EXPERIMENT, run_name, str(tmp_path), mirror_interval=3600, final_wait=0
        )

    first = store("resumed")
    assert os.environ["MLFLOW_TRACKING_URI"] == local and first.server_uri == server
    run_id = first.open_run({"a": 1})
    first.log_metrics({"figure": math.nan, "loss": 0.5}, 1)
    first.finish()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    client = MlflowClient(local)
    assert client.get_run(run_id).data.metrics == {"loss": 0.5}
    assert client.get_experiment_by_name(EXPERIMENT).artifact_location == (tmp_path / "mlruns").as_uri()
    assert store("resumed").open_run() == run_id  # unfinished: continued, as MONAI's handler does
    client.set_terminated(run_id, "FINISHED")
    assert store("resumed").open_run() != run_id

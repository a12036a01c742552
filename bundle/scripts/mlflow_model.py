"""The trained network as an MLflow Model in the model registry, and the lineage of the weights a workflow uses.

:func:`log_registered_model` logs the chosen checkpoint as an MLflow PyTorch model that returns class probabilities
(softmax over background, lung, opacity) for images scaled as the bundle's preprocessing does, with its signature and
an input example, and registers it as a new version of a named model; ``mlflow.pyfunc.load_model(...).predict``
then gives what the bundle's network gives. :func:`model_version_of` finds the registered version of a weights file
by its sha256 (tagged on every version), so an evaluate run can name the training run behind the weights it
evaluates. :func:`datalist_inputs` describes a datalist's splits as MLflow dataset inputs (rows, digest, source).
"""

from __future__ import annotations

import copy
import json
import logging
import os

import numpy as np
import torch

from scripts.checkpoints import state_dict_of
from scripts.severity_calibration import file_sha256

logger = logging.getLogger(__name__)

REGISTERED_MODEL_NAME = "cxr_lung_opacity"
WEIGHTS_SHA256_TAG = "weights_sha256"  # the checkpoint the training run chose
SHIPPED_SHA256_TAG = "shipped_weights_sha256"  # the bundle's models/model.pt written from it (scripts/ship_model.py)


def probability_model(network: torch.nn.Module, weights_file: str) -> torch.nn.Module:
    """A copy of ``network`` (unwrapped from DistributedDataParallel) holding the weights of ``weights_file`` (a
    state dict or a CheckpointSaver file), followed by a softmax over the classes, on the CPU in float32, in eval
    mode."""
    state = state_dict_of(torch.load(weights_file, map_location="cpu", weights_only=True))
    network = copy.deepcopy(getattr(network, "module", network)).to("cpu").float()
    network.load_state_dict({key: value.float() for key, value in state.items()})
    return torch.nn.Sequential(network, torch.nn.Softmax(dim=1)).eval()


def model_signature(image_size, num_classes: int):
    """Input ``image`` (batch, 1, rows, columns) float32 scaled to 0-1; output (batch, classes, rows, columns)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    rows, columns = (int(size) for size in image_size)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, rows, columns))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, rows, columns))]),
    )


def log_registered_model(
    tracking_uri: str,
    run_id: str,
    network: torch.nn.Module,
    weights_file: str,
    image_size,
    num_classes: int,
    registered_model_name: str = REGISTERED_MODEL_NAME,
):
    """Log ``weights_file`` in ``network`` as the MLflow Model ``model`` of run ``run_id`` of the store at
    ``tracking_uri`` and register it there under ``registered_model_name``; returns the new model version."""
    import mlflow
    import monai

    mlflow.set_tracking_uri(tracking_uri)
    model = probability_model(network, weights_file)
    rows, columns = (int(size) for size in image_size)
    example = np.random.default_rng(0).random((1, 1, rows, columns), dtype=np.float32)
    sha256 = file_sha256(weights_file)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=model_signature(image_size, num_classes),
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}"],
            registered_model_name=registered_model_name,
            await_registration_for=60,
            serialization_format="pickle",  # torch.export cannot trace MONAI's type-A ResNet shortcut
        )
    version = info.registered_model_version
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    client.set_model_version_tag(registered_model_name, str(version), WEIGHTS_SHA256_TAG, sha256)
    logger.info(f"registered model {registered_model_name} version {version} (run {run_id}, weights {weights_file})")
    return client.get_model_version(registered_model_name, str(version))


def model_version_of(client, sha256: str, registered_model_name: str = REGISTERED_MODEL_NAME):
    """The version registered through ``client`` whose checkpoint or shipped weights have the hex ``sha256`` (the
    newest if several), or None."""
    versions = [
        version
        for tag in (WEIGHTS_SHA256_TAG, SHIPPED_SHA256_TAG)
        for version in client.search_model_versions(f"name = '{registered_model_name}' and tags.{tag} = '{sha256}'")
    ]
    return max(versions, key=lambda version: int(version.version), default=None)


def lineage_tags(client, sha256: str) -> dict:
    """``{"weights_sha256", "registered_model": "<name>/<version>", "training_run_id"}`` of the weights with the hex
    ``sha256`` in the store of ``client`` (the last two only when a registered version holds those weights)."""
    tags = {WEIGHTS_SHA256_TAG: sha256}
    version = model_version_of(client, sha256)
    if version is not None:
        tags.update(registered_model=f"{version.name}/{version.version}", training_run_id=version.run_id)
    return tags


def registered_weights(model_uri: str, tracking_uri: str | None = None) -> dict:
    """The network weights (state dict) of a registered model version, e.g. ``models:/cxr_lung_opacity/3``."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    return model[0].state_dict()


def tag_shipped_weights(model_uri: str, shipped_file: str, tracking_uri: str | None = None) -> None:
    """Tag the registered version ``models:/<name>/<version>`` with the sha256 of the weights shipped from it."""
    import mlflow

    name, version = model_uri[len("models:/") :].split("/", 1)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    client.set_model_version_tag(name, version, SHIPPED_SHA256_TAG, file_sha256(shipped_file))


def datalist_inputs(datalist: str) -> list:
    """One MLflow dataset input per split of a ``datalist.json`` (its rows as a table: digest, row count, source the
    file), with the split's name as the input's context."""
    import mlflow.data
    import pandas
    from mlflow.entities import DatasetInput, InputTag

    with open(datalist, encoding="utf-8") as handle:
        content = json.load(handle)
    name = os.path.basename(os.path.dirname(os.path.abspath(datalist))) or "datalist"
    inputs = []
    for split, items in content.items():
        if isinstance(items, list) and items:
            table = pandas.DataFrame([{key: str(value) for key, value in item.items()} for item in items])
            dataset = mlflow.data.from_pandas(table, source=os.path.abspath(datalist), name=f"{name}/{split}")
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", split)]))
    return inputs

"""A real MONAI Label server (the bundle's app, scripts/monailabel_app.py) serving the bundle, driven over HTTP.

The server runs in the MONAI Label environment (.venv-monailabel, made by scripts/install_monailabel.sh) as a
subprocess of scripts/serve_monailabel.py, on a free loopback port, with 3 phantom radiographs as studies and the
phantom model (64x64) as weights. Without that environment the test is skipped with that reason; in CI (CI=true) it
fails instead, so it cannot silently stop running there.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import serve_monailabel
from PIL import Image

import phantoms
from conftest import PHANTOM_IMAGE_SIZE

MODEL = serve_monailabel.MODEL_NAME
ROWS, COLUMNS = 200, 240  # not square, so a transposed mask cannot pass for an aligned one
TRAIN_TIMEOUT_S = 600
DICOM_TWIN = ("cxr_0_dicom", "cxr_0")  # a DICOM study and the PNG study with the same 8-bit pixels


@dataclass
class Studies:
    folder: Path
    phantoms: dict  # image id -> phantoms.Phantom


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(
    url: str,
    method: str = "GET",
    fields: dict | None = None,
    files: dict | None = None,
    body: dict | None = None,
    timeout: float = 300,
) -> bytes:
    """HTTP request with form ``fields`` and ``files`` ({name: (file name, bytes)}) as multipart, or a JSON body."""
    headers, data = {}, None
    if fields or files:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (fields or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, (filename, content) in (files or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")  # fmt: skip
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data, headers, method=method), timeout=timeout
        ) as reply:
            return reply.read()
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{method} {url} -> {error.code}: {error.read()[:2000]!r}") from error


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def monailabel_environment() -> Path:
    if not serve_monailabel.MONAILABEL_PYTHON.is_file():
        message = (f"{serve_monailabel.MONAILABEL_PYTHON} is missing: the MONAI Label test needs its environment "
                   "(bash scripts/install_monailabel.sh)")  # fmt: skip
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return serve_monailabel.MONAILABEL_PYTHON


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Studies:
    """3 phantom radiographs (PNG, 200 x 240, seeds unseen by the phantom model) as the server's studies, and a DICOM
    file holding the pixels of the first (``DICOM_TWIN``)."""
    folder = tmp_path_factory.mktemp("monailabel_studies")
    cases = {}
    for index in range(3):
        phantom = phantoms.make_phantom(ROWS, COLUMNS, seed=90_000 + index)
        phantoms.write_png(folder / f"cxr_{index}.png", phantom.image)
        cases[f"cxr_{index}"] = phantom
    phantoms.write_dicom(folder / f"{DICOM_TWIN[0]}.dcm", cases[DICOM_TWIN[1]].image, bits=8)
    return Studies(folder, cases)


@pytest.fixture(scope="module")
def server(monailabel_environment, phantom_model, studies, tmp_path_factory):
    """A MONAI Label server serving the phantom model at 64x64; always stopped, whatever the tests do."""
    workdir = tmp_path_factory.mktemp("monailabel_server")
    started = serve_monailabel.start_server(
        studies.folder, free_port(), workdir=workdir, weights=phantom_model,
        overrides={"image_size": [PHANTOM_IMAGE_SIZE, PHANTOM_IMAGE_SIZE]}, python=monailabel_environment,
    )  # fmt: skip
    try:
        yield started
    finally:
        serve_monailabel.stop_server(started)
        assert started.process.poll() is not None


def infer_mask(server, image_id: str) -> np.ndarray:
    reply = request(f"{server.url}/infer/{MODEL}?image={image_id}&output=image", method="POST", fields={"params": "{}"})
    with Image.open(io.BytesIO(reply)) as mask:
        return np.asarray(mask)


def save_label(server, image_id: str, label: np.ndarray) -> None:
    """Save a final label (the bundle's encoding: 0 background, 1 lung, 2 opacity) for a study, as a client does."""
    saved = json.loads(
        request(
            f"{server.url}/datastore/label?image={image_id}&tag=final",
            method="PUT",
            fields={"params": "{}"},
            files={"label": (f"{image_id}.png", png_bytes(label))},
        )
    )
    assert saved["image"] == image_id


def train_round(server, settings: dict) -> dict:
    """``POST /train/<model>`` with ``settings`` and wait until the round is DONE; returns the task."""
    request(f"{server.url}/train/{MODEL}", method="POST", body=settings)
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        task = json.loads(request(f"{server.url}/train/"))
        if task.get("status") not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(2)
    assert task.get("status") == "DONE", f"round not done: {task}\n{serve_monailabel.log_tail(server.log_file)}"
    return task


def test_info_lists_the_model_and_its_labels(server, studies):
    info = json.loads(request(f"{server.url}/info/"))
    assert MODEL in info["models"], info["models"].keys()
    assert info["models"][MODEL]["labels"] == {"lung": 1, "opacity": 2}
    assert info["labels"] == ["lung", "opacity"]
    assert MODEL in info["trainers"]
    assert info["datastore"]["total"] == len(studies.phantoms) + 1  # and the DICOM study


def test_a_dicom_study_is_inferred_like_the_png_of_its_pixels(server, studies):
    """MONAI Label's environment has pydicom 2: the bundle's reader works there too."""
    dicom_mask, png_mask = (infer_mask(server, image_id) for image_id in DICOM_TWIN)
    assert dicom_mask.shape == (ROWS, COLUMNS) and (dicom_mask > 0).any()
    assert np.array_equal(dicom_mask, png_mask)


def test_infer_returns_a_lung_mask_aligned_with_the_radiograph(server, studies):
    for image_id, phantom in studies.phantoms.items():
        mask = infer_mask(server, image_id)
        assert mask.shape == (ROWS, COLUMNS), f"{image_id}: mask {mask.shape} vs radiograph {(ROWS, COLUMNS)}"
        assert set(np.unique(mask)) <= {0, 1, 2}
        lung_dice = dice(mask > 0, phantom.lung)
        print(f"{image_id}: lung Dice {lung_dice:.3f}")
        assert lung_dice >= 0.8, f"{image_id}: lung Dice {lung_dice:.3f}"
        assert not (mask[phantom.marker] > 0).any()  # the top-left marker stays background: no flip or transpose


def test_saved_labels_train_a_checkpoint_that_the_publish_gate_serves_or_refuses(server, studies):
    labelled = list(studies.phantoms)[:2]
    for image_id in labelled:
        save_label(server, image_id, studies.phantoms[image_id].label_map())
    datastore = json.loads(request(f"{server.url}/datastore/?output=stats"))
    assert datastore["completed"] == len(labelled), datastore

    served_weights = server.served_bundle / "models" / "model.pt"
    weights_before = served_weights.stat().st_mtime_ns
    train_round(server, {"max_epochs": 1, "val_split": 0.5})

    runs = list((server.served_bundle / "runs").glob("*/log.txt"))  # a served round keeps its log, no checkpoints
    assert runs, f"no run under {server.served_bundle / 'runs'}"
    # the publish gate decided: new weights served, or the served ones kept, saying why
    record = json.loads((server.served_bundle / "models" / "publish_record.json").read_text())
    assert record["decision"] in ("published", "kept") and record["reason"], record
    replaced = served_weights.stat().st_mtime_ns > weights_before
    assert replaced == (record["decision"] == "published"), record
    for image_id in labelled:
        mask = infer_mask(server, image_id)  # the server reloads the new weights
        assert mask.shape == (ROWS, COLUMNS)


# ------------------------------------------------------------ the bundle's MONAI Label pieces, without a server


def test_monailabel_mask_is_transposed_uint8_and_png_for_jpeg_studies():
    import torch
    from monai.data import MetaTensor

    from scripts.monailabel_output import MonaiLabelMaskd

    classes = torch.zeros(1, 3, 5)
    classes[0, 0, 4] = 2  # row 0, column 4
    image = MetaTensor(torch.zeros(1, 3, 5), meta={"filename_or_obj": "a.jpg", "error": ""})
    out = MonaiLabelMaskd(keys="pred")({"pred": classes, "image": image, "image_path": "/studies/a.jpg"})
    assert out["pred"].shape == (5, 3) and out["pred"].dtype == np.uint8 and out["pred"][4, 0] == 2
    assert out["result_extension"] == ".png"  # never a lossy JPEG mask
    png = MonaiLabelMaskd(keys="pred")({"pred": classes, "image": image, "image_path": "/studies/a.png"})
    assert "result_extension" not in png
    asked = MonaiLabelMaskd(keys="pred")({"pred": classes, "image": image, "result_extension": ".nii.gz"})
    assert asked["result_extension"] == ".nii.gz"


def test_monailabel_mask_reports_an_unreadable_image():
    import torch
    from monai.data import MetaTensor

    from scripts.monailabel_output import MonaiLabelMaskd

    image = MetaTensor(torch.zeros(1, 32, 32), meta={"filename_or_obj": "/studies/bad.png", "error": "not an image"})
    with pytest.raises(ValueError, match="bad.png: not an image"):
        MonaiLabelMaskd(keys="pred")({"pred": torch.zeros(1, 32, 32), "image": image})


def test_publish_weights_writes_the_last_weights_or_the_best_checkpoint(tmp_path):
    import torch
    from ignite.engine import Engine

    from scripts.checkpoints import PublishWeights

    network = torch.nn.Linear(2, 1)
    target = tmp_path / "served" / "model.pt"
    engine = Engine(lambda engine, batch: None)
    PublishWeights(str(target), network, best_checkpoint=str(tmp_path / "missing.pt")).attach(engine)
    PublishWeights(None, network).attach(engine)  # no path: nothing happens
    engine.run([0], max_epochs=1)
    assert torch.equal(torch.load(target)["weight"], network.weight.detach())

    best = tmp_path / "run" / "model.pt"
    best.parent.mkdir()
    engine = Engine(lambda engine, batch: torch.save({"weight": torch.ones(1, 2), "bias": torch.ones(1)}, best))
    PublishWeights(str(target), network, best_checkpoint=str(best)).attach(engine)
    engine.run([0], max_epochs=1)
    assert torch.equal(torch.load(target)["weight"], torch.ones(1, 2))


def test_served_configs_merge_the_bundle_configs_and_override_only_known_keys(tmp_path):
    """MONAI Label reads inference.yaml and train.yaml alone: they are served merged with common.yaml."""
    import yaml
    from monai.bundle import ConfigParser

    serve_monailabel.write_served_configs(serve_monailabel.BUNDLE, tmp_path / "configs", {"image_size": [64, 64]})
    assert (tmp_path / "configs" / "metadata.json").is_symlink()
    for name, workflow in serve_monailabel.SERVED_CONFIGS.items():
        served = yaml.safe_load((tmp_path / "configs" / name).read_text())
        assert served["image_size"] == [64, 64] and served["network_def"]["backbone"] == "resnet18"
        merged = ConfigParser()
        merged.read_config([str(serve_monailabel.BUNDLE / "configs" / config) for config in workflow])
        parsed = ConfigParser(served)  # the served file alone defines everything the merged files define
        assert sorted(parsed.get()) == sorted(key for key in merged.get() if key != "_meta_")
    served_inference = yaml.safe_load((tmp_path / "configs" / "inference.yaml").read_text())
    assert served_inference["load_radiograph"]["record_errors"] is True  # inference.yaml's ``#`` override applied
    with pytest.raises(ValueError, match="no_such_key"):
        serve_monailabel.write_served_configs(serve_monailabel.BUNDLE, tmp_path / "again", {"no_such_key": 1})
    assert serve_monailabel.parse_override("image_size=[64,64]") == ("image_size", [64, 64])
    with pytest.raises(ValueError):
        serve_monailabel.parse_override("image_size")

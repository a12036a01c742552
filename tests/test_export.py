"""TorchScript (``monai.bundle ckpt_export``) and ONNX (scripts/export_onnx.py) exports of the shipped weights give
PyTorch's logits on a preprocessed sample radiograph, a phantom and random noise."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE, bundle_image_size, config_paths, run_bundle

SHIPPED_WEIGHTS = BUNDLE / "models" / "model.pt"
SAMPLE_RADIOGRAPH = BUNDLE / "docs" / "samples" / "7afaaccc.jpg"
TOLERANCE = 1e-3  # max abs logit difference
SIZE = bundle_image_size()  # the network input size of the shipped weights


def inference_parser() -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_paths("inference"))
    return parser


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(3, 1, SIZE, SIZE): a sample radiograph through the bundle's preprocessing, a phantom, uniform noise."""
    import phantoms

    radiograph = inference_parser().get_parsed_content("preprocessing")({"image": str(SAMPLE_RADIOGRAPH)})["image"]
    phantom = torch.from_numpy(phantoms.make_phantom(rows=SIZE, columns=SIZE, seed=3).image)[None]
    noise = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return torch.stack([torch.from_numpy(np.asarray(radiograph, dtype=np.float32)), phantom, noise])


@pytest.fixture(scope="module")
def pytorch_logits(images) -> np.ndarray:
    """The logits of the config's ``network_def`` holding the shipped (fp16) weights."""
    network = inference_parser().get_parsed_content("network_def")
    network.load_state_dict(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    with torch.no_grad():
        return network.eval()(images).numpy()


def test_ckpt_export_writes_a_torchscript_model_with_the_pytorch_outputs(images, pytorch_logits, tmp_path, monkeypatch):
    """``ckpt_export --net_id traceable_network_def`` scripts the network; its logits equal PyTorch's."""
    configs = config_paths("inference")
    # ckpt_export, unlike `run`, does not put the bundle folder on sys.path: from the repository root it must be there
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(BUNDLE), os.environ.get("PYTHONPATH")])))
    result = run_bundle(
        "ckpt_export", "--net_id", "traceable_network_def", "--config_file", str(configs),
        "--ckpt_file", str(SHIPPED_WEIGHTS), "--filepath", str(tmp_path / "model.ts"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    extra_files = {"metadata.json": "", **{Path(config).stem + ".json": "" for config in configs}}
    model = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra_files)  # the configs travel with it
    assert b'"version"' in extra_files["metadata.json"] and all(extra_files.values())
    with torch.no_grad():
        exported = model(images).numpy()
    assert exported.shape == (3, 3, SIZE, SIZE)
    assert np.abs(exported - pytorch_logits).max(axis=(1, 2, 3)).tolist() == pytest.approx([0, 0, 0], abs=TOLERANCE)


def test_export_onnx_script_writes_a_model_with_the_pytorch_outputs(images, pytorch_logits, tmp_path):
    """scripts/export_onnx.py (network and, by default, size from the bundle config) writes ONNX whose ONNX Runtime
    logits equal PyTorch's."""
    import export_onnx
    import onnxruntime

    path = tmp_path / "model.onnx"
    assert export_onnx.main(["--checkpoint", str(SHIPPED_WEIGHTS), "--output", str(path)]) == 0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = np.concatenate([session.run(["logits"], {"image": image[None].numpy()})[0] for image in images])
    assert exported.shape == (3, 3, SIZE, SIZE)
    assert np.abs(exported - pytorch_logits).max(axis=(1, 2, 3)).tolist() == pytest.approx([0, 0, 0], abs=TOLERANCE)

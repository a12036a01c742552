"""The ONNX export kept on disk between runs: read back for the same weights, never for other weights."""

import logging

import numpy as np
import pytest
import torch
from monai.networks.nets import FlexibleUNet

from scripts import onnx_cache
from scripts.onnx_runtime import OnnxRuntimeNetwork

SHAPE = (1, 64, 64)


def network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FlexibleUNet(spatial_dims=2, in_channels=1, out_channels=3, backbone="resnet18", pretrained=False).eval()


def logits(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(images).numpy()


IMAGES = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(0))


def assert_same_logits(onnx_logits: np.ndarray, torch_logits: np.ndarray) -> None:
    assert np.abs(onnx_logits - torch_logits).max() < 1e-3 * np.abs(torch_logits).max()


def test_a_second_run_of_the_same_weights_reads_the_export(tmp_path, caplog):
    first = network(0)
    expected = logits(first, IMAGES)
    assert_same_logits(logits(OnnxRuntimeNetwork(first, cache_dir=str(tmp_path)), IMAGES), expected)
    exports = list(tmp_path.glob("network_*_1x64x64.onnx"))
    assert len(exports) == 1

    second = network(0)  # a new process would build the network and load the same weights
    with caplog.at_level(logging.INFO, logger="scripts.onnx_cache"):
        assert_same_logits(logits(OnnxRuntimeNetwork(second, cache_dir=str(tmp_path)), IMAGES), expected)
    assert f"read from {exports[0]}" in caplog.text
    assert list(tmp_path.glob("network_*.onnx")) == exports


def test_other_weights_never_use_an_export_of_the_old_ones(tmp_path):
    old = network(0)
    logits(OnnxRuntimeNetwork(old, cache_dir=str(tmp_path)), IMAGES)
    new = network(0)
    with torch.no_grad():
        next(new.parameters()).view(-1)[0] += 1.0  # one weight changed, as fine-tuning does
    assert_same_logits(logits(OnnxRuntimeNetwork(new, cache_dir=str(tmp_path)), IMAGES), logits(new, IMAGES))
    assert len(list(tmp_path.glob("network_*.onnx"))) == 2


def test_an_unreadable_export_is_made_again_and_replaced(tmp_path, caplog):
    model = network(1)
    logits(OnnxRuntimeNetwork(model, cache_dir=str(tmp_path)), IMAGES)
    (export,) = tmp_path.glob("network_*.onnx")
    export.write_bytes(b"not an onnx model")
    with caplog.at_level(logging.WARNING):
        assert_same_logits(logits(OnnxRuntimeNetwork(model, cache_dir=str(tmp_path)), IMAGES), logits(model, IMAGES))
    assert "unreadable" in caplog.text
    assert export.stat().st_size > 1_000_000  # the good export is back


def test_a_cache_folder_that_cannot_be_written_costs_only_a_warning(tmp_path, caplog):
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    model = network(2)
    with caplog.at_level(logging.WARNING):
        assert_same_logits(logits(OnnxRuntimeNetwork(model, cache_dir=str(blocked)), IMAGES), logits(model, IMAGES))
    assert "cannot be written" in caplog.text and str(blocked) in caplog.text


def test_only_the_most_recently_used_exports_are_kept(tmp_path):
    model = network(3)
    shapes = [(1, size, size) for size in (32, 48, 64, 80)]
    for shape in shapes:
        onnx_cache.cached_export(str(tmp_path), model, shape, 17, lambda: b"model bytes")
    kept = sorted(path.name.rsplit("_", 1)[1] for path in tmp_path.glob("network_*.onnx"))
    assert len(kept) == onnx_cache.KEEP == 3
    assert "1x32x32.onnx" not in kept  # the oldest went


@pytest.mark.parametrize("shape", [(1, 64, 64), (1, 64, 96)])
def test_the_key_follows_the_weights_and_the_shape(shape):
    same = onnx_cache.export_key(network(0), shape, 17) == onnx_cache.export_key(network(0), shape, 17)
    assert same
    assert onnx_cache.export_key(network(0), shape, 17) != onnx_cache.export_key(network(1), shape, 17)
    assert onnx_cache.export_key(network(0), shape, 17) != onnx_cache.export_key(network(0), (1, 128, 128), 17)


def test_an_empty_cache_setting_keeps_nothing(tmp_path, monkeypatch):
    """``--onnx_cache_dir ""`` (the command line drops None): the export is made in memory and written nowhere."""
    from scripts.onnx_runtime import for_runtime

    monkeypatch.chdir(tmp_path)
    model = network(4)
    wrapped = for_runtime(model, "onnxruntime", "")
    assert_same_logits(logits(wrapped, IMAGES), logits(model, IMAGES))
    assert wrapped.cache_dir is None and not list(tmp_path.rglob("*.onnx"))

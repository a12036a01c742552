"""Run the bundle's network with ONNX Runtime: on a CPU it is faster than PyTorch and gives the same outputs.

:class:`OnnxRuntimeNetwork` wraps the PyTorch network. On its first call it exports the network as it is then (with
the weights the checkpoint loader has put in it) to ONNX and opens an ONNX Runtime session; every call runs that
session. With a cache folder the export is kept there and read by the next run of the same weights
(:mod:`scripts.onnx_cache`). :func:`export_onnx` writes the same model to a file for other tools.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from scripts.traceable_network import traceable_copy

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")
OPSET = 17


def onnx_bytes(network: torch.nn.Module, shape: tuple[int, int, int]) -> bytes:
    """The network as an ONNX model for one image of ``shape`` (channels, rows, columns), exported on the CPU.

    The shape is fixed (the tracer records the sizes it sees), so :class:`OnnxRuntimeNetwork` opens one session per
    image shape it is called with.
    """
    network = traceable_copy(network).to("cpu").eval()
    example = torch.zeros(1, *shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings about shape-dependent Python branches
        torch.onnx.export(
            network, (example,), buffer, input_names=["image"], output_names=["logits"], opset_version=OPSET,
            dynamo=False,
        )  # fmt: skip
    return buffer.getvalue()


def export_onnx(network: torch.nn.Module, path: str, shape: tuple[int, int, int] = (1, 224, 224)) -> str:
    """Write the network as ONNX for one image of ``shape`` to ``path`` (atomically); returns ``path``."""
    from scripts.label_io import atomic_write

    model = onnx_bytes(network, shape)
    atomic_write(path, lambda temporary: Path(temporary).write_bytes(model))
    return path


class OnnxRuntimeNetwork(torch.nn.Module):
    """Call the wrapped network through ONNX Runtime's CPU provider, image by image; outputs are float32 CPU tensors.

    A session is made (from the wrapped network's weights at that moment) for each image shape it is called with; the
    export is read from and kept in ``cache_dir`` when one is given.
    """

    def __init__(self, network: torch.nn.Module, threads: int | None = None, cache_dir: str | None = None):
        super().__init__()
        self.network = network
        self.threads = threads or torch.get_num_threads()
        self.cache_dir = cache_dir
        self._sessions: dict[tuple[int, int, int], object] = {}

    def session(self, shape: tuple[int, int, int]):
        if shape not in self._sessions:
            import onnxruntime

            start = time.perf_counter()
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.log_severity_level = 3  # errors only
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave idle cores to others
            try:
                session = onnxruntime.InferenceSession(self._model(shape), options, providers=["CPUExecutionProvider"])
            except Exception as error:  # a cached export that ONNX Runtime cannot read: export again
                if self.cache_dir is None:
                    raise
                logger.warning(f"cached ONNX model for input {shape} unreadable ({error}); exporting again")
                model = self._model(shape, refresh=True)
                session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            self._sessions[shape] = session
            logger.info(f"ONNX Runtime session for input {shape} ready in {time.perf_counter() - start:.2f} s")
        return self._sessions[shape]

    def _model(self, shape: tuple[int, int, int], refresh: bool = False) -> bytes:
        """The ONNX model for ``shape``: exported now, or through the cache folder."""
        if self.cache_dir is None:
            return onnx_bytes(self.network, shape)
        from scripts.onnx_cache import cached_export

        return cached_export(
            self.cache_dir, self.network, shape, OPSET, lambda: onnx_bytes(self.network, shape), refresh
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = torch.as_tensor(images).detach().to("cpu", torch.float32).numpy()
        session = self.session(tuple(int(size) for size in array.shape[1:]))
        logits = [session.run(["logits"], {"image": np.ascontiguousarray(image[None])})[0] for image in array]
        return torch.from_numpy(np.concatenate(logits))


def for_runtime(network: torch.nn.Module, runtime: str, onnx_cache_dir: str | None = None) -> torch.nn.Module:
    """``network`` itself for ``torch``, or wrapped in :class:`OnnxRuntimeNetwork` for ``onnxruntime`` (its exports
    kept in ``onnx_cache_dir`` unless it is None or empty: ``--onnx_cache_dir ""`` on the command line, which drops
    None).

    Custom: MONAI runs networks on PyTorch only; ONNX Runtime is faster on CPUs with the same outputs (docs/speed.md).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    return network if runtime == "torch" else OnnxRuntimeNetwork(network, cache_dir=onnx_cache_dir or None)

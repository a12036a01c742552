"""Keep the ONNX export of the network on disk, so that each run does not export the same weights again (about 1 s).

A file is named by a hash of what the export depends on: the weights (names and values), the input shape, the ONNX
opset, the torch version and :data:`EXPORT_VERSION`. Other weights or another shape give another file, so a stale
export is never used. Files are written atomically; the :data:`KEEP` most recently used are kept. A cache that cannot
be written (a read-only bundle) costs the export and a warning, nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from scripts.label_io import atomic_write

logger = logging.getLogger(__name__)

EXPORT_VERSION = 1  # raise when the export itself changes (scripts.traceable_network, the exporter's options)
KEEP = 3  # exports kept: the newest weights and shapes in use
PREFIX = "network_"


def export_key(network: torch.nn.Module, shape: tuple[int, int, int], opset: int) -> str:
    """A hex digest of the weights, the input shape and the export's versions."""
    digest = hashlib.sha256(f"{EXPORT_VERSION} {torch.__version__} {opset} {tuple(shape)}".encode())
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def cached_export(
    folder: str,
    network: torch.nn.Module,
    shape: tuple[int, int, int],
    opset: int,
    export: Callable[[], bytes],
    refresh: bool = False,
) -> bytes:
    """The ONNX model for ``network`` at ``shape``: read from ``folder``, or made by ``export()`` and written there
    (always made anew with ``refresh``, replacing the file)."""
    path = Path(folder) / f"{PREFIX}{export_key(network, shape, opset)}_{'x'.join(map(str, shape))}.onnx"
    if path.is_file() and not refresh:
        try:
            model = path.read_bytes()
        except OSError as error:
            logger.warning(f"ONNX cache {path} cannot be read ({error}); exporting again")
        else:
            with contextlib.suppress(OSError):  # a read-only cache is read all the same
                os.utime(path)  # most recently used
            logger.info(f"ONNX model for input {shape} read from {path}")
            return model
    model = export()
    try:  # the export is used whether or not it can be kept
        atomic_write(str(path), lambda temporary: Path(temporary).write_bytes(model))
        _forget_old_exports(Path(folder))
    except OSError as error:
        logger.warning(f"ONNX cache folder {folder} cannot be written ({error}); the export is used this run only")
    return model


def _forget_old_exports(folder: Path) -> None:
    """Delete the exports beyond the :data:`KEEP` most recently used (only files this module named)."""
    exports = sorted(folder.glob(f"{PREFIX}*.onnx"), key=_last_use, reverse=True)
    for path in exports[KEEP:]:
        path.unlink(missing_ok=True)


def _last_use(path: Path) -> float:
    """The file's modification time; 0 for a file another run has just deleted."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0

"""Find the checkpoint an interrupted training run continues from."""

from __future__ import annotations

import glob
import os


def latest_checkpoint(folder: str) -> str | None:
    """Newest ``checkpoint_epoch=N.pt`` written by the trainer's CheckpointSaver in ``folder``, or None."""
    candidates = glob.glob(os.path.join(folder, "*checkpoint_epoch=*.pt"))
    if not candidates:
        return None
    return max(candidates, key=lambda path: int(path.rsplit("=", 1)[1].split(".")[0]))

"""Find the checkpoint an interrupted training run continues from; publish a run's weights when it ends."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time

import torch
from ignite.engine import Events

from scripts.label_io import atomic_write

logger = logging.getLogger(__name__)


def latest_checkpoint(folder: str) -> str | None:
    """Newest ``checkpoint_epoch=N.pt`` written by the trainer's CheckpointSaver in ``folder``, or None."""
    candidates = glob.glob(os.path.join(folder, "*checkpoint_epoch=*.pt"))
    if not candidates:
        return None
    return max(candidates, key=lambda path: int(path.rsplit("=", 1)[1].split(".")[0]))


class PublishWeights:
    """When training completes, write the run's weights to ``path`` (atomically); ``path`` None does nothing.

    The best validation checkpoint (``best_checkpoint``) is published when this run wrote it, else the network's
    weights after the last epoch. A server that watches the file (MONAI Label reloads a model file whose modification
    time changed) uses the new weights at its next inference.
    """

    def __init__(self, path: str | None, network: torch.nn.Module, best_checkpoint: str | None = None):
        self.path, self.network, self.best_checkpoint = path, network, best_checkpoint
        self._started_at = time.time()

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine) -> None:
        self._started_at = time.time()

    def _completed(self, engine) -> None:
        if not self.path:
            return
        best = self.best_checkpoint
        if best and os.path.isfile(best) and os.path.getmtime(best) >= self._started_at:
            atomic_write(self.path, lambda temporary: shutil.copyfile(best, temporary))
            logger.info(f"published the best validation checkpoint {best} to {self.path}")
        else:
            network = self.network
            if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
                network = network.module
            state = {name: tensor.detach().cpu() for name, tensor in network.state_dict().items()}
            atomic_write(self.path, lambda temporary: torch.save(state, temporary))
            logger.info(f"published the weights of the last epoch to {self.path}")
        os.chmod(self.path, 0o644)  # readable like any weights file (the temporary file was private)

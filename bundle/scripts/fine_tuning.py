"""Fine-tuning trained weights on a few corrected labels without disturbing what the network already does well.

:class:`FrozenBatchNorm` keeps every batch-normalisation layer in evaluation mode while the network trains: the layers
normalise with the running statistics learnt on the full training set, and those statistics are never replaced by the
statistics of batches of one or two radiographs (their scale and shift parameters still learn). Without it, a round of
MONAI Label retraining on 2 labels moved every layer's running statistics towards those 2 images and lowered the lung
Dice of other radiographs (docs/monailabel.md, "Retraining").
"""

from __future__ import annotations

import torch
from ignite.engine import Events
from torch.nn.modules.batchnorm import _BatchNorm


def _keep_in_eval_mode(module: torch.nn.Module, inputs) -> None:
    module.training = False  # the trainer calls network.train() every iteration; this runs after it, at each forward


class FrozenBatchNorm:
    """Trainer handler: batch-normalisation layers of ``network`` stay in evaluation mode during training.

    Custom: MONAI's trainers put the whole network in training mode at every iteration, and neither MONAI nor ignite
    has a handler that keeps some layers in evaluation mode.

    ``enabled`` False does nothing (config: ``freeze_batchnorm``). The layers are frozen from the moment the handler
    is attached until training completes, then behave normally again.
    """

    def __init__(self, network: torch.nn.Module, enabled: bool = True):
        self.network, self.enabled = network, bool(enabled)
        self._hooks: list = []

    def attach(self, engine) -> None:
        if not self.enabled:
            return
        self.freeze()
        engine.add_event_handler(Events.COMPLETED, lambda _: self.release())

    def freeze(self) -> int:
        """Keep the batch-normalisation layers in evaluation mode; returns how many there are."""
        self.release()
        layers = [module for module in self.network.modules() if isinstance(module, _BatchNorm)]
        self._hooks = [layer.register_forward_pre_hook(_keep_in_eval_mode) for layer in layers]
        for layer in layers:
            layer.eval()
        return len(layers)

    def release(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

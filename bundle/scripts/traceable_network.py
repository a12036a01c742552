"""A copy of the bundle's network that TorchScript can script and that tracers (ONNX export) record correctly.

MONAI's type-A ResNet shortcut (``ResNet._downsample_basic_block``, used by FlexibleUNet's resnet18 encoder) is a
``functools.partial`` over a method that concatenates ``out.data`` with zeros: ``torch.jit.script`` cannot compile a
partial, and a tracer records ``.data`` as a constant, so a traced model gives the right outputs for the example image
only. :func:`traceable_copy` swaps each of those shortcuts for :class:`ZeroPaddedShortcut`, a module computing the same
values. Kept custom: MONAI has no scriptable equivalent of this shortcut.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F


class ZeroPaddedShortcut(torch.nn.Module):
    """The type-A shortcut as a module: strided (kernel 1) average pooling, then zero channels up to ``planes``."""

    def __init__(self, planes: int, stride: int, spatial_dims: int = 3):
        super().__init__()
        self.planes = planes
        self.stride = stride
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 1:
            out = F.avg_pool1d(x, kernel_size=1, stride=self.stride)
        elif self.spatial_dims == 2:
            out = F.avg_pool2d(x, kernel_size=1, stride=self.stride)
        else:
            out = F.avg_pool3d(x, kernel_size=1, stride=self.stride)
        return F.pad(out, [0, 0] * self.spatial_dims + [0, self.planes - out.shape[1]])


def traceable_copy(network: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``network`` (same weights, same outputs) whose type-A ResNet shortcuts are
    :class:`ZeroPaddedShortcut` modules; ``network`` itself is left unchanged. Custom: MONAI has no scriptable form of
    that shortcut. Config use (``ckpt_export --net_id``)::

        traceable_network_def: {_target_: scripts.traceable_network.traceable_copy, network: '@network_def'}
    """
    network = copy.deepcopy(network)
    for module in network.modules():
        shortcut = getattr(module, "downsample", None)
        if isinstance(shortcut, functools.partial) and shortcut.func.__name__ == "_downsample_basic_block":
            module.downsample = ZeroPaddedShortcut(**shortcut.keywords)
    return network

"""Tensors on any device (CUDA when the workflow runs there) as numpy arrays in host memory."""

from __future__ import annotations

import numpy as np


def host_array(value) -> np.ndarray:
    """``value`` (a tensor on any device, an array, or a nested sequence) as a numpy array in host memory."""
    return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)

"""Overlays of validation outputs for experiment tracking: the prediction beside the label, on the network's input."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np

from scripts.host_array import host_array
from scripts.labels import BACKGROUND, OPACITY
from scripts.overlay import draw_overlay


def validation_overlay(item: Mapping, epoch: int, min_size: int = 256) -> tuple[str, np.ndarray]:
    """(file stem, RGB image) of one validation output (``image``, class maps ``pred`` and ``label``): the prediction
    overlay (lung outline, opacity fill) left, the label's right, enlarged to at least ``min_size`` pixels."""
    image, predicted, label = (
        host_array(item["image"])[0],
        np.rint(host_array(item["pred"]))[0],
        np.rint(host_array(item["label"]))[0],
    )
    scale = max(1, math.ceil(min_size / max(image.shape)))
    grow = lambda array: np.kron(array, np.ones((scale, scale), dtype=array.dtype))  # noqa: E731
    display = grow(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
    panels = []
    for caption, classes in ((f"prediction, epoch {epoch}", predicted), ("label", label)):
        classes = grow(classes.astype(np.uint8))
        panels.append(draw_overlay(display, classes != BACKGROUND, classes == OPACITY, caption))
    name = getattr(item["image"], "meta", {}).get("filename_or_obj", "image")
    stem = os.path.splitext(os.path.basename(str(name)))[0] or "image"
    return stem, np.concatenate(panels, axis=1)

"""Validation figures that choose the checkpoint on what users come for: opacity, clear lungs and the lung field.

Per image, from the predicted class map and the label map (values of :mod:`scripts.labels`):

* ``reference_lung_dice``: lung Dice on lung-only masks (label 3, the bundle's reference lung field);
* ``opacity_dice``: opacity Dice on images whose opacity was annotated and is present;
* ``clear_lung_false_opacity``: predicted opacity as a fraction of the predicted lung on images annotated as clear;
* ``selection_score``: the mean of the available terms ``reference_lung_dice``, ``opacity_dice`` and
  ``1 - clear_lung_false_opacity`` (each the mean over its images), higher is better.

A figure without any image to measure it is NaN (the selection score leaves it out).
"""

from __future__ import annotations

import math

import ignite.distributed as idist
import torch
from ignite.metrics import Metric

from scripts.labels import BACKGROUND, LUNG_UNANNOTATED, OPACITY

FIGURES = ("reference_lung_dice", "opacity_dice", "clear_lung_false_opacity", "selection_score")


def image_figures(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The per-image terms that apply to one (1, H, W) predicted class map and label map."""
    predicted_lung = predicted != BACKGROUND
    predicted_opacity = predicted == OPACITY
    if bool((labels == LUNG_UNANNOTATED).any()):
        return {"reference_lung_dice": dice(predicted_lung, labels != BACKGROUND)}
    true_opacity = labels == OPACITY
    if bool(true_opacity.any()):
        return {"opacity_dice": dice(predicted_opacity, true_opacity)}
    if bool((labels != BACKGROUND).any()):
        return {"clear_lung_false_opacity": opacity_share(predicted)}
    return {}


def dice(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(prediction.sum()) + int(truth.sum())
    return 2.0 * float((prediction & truth).sum()) / total if total else 1.0


def opacity_share(classes: torch.Tensor) -> float:
    """Predicted opacity as a fraction of the predicted lung field of a class map (0.0 without a lung field)."""
    lung = int((classes != BACKGROUND).sum())
    return float((classes == OPACITY).sum()) / lung if lung else 0.0


class LungOpacityFigure(Metric):
    """One of :data:`FIGURES` over a validation run, as an ignite metric.

    Not MONAI's MeanDice: it has no partial-label rule (label 3) and no clear-lung false opacity.

    Feed it ``(predicted class maps, label maps)``, e.g. ``output_transform=from_engine(['pred', 'label'])`` after an
    argmax post-transform.
    """

    def __init__(self, figure: str = "selection_score", output_transform=lambda output: output, device="cpu"):
        if figure not in FIGURES:
            raise ValueError(f"figure must be one of {FIGURES}, got {figure!r}")
        self.figure = figure
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._values: dict[str, list[float]] = {name: [] for name in FIGURES[:-1]}

    def update(self, output) -> None:
        predictions, labels = output
        for predicted, label in zip(predictions, labels):
            for name, value in image_figures(torch.as_tensor(predicted), torch.as_tensor(label)).items():
                self._values[name].append(value)

    def compute(self) -> float:
        """The figure over every image seen, by every process of a distributed run (sums and counts are reduced)."""
        names = FIGURES[:-1]
        totals = torch.tensor(
            [[sum(self._values[name]), len(self._values[name])] for name in names], dtype=torch.float64
        )
        totals = idist.all_reduce(totals)
        means = {name: float(total / count) if count else math.nan for name, (total, count) in zip(names, totals)}
        if self.figure != "selection_score":
            return means[self.figure]
        terms = [means["reference_lung_dice"], means["opacity_dice"], 1.0 - means["clear_lung_false_opacity"]]
        terms = [term for term in terms if not math.isnan(term)]
        return sum(terms) / len(terms) if terms else math.nan

"""The validation figures that choose the checkpoint, on constructed class maps."""

import math

import pytest
import torch

from scripts.validation_metrics import LungOpacityFigure, image_figures


def class_map(rows: int = 20, columns: int = 20, lung=(2, 18, 2, 18), opacity=None, value: int = 1) -> torch.Tensor:
    """(1, rows, columns) map: ``value`` in the lung box, 2 in the opacity box."""
    classes = torch.zeros(1, rows, columns)
    top, bottom, left, right = lung
    classes[0, top:bottom, left:right] = value
    if opacity is not None:
        top, bottom, left, right = opacity
        classes[0, top:bottom, left:right] = 2
    return classes


def test_each_label_kind_gives_its_own_figure():
    predicted = class_map(opacity=(2, 10, 2, 18))  # lung 16x16 = 256 px, opacity 8x16 = 128 px
    assert image_figures(predicted, class_map(value=3)) == {"reference_lung_dice": 1.0}
    half = image_figures(predicted, class_map(opacity=(2, 6, 2, 18)))  # truth opacity 64 px inside the predicted 128
    assert half == {"opacity_dice": pytest.approx(2 * 64 / (128 + 64))}
    assert image_figures(predicted, class_map()) == {"clear_lung_false_opacity": pytest.approx(0.5)}
    assert image_figures(predicted, torch.zeros(1, 20, 20)) == {}


def test_selection_score_is_the_mean_of_the_available_terms():
    predicted = class_map(opacity=(2, 10, 2, 18))
    figures = {
        name: LungOpacityFigure(name)
        for name in ("reference_lung_dice", "opacity_dice", "clear_lung_false_opacity", "selection_score")
    }
    for figure in figures.values():
        figure.reset()
        figure.update(([predicted, predicted], [class_map(value=3), class_map()]))  # no opacity annotated and present
    values = {name: figure.compute() for name, figure in figures.items()}
    assert values["reference_lung_dice"] == 1.0 and values["clear_lung_false_opacity"] == pytest.approx(0.5)
    assert math.isnan(values["opacity_dice"])
    assert values["selection_score"] == pytest.approx((1.0 + (1 - 0.5)) / 2)
    with pytest.raises(ValueError, match="figure must be one of"):
        LungOpacityFigure("accuracy")

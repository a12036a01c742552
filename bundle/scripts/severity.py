"""COVID-19 severity figures from a lung mask and an opacity mask (Cohen et al. 2020 chest X-ray scores).

Per lung (patient's right and left, see :mod:`scripts.lung_sides`):

* geographic extent 0-4 from the percentage of the lung covered by opacity (:func:`extent_score`);
* opacity degree 0-3 from how dense the opacity is on the radiograph (:func:`opacity_degree`).

The sums over both lungs are the geographic extent score (0-8) and the opacity score (0-6).
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from scripts.lung_sides import split_lungs

# Geographic extent: upper bounds (exclusive, in percent of the lung) of scores 1, 2 and 3. A bound itself belongs to
# the higher score: (0, 25) -> 1, [25, 50) -> 2, [50, 75) -> 3, [75, 100] -> 4; exactly 0 % -> 0.
EXTENT_BINS = (25.0, 50.0, 75.0)

# Opacity degree: relative density d of the opacity (see opacity_degree) at or above which it counts as dense.
CONSOLIDATION_MIN_RELATIVE_DENSITY = 0.35  # d measured against the clear lung of the same image
CONSOLIDATION_MIN_IMAGE_DENSITY = 0.55  # d measured against the image's p5..p95 range (no clear lung left)
WHITE_OUT_MIN_COVERAGE = 0.9  # fraction of the lung covered by dense opacity for a white-out
IMAGE_LOW_PERCENTILE = 5
IMAGE_HIGH_PERCENTILE = 95

NO_OPACITY, GROUND_GLASS, CONSOLIDATION, WHITE_OUT = 0, 1, 2, 3


class NoLungFoundError(ValueError):
    """The lung mask holds no lung pixel, so no severity can be computed."""


def extent_score(percent: float) -> int:
    """Cohen geographic extent 0-4 of one lung from the percentage (0-100) of it covered by opacity."""
    if not 0.0 <= percent <= 100.0:  # also rejects NaN
        raise ValueError(f"opacity percentage must lie in [0, 100], got {percent}")
    if percent == 0.0:
        return 0
    return 1 + bisect.bisect_right(EXTENT_BINS, percent)


def opacity_degree(
    image: np.ndarray,
    lung: np.ndarray,
    opacity: np.ndarray,
    clear_lung: np.ndarray | None = None,
    image_range: tuple[float, float] | None = None,
) -> int:
    """Cohen opacity degree of one lung: 0 none, 1 ground glass, 2 consolidation, 3 white-out.

    ``image`` is the radiograph (higher = denser), ``lung`` the mask of this lung, ``opacity`` the opacity mask (only
    its pixels inside ``lung`` count) and ``clear_lung`` the lung without opacity in the whole image, both lungs (by
    default the clear part of ``lung``); ``image_range`` the image's (p5, p95), computed when not given. Rule:

    * no opacity pixel in the lung -> 0;
    * relative density ``d = (median(image in opacity) - median(image in clear lung))
      / (p95(image) - median(image in clear lung))``; dense when ``d >= CONSOLIDATION_MIN_RELATIVE_DENSITY``;
    * when no clear lung is left (or its median is not below p95): ``d = (median(image in opacity) - p5(image))
      / (p95(image) - p5(image))``, dense when ``d >= CONSOLIDATION_MIN_IMAGE_DENSITY``;
    * dense and covering at least ``WHITE_OUT_MIN_COVERAGE`` of the lung -> 3; dense -> 2; otherwise -> 1.

    The figures are ratios of intensity differences, so a linear rescaling of the image (8 or 16 bit) changes nothing.
    """
    image = np.asarray(image)
    lung = np.asarray(lung) > 0
    opacity = (np.asarray(opacity) > 0) & lung
    clear_lung = lung & ~opacity if clear_lung is None else np.asarray(clear_lung) > 0
    if not image.shape == lung.shape == opacity.shape == clear_lung.shape:
        raise ValueError(
            f"image {image.shape}, lung {lung.shape}, opacity {opacity.shape} and clear lung {clear_lung.shape}"
            " masks must have the same shape"
        )
    if not opacity.any():
        return NO_OPACITY

    opacity_median = float(np.median(image[opacity]))
    image_low, image_high = image_percentile_range(image) if image_range is None else image_range
    clear_median = float(np.median(image[clear_lung])) if clear_lung.any() else math.inf
    if clear_median < image_high:
        dense = (opacity_median - clear_median) / (image_high - clear_median) >= CONSOLIDATION_MIN_RELATIVE_DENSITY
    elif image_high > image_low:
        dense = (opacity_median - image_low) / (image_high - image_low) >= CONSOLIDATION_MIN_IMAGE_DENSITY
    else:  # flat image: no density contrast to measure
        dense = False

    if not dense:
        return GROUND_GLASS
    if opacity.sum() >= WHITE_OUT_MIN_COVERAGE * lung.sum():
        return WHITE_OUT
    return CONSOLIDATION


def compute_severity(
    lung_mask: np.ndarray,
    opacity_mask: np.ndarray,
    image: np.ndarray | None = None,
    spacing_mm: tuple[float, float] | None = None,
) -> dict:
    """Areas, opacity percentages and Cohen scores of a 2D lung mask and opacity mask (``> 0`` counts as set).

    Opacity outside the lung is ignored. Percentages are rounded to 2 decimals; extents are scored from the unrounded
    percentages. Opacity degrees and ``opacity_score`` are None without ``image``; ``*_cm2`` areas (rounded to 2
    decimals) are None without ``spacing_mm`` = (row spacing, column spacing) in mm. Raises
    :class:`NoLungFoundError` when the lung mask is empty.
    """
    lung = np.asarray(lung_mask) > 0
    opacity = (np.asarray(opacity_mask) > 0) & lung
    if lung.ndim != 2 or lung.shape != np.shape(opacity_mask):
        raise ValueError(f"lung mask {lung.shape} and opacity mask {np.shape(opacity_mask)} must be the same 2D shape")
    if image is not None and np.shape(image) != lung.shape:
        raise ValueError(f"image {np.shape(image)} and masks {lung.shape} must have the same shape")
    if not lung.any():
        raise NoLungFoundError("no lung field found in the image")

    right_lung, left_lung = split_lungs(lung)
    lung_area = int(lung.sum())
    opacity_area = int(opacity.sum())
    result = {
        "lung_area_px": lung_area,
        "opacity_area_px": opacity_area,
        "opacity_pct": round(_percent(opacity_area, lung_area), 2),
    }
    for side, side_lung in (("right", right_lung), ("left", left_lung)):
        side_area = int(side_lung.sum())
        side_percent = _percent(int((opacity & side_lung).sum()), side_area)
        result[f"{side}_lung_area_px"] = side_area
        result[f"{side}_opacity_pct"] = round(side_percent, 2)
        result[f"{side}_extent"] = extent_score(side_percent)
    result["geographic_extent"] = result["right_extent"] + result["left_extent"]

    if image is None:
        right_degree = left_degree = opacity_score = None
    else:
        clear_lung = lung & ~opacity
        image_range = image_percentile_range(image)
        right_degree = opacity_degree(image, right_lung, opacity, clear_lung, image_range)
        left_degree = opacity_degree(image, left_lung, opacity, clear_lung, image_range)
        opacity_score = right_degree + left_degree
    result.update(right_opacity_degree=right_degree, left_opacity_degree=left_degree, opacity_score=opacity_score)

    if spacing_mm is None:
        result.update(lung_area_cm2=None, opacity_area_cm2=None)
    else:
        row_mm, column_mm = (float(value) for value in spacing_mm)
        if not (math.isfinite(row_mm) and math.isfinite(column_mm) and row_mm > 0 and column_mm > 0):
            raise ValueError(f"pixel spacing must be two positive numbers in mm, got {spacing_mm}")
        pixel_cm2 = row_mm * column_mm / 100.0
        result.update(
            lung_area_cm2=round(lung_area * pixel_cm2, 2), opacity_area_cm2=round(opacity_area * pixel_cm2, 2)
        )
    return result


def image_percentile_range(image: np.ndarray) -> tuple[float, float]:
    """The image's (p5, p95) intensities, the reference range of the opacity density."""
    low, high = np.percentile(image, [IMAGE_LOW_PERCENTILE, IMAGE_HIGH_PERCENTILE])
    return float(low), float(high)


def _percent(part: int, whole: int) -> float:
    """``part`` as a percentage of ``whole``; 0.0 when ``whole`` is 0."""
    return 100.0 * part / whole if whole else 0.0

"""COVID-19 severity figures from a lung mask and an opacity mask (Cohen et al. 2020 chest X-ray scores).

Per lung (patient's right and left, see :mod:`scripts.lung_sides`):

* geographic extent 0-4 from the percentage of the lung covered by opacity (:func:`extent_scores`), with fitted
  :class:`SeverityRules` from that percentage plus a weighted percentage of dense opacity (:func:`extent_measure`);
* opacity degree 0-3 from how dense the opacity is on the radiograph: with :class:`SeverityRules` fitted against
  radiologists (``models/severity_calibration.json``, :mod:`scripts.severity_calibration`) from the density features
  of :func:`density_features` (:func:`calibrated_degrees`), else by the hand-set rule of :func:`opacity_degree`.

The sums over both lungs are the geographic extent score (0-8) and the opacity score (0-6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scripts.bounding_box import bounding_box
from scripts.grey_statistics import median, percentiles
from scripts.lung_sides import split_lungs

# Geographic extent, published bins: the lowest opacity percentage of the lung that scores 1, 2, 3 and 4. A bound
# itself belongs to the higher score: (0, 25) -> 1, [25, 50) -> 2, [50, 75) -> 3, [75, 100] -> 4; exactly 0 % -> 0.
PUBLISHED_EXTENT_THRESHOLDS = (0.0, 25.0, 50.0, 75.0)

# Density features (density_references): relative density 0 is the dark end of the image (its IMAGE_LOW_PERCENTILE th
# percentile), 1 is soft tissue (median of the image outside the lung fields within their bounding box); an opacity
# pixel at or above DENSE_LEVEL is dense opacity.
DENSE_LEVEL = 0.5
# per-lung columns (``right_<name>``, ``left_<name>``) that calibrated_degrees reads, in its argument order
DEGREE_FEATURES = ("extent", "opacity_density", "dense_opacity_pct")

# Opacity degree: relative density d of the opacity (see opacity_degree) at or above which it counts as dense.
CONSOLIDATION_MIN_RELATIVE_DENSITY = 0.35  # d measured against the clear lung of the same image
CONSOLIDATION_MIN_IMAGE_DENSITY = 0.55  # d measured against the image's p5..p95 range (no clear lung left)
WHITE_OUT_MIN_COVERAGE = 0.9  # fraction of the lung covered by dense opacity for a white-out
IMAGE_LOW_PERCENTILE = 5
IMAGE_HIGH_PERCENTILE = 95

NO_OPACITY, GROUND_GLASS, CONSOLIDATION, WHITE_OUT = 0, 1, 2, 3


class NoLungFoundError(ValueError):
    """The lung mask holds no lung pixel, so no severity can be computed."""


@dataclass(frozen=True)
class SeverityRules:
    """Constants of the fitted score rules (see :func:`extent_scores` and :func:`calibrated_degrees`).

    ``extent_thresholds_pct``: the lowest :func:`extent_measure` of a lung that scores extent 1, 2, 3 and 4;
    ``consolidation_min_density``: relative density of the opacity from which it counts as consolidation;
    ``white_out_min_dense_pct``: percentage of the lung covered by dense opacity from which it counts as white-out;
    ``extent_dense_weight``: weight of the dense opacity % in :func:`extent_measure` (0: the opacity % alone, as the
    published bins; calibration files written before 0.6.1 have none).
    """

    extent_thresholds_pct: tuple[float, float, float, float]
    consolidation_min_density: float
    white_out_min_dense_pct: float
    extent_dense_weight: float = 0.0

    def __post_init__(self):
        thresholds = tuple(float(value) for value in self.extent_thresholds_pct)
        if len(thresholds) != 4 or list(thresholds) != sorted(thresholds) or not all(map(math.isfinite, thresholds)):
            raise ValueError(f"extent thresholds must be 4 finite increasing percentages, got {thresholds}")
        if not (math.isfinite(self.consolidation_min_density) and math.isfinite(self.white_out_min_dense_pct)):
            raise ValueError("the consolidation and white-out thresholds must be finite numbers")
        if not (math.isfinite(self.extent_dense_weight) and self.extent_dense_weight >= 0):
            raise ValueError(
                f"the extent's dense-opacity weight must be a finite number >= 0, got {self.extent_dense_weight}"
            )
        object.__setattr__(self, "extent_thresholds_pct", thresholds)


def extent_scores(percent, thresholds=PUBLISHED_EXTENT_THRESHOLDS) -> np.ndarray:
    """Geographic extent 0-4 of lungs (array of opacity percentages): the number of ``thresholds`` reached.

    A lung without opacity (exactly 0 %) scores 0 whatever the thresholds; the published bins are
    :data:`PUBLISHED_EXTENT_THRESHOLDS`.
    """
    percent = np.asarray(percent, dtype=float)
    reached = sum((percent >= threshold).astype(int) for threshold in thresholds)
    return np.where(percent > 0, reached, 0)


def extent_measure(opacity_pct, dense_opacity_pct, dense_weight: float) -> np.ndarray:
    """What the fitted extent thresholds apply to, per lung: opacity % + ``dense_weight`` x dense opacity %.

    Radiologists' extent follows how much of the lung is dense better than the opacity mask alone does (on the scored
    cohen-cxr images, bundle README); ``dense_weight`` 0 is the opacity % alone. NaN where the dense opacity % is
    unknown (None or NaN) and the weight is not 0.
    """
    percent = np.asarray(opacity_pct, dtype=float)
    if dense_weight == 0:
        return percent
    return percent + dense_weight * np.asarray(dense_opacity_pct, dtype=float)


def extent_score(percent: float, thresholds=PUBLISHED_EXTENT_THRESHOLDS) -> int:
    """Cohen geographic extent 0-4 of one lung from the percentage (0-100) of it covered by opacity."""
    if not 0.0 <= percent <= 100.0:  # also rejects NaN
        raise ValueError(f"opacity percentage must lie in [0, 100], got {percent}")
    return int(extent_scores(percent, thresholds))


def side_extent(percent: float, dense_pct: float | None, rules: SeverityRules | None) -> int | None:
    """Extent 0-4 of one lung from its opacity % (unrounded) and dense opacity %: published bins without ``rules``,
    else the fitted thresholds on :func:`extent_measure`; None when the rules need the dense opacity % and it is
    unknown (no image, or no density reference on a flat image)."""
    if rules is None:
        return extent_score(percent)
    if dense_pct is None and rules.extent_dense_weight:
        return None
    extent_score(percent)  # validates the percentage
    return int(
        extent_scores(extent_measure(percent, dense_pct, rules.extent_dense_weight), rules.extent_thresholds_pct)
    )


def calibrated_degrees(
    extent, opacity_density, dense_opacity_pct, consolidation_min_density, white_out_min_dense_pct
) -> np.ndarray:
    """Opacity degree 0-3 of lungs (arrays) by the fitted rule: the number of criteria an involved lung meets.

    A lung of extent 0 has degree 0; an involved lung scores 1 (ground glass), plus 1 when its opacity density is at
    least ``consolidation_min_density``, plus 1 when dense opacity covers at least ``white_out_min_dense_pct`` of it
    (the constants of :class:`SeverityRules`). A density that could not be measured (None or NaN) meets no criterion.
    """
    density = np.asarray(opacity_density, dtype=float)  # None becomes NaN, which compares False
    dense_pct = np.asarray(dense_opacity_pct, dtype=float)
    degree = 1 + (density >= consolidation_min_density).astype(int) + (dense_pct >= white_out_min_dense_pct)
    return np.where(np.asarray(extent) > 0, degree, NO_OPACITY)


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

    opacity_median = median(image[opacity])
    image_low, image_high = image_percentile_range(image) if image_range is None else image_range
    clear_median = median(image[clear_lung]) if clear_lung.any() else math.inf
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


def density_references(
    image: np.ndarray, lung: np.ndarray, image_range: tuple[float, float] | None = None
) -> tuple[float, float] | None:
    """(dark, soft tissue) intensities that relative density 0 and 1 stand for; None when not measurable.

    Dark: the image's :data:`IMAGE_LOW_PERCENTILE` th percentile (air or background, else the most aerated lung),
    which needs no clear lung and does not rise when both lungs are opaque. Soft tissue: the median outside the lung
    fields within their bounding box (mediastinum, heart, diaphragm, chest wall), or the image's 95th percentile
    when the box holds no such pixel; ``image_range`` is the image's :func:`image_percentile_range`, computed when
    not given. None when the soft tissue is not denser than the dark end (flat image).
    """
    box = bounding_box(lung)
    outside = image[box][~lung[box]]
    dark, high = image_percentile_range(image) if image_range is None else image_range
    soft_tissue = median(outside) if outside.size else high
    return (dark, soft_tissue) if soft_tissue > dark else None


def density_features(
    image: np.ndarray, lung: np.ndarray, opacity: np.ndarray, references: tuple[float, float] | None
) -> tuple[float | None, float | None]:
    """(opacity density, dense opacity %) of one lung, the features of :func:`calibrated_degrees`.

    ``lung`` is this lung's mask, ``opacity`` the opacity mask (only its pixels in ``lung`` count) and ``references``
    the image's :func:`density_references`. Relative density = (intensity - dark) / (soft tissue - dark), a ratio of
    intensity differences, so 8/16-bit scaling changes nothing. Opacity density: that of the median of the
    opacity in the lung (None without opacity); dense opacity %: the percentage of the lung covered by opacity
    pixels of relative density >= :data:`DENSE_LEVEL` (0.0 without opacity). Both None without references.
    """
    if references is None:
        return None, None
    values = image[opacity & lung]
    if not values.size:
        return None, 0.0
    dark, soft_tissue = references
    dense = values >= dark + DENSE_LEVEL * (soft_tissue - dark)
    density = (median(values) - dark) / (soft_tissue - dark)
    return round(density, 3), round(_percent(int(dense.sum()), int(lung.sum())), 2)


def compute_severity(
    lung_mask: np.ndarray,
    opacity_mask: np.ndarray,
    image: np.ndarray | None = None,
    spacing_mm: tuple[float, float] | None = None,
    rules: SeverityRules | None = None,
    lung_sides: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Areas, opacity percentages, density features and Cohen scores of a 2D lung mask and opacity mask.

    ``> 0`` counts as set; opacity outside the lung is ignored. Percentages are rounded to 2 decimals; extents are
    scored from the unrounded percentages, with ``rules`` (fitted) when given, else with the published bins and the
    hand-set density rule of :func:`opacity_degree`. Density features, opacity degrees and ``opacity_score`` are
    None without ``image``; so are the extents and both scores when ``rules`` weigh dense opacity and it cannot be
    measured (see :func:`side_extent`). ``*_cm2`` areas (rounded to 2 decimals) are None without ``spacing_mm`` =
    (row spacing, column spacing) in mm. ``lung_sides``: the (right, left) split of the lung mask when the caller
    already has it (:func:`scripts.lung_sides.split_lungs`). Raises :class:`NoLungFoundError` when the lung mask is
    empty.
    """
    lung = np.asarray(lung_mask) > 0
    opacity = (np.asarray(opacity_mask) > 0) & lung
    if lung.ndim != 2 or lung.shape != np.shape(opacity_mask):
        raise ValueError(f"lung mask {lung.shape} and opacity mask {np.shape(opacity_mask)} must be the same 2D shape")
    image = None if image is None else np.asarray(image)
    if image is not None and image.shape != lung.shape:
        raise ValueError(f"image {np.shape(image)} and masks {lung.shape} must have the same shape")
    if not lung.any():
        raise NoLungFoundError("no lung field found in the image")

    right_lung, left_lung = split_lungs(lung) if lung_sides is None else (np.asarray(side) > 0 for side in lung_sides)
    image_range = None if image is None else image_percentile_range(image)  # of the whole image
    # every other figure counts or takes medians of pixels in the lung fields: work on their bounding box
    box = bounding_box(lung | right_lung | left_lung)
    lung, opacity, right_lung, left_lung = (mask[box] for mask in (lung, opacity, right_lung, left_lung))
    image = None if image is None else image[box]
    lung_area = int(lung.sum())
    opacity_area = int(opacity.sum())
    result = {
        "lung_area_px": lung_area,
        "opacity_area_px": opacity_area,
        "opacity_pct": round(_percent(opacity_area, lung_area), 2),
    }
    references = None if image is None else density_references(image, lung, image_range)
    for side, side_lung in (("right", right_lung), ("left", left_lung)):
        side_area = int(side_lung.sum())
        side_percent = _percent(int((opacity & side_lung).sum()), side_area)
        density, dense_pct = (None, None) if image is None else density_features(image, side_lung, opacity, references)
        result[f"{side}_lung_area_px"] = side_area
        result[f"{side}_opacity_pct"] = round(side_percent, 2)
        result[f"{side}_extent"] = side_extent(side_percent, dense_pct, rules)
        result.update({f"{side}_opacity_density": density, f"{side}_dense_opacity_pct": dense_pct})
    extents = (result["right_extent"], result["left_extent"])
    result["geographic_extent"] = None if None in extents else sum(extents)
    if image is None or None in extents:
        degrees = (None, None)
    elif rules is None:
        clear_lung = lung & ~opacity
        degrees = tuple(
            opacity_degree(image, side, opacity, clear_lung, image_range) for side in (right_lung, left_lung)
        )
    else:
        constants = (rules.consolidation_min_density, rules.white_out_min_dense_pct)
        degrees = tuple(
            int(calibrated_degrees(*(result[f"{side}_{key}"] for key in DEGREE_FEATURES), *constants))
            for side in ("right", "left")
        )
    result.update(
        right_opacity_degree=degrees[0],
        left_opacity_degree=degrees[1],
        opacity_score=None if None in degrees else sum(degrees),
    )

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
    low, high = percentiles(image, [IMAGE_LOW_PERCENTILE, IMAGE_HIGH_PERCENTILE])
    return low, high


def _percent(part: int, whole: int) -> float:
    """``part`` as a percentage of ``whole``; 0.0 when ``whole`` is 0."""
    return 100.0 * part / whole if whole else 0.0

"""Severity figures and lung side split on hand-made masks with known answers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from scripts.lung_sides import split_lungs  # noqa: E402
from scripts.severity import (  # noqa: E402
    NoLungFoundError,
    SeverityRules,
    compute_severity,
    extent_score,
    opacity_degree,
)

SHAPE = (64, 80)
ROWS = slice(7, 57)  # 50 rows
RIGHT_COLUMNS = slice(10, 30)  # image left = patient's right lung, 50 x 20 = 1000 px
LEFT_COLUMNS = slice(50, 70)  # image right = patient's left lung, 1000 px

AIR, BODY, CLEAR, FAINT, DENSE = 0, 230, 50, 90, 180  # 8-bit grey levels of the synthetic radiograph


def lung_masks():
    right = np.zeros(SHAPE, dtype=bool)
    right[ROWS, RIGHT_COLUMNS] = True
    left = np.zeros(SHAPE, dtype=bool)
    left[ROWS, LEFT_COLUMNS] = True
    return right, left


def first_pixels(mask, count):
    """The first ``count`` pixels of ``mask`` in row-major order."""
    part = np.zeros_like(mask)
    part.flat[np.flatnonzero(mask)[:count]] = True
    return part


def radiograph(lung, opacity, opacity_level):
    """Air strips at both edges, bright body, dark clear lung and opacity at ``opacity_level``."""
    image = np.full(SHAPE, BODY, dtype=np.uint8)
    image[:, :5] = AIR
    image[:, -5:] = AIR
    image[lung] = CLEAR
    image[opacity & lung] = opacity_level
    return image


@pytest.mark.parametrize(
    "opacity_px, percent, extent",
    [(0, 0.0, 0), (1, 0.1, 1), (249, 24.9, 1), (250, 25.0, 2), (500, 50.0, 3), (750, 75.0, 4), (1000, 100.0, 4)],
)
def test_right_lung_percentage_and_extent(opacity_px, percent, extent):
    right, left = lung_masks()
    result = compute_severity(right | left, first_pixels(right, opacity_px))
    assert result["lung_area_px"] == 2000
    assert result["right_lung_area_px"] == 1000 and result["left_lung_area_px"] == 1000
    assert result["opacity_area_px"] == opacity_px
    assert result["right_opacity_pct"] == percent
    assert result["right_extent"] == extent
    assert result["left_opacity_pct"] == 0.0 and result["left_extent"] == 0
    assert result["geographic_extent"] == extent
    assert result["opacity_pct"] == round(100 * opacity_px / 2000, 2)
    assert result["opacity_score"] is None and result["right_opacity_degree"] is None
    assert result["lung_area_cm2"] is None and result["opacity_area_cm2"] is None


def test_extent_score_boundaries():
    assert [extent_score(p) for p in (0, 0.01, 24.99, 25, 49.99, 50, 74.99, 75, 100)] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    for bad in (-1.0, 100.5, float("nan")):
        with pytest.raises(ValueError):
            extent_score(bad)


def test_both_lungs_scored_and_summed():
    right, left = lung_masks()
    result = compute_severity(right | left, first_pixels(right, 500) | first_pixels(left, 1000))
    assert (result["right_extent"], result["left_extent"], result["geographic_extent"]) == (3, 4, 7)
    assert result["opacity_pct"] == 75.0


def test_uint8_255_masks_accepted():
    right, left = lung_masks()
    result = compute_severity((right | left).astype(np.uint8) * 255, first_pixels(right, 250).astype(np.uint8) * 255)
    assert result["right_opacity_pct"] == 25.0


def test_no_lung_raises():
    with pytest.raises(NoLungFoundError, match="no lung field found in the image"):
        compute_severity(np.zeros(SHAPE, dtype=np.uint8), np.ones(SHAPE, dtype=np.uint8))
    assert issubclass(NoLungFoundError, ValueError)


def test_opacity_outside_lung_ignored():
    right, left = lung_masks()
    opacity = first_pixels(right, 250)
    opacity[:5, :] = True  # above both lungs
    result = compute_severity(right | left, opacity)
    assert result["opacity_area_px"] == 250
    assert result["right_opacity_pct"] == 25.0 and result["left_opacity_pct"] == 0.0


def test_area_in_cm2_from_spacing():
    right, left = lung_masks()
    result = compute_severity(right | left, first_pixels(right, 250), spacing_mm=(0.2, 0.1))
    assert result["lung_area_cm2"] == pytest.approx(2000 * 0.02 / 100)
    assert result["opacity_area_cm2"] == pytest.approx(250 * 0.02 / 100)


def test_split_two_lungs_by_centroid():
    right, left = lung_masks()
    split_right, split_left = split_lungs((right | left).astype(np.uint8))
    assert np.array_equal(split_right, right) and np.array_equal(split_left, left)


def test_specks_join_nearest_lung():
    right, left = lung_masks()
    speck = np.zeros(SHAPE, dtype=bool)
    speck[59:61, 66:68] = True  # 4 px (< 1 % of the lung area) just below the left lung
    split_right, split_left = split_lungs(right | left | speck)
    assert np.array_equal(split_right, right) and np.array_equal(split_left, left | speck)


def test_merged_lungs_split_at_narrowest_column():
    right, left = lung_masks()
    left[ROWS, 70:75] = True  # left lung 50 x 25 = 1250 px
    bridge = np.zeros(SHAPE, dtype=bool)
    bridge[30:32, 30:50] = True  # 2-pixel high bridge joins the lungs; narrowest columns 30..49, midline 40
    split_right, split_left = split_lungs(right | left | bridge)
    assert split_right.sum() == 1000 + 20 and split_left.sum() == 1250 + 20
    assert split_right[ROWS, RIGHT_COLUMNS].all() and split_left[ROWS, 50:75].all()
    assert not (split_right & split_left).any()
    assert np.array_equal(split_right | split_left, right | left | bridge)


def test_one_lung_missing_is_assigned_by_image_side():
    right, left = lung_masks()
    split_right, split_left = split_lungs(left)
    assert not split_right.any() and np.array_equal(split_left, left)
    result = compute_severity(left, first_pixels(left, 250))
    assert result["right_lung_area_px"] == 0 and result["right_opacity_pct"] == 0.0 and result["right_extent"] == 0
    assert result["left_lung_area_px"] == 1000 and result["left_opacity_pct"] == 25.0 and result["left_extent"] == 2


def test_empty_mask_splits_into_empty_masks():
    split_right, split_left = split_lungs(np.zeros(SHAPE, dtype=bool))
    assert split_right.shape == SHAPE and not split_right.any() and not split_left.any()


@pytest.mark.parametrize(
    "opacity_px, level, degree",
    [(0, DENSE, 0), (250, FAINT, 1), (250, DENSE, 2), (1000, DENSE, 3), (1000, FAINT, 1)],
)
def test_opacity_degree_from_density_and_coverage(opacity_px, level, degree):
    right, left = lung_masks()
    opacity = first_pixels(right, opacity_px)
    image = radiograph(right | left, opacity, level)
    assert opacity_degree(image, right, opacity, clear_lung=(right | left) & ~opacity) == degree
    result = compute_severity(right | left, opacity, image=image)
    assert (result["right_opacity_degree"], result["left_opacity_degree"]) == (degree, 0)
    assert result["opacity_score"] == degree


def test_white_out_of_both_lungs_uses_image_range():
    right, left = lung_masks()
    lung = right | left
    result = compute_severity(lung, lung, image=radiograph(lung, lung, DENSE))
    assert (result["right_opacity_degree"], result["left_opacity_degree"], result["opacity_score"]) == (3, 3, 6)
    assert result["geographic_extent"] == 8


def test_same_figures_for_8_and_16_bit_images():
    right, left = lung_masks()
    lung = right | left
    opacity = first_pixels(right, 250) | first_pixels(left, 950)
    image_8bit = radiograph(lung, first_pixels(right, 250), FAINT)
    image_8bit[first_pixels(left, 950)] = DENSE
    image_16bit = image_8bit.astype(np.uint16) * 257
    figures_8bit = compute_severity(lung, opacity, image=image_8bit, spacing_mm=(0.2, 0.1))
    figures_16bit = compute_severity(lung, opacity, image=image_16bit, spacing_mm=(0.2, 0.1))
    assert figures_8bit == figures_16bit
    assert (figures_8bit["right_opacity_degree"], figures_8bit["left_opacity_degree"]) == (1, 3)


FITTED = SeverityRules((10.0, 20.0, 24.0, 40.0), consolidation_min_density=0.5, white_out_min_dense_pct=20.0)


def dense_right_faint_left():
    """Lungs, opacity and radiograph: a quarter of the right lung dense, the whole left lung faint."""
    right, left = lung_masks()
    lung = right | left
    image = radiograph(lung, first_pixels(right, 250), DENSE)
    image[left] = FAINT
    return right, left, first_pixels(right, 250) | left, image


def test_density_features_against_dark_end_and_soft_tissue():
    right, left, opacity, image = dense_right_faint_left()
    lung = right | left
    result = compute_severity(lung, opacity, image=image)
    # dark end: the air strips (p5 = 0); soft tissue: the body between the lungs (230)
    assert result["right_opacity_density"] == round(DENSE / BODY, 3) and result["right_dense_opacity_pct"] == 25.0
    assert result["left_opacity_density"] == round(FAINT / BODY, 3) and result["left_dense_opacity_pct"] == 0.0
    clear = compute_severity(lung, np.zeros(SHAPE, bool), image=radiograph(lung, np.zeros(SHAPE, bool), FAINT))
    assert clear["right_opacity_density"] is None and clear["right_dense_opacity_pct"] == 0.0
    assert compute_severity(lung, opacity)["right_opacity_density"] is None  # no image, no density


def test_fitted_rules_score_extent_and_degree():
    right, left, opacity, image = dense_right_faint_left()
    lung = right | left
    published = compute_severity(lung, opacity, image=image)
    fitted = compute_severity(lung, opacity, image=image, rules=FITTED)
    assert (published["right_extent"], published["left_extent"]) == (2, 4)
    assert (fitted["right_extent"], fitted["left_extent"], fitted["geographic_extent"]) == (3, 4, 7)  # 25 % >= 24
    # right: dense (0.78 >= 0.5) and 25 % dense opacity (>= 20) -> white-out; left: faint -> ground glass
    assert (fitted["right_opacity_degree"], fitted["left_opacity_degree"], fitted["opacity_score"]) == (3, 1, 4)
    smaller = compute_severity(lung, first_pixels(right, 150), image=image, rules=FITTED)  # 15 %: one threshold
    assert (smaller["right_extent"], smaller["left_extent"], smaller["left_opacity_degree"]) == (1, 0, 0)
    measurements = [f"{side}_{name}" for side in ("right", "left") for name in ("opacity_pct", "opacity_density",
                    "dense_opacity_pct", "lung_area_px")]  # fmt: skip
    assert [fitted[key] for key in measurements] == [published[key] for key in measurements]  # rules change scores only


def test_extent_weighs_dense_opacity_when_the_rules_say_so():
    right, left, opacity, image = dense_right_faint_left()  # right: 25 % opacity, all dense; left: 100 %, faint
    lung = right | left
    weighted = SeverityRules((10.0, 60.0, 100.0, 200.0), 0.5, 20.0, extent_dense_weight=2.0)
    result = compute_severity(lung, opacity, image=image, rules=weighted)
    # extent measure: right 25 + 2 x 25 = 75 (reaches 10 and 60), left 100 + 2 x 0 = 100 (reaches 10, 60 and 100)
    assert (result["right_extent"], result["left_extent"], result["geographic_extent"]) == (2, 3, 5)
    unweighted = compute_severity(
        lung, opacity, image=image, rules=SeverityRules((10.0, 60.0, 100.0, 200.0), 0.5, 20.0)
    )
    assert (unweighted["right_extent"], unweighted["left_extent"]) == (1, 3)
    no_image = compute_severity(lung, opacity, rules=weighted)  # no dense opacity %: no extent rather than a guess
    assert no_image["geographic_extent"] is None and no_image["right_extent"] is None
    assert no_image["opacity_score"] is None and no_image["opacity_pct"] == result["opacity_pct"]
    with pytest.raises(ValueError, match="weight"):
        SeverityRules((10.0, 60.0, 100.0, 200.0), 0.5, 20.0, extent_dense_weight=-1.0)


def test_density_measured_when_no_clear_lung_is_left():
    right, left = lung_masks()
    lung = right | left
    result = compute_severity(lung, lung, image=radiograph(lung, lung, DENSE), rules=FITTED)
    assert result["right_opacity_density"] == result["left_opacity_density"] == round(DENSE / BODY, 3)
    assert result["right_dense_opacity_pct"] == result["left_dense_opacity_pct"] == 100.0
    assert (result["geographic_extent"], result["opacity_score"]) == (8, 6)

"""The synthetic-opacity augmentation: where it paints, what it labels, and its smooth noise."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from scripts.labels import BACKGROUND, CLEAR_LUNG, LUNG_UNANNOTATED, OPACITY
from scripts.synthetic_opacity import RandSyntheticOpacityd


def two_lungs(rows: int = 200, columns: int = 240) -> np.ndarray:
    """A label map with two elliptic lung fields: clear lung on the image's left, unannotated on its right."""
    row, column = np.mgrid[:rows, :columns]
    label = np.full((rows, columns), BACKGROUND, np.float32)
    label[((row - rows / 2) / (0.35 * rows)) ** 2 + ((column - 0.3 * columns) / (0.15 * columns)) ** 2 < 1] = CLEAR_LUNG
    right = ((row - rows / 2) / (0.35 * rows)) ** 2 + ((column - 0.7 * columns) / (0.15 * columns)) ** 2 < 1
    label[right] = LUNG_UNANNOTATED
    return label


@pytest.mark.parametrize("seed", range(6))
def test_opacity_is_painted_and_labelled_inside_the_lungs_only(seed):
    label = two_lungs()
    image = np.random.default_rng(seed).uniform(0.2, 0.4, label.shape).astype(np.float32)
    transform = RandSyntheticOpacityd(keys=["image", "label"], prob=1.0)
    transform.set_random_state(seed)
    out = transform({"image": torch.as_tensor(image)[None], "label": torch.as_tensor(label)[None]})
    painted, new_label = out["image"][0].numpy(), out["label"][0].numpy()
    lung = label != BACKGROUND
    region = new_label == OPACITY

    assert region.sum() > 0.02 * lung.sum()
    assert not (region & ~lung).any(), "opacity labelled outside the lung fields"
    np.testing.assert_array_equal(new_label[~region], label[~region])  # the rest keeps its label
    np.testing.assert_array_equal(painted[~lung], image[~lung])  # nothing painted outside the lungs
    assert (painted[region] - image[region]).mean() > 0.03  # the opacity is denser than the lung it covers


def test_nothing_changes_when_the_lung_field_is_too_small():
    label = np.zeros((64, 64), np.float32)
    label[30:35, 30:35] = CLEAR_LUNG
    image = torch.rand(1, 64, 64)
    transform = RandSyntheticOpacityd(keys=["image", "label"], prob=1.0, min_lung_pixels=500)
    out = transform({"image": image, "label": torch.as_tensor(label)[None]})
    assert torch.equal(out["image"], image) and torch.equal(out["label"][0], torch.as_tensor(label))


@pytest.mark.parametrize("shape, cells", [((256, 256), 3), ((256, 256), 29), ((200, 240), 7), ((517, 43), 12)])
def test_smooth_noise_is_the_cubic_zoom_of_its_coarse_grid(shape, cells):
    """The fast noise gives the values of its definition: the coarse grid zoomed by a cubic spline, then cropped."""
    fast = RandSyntheticOpacityd(keys=["image", "label"])
    fast.set_random_state(7)
    coarse = np.random.RandomState(7).standard_normal((cells + 2, cells + 2)).astype(np.float32)

    zoom = (shape[0] / cells, shape[1] / cells)
    fine = ndimage.zoom(coarse, zoom, order=3)[
        int(zoom[0]) : int(zoom[0]) + shape[0], int(zoom[1]) : int(zoom[1]) + shape[1]
    ]
    fine = np.pad(fine, ((0, shape[0] - fine.shape[0]), (0, shape[1] - fine.shape[1])), mode="edge")
    expected = (fine - fine.mean()) / (fine.std() + 1e-6)

    np.testing.assert_allclose(fast._smooth_noise(shape, cells), expected, atol=1e-5)

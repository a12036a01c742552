"""Synthesise lung opacities (faint ground glass to dense consolidation) inside the lung fields of a training image.

Only 10 radiographs carry opacity annotations, while 280 carry lung masks. This transform paints a smooth, textured
density increase into the lungs of a normalised image (values about 0-1, higher = denser) and marks it as opacity in
the label map. The painted region follows the lung outline (it never leaves the lung field), prefers the periphery
and the lower zones as COVID-19 pneumonia does, and covers a random fraction of one or both lungs. The rest of the
lung keeps its label: clear lung stays clear, unannotated lung stays unannotated (it may hold real opacity).
"""

from __future__ import annotations

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage

from scripts.labels import BACKGROUND, OPACITY


class RandSyntheticOpacityd(RandomizableTransform, MapTransform):
    """Paint a random opacity into the lungs of ``image_key`` and label it in ``label_key``.

    Custom: MONAI has no transform that paints lesions.

    Args:
        keys: ``[image_key, label_key]``.
        prob: probability of painting an opacity.
        extent_range: fraction of the chosen lung(s) covered.
        density_range: blend weight towards dense-tissue brightness (0.35 faint ground glass ... 0.9 consolidation).
        min_lung_pixels: images with a smaller lung field are left alone.
    """

    MIN_CONTRAST = 0.25  # the dense level lies at least this far above the median lung intensity

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        extent_range: tuple[float, float] = (0.05, 0.9),
        density_range: tuple[float, float] = (0.35, 0.9),
        min_lung_pixels: int = 500,
    ):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key = self.keys
        self.extent_range = extent_range
        self.density_range = density_range
        self.min_lung_pixels = min_lung_pixels

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        image, label = d[self.image_key], d[self.label_key]
        # numpy all through: torch operations on MetaTensors, run beside the training step, cost 3 x the painting
        label_array = np.array(label.detach().cpu().numpy())
        lung = label_array[0] != BACKGROUND
        if lung.sum() < self.min_lung_pixels:
            return d
        image_array = np.array(image.detach().cpu().numpy())
        image_array[0], region = self.paint(image_array[0].astype(np.float32), lung)
        label_array[0][region] = OPACITY
        d[self.image_key] = convert_to_dst_type(image_array, image)[0]  # the same type, dtype, device and metadata
        d[self.label_key] = convert_to_dst_type(label_array, label)[0]
        return d

    def paint(self, image: np.ndarray, lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the painted image and the boolean opacity region (inside ``lung``)."""
        rng = self.R
        rows, cols = lung.shape
        chosen = self._chosen_lungs(lung)
        field = self._smooth_noise((rows, cols), cells=rng.randint(3, 9))
        row_position = np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None]
        distance_to_border = ndimage.distance_transform_edt(chosen)
        periphery = 1.0 - distance_to_border / max(float(distance_to_border.max()), 1.0)
        field = field + rng.uniform(0.0, 0.8) * row_position + rng.uniform(0.0, 0.8) * periphery
        extent = rng.uniform(*self.extent_range)
        region = chosen & (field >= np.quantile(field[chosen], 1.0 - extent))
        blur = rng.uniform(0.005, 0.03) * rows
        weight = ndimage.gaussian_filter(region.astype(np.float32), sigma=blur) * lung
        region = (weight > 0.5) & chosen
        texture = 1.0 + rng.uniform(0.03, 0.12) * self._smooth_noise((rows, cols), cells=rng.randint(12, 30))
        lung_level = float(np.median(image[lung]))
        dense_level = max(float(np.quantile(image, 0.9)), min(lung_level + self.MIN_CONTRAST, 1.0))
        density = rng.uniform(*self.density_range)
        blend = np.clip(density * weight * texture, 0.0, 1.0)
        painted = image * (1.0 - blend) + dense_level * blend
        return painted.astype(np.float32), region

    def _chosen_lungs(self, lung: np.ndarray) -> np.ndarray:
        """Both lungs, or the half of the lung field on one side of the centre of mass."""
        choice = self.R.randint(3)  # 0 both, 1 image-left half, 2 image-right half
        if choice == 0:
            return lung
        centre = int(round(ndimage.center_of_mass(lung)[1]))
        side = np.zeros_like(lung)
        if choice == 1:
            side[:, :centre] = True
        else:
            side[:, centre:] = True
        chosen = lung & side
        return chosen if chosen.sum() > 0 else lung

    def _smooth_noise(self, shape: tuple[int, int], cells: int) -> np.ndarray:
        """Zero-mean, unit-variance noise that varies smoothly over about ``cells`` cells per side."""
        coarse = self.R.standard_normal((cells + 2, cells + 2)).astype(np.float32)
        rows_weights = _cubic_zoom_weights(cells + 2, shape[0], cells)
        columns_weights = _cubic_zoom_weights(cells + 2, shape[1], cells)
        fine = (rows_weights @ coarse.astype(np.float64) @ columns_weights.T).astype(np.float32)
        return (fine - fine.mean()) / (fine.std() + 1e-6)


def _cubic_zoom_weights(size: int, length: int, cells: int) -> np.ndarray:
    """The ``length`` x ``size`` matrix that does, along one axis, what the cubic ``ndimage.zoom`` by ``length / cells``
    does, cropped from ``int(length / cells)`` to ``length`` values (the last one repeated where the zoom comes short).

    Cubic-spline zoom is linear and separable, so a 2D zoom is two small matrix products: the same values, 15 x
    faster than zooming the whole grid and cropping it (tests/test_synthetic_opacity.py).
    """
    zoom = length / cells
    weights = ndimage.zoom(np.eye(size), (zoom, 1), order=3)
    offset = int(zoom)
    weights = weights[offset : offset + length]
    return np.pad(weights, ((0, length - weights.shape[0]), (0, 0)), mode="edge")

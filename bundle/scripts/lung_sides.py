"""Split a frontal chest X-ray lung mask into the patient's right and left lung.

Arrays are ``[row, column]`` as a viewer shows the image, so the image's left half (small column numbers) holds the
PATIENT'S RIGHT lung.

Rule (:func:`split_lungs`):

1. Label the connected components of the mask (8-connectivity). Components of at least 1 % of the total lung area
   are *big*; the largest component is always big. Smaller components are *specks*: they are kept and given a side.
2. Two or more big components: the two largest are the lungs; the one whose centroid column is smaller is the
   patient's right lung. Every other component joins the lung it lies nearest to (Euclidean pixel distance).
3. One big component holding at least ``MERGED_MIN_SHARE_PER_SIDE`` of its pixels on each side of the image centre
   column: both lungs merged into one component. It is split at a midline column, the column with the fewest lung
   pixels of that component between the 30th and 70th percentile of its column extent (the middle one when several
   columns tie).
   Pixels left of the midline are the right lung, the midline and pixels right of it the left lung; specks go by
   the same column test.
4. One big component on one side: one lung is missing. The component is the right lung when its centroid column lies
   left of the image centre column, else the left lung; specks join it (it is the nearest big component).
5. Empty mask: two empty masks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from scripts.bounding_box import bounding_box

MIN_BIG_COMPONENT_FRACTION = 0.01
MERGED_MIN_SHARE_PER_SIDE = 0.2
MIDLINE_SEARCH_RANGE = (0.3, 0.7)
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def split_lungs(lung_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(right_lung, left_lung)`` masks (patient's sides) of a 2D lung mask; ``> 0`` counts as lung."""
    lung = np.asarray(lung_mask) > 0
    if lung.ndim != 2:
        raise ValueError(f"expected a 2D lung mask, got shape {lung.shape}")
    if not lung.any():
        return np.zeros_like(lung), np.zeros_like(lung)

    # the work is done on the lung's bounding box (the result is the same: outside it there is no lung)
    box = bounding_box(lung)
    right_lung, left_lung = np.zeros_like(lung), np.zeros_like(lung)
    right_lung[box], left_lung[box] = _split_box(lung[box], (lung.shape[1] - 1) / 2 - box[1].start)
    return right_lung, left_lung


def _split_box(lung: np.ndarray, centre_column: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`split_lungs` of a lung mask cropped to its bounding box; ``centre_column``: the image's centre column
    in the box's columns."""
    components, count = ndimage.label(lung, structure=EIGHT_CONNECTIVITY)
    labels = np.arange(1, count + 1)
    lung_pixels = np.flatnonzero(components)  # row-major indices of the lung pixels only
    pixel_labels = components.ravel()[lung_pixels]
    sizes = np.bincount(pixel_labels, minlength=count + 1)[1:]
    column_sums = np.bincount(pixel_labels, weights=lung_pixels % lung.shape[1], minlength=count + 1)[1:]
    centroid_columns = column_sums / sizes
    by_size = labels[np.argsort(-sizes, kind="stable")]
    big = [label for label in by_size if sizes[label - 1] >= MIN_BIG_COMPONENT_FRACTION * sizes.sum()]
    big = big or [by_size[0]]

    if len(big) >= 2:
        right_label, left_label = sorted(big[:2], key=lambda label: centroid_columns[label - 1])
        return _split_two_lungs(components, labels, right_label, left_label)

    main = components == big[0]
    columns = np.nonzero(main)[1]
    share_left_of_centre = float(np.mean(columns < centre_column))
    if min(share_left_of_centre, 1.0 - share_left_of_centre) >= MERGED_MIN_SHARE_PER_SIDE:
        midline = _midline_column(main)
        right_lung = lung.copy()
        right_lung[:, midline:] = False
        return right_lung, lung & ~right_lung

    if columns.mean() < centre_column:
        return lung, np.zeros_like(lung)
    return np.zeros_like(lung), lung


def _split_two_lungs(components: np.ndarray, labels: np.ndarray, right_label: int, left_label: int):
    """Lungs from the two big components; every other component joins the nearest one."""
    joins_right = np.zeros(len(labels) + 1, dtype=bool)  # index 0 is the background
    joins_right[right_label] = True
    specks = labels[(labels != right_label) & (labels != left_label)]
    if len(specks):
        joins_right[specks] = _nearest_is_right(components, specks, right_label, left_label)
    right_lung = joins_right[components]
    return right_lung, (components > 0) & ~right_lung


def _nearest_is_right(components: np.ndarray, specks: np.ndarray, right_label: int, left_label: int) -> np.ndarray:
    """For each speck label, whether it lies nearer to the right lung than to the left one (ties: right).

    The lung pixel nearest to any outside pixel lies on the lung's border, so the distances are measured to the
    border pixels of both lungs only (a k-d tree), from every pixel of each speck.
    """
    from scipy.spatial import cKDTree

    lungs = (components == right_label) | (components == left_label)
    padded = np.pad(lungs, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    border_rows, border_columns = np.nonzero(lungs & ~interior)
    border_is_right = components[border_rows, border_columns] == right_label
    speck_rows, speck_columns = np.nonzero(np.isin(components, specks))
    speck_labels = components[speck_rows, speck_columns]
    tree = cKDTree(np.column_stack((border_rows, border_columns)))
    distance, nearest = tree.query(np.column_stack((speck_rows, speck_columns)))
    owner_is_right = border_is_right[nearest]
    order = np.lexsort((~owner_is_right, distance, speck_labels))  # per label: closest first, right first
    sorted_labels = speck_labels[order]
    first_of_label = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    closest = dict(zip(sorted_labels[first_of_label].tolist(), owner_is_right[order][first_of_label].tolist()))
    return np.array([closest[int(label)] for label in specks], dtype=bool)


def _midline_column(lung: np.ndarray) -> int:
    """Column with the fewest ``lung`` pixels in the central part of its column extent (the middle one on ties)."""
    pixels_per_column = lung.sum(axis=0)
    occupied = np.flatnonzero(pixels_per_column)
    first, last = occupied[0], occupied[-1]
    start = int(np.floor(first + MIDLINE_SEARCH_RANGE[0] * (last - first)))
    stop = int(np.ceil(first + MIDLINE_SEARCH_RANGE[1] * (last - first)))
    central = pixels_per_column[start : stop + 1]
    fewest = np.flatnonzero(central == central.min())
    return start + int(fewest[len(fewest) // 2])

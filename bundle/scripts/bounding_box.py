"""The bounding box of a 2D mask, for work that only needs the pixels in and around it."""

from __future__ import annotations

import numpy as np


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice] | None:
    """(rows, columns) slices of the smallest box holding every set pixel of ``mask``, widened by ``margin`` pixels
    on each side within the array; None when no pixel is set."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return (
        slice(max(0, rows[0] - margin), rows[-1] + margin + 1),
        slice(max(0, columns[0] - margin), columns[-1] + margin + 1),
    )

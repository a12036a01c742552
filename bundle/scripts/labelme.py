"""Turn LabelMe annotations (``right_lung``, ``left_lung``, ``opacity``) into the bundle's label maps.

Labels are matched strictly, so that a typo never turns opacity into clear lung or a lung into background:

- accepted labels: ``right_lung``, ``left_lung``, ``opacity``;
- aliases: only spellings of these exact words that differ in letter case, surrounding spaces, or the separator
  between the words (any run of spaces, hyphens or underscores): ``Right Lung``, ``right-lung``, ``RIGHT_LUNG`` and
  `` Opacity`` are accepted; ``opacty``, ``rightlung``, ``right_lungs`` or ``lung`` are not;
- any other label is an error naming the file, the shape (its index in ``shapes``) and the label. There is no ignore
  list: a file with other objects drawn (e.g. ``heart``) must have them removed or renamed first.

Shapes of an accepted label:

- ``polygon`` (also a shape without ``shape_type``): filled as LabelMe draws it. A polygon with fewer than 3
  distinct points or with all its points on one line (no area) is refused. A self-intersecting polygon (a bow-tie,
  an outline that crosses or retraces itself) covers every pixel its outline encloses: each pixel that cannot be
  reached from outside without crossing the outline, plus the outline. A bow-tie keeps both lobes and a star drawn as
  one crossing outline keeps its centre (the even-odd fill would leave holes where the outline overlaps itself);
- ``rectangle`` (two opposite corners) and ``circle`` (centre and a point on the circle) are filled as LabelMe fills
  them; a rectangle without width or height or a circle without radius is refused;
- any other shape type (``line``, ``linestrip``, ``point``, ``points``, ``mask``...) is refused: it has no area.
"""

from __future__ import annotations

import base64
import difflib
import io
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from scripts.labels import BACKGROUND, CLEAR_LUNG, OPACITY
from scripts.radiograph_io import RadiographError

LUNG_LABELS = ("right_lung", "left_lung")
OPACITY_LABEL = "opacity"
ACCEPTED_LABELS = (*LUNG_LABELS, OPACITY_LABEL)
AREA_SHAPE_TYPES = ("polygon", "rectangle", "circle")


@dataclass
class LabelMeAnnotation:
    """Shapes of one LabelMe file, rasterised to masks of the image's size (rows x columns)."""

    json_path: str
    image_path: str | None  # None when the image is only embedded as imageData
    embedded_image: bytes | None
    right_lung: np.ndarray
    left_lung: np.ndarray
    opacity: np.ndarray  # clipped to the lung fields

    @property
    def lung(self) -> np.ndarray:
        return self.right_lung | self.left_lung

    def label_map(self) -> np.ndarray:
        """0 background, 1 clear lung, 2 opacity: every lung pixel is annotated."""
        labels = np.full(self.lung.shape, BACKGROUND, dtype=np.uint8)
        labels[self.lung] = CLEAR_LUNG
        labels[self.opacity] = OPACITY
        return labels


def canonical_label(label) -> str | None:
    """The accepted label that ``label`` spells (case, surrounding spaces and word separators ignored), else None."""
    key = re.sub(r"[\s_\-]+", "_", str(label).strip().lower())
    return key if key in ACCEPTED_LABELS else None


def _unknown_label_problem(index: int, label) -> str:
    close = difflib.get_close_matches(str(label).strip().lower(), ACCEPTED_LABELS, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"shapes[{index}] has unknown label {label!r}{hint}; accepted labels: {', '.join(ACCEPTED_LABELS)} "
        "(letter case and spaces, hyphens or underscores between the words do not matter)"
    )


def _clip(points: np.ndarray, rows: int, columns: int) -> list[tuple[float, float]]:
    return [(min(max(float(x), 0.0), columns - 1.0), min(max(float(y), 0.0), rows - 1.0)) for x, y in points]


def _segments_cross(points: np.ndarray) -> bool:
    """Whether two non-adjacent edges of the closed polygon ``points`` (N, 2) cross or touch."""
    count = len(points)
    if count < 4:
        return False
    start, end = points, np.roll(points, -1, axis=0)

    def orientation(a, b, c):  # sign of the turn a -> b -> c
        ab, ac = b - a, c - a
        return np.sign(ab[..., 0] * ac[..., 1] - ab[..., 1] * ac[..., 0])

    def within(a, b, c):  # c inside the bounding box of segment a-b
        return (
            (np.minimum(a[..., 0], b[..., 0]) <= c[..., 0])
            & (c[..., 0] <= np.maximum(a[..., 0], b[..., 0]))
            & (np.minimum(a[..., 1], b[..., 1]) <= c[..., 1])
            & (c[..., 1] <= np.maximum(a[..., 1], b[..., 1]))
        )

    index = np.arange(count)
    for first in range(0, count, 256):  # bounded memory for long outlines
        i = index[first : first + 256, None]
        a, b = start[i[:, 0]][:, None, :], end[i[:, 0]][:, None, :]
        c, d = start[None, :, :], end[None, :, :]
        o1, o2, o3, o4 = orientation(a, b, c), orientation(a, b, d), orientation(c, d, a), orientation(c, d, b)
        crossing = (o1 * o2 < 0) & (o3 * o4 < 0)
        touching = ((o1 == 0) & within(a, b, c)) | ((o2 == 0) & within(a, b, d))
        touching |= ((o3 == 0) & within(c, d, a)) | ((o4 == 0) & within(c, d, b))
        adjacent = (np.abs(i - index[None, :]) <= 1) | (np.abs(i - index[None, :]) == count - 1)
        if ((crossing | touching) & ~adjacent).any():
            return True
    return False


def polygon_mask(points, rows: int, columns: int) -> np.ndarray:
    """Rasterise one polygon as LabelMe does (PIL polygon fill), vertices clipped to the image.

    A self-intersecting polygon also covers every pixel its outline encloses (see the module docstring).
    """
    from PIL import Image, ImageDraw
    from scipy.ndimage import binary_fill_holes

    vertices = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    clipped = _clip(vertices, rows, columns)
    canvas = Image.new("L", (columns, rows), 0)
    if len(clipped) >= 3:
        ImageDraw.Draw(canvas).polygon(clipped, outline=1, fill=1)
    mask = np.asarray(canvas, dtype=bool)
    distinct = vertices[np.any(vertices != np.roll(vertices, 1, axis=0), axis=1)]  # no repeated consecutive points
    if len(distinct) >= 4 and _segments_cross(distinct):
        canvas = Image.new("L", (columns, rows), 0)
        ImageDraw.Draw(canvas).line([*clipped, clipped[0]], fill=1)
        outline = np.asarray(canvas, dtype=bool)  # the polygon fill above already holds the outline
        mask = mask | (binary_fill_holes(outline) & ~outline)
    return mask


def _shape_points(shape: dict, index: int, label: str) -> np.ndarray:
    """The shape's points as a finite (N, 2) float array, or :class:`ValueError` saying what is wrong."""
    try:
        points = np.asarray(shape.get("points"), dtype=np.float64)
    except (TypeError, ValueError):
        points = np.empty((0, 0))
    if points.ndim != 2 or points.shape[1] != 2 or not np.isfinite(points).all():
        raise ValueError(f"shapes[{index}] ({label!r}) has points that are not a list of finite [x, y] pairs")
    return points


def shape_mask(shape: dict, index: int, label: str, rows: int, columns: int) -> np.ndarray:
    """Mask of one shape of an accepted label; :class:`ValueError` naming the shape when it cannot be filled."""
    from PIL import Image, ImageDraw

    where = f"shapes[{index}] ({label!r})"
    shape_type = shape.get("shape_type") or "polygon"
    if shape_type not in AREA_SHAPE_TYPES:
        raise ValueError(f"{where} is a {shape_type!r}, which has no area; draw it as a {' / '.join(AREA_SHAPE_TYPES)}")
    points = _shape_points(shape, index, label)
    if shape_type == "polygon":
        distinct = np.unique(points, axis=0)
        if len(distinct) < 3:
            raise ValueError(f"{where} is a polygon with {len(distinct)} distinct points; at least 3 are needed")
        if np.linalg.matrix_rank(distinct - distinct[0], tol=1e-9) < 2:
            raise ValueError(f"{where} is a polygon with no area: all its points lie on one line")
        return polygon_mask(points, rows, columns)
    if len(points) != 2:
        raise ValueError(f"{where} is a {shape_type} with {len(points)} points; LabelMe stores 2")
    canvas = Image.new("L", (columns, rows), 0)
    draw = ImageDraw.Draw(canvas)
    (x0, y0), (x1, y1) = points
    if shape_type == "rectangle":
        if x0 == x1 or y0 == y1:
            raise ValueError(f"{where} is a rectangle with no area (zero width or height)")
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        draw.polygon(_clip(np.asarray(corners), rows, columns), outline=1, fill=1)
    else:  # circle: centre and a point on the circle
        radius = math.hypot(x1 - x0, y1 - y0)
        if radius == 0:
            raise ValueError(f"{where} is a circle with no radius")
        draw.ellipse([x0 - radius, y0 - radius, x0 + radius, y0 + radius], outline=1, fill=1)
    return np.asarray(canvas, dtype=bool)


def annotated_image_path(json_path: str, image_path: str | None) -> str | None:
    """A LabelMe file's ``imagePath`` (relative to the JSON file) when that file exists, else None."""
    if not image_path:
        return None
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(json_path)), str(image_path)))
    return path if os.path.isfile(path) else None


def read_labelme(json_path: str) -> LabelMeAnnotation:
    """Parse a LabelMe JSON file; raise :class:`RadiographError` naming the file and the problem."""
    try:
        with open(json_path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError) as error:
        raise RadiographError(json_path, f"cannot read LabelMe JSON ({error})") from error
    try:
        rows, columns = int(document["imageHeight"]), int(document["imageWidth"])
        shapes = list(document["shapes"])
    except (KeyError, TypeError, ValueError) as error:
        raise RadiographError(json_path, f"not a LabelMe annotation (missing {error})") from error
    masks = {name: np.zeros((rows, columns), dtype=bool) for name in ACCEPTED_LABELS}
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict):
            raise RadiographError(json_path, f"shapes[{index}] is not a LabelMe shape")
        label = canonical_label(shape.get("label", ""))
        if label is None:
            raise RadiographError(json_path, _unknown_label_problem(index, shape.get("label", "")))
        try:
            masks[label] |= shape_mask(shape, index, label, rows, columns)
        except ValueError as error:
            raise RadiographError(json_path, str(error)) from error
    if not (masks["right_lung"] | masks["left_lung"]).any():
        raise RadiographError(json_path, "LabelMe file has no right_lung or left_lung polygon")
    image_path = annotated_image_path(json_path, document.get("imagePath"))
    embedded = base64.b64decode(document["imageData"]) if document.get("imageData") else None
    if embedded is None and image_path is None:
        missing = document.get("imagePath")
        raise RadiographError(json_path, f"image {missing!r} not found beside it and no imageData embedded")
    lung = masks["right_lung"] | masks["left_lung"]
    return LabelMeAnnotation(
        json_path=str(json_path),
        image_path=image_path,
        embedded_image=embedded,
        right_lung=masks["right_lung"],
        left_lung=masks["left_lung"] & ~masks["right_lung"],
        opacity=masks[OPACITY_LABEL] & lung,
    )


def embedded_image_array(annotation: LabelMeAnnotation) -> np.ndarray:
    """Decode the annotation's embedded imageData as an array (rows x columns [x channels])."""
    from PIL import Image

    with Image.open(io.BytesIO(annotation.embedded_image)) as image:
        return np.asarray(image)

"""Turn LabelMe polygon annotations (``right_lung``, ``left_lung``, ``opacity``) into the bundle's label maps."""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass

import numpy as np

from scripts.labels import BACKGROUND, CLEAR_LUNG, OPACITY
from scripts.radiograph_io import RadiographError

LUNG_LABELS = ("right_lung", "left_lung")
OPACITY_LABEL = "opacity"


@dataclass
class LabelMeAnnotation:
    """Polygons of one LabelMe file, rasterised to masks of the image's size (rows x columns)."""

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


def polygon_mask(points, rows: int, columns: int) -> np.ndarray:
    """Rasterise one polygon as LabelMe does (PIL polygon fill), vertices clipped to the image."""
    from PIL import Image, ImageDraw

    clipped = [(min(max(float(x), 0.0), columns - 1.0), min(max(float(y), 0.0), rows - 1.0)) for x, y in points]
    canvas = Image.new("L", (columns, rows), 0)
    if len(clipped) >= 3:
        ImageDraw.Draw(canvas).polygon(clipped, outline=1, fill=1)
    return np.asarray(canvas, dtype=bool)


def read_labelme(json_path: str) -> LabelMeAnnotation:
    """Parse a LabelMe JSON file; raise :class:`RadiographError` naming the file and the problem."""
    try:
        with open(json_path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError) as error:
        raise RadiographError(json_path, f"cannot read LabelMe JSON ({error})") from error
    try:
        rows, columns = int(document["imageHeight"]), int(document["imageWidth"])
        shapes = document["shapes"]
    except (KeyError, TypeError, ValueError) as error:
        raise RadiographError(json_path, f"not a LabelMe annotation (missing {error})") from error
    masks = {name: np.zeros((rows, columns), dtype=bool) for name in (*LUNG_LABELS, OPACITY_LABEL)}
    for shape in shapes:
        label = str(shape.get("label", "")).strip().lower()
        if label in masks and shape.get("shape_type", "polygon") == "polygon":
            masks[label] |= polygon_mask(shape.get("points", []), rows, columns)
    if not (masks["right_lung"] | masks["left_lung"]).any():
        raise RadiographError(json_path, "LabelMe file has no right_lung or left_lung polygon")
    image_path = document.get("imagePath")
    if image_path:
        image_path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(json_path)), image_path))
    embedded = base64.b64decode(document["imageData"]) if document.get("imageData") else None
    if embedded is None and (not image_path or not os.path.isfile(image_path)):
        raise RadiographError(json_path, f"image {image_path!r} not found and no imageData embedded")
    lung = masks["right_lung"] | masks["left_lung"]
    return LabelMeAnnotation(
        json_path=str(json_path),
        image_path=image_path if image_path and os.path.isfile(image_path) else None,
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

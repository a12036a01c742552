"""Draw the predicted lung outline and opacity fill over a radiograph for a person to look at."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from scripts.bounding_box import bounding_box

LUNG_OUTLINE_RGB = (0, 220, 255)
OPACITY_FILL_RGB = (255, 60, 40)
OPACITY_ALPHA = 0.4
# RGB of every grey level (0-255) under the translucent opacity fill
OPACITY_BLEND = np.rint(
    (1 - OPACITY_ALPHA) * np.arange(256, dtype=np.float32)[:, None] + OPACITY_ALPHA * np.float32(OPACITY_FILL_RGB)
).astype(np.uint8)


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels (chessboard distance) of its border."""
    width = max(1, width)
    edge = np.zeros_like(mask, dtype=bool)
    box = bounding_box(mask, margin=width)  # beyond the mask's box and this margin the filter sees background only
    if box is None:
        return edge
    eroded = ndimage.minimum_filter(mask[box], size=2 * width + 1, mode="constant", cval=False)
    edge[box] = mask[box] & ~eroded
    return edge


def display_shape(rows: int, columns: int, max_side: int | None) -> tuple[int, int]:
    """(rows, columns) of an image shrunk to ``max_side`` pixels on its longest side (aspect kept; never enlarged)."""
    longest = max(rows, columns)
    if not max_side or longest <= max_side:
        return rows, columns
    scale = max_side / longest
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def shrink(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 or boolean ``array`` box-averaged to ``shape``; a mask keeps the pixels at least half covered."""
    if array.shape == shape:
        return array
    from PIL import Image

    pixels = array.astype(np.uint8) * 255 if array.dtype == bool else array
    shrunk = np.asarray(Image.fromarray(pixels).resize(shape[::-1], Image.BOX))
    return shrunk >= 128 if array.dtype == bool else shrunk


def draw_overlay(
    display: np.ndarray, lung: np.ndarray, opacity: np.ndarray, caption: str, max_side: int | None = None
) -> np.ndarray:
    """RGB uint8 image: grey radiograph, translucent opacity fill, lung outline and a caption in the top-left; at most
    ``max_side`` pixels on its longest side (None: the radiograph's size).

    Not MONAI's blend_images: it draws no outline or caption and is 2x slower at 2000 x 2000 (benchmark_transforms.py).
    """
    from PIL import Image, ImageDraw, ImageFont

    shape = display_shape(*np.shape(display)[:2], max_side)
    display = shrink(np.asarray(display, dtype=np.uint8), shape)
    lung, opacity = shrink(np.asarray(lung, dtype=bool), shape), shrink(np.asarray(opacity, dtype=bool), shape)
    rgb = np.repeat(display[..., None], 3, axis=2)
    rgb[opacity] = OPACITY_BLEND[display[opacity]]
    rgb[outline(lung, width=max(1, max(lung.shape) // 400))] = LUNG_OUTLINE_RGB
    image = Image.fromarray(rgb)
    size = max(12, max(lung.shape) // 40)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((size // 2, size // 2), caption, font=font)
    draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
    draw.text((size // 2, size // 2), caption, fill=(255, 255, 255), font=font)
    return np.asarray(image)

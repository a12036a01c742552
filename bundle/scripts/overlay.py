"""Draw the predicted lung outline and opacity fill over a radiograph for a person to look at."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LUNG_OUTLINE_RGB = (0, 220, 255)
OPACITY_FILL_RGB = (255, 60, 40)
OPACITY_ALPHA = 0.4


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its border."""
    return mask & ~ndimage.binary_erosion(mask, iterations=max(1, width))


def draw_overlay(display: np.ndarray, lung: np.ndarray, opacity: np.ndarray, caption: str) -> np.ndarray:
    """RGB uint8 image: grey radiograph, translucent opacity fill, lung outline and a caption in the top-left."""
    from PIL import Image, ImageDraw, ImageFont

    rgb = np.repeat(display[..., None], 3, axis=2).astype(np.float32)
    rgb[opacity] = (1 - OPACITY_ALPHA) * rgb[opacity] + OPACITY_ALPHA * np.asarray(OPACITY_FILL_RGB, np.float32)
    rgb[outline(lung, width=max(1, max(lung.shape) // 400))] = LUNG_OUTLINE_RGB
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    size = max(12, max(lung.shape) // 40)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((size // 2, size // 2), caption, font=font)
    draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
    draw.text((size // 2, size // 2), caption, fill=(255, 255, 255), font=font)
    return np.asarray(image)

#!/usr/bin/env python
"""Write a folder of constructed images that are NOT frontal chest radiographs, to measure the input gate.

Kinds (file names ``<kind>_<nnn>.<ext>``, so ``scripts/measure_input_gate.py --by-kind`` counts them apart):

* ``noise``: white or smoothed random noise;
* ``photo``: a colour photograph-like picture (smooth gradients, filled shapes), PNG or JPEG;
* ``ct``: a CT-like axial chest slice (round body, bright rim of bone, two dark lungs, spine, dark air);
* ``black``: an almost black image (values 0-3);
* ``negative``: a photographic negative of a radiograph (of ``--negatives-of`` images, else of phantoms);
* ``lateral``: a lateral-like chest view (one lung field across the middle, spine at the back, heart in front);
* ``document``: a white page with lines of black text;
* ``tagct``, ``taglateral``, ``tagknee``: a frontal phantom radiograph in a DICOM file whose Modality is CT, whose
  ViewPosition is LL, or whose BodyPartExamined is KNEE.

Every image is seeded (``--seed``), and the sizes cycle through :data:`SIZES`.

Example:
  python scripts/non_chest_images.py --output /tmp/non_chest --count 10 --negatives-of ../shared/data/cohen-cxr/images
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import phantoms  # noqa: E402

SIZES = ((256, 256), (480, 400), (300, 420), (640, 640))  # (rows, columns)
KINDS = ("noise", "photo", "ct", "black", "negative", "lateral", "document", "tagct", "taglateral", "tagknee")
DICOM_TAGS = {  # kind -> the DICOM attribute that makes the phantom not a frontal chest radiograph
    "tagct": ("Modality", "CT"),
    "taglateral": ("ViewPosition", "LL"),
    "tagknee": ("BodyPartExamined", "KNEE"),
}


def _grid(rows: int, columns: int):
    """Normalised (v, u) coordinates of the pixel centres: v down the rows, u along the columns, both 0..1."""
    r, c = np.mgrid[0:rows, 0:columns].astype(np.float32)
    return (r + 0.5) / rows, (c + 0.5) / columns


def noise_image(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise, smoothed by a random blur of 0 to 4 pixels (0..1 float)."""
    image = rng.random((rows, columns)).astype(np.float32)
    sigma = float(rng.choice([0.0, 1.0, 2.0, 4.0]))
    if sigma:
        image = ndimage.gaussian_filter(image, sigma)
        image = (image - image.min()) / (np.ptp(image) or 1.0)
    return image


def photo_image(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 picture: a colour gradient sky and ground with filled circles and rectangles, gently blurred."""
    v, u = _grid(rows, columns)
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = top * (1 - v[..., None]) + bottom * v[..., None]
    for _ in range(rng.integers(4, 9)):
        colour = rng.uniform(0, 255, 3)
        centre_u, centre_v, size = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
        if rng.random() < 0.5:
            shape = np.hypot(u - centre_u, v - centre_v) < size
        else:
            shape = (np.abs(u - centre_u) < size) & (np.abs(v - centre_v) < size * rng.uniform(0.3, 1.5))
        image[shape] = colour
    image = ndimage.gaussian_filter(image, (1.0, 1.0, 0)) + rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def ct_image(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """CT-like axial chest slice (0..1): dark air, round body, bright bony rim, two dark lungs, spine and table."""
    v, u = _grid(rows, columns)
    aspect = columns / rows
    x, y = (u - 0.5) * aspect, v - 0.5  # isotropic coordinates, centred
    width, height = rng.uniform(0.36, 0.44) * min(aspect, 1), rng.uniform(0.28, 0.36)
    body = (x / width) ** 2 + (y / height) ** 2 <= 1
    inner = (x / (width - 0.03)) ** 2 + (y / (height - 0.03)) ** 2 <= 1
    image = np.full((rows, columns), 0.02, dtype=np.float32)
    image[body] = 0.45
    image[body & ~inner] = 0.85  # ribs and chest wall as a bright ring
    for side in (-1, 1):
        lung = ((x - side * 0.45 * width) / (0.4 * width)) ** 2 + ((y + 0.02) / (0.7 * height)) ** 2 <= 1
        image[lung & inner] = 0.08 + 0.04 * rng.random()
    spine = np.hypot(x, y - 0.75 * height) < 0.06
    image[spine] = 0.95
    table = (y > height + 0.04) & (y < height + 0.06) & (np.abs(x) < 0.45 * aspect)
    image[table] = 0.6
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 0.02, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


def black_image(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 image of values 0-3: sensor noise on black, sometimes with a faint gradient."""
    v, u = _grid(rows, columns)
    image = rng.integers(0, 2, (rows, columns)) + (2 * u * v if rng.random() < 0.5 else 0)
    return np.clip(np.rint(image), 0, 3).astype(np.uint8)


def lateral_image(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """Lateral-like chest view (0..1): one lung field across the middle, spine at the back, heart at the front."""
    v, u = _grid(rows, columns)
    front_on_left = rng.random() < 0.5
    depth = u if front_on_left else 1 - u  # 0 at the patient's front
    body = ((u - 0.5) / 0.42) ** 2 + ((v - 0.58) / 0.6) ** 2 <= 1
    image = np.full((rows, columns), 0.04, dtype=np.float32)
    image[body] = (0.5 + 0.15 * v)[body]
    lung = (((depth - 0.5) / 0.3) ** 2 + ((v - 0.48) / 0.3) ** 2 <= 1) & body
    image[lung] = 0.18
    heart = ((depth - 0.3) / 0.16) ** 2 + ((v - 0.62) / 0.14) ** 2 <= 1
    image[heart & lung] = 0.5
    spine = np.exp(-(((depth - 0.85) / 0.05) ** 2)) * body
    image += 0.3 * spine
    image = ndimage.gaussian_filter(image, 1.5) + rng.normal(0, 0.01, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


def document_image(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 white page with lines of black text (Pillow's built-in font), a title and margins."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("L", (columns, rows), 250)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default()
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     ,."))
    line_height = max(10, rows // 40)
    for top in range(int(0.06 * rows), int(0.94 * rows), line_height):
        text = "".join(rng.choice(letters, size=max(10, columns // 7)))
        draw.text((int(0.06 * columns), top), text, fill=int(rng.integers(0, 40)), font=font)
    return np.asarray(page)


def negative_image(radiograph01: np.ndarray) -> np.ndarray:
    """Photographic negative of a radiograph scaled 0..1: the lungs become bright, bone and soft tissue dark."""
    return 1.0 - np.asarray(radiograph01, dtype=np.float32)


def _radiographs_to_invert(folder: str | None, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` radiographs scaled 0..1: files of ``folder`` (a seeded choice) or, without it, phantoms."""
    if folder is None:
        return [phantoms.make_phantom(*SIZES[index % len(SIZES)], seed=int(rng.integers(1 << 30))).image
                for index in range(count)]  # fmt: skip
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle"))
    from scripts.inference_inputs import list_inputs
    from scripts.radiograph_io import read_radiograph

    paths = [str(item["image"]) for item in list_inputs(folder)]
    images = []
    for path in rng.choice(paths, size=min(count, len(paths)), replace=False):
        pixels = read_radiograph(str(path)).pixels
        low, high = np.percentile(pixels, [0.5, 99.5])
        images.append(np.clip((pixels - low) / max(high - low, 1e-6), 0, 1))
    return images


def write_tagged_dicom(path: str, image01: np.ndarray, attribute: str, value: str) -> None:
    """A phantom DICOM (scripts/phantoms.py) with one attribute (Modality, ViewPosition, ...) set to ``value``."""
    import pydicom

    phantoms.write_dicom(path, image01, bits=12, spacing_mm=(0.15, 0.15))
    dataset = pydicom.dcmread(path)
    setattr(dataset, attribute, value)
    dataset.save_as(path, enforce_file_format=True)


def write_non_chest_images(output_dir: str, count: int = 10, seed: int = 0, negatives_of: str | None = None,
                           kinds=KINDS) -> dict[str, list[str]]:  # fmt: skip
    """Write ``count`` images of each of ``kinds`` into ``output_dir``; returns the paths per kind."""
    os.makedirs(output_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    generators = {"noise": noise_image, "ct": ct_image, "black": black_image, "lateral": lateral_image,
                  "document": document_image, "photo": photo_image}  # fmt: skip
    written: dict[str, list[str]] = {}
    for kind in kinds:
        paths = []
        sources = _radiographs_to_invert(negatives_of, count, rng) if kind == "negative" else None
        for index in range(count if sources is None else len(sources)):
            rows, columns = SIZES[index % len(SIZES)]
            stem = os.path.join(output_dir, f"{kind}_{index:03d}")
            if kind in DICOM_TAGS:
                phantom = phantoms.make_phantom(rows, columns, seed=int(rng.integers(1 << 30)))
                paths.append(stem + ".dcm")
                write_tagged_dicom(paths[-1], phantom.image, *DICOM_TAGS[kind])
            elif kind == "negative":
                paths.append(stem + ".png")
                phantoms.write_png(paths[-1], negative_image(sources[index]))
            else:
                image = generators[kind](rows, columns, rng)
                paths.append(stem + (".jpg" if kind == "photo" and index % 2 else ".png"))
                _write_picture(paths[-1], image)
        written[kind] = paths
    return written


def _write_picture(path: str, image: np.ndarray) -> None:
    """uint8 arrays (grey or RGB) as they are; float 0..1 arrays through phantoms.write_png."""
    from PIL import Image

    if image.dtype == np.uint8:
        Image.fromarray(image).save(path, **({"quality": 92} if path.endswith(".jpg") else {}))
    else:
        phantoms.write_png(path, image)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the images into")
    parser.add_argument("--count", type=int, default=10, help="images of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negatives-of", help="folder of radiographs to invert (default: phantoms)")
    parser.add_argument("--kind", action="append", choices=KINDS, help="only these kinds (repeatable)")
    args = parser.parse_args(argv)
    written = write_non_chest_images(args.output, args.count, args.seed, args.negatives_of, args.kind or KINDS)
    print(f"wrote {sum(map(len, written.values()))} images of {len(written)} kinds to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

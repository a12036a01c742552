#!/usr/bin/env python
"""A hand-written baseline of the bundle's inference: the same outputs from a plain loop, without MONAI.

It is what a user would write instead of running the bundle, the fastest obvious way, and what
``scripts/benchmark.py`` times the bundle against. For every PNG or JPEG radiograph of a folder, in name order, one
at a time: decode it (Pillow, EXIF orientation applied, colour to BT.601 grey), area-resize it to the network size,
scale it by its 0.5-99.5 intensity percentiles, run the bundle's network exported to ONNX on ONNX Runtime, softmax,
resize the probabilities back to full size (bilinear), take the most probable class, and write

* ``<output>/<stem>/<stem>_lung.png`` and ``_opacity.png`` (0/255, the input's size) and ``_overlay.png`` (the
  radiograph with the opacity fill, the lung outline and a caption, at most 1024 pixels on its longest side as the
  bundle draws it; left out with ``--no-overlays``);
* ``<output>/severity.csv``: one row per image with the bundle's columns and figures, computed by the bundle's
  pure-numpy functions (input gate, lung sides, severity, and the overlay's drawing; ``scripts.*`` of bundle/, which
  import no MONAI).

No MONAI in the loop: Pillow, numpy, scipy and ONNX Runtime. The ONNX model is ``--onnx``, or the bundle's export
(``scripts/export_onnx.py``, which needs torch and MONAI once) of ``--checkpoint`` at ``--size``, kept in a cache
file named after the checkpoint's SHA-256. Not covered: DICOM and NIfTI inputs, resuming, streamed tables.

  .venv/bin/python scripts/baseline_inference.py --images <folder> --output <folder> [--no-overlays]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUNDLE = os.path.join(ROOT, "bundle")
if BUNDLE not in sys.path:
    sys.path.insert(0, BUNDLE)  # ``scripts`` is the bundle's package

from scripts.input_gate import assess_input  # noqa: E402
from scripts.lung_sides import split_lungs  # noqa: E402
from scripts.overlay import draw_overlay  # noqa: E402
from scripts.radiograph_io import rgb_to_grey  # noqa: E402
from scripts.severity import NoLungFoundError, compute_severity  # noqa: E402
from scripts.severity_calibration import file_sha256, load_calibration  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_CHECKPOINT = os.path.join(BUNDLE, "models", "model.pt")
DEFAULT_CALIBRATION = os.path.join(BUNDLE, "models", "severity_calibration.json")
MIN_LUNG_FRACTION = 0.02  # as common.yaml's min_lung_fraction
NETWORK_SIZE = 256  # as common.yaml's image_size: rows = columns of the network input
OVERLAY_MAX_SIDE = 1024  # as inference.yaml's overlay_max_side: longest side of the overlay
PERCENTILES = (0.5, 99.5)  # intensity scaling of the network input and of the grey display copy
DISPLAY_SAMPLE = 256  # the display copy's percentiles come from a strided sample of about this many pixels a side
PNG_COMPRESS_LEVEL = 1  # as the bundle writes its PNGs
BACKGROUND, OPACITY = 0, 2  # classes of the network: background, lung, opacity
COLUMNS = [
    "image", "status", "message", "warning", "lung_area_px", "opacity_area_px", "opacity_pct", "right_opacity_pct",
    "left_opacity_pct", "geographic_extent", "opacity_score", "lung_area_cm2", "opacity_area_cm2", "right_extent",
    "left_extent", "right_opacity_degree", "left_opacity_degree", "right_lung_area_px", "left_lung_area_px", "rows",
    "columns", "pixel_spacing_mm", "right_opacity_density", "left_opacity_density", "right_dense_opacity_pct",
    "left_dense_opacity_pct", "severity_rules",
]  # fmt: skip


@dataclass
class Model:
    """An ONNX Runtime session of the network, its input size, and the severity rules the rows are scored with."""

    session: object
    size: tuple[int, int]  # (rows, columns) of the network input
    rules: object  # scripts.severity.SeverityRules, or None for the published rules
    rules_name: str  # the severity_rules column: "calibrated" or "published"


def export_model(checkpoint: str, size: int, cache_dir: str | None = None) -> str:
    """The bundle's ONNX export of ``checkpoint`` at ``size`` x ``size``, written once into a cache file."""
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "cxr_baseline_onnx")
    path = os.path.join(cache_dir, f"{file_sha256(checkpoint)[:16]}_{size}.onnx")
    if not os.path.isfile(path):
        import export_onnx  # the repository's tool (torch, MONAI): only here, never in the loop

        os.makedirs(cache_dir, exist_ok=True)
        temporary = f"{path}.{os.getpid()}.onnx"
        export_onnx.main(["--checkpoint", checkpoint, "--output", temporary, "--size", str(size)])
        os.replace(temporary, path)
    return path


def load_model(onnx_path: str, calibration: str | None = DEFAULT_CALIBRATION, checkpoint: str | None = None) -> Model:
    """An ONNX Runtime session with default options (all cores) and the severity rules of ``calibration``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    rows, columns = (int(size) for size in session.get_inputs()[0].shape[-2:])
    sha256 = file_sha256(checkpoint) if checkpoint and os.path.isfile(checkpoint) else None
    rules, record = load_calibration(calibration, sha256)
    return Model(session, (rows, columns), rules, record["rules"])


def list_images(folder: str) -> list[str]:
    """The PNG and JPEG files of ``folder``, in name order."""
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))]


def read_grey(path: str) -> np.ndarray:
    """The radiograph as float32 (rows, columns) in viewer orientation; colour becomes BT.601 luma."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode not in ("L", "LA", "I", "I;16", "I;16B", "F", "RGB", "RGBA"):
            image = image.convert("RGB")
        pixels = np.asarray(image)
    if pixels.ndim == 3:  # grey + alpha, or colour
        pixels = pixels[..., 0] if pixels.shape[2] == 2 else rgb_to_grey(pixels)
    return pixels.astype(np.float32)


def display_grey(pixels: np.ndarray) -> np.ndarray:
    """uint8 copy of the radiograph scaled by its 0.5-99.5 percentiles (of a strided sample), for the overlay and
    the opacity density."""
    stride = max(1, max(pixels.shape) // DISPLAY_SAMPLE)
    low, high = np.percentile(pixels[::stride, ::stride], PERCENTILES).astype(np.float32)
    scaled = np.clip((pixels - low) / max(high - low, np.float32(1e-6)), 0, 1)
    return np.rint(scaled * 255).astype(np.uint8)


def shrink_rows(pixels: np.ndarray, size: int) -> np.ndarray:
    """``pixels`` shrunk to ``size`` rows by averaging: output row ``i`` is the mean of the input rows
    ``[floor(i * n / size), ceil((i + 1) * n / size))``, as PyTorch's ``area`` mode (adaptive average pooling) that
    the bundle resizes with; not Pillow's box filter, whose fractional bins give other network inputs."""
    length = len(pixels)
    starts = np.arange(size) * length // size
    ends = -(-(np.arange(size) + 1) * length // size)
    bounds = np.unique(np.concatenate([starts, ends]))  # the bins overlap: sum the pieces between any two bounds
    pieces = np.stack([pixels[start:end].sum(axis=0) for start, end in zip(bounds, bounds[1:])])
    sums = np.concatenate([np.zeros_like(pieces[:1]), np.cumsum(pieces, axis=0)])
    total = sums[np.searchsorted(bounds, ends)] - sums[np.searchsorted(bounds, starts)]
    return (total / (ends - starts).reshape((-1,) + (1,) * (pixels.ndim - 1))).astype(np.float32)


def class_map(model: Model, pixels: np.ndarray) -> np.ndarray:
    """The most probable class (0 background, 1 lung, 2 opacity) of every pixel, at the radiograph's size."""
    rows, columns = pixels.shape
    small = shrink_rows(np.ascontiguousarray(shrink_rows(pixels, model.size[0]).T), model.size[1]).T
    low, high = np.percentile(small, PERCENTILES)
    small = np.clip((small - low) / max(high - low, 1e-6), 0, 1).astype(np.float32)
    logits = model.session.run(None, {model.session.get_inputs()[0].name: small[None, None]})[0][0]
    probabilities = np.exp(logits - logits.max(axis=0))
    probabilities /= probabilities.sum(axis=0)
    background, lung, opacity = (
        np.asarray(Image.fromarray(channel).resize((columns, rows), Image.BILINEAR)) for channel in probabilities
    )
    classes = (lung > background).astype(np.uint8)  # the lowest class wins a tie, as np.argmax (and 2x faster)
    classes[opacity > np.maximum(background, lung)] = OPACITY
    return classes


def process(path: str, output_dir: str, model: Model, overlays: bool = True) -> dict:
    """Masks, overlay and the table row of one radiograph; a file that fails gets an error row."""
    name = os.path.basename(path)
    row = {"image": name, "status": "error", "message": "", "warning": ""}
    try:
        pixels = read_grey(path)
        classes = class_map(model, pixels)
        grey = display_grey(pixels)
        lung, opacity = classes != BACKGROUND, classes == OPACITY
        sides = split_lungs(lung)
        assessment = assess_input(lung, *sides, grey, min_lung_fraction=MIN_LUNG_FRACTION)
        row["warning"] = "; ".join(assessment.warnings)
        if assessment.errors:
            raise ValueError("; ".join(assessment.errors))
        figures = compute_severity(lung, opacity, image=grey, rules=model.rules, lung_sides=sides)
    except (OSError, ValueError, NoLungFoundError) as error:
        row["message"] = f"{path}: {error}"
        return row
    row.update(figures, status="ok", rows=lung.shape[0], columns=lung.shape[1], pixel_spacing_mm="")
    row["severity_rules"] = model.rules_name
    stem = os.path.splitext(name)[0]
    folder = os.path.join(output_dir, stem)
    os.makedirs(folder, exist_ok=True)
    for kind, mask in (("lung", lung), ("opacity", opacity)):
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            os.path.join(folder, f"{stem}_{kind}.png"), compress_level=PNG_COMPRESS_LEVEL
        )
    if overlays:
        caption = (
            f"opacity {figures['opacity_pct']:.1f}% of lung  "
            f"(R {figures['right_opacity_pct']:.1f}%  L {figures['left_opacity_pct']:.1f}%)"
        )
        Image.fromarray(draw_overlay(grey, lung, opacity, caption, max_side=OVERLAY_MAX_SIDE)).save(
            os.path.join(folder, f"{stem}_overlay.png"), compress_level=PNG_COMPRESS_LEVEL
        )
    return row


def run(paths: list[str], output_dir: str, model: Model, overlays: bool = True) -> float:
    """Process ``paths`` in order into ``output_dir`` and write ``severity.csv``; returns the seconds it took."""
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    rows = [process(path, output_dir, model, overlays) for path in paths]
    with open(os.path.join(output_dir, "severity.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of PNG and JPEG radiographs")
    parser.add_argument("--output", required=True, help="folder for the masks, overlays and severity.csv")
    parser.add_argument("--no-overlays", action="store_true", help="write the masks and the table only")
    parser.add_argument("--onnx", help="the exported network (default: export --checkpoint at --size, cached)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="weights to export when --onnx is not given")
    parser.add_argument(
        "--size", type=int, default=NETWORK_SIZE, help="network input size of the export (rows = columns)"
    )
    parser.add_argument("--severity-calibration", default=DEFAULT_CALIBRATION, help="fitted severity constants")
    args = parser.parse_args(argv)
    onnx_path = args.onnx or export_model(args.checkpoint, args.size)
    model = load_model(onnx_path, args.severity_calibration, args.checkpoint)
    paths = list_images(args.images)
    seconds = run(paths, args.output, model, overlays=not args.no_overlays)
    print(f"{len(paths)} images in {seconds:.2f} s ({seconds / max(1, len(paths)):.3f} s per image); "
          f"table: {os.path.join(args.output, 'severity.csv')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Synthetic frontal chest-radiograph phantoms with known lung and opacity masks, written in every input format.

Arrays follow the bundle's viewer convention: ``array[row, column]``, row 0 at the top, column 0 on the image's
left (the PATIENT'S RIGHT), higher = denser/whiter. A bright square marker sits near the top-left corner, outside
the lungs, so that any transpose or flip is detectable.

Example:
  python scripts/phantoms.py --output /tmp/phantoms --count 8 --format png --seed 0
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MARKER_OFFSET, MARKER_SIZE = 0.04, 0.07  # marker corner and side, as fractions of the image's shorter side


@dataclass
class Phantom:
    """A synthetic radiograph (float32 0..1, rows x columns) and its ground-truth masks."""

    image: np.ndarray
    right_lung: np.ndarray  # patient's right = image left (smaller column indices)
    left_lung: np.ndarray
    opacity: np.ndarray  # inside the lungs
    marker: np.ndarray  # the bright top-left marker block

    @property
    def lung(self) -> np.ndarray:
        return self.right_lung | self.left_lung

    def label_map(self) -> np.ndarray:
        """uint8 0 background, 1 clear lung, 2 opacity (scripts/labels.py)."""
        labels = np.zeros(self.image.shape, dtype=np.uint8)
        labels[self.lung] = 1
        labels[self.opacity & self.lung] = 2
        return labels


def _lung_mask(u, v, centre, axes, rng) -> np.ndarray:
    """An ellipse with a gently wavy outline (u, v: normalised column and row coordinates)."""
    du, dv = (u - centre[0]) / axes[0], (v - centre[1]) / axes[1]
    angle = np.arctan2(dv, du)
    wobble = 1.0 + 0.04 * np.sin(2 * angle + rng.uniform(0, 2 * np.pi)) + 0.02 * np.sin(3 * angle)
    return np.hypot(du, dv) <= wobble


def make_phantom(rows: int = 256, columns: int = 256, seed: int = 0, opacity: bool = True) -> Phantom:
    """Deterministic (by ``seed``) phantom of ``rows`` x ``columns`` pixels; ``opacity`` adds 1-3 opacity blobs."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:rows, 0:columns].astype(np.float32)
    v, u = (r + 0.5) / rows, (c + 0.5) / columns
    scale = min(rows, columns) / 256.0

    body = ((u - 0.5) / 0.46) ** 2 + ((v - 0.58) / 0.62) ** 2 <= 1.0
    jitter = lambda spread: rng.uniform(-spread, spread)  # noqa: E731
    right_lung = _lung_mask(
        u, v, (0.29 + jitter(0.015), 0.50 + jitter(0.02)), (0.13 * (1 + jitter(0.05)), 0.30 * (1 + jitter(0.05))), rng
    )
    left_lung = _lung_mask(
        u, v, (0.70 + jitter(0.015), 0.51 + jitter(0.02)), (0.12 * (1 + jitter(0.05)), 0.28 * (1 + jitter(0.05))), rng
    )
    right_lung &= body
    left_lung &= body & ~right_lung
    lung = right_lung | left_lung

    image = np.full((rows, columns), 0.04, dtype=np.float32)  # air
    image[body] = (0.48 + 0.15 * v)[body]  # soft tissue, denser towards the abdomen
    spine = np.exp(-(((u - 0.5) / 0.055) ** 4)) * body
    image += 0.30 * spine
    ribs = np.zeros_like(image)
    for k in range(9):  # posterior ribs curving down laterally, on both sides of the spine
        centre_line = 0.16 + 0.075 * k + jitter(0.01) + 0.12 * ((u - 0.5) / 0.5) ** 2
        ribs += np.exp(-(((v - centre_line) / 0.012) ** 2))
    image += 0.10 * np.clip(ribs, 0, 1) * body * (1 - spine)
    image[lung] = (0.16 + 0.10 * np.clip(ribs, 0, 1))[lung]
    vessels = ndimage.gaussian_filter(rng.standard_normal((rows, columns)).astype(np.float32), 1.5 * scale)
    vessels /= float(np.abs(vessels).max()) or 1.0
    hilum = np.exp(-np.minimum(np.hypot(u - 0.38, v - 0.48), np.hypot(u - 0.62, v - 0.48)) / 0.15)
    image += 0.10 * np.abs(vessels) * hilum * lung

    opacity_mask = np.zeros((rows, columns), dtype=bool)
    if opacity:
        brightening = np.zeros_like(image)
        lungs = [right_lung, left_lung] if rng.random() < 0.5 else [[right_lung, left_lung][rng.integers(2)]]
        for side in lungs:
            for _ in range(rng.integers(1, 3)):
                candidates = np.argwhere(ndimage.binary_erosion(side, iterations=max(1, int(6 * scale))))
                centre_r, centre_c = candidates[rng.integers(len(candidates))]
                sigma = rng.uniform(0.04, 0.09) * min(rows, columns)
                blob = np.exp(-((r - centre_r) ** 2 + (c - centre_c) ** 2) / (2 * sigma**2))
                brightening = np.maximum(brightening, blob)
        brightening *= lung
        opacity_mask = (brightening > 0.5) & lung
        image += 0.40 * ndimage.gaussian_filter(brightening, 1.0 * scale)

    image = ndimage.gaussian_filter(image, 0.7 * scale)  # soft edges
    image += rng.normal(0, 0.01, image.shape).astype(np.float32)
    marker = np.zeros((rows, columns), dtype=bool)
    start, side = int(MARKER_OFFSET * min(rows, columns)), max(3, int(MARKER_SIZE * min(rows, columns)))
    marker[start : start + side, start : start + side] = True
    image = np.clip(image, 0.0, 0.97)
    image[marker] = 1.0
    return Phantom(image.astype(np.float32), right_lung, left_lung, opacity_mask, marker)


# ---------------------------------------------------------------------------------------------------------- writers


def _quantise(image01: np.ndarray, maximum: int, dtype) -> np.ndarray:
    return np.rint(np.clip(np.asarray(image01, dtype=np.float64), 0, 1) * maximum).astype(dtype)


def _makedirs_for(path) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def write_png(path, image01: np.ndarray, bits: int = 8, rgb: bool = False) -> None:
    """8- or 16-bit grey PNG, or an 8-bit RGB PNG with three equal channels."""
    from PIL import Image

    if bits not in (8, 16) or (rgb and bits != 8):
        raise ValueError("PNG: bits must be 8 or 16, and RGB is 8-bit only")
    array = _quantise(image01, 255, np.uint8) if bits == 8 else _quantise(image01, 65535, np.uint16)
    if rgb:
        array = np.repeat(array[..., None], 3, axis=2)
    Image.fromarray(array).save(_makedirs_for(path), format="PNG")


def write_jpeg(path, image01: np.ndarray, quality: int = 95) -> None:
    """8-bit grey JPEG."""
    from PIL import Image

    Image.fromarray(_quantise(image01, 255, np.uint8)).save(_makedirs_for(path), format="JPEG", quality=quality)


def _jpeg_bytes(array8: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array8).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_dicom(
    path,
    image01: np.ndarray,
    bits: int = 16,
    photometric: str = "MONOCHROME2",
    spacing_mm=None,
    transfer_syntax: str = "explicit",
    window=None,
    spacing_tag: str = "PixelSpacing",
    extra_tags: dict | None = None,
) -> None:
    """DX DICOM (Part 10 file with preamble); a (frames, rows, columns) array gives a multi-frame file.

    ``photometric="MONOCHROME1"`` stores inverted values; ``window`` = (centre, width) in stored values;
    ``spacing_mm`` = (row, column) goes to ``spacing_tag`` (PixelSpacing, ImagerPixelSpacing or both);
    ``extra_tags`` = {keyword: value} are set last (e.g. PresentationLUTShape, Modality, ViewPosition);
    ``transfer_syntax``: explicit, rle, jpeg2000 (lossless, pylibjpeg-openjpeg) or jpeg_baseline (8-bit only; a
    Pillow JPEG encapsulated by hand since pydicom has no JPEG baseline encoder).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        RLELossless,
        generate_uid,
    )

    if bits not in (8, 12, 16):
        raise ValueError("bits must be 8, 12 or 16")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    if transfer_syntax == "jpeg_baseline" and bits != 8:
        raise ValueError("JPEG baseline holds 8-bit samples only")
    maximum = (1 << bits) - 1
    stored = _quantise(image01, maximum, np.uint8 if bits == 8 else np.uint16)
    if photometric == "MONOCHROME1":
        stored = (maximum - stored).astype(stored.dtype)
    frames = stored.shape[0] if stored.ndim == 3 else 1

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "PHANTOM", "Phantom^Chest"
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8 if bits == 8 else 16), bits, bits - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if spacing_mm is not None:
        value = [f"{float(spacing_mm[0]):.6g}", f"{float(spacing_mm[1]):.6g}"]
        for tag in ("PixelSpacing", "ImagerPixelSpacing") if spacing_tag == "both" else (spacing_tag,):
            setattr(ds, tag, value)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{float(window[0]):.6g}", f"{float(window[1]):.6g}"
    for keyword, value in (extra_tags or {}).items():
        setattr(ds, keyword, value)

    if transfer_syntax == "jpeg_baseline":
        planes = stored if stored.ndim == 3 else stored[None]
        ds.PixelData = encapsulate([_jpeg_bytes(plane) for plane in planes])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
        compressed = {"rle": RLELossless, "jpeg2000": JPEG2000Lossless}
        if transfer_syntax in compressed:
            ds.compress(compressed[transfer_syntax], generate_instance_uid=False)
        elif transfer_syntax != "explicit":
            raise ValueError(f"unknown transfer syntax {transfer_syntax!r}")
    pydicom.dcmwrite(_makedirs_for(path), ds, enforce_file_format=True)


def write_nifti(path, image01: np.ndarray, spacing_mm=None, units: str | None = "mm") -> None:
    """2D NIfTI: voxel (i, j) = column i, row j (the array is stored transposed); zooms (column mm, row mm).

    ``units`` goes to ``xyzt_units`` (None leaves it unknown); without ``spacing_mm`` the zooms are the 1.0 default.
    """
    import nibabel

    row_mm, col_mm = spacing_mm if spacing_mm is not None else (1.0, 1.0)
    affine = np.diag([float(col_mm), float(row_mm), 1.0, 1.0])
    image = nibabel.Nifti1Image(np.asarray(image01, dtype=np.float32).T, affine)
    if units is not None:
        image.header.set_xyzt_units(xyz=units)
    nibabel.save(image, _makedirs_for(path))


def write_mask_png(path, mask: np.ndarray) -> None:
    """Binary mask as an 8-bit PNG, 0 or 255."""
    from PIL import Image

    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(_makedirs_for(path), format="PNG")


# --------------------------------------------------------------------------------------------------- LabelMe output

_STEPS = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]  # clockwise on screen, from east


def trace_boundary(mask: np.ndarray) -> np.ndarray:
    """Outer boundary of the mask's first component in raster order (Moore tracing): (N, 2) (row, column)."""
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    start = tuple(int(i) for i in np.argwhere(padded)[0])
    points, point, back = [start], start, 4  # the start's western neighbour is background
    first_move = None
    while True:
        for k in range(1, 9):
            d = (back + k) % 8
            candidate = (point[0] + _STEPS[d][0], point[1] + _STEPS[d][1])
            if padded[candidate]:
                break
        else:
            break  # isolated pixel
        previous = _STEPS[(d - 1) % 8]
        back = _STEPS.index((previous[0] - _STEPS[d][0], previous[1] - _STEPS[d][1]))
        if point == start and first_move == candidate:
            break
        if first_move is None:
            first_move = candidate
        points.append(candidate)
        point = candidate
    return np.asarray(points[:-1] if len(points) > 1 else points) - 1


def simplify(points: np.ndarray, tolerance: float = 0.5) -> np.ndarray:
    """Ramer-Douglas-Peucker simplification of a closed polygon."""
    if len(points) < 4:
        return points
    chain = np.vstack([points, points[:1]]).astype(np.float64)
    keep = np.zeros(len(chain), dtype=bool)
    keep[[0, -1]] = True
    far = int(np.argmax(np.hypot(*(chain - chain[0]).T)))
    keep[far] = True
    stack = [(0, far), (far, len(chain) - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        a, b = chain[first], chain[last]
        segment = b - a
        inner = chain[first + 1 : last] - a
        length = float(np.hypot(*segment))
        distance = (
            np.abs(segment[0] * inner[:, 1] - segment[1] * inner[:, 0]) / length if length else np.hypot(*inner.T)
        )
        index = int(np.argmax(distance))
        if distance[index] > tolerance:
            middle = first + 1 + index
            keep[middle] = True
            stack += [(first, middle), (middle, last)]
    return chain[keep][:-1]


def mask_polygons(mask: np.ndarray, largest_only: bool = False, min_pixels: int = 10) -> list[np.ndarray]:
    """Polygons (N, 2) as LabelMe points (x = column, y = row) through the boundary pixel centres."""
    components, count = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, components, range(1, count + 1))
    order = np.argsort(sizes)[::-1][: 1 if largest_only else None]
    polygons = []
    for index in order:
        if sizes[index] >= min_pixels:
            polygons.append(simplify(trace_boundary(components == index + 1))[:, ::-1])
    return polygons


def polygon_area(points) -> float:
    """Shoelace area of a polygon given as (x, y) points."""
    x, y = np.asarray(points, dtype=np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _png_bytes(image01: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_quantise(image01, 255, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_labelme(path, phantom: Phantom, image_path_relative: str | None = None, embed_image: bool = False) -> dict:
    """LabelMe 4.5.6-style JSON with ``right_lung``, ``left_lung`` and ``opacity`` polygons; returns the document."""
    shapes = []
    for label, mask, largest in (
        ("right_lung", phantom.right_lung, True),
        ("left_lung", phantom.left_lung, True),
        ("opacity", phantom.opacity, False),
    ):
        for polygon in mask_polygons(mask, largest_only=largest):
            points = [[round(float(x), 2), round(float(y), 2)] for x, y in polygon]
            shapes.append(
                {
                    "label": label,
                    "points": points,
                    "group_id": None,
                    "description": "",
                    "shape_type": "polygon",
                    "flags": {},
                    "mask": None,
                }
            )
    if image_path_relative is None:
        image_path_relative = os.path.splitext(os.path.basename(str(path)))[0] + ".png"
    document = {
        "version": "4.5.6",
        "flags": {},
        "shapes": shapes,
        "imagePath": image_path_relative,
        "imageData": base64.b64encode(_png_bytes(phantom.image)).decode("ascii") if embed_image else None,
        "imageHeight": int(phantom.image.shape[0]),
        "imageWidth": int(phantom.image.shape[1]),
    }
    with open(_makedirs_for(path), "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1)
    return document


# -------------------------------------------------------------------------------------------------------- datasets

FORMATS = {  # name -> (extension, writer(path, image01))
    "png": (".png", lambda p, im: write_png(p, im)),
    "png16": (".png", lambda p, im: write_png(p, im, bits=16)),
    "png-rgb": (".png", lambda p, im: write_png(p, im, rgb=True)),
    "jpeg": (".jpg", write_jpeg),
    "dicom": (".dcm", lambda p, im: write_dicom(p, im, bits=12, spacing_mm=(0.143, 0.143))),
    "dicom-mono1": (".dcm", lambda p, im: write_dicom(p, im, photometric="MONOCHROME1", spacing_mm=(0.15, 0.15))),
    "dicom-rle": (".dcm", lambda p, im: write_dicom(p, im, transfer_syntax="rle")),
    "dicom-jpeg2000": (".dcm", lambda p, im: write_dicom(p, im, bits=12, transfer_syntax="jpeg2000")),
    "dicom-jpeg": (".dcm", lambda p, im: write_dicom(p, im, bits=8, transfer_syntax="jpeg_baseline")),
    "dicom-noext": ("", lambda p, im: write_dicom(p, im)),
    "nifti": (".nii.gz", lambda p, im: write_nifti(p, im, spacing_mm=(0.2, 0.2))),
}


@dataclass
class PhantomDataset:
    """Folders and files written by :func:`write_dataset`."""

    root: str
    images: str
    masks: str
    labelme: str
    metadata: str
    image_files: list
    labelme_files: list


def write_dataset(
    output_dir,
    count: int = 8,
    formats=("png",),
    seed: int = 0,
    labelme: int = 2,
    rows: int = 256,
    columns: int = 256,
    embed_image: bool = False,
) -> PhantomDataset:
    """Write images/, masks/ (lung 0/255 PNG), labelme/ (every other image, ``labelme`` in all) and metadata.csv.

    Image ``i`` uses ``formats[i % len(formats)]``; two consecutive images belong to one patient.
    """
    if isinstance(formats, str):
        formats = [formats]
    root = os.path.abspath(str(output_dir))
    folders = {name: os.path.join(root, name) for name in ("images", "masks", "labelme")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    image_files, labelme_files, table = [], [], []
    for i in range(count):
        extension, writer = FORMATS[formats[i % len(formats)]]
        stem = f"phantom_{i:03d}"
        phantom = make_phantom(rows, columns, seed=seed * 1000 + i, opacity=True)
        image_path = os.path.join(folders["images"], stem + extension)
        writer(image_path, phantom.image)
        write_mask_png(os.path.join(folders["masks"], stem + ".png"), phantom.lung)
        if i % 2 == 0 and len(labelme_files) < labelme:
            json_path = os.path.join(folders["labelme"], stem + ".json")
            write_labelme(json_path, phantom, os.path.relpath(image_path, folders["labelme"]), embed_image)
            labelme_files.append(json_path)
        image_files.append(image_path)
        table.append({"filename": stem + extension, "patientid": f"P{i // 2:03d}"})
    metadata = os.path.join(root, "metadata.csv")
    with open(metadata, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filename", "patientid"])
        writer.writeheader()
        writer.writerows(table)
    return PhantomDataset(
        root, folders["images"], folders["masks"], folders["labelme"], metadata, image_files, labelme_files
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for images/, masks/, labelme/ and metadata.csv")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--format", action="append", choices=sorted(FORMATS), help="repeat to mix formats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--columns", type=int, default=256)
    parser.add_argument("--labelme", type=int, default=2, help="how many images get a LabelMe annotation")
    parser.add_argument("--embed-image", action="store_true", help="embed imageData in the LabelMe files")
    args = parser.parse_args(argv)
    dataset = write_dataset(
        args.output,
        args.count,
        args.format or ["png"],
        args.seed,
        args.labelme,
        args.rows,
        args.columns,
        args.embed_image,
    )
    print(f"wrote {len(dataset.image_files)} images and {len(dataset.labelme_files)} LabelMe files to {dataset.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Copy a prepared dataset (datalist.json from prepare_data.py) at the network's input size, once.

Each radiograph is read as training reads it (scripts.radiograph_io: viewer orientation, DICOM grey levels), resized
to SIZE x SIZE by area averaging (as the network input is) and scaled by its 0.5-99.5 percentiles into an 8-bit
greyscale JPEG; each label map is resized by nearest neighbour into a PNG. The copy's datalist.json has the same rows
(every field kept) with relative paths, so training reads small files: an epoch no longer decodes full-size
radiographs, caching starts in seconds, and a whole dataset fits in a few tens of MB (e.g. to carry to a GPU
machine). Training on the copy with --image_size [SIZE, SIZE] sees the images it would see on the originals, up to
the JPEG's rounding.

Only the datalist keys given are copied (default: training and validation; evaluate the held-out rows on the
originals). Input files are only read; an existing output file is kept, so an interrupted run continues; every file
is written atomically. A file that cannot be read is reported by name and its row left out.

Example:
  python scripts/resize_dataset.py --dataset data/all_sources --size 256 --output data/all_sources_256
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from scripts.label_io import atomic_write, read_label_map, write_json, write_png  # noqa: E402
from scripts.radiograph_io import read_radiograph  # noqa: E402

PERCENTILES = (0.5, 99.5)  # those of the network input's intensity scaling (configs/common.yaml)


def resized_image(path: str, size: int) -> np.ndarray:
    """The radiograph at ``size`` x ``size`` (area averaging), scaled by its percentiles to uint8."""
    pixels = torch.from_numpy(np.ascontiguousarray(read_radiograph(path).pixels, dtype=np.float32))
    small = F.interpolate(pixels[None, None], size=(size, size), mode="area")[0, 0].numpy()
    low, high = np.percentile(small, PERCENTILES)
    scaled = np.clip((small - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    return np.rint(scaled * 255.0).astype(np.uint8)


def resized_labels(path: str, size: int) -> np.ndarray:
    """The label map at ``size`` x ``size`` (nearest neighbour, as training resizes labels)."""
    labels = torch.from_numpy(read_label_map(path).astype(np.float32))
    return F.interpolate(labels[None, None], size=(size, size), mode="nearest")[0, 0].numpy().astype(np.uint8)


def write_jpeg(path: str, pixels: np.ndarray, quality: int) -> None:
    """Write a (rows, columns) uint8 array as a greyscale JPEG, atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=quality)
    atomic_write(path, lambda temporary: open(temporary, "wb").write(buffer.getvalue()))


def copy_row(row: dict, dataset: str, output: str, size: int, quality: int) -> tuple[dict | None, str]:
    """The row of the copy (None and the reason when a file cannot be read); writes its image and label map."""
    folder = row.get("source", "other")
    stem = row.get("stem") or os.path.splitext(os.path.basename(row["image"]))[0]
    copied = dict(row)
    targets = {"image": os.path.join("images", folder, f"{stem}.jpg")}
    if "label" in row:
        targets["label"] = os.path.join("labels", folder, f"{stem}.png")
    try:
        for key, relative in targets.items():
            source = row[key] if os.path.isabs(row[key]) else os.path.join(dataset, row[key])
            target = os.path.join(output, relative)
            if not os.path.exists(target):
                if key == "image":
                    write_jpeg(target, resized_image(source, size), quality)
                else:
                    write_png(target, resized_labels(source, size), compress_level=9)
            copied[key] = relative
    except Exception as error:  # noqa: BLE001 - a bad file is reported by name and its row left out
        return None, f"{row.get('image')}: {error}"
    return copied, ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="prepared folder holding datalist.json")
    parser.add_argument("--size", type=int, required=True, help="side of the copies in pixels (the --image_size)")
    parser.add_argument("--output", required=True, help="folder of the copy (may not be --dataset)")
    parser.add_argument("--keys", nargs="+", default=["training", "validation"], help="datalist keys to copy")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.path.abspath(args.output) == os.path.abspath(args.dataset):
        parser.error("--output must differ from --dataset: the originals are never overwritten")
    with open(os.path.join(args.dataset, "datalist.json"), encoding="utf-8") as handle:
        datalist = json.load(handle)
    missing = [key for key in args.keys if key not in datalist]
    if missing:
        parser.error(f"{args.dataset}/datalist.json has no {', '.join(missing)} rows")

    copy, errors = {}, []
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for key in args.keys:
            rows = datalist[key]
            results = pool.map(
                copy_row,
                rows,
                *zip(*[(args.dataset, args.output, args.size, args.jpeg_quality)] * len(rows)),
                chunksize=16,
            )
            copy[key] = []
            for row, error in results:
                if row is None:
                    errors.append(error)
                    print(f"skipped {error}", file=sys.stderr)
                else:
                    copy[key].append(row)
            print(f"{key}: {len(copy[key])} of {len(rows)} rows copied at {args.size} px", flush=True)
    write_json(os.path.join(args.output, "datalist.json"), copy)
    write_json(
        os.path.join(args.output, "resize_report.json"),
        {
            "dataset": os.path.abspath(args.dataset),
            "size": args.size,
            "jpeg_quality": args.jpeg_quality,
            "rows": {key: len(rows) for key, rows in copy.items()},
            "skipped": errors,
        },
    )
    return 1 if errors and not any(copy.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

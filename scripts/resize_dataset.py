#!/usr/bin/env python
"""Copy a prepared dataset (datalist.json from prepare_data.py) at the network's input size, once.

Each row goes through training's own deterministic transforms at SIZE x SIZE (train.yaml: the radiograph read in
viewer orientation, resized by area averaging and scaled by its 0.5-99.5 percentiles, kept as an 8-bit greyscale
JPEG; the label map resized by nearest neighbour, kept as a PNG). The copy's datalist.json has the same rows
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
import functools
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

BUNDLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle")
sys.path.insert(0, BUNDLE)

from scripts.label_io import atomic_write, write_json, write_png  # noqa: E402


@functools.lru_cache(maxsize=1)
def training_transforms(size: int) -> dict:
    """Training's own deterministic transforms at ``size`` x ``size`` (configs/common.yaml and train.yaml): for the
    ``image``, the radiograph loader and the network input; for the ``label``, the label-map loader and its resize."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLE, "configs", name) for name in ("common.yaml", "train.yaml")])
    parser.update({"bundle_root": BUNDLE, "image_size": [size, size]})
    image = [parser.get_parsed_content("load_radiograph"), *parser.get_parsed_content("network_input")]
    label = [parser.get_parsed_content("load_label_map"), parser.get_parsed_content("train#resize_label")]
    return {"image": Compose(image), "label": Compose(label)}


def write_jpeg(path: str, pixels: np.ndarray, quality: int) -> None:
    """Write a (rows, columns) uint8 array as a greyscale JPEG, atomically."""
    from PIL import Image

    atomic_write(path, lambda temporary: Image.fromarray(pixels, mode="L").save(temporary, "JPEG", quality=quality))


def copy_row(row: dict, dataset: str, output: str, size: int, quality: int) -> tuple[dict | None, str]:
    """The row of the copy (None and the reason when a file cannot be read); writes its image and label map."""
    folder = row.get("source", "other")
    stem = row.get("stem") or os.path.splitext(os.path.basename(row["image"]))[0]
    targets = {"image": os.path.join("images", folder, f"{stem}.jpg")}
    if "label" in row:
        targets["label"] = os.path.join("labels", folder, f"{stem}.png")
    try:
        for key, relative in targets.items():
            target = os.path.join(output, relative)
            if os.path.exists(target):
                continue
            source = os.path.join(dataset, row[key])  # an absolute path stays as it is
            values = np.asarray(training_transforms(size)[key]({key: source})[key][0])
            if key == "image":  # the network input, 0-1
                write_jpeg(target, np.rint(values * 255.0).astype(np.uint8), quality)
            else:
                write_png(target, values.astype(np.uint8), compress_level=9)
    except Exception as error:  # noqa: BLE001 - a bad file is reported by name and its row left out
        return None, f"{row.get('image')}: {error}"
    return {**row, **targets}, ""


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
            copy_one = functools.partial(
                copy_row, dataset=args.dataset, output=args.output, size=args.size, quality=args.jpeg_quality
            )
            results = pool.map(copy_one, rows, chunksize=16)
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

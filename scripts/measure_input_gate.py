#!/usr/bin/env python
"""Count what the input quality gate (bundle/scripts/input_gate.py) refuses and warns about, per folder and reason.

Two ways to feed it:

* inference output folders (``severity.csv``): counts the rows' statuses and the reason tags in their ``message``
  (errors) and ``warning`` columns, as the inference command wrote them;
* ``--predicted IMAGES PREDICTIONS``: runs the gate here on each image of IMAGES (loaded as the inference loads it)
  with the lung mask the inference wrote for it (``PREDICTIONS/<stem>/<stem>_lung.png``), reading the DICOM tags
  itself; ``--features`` writes the measured lung-field figures of every image to a CSV.

``--by-kind`` also splits each folder by the part of the file name before its first ``_`` (e.g. ``noise_003.png``).

Example:
  python scripts/measure_input_gate.py /tmp/out_cohen --predicted /data/cohen/images /tmp/out_cohen --by-kind
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys
import time
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bundle"))  # the bundle's ``scripts`` package

from scripts.input_gate import assess_input, measure_lung_fields, reasons  # noqa: E402


class Tally:
    """Images, refusals and warnings of one group, with the count of each reason."""

    def __init__(self):
        self.images = self.refused = self.warned = self.other_errors = 0
        self.error_reasons: collections.Counter = collections.Counter()
        self.warning_reasons: collections.Counter = collections.Counter()

    def add(self, errors: list[str], warnings: list[str], other_error: bool = False) -> None:
        self.images += 1
        self.other_errors += other_error
        self.refused += bool(errors)
        self.warned += bool(warnings)
        self.error_reasons.update({reason for text in errors for reason in reasons(text)})
        self.warning_reasons.update({reason for text in warnings for reason in reasons(text)})

    def line(self, name: str) -> str:
        def counts(counter):
            return ", ".join(f"{reason} {count}" for reason, count in sorted(counter.items())) or "-"

        return (
            f"{name}: {self.images} images, refused {self.refused} ({_pct(self.refused, self.images)}), "
            f"warned {self.warned} ({_pct(self.warned, self.images)}), other errors {self.other_errors}; "
            f"refusal reasons: {counts(self.error_reasons)}; warning reasons: {counts(self.warning_reasons)}"
        )


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def _kind(name: str) -> str:
    return name.split("_", 1)[0] if "_" in name else "(no kind)"


def tally_results(output_dir: str, by_kind: bool) -> dict[str, Tally]:
    """Tallies of an inference output folder's ``severity.csv``: gate errors, warnings and other error rows."""
    tallies = collections.defaultdict(Tally)
    with open(os.path.join(output_dir, "severity.csv"), newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            message, warning = row.get("message") or "", row.get("warning") or ""
            gate_error = row["status"] == "error" and bool(reasons(message))
            errors = [message] if gate_error else []
            other_error = row["status"] != "ok" and not gate_error
            for group in [output_dir] + ([f"{output_dir} {_kind(row['image'])}"] if by_kind else []):
                tallies[group].add(errors, [warning] if reasons(warning) else [], other_error)
    return tallies


def dicom_tags(path: str) -> dict[str, str]:
    """Modality, ViewPosition and BodyPartExamined of a DICOM file as :func:`assess_input` keywords ("" if none)."""
    from scripts.radiograph_io import detect_format

    if detect_format(path) != "dicom":
        return {}
    import pydicom

    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    keywords = {"modality": "Modality", "view_position": "ViewPosition", "body_part_examined": "BodyPartExamined"}
    return {name: str(dataset.get(keyword, "") or "") for name, keyword in keywords.items()}


def assess_predictions(image_dir: str, prediction_dir: str, by_kind: bool, features: list | None) -> dict[str, Tally]:
    """Run the gate on every image of ``image_dir`` with its predicted lung mask from ``prediction_dir``."""
    import numpy as np
    from PIL import Image

    from scripts.inference_inputs import list_inputs
    from scripts.lung_sides import split_lungs
    from scripts.radiograph_io import file_stem
    from scripts.transforms import DisplayImaged, LoadRadiographd

    load = LoadRadiographd(keys="image", record_errors=True)
    display = DisplayImaged(keys="image")
    tallies = collections.defaultdict(Tally)
    for item in list_inputs(image_dir):
        path = str(item["image"])
        name, stem = os.path.basename(path), file_stem(path)
        groups = [image_dir] + ([f"{image_dir} {_kind(name)}"] if by_kind else [])
        mask_path = os.path.join(prediction_dir, stem, f"{stem}_lung.png")
        loaded = load({"image": path})
        if loaded["image"].meta["error"] or not os.path.isfile(mask_path):
            for group in groups:
                tallies[group].add([], [], other_error=True)
            continue
        grey = np.asarray(display(loaded)["display"])[0]
        lung = np.asarray(Image.open(mask_path)) > 0
        right, left = split_lungs(lung)
        tags = dicom_tags(path)
        assessment = assess_input(lung, right, left, grey, **tags)
        for group in groups:
            tallies[group].add(assessment.errors, assessment.warnings)
        if features is not None:
            measures = asdict(measure_lung_fields(lung, right, left, grey)) if lung.any() else {}
            flat = {"folder": image_dir, "image": name, "errors": " | ".join(assessment.errors),
                    "warnings": " | ".join(assessment.warnings)}  # fmt: skip
            for key, value in measures.items():
                flat.update({f"{key}_{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
            features.append(flat)
    return tallies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", help="inference output folders holding severity.csv")
    parser.add_argument(
        "--predicted",
        nargs=2,
        action="append",
        default=[],
        metavar=("IMAGES", "PREDICTIONS"),
        help="an image folder and the inference output folder of its masks (repeatable)",
    )
    parser.add_argument("--by-kind", action="store_true", help="also count per file-name prefix (before the first _)")
    parser.add_argument("--features", help="CSV for the measured lung-field figures of every --predicted image")
    args = parser.parse_args(argv)
    if not args.results and not args.predicted:
        parser.error("give inference output folders and/or --predicted IMAGES PREDICTIONS")

    started = time.perf_counter()
    features: list | None = [] if args.features else None
    tallies: dict[str, Tally] = {}
    for output_dir in args.results:
        tallies.update({f"results {key}": value for key, value in tally_results(output_dir, args.by_kind).items()})
    for image_dir, prediction_dir in args.predicted:
        found = assess_predictions(image_dir, prediction_dir, args.by_kind, features)
        tallies.update({f"gate on {key}": value for key, value in found.items()})
    for name, tally in tallies.items():
        print(tally.line(name))
    if features:
        columns = list(dict.fromkeys(key for row in features for key in row))
        with open(args.features, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(features)
    print(f"measured in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Summarise cross-validation folds: opacity Dice and severity agreement on each fold's opacity-annotated images.

Reads metrics.csv of each evaluate run (one per fold) and prints, per fold and over all folds, the number of
opacity-annotated images, mean opacity Dice (all of them, and those with annotated opacity), mean absolute error of
the geographic extent (0-8) and of the opacity percentage of the lungs, and the mean lung Dice of the whole
validation set. Writes the table as JSON with --output.

Example:
  python scripts/cv_summary.py runs/cv_fold0 runs/cv_fold1 --output runs/cv_summary.json
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from scripts.label_io import write_json  # noqa: E402


def read_rows(folder: str) -> list[dict]:
    path = os.path.join(folder, "metrics.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found: run the evaluate workflow into {folder} first")
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def fold_figures(rows: list[dict]) -> dict:
    """Figures of one fold; opacity figures come from rows whose opacity was annotated (non-empty opacity_dice)."""
    annotated = [row for row in rows if row["opacity_dice"] != ""]
    with_opacity = [row for row in annotated if float(row["label_opacity_pct"] or 0) > 0]
    return {
        "opacity_images": len(annotated),
        "opacity_dice": mean([float(row["opacity_dice"]) for row in annotated]),
        "opacity_dice_where_annotated_opacity": mean([float(row["opacity_dice"]) for row in with_opacity]),
        "extent_mae": mean([float(row["extent_abs_error"]) for row in annotated]),
        "opacity_pct_mae": mean(
            [abs(float(row["pred_opacity_pct"]) - float(row["label_opacity_pct"])) for row in annotated]
        ),
        "validation_images": len(rows),
        "lung_dice": mean([float(row["lung_dice"]) for row in rows if row["lung_dice"] != ""]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folds", nargs="+", help="evaluate output folders, one per fold")
    parser.add_argument("--output", help="JSON file for the table")
    args = parser.parse_args(argv)
    rows_by_fold = {os.path.basename(os.path.normpath(folder)): read_rows(folder) for folder in args.folds}
    table = {name: fold_figures(rows) for name, rows in rows_by_fold.items()}
    table["all folds"] = fold_figures([row for rows in rows_by_fold.values() for row in rows])
    columns = list(next(iter(table.values())))
    print("| fold | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for name, figures in table.items():
        cells = [f"{value:.3f}" if isinstance(value, float) else str(value) for value in figures.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.output:
        write_json(args.output, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

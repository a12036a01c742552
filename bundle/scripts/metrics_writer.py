"""Ignite handler of the evaluate workflow: per-image Dice, IoU and 95 % Hausdorff distance, plus severity agreement.

For each image it compares the full-size predicted class map with the label map (values of :mod:`scripts.labels`)
for the lung field and for the opacity. Opacity figures are left empty for labels whose opacity was not annotated
(label value 3). Where the opacity is annotated, the severity figures of the label are computed too, so that the
predicted geographic extent can be compared with the annotated one. Writes ``metrics.csv`` (one row per image) and
``metrics_summary.json`` (mean, median and count of every figure) to ``output_dir``, atomically.
"""

from __future__ import annotations

import csv
import logging
import math
import os

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.utils import min_version, optional_import

from scripts.host_array import host_array
from scripts.label_io import atomic_write, write_json
from scripts.labels import BACKGROUND, LUNG_UNANNOTATED, OPACITY
from scripts.severity import NoLungFoundError, compute_severity

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

STRUCTURES = ("lung", "opacity")
METRICS = ("dice", "iou", "hd95_px")
SEVERITY_FIGURES = ("opacity_pct", "right_opacity_pct", "left_opacity_pct", "geographic_extent")


def segmentation_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict:
    """Dice, IoU and 95th-percentile Hausdorff distance (pixels) of two boolean 2D masks; NaN where undefined."""
    if not truth.any() and not prediction.any():
        return {"dice": 1.0, "iou": 1.0, "hd95_px": 0.0}
    if not truth.any() or not prediction.any():
        return {"dice": 0.0, "iou": 0.0, "hd95_px": math.nan}
    y_pred = torch.as_tensor(prediction[None, None], dtype=torch.float32)
    y = torch.as_tensor(truth[None, None], dtype=torch.float32)
    return {
        "dice": float(compute_dice(y_pred, y)[0, 0]),
        "iou": float(compute_iou(y_pred, y)[0, 0]),
        "hd95_px": float(compute_hausdorff_distance(y_pred, y, percentile=95)[0, 0]),
    }


def opacity_annotation(labels: np.ndarray) -> str:
    """How a label map annotates opacity: "present", "clear" (annotated, none) or "not annotated" (label 3)."""
    if (labels == LUNG_UNANNOTATED).any():
        return "not annotated"
    return "present" if (labels == OPACITY).any() else "clear"


def image_row(name: str, predicted: np.ndarray, labels: np.ndarray, source: str = "") -> dict:
    """Metrics of one image (class maps of the same shape) as a flat row; ``source`` names the dataset it came from."""
    row = {"image": name, "source": source, "opacity_annotation": opacity_annotation(labels)}
    annotated = row["opacity_annotation"] != "not annotated"
    pairs = {
        "lung": (predicted != BACKGROUND, labels != BACKGROUND),
        "opacity": (predicted == OPACITY, labels == OPACITY),
    }
    for structure, (prediction, truth) in pairs.items():
        values = segmentation_metrics(prediction, truth) if structure == "lung" or annotated else {}
        row.update({f"{structure}_{metric}": values.get(metric, math.nan) for metric in METRICS})
    for source, classes in (("pred", predicted), ("label", labels if annotated else None)):
        figures = {}
        if classes is not None:
            try:
                figures = compute_severity(classes != BACKGROUND, classes == OPACITY)
            except NoLungFoundError:
                figures = {}
        row.update({f"{source}_{figure}": figures.get(figure, math.nan) for figure in SEVERITY_FIGURES})
    row["extent_abs_error"] = abs(row["pred_geographic_extent"] - row["label_geographic_extent"])
    return row


class MetricsWriter:
    """Collect :func:`image_row` for every image of an evaluator run and write the table and its summary.

    Not MONAI's MetricsSaver: it writes a file per metric, without per-source groups or severity comparisons.
    """

    def __init__(self, output_dir: str, pred_key: str = "pred", label_key: str = "label", image_key: str = "image"):
        self.output_dir = output_dir
        self.pred_key, self.label_key, self.image_key = pred_key, label_key, image_key
        self.rows: list[dict] = []
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def start(self, engine=None) -> None:
        self.rows = []

    def iteration_completed(self, engine) -> None:
        for index, item in enumerate(engine.state.output):  # the evaluator's output keeps image, label and pred only
            predicted = host_array(item[self.pred_key])[0].astype(np.uint8)
            rows, columns = predicted.shape
            labels = host_array(item[self.label_key])[0, :rows, :columns].astype(np.uint8)  # batches pad at the end
            name = os.path.basename(str(item[self.image_key].meta["filename_or_obj"]))
            source = str(engine.state.batch[index].get("source", ""))
            self.rows.append(image_row(name, predicted, labels, source))

    def summary(self) -> dict:
        """Mean, median and count of every numeric column (NaN values left out), over all images and per group.

        A group is the images of one source with one kind of opacity annotation ("present", "clear", "not
        annotated"), e.g. the opacity Dice of one dataset's images with opacity, or the predicted opacity percentage
        of its clear lungs.
        """
        summary = {"images": len(self.rows), **column_statistics(self.rows), "groups": {}}
        for group in sorted({(row["source"], row["opacity_annotation"]) for row in self.rows}):
            members = [row for row in self.rows if (row["source"], row["opacity_annotation"]) == group]
            name = ", ".join(part for part in group if part)
            summary["groups"][name] = {"images": len(members), **column_statistics(members)}
        return summary

    def completed(self, engine=None) -> None:
        if not self.rows:
            raise RuntimeError("the evaluate workflow processed no image")
        columns = list(self.rows[0])
        atomic_write(os.path.join(self.output_dir, "metrics.csv"), lambda path: _write_csv(path, columns, self.rows))
        summary = self.summary()
        write_json(os.path.join(self.output_dir, "metrics_summary.json"), summary)
        lung_dice = summary["lung_dice"]["mean"]
        opacity_dice = summary["opacity_dice"]["mean"]
        self.logger.info(f"{len(self.rows)} images: mean lung Dice {lung_dice}, mean opacity Dice {opacity_dice}")


def column_statistics(rows: list[dict]) -> dict:
    """Mean, median and count of every numeric column of ``rows`` (NaN values left out)."""
    statistics = {}
    for column in rows[0] if rows else []:
        values = np.asarray([row[column] for row in rows if isinstance(row[column], (int, float))], float)
        values = values[np.isfinite(values)]
        if values.size or all(isinstance(row[column], (int, float)) for row in rows):
            statistics[column] = {
                "mean": float(values.mean()) if values.size else None,
                "median": float(np.median(values)) if values.size else None,
                "count": int(values.size),
            }
    return statistics


def _write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {key: "" if isinstance(value, float) and math.isnan(value) else value for key, value in row.items()}
            )

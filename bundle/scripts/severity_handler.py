"""Ignite handler that turns each predicted class map into masks, an overlay and a row of severity figures.

Attached to the inference evaluator (and reusable by the evaluate workflow), it writes for every input file
``<output_dir>/<stem>/<stem>_lung.png``, ``_opacity.png`` and ``_overlay.png`` (same width and height as the input)
and, at the end, ``severity.csv`` (one row per input file, in input order) and ``severity.json`` (the same rows
plus the run's settings). Every file is written under a temporary name and renamed, so a reader never sees half a
file; files of inputs not processed by this run are never touched. Rows stream to disk while the run goes on.
"""

from __future__ import annotations

import collections
import csv
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from monai.utils import min_version, optional_import

from scripts.label_io import write_json, write_png
from scripts.labels import BACKGROUND, OPACITY
from scripts.overlay import draw_overlay
from scripts.radiograph_io import file_stem
from scripts.severity import NoLungFoundError, compute_severity
from scripts.severity_calibration import file_sha256, load_calibration

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

CSV_COLUMNS = [
    "image",
    "status",
    "message",
    "lung_area_px",
    "opacity_area_px",
    "opacity_pct",
    "right_opacity_pct",
    "left_opacity_pct",
    "geographic_extent",
    "opacity_score",
    "lung_area_cm2",
    "opacity_area_cm2",
    "right_extent",
    "left_extent",
    "right_opacity_degree",
    "left_opacity_degree",
    "right_lung_area_px",
    "left_lung_area_px",
    "rows",
    "columns",
    "pixel_spacing_mm",
    "right_opacity_density",
    "left_opacity_density",
    "right_dense_opacity_pct",
    "left_dense_opacity_pct",
    "severity_rules",
]


class SeverityWriter:
    """Write masks, overlays and the severity table of every image an evaluator processes.

    The figures and files of each image are computed on a background thread while the network runs on the next
    batch; rows still reach ``severity.csv`` in input order, and at most ``max_pending`` images wait at a time, so
    memory stays flat however many images a run has.

    Args:
        output_dir: folder for the per-image folders, ``severity.csv`` and ``severity.json``.
        settings: run settings recorded in ``severity.json`` (model version, device, ...); the SHA-256 of its
            ``model_file`` is added, and checked against the weights the calibration was fitted on.
        severity_calibration: the fitted score constants (``models/severity_calibration.json``); None or a missing
            file: published extent bins and hand-set density rule. ``severity.json`` records which, and the constants.
        write_images: write the mask and overlay PNGs (the evaluate workflow only needs the table).
        write_overlays: with ``write_images``, also draw and write the overlay PNG (False: masks only, faster).
        min_lung_fraction: a prediction whose lung field covers less of the image is reported as "no lung found".
        fail_if_none_ok: raise at the end when no input could be processed, so the command exits non-zero.
        max_pending: images handed to the background thread and not yet written, at most.
    """

    def __init__(
        self,
        output_dir: str,
        settings: dict | None = None,
        severity_calibration: str | None = None,
        write_images: bool = True,
        write_overlays: bool = True,
        min_lung_fraction: float = 0.02,
        fail_if_none_ok: bool = True,
        max_pending: int = 4,
        pred_key: str = "pred",
        image_key: str = "image",
        display_key: str = "display",
    ):
        self.output_dir = output_dir
        self.settings = dict(settings or {})
        model_file = self.settings.get("model_file")
        if model_file and os.path.isfile(model_file):
            self.settings["model_sha256"] = file_sha256(model_file)
        self.rules, self.settings["severity_rules"] = load_calibration(
            severity_calibration, self.settings.get("model_sha256")
        )
        self.write_images = write_images
        self.write_overlays = _as_bool(write_overlays, "write_overlays")
        self.min_lung_fraction = min_lung_fraction
        self.fail_if_none_ok = fail_if_none_ok
        self.max_pending = max(1, int(max_pending))
        self.pred_key, self.image_key, self.display_key = pred_key, image_key, display_key
        self.logger = logging.getLogger(self.__class__.__name__)
        self.rows: list[dict] = []
        self._stems_in_use: set[str] = set()
        self._pending: collections.deque = collections.deque()
        self._executor = None
        self._csv_handle = None
        self._csv_writer = None
        self._partial_csv = os.path.join(output_dir, ".severity.csv.partial")

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def start(self, engine=None) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self.rows, self._stems_in_use = [], set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="severity")
        self._csv_handle = open(self._partial_csv, "w", newline="", encoding="utf-8")
        self._csv_writer = csv.DictWriter(self._csv_handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        self._csv_writer.writeheader()

    def iteration_completed(self, engine) -> None:
        for batch_item, output_item in zip(engine.state.batch, engine.state.output):
            job = self._job(output_item[self.image_key], output_item[self.pred_key], batch_item.get(self.display_key))
            self._pending.append(self._executor.submit(self._evaluate, *job))
            while len(self._pending) > self.max_pending:
                self._record(self._pending.popleft().result())

    def add(self, image, class_map, display=None) -> dict:
        """Score one image from its network input (for the meta data) and its full-size class map, now."""
        return self._record(self._evaluate(*self._job(image, class_map, display)))

    def _job(self, image, class_map, display) -> tuple:
        """What the background thread needs, as numpy arrays detached from the engine's tensors."""
        meta = image.meta
        path = str(meta["filename_or_obj"])
        row = {"image": os.path.basename(path), "status": "error", "message": str(meta.get("error", "") or "")}
        classes = np.asarray(class_map)
        classes = classes.reshape(classes.shape[-2:]).astype(np.uint8)
        rows, columns = classes.shape
        grey = None if display is None else np.asarray(display)[0, :rows, :columns].copy()
        spacing = tuple(float(value) for value in meta.get("spacing_mm", (math.nan, math.nan)))
        if not row["message"] and self.write_images:
            stem = file_stem(path)
            if stem in self._stems_in_use:
                row["message"] = f"{path}: another input of this run already writes outputs for the name {stem!r}"
            self._stems_in_use.add(stem)
        return path, row, classes, grey, spacing

    def _evaluate(self, path: str, row: dict, classes: np.ndarray, grey, spacing) -> dict:
        """The row of one image: its figures, or the reason it has none (runs on the background thread)."""
        if not row["message"]:
            try:
                row.update(self._score(path, classes, grey, spacing))
                row.update(status="ok", message="")
            except (NoLungFoundError, OSError, ValueError) as error:
                row["message"] = f"{path}: {error}"
        return row

    def _record(self, row: dict) -> dict:
        if row["status"] == "error":
            self.logger.warning(row["message"])
        self.rows.append(row)
        self._csv_writer.writerow({key: _csv_value(row.get(key)) for key in CSV_COLUMNS})
        self._csv_handle.flush()
        return row

    def _score(self, path: str, classes: np.ndarray, grey, spacing) -> dict:
        rows, columns = classes.shape
        lung = classes != BACKGROUND
        opacity = classes == OPACITY
        if lung.mean() < self.min_lung_fraction:
            raise NoLungFoundError(
                f"no lung field found (predicted lung covers {100 * lung.mean():.2f} % of the image); "
                "is it a frontal chest radiograph?"
            )
        spacing = spacing if all(math.isfinite(value) and value > 0 for value in spacing) else None
        figures = compute_severity(lung, opacity, image=grey, spacing_mm=spacing, rules=self.rules)
        figures.update(
            rows=rows,
            columns=columns,
            pixel_spacing_mm="" if spacing is None else f"{spacing[0]}x{spacing[1]}",
            severity_rules=self.settings["severity_rules"]["rules"],
        )
        if self.write_images:
            self._write_images(path, lung, opacity, grey, figures)
        return figures

    def _write_images(self, path: str, lung, opacity, grey, figures: dict) -> None:
        stem = file_stem(path)
        folder = os.path.join(self.output_dir, stem)
        write_png(os.path.join(folder, f"{stem}_lung.png"), lung.astype(np.uint8) * 255)
        write_png(os.path.join(folder, f"{stem}_opacity.png"), opacity.astype(np.uint8) * 255)
        if grey is not None and self.write_overlays:
            caption = (
                f"opacity {figures['opacity_pct']:.1f}% of lung  "
                f"(R {figures['right_opacity_pct']:.1f}%  L {figures['left_opacity_pct']:.1f}%)"
            )
            write_png(os.path.join(folder, f"{stem}_overlay.png"), draw_overlay(grey, lung, opacity, caption))

    def completed(self, engine=None) -> None:
        while self._pending:
            self._record(self._pending.popleft().result())
        self._executor.shutdown()
        self._csv_handle.close()
        os.replace(self._partial_csv, os.path.join(self.output_dir, "severity.csv"))
        summary = {"settings": self.settings, "images": self.rows}
        write_json(os.path.join(self.output_dir, "severity.json"), summary)
        succeeded = sum(row["status"] == "ok" for row in self.rows)
        self.logger.info(
            f"severity of {succeeded} of {len(self.rows)} files written to {os.path.join(self.output_dir, 'severity.csv')}"
        )
        if self.fail_if_none_ok and succeeded == 0:
            raise RuntimeError(f"none of the {len(self.rows)} input files could be processed; see the messages above")


def _as_bool(value, name: str) -> bool:
    """A flag given as a bool or, from the command line (``--write_overlays false``), as true/false text."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false"):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value.strip().lower() == "true"
    return bool(value)


def _csv_value(value):
    return "" if value is None else value

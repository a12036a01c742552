"""Ignite handler that turns each predicted class map into masks, an overlay and a row of severity figures.

Attached to the inference evaluator (and reusable by the evaluate workflow), it writes for every input file
``<output_dir>/<relative dir>/<stem>/<stem>_lung.png``, ``_opacity.png`` and ``_overlay.png`` (same width and
height as the input) and one row per input file, in input order, with the columns :data:`CSV_COLUMNS`. The table
streams: while the run goes it is ``severity.incomplete.csv`` (the files done so far, rewritten atomically about
once a second) beside ``severity.json`` with ``"complete": false``; a finished run renames it ``severity.csv`` and
marks ``severity.json`` complete. Ctrl-C or SIGTERM stop after the current batch with the table of what was done and
a non-zero exit; a rerun resumes. :mod:`scripts.output_folder` holds the lock, the reuse rules and which earlier
outputs a rerun removes. Every file is written under a temporary name and renamed: a reader never sees half a file.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from monai.utils import min_version, optional_import

from scripts.host_array import host_array
from scripts.inference_inputs import parse_flag
from scripts.input_gate import InputRefusedError, assess_input
from scripts.label_io import write_png
from scripts.labels import BACKGROUND, OPACITY
from scripts.lung_sides import split_lungs
from scripts.output_folder import (
    INCOMPLETE_TABLE,
    OUTPUT_KINDS,
    TABLE,
    BatchFile,
    OutputFolder,
    OutputFolderBusyError,
    remove_outputs,
    safe_name,
)
from scripts.overlay import draw_overlay
from scripts.progress import format_duration
from scripts.severity import NoLungFoundError, compute_severity
from scripts.severity_calibration import file_sha256, load_calibration

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

CSV_COLUMNS = [
    "image",
    "status",
    "message",
    "warning",  # the input-quality warnings of an ok or error row, joined by "; "
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


FLUSH_SECONDS = 1.0  # the streamed table is rewritten at most this often (more rarely when writing it is slow)


@dataclass
class _Job:
    """What a background thread needs for one image, detached from the engine's tensors."""

    file: BatchFile
    row: dict
    warnings: list[str]  # input-quality warnings; checks of the masks may add theirs
    details: dict  # kept in severity.json beside the row
    classes: np.ndarray
    grey: np.ndarray | None
    spacing: tuple[float, float]
    tags: dict  # DICOM Modality, ViewPosition, BodyPartExamined ("" when unknown) for the input gate


class SeverityWriter:
    """Write masks, overlays and the severity table of every image an evaluator processes.

    Not MONAI's SaveImaged: each image's masks, overlay and table row are written together, atomically, named after
    the input and resumable, on background threads.

    The figures and files of each image are computed on background threads while the network runs on the next
    batch; rows still reach the table in input order, and at most ``max_pending`` images wait at a time, so memory
    stays flat however many images a run has.

    Args:
        output_dir: folder for the per-image folders, the table and ``severity.json``.
        settings: run settings recorded in ``severity.json`` (model version, device, ...); the SHA-256 of its
            ``model_file`` is added, and checked against the weights the calibration was fitted on.
        severity_calibration: the fitted score constants (``models/severity_calibration.json``); None or a missing
            file: published extent bins and hand-set density rule. ``severity.json`` records which, and the constants.
        inputs: the run's input list (``{"image": path, "name": table name}``, as ``list_inputs`` gives): the output
            folder is locked and the run planned at once (:meth:`inputs_to_compute` is then the data list), and every
            listed file gets exactly one row: one the loader never delivered gets an error row and the run fails.
            None: a row for whatever the evaluator delivers (the folder is locked when the run starts).
        resume: with ``inputs``, keep the rows and outputs of files unchanged since the previous run into the same
            folder (same input size and mtime, outputs present, same model, image size, rules and overlay setting).
        write_images: write the mask and overlay PNGs (the evaluate workflow only needs the table).
        write_overlays: with ``write_images``, also draw and write the overlay PNG (False: masks only, faster).
        overlay_max_side: the overlay's longest side in pixels (a larger radiograph's overlay is shrunk, aspect kept;
            None or 0: the radiograph's size). The masks and figures are always computed at full size.
        min_lung_fraction: a prediction whose lung field covers less of the image is reported as "no lung found".
        fail_if_none_ok: raise at the end when no input could be processed, so the command exits non-zero.
        max_pending: images handed to the background threads and not yet written, at most.
        threads: background threads scoring and writing images (2 overlap a PNG write with the next image's figures).
    """

    def __init__(
        self,
        output_dir: str,
        settings: dict | None = None,
        severity_calibration: str | None = None,
        inputs: list[dict] | None = None,
        resume: bool | str = False,
        write_images: bool = True,
        write_overlays: bool | str = True,
        overlay_max_side: int | None = None,
        min_lung_fraction: float = 0.02,
        fail_if_none_ok: bool = True,
        max_pending: int = 4,
        threads: int = 2,
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
        self.write_overlays = parse_flag(write_overlays, "write_overlays")
        self.overlay_max_side = int(overlay_max_side or 0) or None
        if write_images:
            self.settings["write_overlays"] = self.write_overlays
            if self.write_overlays:
                self.settings["overlay_max_side"] = self.overlay_max_side
        self.min_lung_fraction = min_lung_fraction
        self.fail_if_none_ok = fail_if_none_ok
        self.max_pending = max(1, int(max_pending))
        self.threads = max(1, int(threads))
        self.pred_key, self.image_key, self.display_key = pred_key, image_key, display_key
        self.logger = logging.getLogger(self.__class__.__name__)
        self.folder = OutputFolder(output_dir, self.settings, CSV_COLUMNS, write_images)
        self._created = time.monotonic()  # the run's wall time counts from its plan
        self.error_rows = 0  # error rows recorded by this run so far (progress lines)
        if inputs is not None:
            self._open_folder(list(inputs), parse_flag(resume, "resume"))
        self.resumed_rows = len(self.rows)  # rows kept from the previous run
        self._pending: collections.deque = collections.deque()
        self._executor = None
        self._started = False
        self._next_flush, self._unflushed = 0.0, 0
        self._signal: int | None = None
        self._previous_handlers: dict = {}
        self._exit_code = 0

    @property
    def rows(self) -> list[dict]:
        """The rows done so far, in input order."""
        return [file.row for file in self.folder.files if file.row is not None]

    def inputs_to_compute(self) -> list[dict]:
        """The run's data list: the listed files without a row yet (all of them unless resumed), in input order."""
        return self.folder.to_compute()

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.TERMINATE, self.terminated)

    def start(self, engine=None) -> None:
        """Take over the output folder (old table removed, first record written); Ctrl-C and SIGTERM now stop."""
        if not self.folder.is_open:
            self._open_folder(None, resume=False)
        self.folder.begin()
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="severity")
        self._next_flush, self._unflushed = 0.0, 0  # the first row goes out at once, then at most once a second
        self._started = True
        self._install_signal_handlers(engine)

    def _open_folder(self, inputs: list[dict] | None, resume: bool) -> None:
        try:
            self.folder.open(inputs, resume)
        except OutputFolderBusyError as error:
            self.logger.error(str(error))
            raise

    def iteration_completed(self, engine) -> None:
        for batch_item, output_item in zip(engine.state.batch, engine.state.output):
            job = self._job(output_item[self.image_key], output_item[self.pred_key], batch_item.get(self.display_key))
            if job is not None:
                self._pending.append(self._executor.submit(self._evaluate, job))
            while len(self._pending) > self.max_pending:
                self._record(*self._pending.popleft().result())
        self._flush_if_due()

    def add(self, image, class_map, display=None) -> dict:
        """Score one image from its network input (for the meta data) and its full-size class map, now."""
        job = self._job(image, class_map, display)
        if job is not None:
            self._record(*self._evaluate(job))
        return self.folder.file_for(str(image.meta["filename_or_obj"])).row

    def _job(self, image, class_map, display) -> _Job | None:
        """The job of one delivered image; None when the loader delivered its file before (its row stands)."""
        meta = image.meta
        path = str(meta["filename_or_obj"])
        file = self.folder.file_for(path)
        if file.submitted or file.row is not None:
            self.logger.warning(f"{file.name}: delivered again by the loader; only its first result is kept")
            return None
        file.submitted = True
        row = {"image": file.name, "status": "error", "message": str(meta.get("error", "") or "")}
        warnings = [text for text in str(meta.get("warnings", "") or "").split("; ") if text]
        details = {"spacing_source": str(meta.get("spacing_source", "") or "")}
        if file.stamp is not None:
            details.update(input_size=file.stamp[0], input_mtime_ns=file.stamp[1])
        classes = host_array(class_map)  # on the network's device (CUDA) when the postprocessing ran there
        classes = classes.reshape(classes.shape[-2:]).astype(np.uint8)
        rows, columns = classes.shape
        grey = None if display is None else host_array(display)[0, :rows, :columns].copy()
        spacing = tuple(float(value) for value in meta.get("spacing_mm", (math.nan, math.nan)))
        if not row["message"] and self.write_images and not file.owns_folder:
            row["message"] = f"{path}: another input of this run already writes outputs for the name {file.folder!r}"
        tags = {key: str(meta.get(key, "") or "") for key in ("modality", "view_position", "body_part_examined")}
        return _Job(file, row, warnings, details, classes, grey, spacing, tags)

    def _evaluate(self, job: _Job) -> tuple[BatchFile, dict, dict]:
        """The row of one image: its figures, or the reason it has none (runs on a background thread)."""
        row, written = job.row, []
        if not row["message"]:
            try:
                figures, written = self._score(job)
                row.update(figures)
                row.update(status="ok", message="")
            except (NoLungFoundError, OSError, ValueError) as error:
                row["message"] = f"{job.file.path}: {error}"
            except Exception as error:  # noqa: BLE001 - one file's failure is its error row, never the batch's end
                row["message"] = f"{job.file.path}: cannot score it ({type(error).__name__}: {error})"
        self._remove_stale_outputs(job.file, written)
        row["warning"] = "; ".join(job.warnings)
        job.details["outputs"] = written
        return job.file, row, job.details

    def _remove_stale_outputs(self, file: BatchFile, written: list[str]) -> None:
        """The rerun owns the file's outputs: what it did not write now (earlier masks of a failing file) goes."""
        if self.write_images and file.owns_folder:
            stale = {file.output(kind) for kind in OUTPUT_KINDS} | set(file.previous_outputs)
            remove_outputs(self.output_dir, sorted(stale - set(written)))

    def _record(self, file: BatchFile, row: dict, details: dict) -> dict:
        row = {key: safe_name(value) if isinstance(value, str) else value for key, value in row.items()}
        file.row, file.details = row, details
        self._unflushed += 1
        if row["status"] == "error":
            self.error_rows += 1
            self.logger.warning(row["message"])
        return row

    def _flush_if_due(self) -> None:
        now = time.monotonic()
        if self._unflushed and now >= self._next_flush:
            self.folder.write(complete=False)
            self._unflushed = 0
            self._next_flush = time.monotonic() + max(FLUSH_SECONDS, 10 * (time.monotonic() - now))

    def _score(self, job: _Job) -> tuple[dict, list[str]]:
        """The figures of one image and the output files written (relative to ``output_dir``)."""
        classes, grey = job.classes, job.grey
        rows, columns = classes.shape
        lung = classes != BACKGROUND
        opacity = classes == OPACITY
        sides = split_lungs(lung)
        assessment = assess_input(lung, *sides, grey, **job.tags, min_lung_fraction=self.min_lung_fraction)
        job.warnings.extend(assessment.warnings)
        if assessment.errors:
            raise InputRefusedError("; ".join(assessment.errors))
        spacing = job.spacing if all(math.isfinite(value) and value > 0 for value in job.spacing) else None
        figures = compute_severity(lung, opacity, image=grey, spacing_mm=spacing, rules=self.rules, lung_sides=sides)
        figures.update(
            rows=rows,
            columns=columns,
            pixel_spacing_mm="" if spacing is None else f"{spacing[0]}x{spacing[1]}",
            severity_rules=self.settings["severity_rules"]["rules"],
        )
        written = self._write_images(job.file, lung, opacity, grey, figures) if self.write_images else []
        return figures, written

    def _write_images(self, file: BatchFile, lung, opacity, grey, figures: dict) -> list[str]:
        images = {"lung": lung.astype(np.uint8) * 255, "opacity": opacity.astype(np.uint8) * 255}
        if grey is not None and self.write_overlays:
            caption = (
                f"opacity {figures['opacity_pct']:.1f}% of lung  "
                f"(R {figures['right_opacity_pct']:.1f}%  L {figures['left_opacity_pct']:.1f}%)"
            )
            images["overlay"] = draw_overlay(grey, lung, opacity, caption, max_side=self.overlay_max_side)
        for kind, pixels in images.items():
            write_png(os.path.join(self.output_dir, file.output(kind)), pixels)
        return [file.output(kind) for kind in images]

    def completed(self, engine=None) -> None:
        """Write the final table: every listed file has exactly one row (an error row if it was never delivered)."""
        self._finish_pending()
        missing = [file for file in self.folder.files if file.row is None]
        for file in missing:
            self._remove_stale_outputs(file, [])
            message = f"{file.path}: not processed: the loader failed or stopped before this file (see the log above)"
            self._record(file, {"image": file.name, "status": "error", "message": message, "warning": ""}, {})
        self.folder.write(complete=True)
        self.folder.close()
        rows = self.rows
        succeeded = sum(row["status"] == "ok" for row in rows)
        self.logger.info(self.summary(len(rows), succeeded))
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {len(rows)} input files were not processed (their rows say so); run again"
            )
        if self.fail_if_none_ok and succeeded == 0:
            raise RuntimeError(f"none of the {len(rows)} input files could be processed; see the messages above")

    def summary(self, files: int, succeeded: int) -> str:
        """The run's last line: files (computed, kept from the previous run), ok and error rows, wall time, table."""
        kept = f" ({files - self.resumed_rows} computed, {self.resumed_rows} kept from the previous run)"
        return (
            f"finished: {files} files{kept if self.resumed_rows else ''}, {succeeded} ok rows, "
            f"{files - succeeded} error rows, wall time {format_duration(time.monotonic() - self._created)}; "
            f"table: {self.folder.path(TABLE)}"
        )

    def terminated(self, engine=None) -> None:
        """The run was stopped (Ctrl-C, SIGTERM): leave the table of the files done, marked incomplete."""
        self._finish_pending()
        self.folder.write(complete=False)
        self.folder.close()
        self.logger.warning(
            f"interrupted after {len(self.rows)} of {len(self.folder.files)} files; run again to finish "
            f"(the rows done are in {self.folder.path(INCOMPLETE_TABLE)})"
        )
        self._exit_code = 128 + self._signal if self._signal else 1

    def after_run(self, engine=None) -> None:
        """Call once the evaluator's run returned: write the table when it had nothing to compute (every file was
        resumed, so the evaluator skipped its run), and exit with 128 + the signal's number after an interruption."""
        if not self._started:
            self.start()
            self.completed()
        if self._exit_code:
            raise SystemExit(self._exit_code)

    def _finish_pending(self) -> None:
        self._restore_signal_handlers()
        while self._pending:
            self._record(*self._pending.popleft().result())
        if self._executor is not None:
            self._executor.shutdown()

    def _install_signal_handlers(self, engine) -> None:
        if engine is None or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, functools.partial(self._stop, engine))

    def _stop(self, engine, signum: int, frame) -> None:
        """Signal handler: finish the current batch, then stop; a second signal acts at once."""
        self._signal = signum
        self._restore_signal_handlers()
        self.logger.warning(f"{signal.Signals(signum).name} received: stopping after the current batch")
        engine.terminate(skip_completed=True)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous_handlers = {}

"""The output folder of a batch inference run: its lock, its table files, and what a rerun reuses or removes.

Files a run keeps in ``output_dir``:

* ``severity.incomplete.csv`` while the run goes: the rows of the files done so far, in input order, rewritten
  atomically (a kill leaves the last one, a valid table); a finished run renames it to ``severity.csv``;
* ``severity.json``: ``complete`` (false until the run finished), ``done`` and ``total`` files, the run's
  ``settings`` and per file its row plus ``spacing_source``, the input's ``input_size``/``input_mtime_ns`` and the
  ``outputs`` written (paths relative to ``output_dir``), which is what a rerun reads to resume;
* ``.severity.lock``: an exclusive ``flock`` held for the whole run (the OS releases it when the process dies).

A rerun owns the outputs of the files it lists: a file whose previous row was ok, whose size and mtime are unchanged,
whose outputs exist and whose run settings (:data:`RESUME_SETTINGS`) match keeps its row without being recomputed;
a file that now fails loses its old masks and overlay; the rows and outputs of files no longer listed are dropped.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked
    fcntl = None

from scripts.label_io import atomic_write, write_json
from scripts.radiograph_io import SUPPORTED_EXTENSIONS

TABLE = "severity.csv"
INCOMPLETE_TABLE = "severity.incomplete.csv"
SUMMARY = "severity.json"
LOCK = ".severity.lock"
OUTPUT_KINDS = ("lung", "opacity", "overlay")  # <stem>_<kind>.png, the only files a run writes per input
# settings that change the rows or the outputs of a file: a previous row is reused only when all of them match
RESUME_SETTINGS = (
    "bundle_version",
    "model_sha256",
    "image_size",
    "min_lung_fraction",
    "severity_rules",
    "write_overlays",
    "overlay_max_side",
)
# what severity.json holds per file beside its row
DETAIL_KEYS = ("spacing_source", "input_size", "input_mtime_ns", "outputs")

logger = logging.getLogger(__name__)


class OutputFolderBusyError(RuntimeError):
    """Another run holds the lock of the output folder."""


def safe_name(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (``os.listdir``'s surrogate escapes) as ``\\xNN``."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def output_stem(name: str) -> str:
    """File name without a radiograph extension: the name of the input's output folder and files (other extensions
    stay, so that DICOM files named ``1.2.840.5.1`` and ``1.2.840.5.2`` keep apart)."""
    lower = name.lower()
    for extension in SUPPORTED_EXTENSIONS:
        if lower.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)]
    return name


@dataclass
class BatchFile:
    """One input of the run, its output folder (relative to ``output_dir``) and, once done, its row."""

    index: int
    path: str  # where it is read from (may hold surrogate escapes)
    name: str  # the ``image`` column: relative path, UTF-8 safe
    folder: str  # "<relative dir>/<stem>", "/"-separated
    stamp: tuple[int, int] | None  # (size, mtime_ns) when listed; None when it could not be read
    owns_folder: bool = True  # False when an earlier input of the run writes into the same folder
    row: dict | None = None
    details: dict = field(default_factory=dict)
    submitted: bool = False
    previous_outputs: list[str] = field(default_factory=list)  # what an earlier run wrote for it

    def output(self, kind: str) -> str:
        return f"{self.folder}/{self.folder.rsplit('/', 1)[-1]}_{kind}.png"

    def summary(self) -> dict:
        return {**self.row, **self.details}


def lock_output_folder(output_dir: str):
    """Open and ``flock`` ``<output_dir>/.severity.lock``; raise :class:`OutputFolderBusyError` if a run holds it."""
    os.makedirs(output_dir, exist_ok=True)
    handle = open(os.path.join(output_dir, LOCK), "a")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutputFolderBusyError(
            f"another run is writing into the output folder {output_dir!r} (it holds {LOCK}); "
            "wait for it to finish or choose another --output_dir"
        ) from None
    return handle


def file_stamp(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def remove_outputs(output_dir: str, relative_paths) -> list[str]:
    """Delete these output files (only ``<stem>_<kind>.png`` inside ``output_dir``), then their folders if empty."""
    root = os.path.realpath(output_dir)
    removed, folders = [], set()
    for relative in relative_paths:
        path = os.path.realpath(os.path.join(output_dir, relative))
        if not path.startswith(root + os.sep) or not path.endswith(tuple(f"_{kind}.png" for kind in OUTPUT_KINDS)):
            continue
        try:
            os.remove(path)
            removed.append(relative)
        except FileNotFoundError:
            pass
        folders.add(os.path.dirname(path))
    for folder in sorted(folders, key=len, reverse=True):
        while folder.startswith(root + os.sep):
            try:
                os.rmdir(folder)  # only an empty folder goes
            except OSError:
                break
            folder = os.path.dirname(folder)
    return removed


class OutputFolder:
    """The bookkeeping of one run's output folder: lock, plan (reuse, drop), streamed and final tables.

    Args:
        output_dir: the run's output folder.
        settings: the run's settings, written to ``severity.json``; :data:`RESUME_SETTINGS` decide reuse.
        columns: the table's columns.
        write_images: the run writes mask and overlay PNGs (and so owns them); False: the table only.
    """

    def __init__(self, output_dir: str, settings: dict, columns: list[str], write_images: bool):
        self.output_dir, self.settings, self.columns, self.write_images = output_dir, settings, columns, write_images
        self.files: list[BatchFile] = []
        self._by_path: dict[str, BatchFile] = {}  # as listed, and resolved (a loader may report either)
        self._folders: set[str] = set()
        self._dropped: list[dict] = []
        self._lock = None

    @property
    def is_open(self) -> bool:
        return self._lock is not None

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def open(self, inputs: list[dict] | None, resume: bool) -> None:
        """Lock the folder, read the previous run's record and plan ``inputs`` (``{"image": path, "name": ...}``)."""
        self._lock = lock_output_folder(self.output_dir)
        previous = self._read_previous()
        previous_files = {entry.get("image"): entry for entry in previous.get("images", []) if isinstance(entry, dict)}
        for name, outputs in (previous.get("unfinished_outputs") or {}).items():
            previous_files.setdefault(name, {"outputs": outputs})
        settings_match = resume and self._settings_match(previous.get("settings") or {})
        for item in inputs or []:
            self._add(str(item["image"]), item.get("name"), stamp=file_stamp(str(item["image"])))
        listed = {file.name for file in self.files}
        if inputs is not None:  # only a run given its inputs knows which files left the folder
            self._dropped = [entry for name, entry in previous_files.items() if name not in listed]
        reused = 0
        for file in self.files:
            entry = previous_files.get(file.name)
            if entry is None or not file.owns_folder:
                continue
            if settings_match and self._reusable(file, entry):
                file.row = {key: value for key, value in entry.items() if key not in DETAIL_KEYS}
                file.details = {key: entry[key] for key in DETAIL_KEYS if key in entry}
                reused += 1
            else:
                file.previous_outputs = [str(path) for path in entry.get("outputs") or []]
        if reused:
            logger.info(
                f"resuming: {reused} of {len(self.files)} files keep their rows and outputs from the previous run "
                "(unchanged input, settings and outputs); --resume false recomputes them"
            )

    def file_for(self, path: str) -> BatchFile:
        """The planned file read from ``path``, or a new one for a path the plan did not list."""
        planned = self._by_path.get(path) or self._by_path.get(os.path.realpath(path))
        return planned or self._add(path, None, stamp=file_stamp(path))

    def to_compute(self) -> list[dict]:
        """``{"image": path}`` of the planned files that have no row yet, in input order."""
        return [{"image": file.path} for file in self.files if file.row is None]

    def begin(self) -> None:
        """Take over the folder: remove the old table and the outputs of dropped files, write the first record."""
        for name in (TABLE, ".severity.csv.partial"):
            if os.path.exists(self.path(name)):
                os.remove(self.path(name))
        if self._dropped and self.write_images:
            outputs = [path for entry in self._dropped for path in entry.get("outputs") or []]
            removed = remove_outputs(self.output_dir, outputs)
            names = ", ".join(safe_name(entry.get("image", "?")) for entry in self._dropped[:10])
            logger.info(
                f"{len(self._dropped)} files of the previous run are no longer listed ({names}"
                f"{', ...' if len(self._dropped) > 10 else ''}): their rows are dropped and {len(removed)} of their "
                "output files removed"
            )
        self._dropped = []
        self.write(complete=False)

    def write(self, complete: bool) -> None:
        """Write ``severity.json``, then the table of the files done (``severity.incomplete.csv``, or when
        ``complete``, ``severity.csv``)."""
        done = [file for file in self.files if file.row is not None]
        record = {"complete": complete, "done": len(done), "total": len(self.files), "settings": self.settings}
        record["images"] = [file.summary() for file in done]
        if not complete:  # what earlier runs wrote for files not done yet: a later run still owns it
            unfinished = [file for file in self.files if file.row is None and file.previous_outputs]
            record["unfinished_outputs"] = {file.name: file.previous_outputs for file in unfinished}
        if complete:
            self._write_table(INCOMPLETE_TABLE, done)
            os.replace(self.path(INCOMPLETE_TABLE), self.path(TABLE))
            write_json(self.path(SUMMARY), record)
        else:
            write_json(self.path(SUMMARY), record)  # first: the table never lists a file the record lacks
            self._write_table(INCOMPLETE_TABLE, done)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _write_table(self, name: str, files: list[BatchFile]) -> None:
        def write(temporary: str) -> None:
            with open(temporary, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore", restval="")
                writer.writeheader()
                for file in files:
                    writer.writerow({key: "" if value is None else value for key, value in file.row.items()})

        atomic_write(self.path(name), write)

    def _add(self, path: str, name: str | None, stamp) -> BatchFile:
        name = name or safe_name(os.path.basename(path))
        folder = "/".join([*name.split("/")[:-1], output_stem(name.split("/")[-1])])
        file = BatchFile(len(self.files), path, name, folder, stamp, owns_folder=folder not in self._folders)
        self._folders.add(folder)
        self.files.append(file)
        self._by_path.setdefault(path, file)
        self._by_path.setdefault(os.path.realpath(path), file)
        return file

    def _read_previous(self) -> dict:
        try:
            with open(self.path(SUMMARY), encoding="utf-8") as handle:
                previous = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning(f"{self.path(SUMMARY)} is unreadable ({error}); every file is computed again")
            return {}
        return previous if isinstance(previous, dict) else {}

    def _settings_match(self, previous: dict) -> bool:
        if not self.settings.get("model_sha256"):
            return False
        return all(_canonical(previous.get(key)) == _canonical(self.settings.get(key)) for key in RESUME_SETTINGS)

    def _reusable(self, file: BatchFile, entry: dict) -> bool:
        outputs = entry.get("outputs") or []
        expected = {file.output(kind) for kind in OUTPUT_KINDS[:2]} if self.write_images else set()
        return (
            entry.get("status") == "ok"
            and file.stamp is not None
            and (entry.get("input_size"), entry.get("input_mtime_ns")) == file.stamp
            and expected <= set(outputs)
            and all(os.path.isfile(os.path.join(self.output_dir, path)) for path in outputs)
        )


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)

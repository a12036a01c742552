"""Cap what training runs leave in a runs folder (e.g. a served bundle's ``runs/``, one run per retraining round).

A run folder holds its trainer checkpoints (weights, optimizer and scheduler state, ~80 MB each), the final
checkpoint and ``model.pt`` (~300 MB in all), its log and small records. Once a newer run has completed, an older
run's weights are of no further use where every published model is kept beside the served weights
(:mod:`scripts.published_weights`), so :class:`RunsCap` removes them and keeps the logs.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.pt", ".tmp-*")  # checkpoints, model.pt, and temporary files of interrupted writes
RUN_MARKERS = ("log.txt", "*checkpoint_epoch=*.pt", "model.pt")  # a folder with one of these is a run folder


def is_run_folder(folder: str) -> bool:
    return os.path.isdir(folder) and any(glob.glob(os.path.join(folder, marker)) for marker in RUN_MARKERS)


def folder_size(folder: str) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class RunsCap:
    """After a run, the other run folders beside it keep their logs and records but lose their weights, and only the
    newest ``keep_runs`` run folders (this one included) are kept at all.

    Custom: MONAI's CheckpointSaver caps the checkpoints within one run, not the runs a retraining loop accumulates.

    Args:
        runs_folder: the folder of runs (``<bundle_root>/runs``); nothing is done when ``run_folder`` is not in it,
            so folders beside a run written elsewhere (``--output_dir``) are never touched.
        run_folder: this run's folder (``output_dir``).
        keep_runs: how many run folders to keep (this one included), those that last wrote a file most recently.
        enabled: False does nothing (config ``prune_runs``).
    """

    def __init__(self, runs_folder: str, run_folder: str, keep_runs: int = 10, enabled: bool = True):
        self.runs_folder, self.run_folder = os.path.realpath(runs_folder), os.path.realpath(run_folder)
        self.keep_runs, self.enabled = int(keep_runs), bool(enabled)

    def _older_runs(self, started_at: float | None) -> list[str]:
        if os.path.dirname(self.run_folder) != self.runs_folder or not os.path.isdir(self.runs_folder):
            return []
        folders = [os.path.join(self.runs_folder, name) for name in os.listdir(self.runs_folder)]
        folders = [folder for folder in folders if folder != self.run_folder and is_run_folder(folder)]
        if started_at is not None:  # a folder changed since this run started belongs to a run still in progress
            folders = [folder for folder in folders if last_written(folder) < started_at]
        return sorted(folders, key=last_written, reverse=True)

    def apply(self, started_at: float | None = None) -> dict:
        """Prune the runs older than this one (those changed after ``started_at``, seconds since the epoch, are left
        alone); returns what was done: ``{"freed_bytes", "removed_runs", "pruned_runs"}``."""
        done = {"freed_bytes": 0, "removed_runs": [], "pruned_runs": []}
        if not self.enabled:
            return done
        older = self._older_runs(started_at)
        for folder in older[max(0, self.keep_runs - 1) :]:
            done["freed_bytes"] += folder_size(folder)
            shutil.rmtree(folder, ignore_errors=True)
            done["removed_runs"].append(os.path.basename(folder))
        for folder in older[: max(0, self.keep_runs - 1)]:
            freed = 0
            for pattern in WEIGHT_PATTERNS:
                for path in glob.glob(os.path.join(folder, pattern)):
                    if os.path.isfile(path):
                        freed += os.path.getsize(path)
                        os.unlink(path)
            if freed:
                done["freed_bytes"] += freed
                done["pruned_runs"].append(os.path.basename(folder))
        return done


def last_written(folder: str) -> float:
    """When the run last wrote a file in ``folder`` (not the folder's own time, which pruning changes)."""
    times = []
    for path in glob.glob(os.path.join(folder, "*")):
        try:
            times.append(os.path.getmtime(path))
        except OSError:
            pass
    return max(times) if times else os.path.getmtime(folder)

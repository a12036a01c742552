"""The training statistics MONAI Label's ``/info`` shows (``train_stats``), written by a handler of the trainer.

MONAI Label's own trainers write ``train_stats.json`` in the model folder after each epoch; its ``BundleTrainTask``
writes nothing, so ``/info`` shows ``{}`` for a bundle. The app (the repository's scripts/monailabel_app.py) adds
:class:`TrainStatsWriter` to the bundle's training handlers for a round started through the server and reads the
file back.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time

import torch
from ignite.engine import Events

from scripts.label_io import write_json


def _plain(value):
    """A JSON-friendly copy of a metric value: tensors and numpy numbers as lists and numbers, NaN as None."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    elif isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    elif hasattr(value, "item"):
        value = value.item()
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _last_loss(output) -> float | None:
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    loss = output.get("loss") if isinstance(output, dict) else None
    return float(loss) if loss is not None else None


def _stamp(path: str | None) -> list[int] | None:
    try:
        status = os.stat(path) if path else None
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns] if status else None


class TrainStatsWriter:
    """Write the round's statistics to ``path`` (JSON) when training starts, after each epoch and when it ends.

    Custom: MONAI Label writes these only from its own trainers, not for a bundle.

    The keys follow MONAI Label's (``epoch``, ``total_epochs``, ``start_ts``, ``current_time`` while running,
    ``total_time`` when done, ``best_metric``, ``train`` and ``eval`` with ``metrics``, ``key_metric_name``,
    ``best_metric``, ``best_metric_epoch``), plus ``status`` (RUNNING, DONE), ``train_images``, the last ``loss``
    and ``served_weights_replaced``: whether the file at ``served_weights`` changed during the round (attach this
    handler after the one that publishes, so that its end-of-training handler has run).
    """

    def __init__(self, path: str, validator=None, served_weights: str | None = None):
        self.path, self.validator, self.served_weights = path, validator, served_weights
        self.start_ts = time.time()
        self._weights_before: list[int] | None = None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)
        engine.add_event_handler(Events.COMPLETED, self._write, done=True)

    def _started(self, engine) -> None:
        self.start_ts = time.time()
        self._weights_before = _stamp(self.served_weights)
        self._write(engine)

    def stats(self, engine, done: bool = False) -> dict:
        state = engine.state
        elapsed = str(datetime.timedelta(seconds=int(time.time() - self.start_ts)))
        stats: dict = {
            "status": "DONE" if done else "RUNNING",
            "epoch": int(state.epoch),
            "total_epochs": int(state.max_epochs or 0),
            "start_ts": int(self.start_ts),
            "total_time" if done else "current_time": elapsed,
            "loss": _last_loss(state.output),
            "train": {"metrics": _plain(dict(state.metrics))},
        }
        dataset = getattr(getattr(engine, "data_loader", None), "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            stats["train_images"] = len(dataset)
        if self.validator is not None:
            validation = self.validator.state
            best = getattr(validation, "best_metric", None)
            ran = getattr(validation, "best_metric_epoch", -1) not in (-1, None)
            stats["best_metric"] = _plain(best) if ran else None
            stats["eval"] = {
                "metrics": _plain(dict(validation.metrics or {})),
                "key_metric_name": getattr(validation, "key_metric_name", None),
                "best_metric": _plain(best) if ran else None,
                "best_metric_epoch": getattr(validation, "best_metric_epoch", None) if ran else None,
            }
        if done and self.served_weights:
            stats["served_weights_replaced"] = _stamp(self.served_weights) != self._weights_before
        return stats

    def _write(self, engine, done: bool = False) -> None:
        write_json(self.path, self.stats(engine, done))


def read_stats(path: str) -> dict:
    """The statistics at ``path``, or {} when there are none (no round yet) or they cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            stats = json.load(handle)
    except (OSError, ValueError):
        return {}
    return stats if isinstance(stats, dict) else {}

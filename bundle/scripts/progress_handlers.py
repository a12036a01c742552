"""Ignite handlers that show the progress of the bundle's runs: ignite's ProgressBar (tqdm) when stderr is a
terminal, plain log lines (:class:`scripts.progress.ProgressLines`) in a log; ``progress: false`` turns both off.

* :class:`ImageProgress`, on the inference and evaluate evaluator: images done / to compute, images per second,
  time left and the error rows so far (the table's summary line is the severity writer's).
* :class:`TrainingProgress`, on the trainer: a line per epoch (iterations, mean loss, the last validation figures,
  time per epoch and left); on a terminal, also a bar per training and validation epoch. MONAI's StatsHandler
  already logs the loss of every iteration.

Only the first process of a multi-GPU run shows progress. On a terminal, log lines are written above the bars.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time

import torch
from ignite.engine import Events
from ignite.handlers import ProgressBar
from monai.handlers import from_engine
from tqdm.contrib.logging import logging_redirect_tqdm

from scripts.progress import ProgressLines, format_duration, on_terminal, progress_wanted

# ignite's bar with the rate: "inference: [3/10]  30%|███       | 2.51 images/s, error rows=1 [00:01<00:02]"
BAR_FORMAT = "{desc}[{n_fmt}/{total_fmt}] {percentage:3.0f}%|{bar}| {rate_fmt}{postfix} [{elapsed}<{remaining}]"

logger = logging.getLogger("Progress")


def is_first_process() -> bool:
    """False on the ranks other than 0 of a multi-GPU run."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def console_loggers() -> list[logging.Logger]:
    """The loggers that write to stdout or stderr themselves: the root logger and those with a console handler of
    their own (MONAI's StatsHandler logger has one); loggers that only write files are left alone."""
    named = [item for item in logging.Logger.manager.loggerDict.values() if isinstance(item, logging.Logger)]
    return [item for item in [logging.root] + named if any(map(_is_console_handler, item.handlers))]


def _is_console_handler(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def write_logs_above_bars(engine) -> None:
    """While ``engine`` runs, console log lines are written above the progress bars rather than through them."""
    redirect = contextlib.ExitStack()
    engine.add_event_handler(Events.STARTED, lambda _: redirect.enter_context(logging_redirect_tqdm(console_loggers())))
    for event in (Events.COMPLETED, Events.TERMINATE, Events.EXCEPTION_RAISED):
        engine.add_event_handler(event, lambda *_: redirect.close())


def batch_unit(engine) -> str:
    """What one iteration of ``engine`` is: an image (batch size 1) or a batch."""
    return "images" if getattr(getattr(engine, "data_loader", None), "batch_size", None) == 1 else "batches"


class ImageProgress:
    """Progress of an inference or evaluate run over images.

    Args:
        severity_writer: the run's :class:`scripts.severity_handler.SeverityWriter` (error rows so far, files
            resumed); None: counts only.
        progress: False (or "false"): nothing shown.
        label: the name of the run in the lines ("inference", "evaluate").
    """

    def __init__(self, severity_writer=None, progress: bool | str = True, label: str = "inference"):
        self.severity_writer = severity_writer
        self.progress = progress_wanted(progress)
        self.label = label
        self._lines: ProgressLines | None = None

    def attach(self, engine) -> None:
        if not (self.progress and is_first_process()):
            return
        engine.add_event_handler(Events.STARTED, self._start)
        if on_terminal():
            bar = ProgressBar(persist=True, bar_format=BAR_FORMAT, desc=self.label, unit=f" {batch_unit(engine)}")
            bar.attach(engine, output_transform=lambda _: {"error rows": self._error_rows()})
            write_logs_above_bars(engine)
        else:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def _error_rows(self) -> int:
        return 0 if self.severity_writer is None else self.severity_writer.error_rows

    def _details(self) -> str:
        return "" if self.severity_writer is None else f"{self._error_rows()} error rows"

    def _start(self, engine) -> None:
        """Say how many images are left to compute when a resumed run kept some; start the plain lines."""
        dataset = getattr(getattr(engine, "data_loader", None), "dataset", None)
        total = len(dataset) if hasattr(dataset, "__len__") else None
        resumed = 0 if self.severity_writer is None else self.severity_writer.resumed_rows
        if resumed:
            logger.info(f"{self.label}: {total} images to compute, {resumed} kept from the previous run")
        self._lines = ProgressLines(self.label, total, "images", self._details)

    def _iteration_completed(self, engine) -> None:
        output = engine.state.output
        self._lines.advance(len(output) if isinstance(output, (list, tuple)) else 1)


def figures_text(metrics: dict) -> str:
    return ", ".join(f"{name} {float(value):.4f}" for name, value in metrics.items() if _is_number(value))


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class TrainingProgress:
    """Progress of a training run: a line per epoch, and on a terminal bars of the training and validation epochs.

    The line, e.g. ``training: epoch 3/60, 45 iterations, mean loss 0.4123; validation (epoch 2): val_lung_dice
    0.9301, ...; best val_selection_score 0.8123 at epoch 2; 0:00:12 per epoch, about 0:11:36 left``, is written
    after the epoch's validation when the handler comes after the ValidationHandler.

    Args:
        progress: False (or "false"): nothing shown.
        validator: the validation evaluator, for its last figures and best key metric (and its bar).
        label: the name of the run in the lines.
    """

    def __init__(self, progress: bool | str = True, validator=None, label: str = "training"):
        self.progress = progress_wanted(progress)
        self.validator = validator
        self.label = label
        self._first_epoch: int | None = None  # the epoch this run started at (a resumed run starts later)
        self._started = 0.0
        self._loss_sum, self._iterations = 0.0, 0

    def attach(self, trainer) -> None:
        if not (self.progress and is_first_process()):
            return
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if on_terminal():
            bar = ProgressBar(persist=False, bar_format=BAR_FORMAT, desc=self.label, unit=" batches")
            bar.attach(trainer, output_transform=lambda output: {"loss": self._loss(output)})
            if self.validator is not None:
                validation_bar = ProgressBar(persist=False, bar_format=BAR_FORMAT, desc="validation", unit=" batches")
                validation_bar.attach(self.validator)
            write_logs_above_bars(trainer)

    @staticmethod
    def _loss(output) -> float:
        return float(from_engine(["loss"], first=True)(output))

    def _epoch_started(self, trainer) -> None:
        if self._first_epoch is None:  # after the checkpoint of a resumed run was loaded
            self._first_epoch = trainer.state.epoch - 1
            self._started = time.monotonic()
        self._loss_sum, self._iterations = 0.0, 0

    def _iteration_completed(self, trainer) -> None:
        self._loss_sum += self._loss(trainer.state.output)
        self._iterations += 1

    def _epoch_completed(self, trainer) -> None:
        epoch, max_epochs = trainer.state.epoch, trainer.state.max_epochs
        mean_loss = self._loss_sum / self._iterations if self._iterations else math.nan
        parts = [f"epoch {epoch}/{max_epochs}, {self._iterations} iterations, mean loss {mean_loss:.4f}"]
        parts += self._validation_text()
        per_epoch = (time.monotonic() - self._started) / max(1, epoch - self._first_epoch)
        timing = f"{format_duration(per_epoch)} per epoch"
        if epoch < max_epochs:
            timing += f", about {format_duration(per_epoch * (max_epochs - epoch))} left"
        logger.info(f"{self.label}: " + "; ".join(parts + [timing]))

    def _validation_text(self) -> list[str]:
        state = getattr(self.validator, "state", None)
        if state is None or not state.metrics or not state.epoch:
            return []
        parts = [f"validation (epoch {state.epoch}): {figures_text(state.metrics)}"]
        key = getattr(state, "key_metric_name", None) or "key metric"
        if getattr(state, "best_metric_epoch", -1) > 0:
            parts.append(f"best {key} {float(state.best_metric):.4f} at epoch {state.best_metric_epoch}")
        return parts

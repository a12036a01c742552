"""Progress of a long loop: a tqdm bar when stderr is a terminal, else a plain line now and then (logs, CI, nohup).

A plain line names the items done and to do, the rate, what ``details`` adds (error rows, files refused) and the
time left, e.g. ``inference: 120/293 images (40 %), 3.9 images/s, 2 error rows, about 0:00:44 left``; one is
written for the first item, then at least every tenth of the total or every 30 seconds, whichever comes first, and
for the last item.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

from scripts.inference_inputs import parse_flag

LINE_FRACTION = 0.1  # a plain line at least every tenth of the total ...
LINE_SECONDS = 30.0  # ... or every 30 seconds, whichever comes first

logger = logging.getLogger("Progress")


def progress_wanted(progress: bool | str) -> bool:
    """The ``progress`` switch, given as a bool or, from the command line (``--progress false``), as text."""
    return parse_flag(progress, "progress")


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stderr, where bars go) is a terminal with a width (tqdm draws nothing in a
    terminal of width 0, e.g. a pseudo-terminal whose size was never set)."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty()) and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # replaced by an object without a file, or closed
        return False


def format_duration(seconds: float) -> str:
    """``0:01:14``: hours, minutes and seconds."""
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def format_rate(count: int, seconds: float, unit: str) -> str:
    rate = count / seconds if seconds > 0 else math.inf
    if not math.isfinite(rate):
        return ""
    return f"{rate:.1f} {unit}/s" if rate >= 0.1 else f"{60 * rate:.1f} {unit}/min"


class ProgressLines:
    """Plain progress lines of a count towards ``total`` (None: unknown), written with ``write``.

    Args:
        label: what is counted, the start of each line ("inference", "caching training images").
        total: the items to do; None when not known (no percentage, no time left).
        unit: the items' name, plural ("images").
        details: called for each line; its text (e.g. "2 error rows") follows the rate. None: nothing.
        write: where a line goes (default: the "Progress" logger at INFO).
        fraction, seconds: a line at least every ``fraction`` of the total or every ``seconds``.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "images",
        details: Callable[[], str] | None = None,
        write: Callable[[str], None] | None = None,
        fraction: float = LINE_FRACTION,
        seconds: float = LINE_SECONDS,
    ):
        self.label, self.total, self.unit, self.details = label, total, unit, details
        self.write = write or logger.info
        self.step = max(1, math.ceil(total * fraction)) if total else None
        self.seconds = seconds
        self.done = 0
        self.started = time.monotonic()
        self._written_at: tuple[int, float] | None = None  # (count, time) of the last line

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)

    def update(self, done: int) -> None:
        """The count is now ``done``: write a line when one is due."""
        self.done = done
        now = time.monotonic()
        if self._written_at is None:
            due = done > 0
        else:
            written, written_time = self._written_at
            finished = self.total is not None and done >= self.total
            next_step = bool(self.step) and done // self.step > written // self.step  # 10 %, 20 %, ...
            due = done != written and (finished or next_step or now - written_time >= self.seconds)
        if due:
            self.write(self.line(now))
            self._written_at = (done, now)

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.started
        done, total = self.done, self.total
        parts = [f"{done}/{total} {self.unit} ({int(100 * done / total)} %)" if total else f"{done} {self.unit}"]
        parts.append(format_rate(done, elapsed, self.unit))
        parts.append(self.details() if self.details else "")
        if total and done >= total:
            parts.append(f"{format_duration(elapsed)} in all")
        elif total and done:
            parts.append(f"about {format_duration(elapsed / done * (total - done))} left")
        return f"{self.label}: " + ", ".join(part for part in parts if part)


class Progress:
    """The progress of a loop of ``total`` items: a tqdm bar on a terminal, else :class:`ProgressLines`.

    ``enabled`` False (or "false"): nothing is shown. Use as a context manager, calling :meth:`advance` per item.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "files",
        details: Callable[[], str] | None = None,
        enabled: bool | str = True,
        write: Callable[[str], None] | None = None,
    ):
        self.details = details
        self.done = 0
        self._bar, self._lines = None, None
        if not progress_wanted(enabled):
            return
        if on_terminal():
            self._bar = tqdm(total=total, desc=label, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True)
        else:
            self._lines = ProgressLines(label, total, unit, details, write)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            if self.details:
                self._bar.set_postfix_str(self.details(), refresh=False)
            self._bar.update(count)
        elif self._lines is not None:
            self._lines.advance(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

"""MONAI's CacheDataset with the progress of its caching in logs too, and none when ``progress`` is false."""

from __future__ import annotations

import threading

from monai.data import CacheDataset

from scripts.progress import ProgressLines, on_terminal, progress_wanted
from scripts.progress_handlers import is_first_process


class ProgressCacheDataset(CacheDataset):
    """CacheDataset whose caching shows MONAI's own tqdm bar on a terminal and plain lines in a log.

    Custom: MONAI's ``progress`` draws a tqdm bar wherever stderr goes, which a log file stores as one line of
    carriage returns. Here the bar is drawn on a terminal only; elsewhere :class:`scripts.progress.ProgressLines`
    writes a line now and then. Only the first process of a multi-GPU run shows progress.

    Args:
        label: the start of each line ("caching training images").
        progress: False (or "false"): no progress.
        args, kwargs: CacheDataset's (``progress`` excepted).
    """

    def __init__(self, *args, label: str = "caching images", progress: bool | str = True, **kwargs):
        shown = progress_wanted(progress) and is_first_process()
        self._label = label
        self._lines_wanted = shown and not on_terminal()
        self._lines: ProgressLines | None = None
        self._lines_lock = threading.Lock()
        super().__init__(*args, progress=shown and on_terminal(), **kwargs)

    def _fill_cache(self, indices=None) -> list:
        if self._lines_wanted and self.cache_num > 0:
            self._lines = ProgressLines(self._label, self.cache_num if indices is None else len(indices), "images")
        try:
            return super()._fill_cache(indices)
        finally:
            self._lines = None

    def _load_cache_item(self, idx: int):
        item = super()._load_cache_item(idx)
        if self._lines is not None:
            with self._lines_lock:  # items are cached by a pool of threads
                self._lines.advance()
        return item

"""List the files of an input folder for inference, in a stable order."""

from __future__ import annotations

import os


def list_inputs(dataset_dir: str) -> list[dict]:
    """``[{"image": path}, ...]`` for every visible file in ``dataset_dir``, sorted by name.

    Every file is listed, readable or not: one that is not a supported radiograph gets an error row in the results
    rather than being silently ignored. Raises ``FileNotFoundError`` for a missing or empty folder.
    """
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"input folder {dataset_dir!r} does not exist")
    names = sorted(name for name in os.listdir(dataset_dir) if not name.startswith("."))
    items = [{"image": os.path.join(dataset_dir, name)} for name in names if os.path.isfile(os.path.join(dataset_dir, name))]
    if not items:
        raise FileNotFoundError(f"input folder {dataset_dir!r} holds no file to process")
    return items

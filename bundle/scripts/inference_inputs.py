"""List the files of an input folder for inference, in a stable order, with the names the results table uses."""

from __future__ import annotations

import os

from scripts.output_folder import safe_name


def parse_flag(value, name: str) -> bool:
    """A flag given as a bool or, from the command line (``--resume false``), as true/false text."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false"):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value.strip().lower() == "true"
    return bool(value)


def list_inputs(dataset_dir: str, recursive: bool | str = False, exclude_dir: str | None = None) -> list[dict]:
    """``[{"image": path, "name": name}, ...]`` for every visible file in ``dataset_dir``, sorted by ``name``.

    Custom: MONAI reads datalists, not folders; every file is listed, unreadable ones too, for their error rows.

    ``name`` is the path relative to ``dataset_dir`` ("/"-separated; undecodable bytes of a file name written
    ``\\xNN``): the ``image`` column of the table and, without its extension, the output folder. With ``recursive``,
    files in subfolders too (a study/series DICOM export); hidden files and folders and ``exclude_dir`` (the output
    folder, when it lies inside the input folder) are skipped, and folder links are not followed. Every file is
    listed, readable or not: one that is not a supported radiograph gets an error row rather than being ignored.
    Raises ``FileNotFoundError`` for a missing folder or one without a file to process (naming its subfolders).
    """
    recursive = parse_flag(recursive, "recursive")
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"input folder {dataset_dir!r} does not exist")
    excluded = os.path.realpath(exclude_dir) if exclude_dir else None
    files, subfolders, to_scan = [], 0, [""]
    while to_scan:
        relative_dir = to_scan.pop()
        for name in os.listdir(os.path.join(dataset_dir, relative_dir) if relative_dir else dataset_dir):
            relative, path = os.path.join(relative_dir, name), os.path.join(dataset_dir, relative_dir, name)
            if name.startswith("."):
                continue
            if os.path.isfile(path):
                files.append(relative)
            elif os.path.isdir(path) and os.path.realpath(path) != excluded:
                subfolders += 1
                if recursive and not os.path.islink(path):
                    to_scan.append(relative)
    if not files:
        if subfolders and not recursive:
            raise FileNotFoundError(
                f"input folder {dataset_dir!r} holds no file but {subfolders} subfolders; pass --recursive true "
                "to process the files in them"
            )
        raise FileNotFoundError(f"input folder {dataset_dir!r} holds no file to process")
    files.sort(key=lambda relative: relative.split(os.sep))
    return [
        {"image": os.path.join(dataset_dir, relative), "name": safe_name(relative.replace(os.sep, "/"))}
        for relative in files
    ]

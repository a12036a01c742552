"""Read and write single-channel label maps (PNG or NIfTI) in viewer orientation, and the JSON files beside them,
atomically."""

from __future__ import annotations

import functools
import json
import os
import tempfile

import numpy as np

from scripts.radiograph_io import RadiographError


def read_label_map(path: str) -> np.ndarray:
    """Label map as a (rows, columns) uint8 array; NIfTI voxel (i, j) is column i, row j."""
    path = str(path)
    if not os.path.isfile(path):
        raise RadiographError(path, "label file not found")
    try:
        if path.lower().endswith((".nii", ".nii.gz")):
            import nibabel

            labels = np.squeeze(np.asarray(nibabel.load(path).dataobj)).T
        else:
            from PIL import Image

            with Image.open(path) as image:
                labels = np.asarray(image.convert("L") if image.mode in ("RGB", "RGBA", "P", "LA") else image)
    except Exception as error:
        raise RadiographError(path, f"cannot read label map ({type(error).__name__}: {error})") from error
    if labels.ndim != 2:
        raise RadiographError(path, f"expected a 2D label map, got shape {tuple(labels.shape)}")
    return np.rint(labels).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def process_umask() -> int:
    """The process's umask, read once: from /proc/self/status (Linux; changes nothing), else set and put back."""
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write(path: str, write) -> None:
    """Call ``write(temporary_path)`` then rename to ``path``, so a reader never sees a half-written file.

    The file gets the permissions of any file the user creates (0666 less the umask; mkstemp alone gives 0600).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = ".nii.gz" if path.lower().endswith(".nii.gz") else os.path.splitext(path)[1]
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~process_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_png(path: str, array: np.ndarray, compress_level: int = 1) -> None:
    """Write a (rows, columns) or (rows, columns, 3) uint8 array as PNG, atomically.

    zlib level 1 by default: several times faster than PIL's default 6, and masks stay small.
    """
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG", compress_level=compress_level))


def write_json(path: str, content) -> None:
    """Write ``content`` as indented UTF-8 JSON, atomically."""

    def dump(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=1)

    atomic_write(path, dump)

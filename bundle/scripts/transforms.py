"""MONAI dictionary transforms that load radiographs and label maps and shape them for the network and metrics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.label_io import read_label_map
from scripts.labels import BACKGROUND, LUNG_UNANNOTATED, OPACITY
from scripts.radiograph_io import Radiograph, RadiographError, read_radiograph

PLACEHOLDER_SHAPE = (32, 32)  # stands in for a file that could not be read


class LoadRadiographd(MapTransform):
    """Load each key's file as a (1, rows, columns) float32 MetaTensor in viewer orientation.

    Not MONAI's LoadImaged: its readers give 2D images as (column, row) and skip EXIF orientation, PresentationLUTShape,
    clipping VOI windows, spacing at the patient and the input gate's DICOM tags.

    The meta data holds the file name, the original size (rows, columns), the pixel spacing at the patient in mm
    (row, column; NaN when not known, so that batches of mixed files still collate), and plain strings:
    ``spacing_source`` (the tag behind the spacing), ``warnings`` (the reader's warnings joined by "; "),
    ``modality``, ``view_position``, ``body_part_examined`` (DICOM tags; empty otherwise) and ``error``: empty, or,
    with ``record_errors``, why the file could not be read (any exception, MemoryError included; the image is then a
    small blank placeholder, so that one bad file neither stops a batch nor drops out of it).
    """

    def __init__(self, keys: KeysCollection, record_errors: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.record_errors = record_errors

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            if isinstance(source, torch.Tensor):  # already loaded (e.g. by a server that reads the image itself)
                continue
            try:
                radiograph = read_radiograph(source)
                image = torch.from_numpy(radiograph.pixels[None])
            except Exception as error:  # noqa: BLE001 - every loader failure becomes this file's error row
                if not self.record_errors:
                    raise
                message = (
                    str(error)
                    if isinstance(error, RadiographError)
                    else (f"{source}: cannot load: {type(error).__name__}: {error}")
                )
                d[key] = MetaTensor(torch.zeros(1, *PLACEHOLDER_SHAPE), meta=_meta(str(source), PLACEHOLDER_SHAPE))
                d[key].meta["error"] = message
                continue
            d[key] = MetaTensor(image, meta=_meta(radiograph.path, radiograph.pixels.shape, radiograph))
        return d


def _meta(path: str, shape, radiograph: Radiograph | None = None) -> dict:
    """Meta data of a loaded file (or, without ``radiograph``, of an error placeholder); strings, so batches collate."""
    nan = float("nan")
    spacing = radiograph.spacing_mm if radiograph is not None else None
    details = radiograph.details if radiograph is not None else {}
    return {
        "filename_or_obj": path,
        "original_shape": tuple(int(size) for size in shape),
        "spacing_mm": tuple(float(value) for value in spacing) if spacing else (nan, nan),
        "spacing_source": radiograph.spacing_source if radiograph is not None else "",
        "source_format": radiograph.source_format if radiograph is not None else "",
        "warnings": "; ".join(radiograph.warnings) if radiograph is not None else "",
        "modality": str(details.get("modality", "")),
        "view_position": str(details.get("view_position", "")),
        "body_part_examined": str(details.get("body_part_examined", "")),
        "error": "",
    }


class DisplayImaged(MapTransform):
    """Copy ``key`` (full resolution) to ``display_key`` as uint8, scaled by its 0.5-99.5 intensity percentiles.

    Not CopyItemsd + ScaleIntensityRangePercentilesd + CastToTyped: the strided sample is 1.2x faster at 2000 x 2000
    (scripts/benchmark_transforms.py), and the calibrated opacity-density rule was fitted on these values.

    The display copy feeds the overlay and the opacity-density estimate; percentiles come from a strided sample of
    about 256x256 pixels, so the cost stays small on large radiographs.
    """

    def __init__(self, keys: KeysCollection, display_key: str = "display", lower: float = 0.5, upper: float = 99.5):
        super().__init__(keys)
        self.display_key, self.lower, self.upper = display_key, lower, upper

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            pixels = d[key][0]
            stride = max(1, max(pixels.shape) // 256)
            low, high = torch.quantile(
                pixels[::stride, ::stride].float().flatten(), torch.tensor([self.lower, self.upper]) / 100
            )
            scaled = ((pixels - low) / torch.clamp(high - low, min=1e-6)).clamp(0, 1)
            d[self.display_key] = torch.round(scaled * 255).to(torch.uint8)[None]
        return d


class ResizeToOriginald(MapTransform):
    """Resize network-size probabilities in ``keys`` back to the original (rows, columns) of ``reference_key``.

    Not MONAI's Invertd: it undoes Resized with its forward mode ("area"), which enlarges in blocks; this is bilinear.
    """

    def __init__(self, keys: KeysCollection, reference_key: str = "image", mode: str = "bilinear"):
        super().__init__(keys)
        self.reference_key, self.mode = reference_key, mode

    def __call__(self, data):
        d = dict(data)
        rows, columns = (int(size) for size in d[self.reference_key].meta["original_shape"])
        for key in self.key_iterator(d):
            resized = F.interpolate(torch.as_tensor(d[key])[None].float(), size=(rows, columns), mode=self.mode)
            d[key] = resized[0]
        return d


class MostProbableClassd(MapTransform):
    """Replace (classes, H, W) probabilities in ``keys`` by the (1, H, W) index of the most probable class.

    Not MONAI's AsDiscreted(argmax=True), which gives the same map (the lowest index wins a tie): one pass per class
    is 6x faster at 2000 x 2000 on 2 CPU cores (scripts/benchmark_transforms.py).
    """

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            probabilities = d[key]
            best = probabilities[0].clone()
            classes = torch.zeros_like(best)
            for index in range(1, probabilities.shape[0]):
                more_probable = probabilities[index] > best
                classes[more_probable] = index
                best = torch.maximum(best, probabilities[index])
            d[key] = classes[None]
        return d


class LoadLabelMapd(MapTransform):
    """Load each key's label map as a (1, rows, columns) float32 MetaTensor with the bundle's label values.

    Not MONAI's LoadImaged: no one reader gives PNG and NIfTI label maps in LoadRadiographd's (rows, columns) order,
    and errors here name the file.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            labels = read_label_map(d[key])
            meta = {"filename_or_obj": str(d[key]), "original_shape": tuple(labels.shape)}
            d[key] = MetaTensor(torch.from_numpy(labels[None].astype(np.float32)), meta=meta)
        return d


class LungOpacityMasksd(MapTransform):
    """Turn a predicted class map and a label map into binary lung and opacity masks for the metrics.

    Not MONAI's LabelToMaskd: it cannot empty the opacity mask of lungs whose opacity was not annotated (label 3).

    Writes ``<key>_lung`` and ``<key>_opacity`` (1, H, W) tensors. Lung without opacity annotation (label 3) gives
    an empty opacity mask, which MONAI's Dice ignores (``ignore_empty``), so it never counts as "no opacity".
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            classes = d[key]
            d[f"{key}_lung"] = (classes != BACKGROUND).float()
            d[f"{key}_opacity"] = (classes == OPACITY).float()
            if bool((classes == LUNG_UNANNOTATED).any()):
                d[f"{key}_opacity"] = torch.zeros_like(d[f"{key}_opacity"])
        return d

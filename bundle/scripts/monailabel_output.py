"""Shape the bundle's class map for MONAI Label, whose writer follows MONAI's (x, y) = (column, row) convention."""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

LOSSLESS_LABEL_EXTENSIONS = (".png", ".nii.gz", ".nii", ".nrrd")


class MonaiLabelMaskd(MapTransform):
    """Turn the (1, rows, columns) class map in ``keys`` into the 2D (columns, rows) uint8 array MONAI Label writes.

    Custom: MONAI's Transposed and CastToTyped would do the shape, but not the lossless PNG for a JPEG radiograph.

    MONAI Label's writer transposes the array it is given before ITK saves it (PNG, NIfTI, NRRD), as MONAI's own
    readers load 2D images as (column, row); handing it the bundle's class map transposed makes the saved mask lie
    on the radiograph as a viewer shows it. The writer saves in the image's format unless the request names one
    (``result_extension``): for a JPEG (lossy) radiograph the mask is written as ``default_extension`` instead.
    An image the reader could not read (``meta["error"]`` of ``reference_key``) raises a ``ValueError`` naming the
    file, rather than returning an empty mask.
    """

    def __init__(self, keys: KeysCollection, reference_key: str = "image", default_extension: str = ".png"):
        super().__init__(keys)
        self.reference_key, self.default_extension = reference_key, default_extension

    def __call__(self, data):
        d = dict(data)
        meta = getattr(d.get(self.reference_key), "meta", {}) or {}
        if meta.get("error"):
            raise ValueError(f"cannot segment {meta.get('filename_or_obj', 'the image')}: {meta['error']}")
        for key in self.key_iterator(d):
            classes = torch.as_tensor(d[key]).detach().cpu()
            if classes.ndim == 3 and classes.shape[0] == 1:
                classes = classes[0]
            if classes.ndim != 2:
                raise ValueError(f"{key}: expected a (1, rows, columns) class map, got shape {tuple(classes.shape)}")
            d[key] = np.ascontiguousarray(classes.numpy().astype(np.uint8).T)
        image_path = str(d.get("image_path") or meta.get("filename_or_obj") or "")
        if not d.get("result_extension") and not image_path.lower().endswith(LOSSLESS_LABEL_EXTENSIONS):
            d["result_extension"] = self.default_extension
        return d

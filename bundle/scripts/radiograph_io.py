"""Read a frontal chest radiograph from DICOM, PNG, JPEG or NIfTI into one grey 2D array.

Every reader returns the pixels as a viewer shows them: ``array[row, column]`` with row 0 at the top of the image
and column 0 on the image's left (the patient's right on a frontal view). Higher values are denser (whiter, as on a
MONOCHROME2 display). Nothing is flipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

DICOM_EXTENSIONS = (".dcm", ".dicom")
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
SUPPORTED_EXTENSIONS = DICOM_EXTENSIONS + PIL_EXTENSIONS + NIFTI_EXTENSIONS


class RadiographError(ValueError):
    """A file that cannot be read as a 2D radiograph; the message names the file and the problem."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class Radiograph:
    """Grey pixels (rows x columns, float32) and what is known about them."""

    pixels: np.ndarray
    path: str
    source_format: str
    spacing_mm: tuple[float, float] | None = None  # (row spacing, column spacing)
    details: dict = field(default_factory=dict)


def file_stem(path: str) -> str:
    """File name without its extension; ``.nii.gz`` counts as one extension."""
    name = os.path.basename(path)
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    return os.path.splitext(name)[0]


def is_dicom_file(path: str) -> bool:
    """True when the file carries the DICOM preamble marker ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def detect_format(path: str) -> str | None:
    """``dicom``, ``pil`` or ``nifti`` from the extension (or the DICOM marker); None when unsupported."""
    lower = path.lower()
    if lower.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    if lower.endswith(PIL_EXTENSIONS):
        return "pil"
    if lower.endswith(DICOM_EXTENSIONS) or is_dicom_file(path):
        return "dicom"
    return None


def read_radiograph(path: str) -> Radiograph:
    """Read ``path`` into a :class:`Radiograph`; raise :class:`RadiographError` naming the problem."""
    path = str(path)
    if not os.path.isfile(path):
        raise RadiographError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise RadiographError(path, "file is empty")
    kind = detect_format(path)
    if kind is None:
        raise RadiographError(path, "unsupported file type (expected DICOM, PNG, JPEG or NIfTI)")
    reader = {"dicom": _read_dicom, "pil": _read_pil, "nifti": _read_nifti}[kind]
    try:
        radiograph = reader(path)
    except RadiographError:
        raise
    except Exception as error:  # decoders raise many types; report them all the same way
        raise RadiographError(path, f"cannot decode {kind} file ({type(error).__name__}: {error})") from error
    pixels = radiograph.pixels
    if pixels.ndim != 2:
        raise RadiographError(path, f"expected a 2D radiograph, got an array of shape {tuple(pixels.shape)}")
    if min(pixels.shape) < 16:
        raise RadiographError(path, f"image of {pixels.shape[0]}x{pixels.shape[1]} pixels is too small")
    if not np.isfinite(pixels).all():
        raise RadiographError(path, "image contains non-finite values")
    if float(pixels.max()) == float(pixels.min()):
        raise RadiographError(path, "image is blank (every pixel has the same value)")
    return radiograph


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (..., 3) array, as float32."""
    weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return rgb[..., :3].astype(np.float32) @ weights


def _read_pil(path: str) -> Radiograph:
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        if getattr(image, "n_frames", 1) > 1:
            raise RadiographError(path, f"multi-frame image ({image.n_frames} frames) is not a single radiograph")
        if mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        array = np.asarray(image)
    if array.ndim == 3:
        channels = array.shape[2]
        if channels in (2,):  # grey + alpha
            array = array[..., 0]
        elif channels >= 3:
            array = rgb_to_grey(array)
    details = {"mode": mode, "dtype": str(array.dtype)}
    return Radiograph(array.astype(np.float32), path, "png" if path.lower().endswith(".png") else "jpeg", None, details)


def _read_dicom(path: str) -> Radiograph:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(path)
    except InvalidDicomError as error:
        raise RadiographError(path, f"not a valid DICOM file ({error})") from error
    if "PixelData" not in dataset:
        raise RadiographError(path, "DICOM file has no pixel data")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise RadiographError(path, f"DICOM file holds {frames} frames; expected a single 2D radiograph")
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    array = dataset.pixel_array
    if photometric.startswith("MONOCHROME"):
        array = apply_modality_lut(array, dataset)
        array = apply_voi_lut(array, dataset).astype(np.float32)
        if photometric == "MONOCHROME1":  # low values are white: invert to the MONOCHROME2 convention
            array = float(array.max()) + float(array.min()) - array
    elif array.ndim == 3 and array.shape[-1] == 3:  # pixel_array converts YBR to RGB
        array = rgb_to_grey(array)
    else:
        raise RadiographError(path, f"unsupported DICOM photometric interpretation {photometric}")
    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing")
    spacing_mm = (float(spacing[0]), float(spacing[1])) if spacing else None
    details = {
        "photometric_interpretation": photometric,
        "bits_stored": int(dataset.get("BitsStored", 0) or 0),
        "transfer_syntax": str(dataset.file_meta.get("TransferSyntaxUID", "")),
        "modality": str(dataset.get("Modality", "")),
        "view_position": str(dataset.get("ViewPosition", "")),
    }
    return Radiograph(np.asarray(array, dtype=np.float32), path, "dicom", spacing_mm, details)


def _read_nifti(path: str) -> Radiograph:
    """NIfTI voxel (i, j) is column i, row j, as MONAI writes 2D images; spacing comes from the header zooms."""
    import nibabel

    image = nibabel.load(path)
    data = np.asarray(image.dataobj)
    zooms = tuple(float(z) for z in image.header.get_zooms())
    squeezed = np.squeeze(data)
    if squeezed.ndim == 3 and squeezed.shape[-1] in (3, 4) and data.ndim >= 4:  # (x, y, 1, rgb)
        squeezed = rgb_to_grey(squeezed)
    if squeezed.ndim != 2:
        raise RadiographError(path, f"NIfTI holds a {squeezed.ndim}D volume of shape {tuple(data.shape)}; expected 2D")
    spacing_mm = (zooms[1], zooms[0]) if len(zooms) >= 2 and zooms[0] > 0 and zooms[1] > 0 else None
    details = {"dtype": str(data.dtype)}
    return Radiograph(np.ascontiguousarray(squeezed.T).astype(np.float32), path, "nifti", spacing_mm, details)

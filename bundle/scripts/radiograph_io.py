"""Read a frontal chest radiograph from DICOM, PNG, JPEG or NIfTI into one grey 2D array.

Every reader returns the pixels as a viewer shows them: ``array[row, column]`` with row 0 at the top of the image
and column 0 on the image's left (the patient's right on a frontal view). Higher values are denser (whiter, as on a
MONOCHROME2 display). Orientation tags are applied: a JPEG/PNG EXIF orientation, a NIfTI affine (relative to the
identity affine, which means voxel (i, j) = column i, row j, as MONAI writes 2D images) and a DICOM
``PresentationLUTShape`` of INVERSE.

Spacing is reported only where it is known to be at the patient (see :func:`_dicom_spacing` and
:func:`_nifti_spacing`); ``Radiograph.spacing_source`` says which tag gave it and ``Radiograph.warnings`` why there
is none. Images whose header claims more than :data:`MAX_PIXELS` pixels are refused before they are decoded. DICOM
pixels are decoded by :mod:`scripts.dicom_pixels`, with pydicom 3 (the bundle's environment) or 2.4 (MONAI Label's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

DICOM_EXTENSIONS = (".dcm", ".dicom")
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
SUPPORTED_EXTENSIONS = DICOM_EXTENSIONS + PIL_EXTENSIONS + NIFTI_EXTENSIONS

MAX_PIXELS = 50_000_000
"""Largest image (rows x columns) read; a 4,300 x 4,300 chest radiograph has 18.5 million pixels. Larger headers are
refused before decoding, so that one file cannot exhaust the loader's memory. Pillow's own decompression-bomb limit
is set to the same number (it warns above it and refuses above twice it; this module refuses first)."""

EXIF_ORIENTATION_TAG = 0x0112
CLIPPED_FRACTION_LIMIT = 0.5  # a stored VOI window that maps more of the pixels to its lowest or highest output clips
NIFTI_UNITS_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001}


class RadiographError(ValueError):
    """A file that cannot be read as a 2D radiograph; the message names the file and the problem."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class Radiograph:
    """Grey pixels (rows x columns, float32) and what is known about them.

    ``details`` always holds ``orientation``, ``modality``, ``view_position`` and ``body_part_examined`` (the last
    three from DICOM tags, "" for other formats); ``spacing_source`` names the tag behind ``spacing_mm`` ("" when
    None); ``warnings`` are problems that did not stop the reading (e.g. why there is no spacing).
    """

    pixels: np.ndarray
    path: str
    source_format: str
    spacing_mm: tuple[float, float] | None = None  # (row spacing, column spacing) at the patient
    details: dict = field(default_factory=dict)
    spacing_source: str = ""
    warnings: list[str] = field(default_factory=list)


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
    try:
        size = os.path.getsize(path) if os.path.isfile(path) else None
    except OSError as error:  # removed or unreadable since it was listed
        raise RadiographError(path, f"cannot read file ({error})") from error
    if size is None:
        raise RadiographError(path, "file not found")
    if size == 0:
        raise RadiographError(path, "file is empty")
    kind = detect_format(path)
    if kind is None:
        raise RadiographError(path, "unsupported file type (expected DICOM, PNG, JPEG or NIfTI)")
    reader = {"dicom": _read_dicom, "pil": _read_pil, "nifti": _read_nifti}[kind]
    try:
        radiograph = reader(path)
        _check_pixels(radiograph)
    except RadiographError:
        raise
    except Exception as error:  # decoders raise many types (MemoryError included); report them all the same way
        raise RadiographError(path, f"cannot decode {kind} file ({type(error).__name__}: {error})") from error
    for key in ("orientation", "modality", "view_position", "body_part_examined"):
        radiograph.details.setdefault(key, "")
    return radiograph


def _check_pixels(radiograph: Radiograph) -> None:
    path, pixels = radiograph.path, radiograph.pixels
    if pixels.ndim != 2:
        raise RadiographError(path, f"expected a 2D radiograph, got an array of shape {tuple(pixels.shape)}")
    if min(pixels.shape) < 16:
        raise RadiographError(path, f"image of {pixels.shape[0]}x{pixels.shape[1]} pixels is too small")
    if not np.isfinite(pixels).all():
        raise RadiographError(path, "image contains non-finite values")
    if float(pixels.max()) == float(pixels.min()):
        raise RadiographError(path, "image is blank (every pixel has the same value)")


def refuse_oversized(path: str, rows: int, columns: int, planes: int = 1) -> None:
    """Raise :class:`RadiographError` when a header claims more than :data:`MAX_PIXELS` pixels in all."""
    if int(rows) * int(columns) * max(1, int(planes)) > MAX_PIXELS:
        size = f"{int(rows)} x {int(columns)}" + (f" x {int(planes)}" if planes > 1 else "")
        raise RadiographError(path, f"image of {size} pixels exceeds the limit of {MAX_PIXELS:,} pixels")


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (..., 3) array, as float32."""
    weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return rgb[..., :3].astype(np.float32) @ weights


# ------------------------------------------------------------------------------------------------------ PNG, JPEG


def _pillow():
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    return Image


def _pil_header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, parsed without Pillow's decompression-bomb check."""
    from PIL import JpegImagePlugin, PngImagePlugin

    for image_class in (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile):
        try:
            with image_class(path) as image:
                return image.size
        except (SyntaxError, OSError, ValueError):
            continue
    return None


def _read_pil(path: str) -> Radiograph:
    Image = _pillow()
    from PIL import ImageOps

    try:
        image = Image.open(path)
    except Image.DecompressionBombError:  # only above twice MAX_PIXELS: name the size as for any other refusal
        size = _pil_header_size(path)
        if size is None:
            raise
        refuse_oversized(path, size[1], size[0])
        raise
    with image:
        width, height = image.size
        refuse_oversized(path, height, width)
        mode = image.mode
        if getattr(image, "n_frames", 1) > 1:
            raise RadiographError(path, f"multi-frame image ({image.n_frames} frames) is not a single radiograph")
        orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
        if 2 <= orientation <= 8:
            image = ImageOps.exif_transpose(image)
        if mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        array = np.asarray(image)
    if array.ndim == 3:
        channels = array.shape[2]
        if channels in (2,):  # grey + alpha
            array = array[..., 0]
        elif channels >= 3:
            array = rgb_to_grey(array)
    details = {
        "mode": mode,
        "dtype": str(array.dtype),
        "orientation": f"EXIF {orientation} applied" if 2 <= orientation <= 8 else "as stored",
    }
    source_format = "png" if path.lower().endswith(".png") else "jpeg"
    return Radiograph(array.astype(np.float32), path, source_format, None, details)


# ---------------------------------------------------------------------------------------------------------- DICOM


def _read_dicom(path: str) -> Radiograph:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from scripts.dicom_pixels import MissingDecoderError, apply_modality_lut, decoded_pixels

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as error:
        raise RadiographError(path, f"not a valid DICOM file ({error})") from error
    frames = int(header.get("NumberOfFrames", 1) or 1)
    refuse_oversized(path, int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0), frames)
    if frames > 1:
        raise RadiographError(path, f"DICOM file holds {frames} frames; expected a single 2D radiograph")
    dataset = pydicom.dcmread(path)
    if "PixelData" not in dataset:
        raise RadiographError(path, "DICOM file has no pixel data")
    warnings: list[str] = []
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    presentation_shape = str(dataset.get("PresentationLUTShape", "") or "").upper()
    try:
        array = decoded_pixels(dataset)
    except MissingDecoderError as error:
        raise RadiographError(path, str(error)) from error
    grey_levels = "as stored"
    if photometric.startswith("MONOCHROME"):
        array = _apply_voi(apply_modality_lut(array, dataset), dataset, warnings).astype(np.float32)
        inverse = (["MONOCHROME1"] if photometric == "MONOCHROME1" else []) + (
            ["PresentationLUTShape INVERSE"] if presentation_shape == "INVERSE" else []
        )
        if inverse:  # low values are white: invert once to the MONOCHROME2 convention, whichever tag(s) say so
            array = float(array.max()) + float(array.min()) - array
            grey_levels = f"inverted ({' + '.join(inverse)})"
    elif array.ndim == 3 and array.shape[-1] == 3:  # pixel_array converts YBR to RGB
        array = rgb_to_grey(array)
    else:
        raise RadiographError(path, f"unsupported DICOM photometric interpretation {photometric}")
    spacing_mm, spacing_source = _dicom_spacing(dataset, warnings)
    details = {
        "photometric_interpretation": photometric,
        "presentation_lut_shape": presentation_shape,
        "bits_stored": int(dataset.get("BitsStored", 0) or 0),
        "transfer_syntax": str(dataset.file_meta.get("TransferSyntaxUID", "")),
        "grey_levels": grey_levels,
        "orientation": "as stored",
        "modality": str(dataset.get("Modality", "") or ""),
        "view_position": str(dataset.get("ViewPosition", "") or ""),
        "body_part_examined": str(dataset.get("BodyPartExamined", "") or ""),
    }
    pixels = np.asarray(array, dtype=np.float32)
    return Radiograph(pixels, path, "dicom", spacing_mm, details, spacing_source, warnings)


def _apply_voi(values: np.ndarray, dataset, warnings: list[str]) -> np.ndarray:
    """The stored VOI window or LUT applied to modality values, unless it clips most pixels (then ``values``)."""
    from scripts.dicom_pixels import apply_voi_lut

    windowed = apply_voi_lut(values, dataset)
    if windowed is values:  # no VOI window or LUT in the file
        return values
    clipped = 0.0
    for extreme in (windowed.min(), windowed.max()):
        at_extreme = windowed == extreme
        if values[at_extreme].min() != values[at_extreme].max():  # different stored values merged: clipped
            clipped += float(at_extreme.mean())
    if clipped <= CLIPPED_FRACTION_LIMIT:
        return windowed
    if dataset.get("VOILUTSequence"):
        window = "VOI LUT"
    else:
        window = f"window (centre {_first(dataset.WindowCenter):g}, width {_first(dataset.WindowWidth):g})"
    warnings.append(
        f"stored VOI {window} clips {100 * clipped:.0f} % of the pixels; used the full stored range " "instead"
    )
    return values


def _first(value) -> float:
    """The first number of a DICOM value that may hold several."""
    return float(np.ravel(np.asarray(value, dtype=np.float64))[0])


def _positive_pair(value) -> tuple[float, float] | None:
    try:
        pair = (float(value[0]), float(value[1]))
    except (TypeError, ValueError, IndexError):
        return None
    return pair if all(np.isfinite(pair)) and min(pair) > 0 else None


def _dicom_spacing(dataset, warnings: list[str]) -> tuple[tuple[float, float] | None, str]:
    """(row, column) spacing at the patient in mm and the tag it came from; (None, "") with a warning otherwise.

    ``PixelSpacing`` is at the patient, unless it merely repeats ``ImagerPixelSpacing`` without a
    ``PixelSpacingCalibrationType``; ``ImagerPixelSpacing`` is at the detector and is divided by
    ``EstimatedRadiographicMagnificationFactor`` when the file gives one.
    """
    pixel = _positive_pair(dataset.get("PixelSpacing"))
    imager = _positive_pair(dataset.get("ImagerPixelSpacing"))
    calibrated = bool(str(dataset.get("PixelSpacingCalibrationType", "") or "").strip())
    if pixel is not None and (imager is None or calibrated or not np.allclose(pixel, imager, rtol=1e-6)):
        return pixel, "PixelSpacing"
    if imager is None:
        return None, ""
    try:
        magnification = float(dataset.get("EstimatedRadiographicMagnificationFactor", 0) or 0)
    except (TypeError, ValueError):
        magnification = 0.0
    if np.isfinite(magnification) and magnification > 0:
        spacing = (imager[0] / magnification, imager[1] / magnification)
        return spacing, f"ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor {magnification:g}"
    repeated = " (PixelSpacing repeats it without PixelSpacingCalibrationType)" if pixel is not None else ""
    warnings.append(
        f"ImagerPixelSpacing is at the detector{repeated} and no EstimatedRadiographicMagnificationFactor: "
        "areas in pixels only"
    )
    return None, ""


# ---------------------------------------------------------------------------------------------------------- NIfTI


def _read_nifti(path: str) -> Radiograph:
    """NIfTI reoriented to the identity affine's axes, then voxel (i, j) is column i, row j, as MONAI writes 2D.

    Both identities writers use for a 2D image count as "as stored": the RAS identity (nibabel, MONAI's PILReader)
    and diag(-1, -1, 1) (ITK's LPS identity written as RAS, also MONAI's ITKReader). Any other flip or axis swap is
    undone, so a flipped column axis does not swap the patient's right and left.
    """
    import nibabel
    from nibabel.orientations import apply_orientation, io_orientation, ornt2axcodes

    image = nibabel.load(path)
    shape = tuple(int(size) for size in image.shape)
    refuse_oversized(path, shape[1] if len(shape) > 1 else 1, shape[0], int(np.prod(shape[2:], dtype=np.int64)))
    if len(shape) == 4 and shape[2] == 1 and shape[3] > 1:
        raise RadiographError(
            path,
            f"NIfTI of shape {shape} holds {shape[3]} volumes or time points, not one 2D "
            "radiograph (colour is read only from an RGB24/RGBA32 NIfTI)",
        )
    data = np.asarray(image.dataobj)
    if data.dtype.names:  # RGB24 / RGBA32: one structured voxel per pixel
        data = rgb_to_grey(np.stack([data[name] for name in data.dtype.names[:3]], axis=-1))
    warnings: list[str] = []
    zooms = [float(str(np.float32(zoom))) for zoom in image.header.get_zooms()]  # 0.1, not 0.10000000149
    volume = data.reshape(data.shape + (1,) * (3 - data.ndim)) if data.ndim < 3 else data
    zooms += [1.0] * (volume.ndim - len(zooms))
    orientation = io_orientation(image.affine)
    if image.header["sform_code"] == 0 and image.header["qform_code"] == 0:  # nibabel would invent an x flip
        orientation_note = "as stored (no qform or sform)"
    elif np.isnan(orientation).any():
        orientation_note = "as stored (the affine gives no orientation)"
    elif np.array_equal(orientation, [[0, 1], [1, 1], [2, 1]]):
        orientation_note = "as stored (identity axes)"
    elif np.array_equal(orientation, [[0, -1], [1, -1], [2, 1]]):  # ITK (and MONAI's ITKReader) LPS identity
        orientation_note = "as stored (ITK identity axes, LPS as RAS)"
    else:
        volume = apply_orientation(volume, orientation)
        reordered = list(zooms)
        for axis, (target, _) in enumerate(orientation):
            reordered[int(target)] = zooms[axis]
        zooms = reordered
        orientation_note = f"reoriented from {''.join(ornt2axcodes(orientation))} axes to RAS"
    kept = [axis for axis in range(volume.ndim) if volume.shape[axis] > 1]
    if len(kept) != 2:
        raise RadiographError(path, f"NIfTI holds a {len(kept)}D volume of shape {shape}; expected 2D")
    plane = np.squeeze(volume)
    spacing_mm, spacing_source = _nifti_spacing(image.header, zooms[kept[1]], zooms[kept[0]], warnings)
    details = {"dtype": str(image.get_data_dtype()), "orientation": orientation_note}
    pixels = np.ascontiguousarray(plane.T).astype(np.float32)
    return Radiograph(pixels, path, "nifti", spacing_mm, details, spacing_source, warnings)


def _nifti_spacing(header, row_zoom: float, column_zoom: float, warnings: list[str]):
    """(row, column) mm from pixdim when ``xyzt_units`` names a length and pixdim is not the 1.0 default."""
    unit = header.get_xyzt_units()[0]
    if unit not in NIFTI_UNITS_TO_MM:
        warnings.append(f"NIfTI spatial unit is {unit!r} (xyzt_units): pixel spacing unknown, areas in pixels only")
        return None, ""
    if row_zoom == 1.0 and column_zoom == 1.0:
        warnings.append("NIfTI pixdim is the 1.0 default: pixel spacing unknown, areas in pixels only")
        return None, ""
    spacing = (row_zoom * NIFTI_UNITS_TO_MM[unit], column_zoom * NIFTI_UNITS_TO_MM[unit])
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        warnings.append(f"NIfTI pixdim {row_zoom:g} x {column_zoom:g} is not a spacing: areas in pixels only")
        return None, ""
    return spacing, "NIfTI pixdim (mm)" if unit == "mm" else f"NIfTI pixdim ({unit}, converted to mm)"

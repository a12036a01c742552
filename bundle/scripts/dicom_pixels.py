"""DICOM pixel decoding and grey-level LUTs with pydicom 2 or 3 (the only module that knows which one is installed).

The bundle's own environment has pydicom 3 (``pydicom.pixels``); MONAI Label's environment pins pydicom 2.4
(``pydicom.pixel_data_handlers``), because its ``pydicom-seg`` needs pydicom < 3. Both give the same arrays here:
pydicom 2 leaves YBR_FULL / YBR_FULL_422 pixels in YCbCr, so they are converted to RGB as pydicom 3 does.

A compressed file whose transfer syntax no installed decoder handles raises :class:`MissingDecoderError`, naming
the encoding and the packages that would decode it, before any decoding is tried.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom import uid as uids

PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: F401 (re-exported)
except ImportError:  # pydicom 2
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut  # noqa: F401

_LIBJPEG = "pylibjpeg with pylibjpeg-libjpeg"
_OPENJPEG = "pylibjpeg with pylibjpeg-openjpeg"
_GDCM = "python-gdcm"
DECODER_PACKAGES = {  # by UID: pydicom 2 and 3 name some of these constants differently
    "1.2.840.10008.1.2.4.50": (_LIBJPEG, "Pillow", _GDCM),  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": (_LIBJPEG, _GDCM),  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.57": (_LIBJPEG, _GDCM),  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": (_LIBJPEG, _GDCM),  # JPEG Lossless (Process 14, Selection Value 1)
    "1.2.840.10008.1.2.4.80": (_LIBJPEG, "pyjpegls (pydicom 3)", "CharPyLS (pydicom 2)", _GDCM),  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": (_LIBJPEG, "pyjpegls (pydicom 3)", "CharPyLS (pydicom 2)", _GDCM),  # JPEG-LS Near
    "1.2.840.10008.1.2.4.90": (_OPENJPEG, "Pillow with OpenJPEG", _GDCM),  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": (_OPENJPEG, "Pillow with OpenJPEG", _GDCM),  # JPEG 2000
    "1.2.840.10008.1.2.4.201": ("pydicom 3 with pylibjpeg-openjpeg",),  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": ("pydicom 3 with pylibjpeg-openjpeg",),  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": ("pydicom 3 with pylibjpeg-openjpeg",),  # HTJ2K
}
"""Packages that decode each compressed transfer syntax (any one of them), named in :class:`MissingDecoderError`."""

YCBCR_PHOTOMETRICS = ("YBR_FULL", "YBR_FULL_422")


class MissingDecoderError(RuntimeError):
    """No installed package decodes the file's transfer syntax; the message names the encoding and the packages."""


def transfer_syntax_of(dataset) -> uids.UID:
    """The dataset's transfer syntax (Explicit VR Little Endian when the file meta lacks it)."""
    meta = getattr(dataset, "file_meta", None)
    return uids.UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else "") or uids.ExplicitVRLittleEndian)


def can_decode(dataset) -> bool:
    """True when an installed decoder handles the dataset's transfer syntax (and, for pydicom 2, its bit depth)."""
    syntax = transfer_syntax_of(dataset)
    if PYDICOM_MAJOR >= 3:
        from pydicom.pixels import get_decoder

        try:
            return bool(get_decoder(syntax).is_available)
        except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all
            return False
    return bool(_pydicom2_handlers(syntax, dataset))


def _pydicom2_handlers(syntax: uids.UID, dataset) -> list[str]:
    """Names of pydicom 2 pixel data handlers that are installed and decode ``syntax`` (Pillow's limits included)."""
    names = []
    for handler in pydicom.config.pixel_data_handlers:
        if not (handler.is_available() and handler.supports_transfer_syntax(syntax)):
            continue
        if handler.HANDLER_NAME == "Pillow":
            from PIL import features

            if syntax in (uids.JPEG2000, uids.JPEG2000Lossless) and not features.check_codec("jpg_2000"):
                continue
            if syntax in (uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit) and not features.check_codec("jpg"):
                continue
            if syntax == uids.JPEGExtended12Bit and int(dataset.get("BitsAllocated", 8) or 8) != 8:
                continue  # Pillow's 12-bit JPEG is refused by pydicom 2 unless Bits Allocated is 8
        names.append(handler.HANDLER_NAME)
    return names


def missing_decoder_message(dataset) -> str:
    """Why the pixels cannot be decoded here: the encoding, the pydicom version and packages that would decode it."""
    syntax = transfer_syntax_of(dataset)
    name = syntax.name if syntax.name != str(syntax) else "an unknown transfer syntax"
    packages = DECODER_PACKAGES.get(str(syntax))
    remedy = (
        f"install one of: {', '.join(packages)}"
        if packages
        else "no decoder for it is known to this reader; convert the file to an uncompressed DICOM"
    )
    return (
        f"pixel data is compressed as {name} ({syntax}) and no installed decoder reads it "
        f"(pydicom {pydicom.__version__}); {remedy}"
    )


def decoded_pixels(dataset) -> np.ndarray:
    """The stored pixel values (rows x columns, or rows x columns x 3 in RGB) as pydicom 3's ``pixel_array`` gives.

    Raises :class:`MissingDecoderError` when no installed decoder handles the transfer syntax.
    """
    if not can_decode(dataset):
        raise MissingDecoderError(missing_decoder_message(dataset))
    array = dataset.pixel_array
    photometric = str(dataset.get("PhotometricInterpretation", "") or "").upper()
    if PYDICOM_MAJOR < 3 and photometric in YCBCR_PHOTOMETRICS and array.ndim == 3 and array.shape[-1] == 3:
        from pydicom.pixel_data_handlers.util import convert_color_space

        array = convert_color_space(array, photometric, "RGB")
    return array

"""Every input format reads back in viewer orientation; bad files fail by name; loaders keep image and label aligned."""

import os

import nibabel
import numpy as np
import pydicom
import pytest
from monai.transforms import ScaleIntensityRangePercentiles
from PIL import Image

import phantoms
from scripts.label_io import write_png as write_label_png
from scripts.radiograph_io import RadiographError, read_radiograph
from scripts.transforms import LoadLabelMapd, LoadRadiographd

ROWS, COLUMNS = 200, 256  # non-square, so that a transpose changes the shape
SPACING = (0.1, 0.2)  # unequal, so that swapped row / column spacing shows
UIDS = {
    "rle": pydicom.uid.RLELossless,
    "jpeg2000": pydicom.uid.JPEG2000Lossless,
    "jpeg_baseline": pydicom.uid.JPEGBaseline8Bit,
}


@pytest.fixture(scope="module")
def phantom():
    return phantoms.make_phantom(ROWS, COLUMNS, seed=7)


def normalised(pixels: np.ndarray) -> np.ndarray:
    """Scale as the bundle does: 0.5-99.5 percentiles to 0..1, clipped."""
    scaled = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(np.asarray(pixels, dtype=np.float32)[None])
    return np.asarray(scaled)[0]


def assert_same_picture(pixels: np.ndarray, phantom) -> None:
    """Right shape, content correlates with the phantom, marker bright top-left and the other corners dark."""
    assert pixels.shape == (ROWS, COLUMNS)
    image = normalised(pixels)
    assert np.corrcoef(image.ravel(), phantom.image.ravel())[0, 1] > 0.95
    assert image[phantom.marker].mean() > 0.9
    marker_rows, marker_columns = np.nonzero(phantom.marker)
    for flipped_rows, flipped_columns in ((True, False), (False, True), (True, True)):
        r = ROWS - 1 - marker_rows if flipped_rows else marker_rows
        c = COLUMNS - 1 - marker_columns if flipped_columns else marker_columns
        assert image[r, c].mean() < 0.3


def _dicom(**options):
    return lambda path, image: phantoms.write_dicom(path, image, **options)


CASES = {  # name: (file name, writer, expected spacing, expected transfer syntax)
    "png8": ("image.png", lambda p, im: phantoms.write_png(p, im, bits=8), None, None),
    "png16": ("image.png", lambda p, im: phantoms.write_png(p, im, bits=16), None, None),
    "png_rgb": ("image.png", lambda p, im: phantoms.write_png(p, im, rgb=True), None, None),
    "jpeg": ("image.jpg", phantoms.write_jpeg, None, None),
    "dicom8": ("image.dcm", _dicom(bits=8, spacing_mm=SPACING), SPACING, None),
    "dicom12": ("image.dcm", _dicom(bits=12, spacing_mm=SPACING), SPACING, None),
    "dicom16": ("image.dcm", _dicom(bits=16, spacing_mm=SPACING), SPACING, None),
    "dicom_imager_spacing": (
        "image.dcm", _dicom(bits=16, spacing_mm=SPACING, spacing_tag="ImagerPixelSpacing"), SPACING, None),
    "dicom_monochrome1": ("image.dcm", _dicom(bits=16, photometric="MONOCHROME1"), None, None),
    "dicom_monochrome1_12_window": (
        "image.dcm", _dicom(bits=12, photometric="MONOCHROME1", window=(2048, 4000)), None, None),
    "dicom_window": ("image.dcm", _dicom(bits=16, window=(32768, 60000)), None, None),
    "dicom_rle": ("image.dcm", _dicom(bits=16, transfer_syntax="rle"), None, UIDS["rle"]),
    "dicom_rle_monochrome1": (
        "image.dcm", _dicom(bits=12, photometric="MONOCHROME1", transfer_syntax="rle"), None, UIDS["rle"]),
    "dicom_jpeg2000": ("image.dcm", _dicom(bits=12, transfer_syntax="jpeg2000"), None, UIDS["jpeg2000"]),
    "dicom_jpeg_baseline": ("image.dcm", _dicom(bits=8, transfer_syntax="jpeg_baseline"), None, UIDS["jpeg_baseline"]),
    "dicom_no_extension": ("radiograph", _dicom(bits=16, spacing_mm=SPACING), SPACING, None),
    "nifti": ("image.nii.gz", lambda p, im: phantoms.write_nifti(p, im, spacing_mm=SPACING), SPACING, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_format_round_trip(case, phantom, tmp_path):
    name, writer, spacing, transfer_syntax = CASES[case]
    path = str(tmp_path / name)
    writer(path, phantom.image)
    radiograph = read_radiograph(path)
    assert radiograph.pixels.dtype == np.float32
    assert_same_picture(radiograph.pixels, phantom)
    if spacing is None:
        assert radiograph.spacing_mm is None or case == "nifti"
    else:
        assert radiograph.spacing_mm == pytest.approx(spacing, rel=1e-5)
    if case.startswith("dicom"):
        assert radiograph.source_format == "dicom"
        expected_syntax = transfer_syntax or pydicom.uid.ExplicitVRLittleEndian
        assert radiograph.details["transfer_syntax"] == expected_syntax  # really compressed, not skipped
        stored = pydicom.dcmread(path)
        assert stored.Modality == "DX"
        if "MONOCHROME1" in case:  # the file really holds inverted values; the reader turns them back
            raw = stored.pixel_array.astype(np.float64)
            assert np.corrcoef(raw.ravel(), phantom.image.ravel())[0, 1] < -0.95


def test_png_8_and_16_bit_normalise_alike(phantom, tmp_path):
    phantoms.write_png(tmp_path / "eight.png", phantom.image, bits=8)
    phantoms.write_png(tmp_path / "sixteen.png", phantom.image, bits=16)
    eight = read_radiograph(str(tmp_path / "eight.png")).pixels
    sixteen = read_radiograph(str(tmp_path / "sixteen.png")).pixels
    assert eight.max() <= 255 and sixteen.max() > 255
    np.testing.assert_allclose(normalised(eight), normalised(sixteen), atol=1e-2)


def _empty(path):
    open(path, "wb").close()


def _truncated_png(path):
    phantoms.write_png(path, phantoms.make_phantom(64, 80, seed=1).image)
    content = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(content[: len(content) // 2])


def _corrupt_png(path):
    phantoms.write_png(path, phantoms.make_phantom(64, 80, seed=1).image)
    content = bytearray(open(path, "rb").read())
    content[60:-20] = bytes(len(content) - 80)  # zeroed image data: CRC and zlib stream broken
    with open(path, "wb") as handle:
        handle.write(bytes(content))


def _text_as_png(path):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("this is not an image\n" * 20)


def _volume_nifti(path):
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).random((64, 48, 5), dtype=np.float32), np.eye(4)), path)


def _multiframe_dicom(path):
    frames = np.stack([phantoms.make_phantom(64, 80, seed=s).image for s in range(3)])
    phantoms.write_dicom(path, frames, bits=16)


def _truncated_dicom(path):
    phantoms.write_dicom(path, phantoms.make_phantom(64, 80, seed=1).image, bits=16)
    content = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(content[: len(content) - 4000])


def _tiff(path):
    Image.fromarray((phantoms.make_phantom(64, 80, seed=1).image * 255).astype(np.uint8)).save(path, format="TIFF")


BAD_INPUTS = {
    "empty": ("empty.png", _empty),
    "truncated_png": ("truncated.png", _truncated_png),
    "corrupt_png": ("corrupt.png", _corrupt_png),
    "text_as_png": ("notes.png", _text_as_png),
    "nifti_volume": ("volume.nii.gz", _volume_nifti),
    "multiframe_dicom": ("frames.dcm", _multiframe_dicom),
    "truncated_dicom": ("truncated.dcm", _truncated_dicom),
    "unsupported_extension": ("image.tif", _tiff),
    "missing": ("missing.png", None),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_the_file(case, tmp_path):
    name, make = BAD_INPUTS[case]
    path = str(tmp_path / name)
    if make is not None:
        make(path)
    with pytest.raises(RadiographError) as caught:
        read_radiograph(path)
    assert caught.value.path == path
    assert path in str(caught.value)


LOADER_CASES = {  # image format -> label format
    "png-png": ("image.png", "labels.png"),
    "dicom-nifti": ("image.dcm", "labels.nii.gz"),
    "nifti-nifti": ("image.nii.gz", "labels.nii.gz"),
}


@pytest.mark.parametrize("case", sorted(LOADER_CASES))
def test_loaders_keep_image_and_label_aligned(case, phantom, tmp_path):
    image_name, label_name = LOADER_CASES[case]
    labels = phantom.label_map()
    labels[phantom.marker] = 2  # stamp the asymmetric marker into the label map as well
    image_path, label_path = str(tmp_path / image_name), str(tmp_path / label_name)
    {".png": phantoms.write_png, ".dcm": phantoms.write_dicom}.get(
        os.path.splitext(image_name)[1], phantoms.write_nifti)(image_path, phantom.image)
    if label_name.endswith(".png"):
        write_label_png(label_path, labels)
    else:
        phantoms.write_nifti(label_path, labels.astype(np.float32))

    data = LoadLabelMapd("label")(LoadRadiographd("image")({"image": image_path, "label": label_path}))
    image, label = data["image"], data["label"]
    assert tuple(image.shape) == tuple(label.shape) == (1, ROWS, COLUMNS)
    image, label = normalised(image[0].numpy()), label[0].numpy()
    np.testing.assert_array_equal(label, labels)
    side = int(np.nonzero(phantom.marker.any(axis=0))[0].max()) + 1
    assert (label[:side, :side][phantom.marker[:side, :side]] == 2).all()  # marker top-left in the label
    assert image[:side, :side][phantom.marker[:side, :side]].mean() > 0.9  # and in the image
    assert (label[-side:, -side:] == 0).all() and image[-side:, -side:].mean() < 0.3
    lung = (label > 0) & ~phantom.marker
    body = (label == 0) & (image > 0.3)
    assert image[lung & ~phantom.opacity].mean() < image[body].mean() - 0.2  # lung fields are dark in the image
    assert np.nonzero(phantom.right_lung)[1].mean() < COLUMNS / 2  # the patient's right lung is on the image left

"""Every input format reads back in viewer orientation; bad files fail by name; loaders keep image and label aligned."""

import os
import struct
import zlib

import nibabel
import numpy as np
import pydicom
import pytest
from monai.transforms import ScaleIntensityRangePercentiles
from PIL import Image

import phantoms
from scripts.label_io import write_png as write_label_png
from scripts.radiograph_io import MAX_PIXELS, RadiographError, read_radiograph
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
    "dicom_imager_spacing": (  # at the detector, no magnification factor: no spacing at the patient
        "image.dcm",
        _dicom(bits=16, spacing_mm=SPACING, spacing_tag="ImagerPixelSpacing"),
        None,
        None,
    ),
    "dicom_monochrome1": ("image.dcm", _dicom(bits=16, photometric="MONOCHROME1"), None, None),
    "dicom_monochrome1_12_window": (
        "image.dcm",
        _dicom(bits=12, photometric="MONOCHROME1", window=(2048, 4000)),
        None,
        None,
    ),
    "dicom_window": ("image.dcm", _dicom(bits=16, window=(32768, 60000)), None, None),
    "dicom_rle": ("image.dcm", _dicom(bits=16, transfer_syntax="rle"), None, UIDS["rle"]),
    "dicom_rle_monochrome1": (
        "image.dcm",
        _dicom(bits=12, photometric="MONOCHROME1", transfer_syntax="rle"),
        None,
        UIDS["rle"],
    ),
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
        os.path.splitext(image_name)[1], phantoms.write_nifti
    )(image_path, phantom.image)
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


# ------------------------------------------------------------------------------------------ DICOM window and spacing


def test_a_clipping_window_falls_back_to_the_stored_range_and_says_so(phantom, tmp_path):
    phantoms.write_dicom(tmp_path / "narrow.dcm", phantom.image, bits=16, window=(60000, 100))
    phantoms.write_dicom(tmp_path / "sensible.dcm", phantom.image, bits=16, window=(32768, 60000))
    stored = pydicom.dcmread(tmp_path / "narrow.dcm").pixel_array.astype(np.float32)

    narrow = read_radiograph(str(tmp_path / "narrow.dcm"))
    np.testing.assert_array_equal(narrow.pixels, stored)  # the full stored range, not a black-and-white image
    assert narrow.warnings == [
        "stored VOI window (centre 60000, width 100) clips 100 % of the pixels; used the full " "stored range instead"
    ]

    sensible = read_radiograph(str(tmp_path / "sensible.dcm"))
    assert sensible.warnings == []
    inside = (stored > 2768) & (stored < 62767)  # the window's linear part: (value - 32767.5) / 59999 + 0.5
    expected = ((stored[inside].astype(np.float64) - 32767.5) / 59999 + 0.5) * 65535
    np.testing.assert_allclose(sensible.pixels[inside], expected, atol=0.01)
    assert_same_picture(sensible.pixels, phantom)


SPACING_CASES = {  # name: (tags, expected spacing, expected source, expected warnings)
    "pixel_spacing": ({"PixelSpacing": ["0.1", "0.2"]}, (0.1, 0.2), "PixelSpacing", []),
    "imager_only": (
        {"ImagerPixelSpacing": ["0.1", "0.2"]},
        None,
        "",
        [
            "ImagerPixelSpacing is at the detector and no EstimatedRadiographicMagnificationFactor: "
            "areas in pixels only"
        ],
    ),
    "imager_magnified": (
        {"ImagerPixelSpacing": ["0.108", "0.216"], "EstimatedRadiographicMagnificationFactor": "1.08"},
        (0.1, 0.2),
        "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor 1.08",
        [],
    ),
    "pixel_repeats_imager": (
        {"PixelSpacing": ["0.1", "0.2"], "ImagerPixelSpacing": ["0.1", "0.2"]},
        None,
        "",
        [
            "ImagerPixelSpacing is at the detector (PixelSpacing repeats it without PixelSpacingCalibrationType) "
            "and no EstimatedRadiographicMagnificationFactor: areas in pixels only"
        ],
    ),
    "pixel_repeats_imager_magnified": (
        {
            "PixelSpacing": ["0.108", "0.216"],
            "ImagerPixelSpacing": ["0.108", "0.216"],
            "EstimatedRadiographicMagnificationFactor": "1.08",
        },
        (0.1, 0.2),
        "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor 1.08",
        [],
    ),
    "pixel_calibrated": (
        {
            "PixelSpacing": ["0.1", "0.2"],
            "ImagerPixelSpacing": ["0.1", "0.2"],
            "PixelSpacingCalibrationType": "GEOMETRY",
        },
        (0.1, 0.2),
        "PixelSpacing",
        [],
    ),
    "pixel_differs_from_imager": (
        {"PixelSpacing": ["0.1", "0.2"], "ImagerPixelSpacing": ["0.11", "0.22"]},
        (0.1, 0.2),
        "PixelSpacing",
        [],
    ),
    "none": ({}, None, "", []),
}


@pytest.mark.parametrize("case", sorted(SPACING_CASES))
def test_dicom_spacing_is_reported_only_at_the_patient(case, tmp_path):
    tags, spacing, source, warnings = SPACING_CASES[case]
    path = str(tmp_path / "image.dcm")
    phantoms.write_dicom(path, phantoms.make_phantom(64, 80, seed=1).image, extra_tags=tags)
    radiograph = read_radiograph(path)
    assert radiograph.spacing_mm == (None if spacing is None else pytest.approx(spacing, rel=1e-9))
    assert radiograph.spacing_source == source
    assert radiograph.warnings == warnings


def test_dicom_tags_for_the_input_gate(tmp_path):
    image = phantoms.make_phantom(64, 80, seed=1).image
    phantoms.write_dicom(tmp_path / "chest.dcm", image)
    phantoms.write_dicom(
        tmp_path / "ct.dcm", image, extra_tags={"Modality": "CT", "ViewPosition": "LL", "BodyPartExamined": "HEAD"}
    )
    phantoms.write_png(tmp_path / "chest.png", image)
    details = {name: read_radiograph(str(tmp_path / name)).details for name in ("chest.dcm", "ct.dcm", "chest.png")}
    keys = ("modality", "view_position", "body_part_examined")
    assert [details["chest.dcm"][key] for key in keys] == ["DX", "PA", "CHEST"]
    assert [details["ct.dcm"][key] for key in keys] == ["CT", "LL", "HEAD"]
    assert [details["chest.png"][key] for key in keys] == ["", "", ""]


# ------------------------------------------------------------------------------------------------- NIfTI specifics


NIFTI_SPACING_CASES = {  # name: (pixdim (column, row), xyzt unit, expected (row, column) mm, source, warning start)
    "mm": ((0.2, 0.1), "mm", (0.1, 0.2), "NIfTI pixdim (mm)", None),
    "meter": ((0.0002, 0.0001), "meter", (0.1, 0.2), "NIfTI pixdim (meter, converted to mm)", None),
    "micron": ((200.0, 100.0), "micron", (0.1, 0.2), "NIfTI pixdim (micron, converted to mm)", None),
    "unknown_unit": ((0.2, 0.1), "unknown", None, "", "NIfTI spatial unit is 'unknown' (xyzt_units)"),
    "default_1mm": ((1.0, 1.0), "mm", None, "", "NIfTI pixdim is the 1.0 default"),
}


@pytest.mark.parametrize("case", sorted(NIFTI_SPACING_CASES))
def test_nifti_spacing_needs_a_unit_and_a_real_pixdim(case, tmp_path):
    zooms, unit, spacing, source, warning = NIFTI_SPACING_CASES[case]
    image = nibabel.Nifti1Image(phantoms.make_phantom(64, 80, seed=1).image.T.copy(), np.diag([*zooms, 1.0, 1.0]))
    image.header.set_xyzt_units(xyz=unit)
    nibabel.save(image, str(tmp_path / "image.nii.gz"))
    radiograph = read_radiograph(str(tmp_path / "image.nii.gz"))
    assert radiograph.spacing_mm == (None if spacing is None else pytest.approx(spacing, rel=1e-6))
    assert radiograph.spacing_source == source
    if warning is None:
        assert radiograph.warnings == []
    else:
        assert len(radiograph.warnings) == 1 and radiograph.warnings[0].startswith(warning)


def test_nifti_of_several_volumes_is_refused_and_rgb_nifti_becomes_grey(phantom, tmp_path):
    plain = np.repeat(phantom.image.T[:, :, None, None], 3, axis=3)  # (x, y, 1, 3) of plain floats
    nibabel.save(nibabel.Nifti1Image(plain, np.eye(4)), str(tmp_path / "volumes.nii.gz"))
    with pytest.raises(RadiographError, match=r"NIfTI of shape \(256, 200, 1, 3\) holds 3 volumes or time points"):
        read_radiograph(str(tmp_path / "volumes.nii.gz"))

    grey8 = np.rint(phantom.image.T * 255).astype(np.uint8)
    rgb = np.zeros(grey8.shape + (1,), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"][..., 0], rgb["G"][..., 0], rgb["B"][..., 0] = grey8, grey8 // 2, 0
    nibabel.save(nibabel.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "rgb.nii.gz"))
    radiograph = read_radiograph(str(tmp_path / "rgb.nii.gz"))
    expected = (0.299 * grey8 + 0.587 * (grey8 // 2)).T
    np.testing.assert_allclose(radiograph.pixels, expected, rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------------------------------- oversized images


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height grey pixels but holds 100 bytes of image data (undecodable)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    content = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + content)


def _dicom_claiming(path, rows: int, columns: int) -> None:
    """A small DICOM whose Rows and Columns claim a huge image (its pixel data cannot be decoded)."""
    phantoms.write_dicom(path, phantoms.make_phantom(64, 80, seed=1).image)
    dataset = pydicom.dcmread(path)
    dataset.Rows, dataset.Columns = rows, columns
    dataset.save_as(path)


def _nifti_header_only(path, x: int, y: int) -> None:
    """A .nii file of header only, claiming an x by y float32 image."""
    header = nibabel.Nifti1Header()
    header.set_data_shape((x, y))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    with open(path, "wb") as handle:
        handle.write(header.binaryblock + bytes(4))


OVERSIZED = {  # name: (file name, writer, expected size in the message)
    "png_twice_the_limit": ("big.png", lambda p: _png_header_only(p, 10000, 10000), "10000 x 10000"),
    "png_past_pillows_bomb_limit": ("huge.png", lambda p: _png_header_only(p, 30000, 20000), "20000 x 30000"),
    "dicom": ("big.dcm", lambda p: _dicom_claiming(p, 9000, 7000), "9000 x 7000"),
    "nifti": ("big.nii", lambda p: _nifti_header_only(p, 8000, 7000), "7000 x 8000"),
}


@pytest.mark.parametrize("case", sorted(OVERSIZED))
def test_oversized_header_is_refused_before_decoding(case, tmp_path):
    name, write, size = OVERSIZED[case]
    path = str(tmp_path / name)
    write(path)
    assert os.path.getsize(path) < 100_000  # the claim is in the header only: decoding would fail differently
    with pytest.raises(RadiographError) as caught:
        read_radiograph(path)
    assert caught.value.problem == f"image of {size} pixels exceeds the limit of {MAX_PIXELS:,} pixels"
    assert MAX_PIXELS == 50_000_000


# ---------------------------------------------------------------------------------------------- LoadRadiographd meta


def test_loader_meta_holds_plain_strings_for_every_row(tmp_path):
    image = phantoms.make_phantom(64, 80, seed=1).image
    phantoms.write_dicom(tmp_path / "detector.dcm", image, spacing_mm=(0.1, 0.2), spacing_tag="ImagerPixelSpacing")
    magnified = {"ImagerPixelSpacing": ["0.108", "0.216"], "EstimatedRadiographicMagnificationFactor": "1.08"}
    phantoms.write_dicom(tmp_path / "patient.dcm", image, extra_tags=magnified)
    load = LoadRadiographd("image", record_errors=True)
    detector = load({"image": str(tmp_path / "detector.dcm")})["image"].meta
    patient = load({"image": str(tmp_path / "patient.dcm")})["image"].meta
    missing = load({"image": str(tmp_path / "missing.png")})["image"].meta

    assert np.isnan(detector["spacing_mm"]).all() and detector["spacing_source"] == ""
    assert detector["warnings"].startswith("ImagerPixelSpacing is at the detector")
    assert (detector["modality"], detector["view_position"], detector["body_part_examined"]) == ("DX", "PA", "CHEST")
    assert patient["spacing_mm"] == pytest.approx((0.1, 0.2))
    assert patient["spacing_source"] == "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor 1.08"
    assert patient["warnings"] == "" and patient["error"] == ""
    assert missing["error"].endswith("missing.png: file not found")
    for key in ("warnings", "spacing_source", "modality", "view_position", "body_part_examined", "source_format"):
        assert missing[key] == "" and isinstance(detector[key], str)


def test_a_reader_running_out_of_memory_gives_one_error_row_per_file(phantom, tmp_path, monkeypatch):
    from monai.data import Dataset
    from PIL import ImageFile

    files = [str(tmp_path / name) for name in ("a.dcm", "b.png", "c.dcm")]
    phantoms.write_dicom(files[0], phantom.image)
    phantoms.write_png(files[1], phantom.image)
    phantoms.write_dicom(files[2], phantom.image)

    def out_of_memory(self):
        raise MemoryError("cannot allocate 4 GiB")

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)  # Pillow's decoder fails as on a huge image
    dataset = Dataset([{"image": path} for path in files], transform=LoadRadiographd("image", record_errors=True))
    metas = [dataset[index]["image"].meta for index in range(len(dataset))]

    assert [meta["filename_or_obj"] for meta in metas] == files  # none dropped, none repeated
    assert [meta["error"] for meta in metas[::2]] == ["", ""]
    assert "MemoryError: cannot allocate 4 GiB" in metas[1]["error"] and files[1] in metas[1]["error"]
    assert tuple(dataset[1]["image"].shape) == (1, 32, 32)
    with pytest.raises(Exception, match="MemoryError"):
        LoadRadiographd("image")({"image": files[1]})

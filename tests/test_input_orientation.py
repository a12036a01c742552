"""Orientation tags are applied: a file read back shows the picture a viewer shows, whatever way it was stored."""

import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image

import phantoms
from scripts.radiograph_io import read_radiograph

ROWS, COLUMNS = 200, 256  # non-square, so that a rotation or transpose changes the shape
SPACING = (0.1, 0.2)  # (row, column) mm, unequal so that swapped axes show in the spacing


@pytest.fixture(scope="module")
def upright():
    """The phantom as 8-bit grey values; its bright marker sits top-left (the patient's right, head up)."""
    return np.rint(phantoms.make_phantom(ROWS, COLUMNS, seed=11).image * 255).astype(np.uint8)


def marker_corner(pixels: np.ndarray) -> tuple[int, int]:
    """The quarter (row half, column half) holding the most near-white pixels: (0, 0) is the top-left quarter."""
    rows, columns = pixels.shape
    quarters = {
        (r, c): pixels[r * rows // 2 : (r + 1) * rows // 2, c * columns // 2 : (c + 1) * columns // 2]
        for r in (0, 1)
        for c in (0, 1)
    }
    return max(quarters, key=lambda key: float((quarters[key] >= 250).mean()))


# EXIF orientation: (stored pixels from the upright ones, Pillow's tag value); a viewer turns them back upright
EXIF_CASES = {
    "mirrored": (lambda a: a[:, ::-1], 2),
    "rotated_90_clockwise": (lambda a: np.rot90(a, 1), 6),  # stored turned left; tag 6 says turn right to view
    "rotated_90_anticlockwise": (lambda a: np.rot90(a, -1), 8),
    "upside_down": (lambda a: a[::-1, ::-1], 3),
}


@pytest.mark.parametrize("extension", [".jpg", ".png"])
@pytest.mark.parametrize("case", sorted(EXIF_CASES))
def test_exif_orientation_gives_the_upright_picture(case, extension, upright, tmp_path):
    stored_from_upright, tag = EXIF_CASES[case]
    stored = np.ascontiguousarray(stored_from_upright(upright))
    exif = Image.Exif()
    exif[0x0112] = tag
    path, reference = tmp_path / f"tagged{extension}", tmp_path / f"upright{extension}"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    Image.fromarray(upright).save(reference, quality=95)

    tagged, plain = read_radiograph(str(path)), read_radiograph(str(reference))
    assert tagged.pixels.shape == (ROWS, COLUMNS)
    assert marker_corner(tagged.pixels) == (0, 0)  # the marker is back top-left
    assert tagged.details["orientation"] == f"EXIF {tag} applied"
    assert plain.details["orientation"] == "as stored"
    if extension == ".png":
        np.testing.assert_array_equal(tagged.pixels, plain.pixels)
    else:  # JPEG compresses the stored and the upright file slightly differently (a mirror differs by ~14)
        assert np.abs(tagged.pixels - plain.pixels).mean() < 2.0


def _nifti(path, data, affine, units="mm"):
    image = nibabel.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    image.header.set_xyzt_units(xyz=units)
    nibabel.save(image, str(path))


# NIfTI storage: (voxel array from the identity-layout array (column i, row j), affine with the same world meaning)
ROW_MM, COLUMN_MM = SPACING
NIFTI_CASES = {
    "x_flipped": (lambda d: d[::-1, :], [[-COLUMN_MM, 0, 0, 50], [0, ROW_MM, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
    "axes_swapped": (lambda d: d.T, [[0, COLUMN_MM, 0, 0], [ROW_MM, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
    "y_flipped": (lambda d: d[:, ::-1], [[COLUMN_MM, 0, 0, 0], [0, -ROW_MM, 0, 50], [0, 0, 1, 0], [0, 0, 0, 1]]),
    "swapped_and_flipped_3d": (
        lambda d: d.T[:, ::-1, None],
        [[0, -COLUMN_MM, 0, 9], [ROW_MM, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
    ),
}


@pytest.mark.parametrize("case", sorted(NIFTI_CASES))
def test_nifti_affine_is_applied_relative_to_the_identity(case, upright, tmp_path):
    identity_layout = upright.T.astype(np.float32)  # voxel (i, j) = column i, row j
    phantoms.write_nifti(tmp_path / "identity.nii.gz", upright / 255.0, spacing_mm=SPACING)
    reorder, affine = NIFTI_CASES[case]
    _nifti(tmp_path / "stored.nii.gz", reorder(identity_layout), np.asarray(affine, dtype=float))

    reference = read_radiograph(str(tmp_path / "identity.nii.gz"))
    stored = read_radiograph(str(tmp_path / "stored.nii.gz"))
    assert reference.details["orientation"] == "as stored (identity axes)"
    assert marker_corner(reference.pixels) == (0, 0)
    np.testing.assert_array_equal(stored.pixels, upright.astype(np.float32))
    np.testing.assert_allclose(reference.pixels, upright / 255.0, atol=1e-6)
    assert stored.details["orientation"].startswith("reoriented from ")
    assert stored.spacing_mm == reference.spacing_mm == pytest.approx(SPACING)


def test_nifti_with_the_itk_identity_affine_reads_as_stored(upright, tmp_path):
    """ITK writers (and MONAI's ITKReader) store a 2D image's identity direction as diag(-1, -1, 1) in RAS."""
    _nifti(tmp_path / "itk.nii.gz", upright.T.astype(np.float32), np.diag([-COLUMN_MM, -ROW_MM, 1.0, 1.0]))
    radiograph = read_radiograph(str(tmp_path / "itk.nii.gz"))
    np.testing.assert_array_equal(radiograph.pixels, upright.astype(np.float32))
    assert radiograph.details["orientation"] == "as stored (ITK identity axes, LPS as RAS)"
    assert radiograph.spacing_mm == pytest.approx(SPACING)


def test_nifti_without_qform_or_sform_reads_as_stored(upright, tmp_path):
    header = nibabel.Nifti1Header()
    header.set_data_dtype(np.float32)
    header["sform_code"] = header["qform_code"] = 0  # nibabel then reports an x-flipped affine of its own
    nibabel.save(nibabel.Nifti1Image(upright.T.astype(np.float32), None, header=header), str(tmp_path / "bare.nii"))
    assert nibabel.load(str(tmp_path / "bare.nii")).affine[0, 0] < 0
    radiograph = read_radiograph(str(tmp_path / "bare.nii"))
    np.testing.assert_array_equal(radiograph.pixels, upright.astype(np.float32))
    assert radiograph.details["orientation"] == "as stored (no qform or sform)"


def test_presentation_lut_inverse_displays_inverted(tmp_path):
    image = phantoms.make_phantom(ROWS, COLUMNS, seed=3).image
    phantoms.write_dicom(tmp_path / "plain.dcm", image, bits=12)
    phantoms.write_dicom(tmp_path / "inverse.dcm", image, bits=12, extra_tags={"PresentationLUTShape": "INVERSE"})
    phantoms.write_dicom(
        tmp_path / "mono1_inverse.dcm",
        image,
        bits=12,
        photometric="MONOCHROME1",
        extra_tags={"PresentationLUTShape": "INVERSE"},
    )
    plain = read_radiograph(str(tmp_path / "plain.dcm")).pixels
    inverse = read_radiograph(str(tmp_path / "inverse.dcm"))
    mono1_inverse = read_radiograph(str(tmp_path / "mono1_inverse.dcm"))
    assert pydicom.dcmread(tmp_path / "inverse.dcm").PresentationLUTShape == "INVERSE"

    np.testing.assert_array_equal(inverse.pixels, plain.max() + plain.min() - plain)  # min shown white
    assert inverse.details["grey_levels"] == "inverted (PresentationLUTShape INVERSE)"
    # MONOCHROME1 with INVERSE (the usual DX pairing) is one inversion: the MONOCHROME2 picture again
    np.testing.assert_array_equal(mono1_inverse.pixels - mono1_inverse.pixels.min(), plain - plain.min())
    assert mono1_inverse.details["grey_levels"] == "inverted (MONOCHROME1 + PresentationLUTShape INVERSE)"
    assert read_radiograph(str(tmp_path / "plain.dcm")).details["grey_levels"] == "as stored"

"""The bundle's DICOM reader in MONAI Label's environment (pydicom 2.4) gives what it gives in the bundle's (pydicom 3).

The reader runs under ``.venv-monailabel``'s python in a subprocess (no server) on DICOM files written here, and its
pixels, spacing, warnings and details are compared with this environment's reader on the same files. Without that
environment the tests are skipped with the reason; in CI (CI=true) they fail instead, like the MONAI Label server test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from test_monailabel_server import monailabel_environment  # noqa: F401 (a fixture)

import phantoms
from conftest import BUNDLE
from scripts.radiograph_io import RadiographError, read_radiograph

ROWS, COLUMNS = 96, 120
SPACING = (0.143, 0.15)

READ_IN_SUBPROCESS = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import pydicom
from scripts.radiograph_io import RadiographError, read_radiograph
results, arrays = {"pydicom": pydicom.__version__}, {}
for path in sys.argv[3:]:
    try:
        radiograph = read_radiograph(path)
    except RadiographError as error:
        results[path] = {"error": str(error), "error_path": error.path}
        continue
    arrays[path] = radiograph.pixels
    results[path] = {"spacing_mm": radiograph.spacing_mm, "spacing_source": radiograph.spacing_source,
                     "warnings": radiograph.warnings, "details": radiograph.details}
np.savez(sys.argv[2] + ".npz", *[arrays[path] for path in sorted(arrays)])
json.dump({"results": results, "order": sorted(arrays)}, open(sys.argv[2] + ".json", "w"))
"""

READABLE = {  # file name -> phantoms.write_dicom options
    "mono2_16.dcm": dict(bits=16, spacing_mm=SPACING),
    "mono2_8_detector_spacing.dcm": dict(bits=8, spacing_mm=SPACING, spacing_tag="both"),  # warns: no spacing
    "mono1_16.dcm": dict(bits=16, photometric="MONOCHROME1", spacing_mm=SPACING),
    "mono1_12_window.dcm": dict(bits=12, photometric="MONOCHROME1", window=(2048, 4000)),
    "mono2_16_window.dcm": dict(bits=16, window=(32768, 60000)),
    "mono2_16_clipping_window.dcm": dict(bits=16, window=(60000, 100)),  # falls back to the stored range, warns
    "mono1_presentation_inverse.dcm": dict(
        bits=12, photometric="MONOCHROME1", extra_tags={"PresentationLUTShape": "INVERSE"}
    ),
    "presentation_inverse.dcm": dict(bits=12, extra_tags={"PresentationLUTShape": "INVERSE"}),
    "rescaled.dcm": dict(bits=12, extra_tags={"RescaleSlope": "2", "RescaleIntercept": "-100"}),
    "magnified.dcm": dict(
        bits=16,
        spacing_mm=(0.1, 0.2),
        spacing_tag="ImagerPixelSpacing",
        extra_tags={"EstimatedRadiographicMagnificationFactor": "1.25"},
    ),
    "rle_mono1_12.dcm": dict(bits=12, photometric="MONOCHROME1", transfer_syntax="rle"),
    "jpeg2000_12.dcm": dict(bits=12, transfer_syntax="jpeg2000"),
}
JPEG_BASELINE = "jpeg_baseline_8.dcm"  # lossy: pylibjpeg (here) and Pillow (there) round some pixels differently
JPEG_LS = "jpeg_ls.dcm"  # no JPEG-LS decoder in MONAI Label's environment


def _jpeg_ls_without_decoder(path: Path, image: np.ndarray) -> None:
    """A DICOM declaring JPEG-LS Lossless; its frame is a bare JPEG start and end (no encoder is installed here)."""
    phantoms.write_dicom(path, image, bits=16)
    dataset = pydicom.dcmread(path)
    dataset.PixelData = encapsulate([b"\xff\xd8" + bytes(64) + b"\xff\xd9"])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
    dataset.save_as(path, enforce_file_format=True)


def _truncated(path: Path, image: np.ndarray) -> None:
    phantoms.write_dicom(path, image, bits=16)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) - 4000])


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicom_studies")
    image = phantoms.make_phantom(ROWS, COLUMNS, seed=11).image
    for name, options in READABLE.items():
        phantoms.write_dicom(folder / name, image, **options)
    phantoms.write_dicom(folder / JPEG_BASELINE, image, bits=8, transfer_syntax="jpeg_baseline")
    _jpeg_ls_without_decoder(folder / JPEG_LS, image)
    (folder / "garbage.dcm").write_bytes(b"not a DICOM file, only text with a .dcm name\n" * 40)
    _truncated(folder / "truncated.dcm", image)
    return folder


@pytest.fixture(scope="module")
def monailabel_reads(monailabel_environment, studies, tmp_path_factory) -> dict:  # noqa: F811 (the fixture)
    """{path: result} from the reader under MONAI Label's python; a result holds ``pixels`` or ``error``."""
    output = tmp_path_factory.mktemp("monailabel_reads") / "reads"
    paths = sorted(str(path) for path in studies.iterdir())
    command = [str(monailabel_environment), "-c", READ_IN_SUBPROCESS, str(BUNDLE), str(output), *paths]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-4000:]
    summary = json.loads(Path(f"{output}.json").read_text())
    with np.load(f"{output}.npz") as arrays:
        for index, path in enumerate(summary["order"]):
            summary["results"][path]["pixels"] = arrays[f"arr_{index}"]
    return summary["results"]


def _read_here(path: Path) -> dict:
    radiograph = read_radiograph(str(path))
    spacing = list(radiograph.spacing_mm) if radiograph.spacing_mm is not None else None
    return {"pixels": radiograph.pixels, "spacing_mm": spacing, "spacing_source": radiograph.spacing_source,
            "warnings": radiograph.warnings, "details": radiograph.details}  # fmt: skip


@pytest.mark.parametrize("name", sorted(READABLE))
def test_monailabel_environment_reads_dicom_as_the_bundle_does(name, studies, monailabel_reads):
    path = studies / name
    here, there = _read_here(path), monailabel_reads[str(path)]
    assert "error" not in there, f"pydicom {monailabel_reads['pydicom']}: {there.get('error')}"
    assert there["pixels"].dtype == np.float32 and there["pixels"].shape == (ROWS, COLUMNS)
    np.testing.assert_array_equal(there["pixels"], here["pixels"])
    for key in ("spacing_mm", "spacing_source", "warnings", "details"):
        assert there[key] == here[key], key


def test_readings_cover_inversion_window_and_spacing(studies, monailabel_reads):
    """The cases above differ where they should: the equality is not between identical trivial pictures."""
    pixels = {name: monailabel_reads[str(studies / name)]["pixels"] for name in READABLE}
    mono2, mono1 = pixels["mono2_16.dcm"], pixels["mono1_16.dcm"]
    np.testing.assert_array_equal(mono1 - mono1.min(), mono2 - mono2.min())  # MONOCHROME1 shown as MONOCHROME2
    windowed = monailabel_reads[str(studies / "mono2_16_window.dcm")]
    assert not np.array_equal(windowed["pixels"], mono2)  # the VOI window was applied
    assert monailabel_reads[str(studies / "mono2_16_clipping_window.dcm")]["warnings"]
    assert monailabel_reads[str(studies / "mono1_16.dcm")]["spacing_mm"] == list(SPACING)
    detector = monailabel_reads[str(studies / "mono2_8_detector_spacing.dcm")]
    assert detector["spacing_mm"] is None and "ImagerPixelSpacing is at the detector" in detector["warnings"][0]
    magnified = monailabel_reads[str(studies / "magnified.dcm")]
    np.testing.assert_allclose(magnified["spacing_mm"], (0.08, 0.16))
    assert monailabel_reads[str(studies / "presentation_inverse.dcm")]["details"]["grey_levels"] == (
        "inverted (PresentationLUTShape INVERSE)"
    )


def test_jpeg_baseline_differs_by_at_most_one_grey_level(studies, monailabel_reads):
    path = studies / JPEG_BASELINE
    there = monailabel_reads[str(path)]
    assert "error" not in there, there.get("error")
    difference = np.abs(there["pixels"] - _read_here(path)["pixels"])
    assert difference.max() <= 1.0 and difference.mean() < 0.1


def test_missing_decoder_names_the_file_and_the_packages(studies, monailabel_reads):
    if not monailabel_reads["pydicom"].startswith("2."):
        pytest.skip(f"MONAI Label's environment has pydicom {monailabel_reads['pydicom']}, not 2.x")
    path = str(studies / JPEG_LS)
    there = monailabel_reads[path]
    assert there["error_path"] == path
    assert there["error"].startswith(f"{path}: pixel data is compressed as JPEG-LS Lossless Image Compression")
    assert "no installed decoder reads it" in there["error"] and "pylibjpeg-libjpeg" in there["error"]


@pytest.mark.parametrize(
    "name, problem", [("garbage.dcm", "not a valid DICOM file"), ("truncated.dcm", "cannot decode dicom file")]
)
def test_a_corrupt_dcm_is_an_error_naming_the_file(name, problem, studies, monailabel_reads):
    path = str(studies / name)
    there = monailabel_reads[path]
    assert there.get("error_path") == path, there
    assert there["error"].startswith(f"{path}: {problem}")
    with pytest.raises(RadiographError) as here:
        read_radiograph(path)
    assert str(here.value).startswith(f"{path}: {problem}")

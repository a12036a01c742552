"""The input quality gate: frontal chest radiographs pass, other images and DICOM tags are refused with a reason."""

import csv

import numpy as np
import pytest
import torch
from measure_input_gate import dicom_tags
from measure_input_gate import main as measure_main
from non_chest_images import KINDS, negative_image, write_non_chest_images

import phantoms
from scripts.input_gate import ERROR_TAG, WARNING_TAG, assess_input, reasons
from scripts.lung_sides import split_lungs
from scripts.transforms import DisplayImaged

SIZES = [(200, 240), (256, 256), (96, 80), (64, 80), (900, 1024)]


def display(image01: np.ndarray) -> np.ndarray:
    """The inference's display image (uint8, 0.5-99.5 percentile scaled) of a 0..1 radiograph."""
    return np.asarray(DisplayImaged(keys="image")({"image": torch.from_numpy(image01[None])})["display"])[0]


def assess(lung: np.ndarray, grey: np.ndarray | None, **tags):
    """The gate on a lung mask split as the inference splits it."""
    right, left = split_lungs(lung)
    return assess_input(lung, right, left, grey, **tags)


def error_reasons(assessment) -> list[str]:
    return [reason for text in assessment.errors for reason in reasons(text)]


def ellipse(shape, centre, axes) -> np.ndarray:
    """Filled ellipse; centre and semi-axes as (row, column) fractions of the image."""
    v, u = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((v / shape[0] - centre[0]) / axes[0]) ** 2 + ((u / shape[1] - centre[1]) / axes[1]) ** 2 <= 1


@pytest.mark.parametrize("rows, columns", SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phantom_truth_passes_without_error_or_warning(rows, columns, seed):
    phantom = phantoms.make_phantom(rows, columns, seed=seed)
    assessment = assess_input(phantom.lung, phantom.right_lung, phantom.left_lung, display(phantom.image), "DX", "PA",
                              "CHEST")  # fmt: skip
    assert (assessment.errors, assessment.warnings, assessment.refused) == ([], [], False)


@pytest.mark.parametrize(
    "modality, view, body_part",
    [("CR", "AP", "CHEST"), ("dx", "pa", "Thorax"), ("", "", ""), ("OT", "AP SUPINE", "LUNG"), ("DX", "", "")],
)
def test_radiography_tags_and_unknown_tags_pass(modality, view, body_part):
    phantom = phantoms.make_phantom(200, 240, seed=3)
    assessment = assess(phantom.lung, display(phantom.image), modality=modality, view_position=view,
                        body_part_examined=body_part)  # fmt: skip
    assert (assessment.errors, assessment.warnings) == ([], [])


@pytest.mark.parametrize(
    "tags, reason, named",
    [
        ({"modality": "CT"}, "modality", "DICOM Modality is CT"),
        ({"modality": "MR"}, "modality", "DICOM Modality is MR"),
        ({"view_position": "LL"}, "view-position", "DICOM ViewPosition is LL, a lateral view"),
        ({"view_position": "lateral"}, "view-position", "DICOM ViewPosition is LATERAL, a lateral view"),
        ({"body_part_examined": "KNEE"}, "body-part", "DICOM BodyPartExamined is KNEE, not the chest"),
    ],
)
def test_non_chest_dicom_tags_are_refused_with_the_tag_named(tags, reason, named):
    phantom = phantoms.make_phantom(200, 240, seed=4)
    assessment = assess(phantom.lung, display(phantom.image), **tags)
    assert error_reasons(assessment) == [reason] and assessment.warnings == []
    assert assessment.errors[0].startswith(f"{ERROR_TAG} [{reason}]: {named}")


def test_oblique_view_is_a_warning_not_a_refusal():
    phantom = phantoms.make_phantom(200, 240, seed=4)
    assessment = assess(phantom.lung, display(phantom.image), view_position="RAO")
    assert assessment.errors == []
    assert assessment.warnings == [f"{WARNING_TAG} [view-position]: DICOM ViewPosition is RAO, not AP or PA"]


def test_one_lung_field_is_refused():
    phantom = phantoms.make_phantom(200, 240, seed=5)
    assessment = assess(phantom.right_lung, display(phantom.image))
    assert error_reasons(assessment) == ["one-lung"]
    assert "the left lung" in assessment.errors[0]


def test_tiny_lung_fields_are_refused_as_no_lung():
    shape = (200, 240)
    lung = ellipse(shape, (0.5, 0.3), (0.04, 0.03)) | ellipse(shape, (0.5, 0.7), (0.04, 0.03))
    assessment = assess(lung, None)
    assert error_reasons(assessment) == ["no-lung"]
    assert "predicted lung covers 0.7" in assessment.errors[0]


def test_lung_fields_filling_the_image_are_refused():
    shape = (200, 240)
    lung = np.ones(shape, dtype=bool)
    lung[:, 118:122] = False  # two halves, each a filled rectangle: only their size is wrong
    assessment = assess(lung, None)
    assert error_reasons(assessment) == ["lung-size"]
    assert "lung fields cover 98 % of the image" in assessment.errors[0]


def test_one_central_blob_is_refused():
    lung = ellipse((200, 240), (0.5, 0.5), (0.3, 0.2))
    assessment = assess(lung, None)
    assert error_reasons(assessment) == ["midline"]


def test_speckle_mask_is_refused():
    lung = np.random.default_rng(0).random((200, 240)) < 0.3
    assessment = assess(lung, None)
    assert error_reasons(assessment) == ["lung-shape"]


def test_photographic_negative_of_a_phantom_is_refused():
    phantom = phantoms.make_phantom(200, 240, seed=6)
    grey = display(negative_image(phantom.image))
    assessment = assess_input(phantom.lung, phantom.right_lung, phantom.left_lung, grey)
    assert error_reasons(assessment) == ["contrast"]
    assert "darker" in assessment.errors[0]


def test_almost_black_image_is_refused_for_its_few_grey_levels():
    phantom = phantoms.make_phantom(200, 240, seed=7)
    almost_black = np.rint(phantom.image * 3).astype(np.float32)  # values 0..3
    assessment = assess_input(phantom.lung, phantom.right_lung, phantom.left_lung, display(almost_black))
    assert "flat-image" in error_reasons(assessment)


def test_reasons_of_joined_messages():
    text = f"{ERROR_TAG} [one-lung]: a; {ERROR_TAG} [contrast]: b | {WARNING_TAG} [lung-size]: c"
    assert reasons(text) == ["one-lung", "contrast", "lung-size"]
    assert reasons("no lung field found") == [] and reasons(None) == []


def test_constructed_non_chest_images_are_written_with_their_dicom_tags(tmp_path):
    written = write_non_chest_images(str(tmp_path), count=1, seed=0)
    assert sorted(written) == sorted(KINDS) and all(len(paths) == 1 for paths in written.values())
    assert dicom_tags(written["tagct"][0])["modality"] == "CT"
    assert dicom_tags(written["taglateral"][0])["view_position"] == "LL"
    assert dicom_tags(written["tagknee"][0]) == {"modality": "DX", "view_position": "PA", "body_part_examined": "KNEE"}


def test_measure_counts_refusals_and_warnings_per_reason(tmp_path, capsys):
    rows = [
        {"image": "a_1.png", "status": "ok", "message": "", "warning": ""},
        {"image": "a_2.png", "status": "ok", "message": "", "warning": f"{WARNING_TAG} [lung-size]: big"},
        {"image": "b_1.png", "status": "error", "message": f"p: {ERROR_TAG} [contrast]: x", "warning": ""},
        {"image": "b_2.png", "status": "error", "message": "b_2.png: cannot decode png file", "warning": ""},
    ]
    with open(tmp_path / "severity.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert measure_main([str(tmp_path), "--by-kind"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"results {tmp_path}: 4 images, refused 1 (25.0 %), warned 1 (25.0 %), other errors 1; "
        "refusal reasons: contrast 1; warning reasons: lung-size 1"
    )
    assert lines[1].startswith(f"results {tmp_path} a: 2 images, refused 0 (0.0 %), warned 1 (50.0 %)")

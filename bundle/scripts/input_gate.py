"""Input quality gate: refuse what is not a frontal chest radiograph, warn about what looks unusual.

:func:`assess_input` judges one image from what the inference already has: the DICOM tags (``Modality``,
``ViewPosition``, ``BodyPartExamined``; "" when unknown or not DICOM), the predicted lung mask split into the
patient's right and left lung (:func:`scripts.lung_sides.split_lungs`) and the display image (uint8, 0.5-99.5
percentile scaled, higher = denser). Arrays are ``[row, column]`` as a viewer shows the image: the image's left half
holds the PATIENT'S RIGHT lung.

Every finding is one message that starts with a stable reason tag, ``<ERROR_TAG> [<reason>]: ...`` for a refusal
(the row gets ``status=error``) or ``<WARNING_TAG> [<reason>]: ...`` for a warning (the figures are still given);
the reasons are the ``REASON_*`` constants. The mask thresholds were measured: with the shipped weights no radiograph
of ``../shared/data`` (cohen-cxr 362, covid-qu-ex 2,597) is refused (``scripts/measure_input_gate.py``); a refusal
needs a lung field far outside what those radiographs show, a warning one at the edge of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from scripts.grey_statistics import median

ERROR_TAG = "not a frontal chest radiograph"
WARNING_TAG = "unusual chest radiograph"
REASON_MODALITY = "modality"
REASON_VIEW = "view-position"
REASON_BODY_PART = "body-part"
REASON_NO_LUNG = "no-lung"
REASON_ONE_LUNG = "one-lung"
REASON_LUNG_SIZE = "lung-size"
REASON_LUNG_POSITION = "lung-position"
REASON_LUNG_SHAPE = "lung-shape"
REASON_MIDLINE = "midline"
REASON_CONTRAST = "contrast"
REASON_FLAT = "flat-image"
REASON_PATTERN = re.compile(rf"(?:{ERROR_TAG}|{WARNING_TAG}) \[([a-z-]+)\]")

# DICOM tags (compared upper-case, spaces and underscores alike). Modality: radiography (CR computed radiography, DX
# digital radiography, RG radiographic imaging; DR and XR are not DICOM terms but written by some systems) or
# unknown; anything else (CT, MR, US, MG, PT, NM, ...) is refused.
RADIOGRAPHY_MODALITIES = ("CR", "DX", "DR", "RG", "XR")
UNKNOWN_MODALITIES = ("", "OT", "SC")  # other, secondary capture: says nothing about the image
# ViewPosition: lateral views are refused; frontal ones (AP, PA and variants that start with them) and unknown pass;
# any other value (obliques, decubitus, ...) gets a warning.
LATERAL_VIEW_POSITIONS = ("LL", "RL", "LAT", "LATERAL", "LEFT LATERAL", "RIGHT LATERAL")
FRONTAL_VIEW_PREFIXES = ("AP", "PA")
UNKNOWN_VIEW_POSITIONS = ("", "FRONTAL", "UNKNOWN")
# BodyPartExamined: a value containing one of these words is the chest; unknown values pass; others are refused.
CHEST_BODY_PART_WORDS = ("CHEST", "THORAX", "THORAC", "LUNG", "TORAX", "TORACE", "PECHO", "POUMON")
UNKNOWN_BODY_PARTS = ("", "UNKNOWN", "OTHER", "NONE")

# Lung fields and display image: each check has an error bound (refused) and a warning bound. Measured with the
# shipped weights on the 2,959 radiographs of ../shared/data (cohen-cxr, covid-qu-ex; range in brackets) and on
# constructed non-chest images (scripts/non_chest_images.py); see the bundle README for the rates.
MIN_LUNG_FRACTION = 0.02  # both lungs below this share of the image: no lung field (the handler's min_lung_fraction)
MIN_SIDE_FRACTION_ERROR = 0.002  # a lung below this share of the image is missing: one lung field [0.005 - 0.41]
MIN_SIDE_FRACTION_WARNING = 0.03
MIN_SIDE_RATIO_WARNING = 0.25  # the smaller lung below this share of the larger one
MAX_LUNG_FRACTION_ERROR = 0.8  # both lungs above this share of the image [0.067 - 0.69]
MAX_LUNG_FRACTION_WARNING = 0.6
# centroid column (share of the width) of the right lung, or 1 - that of the left lung: beyond the image centre
MAX_SIDE_CENTROID_COLUMN_ERROR = 0.6  # [0.14 - 0.51]
MAX_SIDE_CENTROID_COLUMN_WARNING = 0.45
CENTROID_ROW_RANGE_ERROR = (0.1, 0.85)  # a lung's centroid row (share of the height) outside [0.18 - 0.70]
CENTROID_ROW_RANGE_WARNING = (0.22, 0.7)
MAX_CONTACT_SHARE_ERROR = 0.4  # share of the lung rows where the lungs touch: one field across the midline [0 - 0.26]
MAX_CONTACT_SHARE_WARNING = 0.05
MIN_SOLIDITY_ERROR = 0.55  # a lung's largest part over its convex outline: noise-like or ragged [0.65 - 0.98]
MIN_SOLIDITY_WARNING = 0.75
MIN_MAIN_COMPONENT_SHARE_ERROR = 0.3  # a lung's largest connected part over the whole lung: in pieces [0.49 - 1]
MIN_MAIN_COMPONENT_SHARE_WARNING = 0.8
# Display image (0..255, higher = denser): the mediastinum band between the lungs (their rows, between their centroid
# columns, outside the lungs) minus the lungs, medians, over 255. A photographic negative or a page: <= 0 [0.071 - 0.63]
MIN_CONTRAST_ERROR = 0.02
MIN_CONTRAST_WARNING = 0.1
MAX_LUNG_BRIGHTNESS_ERROR = 0.95  # median of the lungs over 255: lungs as white as the whitest part [0.15 - 0.88]
MAX_LUNG_BRIGHTNESS_WARNING = 0.85
MIN_GREY_LEVELS_ERROR = 8  # distinct values of the display image: an almost blank image [12 - 256]
MIN_GREY_LEVELS_WARNING = 16
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)
# larger images are measured on every n-th row and column so that at most this many remain on the longer side (all
# measures are fractions, so they hardly change; a 15-megapixel radiograph then costs as little as a 1-megapixel one)
MEASURE_MAX_SIDE = 1024


class InputRefusedError(ValueError):
    """An image the gate refuses; the message holds every refusal reason, each starting with its tag."""


@dataclass
class InputAssessment:
    """Refusal reasons (``errors``) and warnings of one image; each message starts with its reason tag."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return bool(self.errors)


@dataclass(frozen=True)
class LungMeasures:
    """What :func:`assess_input` reads from one lung mask (fractions of the image's size, see the constants)."""

    fraction: float  # share of the image's pixels
    centroid_row: float  # 0 top, 1 bottom
    centroid_column: float  # 0 image left, 1 image right
    solidity: float  # area of the largest connected part over the area of its convex hull
    main_component_share: float  # largest connected part over the whole lung


@dataclass(frozen=True)
class LungFieldMeasures:
    """Both lungs, how they meet, and the display image's grey values (None without a display image)."""

    right: LungMeasures
    left: LungMeasures
    lung_fraction: float
    contact_share: float  # rows where the two lungs touch (one merged field) over the rows holding lung
    contrast: float | None  # (median of the mediastinum band between the lungs - median of the lungs) / 255
    lung_brightness: float | None  # median of the lungs / 255
    grey_levels: int | None  # distinct values of the display image


def reasons(message: str) -> list[str]:
    """The reason tags of a row's message or warning text (several findings may be joined in one text)."""
    return REASON_PATTERN.findall(message or "")


def assess_input(
    lung: np.ndarray,
    right_lung: np.ndarray,
    left_lung: np.ndarray,
    grey: np.ndarray | None = None,
    modality: str = "",
    view_position: str = "",
    body_part_examined: str = "",
    min_lung_fraction: float = MIN_LUNG_FRACTION,
) -> InputAssessment:
    """Errors (refuse) and warnings for one image: its DICOM tags, then its predicted lung fields and contrast.

    ``lung`` is the predicted lung mask (``> 0``), ``right_lung`` and ``left_lung`` its split by
    :func:`scripts.lung_sides.split_lungs`, ``grey`` the display image (uint8, same shape) or None; a lung mask
    covering less than ``min_lung_fraction`` of the image is "no lung field" and nothing else is measured.
    """
    assessment = InputAssessment()
    _check_tags(assessment, modality, view_position, body_part_examined)
    lung = np.asarray(lung) > 0
    if lung.mean() < min_lung_fraction:
        assessment.errors.append(
            f"{ERROR_TAG} [{REASON_NO_LUNG}]: no lung field found (predicted lung covers {100 * lung.mean():.2f} % "
            f"of the image, at least {100 * min_lung_fraction:g} % expected)"
        )
        return assessment
    _check_lungs(assessment, measure_lung_fields(lung, right_lung, left_lung, grey))
    return assessment


def measure_lung_fields(lung, right_lung, left_lung, grey=None) -> LungFieldMeasures:
    """The :class:`LungFieldMeasures` of a lung mask, its right/left split and the display image (or None)."""
    lung = np.asarray(lung) > 0
    step = max(1, -(-max(lung.shape) // MEASURE_MAX_SIDE))
    lung, right_lung, left_lung = (np.asarray(mask)[::step, ::step] > 0 for mask in (lung, right_lung, left_lung))
    right, left = _measure_lung(right_lung), _measure_lung(left_lung)
    if grey is None:
        grey_measures = (None,) * 3
    else:
        grey = np.clip(np.rint(np.asarray(grey, dtype=np.float32)[::step, ::step]), 0, 255).astype(np.uint8)
        grey_measures = _grey_measures(grey, lung, right, left)
    return LungFieldMeasures(right, left, float(lung.mean()), _contact_share(right_lung, left_lung), *grey_measures)


def _measure_lung(mask: np.ndarray) -> LungMeasures:
    area = int(mask.sum())
    if area == 0:
        return LungMeasures(0.0, float("nan"), float("nan"), float("nan"), float("nan"))
    rows, columns = np.nonzero(mask)
    components, _ = ndimage.label(mask, structure=EIGHT_CONNECTIVITY)
    sizes = np.bincount(components.ravel())[1:]
    main = components == int(np.argmax(sizes)) + 1
    return LungMeasures(
        fraction=area / mask.size,
        centroid_row=(rows.mean() + 0.5) / mask.shape[0],
        centroid_column=(columns.mean() + 0.5) / mask.shape[1],
        solidity=_solidity(main),
        main_component_share=float(sizes.max()) / area,
    )


def _contact_share(right_lung, left_lung) -> float:
    """Share of the lung rows in which a right-lung pixel touches a left-lung pixel (8-neighbourhood)."""
    right, left = np.asarray(right_lung) > 0, np.asarray(left_lung) > 0
    lung_rows = int((right | left).any(axis=1).sum())
    if not lung_rows:
        return 0.0
    touching = right & ndimage.binary_dilation(left, structure=EIGHT_CONNECTIVITY)
    return float(touching.any(axis=1).sum()) / lung_rows


def _solidity(component: np.ndarray) -> float:
    """Pixel count over the area of the convex hull of the pixels' corners (1.0 for a filled convex shape)."""
    from scipy.spatial import ConvexHull, QhullError

    padded = np.pad(component, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    rows, columns = np.nonzero(component & ~interior)
    corners = np.concatenate([np.column_stack((rows + dr, columns + dc)) for dr in (0, 1) for dc in (0, 1)])
    try:
        hull_area = ConvexHull(corners).volume
    except QhullError:  # degenerate (a line of pixels)
        return 1.0
    return float(component.sum()) / hull_area if hull_area > 0 else 1.0


def _grey_measures(grey: np.ndarray, lung: np.ndarray, right: LungMeasures, left: LungMeasures):
    """(contrast, lung brightness, grey levels) of the display image; see :class:`LungFieldMeasures`."""
    lung_median = median(grey[lung])
    contrast = None
    if right.fraction and left.fraction:
        rows = np.flatnonzero(lung.any(axis=1))
        first, last = (int(side.centroid_column * lung.shape[1]) for side in (right, left))
        band = ~lung[rows[0] : rows[-1] + 1, first : last + 1]
        if band.any():
            contrast = (median(grey[rows[0] : rows[-1] + 1, first : last + 1][band]) - lung_median) / 255
    levels = int(np.count_nonzero(np.bincount(grey.ravel(), minlength=256)))
    return contrast, lung_median / 255, levels


def _check_tags(assessment: InputAssessment, modality: str, view_position: str, body_part: str) -> None:
    modality, view, body = (_normalised(value) for value in (modality, view_position, body_part))
    if modality not in RADIOGRAPHY_MODALITIES + UNKNOWN_MODALITIES:
        assessment.errors.append(
            f"{ERROR_TAG} [{REASON_MODALITY}]: DICOM Modality is {modality} "
            f"(radiography expected: {', '.join(RADIOGRAPHY_MODALITIES)})"
        )
    if view in LATERAL_VIEW_POSITIONS:
        assessment.errors.append(f"{ERROR_TAG} [{REASON_VIEW}]: DICOM ViewPosition is {view}, a lateral view")
    elif view not in UNKNOWN_VIEW_POSITIONS and not view.startswith(FRONTAL_VIEW_PREFIXES):
        assessment.warnings.append(f"{WARNING_TAG} [{REASON_VIEW}]: DICOM ViewPosition is {view}, not AP or PA")
    if body not in UNKNOWN_BODY_PARTS and not any(word in body for word in CHEST_BODY_PART_WORDS):
        assessment.errors.append(f"{ERROR_TAG} [{REASON_BODY_PART}]: DICOM BodyPartExamined is {body}, not the chest")


def _normalised(value) -> str:
    return " ".join(str(value or "").upper().replace("_", " ").split())


def _check_lungs(assessment: InputAssessment, measures: LungFieldMeasures) -> None:
    """Findings on the lung fields and the display image; one message per reason, an error when any part of it is."""
    findings: dict[str, tuple[bool, list[str]]] = {}

    def finding(reason: str, is_error: bool, text: str) -> None:
        was_error, texts = findings.get(reason, (False, []))
        findings[reason] = (was_error or is_error, texts + [text])

    def below(value, error_bound, warning_bound, reason, text):
        if value is not None and value < warning_bound:
            finding(reason, value < error_bound, text)

    def above(value, error_bound, warning_bound, reason, text):
        if value is not None and value > warning_bound:
            finding(reason, value > error_bound, text)

    m = measures
    sides = [("right", m.right), ("left", m.left)]
    present = [(name, side) for name, side in sides if side.fraction >= MIN_SIDE_FRACTION_ERROR]
    if len(present) < 2:
        missing = min(sides, key=lambda item: item[1].fraction)[0]
        finding(REASON_ONE_LUNG, True, f"one lung field only (the {missing} lung is missing)")
    else:
        ratio = min(m.right.fraction, m.left.fraction) / max(m.right.fraction, m.left.fraction)
        below(ratio, 0, MIN_SIDE_RATIO_WARNING, REASON_ONE_LUNG, f"one lung field is {100 * ratio:.0f} % of the other")
    above(m.lung_fraction, MAX_LUNG_FRACTION_ERROR, MAX_LUNG_FRACTION_WARNING, REASON_LUNG_SIZE,
          f"lung fields cover {100 * m.lung_fraction:.0f} % of the image")  # fmt: skip
    above(m.contact_share, MAX_CONTACT_SHARE_ERROR, MAX_CONTACT_SHARE_WARNING, REASON_MIDLINE,
          f"the lung fields meet across the midline in {100 * m.contact_share:.0f} % of their rows")  # fmt: skip
    for name, side in present:
        below(side.fraction, 0, MIN_SIDE_FRACTION_WARNING, REASON_LUNG_SIZE,
              f"the {name} lung covers {100 * side.fraction:.1f} % of the image")  # fmt: skip
        column = side.centroid_column if name == "right" else 1.0 - side.centroid_column
        above(column, MAX_SIDE_CENTROID_COLUMN_ERROR, MAX_SIDE_CENTROID_COLUMN_WARNING, REASON_LUNG_POSITION,
              f"the {name} lung's centre lies at {100 * side.centroid_column:.0f} % of the image width")  # fmt: skip
        row_text = f"the {name} lung's centre lies at {100 * side.centroid_row:.0f} % of the image height"
        below(side.centroid_row, CENTROID_ROW_RANGE_ERROR[0], CENTROID_ROW_RANGE_WARNING[0], REASON_LUNG_POSITION,
              row_text)  # fmt: skip
        above(side.centroid_row, CENTROID_ROW_RANGE_ERROR[1], CENTROID_ROW_RANGE_WARNING[1], REASON_LUNG_POSITION,
              row_text)  # fmt: skip
        below(side.solidity, MIN_SOLIDITY_ERROR, MIN_SOLIDITY_WARNING, REASON_LUNG_SHAPE,
              f"the {name} lung fills {100 * side.solidity:.0f} % of its convex outline")  # fmt: skip
        below(
            side.main_component_share,
            MIN_MAIN_COMPONENT_SHARE_ERROR,
            MIN_MAIN_COMPONENT_SHARE_WARNING,
            REASON_LUNG_SHAPE,
            f"the {name} lung is in pieces (largest {100 * side.main_component_share:.0f} %)",
        )
    below(m.contrast, MIN_CONTRAST_ERROR, MIN_CONTRAST_WARNING, REASON_CONTRAST,
          f"the lung fields are {'not ' if m.contrast is not None and m.contrast <= 0 else 'hardly '}darker than the "
          f"mediastinum (contrast {m.contrast or 0:+.2f}; a photographic negative or not a radiograph?)")  # fmt: skip
    above(m.lung_brightness, MAX_LUNG_BRIGHTNESS_ERROR, MAX_LUNG_BRIGHTNESS_WARNING, REASON_CONTRAST,
          f"the lung fields are {100 * (m.lung_brightness or 0):.0f} % white")  # fmt: skip
    below(m.grey_levels, MIN_GREY_LEVELS_ERROR, MIN_GREY_LEVELS_WARNING, REASON_FLAT,
          f"the image holds only {m.grey_levels} grey levels (almost blank)")  # fmt: skip

    for reason, (is_error, texts) in findings.items():
        if is_error:
            assessment.errors.append(f"{ERROR_TAG} [{reason}]: {'; '.join(texts)}")
        else:
            assessment.warnings.append(f"{WARNING_TAG} [{reason}]: {'; '.join(texts)}")

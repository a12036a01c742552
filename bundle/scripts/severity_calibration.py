"""Load the fitted constants of the severity score rules (``models/severity_calibration.json``), and lay them out.

The file belongs to the shipped weights: its constants are fitted (``scripts/calibrate_severity.py`` of the
repository) on the masks those weights predict for radiographs that radiologists scored. It holds ``about`` (the
rules in words), ``rules`` (the :class:`scripts.severity.SeverityRules`), ``features`` (the density-feature
definitions the fit used, which must match :mod:`scripts.severity`) and ``fit`` (data, images, patients, folds,
cross-validated figures, date, model file and its SHA-256). Without the file, the scores follow the published bins
and the hand-set density rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

from scripts import severity

logger = logging.getLogger(__name__)


def feature_definitions() -> dict:
    """The density-feature constants a calibration is only valid for."""
    return {"dark_percentile": severity.IMAGE_LOW_PERCENTILE, "dense_level": severity.DENSE_LEVEL}


def published_rules() -> dict:
    """How the scores are computed without a calibration, as recorded in the run's settings."""
    return {
        "rules": "published",
        "extent_thresholds_pct": list(severity.PUBLISHED_EXTENT_THRESHOLDS),
        "opacity_degree": "hand-set density rule (scripts/severity.py opacity_degree)",
        "consolidation_min_relative_density": severity.CONSOLIDATION_MIN_RELATIVE_DENSITY,
        "consolidation_min_image_density": severity.CONSOLIDATION_MIN_IMAGE_DENSITY,
        "white_out_min_coverage": severity.WHITE_OUT_MIN_COVERAGE,
    }


RULES_IN_WORDS = (
    "per lung (scripts/severity.py): extent = the number of extent_thresholds_pct that opacity % + "
    "extent_dense_weight x dense_opacity_pct reaches (0 % opacity is 0); opacity degree = 0 at extent 0, else "
    "1 + (opacity_density >= consolidation_min_density) + (dense_opacity_pct >= white_out_min_dense_pct); the image "
    "scores are the sums over both lungs"
)


def calibration_content(rules: severity.SeverityRules, fit: dict) -> dict:
    """The JSON content of a calibration file."""
    return {"about": RULES_IN_WORDS, "rules": dataclasses.asdict(rules), "features": feature_definitions(), "fit": fit}


def load_calibration(path: str | None, model_sha256: str | None = None) -> tuple[severity.SeverityRules | None, dict]:
    """(rules, record) of the calibration file at ``path``; (None, published record) when there is none.

    ``record`` describes what the run scores with, for its settings: the file, the constants and the fit's figures;
    ``model_matches`` says whether the run's weights (``model_sha256``) are those the constants were fitted on (a
    warning is logged when they are not). Raises ValueError for a file that is not a calibration of this code's
    features.
    """
    if not path or not os.path.isfile(path):
        reason = "no calibration file configured" if not path else f"calibration file {path} not found"
        logger.warning(f"{reason}: severity scores follow the published extent bins and the hand-set density rule")
        return None, {**published_rules(), "calibration_file": path or None, "reason": reason}
    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    try:
        rules = severity.SeverityRules(**content["rules"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a severity calibration file ({type(error).__name__}: {error})") from error
    if content.get("features") != feature_definitions():
        raise ValueError(
            f"{path} was fitted on density features {content.get('features')}, but this code measures "
            f"{feature_definitions()}: refit it with scripts/calibrate_severity.py"
        )
    fit = content.get("fit", {})
    model_matches = None
    if model_sha256 and fit.get("model_sha256"):
        model_matches = model_sha256 == fit["model_sha256"]
        if not model_matches:
            logger.warning(f"{path} was fitted on the masks of other weights than this run's: refit it for them")
    summary = {key: fit.get(key) for key in ("date", "images", "patients", "folds", "model_sha256", "cross_validation")}
    record = {"rules": "calibrated", "calibration_file": path, **dataclasses.asdict(rules), "fit": summary}
    return rules, {**record, "model_matches": model_matches}


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

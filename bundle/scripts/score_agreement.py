"""Agreement of the bundle's severity scores with radiologists' scores (mean absolute error and Pearson correlation).

Radiologists' scores come as a CSV with the columns of ``severity_scores.csv``: ``filename``, ``geographic_extent``
(0-8) and ``opacity`` (the opacity score); the bundle's rows are those of ``severity.csv``, matched by file name.
:class:`ScoreAgreementWriter` adds ``score_agreement.json`` to the evaluate workflow; the calibration fit
(``scripts/calibrate_severity.py``) reports its cross-validated figures with :func:`agreement`.
"""

from __future__ import annotations

import csv
import logging
import math
import os

import numpy as np
from monai.utils import min_version, optional_import

from scripts.label_io import write_json

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

# severity.csv column -> radiologists' column, for each score
SCORES = {"geographic_extent": "geographic_extent", "opacity_score": "opacity"}


def read_table(path: str) -> list[dict]:
    """Rows of a CSV file as dicts; a clear error when it is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def read_scores(path: str) -> dict[str, dict[str, float]]:
    """Radiologists' scores by file name: ``{filename: {"geographic_extent": ..., "opacity": ...}}``."""
    rows = read_table(path)
    columns = ("filename", *SCORES.values())
    missing = [column for column in columns if rows and column not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path} needs the columns {', '.join(columns)} and at least one row (missing: {missing})")
    scores = {}
    for line, row in enumerate(rows, start=2):
        try:
            values = {column: float(row[column]) for column in SCORES.values()}
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}, line {line}: scores must be numbers ({error})") from error
        if not all(map(math.isfinite, values.values())):
            raise ValueError(f"{path}, line {line}: scores must be finite numbers")
        if row["filename"] in scores:
            raise ValueError(f"{path}, line {line}: {row['filename']} is scored twice")
        scores[row["filename"]] = values
    return scores


def agreement(predicted, truth) -> dict:
    """``n``, mean absolute error and Pearson correlation of two sequences, to 4 decimals (None where undefined)."""
    predicted, truth = np.asarray(predicted, dtype=float), np.asarray(truth, dtype=float)
    n = int(predicted.size)
    mae = round(float(np.abs(predicted - truth).mean()), 4) if n else None
    varies = n >= 2 and predicted.std() > 0 and truth.std() > 0
    pearson = round(float(np.corrcoef(predicted, truth)[0, 1]), 4) if varies else None
    return {"n": n, "mae": mae, "pearson": pearson}


def score_agreement(severity_rows: list[dict], scores: dict[str, dict[str, float]]) -> dict:
    """Agreement of each score over the ``status == ok`` rows that have radiologists' scores."""
    ok = [row for row in severity_rows if row.get("status") == "ok"]
    matched = [row for row in ok if row["image"] in scores]
    result = {
        "images": len(severity_rows),
        "images_ok": len(ok),
        "matched": len(matched),
        "unscored_images": len(ok) - len(matched),
        "scores_without_image": len(set(scores) - {row["image"] for row in severity_rows}),
        "severity_rules": sorted({row.get("severity_rules", "") for row in matched}),
    }
    for column, score in SCORES.items():
        predicted = [float(row[column]) for row in matched]
        result[column] = agreement(predicted, [scores[row["image"]][score] for row in matched])
    return result


class ScoreAgreementWriter:
    """Evaluator handler: ``score_agreement.json`` from this run's ``severity.csv`` and radiologists' scores.

    Custom: MONAI has no handler that compares per-image scores with a table of radiologists' scores.

    Attach it after the :class:`scripts.severity_handler.SeverityWriter` (it reads the table that writer completes);
    it does nothing when ``scores_csv`` is None. Images without a score are left out; the file says how many matched.
    """

    def __init__(self, output_dir: str, scores_csv: str | None = None):
        self.output_dir, self.scores_csv = output_dir, scores_csv
        self.scores = None if scores_csv is None else read_scores(scores_csv)  # a bad file fails before the run
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def completed(self, engine=None) -> None:
        if self.scores is None:
            return
        rows = read_table(os.path.join(self.output_dir, "severity.csv"))
        result = {"scores_csv": self.scores_csv, **score_agreement(rows, self.scores)}
        write_json(os.path.join(self.output_dir, "score_agreement.json"), result)
        extent, opacity = result["geographic_extent"], result["opacity_score"]
        self.logger.info(
            f"score agreement on {result['matched']} of {result['images_ok']} images: extent MAE {extent['mae']}, "
            f"Pearson {extent['pearson']}; opacity score MAE {opacity['mae']}, Pearson {opacity['pearson']}"
        )

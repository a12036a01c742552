#!/usr/bin/env python
"""Fit the constants of the severity score rules to radiologists' scores, cross-validated by patient.

Inputs: ``severity.csv`` written by the bundle's inference command on the scored radiographs (its per-lung opacity
percentages and density features; the fit runs no network), the radiologists' scores (``filename``,
``geographic_extent``, ``opacity``, as ``cohen-cxr/severity_scores.csv``) and a metadata CSV with ``filename`` and
``patientid``. Rows whose status is not ok are skipped and listed by name.

The rules (``scripts/severity.py``): per lung, extent = the number of 4 thresholds that the extent measure (opacity %
+ w x dense opacity %) reaches (0 % opacity is always 0); opacity degree = 0 for a lung of extent 0, else 1 + (opacity
density >= a threshold) + (dense opacity % >= a threshold). Each threshold is fitted to minimise the mean absolute
error of the image's score (the sum over both lungs) by coordinate descent over the midpoints between observed
values (single constants, then pairs), extent first, from the published bins; the weight w is the one of
``DENSE_WEIGHTS`` whose fitted thresholds give the least extent error on the images fitted. Deterministic.

The figures are K-fold cross-validated by patient: all images of a patient lie in one fold, and each fold is scored
by constants fitted on the other folds only, beside a constant guess (the mean score of the other folds). The
constants written are then fitted on all images, with the cross-validated figures, data, model file and date, to
``--output`` (atomically; an existing file only with ``--force``).

Example (``scripts/calibrate_severity.sh`` runs the inference and this fit in one command):
  python scripts/calibrate_severity.py --severity runs/severity_calibration/inference/severity.csv \\
      --scores ../shared/data/cohen-cxr/severity_scores.csv --metadata ../shared/data/cohen-cxr/metadata.csv \\
      --output bundle/models/severity_calibration.json --force
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from scripts.label_io import write_json  # noqa: E402
from scripts.score_agreement import SCORES, agreement, read_scores, read_table  # noqa: E402
from scripts.severity import (  # noqa: E402
    DENSE_LEVEL,
    PUBLISHED_EXTENT_THRESHOLDS,
    SeverityRules,
    calibrated_degrees,
    extent_measure,
    extent_scores,
)
from scripts.severity_calibration import calibration_content  # noqa: E402

LUNG_FEATURES = ("opacity_pct", "opacity_density", "dense_opacity_pct")  # right_<name> and left_<name> columns
# weights of the dense opacity % in the extent measure that the fit tries (0: the opacity % alone)
DENSE_WEIGHTS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
MAX_SWEEPS = 20
TOLERANCE = 1e-9  # errors closer than this are ties
DECIMALS = 4  # of the fitted constants; they lie halfway between values given with at most 3 decimals


@dataclass
class ScoredImages:
    """The scored images with their per-lung features (arrays of shape (images, 2): right, left lung)."""

    names: list[str]
    patients: list[str]
    features: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]  # severity.csv score column -> radiologists' mean scores
    input_scores: dict[str, np.ndarray]  # the scores severity.csv holds, by the rules it was written with

    def subset(self, keep: np.ndarray) -> ScoredImages:
        pick = np.flatnonzero(keep)
        return ScoredImages(
            [self.names[i] for i in pick],
            [self.patients[i] for i in pick],
            {name: values[pick] for name, values in self.features.items()},
            {name: values[pick] for name, values in self.targets.items()},
            {name: values[pick] for name, values in self.input_scores.items()},
        )


def load_scored_images(severity_csv: str, scores_csv: str, metadata_csv: str) -> tuple[ScoredImages, dict, str]:
    """The scored rows of ``severity_csv`` that have features, the {name: reason} of those left out, and the rules
    the input scores were written with."""
    rows = read_table(severity_csv)
    columns = [f"{side}_{name}" for name in LUNG_FEATURES for side in ("right", "left")]
    missing = [column for column in columns if rows and column not in rows[0]]
    if not rows or missing:
        raise SystemExit(f"error: {severity_csv} has no rows or lacks {missing}: write it with this bundle's inference")
    scores = read_scores(scores_csv)
    patient_of = {row["filename"]: row["patientid"] for row in read_table(metadata_csv) if row.get("patientid")}
    skipped, kept = {}, []
    for row in rows:
        if row["image"] not in scores:
            continue
        if row["status"] != "ok":
            skipped[row["image"]] = f"status {row['status']}: {row['message']}"
        else:
            kept.append(row)
    for name in sorted(set(scores) - {row["image"] for row in rows}):
        skipped[name] = "scored, but not in the severity table"
    for row in kept:
        if row["image"] not in patient_of:
            print(f"warning: {row['image']} has no patient id in {metadata_csv}: it is its own patient")

    def lungs(name: str) -> np.ndarray:
        return np.array([[_number(row[f"right_{name}"]), _number(row[f"left_{name}"])] for row in kept], float)

    images = ScoredImages(
        names=[row["image"] for row in kept],
        patients=[patient_of.get(row["image"], f"image:{row['image']}") for row in kept],
        features={name: lungs(name) for name in LUNG_FEATURES},
        targets={column: np.array([scores[row["image"]][score] for row in kept]) for column, score in SCORES.items()},
        input_scores={column: np.array([_number(row[column]) for row in kept]) for column in SCORES},
    )
    rules = sorted({row.get("severity_rules") or "published" for row in kept})
    return images, skipped, "/".join(rules)


def predict(features: dict[str, np.ndarray], rules: SeverityRules) -> dict[str, np.ndarray]:
    """Image scores (sums over both lungs) by the rules of ``scripts/severity.py``."""
    measure = extent_measure(features["opacity_pct"], features["dense_opacity_pct"], rules.extent_dense_weight)
    extent = extent_scores(measure, rules.extent_thresholds_pct)
    degrees = calibrated_degrees(
        extent, features["opacity_density"], features["dense_opacity_pct"],
        rules.consolidation_min_density, rules.white_out_min_dense_pct,
    )  # fmt: skip
    return {"geographic_extent": extent.sum(axis=1), "opacity_score": degrees.sum(axis=1)}


def fit_rules(images: ScoredImages) -> SeverityRules:
    """Constants that minimise the mean absolute error of extent, then of the opacity score, over ``images``."""
    percent, density = images.features["opacity_pct"], images.features["opacity_density"]
    dense_pct = images.features["dense_opacity_pct"]
    fits = [fit_extent(extent_measure(percent, dense_pct, weight), images) + (weight,) for weight in DENSE_WEIGHTS]
    least_error = min(error for error, _, _ in fits)
    _, thresholds, dense_weight = next(fit for fit in fits if fit[0] <= least_error + TOLERANCE)  # the lowest weight
    extent = extent_scores(extent_measure(percent, dense_pct, dense_weight), thresholds)

    def opacity_error(constants: list) -> np.ndarray:
        degrees = calibrated_degrees(extent, density, dense_pct, *constants)
        return _mae(degrees.sum(axis=-1), images.targets["opacity_score"])

    involved = extent > 0
    options = [candidates(density[involved]), candidates(dense_pct[involved])]
    degree_constants = descend([DENSE_LEVEL, 50.0], options, opacity_error)
    rounded = [round(float(value), DECIMALS) for value in (*thresholds, *degree_constants)]
    return SeverityRules(tuple(rounded[:4]), *rounded[4:], extent_dense_weight=dense_weight)


def fit_extent(measure: np.ndarray, images: ScoredImages) -> tuple[float, list[float]]:
    """(mean absolute error, thresholds) of the extent thresholds fitted on the per-lung ``measure`` of ``images``."""

    def extent_error(thresholds: list) -> np.ndarray:
        return _mae(extent_scores(measure, thresholds).sum(axis=-1), images.targets["geographic_extent"])

    thresholds = sorted(descend(list(PUBLISHED_EXTENT_THRESHOLDS), [candidates(measure)] * 4, extent_error))
    return float(extent_error(thresholds)), thresholds


def candidates(values: np.ndarray) -> np.ndarray:
    """Thresholds worth trying on a feature: its lowest value, the midpoints between its consecutive distinct values
    and one above its highest (never reached)."""
    distinct = np.unique(values[np.isfinite(values)])
    if not distinct.size:
        return np.zeros(1)
    return np.concatenate([distinct[:1], (distinct[1:] + distinct[:-1]) / 2, distinct[-1:] + 1.0])


def descend(constants: list[float], options: list[np.ndarray], error) -> list[float]:
    """Coordinate descent over the ``options`` of each constant, minimising ``error(constants)``.

    Each constant in turn takes its best option (the middle one of ties) while that improves the error; when none
    does, each pair of constants is searched jointly (it frees constants whose errors cancel on an image); it ends
    when neither improves. ``error`` is called with one constant given as a column of options, shape
    (options, 1, 1), and returns the error of each.
    """
    constants = [float(value) for value in constants]
    best = float(error(constants))
    for _ in range(MAX_SWEEPS):
        improved = False
        for k in range(len(constants)):
            value_error, value = _best_option(constants, k, options[k], error)
            if value_error < best - TOLERANCE:
                best, constants[k], improved = value_error, value, True
        if improved:
            continue
        for j, k in itertools.combinations(range(len(constants)), 2):
            for first in options[j]:
                trial = constants[:j] + [float(first)] + constants[j + 1 :]
                value_error, value = _best_option(trial, k, options[k], error)
                if value_error < best - TOLERANCE:
                    best, constants, improved = value_error, trial[:k] + [value] + trial[k + 1 :], True
        if not improved:
            break
    return constants


def _best_option(constants: list[float], k: int, values: np.ndarray, error) -> tuple[float, float]:
    """(least error, option) over the options of constant ``k``, the middle one of ties."""
    errors = np.asarray(error(constants[:k] + [values[:, None, None]] + constants[k + 1 :]))
    ties = values[errors <= errors.min() + TOLERANCE]
    return float(errors.min()), float(ties[len(ties) // 2])


def patient_folds(patients: list[str], folds: int, seed: int) -> np.ndarray:
    """Fold of each image: patients in a seeded random order, each to the fold with the fewest images so far."""
    counts = collections.Counter(patients)
    if not 2 <= folds <= len(counts):
        raise ValueError(f"need 2 to {len(counts)} folds (one patient at least per fold), got {folds}")
    names = sorted(counts)
    load, fold_of = [0] * folds, {}
    for index in np.random.default_rng(seed).permutation(len(names)):
        fold = int(np.argmin(load))
        fold_of[names[index]] = fold
        load[fold] += counts[names[index]]
    return np.array([fold_of[patient] for patient in patients])


def cross_validate(images: ScoredImages, folds: int, seed: int) -> dict:
    """Scores of every image by constants fitted on the other folds, a constant guess (the other folds' mean) and
    the agreement of both with the radiologists."""
    fold = patient_folds(images.patients, folds, seed)
    predicted = {column: np.zeros(len(images.names)) for column in SCORES}
    guess = {column: np.zeros(len(images.names)) for column in SCORES}
    fold_rules = []
    for k in range(folds):
        train, test = images.subset(fold != k), fold == k
        rules = fit_rules(train)
        fold_rules.append(rules)
        for column, values in predict(images.subset(test).features, rules).items():
            predicted[column][test] = values
            guess[column][test] = train.targets[column].mean()
    figures = {
        column: {
            "calibrated": agreement(predicted[column], images.targets[column]),
            "constant_guess": agreement(guess[column], images.targets[column]),
        }
        for column in SCORES
    }
    return {"fold": fold, "predicted": predicted, "constant_guess": guess, "fold_rules": fold_rules, "figures": figures}


def print_table(figures: dict) -> None:
    """Markdown table of MAE and Pearson per score and method."""
    print("| score | method | n | MAE | Pearson |")
    print("| --- | --- | --- | --- | --- |")
    for column, methods in figures.items():
        for method, values in methods.items():
            pearson = "-" if values["pearson"] is None else f"{values['pearson']:.3f}"
            print(f"| {column} | {method} | {values['n']} | {values['mae']:.3f} | {pearson} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--severity", required=True, help="severity.csv of the bundle's inference on the scored images")
    parser.add_argument("--scores", required=True, help="radiologists' scores: filename, geographic_extent, opacity")
    parser.add_argument("--metadata", required=True, help="metadata CSV with filename and patientid")
    parser.add_argument("--output", required=True, help="calibration JSON (bundle/models/severity_calibration.json)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds, by patient (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patients' fold assignment (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.force:
        raise SystemExit(f"error: {args.output} exists; add --force to replace it")

    images, skipped, input_rules = load_scored_images(args.severity, args.scores, args.metadata)
    for name, reason in sorted(skipped.items()):
        print(f"skipped {name}: {reason}")
    patients = len(set(images.patients))
    if patients < max(2, args.folds):
        raise SystemExit(
            f"error: {len(images.names)} usable scored images of {patients} patients: too few for the folds"
        )
    print(f"{len(images.names)} scored images of {patients} patients, {args.folds} folds by patient (seed {args.seed})")
    validation = cross_validate(images, args.folds, args.seed)
    input_scores = {
        "rules": input_rules,
        **{column: agreement(images.input_scores[column], images.targets[column]) for column in SCORES},
    }
    print_table(
        {
            column: {**methods, f"{input_rules} rules, as in the input table (no fit)": input_scores[column]}
            for column, methods in validation["figures"].items()
        }
    )
    rules = fit_rules(images)
    print(f"fitted on all {len(images.names)} images: {rules}")

    run_settings = _run_settings(args.severity)
    fit = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": "scripts/calibrate_severity.py",
        "severity_csv": args.severity,
        "scores_csv": args.scores,
        "metadata_csv": args.metadata,
        "bundle_version": run_settings.get("bundle_version"),
        "model_file": run_settings.get("model_file"),
        "model_sha256": run_settings.get("model_sha256"),
        "images": len(images.names),
        "patients": patients,
        "skipped": skipped,
        "folds": args.folds,
        "seed": args.seed,
        "objective": "mean absolute error of the image score (sum over both lungs); extent first, then opacity",
        "cross_validation": validation["figures"],
        "input_scores": input_scores,
        "fold_rules": [dataclasses.asdict(rule) for rule in validation["fold_rules"]],
        "fit_on_all_images": {
            column: agreement(values, images.targets[column])
            for column, values in predict(images.features, rules).items()
        },
    }
    write_json(args.output, calibration_content(rules, fit))
    print(f"calibration written to {args.output}")
    return 0


def _run_settings(severity_csv: str) -> dict:
    """Settings of the inference run beside ``severity_csv`` (its severity.json), {} when there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(severity_csv)), "severity.json")
    if not os.path.isfile(path):
        print(f"warning: {path} not found: the calibration will not name the weights it was fitted on")
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("settings", {})


def _number(text: str) -> float:
    """A CSV cell as a float; empty (not measurable) is NaN."""
    return float(text) if text not in ("", None) else math.nan


def _mae(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean absolute error over the last axis (images)."""
    return np.abs(predicted - truth).mean(axis=-1)


if __name__ == "__main__":
    sys.exit(main())

"""Severity calibration: the fit recovers known constants, cross-validation keeps each patient out of its own fit,
the calibration file round-trips, and score agreement counts and measures what it should."""

import csv
import json
import math

import calibrate_severity
import numpy as np
import pytest
from calibrate_severity import ScoredImages, cross_validate, fit_rules, patient_folds, predict

from scripts.score_agreement import agreement, read_scores, score_agreement
from scripts.severity import SeverityRules
from scripts.severity_calibration import calibration_content, load_calibration
from scripts.severity_handler import CSV_COLUMNS

TRUE_RULES = SeverityRules((6.0, 31.0, 57.0, 82.0), consolidation_min_density=0.45, white_out_min_dense_pct=35.0)


def synthetic_images(count: int, rules: SeverityRules = TRUE_RULES, seed: int = 0) -> ScoredImages:
    """``count`` images (two per patient) with random per-lung features, scored exactly by ``rules``."""
    rng = np.random.default_rng(seed)
    percent = rng.uniform(0, 100, (count, 2)) * (rng.random((count, 2)) > 0.1)  # a tenth of the lungs clear
    features = {
        "opacity_pct": percent.round(2),
        "opacity_density": np.where(percent > 0, rng.uniform(0, 1, (count, 2)), np.nan).round(3),
        "dense_opacity_pct": (rng.uniform(0, 100, (count, 2)) * (percent > 0)).round(2),
    }
    targets = {column: values.astype(float) for column, values in predict(features, rules).items()}
    return ScoredImages(
        names=[f"image{index}.png" for index in range(count)],
        patients=[f"patient{index // 2}" for index in range(count)],
        features=features,
        targets=targets,
        input_scores={column: np.zeros(count) for column in targets},
    )


def test_fit_recovers_known_constants():
    images = synthetic_images(100)
    fitted = fit_rules(images)
    assert fitted.extent_thresholds_pct == pytest.approx(TRUE_RULES.extent_thresholds_pct, abs=1.5)
    assert fitted.consolidation_min_density == pytest.approx(TRUE_RULES.consolidation_min_density, abs=0.02)
    assert fitted.white_out_min_dense_pct == pytest.approx(TRUE_RULES.white_out_min_dense_pct, abs=1.5)
    for column, values in predict(images.features, fitted).items():
        np.testing.assert_array_equal(values, images.targets[column])
    assert fit_rules(images) == fitted  # deterministic
    assert fitted.extent_dense_weight == 0.0  # extent follows the opacity % alone here: no weight is chosen


def test_fit_finds_the_weight_of_dense_opacity_in_the_extent():
    rules = SeverityRules((20.0, 90.0, 160.0, 230.0), 0.45, 35.0, extent_dense_weight=2.0)
    images = synthetic_images(200, rules, seed=3)
    fitted = fit_rules(images)
    assert fitted.extent_dense_weight == 2.0
    assert fitted.extent_thresholds_pct == pytest.approx(rules.extent_thresholds_pct, abs=4.0)
    np.testing.assert_array_equal(
        predict(images.features, fitted)["geographic_extent"], images.targets["geographic_extent"]
    )


def test_patient_folds_keep_each_patient_in_one_fold():
    patients = ["a", "a", "a", "b", "c", "c", "d", "e", "e", "f"]
    fold = patient_folds(patients, folds=3, seed=0)
    for patient in set(patients):
        assert len({fold[i] for i, name in enumerate(patients) if name == patient}) == 1
    assert sorted(np.bincount(fold)) in ([3, 3, 4], [2, 4, 4])  # balanced within one patient's images
    np.testing.assert_array_equal(fold, patient_folds(patients, folds=3, seed=0))
    with pytest.raises(ValueError):
        patient_folds(patients, folds=7, seed=0)


def test_cross_validation_never_lets_a_patient_score_itself():
    images = synthetic_images(60, seed=1)
    outlier = np.array([patient == "patient0" for patient in images.patients])
    images.targets["geographic_extent"][outlier] = [8.0, 0.0]  # far from what its features say
    images.targets["opacity_score"][outlier] = [6.0, 0.0]
    first = cross_validate(images, folds=5, seed=0)

    changed = images.subset(np.ones(len(images.names), bool))
    for column in changed.targets:
        changed.targets[column][outlier] = [2.0, 2.0]
    second = cross_validate(changed, folds=5, seed=0)

    np.testing.assert_array_equal(first["fold"], second["fold"])
    own_fold = first["fold"][outlier][0]
    assert (first["fold"][outlier] == own_fold).all()
    for column in images.targets:
        # the patient's own scores never reach its predictions or its constant guess ...
        for kind in ("predicted", "constant_guess"):
            np.testing.assert_array_equal(first[kind][column][outlier], second[kind][column][outlier])
        others = images.targets[column][first["fold"] != own_fold]
        assert first["constant_guess"][column][outlier] == pytest.approx(others.mean())
        # ... while they do reach the other folds' guesses
        assert not np.allclose(first["constant_guess"][column][~outlier], second["constant_guess"][column][~outlier])
    assert first["figures"]["geographic_extent"]["calibrated"]["n"] == 60


def write_csv(path, columns, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def calibration_inputs(folder, images: ScoredImages):
    """severity.csv (plus an error row and an unscored row), severity.json, scores and metadata CSVs."""
    rows = []
    for index, name in enumerate(images.names):
        row = {"image": name, "status": "ok", "message": "", "severity_rules": "published"}
        for column, values in images.targets.items():
            row[column] = int(values[index])
        for feature, values in images.features.items():
            for side, value in zip(("right", "left"), values[index]):
                row[f"{side}_{feature}"] = "" if math.isnan(value) else value
        rows.append(row)
    rows.append({"image": "broken.png", "status": "error", "message": "broken.png: cannot decode"})
    rows.append({**rows[0], "image": "unscored.png"})
    write_csv(folder / "severity.csv", CSV_COLUMNS, rows)
    settings = {"bundle_version": "9.9.9", "model_file": "models/model.pt", "model_sha256": "abc"}
    (folder / "severity.json").write_text(json.dumps({"settings": settings, "images": []}))
    scores = [
        {
            "filename": name,
            "geographic_extent": images.targets["geographic_extent"][index],
            "opacity": images.targets["opacity_score"][index],
        }
        for index, name in enumerate(images.names)
    ] + [{"filename": name, "geographic_extent": 4.0, "opacity": 3.0} for name in ("broken.png", "never_inferred.png")]
    write_csv(folder / "scores.csv", ["filename", "geographic_extent", "opacity"], scores)
    patients = [*images.patients, "patient_broken", "patient_never"]
    write_csv(
        folder / "metadata.csv",
        ["patientid", "filename"],
        [{"patientid": patient, "filename": row["filename"]} for patient, row in zip(patients, scores)],
    )
    # fmt: skip


def test_calibrate_command_writes_constants_figures_and_provenance(tmp_path, capsys):
    images = synthetic_images(40, seed=2)
    calibration_inputs(tmp_path, images)
    output = tmp_path / "severity_calibration.json"
    arguments = ["--severity", str(tmp_path / "severity.csv"), "--scores", str(tmp_path / "scores.csv"),
                 "--metadata", str(tmp_path / "metadata.csv"), "--output", str(output), "--folds", "4"]  # fmt: skip
    assert calibrate_severity.main(arguments) == 0
    printed = capsys.readouterr().out
    assert "skipped broken.png: status error" in printed and "skipped never_inferred.png" in printed
    content = json.loads(output.read_text())
    fit = content["fit"]
    assert (fit["images"], fit["patients"], fit["folds"]) == (40, 20, 4)
    assert set(fit["skipped"]) == {"broken.png", "never_inferred.png"}
    assert (fit["model_sha256"], fit["bundle_version"]) == ("abc", "9.9.9")
    for column in ("geographic_extent", "opacity_score"):
        figures = fit["cross_validation"][column]
        assert figures["calibrated"]["n"] == figures["constant_guess"]["n"] == 40
        assert figures["calibrated"]["mae"] < figures["constant_guess"]["mae"]
        assert fit["fit_on_all_images"][column]["n"] == 40 and fit["fit_on_all_images"][column]["mae"] < 0.1
    assert len(fit["fold_rules"]) == 4

    rules, record = load_calibration(str(output), model_sha256="abc")
    assert rules == SeverityRules(**content["rules"]) and record["rules"] == "calibrated" and record["model_matches"]
    assert load_calibration(str(output), model_sha256="other")[1]["model_matches"] is False

    with pytest.raises(SystemExit, match="exists"):
        calibrate_severity.main(arguments)
    assert calibrate_severity.main([*arguments, "--force"]) == 0
    again = json.loads(output.read_text())
    assert again["rules"] == content["rules"] and again["fit"]["cross_validation"] == fit["cross_validation"]


def test_missing_or_foreign_calibration_files(tmp_path):
    rules, record = load_calibration(str(tmp_path / "missing.json"))
    assert rules is None and record["rules"] == "published" and "not found" in record["reason"]
    assert record["extent_thresholds_pct"] == [0.0, 25.0, 50.0, 75.0]
    content = calibration_content(TRUE_RULES, {})
    content["features"]["dense_level"] = 0.9
    (tmp_path / "foreign.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="refit"):
        load_calibration(str(tmp_path / "foreign.json"))
    with pytest.raises(ValueError):
        SeverityRules((50.0, 25.0, 60.0, 70.0), 0.5, 10.0)  # thresholds out of order


def test_score_agreement_matches_by_file_name(tmp_path):
    write_csv(tmp_path / "scores.csv", ["filename", "geographic_extent", "opacity"],
              [{"filename": "a.png", "geographic_extent": 2, "opacity": 1},
               {"filename": "b.png", "geographic_extent": 6, "opacity": 4.5},
               {"filename": "c.png", "geographic_extent": 1, "opacity": 1}])  # fmt: skip
    scores = read_scores(str(tmp_path / "scores.csv"))
    columns = ("image", "status", "geographic_extent", "opacity_score", "severity_rules")
    rows = [
        dict(zip(columns, values))
        for values in (("a.png", "ok", "3", "1", "calibrated"), ("b.png", "ok", "8", "4", "calibrated"),
                       ("c.png", "error", "", "", ""), ("d.png", "ok", "0", "0", "calibrated"))
    ]  # fmt: skip
    result = score_agreement(rows, scores)
    assert (result["images"], result["images_ok"], result["matched"], result["unscored_images"]) == (4, 3, 2, 1)
    assert result["scores_without_image"] == 0 and result["severity_rules"] == ["calibrated"]
    assert result["geographic_extent"] == {"n": 2, "mae": 1.5, "pearson": 1.0}
    assert result["opacity_score"] == {"n": 2, "mae": 0.25, "pearson": 1.0}
    assert agreement([1, 1], [0, 2]) == {"n": 2, "mae": 1.0, "pearson": None}  # no Pearson of a constant

    (tmp_path / "bad.csv").write_text("filename,geographic_extent\na.png,2\n")
    with pytest.raises(ValueError, match="opacity"):
        read_scores(str(tmp_path / "bad.csv"))
    (tmp_path / "twice.csv").write_text("filename,geographic_extent,opacity\na.png,2,1\na.png,3,1\n")
    with pytest.raises(ValueError, match="scored twice"):
        read_scores(str(tmp_path / "twice.csv"))

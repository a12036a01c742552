"""scripts/cv_summary.py: the cross-validation table from the evaluate workflow's metrics.csv files."""

import json

import pytest


def test_cv_summary_averages_the_opacity_annotated_images_of_each_fold(tmp_path, capsys):
    import cv_summary

    columns = ["image", "lung_dice", "opacity_dice", "pred_opacity_pct", "label_opacity_pct", "extent_abs_error"]
    folds = {
        "cv_fold0": [["a.png", 0.9, 0.5, 40, 50, 1], ["b.png", 0.95, "", 30, "", ""], ["c.png", 0.8, 1.0, 0, 0, 0]],
        "cv_fold1": [["d.png", 0.7, 0.2, 60, 20, 3]],
    }  # b.png: lung-only label, no opacity figures
    for name, rows in folds.items():
        (tmp_path / name).mkdir()
        lines = [",".join(columns)] + [",".join(str(value) for value in row) for row in rows]
        (tmp_path / name / "metrics.csv").write_text("\n".join(lines) + "\n")
    output = tmp_path / "summary.json"
    assert cv_summary.main([str(tmp_path / name) for name in folds] + ["--output", str(output)]) == 0
    table = json.loads(output.read_text())
    assert table["cv_fold0"]["opacity_images"] == 2 and table["cv_fold0"]["opacity_dice"] == pytest.approx(0.75)
    assert table["cv_fold0"]["opacity_dice_where_annotated_opacity"] == pytest.approx(0.5)
    assert table["cv_fold0"]["extent_mae"] == pytest.approx(0.5) and table["cv_fold0"]["opacity_pct_mae"] == 5
    assert table["cv_fold0"]["lung_dice"] == pytest.approx(0.8833333)
    assert table["all folds"]["opacity_images"] == 3 and table["all folds"]["opacity_dice"] == pytest.approx(1.7 / 3)
    assert "| cv_fold1 | 1 | 0.200 |" in capsys.readouterr().out

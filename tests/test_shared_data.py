"""Tests on the real radiographs of ../shared/data: preparation, a short training, and the shipped weights.

They need the folder beside the repository. Without it they are skipped with that reason; in CI (CI=true) a
missing folder is a failure, so these tests cannot silently stop running there.
"""

import json
import os
from pathlib import Path

import pytest

from conftest import ROOT, config_files, run_bundle

SHARED = ROOT.parent / "shared" / "data"
COHEN = SHARED / "cohen-cxr"


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not COHEN.is_dir():
        message = f"{SHARED} is missing: the test_shared_* tests need the real radiographs"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED


@pytest.fixture(scope="module")
def shared_prepared(shared_data, tmp_path_factory) -> Path:
    import prepare_data

    output = tmp_path_factory.mktemp("shared_prepared")
    code = prepare_data.main(
        ["--images", str(COHEN / "images"), "--masks", str(COHEN / "lung_masks"),
         "--extra-masks", str(COHEN / "lung_masks_lungvae"), "--labelme", str(shared_data / "opacity-labelme"),
         "--metadata", str(COHEN / "metadata.csv"), "--output", str(output), "--holdout-opacity-fold", "0"]
    )  # fmt: skip
    assert code == 0
    return output


def test_shared_preparation_splits_by_patient(shared_prepared):
    datalist = json.loads((shared_prepared / "datalist.json").read_text())
    training, validation = datalist["training"], datalist["validation"]
    assert len(training) + len(validation) >= 270
    assert not {s["patient_id"] for s in training} & {s["patient_id"] for s in validation}
    assert sum(s["source"] == "labelme" for s in training + validation) == 10
    assert any(s["source"] == "labelme" for s in validation)  # fold 0 of the opacity annotations is held out
    assert not any(s["source"] == "extra_mask" for s in validation)  # lower-trust masks never validate
    report = json.loads((shared_prepared / "preparation_report.json").read_text())
    assert report["skipped"] == [] and report["used"] == len(training) + len(validation)


def test_shared_training_two_epochs_at_reduced_size(shared_prepared, tmp_path):
    result = run_bundle(
        "run", "training", "--config_file", config_files("training"),
        "--dataset_dir", str(shared_prepared), "--output_dir", str(tmp_path),
        "--image_size", "[64,64]", "--num_epochs", "2", "--val_interval", "2", "--batch_size", "16",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "checkpoint_epoch=2.pt").is_file() and (tmp_path / "model.pt").is_file()
    assert "val_lung_dice" in result.stdout


# Patients of these images are in the validation split of the shipped model (prepare_data.py seed 0): never trained on.
HELD_OUT_IMAGES = [
    "02b76460.jpg", "1-s2.0-S0735675720302746-gr1_lrg.jpg", "1-s2.0-S1684118220300372-gr1_lrg-b.png",
    "1-s2.0-S1931312820301852-gr1_lrg-b.png", "1-s2.0-S2387020620301959-gr4_lrg-a.png",
    "1-s2.0-S2387020620301959-gr4_lrg-b.png", "10.1016-slash-j.crad.2020.04.002-a.png", "1052b0fe.jpg",
    "11547_2020_1202_Fig1_HTML-b.png", "289cb15b.jpg", "701_2020_4374_Fig2_HTML.png", "730a0b8f.jpg", "7c0d0e1d.jpg",
    "8da14fff.jpg", "90986ce4.jpg", "9eca9ade.jpg",
]  # fmt: skip
SHIPPED_LUNG_DICE_FLOOR = 0.93  # the shipped 0.6.0 weights: 0.962 (lowest image 0.939); 0.4.0: 0.959 (0.934)


def test_shared_shipped_weights_segment_held_out_lungs(shared_data, tmp_path):
    import prepare_data

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in HELD_OUT_IMAGES:
        (images / name).symlink_to(COHEN / "images" / name)
        mask_name = name.rsplit(".", 1)[0] + ".png"
        (masks / mask_name).symlink_to(COHEN / "lung_masks" / mask_name)
    prepared = tmp_path / "prepared"
    code = prepare_data.main(
        ["--images", str(images), "--masks", str(masks), "--output", str(prepared), "--val-fraction", "1.0"]
    )
    assert code == 0
    result = run_bundle(
        "run", "--config_file", config_files("evaluate"),
        "--dataset_dir", str(prepared), "--output_dir", str(tmp_path / "evaluation"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "evaluation" / "metrics_summary.json").read_text())
    assert summary["images"] == len(HELD_OUT_IMAGES)
    assert summary["lung_dice"]["mean"] >= SHIPPED_LUNG_DICE_FLOOR


QUEX = SHARED / "covid-qu-ex"
# measured with the shipped 0.6.0 weights: opacity Dice 0.671 on these 32 COVID-19 images, predicted opacity 3.23 % of
# the lung on average on the 16 normals (0.4.0 weights: 0.642 and 4.74 %, which these bounds refuse; 0.3.0: 0.417 and
# 15.4 %)
QUEX_COVID_DICE_FLOOR = 0.65
QUEX_NORMAL_OPACITY_PCT_CEILING = 4.0


def quex_validation_subset(count: int, image_class: str) -> list[str]:
    """The first ``count`` images (by name) of one class in the authors' val split: never trained on."""
    import csv

    with open(QUEX / "index.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows = [row for row in rows if row["published_split"] == "val" and row["class"] == image_class]
    return sorted(row["image"] for row in rows)[:count]


def test_shared_shipped_weights_find_covid_qu_ex_opacity(shared_data, tmp_path):
    import prepare_data

    names = quex_validation_subset(32, "COVID-19") + quex_validation_subset(16, "Normal")
    for folder in ("images", "lung_masks", "infection_masks"):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).symlink_to(QUEX / folder / name)
    (tmp_path / "split.csv").write_text("image,published_split\n" + "".join(f"{name},val\n" for name in names))
    spec = (
        f"name=covid-qu-ex,images={tmp_path / 'images'},lungs={tmp_path / 'lung_masks'},"
        f"opacity={tmp_path / 'infection_masks'},split={tmp_path / 'split.csv'}"
    )
    assert prepare_data.main(["--mask-source", spec, "--output", str(tmp_path / "prepared")]) == 0
    result = run_bundle(
        "run", "--config_file", config_files("evaluate"),
        "--dataset_dir", str(tmp_path / "prepared"), "--datalist_key", "test",
        "--output_dir", str(tmp_path / "evaluation"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    groups = json.loads((tmp_path / "evaluation" / "metrics_summary.json").read_text())["groups"]
    covid, normal = groups["covid-qu-ex, present"], groups["covid-qu-ex, clear"]
    assert covid["images"] == 32 and normal["images"] == 16
    assert covid["opacity_dice"]["mean"] >= QUEX_COVID_DICE_FLOOR
    assert normal["pred_opacity_pct"]["mean"] <= QUEX_NORMAL_OPACITY_PCT_CEILING

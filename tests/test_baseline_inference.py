"""scripts/baseline_inference.py, the hand-written loop the benchmark times the bundle against, gives its outputs."""

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import phantoms
from conftest import PHANTOM_IMAGE_SIZE, ROOT, config_files, run_bundle

# (file name, rows, columns): 16-bit grey PNG, 8-bit RGB PNG, JPEG, none of them square, so a transposed mask fails
PHANTOM_FILES = (("a_png16.png", 200, 240), ("b_rgb.png", 240, 200), ("c_jpeg.jpg", 180, 260))
PERCENT_COLUMNS = ("opacity_pct", "right_opacity_pct", "left_opacity_pct", "right_dense_opacity_pct",
                   "left_dense_opacity_pct")  # fmt: skip
SCORE_COLUMNS = ("image", "status", "right_extent", "left_extent", "right_opacity_degree", "left_opacity_degree",
                 "geographic_extent", "opacity_score", "rows", "columns", "severity_rules")  # fmt: skip


def read_rows(output_dir):
    with open(output_dir / "severity.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def mask(output_dir, stem, kind):
    return np.asarray(Image.open(output_dir / stem / f"{stem}_{kind}.png"))


@pytest.fixture(scope="module")
def bundle_and_baseline(phantom_model, tmp_path_factory):
    """Three phantoms through the bundle's inference command and through the baseline, with the same weights."""
    import baseline_inference
    import export_onnx

    folder = tmp_path_factory.mktemp("baseline_inputs")
    for seed, (name, rows, columns) in enumerate(PHANTOM_FILES):
        image = phantoms.make_phantom(rows, columns, seed=40 + seed).image
        if name.endswith(".jpg"):
            phantoms.write_jpeg(folder / name, image)
        else:
            phantoms.write_png(folder / name, image, bits=16 if "16" in name else 8, rgb="rgb" in name)
    bundle_output = tmp_path_factory.mktemp("bundle_outputs")
    result = run_bundle(
        "run", "--config_file", config_files("inference"), "--dataset_dir", str(folder),
        "--output_dir", str(bundle_output), "--ckpt_path", str(phantom_model),
        "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    onnx_path = tmp_path_factory.mktemp("baseline_model") / "model.onnx"
    assert export_onnx.main(["--checkpoint", str(phantom_model), "--output", str(onnx_path),
                             "--size", str(PHANTOM_IMAGE_SIZE)]) == 0  # fmt: skip
    baseline_output = tmp_path_factory.mktemp("baseline_outputs")
    arguments = ["--images", str(folder), "--onnx", str(onnx_path), "--checkpoint", str(phantom_model)]
    assert baseline_inference.main([*arguments, "--output", str(baseline_output)]) == 0
    masks_only = tmp_path_factory.mktemp("baseline_masks_only")
    program = (  # the command line, in a fresh process that then names the frameworks it imported
        f"import sys, baseline_inference; code = baseline_inference.main({[*arguments, '--output', str(masks_only)]!r}"
        " + ['--no-overlays']); print('IMPORTED', sorted(set(sys.modules) & {'monai', 'torch', 'ignite'}))"
        "; sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT / "scripts", capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return bundle_output, baseline_output, masks_only, result.stdout


def test_masks_and_figures_are_the_bundles(bundle_and_baseline):
    """Same columns and rows; masks of the input's size agreeing on >= 99.9 % of pixels; figures within 0.1 point."""
    bundle_output, baseline_output, _, _ = bundle_and_baseline
    bundle_columns, bundle_rows = read_rows(bundle_output)
    baseline_columns, baseline_rows = read_rows(baseline_output)
    assert baseline_columns == bundle_columns
    assert [row["image"] for row in baseline_rows] == [name for name, _, _ in PHANTOM_FILES]
    for bundle_row, baseline_row, (name, rows, columns) in zip(bundle_rows, baseline_rows, PHANTOM_FILES):
        assert baseline_row["status"] == bundle_row["status"] == "ok", (bundle_row["message"], baseline_row["message"])
        stem = name.split(".")[0]
        for kind in ("lung", "opacity"):
            baseline_mask = mask(baseline_output, stem, kind)
            assert baseline_mask.shape == (rows, columns) and set(np.unique(baseline_mask)) <= {0, 255}
            agreement = np.mean(baseline_mask == mask(bundle_output, stem, kind))
            assert agreement >= 0.999, (name, kind, agreement)
        assert mask(baseline_output, stem, "lung").any()
        for column in PERCENT_COLUMNS:
            assert abs(float(baseline_row[column]) - float(bundle_row[column])) <= 0.1, (name, column)
        assert [baseline_row[column] for column in SCORE_COLUMNS] == [bundle_row[column] for column in SCORE_COLUMNS]
        overlay = mask(baseline_output, stem, "overlay")
        assert overlay.shape == (rows, columns, 3)


def test_no_overlays_writes_the_masks_and_table_only_without_monai(bundle_and_baseline):
    """--no-overlays: the same table and masks, and no overlay PNG; the command never imports MONAI or PyTorch."""
    _, baseline_output, masks_only, printed = bundle_and_baseline
    assert "IMPORTED []" in printed, printed
    assert read_rows(masks_only) == read_rows(baseline_output)
    assert not list(masks_only.glob("*/*_overlay.png"))
    for name, _, _ in PHANTOM_FILES:
        stem = name.split(".")[0]
        for kind in ("lung", "opacity"):
            np.testing.assert_array_equal(mask(masks_only, stem, kind), mask(baseline_output, stem, kind))


def test_defaults_are_the_bundles():
    """The baseline's copies of the bundle's settings: what the benchmark compares must be the same job."""
    import baseline_inference
    import yaml

    common = yaml.safe_load((ROOT / "bundle" / "configs" / "common.yaml").read_text())
    inference = yaml.safe_load((ROOT / "bundle" / "configs" / "inference.yaml").read_text())
    assert baseline_inference.NETWORK_SIZE == common["image_size"][0] == common["image_size"][1]
    assert baseline_inference.MIN_LUNG_FRACTION == common["min_lung_fraction"]
    assert baseline_inference.OVERLAY_MAX_SIDE == inference["overlay_max_side"]

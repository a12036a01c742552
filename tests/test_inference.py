"""The documented inference command: output contract, orientation across formats, bad input, nothing lost."""

import csv
import json

import nibabel
import numpy as np
import pytest
from PIL import Image

import phantoms
from conftest import BUNDLE, PHANTOM_IMAGE_SIZE, config_files, run_bundle

REQUIRED_COLUMNS = [
    "image", "status", "message", "warning", "lung_area_px", "opacity_area_px", "opacity_pct", "right_opacity_pct",
    "left_opacity_pct", "geographic_extent", "opacity_score", "lung_area_cm2", "opacity_area_cm2",
]  # fmt: skip
ROWS, COLUMNS = 200, 240
SPACING_MM = (0.2, 0.1)


def infer(dataset_dir, output_dir, model, *extra):
    return run_bundle(
        "run", "--config_file", config_files("inference"), "--dataset_dir", str(dataset_dir),
        "--output_dir", str(output_dir), "--ckpt_path", str(model),
        "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]", *extra,
    )  # fmt: skip


def read_rows(output_dir):
    with open(output_dir / "severity.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def mask(output_dir, stem, kind):
    return np.asarray(Image.open(output_dir / stem / f"{stem}_{kind}.png"))


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def mixed_folder_run(phantom_model, tmp_path_factory):
    """One phantom in every supported format, plus bad files, through the documented inference command."""
    folder = tmp_path_factory.mktemp("inference_inputs")
    phantom = phantoms.make_phantom(ROWS, COLUMNS, seed=123)
    image = phantom.image
    phantoms.write_png(folder / "a_png8.png", image)
    eight_bit = np.asarray(Image.open(folder / "a_png8.png"))
    Image.fromarray(eight_bit.astype(np.uint16) * 257).save(folder / "a_png16.png")  # the same picture in 16 bits
    phantoms.write_png(folder / "a_rgb.png", image, rgb=True)
    phantoms.write_jpeg(folder / "a_jpeg.jpg", image)
    phantoms.write_dicom(folder / "a_mono2.dcm", image, bits=16, spacing_mm=SPACING_MM)
    phantoms.write_dicom(folder / "a_mono1.dcm", image, bits=12, photometric="MONOCHROME1", spacing_mm=SPACING_MM)
    phantoms.write_dicom(folder / "a_jpeg2000.dcm", image, bits=12, transfer_syntax="jpeg2000")
    phantoms.write_dicom(folder / "a_noextension", image, transfer_syntax="rle")
    phantoms.write_nifti(folder / "a_nifti.nii.gz", image, spacing_mm=SPACING_MM)
    (folder / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "c_empty.jpg").write_bytes(b"")
    (folder / "c_notes.txt").write_text("not an image")
    nibabel.save(nibabel.Nifti1Image(np.zeros((32, 32, 5), np.float32), np.eye(4)), str(folder / "c_volume.nii.gz"))
    Image.fromarray(np.full((ROWS, COLUMNS), 128, np.uint8)).save(folder / "c_blank.png")

    output = tmp_path_factory.mktemp("inference_outputs")
    (output / "keep_me.txt").write_text("user file")
    (output / "z_earlier_result").mkdir()
    (output / "z_earlier_result" / "z_earlier_result_lung.png").write_bytes(b"earlier output")
    result = infer(folder, output, phantom_model)
    return folder, output, result, phantom


def test_output_contract(mixed_folder_run):
    folder, output, result, _ = mixed_folder_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_rows(output)
    header = list(rows[0])
    assert header[: len(REQUIRED_COLUMNS)] == REQUIRED_COLUMNS
    assert [row["image"] for row in rows] == sorted(path.name for path in folder.iterdir())  # one row each, in order
    for row in rows:
        if row["status"] != "ok":
            continue
        stem = row["image"].split(".")[0]
        for kind in ("lung", "opacity"):
            written = mask(output, stem, kind)
            assert written.shape == (ROWS, COLUMNS) and written.dtype == np.uint8
            assert set(np.unique(written)) <= {0, 255}
        overlay = Image.open(output / stem / f"{stem}_overlay.png")
        assert overlay.size == (COLUMNS, ROWS) and overlay.mode == "RGB"
    summary = json.loads((output / "severity.json").read_text())
    assert (
        summary["settings"]["bundle_version"]
        == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    )
    assert summary["settings"]["device"] == "cpu"
    rules = summary["settings"]["severity_rules"]  # the shipped calibration, fitted on other weights than the phantom's
    assert rules["rules"] == "calibrated" and rules["model_matches"] is False
    assert len(rules["extent_thresholds_pct"]) == 4
    assert {row["severity_rules"] for row in rows if row["status"] == "ok"} == {"calibrated"}
    assert [entry["image"] for entry in summary["images"]] == [row["image"] for row in rows]


def test_masks_overlap_truth_and_agree_across_formats(mixed_folder_run):
    _, output, _, phantom = mixed_folder_run
    reference = mask(output, "a_png8", "lung") > 0
    assert dice(reference, phantom.lung) > 0.8
    assert not reference[phantom.marker].any()  # the top-left marker is never lung
    for stem in ("a_png16", "a_rgb", "a_jpeg", "a_mono2", "a_mono1", "a_jpeg2000", "a_noextension", "a_nifti"):
        assert dice(mask(output, stem, "lung") > 0, reference) > 0.97, stem
    assert np.array_equal(mask(output, "a_png16", "lung"), mask(output, "a_png8", "lung"))  # bit depth changes nothing


def test_per_lung_areas_follow_the_phantom(mixed_folder_run):
    _, output, _, phantom = mixed_folder_run
    row = {row["image"]: row for row in read_rows(output)}["a_png8.png"]
    assert abs(int(row["right_lung_area_px"]) - phantom.right_lung.sum()) < 0.15 * phantom.right_lung.sum()
    assert abs(int(row["left_lung_area_px"]) - phantom.left_lung.sum()) < 0.15 * phantom.left_lung.sum()


def writer_row(tmp_path, class_map, **writer_args):
    """Feed one hand-made class map to the severity handler, as the inference evaluator does."""
    import torch
    from monai.data import MetaTensor

    from scripts.severity_handler import SeverityWriter

    writer = SeverityWriter(str(tmp_path), fail_if_none_ok=False, **writer_args)
    writer.start()
    rows, columns = class_map.shape
    meta = {"filename_or_obj": str(tmp_path / "case.png"), "spacing_mm": (float("nan"),) * 2, "error": ""}
    image = MetaTensor(torch.zeros(1, 8, 8), meta=meta)
    # a plausible radiograph for the input gate: dark lungs, brighter body, a few dozen grey levels
    grey = np.where(class_map > 0, 60, 170) + np.arange(columns)[None, :] % 24
    display = torch.as_tensor(grey[None].astype(np.uint8))
    row = writer.add(image, torch.as_tensor(class_map[None]), display)
    writer.completed()
    return row


def test_a_lung_on_the_image_left_is_the_patients_right(tmp_path):
    class_map = np.zeros((100, 120), np.uint8)
    class_map[20:80, 10:50] = 1
    class_map[20:40, 10:50] = 2  # a third of the lung on the image's left
    class_map[20:80, 70:100] = 1  # a smaller clear lung on the image's right
    row = writer_row(tmp_path, class_map)
    assert row["status"] == "ok"
    assert row["right_lung_area_px"] == 2400 and row["left_lung_area_px"] == 1800
    assert row["right_opacity_pct"] == pytest.approx(100 / 3, abs=0.01) and row["left_opacity_pct"] == 0
    lung = mask(tmp_path, "case", "lung") > 0
    assert lung[20:80, 10:50].all() and lung[20:80, 70:100].all() and lung.sum() == 4200


def test_rows_follow_the_calibration_file_and_settings_record_it(tmp_path):
    from scripts.severity import SeverityRules
    from scripts.severity_calibration import calibration_content, file_sha256

    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    rules = SeverityRules((10.0, 20.0, 30.0, 40.0), consolidation_min_density=0.5, white_out_min_dense_pct=20.0)
    calibration = tmp_path / "severity_calibration.json"
    calibration.write_text(json.dumps(calibration_content(rules, {"images": 3, "model_sha256": file_sha256(model)})))
    class_map = np.zeros((100, 120), np.uint8)
    class_map[20:80, 10:50] = 1
    class_map[20:40, 10:50] = 2  # a third of the lung: published extent 2, fitted extent 3
    class_map[20:80, 70:110] = 1  # a clear left lung

    settings = {"model_file": str(model)}
    row = writer_row(tmp_path / "fitted", class_map, severity_calibration=str(calibration), settings=settings)
    assert row["status"] == "ok" and row["severity_rules"] == "calibrated"
    assert (row["right_extent"], row["geographic_extent"], row["right_opacity_degree"]) == (3, 3, 1)
    recorded = json.loads((tmp_path / "fitted" / "severity.json").read_text())["settings"]["severity_rules"]
    assert recorded["rules"] == "calibrated" and recorded["extent_thresholds_pct"] == [10.0, 20.0, 30.0, 40.0]
    assert recorded["consolidation_min_density"] == 0.5 and recorded["white_out_min_dense_pct"] == 20.0
    assert recorded["model_matches"] is True and recorded["fit"]["images"] == 3
    assert read_rows(tmp_path / "fitted")[0]["severity_rules"] == "calibrated"

    row = writer_row(tmp_path / "published", class_map, severity_calibration=str(tmp_path / "missing.json"))
    assert row["severity_rules"] == "published" and row["right_extent"] == 2
    recorded = json.loads((tmp_path / "published" / "severity.json").read_text())["settings"]["severity_rules"]
    assert recorded["rules"] == "published" and "not found" in recorded["reason"]


def test_no_lung_found_is_an_error_row(tmp_path):
    row = writer_row(tmp_path, np.zeros((100, 120), np.uint8))
    assert row["status"] == "error" and "no lung field found" in row["message"] and "case.png" in row["message"]


def test_areas_in_cm2_follow_pixel_spacing(mixed_folder_run):
    rows = {row["image"]: row for row in read_rows(mixed_folder_run[1])}
    pixel_cm2 = SPACING_MM[0] * SPACING_MM[1] / 100
    for name in ("a_mono2.dcm", "a_mono1.dcm", "a_nifti.nii.gz"):
        row = rows[name]
        assert float(row["lung_area_cm2"]) == pytest.approx(int(row["lung_area_px"]) * pixel_cm2, abs=0.01)
        assert float(row["opacity_area_cm2"]) == pytest.approx(int(row["opacity_area_px"]) * pixel_cm2, abs=0.01)
    assert rows["a_png8.png"]["lung_area_cm2"] == ""  # no spacing in a PNG


@pytest.mark.parametrize(
    "name, problem",
    [
        ("c_corrupt.png", "cannot decode"),
        ("c_empty.jpg", "empty"),
        ("c_notes.txt", "unsupported file type"),
        ("c_volume.nii.gz", "3D"),
        ("c_blank.png", "blank"),
    ],
)
def test_bad_inputs_get_an_error_row_and_the_batch_goes_on(mixed_folder_run, name, problem):
    _, output, _, _ = mixed_folder_run
    rows = {row["image"]: row for row in read_rows(output)}
    assert rows[name]["status"] == "error"
    assert name in rows[name]["message"] and problem in rows[name]["message"]
    assert not (output / name.split(".")[0]).exists()
    assert sum(row["status"] == "ok" for row in rows.values()) == 9


def test_existing_outputs_are_kept(mixed_folder_run):
    _, output, _, _ = mixed_folder_run
    assert (output / "keep_me.txt").read_text() == "user file"
    assert (output / "z_earlier_result" / "z_earlier_result_lung.png").read_bytes() == b"earlier output"
    assert not [path for path in output.rglob("*") if path.name.startswith(".tmp-") or path.suffix == ".partial"]


def test_no_usable_file_or_no_folder_exits_non_zero(phantom_model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    result = infer(bad, tmp_path / "out_bad", phantom_model)
    assert result.returncode != 0 and "none of the 1 input files could be processed" in result.stdout + result.stderr
    assert read_rows(tmp_path / "out_bad")[0]["status"] == "error"

    empty = tmp_path / "empty"
    empty.mkdir()
    result = infer(empty, tmp_path / "out_empty", phantom_model)
    assert result.returncode != 0 and "holds no file to process" in result.stderr

    result = infer(tmp_path / "missing", tmp_path / "out_missing", phantom_model)
    assert result.returncode != 0 and "does not exist" in result.stderr


def test_most_probable_class_matches_monai_argmax_ties_included():
    import torch
    from monai.transforms import AsDiscreted

    from scripts.transforms import MostProbableClassd

    probabilities = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))
    probabilities[:, :5] = 0.5  # three-way ties
    probabilities[2, 5:10] = probabilities[1, 5:10]  # ties between lung and opacity
    expected = AsDiscreted(keys="pred", argmax=True)({"pred": probabilities})["pred"]
    assert torch.equal(MostProbableClassd(keys="pred")({"pred": probabilities})["pred"], expected)


def test_onnx_export_gives_the_pytorch_outputs(phantom_model, tmp_path):
    """scripts/export_onnx.py writes a model whose ONNX Runtime logits equal PyTorch's, as does the in-memory one."""
    import export_onnx
    import onnxruntime
    import torch
    from monai.networks.nets import FlexibleUNet

    from scripts.checkpoints import state_dict_of
    from scripts.onnx_runtime import OnnxRuntimeNetwork

    path = tmp_path / "model.onnx"
    assert export_onnx.main(["--checkpoint", str(phantom_model), "--output", str(path), "--size", "64"]) == 0
    network = FlexibleUNet(spatial_dims=2, in_channels=1, out_channels=3, backbone="resnet18", pretrained=False)
    network.load_state_dict(state_dict_of(torch.load(phantom_model, map_location="cpu", weights_only=True)))
    network.eval()
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(images).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = np.concatenate([session.run(None, {"image": image[None].numpy()})[0] for image in images])
    assert np.abs(exported - expected).max() < 1e-3 * np.abs(expected).max()
    assert np.abs(OnnxRuntimeNetwork(network)(images).numpy() - expected).max() < 1e-3 * np.abs(expected).max()
    with pytest.raises(SystemExit):  # an existing file is never overwritten
        export_onnx.main(["--checkpoint", str(phantom_model), "--output", str(path)])


def test_batched_pytorch_run_gives_the_masks_of_the_single_image_onnx_run(mixed_folder_run, phantom_model, tmp_path):
    """Batch 4 on PyTorch and batch 1 on ONNX Runtime (the CPU default) agree on every input's rows and masks."""
    folder, single_output, _, _ = mixed_folder_run
    result = infer(folder, tmp_path, phantom_model, "--runtime", "torch", "--batch_size", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    single_rows, batched_rows = read_rows(single_output), read_rows(tmp_path)
    assert [(row["image"], row["status"]) for row in batched_rows] == [
        (row["image"], row["status"]) for row in single_rows
    ]
    compared = 0
    for row in single_rows:
        if row["status"] != "ok":
            continue
        stem = row["image"].split(".")[0]
        for kind in ("lung", "opacity"):
            agreement = np.mean(mask(single_output, stem, kind) == mask(tmp_path, stem, kind))
            assert agreement > 0.999, (row["image"], kind, agreement)
            compared += 1
    assert compared >= 16


def rerun_with_same_masks_and_table(mixed_folder_run, phantom_model, output, *options) -> list[str]:
    """Infer the mixed folder again into ``output`` with ``options``: the same table and masks as the first run;
    returns the stems of the ok rows."""
    folder, full_output, _, _ = mixed_folder_run
    result = infer(folder, output, phantom_model, *options)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_rows(output) == read_rows(full_output)
    ok = [row["image"].split(".")[0] for row in read_rows(output) if row["status"] == "ok"]
    assert ok
    for stem in ok:
        for kind in ("lung", "opacity"):
            np.testing.assert_array_equal(mask(output, stem, kind), mask(full_output, stem, kind))
    return ok


def test_overlays_can_be_left_out(mixed_folder_run, phantom_model, tmp_path):
    """--write_overlays false writes the same masks and table, and no overlay PNG."""
    rerun_with_same_masks_and_table(mixed_folder_run, phantom_model, tmp_path, "--write_overlays", "false")
    assert not list(tmp_path.glob("*/*_overlay.png"))


def test_overlays_of_larger_radiographs_are_shrunk_to_overlay_max_side(mixed_folder_run, phantom_model, tmp_path):
    """--overlay_max_side shrinks the overlay (aspect kept) and nothing else: same masks and table."""
    ok = rerun_with_same_masks_and_table(mixed_folder_run, phantom_model, tmp_path, "--overlay_max_side", "120")
    for stem in ok:
        with Image.open(tmp_path / stem / f"{stem}_overlay.png") as overlay:
            assert max(overlay.size) == 120 and abs(overlay.size[0] / overlay.size[1] - COLUMNS / ROWS) < 0.02
            pixels = np.asarray(overlay.convert("RGB"))
        assert (pixels == (0, 220, 255)).all(axis=2).any()  # the lung outline is drawn at the smaller size
    assert json.loads((tmp_path / "severity.json").read_text())["settings"]["overlay_max_side"] == 120

"""Training inputs a user relies on: LabelMe labels matched strictly, invalid polygons repaired or refused, one
LabelMe file per image, checkpoints that survive a kill mid-write, and a best model that a resume never worsens."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import phantoms
import prepare_data
from conftest import BUNDLE, config_files, config_paths, run_bundle
from scripts.checkpoints import RECORD_KEY, latest_checkpoint
from scripts.labelme import read_labelme
from scripts.radiograph_io import RadiographError

RIGHT = [[10, 10], [49, 10], [49, 89], [10, 89]]
LEFT = [[70, 10], [109, 10], [109, 89], [70, 89]]


def write_labelme(path, shapes, rows=100, columns=120, image_path="image.png") -> str:
    """A LabelMe file of (label, points[, shape_type]) shapes beside a phantom image ``image_path``."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    image = os.path.join(os.path.dirname(str(path)), image_path)
    if not os.path.exists(image):
        phantoms.write_png(image, phantoms.make_phantom(rows, columns, seed=2).image)
    document = {
        "version": "5.4.1",
        "flags": {},
        "imagePath": image_path,
        "imageData": None,
        "imageHeight": rows,
        "imageWidth": columns,
        "shapes": [
            {
                "label": shape[0],
                "points": shape[1],
                "group_id": None,
                "flags": {},
                "shape_type": shape[2] if len(shape) > 2 else "polygon",
            }
            for shape in shapes
        ],
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle)
    return str(path)


def refusal(path) -> str:
    with pytest.raises(RadiographError) as caught:
        read_labelme(path)
    assert caught.value.path == str(path)
    return str(caught.value)


# ------------------------------------------------------------------------------------------------- LabelMe labels


@pytest.mark.parametrize("typo, suggestion", [("opacty", "opacity"), ("rightlung", "right_lung"), ("heart", None)])
def test_labelme_unknown_label_is_refused_naming_file_shape_and_label(tmp_path, typo, suggestion):
    path = write_labelme(tmp_path / "case.json", [("right_lung", RIGHT), ("left_lung", LEFT), (typo, LEFT)])
    message = refusal(path)
    assert message.startswith(f"{path}: shapes[2] has unknown label {typo!r}")
    assert "accepted labels: right_lung, left_lung, opacity" in message
    assert (f"did you mean {suggestion!r}" in message) == (suggestion is not None)


def test_labelme_case_and_separator_aliases_give_the_same_labels(tmp_path):
    opacity = [[20, 30], [60, 30], [60, 50], [20, 50]]
    canonical = [("right_lung", RIGHT), ("left_lung", LEFT), ("opacity", opacity)]
    aliased = [("Right Lung", RIGHT), ("left-lung", LEFT), (" OPACITY ", opacity)]
    expected = read_labelme(write_labelme(tmp_path / "canonical.json", canonical)).label_map()
    assert set(np.unique(expected)) == {0, 1, 2}
    np.testing.assert_array_equal(read_labelme(write_labelme(tmp_path / "aliased.json", aliased)).label_map(), expected)


# ------------------------------------------------------------------------------------------ shapes and polygons


def test_labelme_rectangle_and_circle_are_filled(tmp_path):
    shapes = [("right_lung", [[10, 10], [49, 89]], "rectangle"), ("left_lung", [[90, 50], [90, 30]], "circle")]
    annotation = read_labelme(write_labelme(tmp_path / "shapes.json", shapes))
    assert annotation.right_lung.sum() == 40 * 80 and annotation.right_lung[10:90, 10:50].all()
    assert annotation.left_lung.sum() == pytest.approx(math.pi * 20**2, rel=0.06)
    assert annotation.left_lung[50, 90] and annotation.left_lung[50, 71] and not annotation.left_lung[50, 69]


@pytest.mark.parametrize(
    "shape, problem",
    [
        (("opacity", [[20, 30], [60, 30]], "line"), "shapes[2] ('opacity') is a 'line', which has no area"),
        (("opacity", [[20, 30]], "point"), "shapes[2] ('opacity') is a 'point', which has no area"),
        (("opacity", [[20, 30], [60, 30], [20, 30]]), "shapes[2] ('opacity') is a polygon with 2 distinct points"),
        (("opacity", [[20, 30], [40, 40], [60, 50]]), "shapes[2] ('opacity') is a polygon with no area"),
        (("opacity", [[20, 30], [20, 60]], "rectangle"), "shapes[2] ('opacity') is a rectangle with no area"),
        (("opacity", [[20, 30], ["a", 60], [40, 50]]), "shapes[2] ('opacity') has points that are not"),
    ],
)
def test_labelme_shape_without_area_is_refused_naming_shape_and_label(tmp_path, shape, problem):
    path = write_labelme(tmp_path / "case.json", [("right_lung", RIGHT), ("left_lung", LEFT), shape])
    assert refusal(path).startswith(f"{path}: {problem}")


def test_labelme_bow_tie_covers_both_lobes(tmp_path):
    bow_tie = [[10, 10], [90, 90], [90, 10], [10, 90]]  # crosses itself at (50, 50)
    lobes = [("right_lung", [[10, 10], [50, 50], [10, 90]]), ("right_lung", [[90, 10], [90, 90], [50, 50]])]
    mask = read_labelme(write_labelme(tmp_path / "bow.json", [("right_lung", bow_tie)])).right_lung
    np.testing.assert_array_equal(mask, read_labelme(write_labelme(tmp_path / "lobes.json", lobes)).right_lung)
    assert mask[50, 20] and mask[50, 80] and not mask[20, 50] and not mask[80, 50]
    assert mask.sum() == pytest.approx(2 * 80 * 40 / 2, rel=0.06)  # two triangles, plus the outline's pixels


def test_labelme_self_overlapping_outlines_cover_all_they_enclose(tmp_path):
    outer = [[50 + 45 * math.sin(a), 50 - 45 * math.cos(a)] for a in np.radians(np.arange(0, 360, 72))]
    inner = [[50 + 17.19 * math.sin(a), 50 - 17.19 * math.cos(a)] for a in np.radians(np.arange(36, 396, 72))]
    pentagram = [outer[(2 * k) % 5] for k in range(5)]  # one outline crossing itself: its centre is enclosed twice
    star = [point for pair in zip(outer, inner) for point in pair]  # the same star as a simple outline
    square = [[110, 10], [190, 10], [190, 90], [110, 90]]
    drawn = read_labelme(
        write_labelme(
            tmp_path / "overlap.json", [("right_lung", pentagram), ("left_lung", square + square)], columns=200
        )
    )
    simple = read_labelme(
        write_labelme(tmp_path / "simple.json", [("right_lung", star), ("left_lung", square)], columns=200)
    )
    assert drawn.right_lung[50, 50]  # the even-odd fill would leave the centre pentagon empty
    assert np.sum(drawn.right_lung ^ simple.right_lung) < 0.02 * simple.right_lung.sum()
    np.testing.assert_array_equal(drawn.left_lung, simple.left_lung)  # traced twice: even-odd keeps only the outline
    assert drawn.left_lung.sum() == 81 * 81


def test_shared_labelme_files_use_only_the_three_labels_and_parse():
    folder = BUNDLE.parent.parent / "shared" / "data" / "opacity-labelme"
    if not folder.is_dir():
        pytest.skip("../shared/data is not available")
    labels = set()
    for path in sorted(folder.glob("*.json")):
        labels |= {shape["label"] for shape in json.loads(path.read_text())["shapes"]}
        assert read_labelme(str(path)).lung.any()
    assert labels == {"right_lung", "left_lung", "opacity"}


# ----------------------------------------------------------------------------------------- prepare_data duplicates


def test_prepare_data_refuses_two_labelme_files_for_one_image(tmp_path):
    images, labelme = tmp_path / "images", tmp_path / "labelme"
    phantom = phantoms.make_phantom(100, 120, seed=4)
    for name in ("case_1", "case_2"):
        phantoms.write_png(images / f"{name}.png", phantom.image)
        phantoms.write_mask_png(tmp_path / "masks" / f"{name}.png", phantom.lung)
    lungs = [("right_lung", RIGHT), ("left_lung", LEFT)]
    first = write_labelme(labelme / "case_1.json", lungs, image_path="../images/case_1.png")
    second = write_labelme(labelme / "case_1_redo.json", lungs[:1], image_path="../images/case_1.png")
    write_labelme(labelme / "case_2.json", lungs, image_path="../images/case_2.png")
    output = tmp_path / "out"
    code = prepare_data.main(
        [
            "--images",
            str(images),
            "--masks",
            str(tmp_path / "masks"),
            "--labelme",
            str(labelme),
            "--output",
            str(output),
            "--val-fraction",
            "0",
        ]
    )
    assert code == 0
    report = json.loads((output / "preparation_report.json").read_text())
    assert [entry["file"] for entry in report["skipped"]] == [first, second]
    for entry in report["skipped"]:
        assert entry["reason"] == f"image 'case_1' is annotated by 2 LabelMe files ({first} and {second}); none is used"
    training = json.loads((output / "datalist.json").read_text())["training"]
    sources = {os.path.basename(sample["image"]): sample["source"] for sample in training}
    assert sources == {"case_1.png": "mask", "case_2.png": "labelme"}  # case_1 falls back to its lung mask


# -------------------------------------------------------------------------------------------------- checkpoints


def test_latest_checkpoint_skips_an_unreadable_newest_one(tmp_path, caplog):
    for epoch in (2, 3):
        torch.save({"model": {"weight": torch.ones(2)}}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    (tmp_path / "checkpoint_epoch=10.pt").write_bytes(b"")  # killed mid-write by a non-atomic saver
    with open(tmp_path / "checkpoint_epoch=3.pt", "r+b") as handle:
        handle.truncate(os.path.getsize(tmp_path / "checkpoint_epoch=3.pt") // 2)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_epoch=2.pt")
    skipped = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert [message.split(" (")[0] for message in skipped] == [
        f"skipping unreadable checkpoint {tmp_path / 'checkpoint_epoch=10.pt'}",
        f"skipping unreadable checkpoint {tmp_path / 'checkpoint_epoch=3.pt'}",
    ]
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(b"PK")
    with pytest.raises(RuntimeError, match="no readable checkpoint to resume from"):
        latest_checkpoint(str(tmp_path))


def test_checkpoint_killed_mid_write_leaves_the_previous_one_to_resume_from(tmp_path):
    marker = tmp_path.parent / f"{tmp_path.name}.writing"
    child = textwrap.dedent(f"""
        import sys, time
        import torch
        sys.path.insert(0, {str(BUNDLE)!r})
        from scripts.checkpoints import AtomicDiskSaver

        class Stalls:  # pickled while the checkpoint file is being written
            def __reduce__(self):
                open({str(marker)!r}, "w").close()
                time.sleep(120)
                return (int, ())

        saver = AtomicDiskSaver({str(tmp_path)!r})
        saver({{"model": {{"weight": torch.ones(3)}}}}, "checkpoint_epoch=1.pt")
        saver.remove("checkpoint_epoch=1.pt")  # ignite drops the checkpoint it replaces before saving the next
        saver({{"model": {{"weight": torch.zeros(3)}}, "stalls": Stalls()}}, "checkpoint_epoch=2.pt")
    """)
    process = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the child never started writing its second checkpoint"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith(".")) == [
        "checkpoint_epoch=1.pt"
    ]  # no 0-byte checkpoint_epoch=2.pt, and epoch 1 is not deleted yet
    assert len(list(tmp_path.glob(".tmp-*.partial"))) == 1  # what was being written
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_epoch=1.pt")
    assert torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)["model"]["weight"].tolist() == [1, 1, 1]
    assert list(tmp_path.iterdir()) == [tmp_path / "checkpoint_epoch=1.pt"]  # the temporary file was removed


def test_training_resumes_past_a_corrupt_checkpoint_and_keeps_the_best_model(prepared_phantoms, tmp_path):
    arguments = [
        "run", "training", "--config_file", config_files("training"),
        "--dataset_dir", str(prepared_phantoms), "--output_dir", str(tmp_path),
        "--image_size", "[32,32]", "--val_interval", "1",
        "--learning_rate", "0.003", "--num_workers", "0",
    ]  # fmt: skip
    first = run_bundle(*arguments, "--num_epochs", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch=*.pt")) == [
        "checkpoint_epoch=1.pt",
        "checkpoint_epoch=2.pt",
    ]
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary file left behind
    record = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)[RECORD_KEY]
    assert record["best_metric_epoch"] == 1 and len(record["saved"]) == 1
    assert record["saved"][0][0] == pytest.approx(record["best_metric"])
    logged = re.findall(r"Got new best metric of val_selection_score: ([-0-9.e]+)", first.stdout)
    assert float(logged[0]) == pytest.approx(record["best_metric"])  # epoch 1's score
    # the best epoch so far scored the maximum (1.0): no later epoch may replace model.pt
    record.update(best_metric=1.0, saved=[(1.0, record["saved"][0][1])])
    checkpoint = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)
    torch.save({**checkpoint, RECORD_KEY: record}, tmp_path / "checkpoint_epoch=1.pt")
    best_model = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(b"")  # the newest checkpoint was killed mid-write

    resumed = run_bundle(*arguments, "--num_epochs", "3")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"WARNING - skipping unreadable checkpoint {tmp_path / 'checkpoint_epoch=2.pt'}" in resumed.stdout
    assert f"Restored all variables from {tmp_path / 'checkpoint_epoch=1.pt'}" in resumed.stdout
    assert (
        f"restored the best validation record from {tmp_path / 'checkpoint_epoch=1.pt'}: 1.0000 at epoch 1"
        in resumed.stdout
    )
    assert "Epoch: 2/3" in resumed.stdout and "Epoch: 1/3" not in resumed.stdout
    assert "Got new best metric" not in resumed.stdout
    assert (tmp_path / "model.pt").read_bytes() == best_model
    final = torch.load(tmp_path / "checkpoint_epoch=3.pt", weights_only=True)[RECORD_KEY]
    assert (final["best_metric"], final["best_metric_epoch"]) == (1.0, 1)


def test_trainer_feeds_the_network_plain_tensors():
    """The configured trainer hands the network and the loss plain tensors, with the batch's values."""
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    parser = ConfigParser()
    parser.read_config(config_paths("training"))
    prepare_batch = parser.get_parsed_content("train#trainer#prepare_batch")
    batch = {
        "image": MetaTensor(torch.rand(2, 1, 8, 8), meta={"filename_or_obj": "a.png"}),
        "label": MetaTensor(torch.randint(0, 4, (2, 1, 8, 8)).float()),
    }
    image, label = prepare_batch(batch, torch.device("cpu"))
    assert type(image) is torch.Tensor and type(label) is torch.Tensor  # not MetaTensor
    assert torch.equal(image, batch["image"].as_tensor()) and torch.equal(label, batch["label"].as_tensor())

"""LabelMe import and scripts/prepare_data.py on phantom datasets with known masks."""

import json
import os
import shutil

import numpy as np
import pytest

import phantoms
import prepare_data
from scripts.label_io import read_label_map
from scripts.labelme import embedded_image_array, read_labelme


def write_json(path, rows, columns, shapes, image_path="missing.png", image_data=None):
    document = {
        "version": "4.5.6",
        "flags": {},
        "imagePath": image_path,
        "imageData": image_data,
        "imageHeight": rows,
        "imageWidth": columns,
        "shapes": [
            {"label": label, "points": points, "group_id": None, "shape_type": "polygon", "flags": {}}
            for label, points in shapes
        ],
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle)
    return str(path)


def rectangle(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


# ------------------------------------------------------------------------------------------------------ LabelMe


def test_labelme_polygon_areas_match_masks(tmp_path):
    phantom = phantoms.make_phantom(900, 1024, seed=5)  # large lungs: the rasterised rim is under 1 % of the area
    json_path = str(tmp_path / "big.json")
    phantoms.write_png(tmp_path / "big.png", phantom.image)
    document = phantoms.write_labelme(json_path, phantom, "big.png")
    annotation = read_labelme(json_path)
    assert annotation.image_path == str(tmp_path / "big.png")
    for label, mask, truth in (
        ("right_lung", annotation.right_lung, phantom.right_lung),
        ("left_lung", annotation.left_lung, phantom.left_lung),
        ("opacity", annotation.opacity, phantom.opacity),
    ):
        polygons = [shape["points"] for shape in document["shapes"] if shape["label"] == label]
        assert polygons and all(len(points) >= 3 for points in polygons)
        if label != "opacity":
            assert len(polygons) == 1
            assert mask.sum() == pytest.approx(phantoms.polygon_area(polygons[0]), rel=0.01)
        assert dice(mask, truth) > 0.98
    assert dice(annotation.label_map() > 0, phantom.lung) > 0.995
    assert np.argwhere(annotation.right_lung)[:, 1].mean() < np.argwhere(annotation.left_lung)[:, 1].mean()


def test_labelme_known_polygon_area(tmp_path):
    angles = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    circle = np.stack([150 + 120 * np.cos(angles), 140 + 110 * np.sin(angles)], axis=1).tolist()
    phantoms.write_png(tmp_path / "circle.png", phantoms.make_phantom(300, 320, seed=1).image)
    annotation = read_labelme(write_json(tmp_path / "circle.json", 300, 320, [("right_lung", circle)], "circle.png"))
    assert annotation.right_lung.shape == (300, 320)
    assert annotation.right_lung.sum() == pytest.approx(phantoms.polygon_area(circle), rel=0.01)


def test_labelme_vertices_outside_the_image_are_clipped(tmp_path):
    image_path = tmp_path / "image.png"
    phantoms.write_png(image_path, phantoms.make_phantom(100, 120, seed=2).image)
    shapes = [("right_lung", rectangle(-30, -20, 50, 40)), ("left_lung", rectangle(80, 60, 300, 500))]
    annotation = read_labelme(write_json(tmp_path / "outside.json", 100, 120, shapes, image_path="image.png"))
    assert annotation.right_lung.sum() == 51 * 41 and annotation.right_lung[0, 0]
    assert annotation.left_lung.sum() == 40 * 40 and annotation.left_lung[-1, -1]


def test_labelme_opacity_outside_lung_is_dropped(tmp_path):
    phantoms.write_png(tmp_path / "image.png", phantoms.make_phantom(100, 120, seed=2).image)
    shapes = [
        ("right_lung", rectangle(10, 10, 49, 89)),
        ("left_lung", rectangle(70, 10, 109, 89)),
        ("opacity", rectangle(30, 40, 89, 59)),
    ]  # spans both lungs and the mediastinum between them
    labels = read_labelme(write_json(tmp_path / "opacity.json", 100, 120, shapes, image_path="image.png")).label_map()
    assert set(np.unique(labels)) == {0, 1, 2}
    assert (labels == 2).sum() == 2 * 20 * 20
    assert (labels[40:60, 50:70] == 0).all()


def test_labelme_embedded_image(tmp_path):
    phantom = phantoms.make_phantom(120, 160, seed=4)
    json_path = str(tmp_path / "embedded.json")
    phantoms.write_labelme(json_path, phantom, "not_there.png", embed_image=True)
    annotation = read_labelme(json_path)
    assert annotation.image_path is None and annotation.embedded_image
    image = embedded_image_array(annotation)
    assert image.shape == (120, 160)
    np.testing.assert_allclose(image / 255.0, phantom.image, atol=1 / 255)
    assert dice(annotation.lung, phantom.lung) > 0.95


# ------------------------------------------------------------------------------------------------- prepare_data


def run_prepare(dataset, output, seed=3, extra=()):
    argv = [
        "--images",
        dataset.images,
        "--masks",
        dataset.masks,
        "--labelme",
        dataset.labelme,
        "--metadata",
        dataset.metadata,
        "--output",
        str(output),
        "--val-fraction",
        "0.5",
        "--seed",
        str(seed),
    ]
    code = prepare_data.main(argv + list(extra))
    with open(os.path.join(output, "datalist.json"), encoding="utf-8") as handle:
        datalist = json.load(handle)
    with open(os.path.join(output, "preparation_report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    return code, datalist, report


def stem(sample):
    return os.path.basename(sample["image"]).split(".")[0]


def test_prepare_data_labels_and_split(phantom_dataset, tmp_path):
    code, datalist, report = run_prepare(phantom_dataset, tmp_path / "first")
    assert code == 0 and report["skipped"] == [] and report["used"] == 8
    training, validation = datalist["training"], datalist["validation"]
    assert training and validation and len(training) + len(validation) == 8
    assert not {s["patient_id"] for s in training} & {s["patient_id"] for s in validation}
    annotated = {os.path.splitext(os.path.basename(path))[0] for path in phantom_dataset.labelme_files}
    assert len(annotated) == 2
    for sample in training + validation:
        assert os.path.isfile(sample["image"])
        labels = read_label_map(os.path.join(tmp_path / "first", sample["label"]))
        phantom = phantoms.make_phantom(200, 240, seed=int(stem(sample).split("_")[1]))
        assert labels.shape == (200, 240)
        if stem(sample) in annotated:
            assert sample["source"] == "labelme" and set(np.unique(labels)) == {0, 1, 2}
            assert dice(labels == 2, phantom.opacity) > 0.9
            assert dice(labels > 0, phantom.lung) > 0.97
        else:
            assert sample["source"] == "mask" and set(np.unique(labels)) == {0, 3}
            np.testing.assert_array_equal(labels > 0, phantom.lung)

    again_code, again, _ = run_prepare(phantom_dataset, tmp_path / "second")
    assert again_code == 0
    for part in ("training", "validation"):
        assert [(s["image"], s["patient_id"]) for s in again[part]] == [
            (s["image"], s["patient_id"]) for s in datalist[part]
        ]


def test_prepare_data_oversamples_labelme_training_images_only(phantom_dataset, tmp_path):
    code, datalist, report = run_prepare(phantom_dataset, tmp_path / "out", extra=("--repeat-labelme", "3"))
    assert code == 0
    counts = {}
    for sample in datalist["training"]:
        counts[stem(sample)] = counts.get(stem(sample), 0) + 1
    for sample in datalist["training"]:
        assert counts[stem(sample)] == (3 if sample["source"] == "labelme" else 1)
    assert any(sample["source"] == "labelme" for sample in datalist["training"])
    assert report["training_unique"] == len(counts) and report["training"] == sum(counts.values())
    validation = [stem(sample) for sample in datalist["validation"]]
    assert len(validation) == len(set(validation)) and not set(validation) & set(counts)


def test_prepare_data_split_from_keeps_validation_patients_and_moves_labelme_by_fold(phantom_dataset, tmp_path):
    hold_all = ("--opacity-folds", "1", "--holdout-opacity-fold", "0")
    _, base, _ = run_prepare(phantom_dataset, tmp_path / "base", extra=hold_all)
    labelme_patients = {s["patient_id"] for s in base["validation"] if s["source"] == "labelme"}
    assert len(labelme_patients) == 2 and not any(s["source"] == "labelme" for s in base["training"])

    split_from = ("--split-from", str(tmp_path / "base" / "datalist.json"))
    _, tuned, _ = run_prepare(phantom_dataset, tmp_path / "tuned", extra=split_from)  # every LabelMe patient trains
    patients = lambda part: {s["patient_id"] for s in part}  # noqa: E731
    assert patients(tuned["validation"]) == patients(base["validation"]) - labelme_patients
    assert labelme_patients <= patients(tuned["training"])


def test_prepare_data_moves_training_labelme_onto_the_lung_mask(tmp_path):
    """--labelme-lungs-from-masks: a training LabelMe image takes the mask's lung field; validation keeps LabelMe's."""
    from PIL import Image

    for folder in ("images", "masks", "labelme"):
        (tmp_path / folder).mkdir()
    Image.fromarray(np.arange(12000).reshape(100, 120).astype(np.uint8)).save(tmp_path / "images" / "case_1.png")
    mask = np.zeros((100, 120), bool)
    mask[10:90, 10:110] = True
    phantoms.write_mask_png(tmp_path / "masks" / "case_1.png", mask)
    shapes = [("right_lung", rectangle(20, 20, 55, 80)), ("left_lung", rectangle(65, 20, 118, 80)),
              ("opacity", rectangle(20, 20, 40, 50))]  # fmt: skip
    write_json(tmp_path / "labelme" / "case_1.json", 100, 120, shapes, image_path="../images/case_1.png")
    drawn = read_labelme(str(tmp_path / "labelme" / "case_1.json")).label_map()

    def prepare(output, *extra):
        argv = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--labelme",
                str(tmp_path / "labelme"), "--output", str(output), "--val-fraction", "0", *extra]  # fmt: skip
        assert prepare_data.main(argv) == 0
        datalist = json.loads((output / "datalist.json").read_text())
        (sample,) = datalist["training"] + datalist["validation"]
        return datalist, read_label_map(str(output / sample["label"]))

    datalist, labels = prepare(tmp_path / "moved", "--labelme-lungs-from-masks")
    assert [sample["source"] for sample in datalist["training"]] == ["labelme"]
    np.testing.assert_array_equal(labels > 0, mask)  # the lung field is the mask's
    inside_both = mask & (drawn > 0)
    np.testing.assert_array_equal(labels[inside_both], drawn[inside_both])  # LabelMe's clear lung and opacity
    assert (labels[mask & (drawn == 0)] == 3).all() and (labels == 3).sum() > 0  # opacity not annotated there
    assert (drawn[~mask] > 0).any()  # LabelMe lung beyond the mask became background

    _, as_drawn = prepare(tmp_path / "plain")
    np.testing.assert_array_equal(as_drawn, drawn)
    _, held_out = prepare(tmp_path / "held_out", "--labelme-lungs-from-masks", "--opacity-folds", "1",
                          "--holdout-opacity-fold", "0")  # fmt: skip
    np.testing.assert_array_equal(held_out, drawn)


def test_prepare_data_skips_bad_files_by_name(phantom_dataset, tmp_path):
    root = tmp_path / "data"  # a copy: the session dataset stays intact
    shutil.copytree(phantom_dataset.root, root)
    copy = phantoms.PhantomDataset(
        str(root), str(root / "images"), str(root / "masks"), str(root / "labelme"), str(root / "metadata.csv"), [], []
    )
    broken = root / "images" / "broken.png"
    content = open(root / "images" / "phantom_001.png", "rb").read()
    broken.write_bytes(content[: len(content) // 3])
    phantoms.write_mask_png(root / "masks" / "broken.png", phantoms.make_phantom(200, 240, seed=1).lung)
    wrong_size = root / "masks" / "phantom_003.png"
    phantoms.write_mask_png(wrong_size, phantoms.make_phantom(100, 120, seed=3).lung)

    code, datalist, report = run_prepare(copy, tmp_path / "out")
    assert code == 0
    skipped = {entry["file"]: entry["reason"] for entry in report["skipped"]}
    assert set(skipped) == {str(broken), str(wrong_size)}
    assert "100x120" in skipped[str(wrong_size)]
    used = sorted(stem(s) for s in datalist["training"] + datalist["validation"])
    assert used == [f"phantom_{i:03d}" for i in range(8) if i != 3]
    assert report["used"] == 7


def test_prepare_data_labelme_with_embedded_image_only(tmp_path):
    phantom = phantoms.make_phantom(120, 160, seed=9)
    labelme = tmp_path / "labelme"
    phantoms.write_labelme(labelme / "case_9.json", phantom, "elsewhere/case_9.png", embed_image=True)
    output = tmp_path / "out"
    assert prepare_data.main(["--labelme", str(labelme), "--output", str(output), "--val-fraction", "0"]) == 0
    datalist = json.loads((output / "datalist.json").read_text())
    (sample,) = datalist["training"]
    assert sample["image"] == str(output / "images" / "case_9.png") and os.path.isfile(sample["image"])
    assert set(np.unique(read_label_map(str(output / sample["label"])))) == {0, 1, 2}


# ------------------------------------------------------------------------------------------------ mask-folder sources


def write_mask_folder_source(root, count=6, rows=96, columns=112, clear=(1,), without_opacity_mask=()):
    """Images, lung masks, opacity masks (empty for the ``clear`` indices) and a published split (every third: val)."""
    phantom_list = [phantoms.make_phantom(rows, columns, seed=20 + index) for index in range(count)]
    split_rows = ["image,published_split"]
    for index, phantom in enumerate(phantom_list):
        name = f"case_{index}.png"
        phantoms.write_png(root / "images" / name, phantom.image)
        phantoms.write_mask_png(root / "lungs" / name, phantom.lung)
        if index not in without_opacity_mask:
            opacity = np.zeros_like(phantom.opacity) if index in clear else phantom.opacity
            phantoms.write_mask_png(root / "opacity" / name, opacity)
        split_rows.append(f"{name},{'val' if index % 3 == 2 else 'train'}")
    (root / "index.csv").write_text("\n".join(split_rows) + "\n")
    return phantom_list


def source_spec(root, name="qu", opacity=True, extra=""):
    spec = f"name={name},images={root / 'images'},lungs={root / 'lungs'},split={root / 'index.csv'}"
    return spec + (f",opacity={root / 'opacity'}" if opacity else "") + extra


def load_prepared(output):
    datalist = json.loads((output / "datalist.json").read_text())
    report = json.loads((output / "preparation_report.json").read_text())
    return datalist, report


def test_mask_source_with_opacity_annotated(tmp_path):
    phantom_list = write_mask_folder_source(tmp_path / "src")
    output = tmp_path / "out"
    assert prepare_data.main(["--mask-source", source_spec(tmp_path / "src"), "--output", str(output),
                              "--val-fraction", "0.25", "--seed", "0"]) == 0  # fmt: skip
    datalist, report = load_prepared(output)
    assert sorted(stem(s) for s in datalist["test"]) == ["case_2", "case_5"]  # the published val split, held out
    assert len(datalist["validation"]) == 1 and len(datalist["training"]) == 3
    assert report["sources"]["qu"] == {"training": 3, "validation": 1, "test": 2, "opacity_annotated": True}
    for sample in datalist["training"] + datalist["validation"] + datalist["test"]:
        assert sample["source"] == "qu" and sample["label"] == f"labels/qu/{stem(sample)}.png"
        phantom = phantom_list[int(stem(sample).split("_")[1])]
        labels = read_label_map(str(output / sample["label"]))
        np.testing.assert_array_equal(labels > 0, phantom.lung)
        if stem(sample) == "case_1":  # empty opacity mask: annotated clear lungs
            assert set(np.unique(labels)) == {0, 1}
        else:
            assert set(np.unique(labels)) == {0, 1, 2}
            np.testing.assert_array_equal(labels == 2, phantom.opacity & phantom.lung)


def test_mask_source_without_opacity_annotation_and_with_a_wider_lung_field(tmp_path):
    phantom_list = write_mask_folder_source(tmp_path / "src")
    field = tmp_path / "field"
    for index, phantom in enumerate(phantom_list):  # a wider lung field: each lung mask grown by 3 px
        grown = np.zeros_like(phantom.lung)
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                grown |= np.roll(np.roll(phantom.lung, dy, axis=0), dx, axis=1)
        phantoms.write_mask_png(field / f"case_{index}.png", grown)
    output = tmp_path / "out"
    specs = [
        source_spec(tmp_path / "src", name="lungs_only", opacity=False),
        source_spec(tmp_path / "src", name="widened", extra=f",lung_field={field}"),
    ]
    assert prepare_data.main(["--mask-source", specs[0], "--mask-source", specs[1], "--output", str(output),
                              "--val-fraction", "0", "--seed", "0"]) == 0  # fmt: skip
    datalist, report = load_prepared(output)
    assert {s["source"] for s in datalist["training"]} == {"lungs_only", "widened"}
    assert report["sources"]["lungs_only"]["opacity_annotated"] is False
    for section in ("training", "test"):
        for sample in datalist[section]:
            phantom = phantom_list[int(stem(sample).split("_")[1])]
            labels = read_label_map(str(output / sample["label"]))
            if sample["source"] == "lungs_only":
                assert set(np.unique(labels)) == {0, 3}
                np.testing.assert_array_equal(labels > 0, phantom.lung)
            elif section == "training":  # the wider field is lung of unknown opacity; the source's lungs keep 1/2
                band = labels == 3
                assert band.any() and not (band & phantom.lung).any()
                np.testing.assert_array_equal(labels == 1, phantom.lung & (labels != 2))
            else:  # held-out rows keep the source's masks as drawn
                np.testing.assert_array_equal(labels > 0, phantom.lung)
                assert 3 not in np.unique(labels)


def test_mask_source_reports_missing_masks_by_name(tmp_path):
    write_mask_folder_source(tmp_path / "src", without_opacity_mask=(4,))
    (tmp_path / "src" / "lungs" / "case_0.png").unlink()
    output = tmp_path / "out"
    assert prepare_data.main(["--mask-source", source_spec(tmp_path / "src"), "--output", str(output)]) == 0
    datalist, report = load_prepared(output)
    assert report["unlabelled"] == [str(tmp_path / "src" / "images" / "case_0.png")]
    (skipped,) = report["skipped"]
    assert skipped["file"].endswith("case_4.png") and "no opacity mask" in skipped["reason"]
    used = {stem(s) for section in datalist.values() for s in section}
    assert used == {"case_1", "case_2", "case_3", "case_5"}


def test_mask_source_spec_errors_name_the_problem(tmp_path):
    write_mask_folder_source(tmp_path / "src", count=1)
    for spec, words in (
        (f"name=x,images={tmp_path / 'src' / 'images'}", "lacks ['lungs']"),
        (source_spec(tmp_path / "src", name="labelme"), "reserved"),
        (source_spec(tmp_path / "src") + ",colour=red", "unknown key 'colour'"),
        (source_spec(tmp_path / "src").replace("/lungs", "/missing"), "not found"),
    ):
        with pytest.raises(SystemExit):
            prepare_data.main(["--mask-source", spec, "--output", str(tmp_path / "out")])
        with pytest.raises(Exception) as error:
            prepare_data.parse_mask_source(spec)
        assert words in str(error.value)

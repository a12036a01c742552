"""scripts/resize_dataset.py: a prepared dataset copied at the network size gives training the same inputs."""

import json
import shutil

import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.transforms import Compose

from conftest import BUNDLE, PHANTOM_IMAGE_SIZE, config_paths


def training_inputs(dataset, size: int) -> dict:
    """The cached (deterministic) training inputs of every training and validation row, by image stem."""
    parser = ConfigParser()
    parser.read_config(config_paths("training"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(dataset), "image_size": [size, size]})
    transform = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    datalist = json.loads((dataset / "datalist.json").read_text())
    inputs = {}
    for row in datalist["training"] + datalist["validation"]:
        item = transform({"image": str(dataset / row["image"]), "label": str(dataset / row["label"])})
        inputs[row["stem"]] = (item["image"][0].numpy(), item["label"][0].numpy())
    return inputs


@pytest.fixture(scope="module")
def resized(prepared_phantoms, tmp_path_factory):
    import resize_dataset

    output = tmp_path_factory.mktemp("resized") / "copy"
    assert resize_dataset.main(
        ["--dataset", str(prepared_phantoms), "--size", str(PHANTOM_IMAGE_SIZE), "--output", str(output),
         "--workers", "1"]
    ) == 0  # fmt: skip
    return output


def test_copy_keeps_every_row_and_field(prepared_phantoms, resized):
    original = json.loads((prepared_phantoms / "datalist.json").read_text())
    copy = json.loads((resized / "datalist.json").read_text())
    assert set(copy) == {"training", "validation"}
    for key in copy:
        assert len(copy[key]) == len(original[key])
        for before, after in zip(original[key], copy[key]):
            assert set(after) == set(before) and after["stem"] == before["stem"]
            assert (resized / after["image"]).is_file() and (resized / after["label"]).is_file()


def test_training_sees_the_same_inputs(prepared_phantoms, resized):
    """Same orientation and labels (the phantoms are 200 x 240: a transposed copy fails), grey levels within the
    JPEG's rounding."""
    expected, got = training_inputs(prepared_phantoms, PHANTOM_IMAGE_SIZE), training_inputs(resized, PHANTOM_IMAGE_SIZE)
    assert set(got) == set(expected)
    for stem, (image, labels) in expected.items():
        image_copy, labels_copy = got[stem]
        assert image_copy.shape == image.shape == (PHANTOM_IMAGE_SIZE, PHANTOM_IMAGE_SIZE)
        np.testing.assert_array_equal(labels_copy, labels)
        assert np.abs(image_copy - image).mean() < 0.02, stem
        assert np.corrcoef(image_copy.ravel(), image.ravel())[0, 1] > 0.99, stem


def test_bad_file_is_reported_and_the_rest_copied(prepared_phantoms, tmp_path, capsys):
    import resize_dataset

    dataset = tmp_path / "dataset"
    shutil.copytree(prepared_phantoms, dataset, symlinks=True)
    datalist = json.loads((dataset / "datalist.json").read_text())
    broken = datalist["training"][0]
    (dataset / "broken.png").write_bytes(b"not an image")
    broken["image"] = "broken.png"
    (dataset / "datalist.json").write_text(json.dumps(datalist))
    output = tmp_path / "copy"
    assert resize_dataset.main(["--dataset", str(dataset), "--size", "32", "--output", str(output)]) == 0
    assert "broken.png" in capsys.readouterr().err
    copy = json.loads((output / "datalist.json").read_text())
    assert len(copy["training"]) == len(datalist["training"]) - 1
    report = json.loads((output / "resize_report.json").read_text())
    assert len(report["skipped"]) == 1 and "broken.png" in report["skipped"][0]


def test_output_may_not_be_the_dataset(prepared_phantoms):
    import resize_dataset

    before = (prepared_phantoms / "datalist.json").read_bytes()
    with pytest.raises(SystemExit):
        resize_dataset.main(["--dataset", str(prepared_phantoms), "--size", "32", "--output", str(prepared_phantoms)])
    assert (prepared_phantoms / "datalist.json").read_bytes() == before

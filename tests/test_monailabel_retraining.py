"""Retraining a served model on a few corrected labels never makes it worse: the training workflow run as MONAI Label
runs it (served weights loaded first, the datastore's labels as training data, no validation split,
CXR_PUBLISH_CHECKPOINT set), without a server.

A round trained on deliberately wrong labels keeps the served weights and records why; a good round publishes and
keeps the replaced weights; scripts/rollback_weights.py restores them byte for byte; runs/ keeps the weights of the
newest run only. The shared-data test does the same with real radiographs and the shipped weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import phantoms
from conftest import BUNDLE, PHANTOM_IMAGE_SIZE, PYTHON, ROOT, bundle_image_size, config_files

ROWS, COLUMNS = 200, 240
ROUND_TIMEOUT_S = 600


def served_bundle(folder: Path, weights: Path) -> Path:
    """A served bundle as scripts/serve_monailabel.py lays it out: models/model.pt (a copy of ``weights``), runs/."""
    (folder / "models").mkdir(parents=True)
    shutil.copyfile(weights, folder / "models" / "model.pt")
    return folder


def write_round_data(folder: Path, studies: Path, labelled: dict[str, np.ndarray]) -> Path:
    """datalist.json as MONAI Label hands it over: the labelled studies for training, no validation split."""
    labels = studies / "labels" / "final"
    labels.mkdir(parents=True, exist_ok=True)
    training = []
    for image_name, label in labelled.items():
        label_path = labels / (Path(image_name).stem + ".png")
        Image.fromarray(label.astype(np.uint8)).save(label_path)
        training.append({"image": str(studies / image_name), "label": str(label_path)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "datalist.json").write_text(json.dumps({"training": training, "validation": []}))
    return folder


def run_round(served: Path, data: Path, run_name: str, *extra: str, image_size: int = PHANTOM_IMAGE_SIZE):
    """One retraining round as MONAI Label starts it (its CheckpointLoader of the served weights is the bundle's
    ``init_checkpoint`` here); returns the completed process."""
    weights = served / "models" / "model.pt"
    command = [
        PYTHON, "-m", "monai.bundle", "run", "training",
        "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
        "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
        "--config_file", config_files("training"), "--bundle_root", str(served),
        "--dataset_dir", str(data), "--run_name", run_name, "--init_checkpoint", str(weights),
        "--image_size", f"[{image_size},{image_size}]", "--num_workers", "0", "--progress", "false", *extra,
    ]  # fmt: skip
    environment = {**os.environ, "CXR_PUBLISH_CHECKPOINT": str(weights)}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True,
                            timeout=ROUND_TIMEOUT_S, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def record(served: Path) -> dict:
    return json.loads((served / "models" / "publish_record.json").read_text())


def rollback(served: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(ROOT / "scripts" / "rollback_weights.py"), "--served-bundle", str(served)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def phantom_studies(tmp_path_factory) -> tuple[Path, dict]:
    """6 phantom radiographs (seeds unseen by the phantom model): 2 get labels, 4 stay unlabelled."""
    folder = tmp_path_factory.mktemp("retraining_studies")
    cases = {}
    for index in range(6):
        phantom = phantoms.make_phantom(ROWS, COLUMNS, seed=91_000 + index)
        phantoms.write_png(folder / f"cxr_{index}.png", phantom.image)
        cases[f"cxr_{index}.png"] = phantom
    return folder, cases


@pytest.fixture(scope="module")
def rounds(phantom_model, phantom_studies, tmp_path_factory) -> dict:
    """Three rounds on one served bundle: wrong labels (must be kept out), then twice the right labels."""
    studies, cases = phantom_studies
    served = served_bundle(tmp_path_factory.mktemp("served") / "cxr_lung_opacity", phantom_model)
    weights = served / "models" / "model.pt"
    labelled = list(cases)[:2]
    wrong = {name: np.where(cases[name].label_map() == 0, 1, 0).astype(np.uint8) for name in labelled}  # inverted
    right = {name: cases[name].label_map() for name in labelled}
    history = {"original": weights.read_bytes()}

    data = write_round_data(tmp_path_factory.mktemp("round_wrong"), studies, wrong)
    # this round also writes the trainer's checkpoints (as every run did before served rounds stopped writing them)
    history["wrong"] = run_round(served, data, "round_1_wrong", "--num_epochs", "3", "--fine_tuning_learning_rate",
                                 "0.003", "--keep_runs", "2", "--resume_checkpoints", "true")  # fmt: skip
    history["runs_after_wrong"] = sorted(path.name for path in (served / "runs" / "round_1_wrong").iterdir())
    history["record_wrong"] = record(served)
    history["log_wrong"] = (served / "runs" / "round_1_wrong" / "log.txt").read_text()
    history["after_wrong"] = weights.read_bytes()
    history["previous_after_wrong"] = sorted((served / "models").glob("previous/*"))

    data = write_round_data(tmp_path_factory.mktemp("round_right"), studies, right)
    history["right"] = run_round(served, data, "round_2_right", "--num_epochs", "2", "--keep_runs", "2")
    history["record_right"] = record(served)
    history["after_right"] = weights.read_bytes()
    history["runs_after_right"] = {path.name: sorted(p.name for p in path.iterdir())
                                   for path in (served / "runs").iterdir() if path.is_dir()}  # fmt: skip

    history["again"] = run_round(served, data, "round_3_right", "--num_epochs", "2", "--keep_runs", "2")
    history["record_again"] = record(served)
    history["after_again"] = weights.read_bytes()
    return {"served": served, **history}


def test_a_round_that_makes_the_reference_worse_keeps_the_served_weights_and_says_why(rounds):
    assert rounds["after_wrong"] == rounds["original"]
    entry = rounds["record_wrong"]
    assert entry["decision"] == "kept"
    assert entry["reason"].startswith("worse than the served weights: ")
    assert any(sentence.startswith("unlabelled_lung_agreement 1.0000 -> ") for sentence in entry["worse"]), entry
    assert entry["reference"]["unlabelled"] == ["cxr_2.png", "cxr_3.png", "cxr_4.png", "cxr_5.png"]
    assert entry["reference"]["training"] == ["cxr_0.png", "cxr_1.png"]
    assert entry["served"]["unlabelled_lung_agreement"] == 1.0
    assert entry["candidate"]["unlabelled_lung_agreement"] < 0.98
    log = rounds["log_wrong"]  # the run's log (the folder is removed by round 3: keep_runs 2)
    assert "kept the served weights" in log and "publish gate: unlabelled_lung_agreement: served 1.0000" in log
    assert rounds["previous_after_wrong"] == []  # nothing was replaced


def test_a_good_round_publishes_and_keeps_the_weights_it_replaced(rounds):
    served = rounds["served"]
    entry = rounds["record_right"]
    assert entry["decision"] == "published", entry["reason"]
    assert entry["worse"] == []
    assert rounds["after_right"] != rounds["original"]
    assert [item["decision"] for item in rounds["record_again"]["history"]] == ["kept", "published", "published"]
    previous = sorted((served / "models" / "previous").iterdir(), reverse=True)
    assert len(previous) == 2  # publish_keep_previous: the weights replaced by rounds 3 and 2
    assert previous[0].read_bytes() == rounds["after_right"]
    assert previous[1].read_bytes() == rounds["original"]
    assert record(served)["previous_weights"] == [path.name for path in previous]


def test_the_rollback_command_restores_the_previous_weights_byte_identical(rounds):
    served = rounds["served"]
    weights = served / "models" / "model.pt"
    assert weights.read_bytes() == rounds["after_again"]
    result = rollback(served)
    assert result.returncode == 0, result.stderr
    assert weights.read_bytes() == rounds["after_right"]
    assert (served / "models" / "rolled_back.pt").read_bytes() == rounds["after_again"]
    assert record(served)["decision"] == "rolled_back"
    result = rollback(served)
    assert result.returncode == 0, result.stderr
    assert weights.read_bytes() == rounds["original"]
    result = rollback(served)  # nothing older is kept
    assert result.returncode == 1 and "no previous weights" in result.stderr
    assert weights.read_bytes() == rounds["original"]


def test_runs_keep_logs_not_weights_and_at_most_keep_runs_folders(rounds):
    assert rounds["runs_after_wrong"] == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt", "log.txt", "model_final.pt"]
    assert rounds["runs_after_right"] == {"round_1_wrong": ["log.txt"], "round_2_right": ["log.txt"]}
    runs = sorted(path.name for path in (rounds["served"] / "runs").iterdir())
    assert runs == ["round_2_right", "round_3_right"]  # keep_runs 2: the oldest folder is gone
    assert sorted(path.name for path in (rounds["served"] / "runs" / "round_3_right").iterdir()) == ["log.txt"]


# ------------------------------------------------------------------------------------ the pieces, without training


def test_frozen_batchnorm_keeps_the_running_statistics_while_the_rest_learns():
    from ignite.engine import Engine

    from scripts.fine_tuning import FrozenBatchNorm

    def train(freeze: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
        torch.manual_seed(0)
        network = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        before = {name: tensor.clone() for name, tensor in network.state_dict().items()}
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

        def step(engine, batch):
            network.train()  # as MONAI's trainers do at every iteration
            optimizer.zero_grad()
            network(batch).square().mean().backward()
            optimizer.step()

        engine = Engine(step)
        FrozenBatchNorm(network, freeze).attach(engine)
        engine.run([torch.randn(2, 1, 8, 8) + 3.0] * 3, max_epochs=1)
        return before, network.state_dict()

    before, after = train(freeze=True)
    assert torch.equal(after["1.running_mean"], before["1.running_mean"])
    assert torch.equal(after["1.running_var"], before["1.running_var"])
    assert not torch.equal(after["0.weight"], before["0.weight"])
    assert not torch.equal(after["1.weight"], before["1.weight"])  # the scale still learns
    before, after = train(freeze=False)
    assert not torch.equal(after["1.running_mean"], before["1.running_mean"])


def test_the_rule_allows_each_figure_its_tolerance_and_no_more():
    from scripts.publish_gate import DEFAULT_TOLERANCES, compare

    served = {"held_out_lung_dice": 0.95, "training_clear_lung_false_opacity": 0.02, "unlabelled_lung_agreement": 1.0,
              "unlabelled_opacity_change": 0.0, "held_out_opacity_dice": float("nan")}  # fmt: skip
    within = {
        "held_out_lung_dice": 0.945,
        "training_clear_lung_false_opacity": 0.025,
        "unlabelled_lung_agreement": 0.985,
        "unlabelled_opacity_change": 0.05,
        "held_out_opacity_dice": 0.1,
    }
    assert compare(served, within, DEFAULT_TOLERANCES) == []
    beyond = {
        "held_out_lung_dice": 0.944,
        "training_clear_lung_false_opacity": 0.026,
        "unlabelled_lung_agreement": 0.984,
        "unlabelled_opacity_change": 0.051,
    }
    worse = compare(served, beyond, DEFAULT_TOLERANCES)
    assert [sentence.split()[0] for sentence in worse] == list(beyond)


def test_unlabelled_reference_studies_exclude_labelled_ones_and_are_spread_by_name(tmp_path):
    from scripts.publish_gate import unlabelled_images

    for index in range(10):
        (tmp_path / f"study_{index}.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "labels").mkdir()
    exclude = {str((tmp_path / "study_0.png").resolve())}
    chosen = unlabelled_images([str(tmp_path)], exclude, limit=3)
    assert [Path(path).name for path in chosen] == ["study_1.png", "study_4.png", "study_7.png"]


# ------------------------------------------------------------------- real radiographs and the shipped weights

COHEN = ROOT.parent / "shared" / "data" / "cohen-cxr"
# never trained on by the shipped weights (their patients are in its validation split; tests/test_shared_data.py)
SHARED_LABELLED = ["02b76460.jpg", "1-s2.0-S0735675720302746-gr1_lrg.jpg"]
SHARED_OTHERS = ["1-s2.0-S1684118220300372-gr1_lrg-b.png", "1-s2.0-S1931312820301852-gr1_lrg-b.png",
                 "1-s2.0-S2387020620301959-gr4_lrg-a.png", "1-s2.0-S2387020620301959-gr4_lrg-b.png"]  # fmt: skip
SHARED_MAX_LUNG_DICE_DROP = 0.01


def lung_mask(name: str) -> np.ndarray:
    with Image.open(COHEN / "lung_masks" / (Path(name).stem + ".png")) as mask:
        return np.asarray(mask.convert("L")) > 127


def class_maps(weights: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The bundle's class map of each radiograph under ``weights``, at the radiograph's size."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from scripts.checkpoints import state_dict_of

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "common.yaml"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(state_dict_of(torch.load(weights, map_location="cpu", weights_only=True)))
    network.eval()
    preprocess = Compose([parser.get_parsed_content("load_radiograph"), *parser.get_parsed_content("network_input")])
    maps = {}
    with torch.no_grad():
        for name in names:
            image = preprocess({"image": str(COHEN / "images" / name)})["image"]
            probabilities = torch.softmax(network(image.as_tensor()[None]), 1)
            size = tuple(image.meta["original_shape"])
            maps[name] = torch.nn.functional.interpolate(probabilities, size=size, mode="bilinear")[0].argmax(0).numpy()
    return maps


def lung_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    lung = prediction > 0
    return 2.0 * float((lung & truth).sum()) / float(lung.sum() + truth.sum())


def test_shared_retraining_on_two_labels_never_lowers_the_lung_dice_of_other_studies(tmp_path):
    """The issue's round (2 corrected labels, 10 epochs, the shipped weights served): whether it publishes or keeps
    the served weights, the served model's lung Dice on 4 other studies drops by 0.01 at most."""
    if not COHEN.is_dir():
        message = f"{COHEN} is missing: the shared-data retraining test needs the real radiographs"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in SHARED_LABELLED + SHARED_OTHERS:
        (studies / name).symlink_to(COHEN / "images" / name)
    shipped = BUNDLE / "models" / "model.pt"
    served = served_bundle(tmp_path / "cxr_lung_opacity", shipped)
    # the annotator's corrections: the lung field redrawn (the V7 mask), the proposed opacity inside it kept
    proposals = class_maps(shipped, SHARED_LABELLED + SHARED_OTHERS)
    corrected = {name: np.where(lung_mask(name), np.where(proposals[name] == 2, 2, 1), 0) for name in SHARED_LABELLED}
    data = write_round_data(tmp_path / "round", studies, corrected)

    run_round(served, data, "round_1", "--num_epochs", "10", image_size=bundle_image_size())

    entry = record(served)
    assert entry["decision"] in ("published", "kept") and entry["reference"]["unlabelled"] == sorted(SHARED_OTHERS)
    after = class_maps(served / "models" / "model.pt", SHARED_OTHERS)
    for name in SHARED_OTHERS:
        before_dice, after_dice = lung_dice(proposals[name], lung_mask(name)), lung_dice(after[name], lung_mask(name))
        print(f"{name}: lung Dice {before_dice:.4f} -> {after_dice:.4f} ({entry['decision']})")
        assert after_dice >= before_dice - SHARED_MAX_LUNG_DICE_DROP, (name, before_dice, after_dice, entry)

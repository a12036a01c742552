"""The bundle's configs parse and instantiate, training learns and resumes, the evaluate workflow reports metrics."""

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import (
    BUNDLE,
    PHANTOM_IMAGE_SIZE,
    PYTHON,
    ROOT,
    bundle_command,
    bundle_image_size,
    config_files,
    config_paths,
    run_bundle,
)

CONFIGS = BUNDLE / "configs"


def parser_for(workflow: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_paths(workflow))
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    return parser


def test_train_config_instantiates_trainer_and_evaluator(prepared_phantoms, tmp_path):
    parser = parser_for("training", dataset_dir=str(prepared_phantoms), output_dir=str(tmp_path))
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert len(trainer.data_loader.dataset) > 0 and len(evaluator.data_loader.dataset) > 0
    assert parser.get_parsed_content("network").encoder.__class__.__name__ == "ResNetEncoder"
    batch = next(iter(trainer.data_loader))
    size = bundle_image_size()
    assert batch["image"].shape[1:] == (1, size, size) and batch["label"].shape[1:] == (1, size, size)
    assert set(torch.unique(batch["label"]).tolist()) <= {0, 1, 2, 3}


def test_inference_and_evaluate_configs_instantiate(prepared_phantoms, tmp_path):
    inference = parser_for("inference", dataset_dir=str(BUNDLE / "docs" / "samples"), output_dir=str(tmp_path))
    assert len(inference.get_parsed_content("evaluator").data_loader.dataset) == 3
    evaluate = parser_for("evaluate", dataset_dir=str(prepared_phantoms), output_dir=str(tmp_path))
    item = evaluate.get_parsed_content("dataset")[0]
    assert item["image"].shape[1:] == (bundle_image_size(),) * 2
    assert item["label"].shape[1:] == item["display"].shape[1:] == tuple(item["image"].meta["original_shape"])


def test_multi_gpu_training_runs_on_two_processes(prepared_phantoms, tmp_path):
    """torchrun with 2 processes (gloo on the CPU): both ranks train and validate, rank 0 alone writes checkpoints."""
    command = bundle_command(
        "run", "training", "--config_file", config_files("multi_gpu_training"),
        "--dataset_dir", str(prepared_phantoms), "--output_dir", str(tmp_path), "--image_size", "[32,32]",
        "--num_epochs", "2", "--val_interval", "1", "--num_workers", "0",
    )  # fmt: skip
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    result = subprocess.run(
        torchrun + command[1:], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )  # ``-m monai.bundle ...`` after torchrun's own arguments
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert log.count("SupervisedTrainer - INFO - Engine run finished") == 2  # both ranks
    assert log.count("Saved checkpoint at epoch: 2") == 1  # rank 0 only
    written = sorted(path.name for path in tmp_path.glob("*.pt"))
    assert written == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "model.pt", "model_final.pt"]
    checkpoint = torch.load(tmp_path / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 2 * checkpoint["trainer"]["epoch_length"]
    assert not any(key.startswith("module.") for key in checkpoint["model"])  # loads into the plain network


def test_network_matches_metadata_input_and_output():
    result = run_bundle("verify_net_in_out", "network_def", "--config_file", config_files("inference"))
    assert result.returncode == 0, result.stderr[-2000:]


def epoch_losses(log_text: str) -> dict[int, list[float]]:
    losses: dict[int, list[float]] = {}
    for epoch, loss in re.findall(r"Epoch: (\d+)/\d+, Iter: \d+/\d+ -- train_loss: ([0-9.]+)", log_text):
        losses.setdefault(int(epoch), []).append(float(loss))
    return losses


def test_training_lowers_the_loss_and_resumes_after_interruption(prepared_phantoms, tmp_path):
    arguments = [
        "run", "training", "--config_file", config_files("training"), "--dataset_dir", str(prepared_phantoms),
        "--output_dir", str(tmp_path), "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]",
        "--val_interval", "2", "--learning_rate", "0.003", "--num_workers", "0",
    ]  # fmt: skip
    first = run_bundle(*arguments, "--num_epochs", "4")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    losses = epoch_losses(first.stdout)
    assert sorted(losses) == [1, 2, 3, 4]
    assert sum(losses[4]) / len(losses[4]) < sum(losses[1]) / len(losses[1])
    assert (tmp_path / "checkpoint_epoch=4.pt").is_file() and (tmp_path / "model.pt").is_file()

    resumed = run_bundle(*arguments, "--num_epochs", "6")  # same output folder: continues from epoch 4
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "checkpoint_epoch=4.pt" in resumed.stdout
    assert sorted(epoch_losses(resumed.stdout)) == [5, 6]
    assert (tmp_path / "checkpoint_epoch=6.pt").is_file()


def test_evaluate_workflow_reports_metrics_on_phantoms(prepared_phantoms, phantom_model, tmp_path):
    validation = json.loads((prepared_phantoms / "datalist.json").read_text())["validation"]
    scored = [Path(item["image"]).name for item in validation[:2]]
    scores = tmp_path / "scores.csv"  # radiologists' scores of two validation images and of one image not evaluated
    scores.write_text(f"filename,geographic_extent,opacity\n{scored[0]},2,1\n{scored[1]},5.5,3\nnot_here.png,8,6\n")
    output = tmp_path / "evaluation"
    result = run_bundle(
        "run", "--config_file", config_files("evaluate"),
        "--dataset_dir", str(prepared_phantoms), "--output_dir", str(output), "--ckpt_path", str(phantom_model),
        "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]", "--scores_csv", str(scores),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = (output / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(validation)
    summary = json.loads((output / "metrics_summary.json").read_text())
    assert summary["images"] == len(validation)
    assert summary["lung_dice"]["mean"] > 0.8
    assert 0 <= summary["lung_hd95_px"]["mean"] < 40
    groups = summary["groups"]  # per source and kind of opacity annotation, every image in exactly one group
    assert sum(group["images"] for group in groups.values()) == len(validation)
    assert {name.split(", ")[0] for name in groups} == {item["source"] for item in validation}
    assert groups["mask, not annotated"]["opacity_dice"]["count"] == 0  # lung-only masks never score opacity
    assert (output / "severity.csv").is_file()

    with open(output / "severity.csv", newline="") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    agreement = json.loads((output / "score_agreement.json").read_text())
    assert (agreement["images"], agreement["matched"], agreement["scores_without_image"]) == (len(validation), 2, 1)
    assert agreement["unscored_images"] == len(validation) - 2 and agreement["severity_rules"] == ["calibrated"]
    for column, truth in (("geographic_extent", (2, 5.5)), ("opacity_score", (1, 3))):
        predicted = [float(rows[name][column]) for name in scored]
        expected = sum(abs(p - t) for p, t in zip(predicted, truth)) / 2
        assert agreement[column]["n"] == 2 and agreement[column]["mae"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("run_id", ["training", "run"])
def test_both_run_ids_start_training(prepared_phantoms, tmp_path, run_id):
    result = run_bundle(
        "run", run_id, "--config_file", config_files("training"), "--dataset_dir", str(prepared_phantoms),
        "--output_dir", str(tmp_path), "--image_size", "[32,32]", "--num_epochs", "1", "--num_workers", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "checkpoint_epoch=1.pt").is_file()


def test_evaluate_gives_the_same_figures_over_train_and_inference_configs(prepared_phantoms, phantom_model, tmp_path):
    """model-zoo runs evaluate merged over the training config: the figures match those over the inference config."""
    tables = {}
    for workflow in ("evaluate", "evaluate_after_training"):
        output = tmp_path / workflow
        result = run_bundle(
            "run", "--config_file", config_files(workflow), "--dataset_dir", str(prepared_phantoms),
            "--output_dir", str(output), "--ckpt_path", str(phantom_model),
            "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]",
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        with open(output / "metrics.csv", newline="") as handle:
            tables[workflow] = list(csv.DictReader(handle))
    validation = json.loads((prepared_phantoms / "datalist.json").read_text())["validation"]
    assert len(tables["evaluate"]) == len(validation) > 0
    for row, other in zip(tables["evaluate"], tables["evaluate_after_training"]):
        assert row["image"] == other["image"]
        assert float(row["lung_dice"]) == pytest.approx(float(other["lung_dice"]), abs=1e-3)


def repeated_blocks(first: list[str], second: list[str], length: int) -> list[tuple[str, ...]]:
    """Runs of ``length`` consecutive lines that both texts hold."""
    windows = {tuple(first[i : i + length]) for i in range(len(first) - length + 1)}
    return [
        tuple(second[i : i + length])
        for i in range(len(second) - length + 1)
        if tuple(second[i : i + length]) in windows
    ]


def test_configs_share_definitions_instead_of_copying_them():
    """No block of 5 identical lines in two config files: shared definitions live in common.yaml."""
    texts = {
        path.name: [line.rstrip() for line in path.read_text().splitlines() if line.strip()]
        for path in sorted(CONFIGS.glob("*.yaml"))
    }
    names = sorted(texts)
    copies = {
        (first, second): repeated_blocks(texts[first], texts[second], 5)
        for index, first in enumerate(names)
        for second in names[index + 1 :]
    }
    assert {pair: blocks for pair, blocks in copies.items() if blocks} == {}

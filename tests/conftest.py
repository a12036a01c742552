"""Shared test set-up: the bundle's ``scripts`` package and the repository's ``scripts/`` tools on sys.path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "scripts", ROOT / "bundle"):  # bundle/ first: ``import scripts`` is the bundle's package
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import phantoms  # noqa: E402


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory):
    """8 non-square PNG phantoms (4 patients) with lung masks, 2 of them with LabelMe files, and metadata.csv."""
    return phantoms.write_dataset(
        tmp_path_factory.mktemp("phantom_dataset"), count=8, formats=("png",), seed=0, labelme=2, rows=200, columns=240
    )


BUNDLE = ROOT / "bundle"
PYTHON = sys.executable
PHANTOM_IMAGE_SIZE = 64  # the phantom model trains and infers at 64x64 to keep the suite fast on a CPU


def bundle_image_size() -> int:
    """The shipped weights' network input size (rows = columns), common.yaml's ``image_size``."""
    import yaml

    return int(yaml.safe_load((BUNDLE / "configs" / "common.yaml").read_text())["image_size"][0])


# the config files of each workflow, merged in this order
WORKFLOW_CONFIGS = {
    "training": ("common.yaml", "train.yaml"),
    "inference": ("common.yaml", "inference.yaml"),
    "evaluate": ("common.yaml", "inference.yaml", "evaluate.yaml"),
    "evaluate_after_training": ("common.yaml", "train.yaml", "evaluate.yaml"),
    "multi_gpu_training": ("common.yaml", "train.yaml", "multi_gpu_train.yaml"),
}


def config_paths(workflow: str, *extra: str) -> list[str]:
    """The config files of a workflow (plus ``extra`` config names merged last), in merge order."""
    return [str(BUNDLE / "configs" / name) for name in (*WORKFLOW_CONFIGS[workflow], *extra)]


def config_files(workflow: str, *extra: str) -> str:
    """The ``--config_file`` argument of a workflow (plus ``extra`` config names merged last)."""
    paths = config_paths(workflow, *extra)
    return paths[0] if len(paths) == 1 else "[" + ",".join(f"'{path}'" for path in paths) + "]"


def bundle_command(*arguments: str) -> list[str]:
    """``python -m monai.bundle <arguments>`` with the bundle's metadata and logging configuration."""
    return [
        PYTHON, "-m", "monai.bundle", *arguments,
        "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
        "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
        "--bundle_root", str(BUNDLE),
    ]  # fmt: skip


def run_bundle(*arguments: str, timeout: int = 600, environment: dict | None = None) -> subprocess.CompletedProcess:
    """Run a bundle command from the repository root as a user would, capturing its output; ``environment`` adds
    variables to this process's environment."""
    return subprocess.run(
        bundle_command(*arguments), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, **(environment or {})},
    )  # fmt: skip


PREPARED_PHANTOMS = dict(count=24, formats=("png",), seed=7, labelme=6, rows=200, columns=240)


def prepare_arguments(source, output) -> list[str]:
    """scripts/prepare_data.py arguments that prepare a phantom dataset into ``output``."""
    return [
        "--images", source.images, "--masks", source.masks, "--labelme", source.labelme,
        "--metadata", source.metadata, "--output", str(output), "--val-fraction", "0.2", "--seed", "0",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def prepared_phantoms(tmp_path_factory):
    """24 PNG phantoms (12 patients) prepared by scripts/prepare_data.py into label maps and datalist.json."""
    import prepare_data

    source = phantoms.write_dataset(tmp_path_factory.mktemp("phantom_source"), **PREPARED_PHANTOMS)
    output = tmp_path_factory.mktemp("phantom_prepared")
    assert prepare_data.main(prepare_arguments(source, output)) == 0
    return output


@pytest.fixture(scope="session")
def phantom_model(prepared_phantoms, tmp_path_factory):
    """A model trained on the phantoms through the documented training command; returns its best checkpoint."""
    output = tmp_path_factory.mktemp("phantom_training")
    result = run_bundle(
        "run", "training", "--config_file", config_files("training"),
        "--dataset_dir", str(prepared_phantoms), "--output_dir", str(output),
        "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]", "--num_epochs", "16", "--val_interval", "4",
        "--learning_rate", "0.003", "--num_workers", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (output / "model.pt").is_file()
    return output / "model.pt"

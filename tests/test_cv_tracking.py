"""The cross-validation's MLflow runs (``TRACKING=mlflow`` in scripts/retrain.sh, scripts/cv_tracking.py).

A 2-fold phantom cross-validation runs the commands retrain.sh runs, each fold a 1-epoch training on the tiny phantom
dataset of test_mlflow_tracking, into the default store of a bundle root of its own (``<root>/runs/mlruns.db``).
``cv_tracking.py start`` runs as a command (bash captures its output); its other steps run in this process, which
saves the seconds each command spends importing MONAI.
"""

import contextlib
import io
import json
import math
import os
import re
import subprocess

import pytest
from cv_tracking import main as cv_tracking_main
from cv_tracking import summary_metrics
from mlflow.tracking import MlflowClient
from test_mlflow_tracking import EXPERIMENT, run_workflow, tiny_dataset, train  # noqa: F401 (a fixture)

from conftest import PHANTOM_IMAGE_SIZE, PYTHON, ROOT, config_files

PARENT_TAG = "mlflow.parentRunId"


def script(name: str, *arguments: str) -> str:
    """Run ``scripts/<name>`` as retrain.sh does (no ``MLFLOW_TRACKING_URI``); returns its stdout."""
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / name), *arguments], capture_output=True, text=True, env=environment, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def cv_tracking(*arguments: str) -> str:
    """``scripts/cv_tracking.py <arguments>`` in this process; returns its output. The ``MLFLOW_TRACKING_URI`` that
    its store sets for the workflows is undone."""
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(output):
        patch.setenv("MLFLOW_TRACKING_URI", "")  # recorded first, so that undoing removes the store's value
        patch.delenv("MLFLOW_TRACKING_URI")
        assert cv_tracking_main(list(arguments)) == 0
    return output.getvalue()


@pytest.fixture(scope="module")
def cross_validation(tiny_dataset, tmp_path_factory):  # noqa: F811 (the fixture)
    """retrain.sh's stage-2 loop over folds 0 and 1: returns the bundle root, the parent run id and the table."""
    root = tmp_path_factory.mktemp("cv_bundle_root")
    store = ["--bundle-root", str(root)]
    parent = script("cv_tracking.py", "start", "--run-name", "cross_validation", "--folds", "0", "1", *store).strip()
    assert re.fullmatch(r"[0-9a-f]{32}", parent), parent  # stdout is the run id alone: bash captures it
    for fold in (0, 1):
        training = root / f"fold_{fold}"
        code, log = train(
            tiny_dataset, training, 1, "--run_name", f"fold_{fold}", "--mlflow_parent_run_id", parent,
            "--seed", str(fold), bundle_root=root,
        )  # fmt: skip
        assert code == 0, log[-4000:]
        fold_run = cv_tracking("run-id", "--run-name", f"fold_{fold}", "--parent-run-id", parent, *store)
        arguments = [
            "run", "--config_file", config_files("evaluate"), "--dataset_dir", str(tiny_dataset),
            "--output_dir", str(root / f"cv_fold{fold}"), "--ckpt_path", str(training / "model_final.pt"),
            "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]",
            "--initialize#0", "$torch.set_num_threads(1)",  # one thread, as TINY for the training
            "--tracking", "mlflow", "--mlflow_parent_run_id", fold_run.strip(),
        ]  # fmt: skip
        code, log = run_workflow(arguments, cwd=root, bundle_root=root)
        assert code == 0, log[-4000:]
    summary = root / "cv_summary.json"
    script("cv_summary.py", str(root / "cv_fold0"), str(root / "cv_fold1"), "--output", str(summary))
    cv_tracking("finish", "--run-id", parent, "--summary", str(summary), *store)
    return root, parent, json.loads(summary.read_text())


def test_cross_validation_is_a_parent_run_with_one_training_run_per_fold(cross_validation):
    root, parent, _ = cross_validation
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 5  # the parent, 2 trainings, 2 evaluations
    run = client.get_run(parent)
    assert (run.info.run_name, run.info.status, run.data.tags["cv_folds"]) == ("cross_validation", "FINISHED", "0 1")
    assert PARENT_TAG not in run.data.tags

    children = {child.info.run_name: child for child in runs if child.data.tags.get(PARENT_TAG) == parent}
    assert sorted(children) == ["fold_0", "fold_1"]
    for fold, child in children.items():
        assert child.info.status == "FINISHED" and child.data.params["max_epochs"] == "1"
        (evaluation,) = [run for run in runs if run.data.tags.get(PARENT_TAG) == child.info.run_id]
        assert evaluation.info.run_name.startswith("evaluate_") and evaluation.info.status == "FINISHED"
        assert evaluation.data.params["ckpt_path"] == str(root / fold / "model_final.pt")
        assert evaluation.data.metrics["images"] == 2


def test_the_parent_run_holds_the_summary_table_as_metrics(cross_validation):
    root, parent, table = cross_validation
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlruns.db'}")
    expected = {
        **{f"cv_fold{fold}/{figure}": value for fold in (0, 1) for figure, value in table[f"cv_fold{fold}"].items()},
        **table["all folds"],
    }
    expected = {key: value for key, value in expected.items() if not math.isnan(value)}
    assert expected["validation_images"] == 4 and expected["cv_fold0/validation_images"] == 2
    assert client.get_run(parent).data.metrics == expected
    assert [item.path for item in client.list_artifacts(parent)] == ["cv_summary.json"]


def test_summary_metric_names():
    """Each fold's figures under ``<fold>/``, the all-folds row without a prefix; keys MLflow allows; NaN left out."""
    table = {
        "cv_fold0": {"opacity_images": 3, "opacity_dice": 0.5, "extent_mae": math.nan},
        "fold#1 (v2)": {"opacity_images": 1, "opacity_dice": 0.25},
        "all folds": {"opacity_images": 4, "opacity_dice": 0.4375, "extent_mae": math.nan},
    }
    assert summary_metrics(table) == {
        "cv_fold0/opacity_images": 3, "cv_fold0/opacity_dice": 0.5,
        "fold_1 _v2_/opacity_images": 1, "fold_1 _v2_/opacity_dice": 0.25,
        "opacity_images": 4, "opacity_dice": 0.4375,
    }  # fmt: skip

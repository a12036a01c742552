"""The inference command's outputs over a run's life: a streamed table that a kill or Ctrl-C leaves valid, resume,
the output folder's lock, reruns that own their outputs, non-UTF-8 names, nested folders and file permissions."""

import csv
import fcntl
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

import phantoms
from conftest import PHANTOM_IMAGE_SIZE, ROOT, bundle_command, config_files

NAMES = [f"case_{index:02d}.png" for index in range(30)]


def command(dataset_dir, output_dir, model, *extra) -> list[str]:
    return bundle_command(
        "run", "--config_file", config_files("inference"), "--dataset_dir", str(dataset_dir),
        "--output_dir", str(output_dir), "--ckpt_path", str(model),
        "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]", *extra,
    )  # fmt: skip


def infer(dataset_dir, output_dir, model, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(dataset_dir, output_dir, model, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def start(dataset_dir, output_dir, model, log_path) -> subprocess.Popen:
    """The inference command in the background, its output going to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(command(dataset_dir, output_dir, model), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def read_table(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def wait_for_rows(output_dir, at_least: int, process: subprocess.Popen, log_path) -> list[dict]:
    """The streamed table once it holds ``at_least`` rows (the run must still be going)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended first:\n{log_path.read_text()[-3000:]}"
        path = output_dir / "severity.incomplete.csv"
        rows = read_table(path) if path.exists() else []
        if len(rows) >= at_least:
            return rows
        time.sleep(0.02)
    raise AssertionError("no rows within 300 s")


def summary(output_dir) -> dict:
    return json.loads((output_dir / "severity.json").read_text())


def lock_is_free(output_dir) -> bool:
    with open(output_dir / ".severity.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def mask_times(output_dir, names) -> dict:
    return {name: (output_dir / name[:-4] / f"{name[:-4]}_lung.png").stat().st_mtime_ns for name in names}


@pytest.fixture(scope="module")
def phantom_image():
    return phantoms.make_phantom(200, 240, seed=3).image


def write_inputs(folder, image, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        phantoms.write_png(folder / name, image)


def test_killed_and_interrupted_runs_leave_valid_tables_and_a_rerun_finishes(phantom_model, phantom_image, tmp_path):
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    write_inputs(inputs, phantom_image, NAMES)

    killed = start(inputs, output, phantom_model, tmp_path / "killed.log")
    wait_for_rows(output, 1, killed, tmp_path / "killed.log")
    assert not lock_is_free(output)  # the running command holds the folder
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(60) == -signal.SIGKILL
    assert lock_is_free(output)  # released by the OS
    after_kill = read_table(output / "severity.incomplete.csv")  # the last table written: valid, rows done, in order
    assert not (output / "severity.csv").exists()
    done = [row["image"] for row in after_kill]
    assert 1 <= len(done) < len(NAMES) and done == [name for name in NAMES if name in done]
    assert {row["status"] for row in after_kill} == {"ok"}
    record = summary(output)
    assert record["complete"] is False and record["total"] == len(NAMES) and record["done"] >= len(done)
    killed_times = mask_times(output, done)

    interrupted = start(inputs, output, phantom_model, tmp_path / "interrupted.log")
    wait_for_rows(output, record["done"] + 1, interrupted, tmp_path / "interrupted.log")  # resumed rows, and one more
    interrupted.send_signal(signal.SIGSTOP)  # paused with the lock held: a second run into the folder must refuse
    try:
        refused = infer(inputs, output, phantom_model)
    finally:
        interrupted.send_signal(signal.SIGCONT)
    interrupted.send_signal(signal.SIGINT)
    assert interrupted.wait(120) == 128 + signal.SIGINT
    assert refused.returncode != 0
    assert f"another run is writing into the output folder {str(output)!r}" in refused.stdout + refused.stderr
    after_interrupt = read_table(output / "severity.incomplete.csv")
    log = (tmp_path / "interrupted.log").read_text()
    assert f"interrupted after {len(after_interrupt)} of {len(NAMES)} files; run again to finish" in log
    assert not (output / "severity.csv").exists() and summary(output)["complete"] is False
    assert len(done) < len(after_interrupt) < len(NAMES)
    assert after_interrupt[: len(done)] == after_kill  # rows of the killed run kept as they were, in input order
    assert mask_times(output, done) == killed_times  # ... and not recomputed
    interrupted_times = mask_times(output, [row["image"] for row in after_interrupt])

    finished = infer(inputs, output, phantom_model)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert f"resuming: {len(after_interrupt)} of {len(NAMES)} files keep their rows" in finished.stdout
    rows = read_table(output / "severity.csv")
    assert [row["image"] for row in rows] == NAMES and {row["status"] for row in rows} == {"ok"}
    assert rows[: len(after_interrupt)] == after_interrupt
    assert mask_times(output, [row["image"] for row in after_interrupt]) == interrupted_times
    assert not (output / "severity.incomplete.csv").exists()
    record = summary(output)
    assert (record["complete"], record["done"], record["total"]) == (True, len(NAMES), len(NAMES))
    assert [entry["image"] for entry in record["images"]] == NAMES


def test_a_rerun_owns_the_outputs_of_the_files_it_is_given(phantom_model, phantom_image, tmp_path):
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    write_inputs(inputs, phantom_image, ["a.png", "b.png", "c.png"])
    first = infer(inputs, output, phantom_model)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (output / "c" / "notes.txt").write_text("the user's own file")
    kept_time = mask_times(output, ["a.png"])

    (inputs / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # b is now corrupt, c was deleted
    (inputs / "c.png").unlink()
    second = infer(inputs, output, phantom_model)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = read_table(output / "severity.csv")
    assert [(row["image"], row["status"]) for row in rows] == [("a.png", "ok"), ("b.png", "error")]
    assert "cannot decode" in rows[1]["message"]
    assert not (output / "b").exists()  # its old masks and overlay, then its empty folder
    assert sorted(path.name for path in (output / "c").iterdir()) == ["notes.txt"]  # only our files go
    assert "no longer listed (c.png)" in second.stdout
    assert [entry["image"] for entry in summary(output)["images"]] == ["a.png", "b.png"]
    assert mask_times(output, ["a.png"]) == kept_time  # unchanged input: resumed

    recomputed = infer(inputs, output, phantom_model, "--resume", "false")
    assert recomputed.returncode == 0, recomputed.stdout[-3000:] + recomputed.stderr[-3000:]
    assert mask_times(output, ["a.png"]) != kept_time
    assert read_table(output / "severity.csv") == rows


NON_UTF8_NAME = b"caf\xe9.png"  # Latin-1 bytes: not valid UTF-8


@pytest.fixture(scope="module")
def odd_folder_run(phantom_model, phantom_image, tmp_path_factory):
    """Nested study/series folders, a non-UTF-8 name, hidden files and the output folder inside the input folder,
    run with --recursive true under umask 022."""
    inputs = tmp_path_factory.mktemp("odd_inputs")
    write_inputs(inputs, phantom_image, ["plain.png", "study1/series1/img.png", "study1/series2/img.png"])
    phantoms.write_dicom(inputs / "study2" / "IM0001", phantom_image)
    write_inputs(inputs, phantom_image, [".hidden.png", ".hidden_folder/x.png", "results/old/old_lung.png"])
    phantoms.write_png(inputs / "latin1.png", phantom_image)
    os.rename(inputs / "latin1.png", os.path.join(os.fsencode(inputs), NON_UTF8_NAME))
    output = inputs / "results"
    umask = os.umask(0o022)
    try:
        result = infer(inputs, output, phantom_model, "--recursive", "true")
    finally:
        os.umask(umask)
    return output, result


def test_nested_folders_keep_their_relative_paths(odd_folder_run):
    output, result = odd_folder_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_table(output / "severity.csv")
    expected = ["caf\\xe9.png", "plain.png", "study1/series1/img.png", "study1/series2/img.png", "study2/IM0001"]
    assert [row["image"] for row in rows] == expected  # no hidden file, nothing from the output folder
    assert {row["status"] for row in rows} == {"ok"}
    for folder in ("study1/series1/img", "study1/series2/img", "study2/IM0001"):
        stem = folder.rsplit("/", 1)[1]
        expected_files = {f"{stem}_{kind}.png" for kind in ("lung", "opacity", "overlay")}
        assert {path.name for path in (output / folder).iterdir()} == expected_files
    assert (output / "old" / "old_lung.png").is_file()  # not ours: kept


def test_a_file_name_that_is_not_utf8_is_processed(odd_folder_run):
    output, _ = odd_folder_run
    row = read_table(output / "severity.csv")[0]
    assert row["image"] == "caf\\xe9.png" and row["status"] == "ok"
    lung = output / "caf\\xe9" / "caf\\xe9_lung.png"  # table and folder names match
    assert lung.is_file() and lung.stat().st_size > 0


def test_output_files_follow_the_umask(odd_folder_run):
    output, _ = odd_folder_run
    files = [output / "severity.csv", output / "severity.json", *(output / "plain").iterdir()]
    assert len(files) == 5
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {oct(0o644)}


def test_a_folder_of_subfolders_asks_for_recursive(tmp_path):
    from scripts.inference_inputs import list_inputs

    (tmp_path / "study1" / "series1").mkdir(parents=True)
    (tmp_path / "study2").mkdir()
    (tmp_path / "study1" / "series1" / "IM0001").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="holds no file but 2 subfolders; pass --recursive true"):
        list_inputs(str(tmp_path))
    assert [item["name"] for item in list_inputs(str(tmp_path), recursive="true")] == ["study1/series1/IM0001"]


def writer_for(output_dir, inputs):
    from scripts.severity_handler import SeverityWriter

    return SeverityWriter(str(output_dir), inputs=inputs, fail_if_none_ok=False)


def scored(writer, path):
    """Hand one image and a class map with a lung field to the writer, as the inference evaluator does."""
    import torch
    from monai.data import MetaTensor

    class_map = np.zeros((100, 120), np.uint8)
    class_map[20:80, 10:50] = 1
    class_map[20:80, 70:110] = 1  # two lung fields, dark on a brighter body: the input gate passes them
    meta = {"filename_or_obj": str(path), "spacing_mm": (float("nan"),) * 2, "error": "", "warnings": "w1; w2",
            "spacing_source": "PixelSpacing"}  # fmt: skip
    display = torch.as_tensor((np.where(class_map > 0, 60, 170) + np.arange(120)[None, :] % 24)[None].astype(np.uint8))
    return writer.add(MetaTensor(torch.zeros(1, 8, 8), meta=meta), torch.as_tensor(class_map[None]), display)


def test_every_listed_file_gets_exactly_one_row(tmp_path):
    inputs = [{"image": str(tmp_path / name), "name": name} for name in ("a.png", "b.png")]
    for item in inputs:
        open(item["image"], "wb").close()
    output = tmp_path / "output"
    output.mkdir()
    (output / "severity.csv").write_text("image,status\nold.png,ok\n")  # an earlier run's table
    writer = writer_for(output, inputs)
    writer.start()
    assert not (output / "severity.csv").exists() and read_table(output / "severity.incomplete.csv") == []
    scored(writer, inputs[0]["image"])
    scored(writer, inputs[0]["image"])  # delivered twice: one row
    with pytest.raises(RuntimeError, match="1 of 2 input files were not processed"):
        writer.completed()  # b never delivered
    rows = read_table(output / "severity.csv")
    assert [(row["image"], row["status"], row["warning"]) for row in rows] == [
        ("a.png", "ok", "w1; w2"), ("b.png", "error", "")
    ]  # fmt: skip
    not_processed = "b.png: not processed: the loader failed or stopped before this file (see the log above)"
    assert rows[1]["message"].endswith(not_processed)
    assert list(rows[0])[:4] == ["image", "status", "message", "warning"]
    record = summary(output)
    assert record["images"][0]["spacing_source"] == "PixelSpacing" and record["complete"] is True

"""Progress of the long runs: plain lines in a log, a bar on a terminal, per-epoch training lines, a summary line at
the end of inference, and nothing with --progress false."""

import csv
import fcntl
import os
import pty
import re
import struct
import subprocess
import termios

import pytest

import phantoms
from conftest import PHANTOM_IMAGE_SIZE, ROOT, bundle_command, config_files, run_bundle
from scripts.progress import ProgressLines

READABLE = [f"case_{index:02d}.png" for index in range(12)]
UNREADABLE = "z_unreadable.png"
PROGRESS_LINE = re.compile(
    r"Progress - INFO - inference: (\d+)/13 images \(\d+ %\), [\d.]+ images/(?:s|min), (\d+) error rows, "
    r"(?:about \d+:\d\d:\d\d left|\d+:\d\d:\d\d in all)$",
    re.MULTILINE,
)
SUMMARY_LINE = re.compile(
    r"SeverityWriter - INFO - finished: (\d+) files, (\d+) ok rows, (\d+) error rows, wall time \d+:\d\d:\d\d; "
    r"table: (.+)$",
    re.MULTILINE,
)
EPOCH_LINE = re.compile(
    r"Progress - INFO - training: epoch (\d)/2, 3 iterations, mean loss \d+\.\d{4}; validation \(epoch \1\): "
    r"val_selection_score \d\.\d{4}, .*; best val_selection_score \d\.\d{4} at epoch \d; \d+:\d\d:\d\d per epoch"
)


def inference_arguments(dataset_dir, output_dir, model, *extra) -> list[str]:
    return [
        "run", "--config_file", config_files("inference"), "--dataset_dir", str(dataset_dir),
        "--output_dir", str(output_dir), "--ckpt_path", str(model),
        "--image_size", f"[{PHANTOM_IMAGE_SIZE},{PHANTOM_IMAGE_SIZE}]", *extra,
    ]  # fmt: skip


def run_in_terminal(command: list[str], timeout: int = 600) -> tuple[int, str]:
    """Run ``command`` with stdout and stderr on a pseudo-terminal of 40 x 160 characters; its exit code and output."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return process.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """12 readable phantom radiographs and one file that is not an image (its row is an error row)."""
    folder = tmp_path_factory.mktemp("progress_inputs")
    image = phantoms.make_phantom(200, 240, seed=3).image
    for name in READABLE:
        phantoms.write_png(folder / name, image)
    (folder / UNREADABLE).write_bytes(b"not an image")
    return folder


def table_statuses(output_dir) -> list[str]:
    with open(output_dir / "severity.csv", newline="", encoding="utf-8") as handle:
        return [row["status"] for row in csv.DictReader(handle)]


def test_progress_lines_come_at_every_tenth_and_at_the_end():
    lines = []
    progress = ProgressLines("caching", 100, "images", details=lambda: "2 refused", write=lines.append)
    for _ in range(100):
        progress.advance()
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert re.fullmatch(r"caching: 10/100 images \(10 %\), [\d.]+ images/s, 2 refused, about 0:00:00 left", lines[1])
    assert re.fullmatch(r"caching: 100/100 images \(100 %\), [\d.]+ images/s, 2 refused, 0:00:00 in all", lines[-1])


def test_inference_in_a_log_writes_progress_lines_and_a_summary_line(phantom_model, image_folder, tmp_path):
    result = run_bundle(*inference_arguments(image_folder, tmp_path, phantom_model))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    progress = [(int(done), int(errors)) for done, errors in PROGRESS_LINE.findall(log)]
    expected = [1, 2, 4, 6, 8, 10, 12, 13]  # the first image, then every 2 (a tenth, rounded up), and the last
    assert [done for done, _ in progress] == expected
    assert progress[-1][1] <= 1  # the unreadable file comes last; its row may still be on its way
    assert SUMMARY_LINE.findall(log) == [("13", "12", "1", str(tmp_path / "severity.csv"))]
    assert table_statuses(tmp_path) == ["ok"] * 12 + ["error"]
    assert "\r" not in log and "it/s" not in log  # no bar in a log file


def test_inference_on_a_terminal_shows_a_progress_bar(phantom_model, image_folder, tmp_path):
    code, output = run_in_terminal(bundle_command(*inference_arguments(image_folder, tmp_path, phantom_model)))
    assert code == 0, output[-3000:]
    bars = re.findall(r"inference: \[(\d+)/13\] +\d+%\|[^|\r\n]*\| [\d.]+ images/s, error rows=\d+", output)
    assert bars and bars[-1] == "13"  # ignite's tqdm bar, up to the last image
    assert "Progress - INFO" not in output  # the bar replaces the plain lines
    assert len(SUMMARY_LINE.findall(output)) == 1


def test_progress_false_shows_no_progress_but_the_summary(phantom_model, image_folder, tmp_path):
    result = run_bundle(*inference_arguments(image_folder, tmp_path, phantom_model, "--progress", "false"))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Progress - INFO" not in log
    assert SUMMARY_LINE.findall(log) == [("13", "12", "1", str(tmp_path / "severity.csv"))]


def test_training_shows_caching_and_epoch_progress_without_tqdm_warning(prepared_phantoms, tmp_path):
    result = run_bundle(
        "run", "training", "--config_file", config_files("training"), "--dataset_dir", str(prepared_phantoms),
        "--output_dir", str(tmp_path), "--image_size", "[32,32]", "--num_epochs", "2", "--val_interval", "1",
        "--num_workers", "0",
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "tqdm is not installed" not in log and "\r" not in log
    assert re.search(r"Progress - INFO - caching training images: 22/22 images \(100 %\), .* in all", log)
    assert re.search(r"Progress - INFO - caching validation images: 2/2 images \(100 %\), .* in all", log)
    epochs = EPOCH_LINE.findall(log)
    assert epochs == ["1", "2"], log[-3000:]
    assert re.search(r"training: epoch 1/2, .* per epoch, about \d+:\d\d:\d\d left", log)
    assert "Epoch: 2/2, Iter: 3/3 -- train_loss:" in log  # MONAI's StatsHandler: the loss of every iteration

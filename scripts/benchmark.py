#!/usr/bin/env python
"""Measure the bundle against the bare network, on this machine, and print the table.

1. Floor: the bare network's forward time per image at the inference size (warm, batch 1), on PyTorch (inference
   mode) and on ONNX Runtime, and the images/s of a bare PyTorch training loop (same network, loss, optimiser, batch
   and size, data already in memory), run right before the bundle's training, as many steps as one of its epochs,
   once per timed epoch (the median is the floor; this shared machine's speed drifts within minutes).
2. Bundle: end-to-end inference time per image through the documented inference command (files to masks and CSV;
   also without the overlay PNGs), and the images/s of the bundle's SupervisedTrainer on the same data (the median
   of its epochs after the first). Start-up (process, imports, model load, and the ONNX export and session, which
   the bundle makes at its first image) is reported separately, as the baseline's: for a first run of the weights
   (an empty ONNX cache, which the benchmark gives the bundle in its own temporary folder) and, as the median of
   short runs over 3 images, for later runs (the export read from the cache); so is the shut-down after the last
   image.
3. Baseline: the same outputs (masks, overlays, table) from the hand-written loop a user would write instead of the
   bundle, without MONAI (scripts/baseline_inference.py: Pillow, numpy, ONNX Runtime, one image at a time), over the
   same images, with and without overlays; its start-up (ONNX export, session) is reported separately.
4. Ratios bundle / baseline and bundle / floor (the floor of the runtime the bundle uses: ONNX Runtime on a CPU,
   PyTorch on CUDA), and the peak resident memory of inference over 50 and over 200 images.

Uses the radiographs of ../shared/data/cohen-cxr when present, else generated 1024 x 1024 phantoms.

  .venv/bin/python scripts/benchmark.py [--count 50] [--memory-count 200] [--output outputs/benchmark.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUNDLE = os.path.join(ROOT, "bundle")
SHARED_IMAGES = os.path.join(ROOT, "..", "shared", "data", "cohen-cxr", "images")
sys.path.insert(0, BUNDLE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from monai.networks.nets import FlexibleUNet  # noqa: E402

from scripts.losses import PartialLabelDiceCELoss  # noqa: E402
from scripts.onnx_runtime import OnnxRuntimeNetwork  # noqa: E402


def network() -> torch.nn.Module:
    return FlexibleUNet(spatial_dims=2, in_channels=1, out_channels=3, backbone="resnet18", pretrained=False)


def floor_inference(size: int, device: torch.device, runtime: str = "torch", repeats: int = 30) -> float:
    """Median seconds per image of a bare forward pass (batch 1, warm) on PyTorch or ONNX Runtime."""
    model = network().to(device).eval()
    weights = os.path.join(BUNDLE, "models", "model.pt")
    if os.path.isfile(weights):
        model.load_state_dict(torch.load(weights, map_location=device))
    if runtime == "onnxruntime":
        model = OnnxRuntimeNetwork(model)
    image = torch.rand(1, 1, size, size, device=device)
    times = []
    with torch.inference_mode():
        for index in range(repeats + 5):
            start = time.perf_counter()
            model(image).argmax(1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index >= 5:
                times.append(time.perf_counter() - start)
    return float(np.median(times))


def floor_training(size: int, batch: int, device: torch.device, iterations: int, repeats: int) -> list[float]:
    """Images per second of a bare training loop on tensors already in memory, for each of ``repeats`` runs of
    ``iterations`` steps (after 2 warm-up steps)."""
    model = network().to(device).train()
    loss_function = PartialLabelDiceCELoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images = torch.rand(batch, 1, size, size, device=device)
    labels = torch.randint(0, 4, (batch, 1, size, size), device=device).float()

    def step():
        optimizer.zero_grad()
        loss_function(model(images), labels).backward()
        optimizer.step()

    for _ in range(2):
        step()
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        speeds.append(batch * iterations / (time.perf_counter() - start))
    return speeds


def input_images(folder: str, count: int) -> list[str]:
    """``count`` radiographs in ``folder`` (real ones when available, repeated if needed)."""
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(SHARED_IMAGES):
        sources = [os.path.join(SHARED_IMAGES, name) for name in sorted(os.listdir(SHARED_IMAGES))]
    else:
        import phantoms

        sources = []
        for index in range(min(count, 20)):
            path = os.path.join(tempfile.gettempdir(), f"benchmark_phantom_{index:03d}.png")
            phantoms.write_png(path, phantoms.make_phantom(1024, 1024, seed=index).image, bits=16)
            sources.append(path)
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        target = os.path.join(folder, f"{index:04d}_{os.path.basename(source)}")
        shutil.copyfile(source, target)
        paths.append(target)
    return paths


def largest_images(folder: str, count: int) -> dict[str, int]:
    """The ``count`` largest radiographs (by pixels) of ../shared/data/cohen-cxr copied into ``folder``: {path: pixel
    count}; {} without it."""
    from PIL import Image

    if not os.path.isdir(SHARED_IMAGES):
        return {}
    sizes = {}
    for name in os.listdir(SHARED_IMAGES):
        with Image.open(os.path.join(SHARED_IMAGES, name)) as image:  # reads the header only
            sizes[name] = image.size[0] * image.size[1]
    os.makedirs(folder, exist_ok=True)
    chosen = sorted(sizes, key=lambda name: (-sizes[name], name))[:count]
    for name in chosen:
        shutil.copyfile(os.path.join(SHARED_IMAGES, name), os.path.join(folder, name))
    return {os.path.join(folder, name): sizes[name] for name in chosen}


def engine_seconds(log: str, pattern: str) -> float:
    """Seconds of the last ignite 'Time taken: H:MM:SS.fff' following ``pattern`` in a log."""
    matches = re.findall(pattern + r".*?Time taken: (\d+):(\d+):([\d.]+)", log)
    if not matches:
        raise RuntimeError(f"no '{pattern}' timing in the log:\n{log[-2000:]}")
    hours, minutes, seconds = matches[-1]
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def config_list(*names: str) -> str:
    """``--config_file`` value merging the bundle's config files ``names`` in order."""
    return "[" + ",".join(repr(os.path.join(BUNDLE, "configs", name)) for name in names) + "]"


def bundle_command(*arguments: str) -> list[str]:
    configs = os.path.join(BUNDLE, "configs")
    return [sys.executable, "-m", "monai.bundle", *arguments, "--meta_file", os.path.join(configs, "metadata.json"),
            "--logging_file", os.path.join(configs, "logging.conf"), "--bundle_root", BUNDLE]  # fmt: skip


# runs a command and prints the peak resident memory of its process tree (RUSAGE_CHILDREN of this wrapper only)
PEAK_MEMORY_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(f'PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); sys.exit(code)"
)


def bundle_inference(folder: str, output: str, *options: str) -> dict:
    """Run the documented inference command; return its seconds (wall, engine, start-up, shut-down) and peak memory.

    ``engine_s`` leaves out the ONNX export (or its read from the cache) and the session creation the run logs (made
    once, at the first image). ``startup_s`` counts them, with the time from the process start to the engine's start
    (imports, configs, model load): the baseline's start-up holds the same work. ``shutdown_s`` is the time from the
    engine's end to the process's end (Python tearing down its modules).
    """
    command = bundle_command("run", "--config_file", config_list("common.yaml", "inference.yaml"),
                             "--dataset_dir", folder, "--output_dir", output, *options)  # fmt: skip
    started, start = time.time(), time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_WRAPPER, *command], capture_output=True, text=True, cwd=ROOT, check=False
    )
    wall, ended = time.perf_counter() - start, time.time()
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    peak_kb = int(re.findall(r"PEAK_RSS_KB=(\d+)", result.stderr)[-1])
    log = result.stdout + result.stderr
    session_times = re.findall(r"ONNX Runtime session for input .* ready in ([\d.]+) s", log)
    sessions = sum(float(seconds) for seconds in session_times)
    engine = engine_seconds(log, "Engine run finished") - sessions
    return {
        "wall_s": wall,
        "engine_s": engine,
        "startup_s": log_time(log, "Engine run resuming", first=True) - started + sessions,
        "shutdown_s": ended - log_time(log, "Engine run finished", first=False),
        "peak_rss_mb": peak_kb / 1024,
    }


def startup_runs(images: list[str], work: str, cache: tuple[str, str], runs: int) -> dict:
    """Start-up and shut-down seconds of ``runs`` bundle runs over ``images`` (the ONNX export in the cache)."""
    folder = os.path.join(work, "inputs")
    os.makedirs(folder, exist_ok=True)
    for path in images:
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
    timed = [bundle_inference(folder, os.path.join(work, f"outputs_{run}"), *cache) for run in range(runs)]
    return {
        "bundle_startup_s_runs": [run["startup_s"] for run in timed],
        "bundle_startup_s": float(np.median([run["startup_s"] for run in timed])),
        "bundle_shutdown_s_runs": [run["shutdown_s"] for run in timed],
    }


def log_time(log: str, pattern: str, first: bool) -> float:
    """The epoch seconds of the first (or last) log line holding ``pattern`` (logging's 'YYYY-MM-DD HH:MM:SS,mmm')."""
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + pattern, log, flags=re.MULTILINE)
    if not stamps:
        raise RuntimeError(f"no '{pattern}' line in the log:\n{log[-2000:]}")
    return datetime.datetime.strptime(stamps[0 if first else -1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def baseline_inference_runs(folder: str, work: str, size: int, overlays_only: bool = False) -> dict:
    """Seconds per image of the hand-written baseline over the images of ``folder``, with and without overlays (or
    with only), and its start-up (the bundle's ONNX export of the shipped weights at ``size``, the session)."""
    import baseline_inference

    start = time.perf_counter()
    onnx_path = baseline_inference.export_model(os.path.join(BUNDLE, "models", "model.pt"), size, work)
    model = baseline_inference.load_model(onnx_path, checkpoint=os.path.join(BUNDLE, "models", "model.pt"))
    figures = {"baseline_startup_s": time.perf_counter() - start}
    paths = baseline_inference.list_images(folder)
    for run_name, overlays in (("", True),) if overlays_only else (("", True), ("_no_overlays", False)):
        seconds = baseline_inference.run(paths, os.path.join(work, f"baseline{run_name}"), model, overlays)
        figures[f"baseline_inference{run_name}_s_per_image"] = seconds / len(paths)
    return figures


def bundle_training(images: list[str], work: str, size: int, batch: int, epochs: int) -> list[float]:
    """Images per second of the bundle's SupervisedTrainer in each epoch after the first (data cached, checkpoint
    written every epoch), no validation."""
    from PIL import Image

    labels = os.path.join(work, "labels")
    os.makedirs(labels, exist_ok=True)
    items = []
    for path in images:
        with Image.open(path) as image:
            columns, rows = image.size
        label = os.path.join(labels, os.path.basename(path) + ".png")
        mask = np.zeros((rows, columns), np.uint8)
        mask[rows // 5 : 4 * rows // 5, columns // 8 : 3 * columns // 8] = 3  # a lung-only label, as from V7 masks
        mask[rows // 5 : 4 * rows // 5, 5 * columns // 8 : 7 * columns // 8] = 3
        Image.fromarray(mask).save(label)
        items.append({"image": path, "label": label})
    with open(os.path.join(work, "datalist.json"), "w") as handle:
        json.dump({"training": items, "validation": items[:batch]}, handle)
    command = bundle_command("run", "training", "--config_file", config_list("common.yaml", "train.yaml"),
                             "--dataset_dir", work, "--output_dir", os.path.join(work, "run"),
                             "--num_epochs", str(epochs), "--val_interval", "100", "--batch_size", str(batch),
                             "--image_size", f"[{size},{size}]")  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    log = result.stdout + result.stderr
    return [
        len(items) / engine_seconds(log, rf"SupervisedTrainer - INFO - Epoch\[{epoch}\] Complete")
        for epoch in range(2, epochs + 1)
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50, help="radiographs for the inference timing (>= 50)")
    parser.add_argument("--memory-count", type=int, default=200, help="radiographs for the peak-memory run")
    parser.add_argument("--largest", type=int, default=20, help="the largest cohen-cxr radiographs, timed apart")
    parser.add_argument("--train-images", type=int, default=48, help="radiographs per training epoch")
    parser.add_argument("--train-epochs", type=int, default=4, help="training epochs; all but the first are timed")
    parser.add_argument("--startup-runs", type=int, default=5, help="short runs (3 images) timing start-up")
    parser.add_argument("--size", type=int, help="network input size (default: the bundle's, common.yaml image_size)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--output", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.size is None:
        import baseline_inference

        args.size = baseline_inference.NETWORK_SIZE

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = tempfile.mkdtemp(prefix="cxr_benchmark_")
    try:
        figures = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}, device {device}"
            + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
            "data": "../shared/data/cohen-cxr radiographs" if os.path.isdir(SHARED_IMAGES) else "1024x1024 phantoms",
        }
        figures["runtime"] = "torch" if device.type == "cuda" else "onnxruntime"  # as inference.yaml chooses
        figures["floor_torch_inference_s_per_image"] = floor_inference(args.size, device, "torch")
        if device.type == "cpu":
            figures["floor_onnxruntime_inference_s_per_image"] = floor_inference(args.size, device, "onnxruntime")
        figures["floor_inference_s_per_image"] = figures[f"floor_{figures['runtime']}_inference_s_per_image"]

        images = input_images(os.path.join(work, "inputs"), args.count)
        cache = ("--onnx_cache_dir", os.path.join(work, "onnx_cache"))  # empty at the first run
        run = bundle_inference(os.path.dirname(images[0]), os.path.join(work, "outputs"), *cache)
        figures["bundle_inference_s_per_image"] = run["engine_s"] / args.count
        figures["bundle_startup_first_run_s"] = run["startup_s"]
        figures["peak_rss_mb_inference_small"] = run["peak_rss_mb"]
        masks_only = bundle_inference(
            os.path.dirname(images[0]), os.path.join(work, "masks_only"), "--write_overlays", "false", *cache
        )
        figures["bundle_inference_no_overlays_s_per_image"] = masks_only["engine_s"] / args.count
        figures.update(startup_runs(images[:3], os.path.join(work, "startup"), cache, args.startup_runs))
        figures.update(baseline_inference_runs(os.path.dirname(images[0]), os.path.join(work, "baseline"), args.size))
        largest = largest_images(os.path.join(work, "inputs_largest"), args.largest)
        if largest:
            figures["largest_megapixels_mean"] = float(np.mean(list(largest.values()))) / 1e6
            folder = os.path.dirname(next(iter(largest)))
            run = bundle_inference(folder, os.path.join(work, "outputs_largest"), *cache)
            figures["largest_bundle_inference_s_per_image"] = run["engine_s"] / len(largest)
            baseline = baseline_inference_runs(
                folder, os.path.join(work, "baseline_largest"), args.size, overlays_only=True
            )
            figures["largest_baseline_inference_s_per_image"] = baseline["baseline_inference_s_per_image"]
            figures["largest_ratio_bundle_over_baseline"] = (
                figures["largest_bundle_inference_s_per_image"] / figures["largest_baseline_inference_s_per_image"]
            )
        many = input_images(os.path.join(work, "inputs_many"), args.memory_count)
        figures["peak_rss_mb_inference_large"] = bundle_inference(
            os.path.dirname(many[0]), os.path.join(work, "outputs_many"), *cache
        )["peak_rss_mb"]
        # the bare loop right before the trainer, as many steps as one of its epochs: this shared machine drifts
        train_images = images[: args.train_images]
        steps = -(-len(train_images) // args.batch)
        floor_speeds = floor_training(args.size, args.batch, device, steps, repeats=args.train_epochs - 1)
        bundle_speeds = bundle_training(
            train_images, os.path.join(work, "train"), args.size, args.batch, args.train_epochs
        )
        figures["training_images_per_epoch"] = len(train_images)
        figures["floor_training_images_per_s_runs"] = floor_speeds
        figures["bundle_training_images_per_s_epochs"] = bundle_speeds
        figures["floor_training_images_per_s"] = float(np.median(floor_speeds))
        figures["bundle_training_images_per_s"] = float(np.median(bundle_speeds))
        for run_name in ("", "_no_overlays"):
            bundle_seconds = figures[f"bundle_inference{run_name}_s_per_image"]
            figures[f"inference{run_name}_ratio_bundle_over_floor"] = (
                bundle_seconds / figures["floor_inference_s_per_image"]
            )
            figures[f"inference{run_name}_ratio_bundle_over_baseline"] = (
                bundle_seconds / figures[f"baseline_inference{run_name}_s_per_image"]
            )
        figures["training_ratio_bundle_over_floor"] = (
            figures["bundle_training_images_per_s"] / figures["floor_training_images_per_s"]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {figures['machine']}; data: {figures['data']}; size {args.size}, training batch {args.batch}")
    floors = ", ".join(
        f"{runtime} {figures[f'floor_{runtime}_inference_s_per_image']:.3f} s" for runtime in ("torch", "onnxruntime")
        if f"floor_{runtime}_inference_s_per_image" in figures
    )  # fmt: skip
    print(f"bare network per image: {floors}; the bundle runs on {figures['runtime']}, the floor below")
    rows = [
        ("inference, s per image", figures["floor_inference_s_per_image"], figures["baseline_inference_s_per_image"],
         figures["bundle_inference_s_per_image"], figures["inference_ratio_bundle_over_baseline"],
         figures["inference_ratio_bundle_over_floor"]),
        ("  without overlays", figures["floor_inference_s_per_image"],
         figures["baseline_inference_no_overlays_s_per_image"], figures["bundle_inference_no_overlays_s_per_image"],
         figures["inference_no_overlays_ratio_bundle_over_baseline"],
         figures["inference_no_overlays_ratio_bundle_over_floor"]),
        ("training, images per s", figures["floor_training_images_per_s"], None,
         figures["bundle_training_images_per_s"], None, figures["training_ratio_bundle_over_floor"]),
    ]  # fmt: skip
    print(f"{'':28s}{'floor':>10s}{'baseline':>10s}{'bundle':>10s}{'bundle/baseline':>17s}{'bundle/floor':>14s}")
    for name, floor, baseline, bundle, over_baseline, over_floor in rows:
        baseline_text = "-" if baseline is None else f"{baseline:.3f}"
        over_baseline_text = "-" if over_baseline is None else f"{over_baseline:.2f}"
        print(f"{name:28s}{floor:10.3f}{baseline_text:>10s}{bundle:10.3f}{over_baseline_text:>17s}{over_floor:14.2f}")
    if "largest_bundle_inference_s_per_image" in figures:
        print(
            f"{'the ' + str(args.largest) + ' largest radiographs':28s}{'':10s}"
            f"{figures['largest_baseline_inference_s_per_image']:10.3f}"
            f"{figures['largest_bundle_inference_s_per_image']:10.3f}"
            f"{figures['largest_ratio_bundle_over_baseline']:17.2f}"
            f"   (mean {figures['largest_megapixels_mean']:.1f} Mpx, with overlays)"
        )
    floor_speeds, bundle_speeds = (
        figures["floor_training_images_per_s_runs"],
        figures["bundle_training_images_per_s_epochs"],
    )
    print(
        f"training (medians above): bare loop {min(floor_speeds):.2f}-{max(floor_speeds):.2f} images/s over "
        f"{len(floor_speeds)} runs; bundle {min(bundle_speeds):.2f}-{max(bundle_speeds):.2f} over epochs 2-"
        f"{args.train_epochs} of {figures['training_images_per_epoch']} images"
    )
    print("baseline: the same outputs from a plain loop without MONAI (scripts/baseline_inference.py)")
    startups, shutdowns = figures["bundle_startup_s_runs"], figures["bundle_shutdown_s_runs"]
    print(
        f"inference start-up (process, imports, model load, ONNX model and session): median "
        f"{figures['bundle_startup_s']:.1f} s ({min(startups):.1f}-{max(startups):.1f}) over {len(startups)} runs with "
        f"the export in the cache; {figures['bundle_startup_first_run_s']:.1f} s at the first run of the weights "
        f"(exported); baseline start-up (ONNX export, session): {figures['baseline_startup_s']:.1f} s"
    )
    print(f"inference shut-down (the engine's end to the process's end): {min(shutdowns):.1f}-{max(shutdowns):.1f} s")
    print(
        f"peak resident memory of inference: {figures['peak_rss_mb_inference_small']:.0f} MB over {args.count} images, "
        f"{figures['peak_rss_mb_inference_large']:.0f} MB over {args.memory_count} images"
    )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

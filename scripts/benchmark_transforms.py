#!/usr/bin/env python
"""Time the bundle's own post-processing steps against the MONAI equivalents they stand in for, on a radiograph-sized
input (default 2000 x 2000, the size of the sample radiographs), and check that both give the same result.

Prints one row per step: median seconds of the bundle's version, of MONAI's, the ratio and whether the outputs agree.
These figures are why ``MostProbableClassd``, ``DisplayImaged`` and the overlay are kept (see their docstrings).

Example:
  python scripts/benchmark_transforms.py --size 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from monai.transforms import (  # noqa: E402
    AsDiscreted,
    CastToTyped,
    Compose,
    CopyItemsd,
    ScaleIntensityRangePercentilesd,
)
from monai.visualize import blend_images  # noqa: E402

from scripts.overlay import draw_overlay  # noqa: E402
from scripts.transforms import DisplayImaged, MostProbableClassd  # noqa: E402


def median_seconds(step, repeats: int):
    """Median wall time of ``step()`` over ``repeats`` calls, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def inputs(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth radiograph-like image (1, size, size) and softmax probabilities (3, size, size) over it."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, 32, 32), generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0] * 4000
    logits = torch.nn.functional.interpolate(torch.randn((1, 3, 32, 32), generator=generator) * 4, size=(size, size),
                                             mode="bilinear")[0]  # fmt: skip
    return image, torch.softmax(logits, dim=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2000, help="rows and columns of the test image")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    image, probabilities = inputs(args.size)
    rows = []

    ours, classes = median_seconds(
        lambda: MostProbableClassd(keys="pred")({"pred": probabilities})["pred"], args.repeats
    )
    monai, reference = median_seconds(
        lambda: AsDiscreted(keys="pred", argmax=True)({"pred": probabilities})["pred"], args.repeats
    )
    rows.append(("class map (MostProbableClassd vs AsDiscreted argmax)", ours, monai,
                 bool(torch.equal(torch.as_tensor(classes).long(), torch.as_tensor(reference).long()))))  # fmt: skip

    display = Compose([
        CopyItemsd(keys="image", names="display"),
        ScaleIntensityRangePercentilesd(keys="display", lower=0.5, upper=99.5, b_min=0, b_max=255, clip=True),
        CastToTyped(keys="display", dtype=np.uint8),
    ])  # fmt: skip
    ours, copy = median_seconds(lambda: DisplayImaged(keys="image")({"image": image})["display"], args.repeats)
    monai, reference = median_seconds(lambda: display({"image": image})["display"], args.repeats)
    difference = int((torch.as_tensor(copy).int() - torch.as_tensor(reference).int()).abs().max())
    rows.append(("display copy (DisplayImaged vs percentile scaling)", ours, monai, difference <= 2))

    grey = np.asarray(copy[0], dtype=np.uint8)
    lung, opacity = np.asarray(classes[0] > 0), np.asarray(classes[0] == 2)
    ours, _ = median_seconds(lambda: draw_overlay(grey, lung, opacity, "opacity 12.3 %"), args.repeats)
    monai, _ = median_seconds(
        lambda: blend_images(torch.as_tensor(grey)[None].float() / 255, torch.as_tensor(classes).float(), alpha=0.4),
        args.repeats,
    )
    rows.append(("overlay (draw_overlay vs blend_images, no outline or caption)", ours, monai, None))

    print(f"{args.size} x {args.size}, median of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'step':64} {'bundle s':>9} {'MONAI s':>9} {'MONAI/bundle':>13}  same result")
    for name, ours, monai, same in rows:
        agreement = "n/a" if same is None else ("yes" if same else "NO")
        print(f"{name:64} {ours:9.3f} {monai:9.3f} {monai / ours:13.1f}  {agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

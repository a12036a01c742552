#!/usr/bin/env python
"""Export the bundle's network with its weights to ONNX, for ONNX Runtime or other serving tools.

The model takes one (1, 1, size, size) float image scaled as the bundle's preprocessing does and returns
(1, 3, size, size) logits (background, lung, opacity). The network is the bundle config's ``network_def`` (the
inference workflow's config files, merged in order). The bundle's inference uses the same export, in memory, when
it runs on ONNX Runtime (``runtime: onnxruntime``).

Example:
  python scripts/export_onnx.py --checkpoint bundle/models/model.pt --output outputs/model.onnx --size 256
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

BUNDLE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))
sys.path.insert(0, BUNDLE)

from monai.bundle import ConfigParser  # noqa: E402

from scripts.checkpoints import state_dict_of  # noqa: E402
from scripts.onnx_runtime import export_onnx  # noqa: E402

# the inference workflow's config files, merged in this order
INFERENCE_CONFIGS = ("common.yaml", "inference.yaml")


def inference_config_files() -> list[str]:
    """The bundle's inference config files, in merge order."""
    return [os.path.join(BUNDLE, "configs", name) for name in INFERENCE_CONFIGS]


def network_from_config(config_files: list[str]) -> tuple[torch.nn.Module, int]:
    """A new instance of the merged configs' ``network_def`` (random weights) and their ``image_size`` (rows)."""
    parser = ConfigParser()
    parser.read_config(config_files)
    return parser.get_parsed_content("network_def"), int(parser.get_parsed_content("image_size")[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", default="bundle/models/model.pt", help="shipped weights or a training checkpoint"
    )
    parser.add_argument("--output", required=True, help="the .onnx file to write (an existing file is refused)")
    parser.add_argument(
        "--size", type=int, help="image rows = columns of the export (default: the configs' image_size)"
    )
    parser.add_argument(
        "--configs", nargs="+", default=inference_config_files(),
        help="config files merged in order that define network_def (default: the bundle's inference configs)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        parser.error(f"{args.output} exists; give another --output (nothing is overwritten)")
    network, config_size = network_from_config(args.configs)
    args.size = args.size or config_size
    weights = state_dict_of(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    network.load_state_dict({key: value.float() for key, value in weights.items()})
    export_onnx(network, args.output, shape=(1, args.size, args.size))
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MB): input 'image' (1, 1, {args.size}, "
          f"{args.size}), output 'logits' (1, 3, {args.size}, {args.size})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

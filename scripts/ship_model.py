#!/usr/bin/env python
"""Store a trained checkpoint as the bundle's shipped weights: a plain state dict, fp16 by default, written atomically.

Example:
  python scripts/ship_model.py --checkpoint runs/cxr/model.pt --output bundle/models/model.pt
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from scripts.label_io import atomic_write  # noqa: E402


def state_dict_of(checkpoint: dict) -> dict:
    """The network weights of a CheckpointSaver file (a bare state dict, or one under the key ``model``)."""
    return checkpoint["model"] if "model" in checkpoint and isinstance(checkpoint["model"], dict) else checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model.pt or checkpoint_epoch=N.pt written by training")
    parser.add_argument("--output", default="bundle/models/model.pt")
    parser.add_argument("--fp32", action="store_true", help="keep float32 weights instead of float16")
    args = parser.parse_args(argv)
    weights = state_dict_of(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    if not args.fp32:
        weights = {key: value.half() if value.is_floating_point() else value for key, value in weights.items()}
    atomic_write(args.output, lambda path: torch.save(weights, path))
    size_mb = os.path.getsize(args.output) / 2**20
    print(f"wrote {len(weights)} tensors ({'fp32' if args.fp32 else 'fp16'}, {size_mb:.1f} MB) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

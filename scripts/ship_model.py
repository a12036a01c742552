#!/usr/bin/env python
"""Store a trained checkpoint as the bundle's shipped weights: a plain state dict, fp16 by default, written atomically.
When the output is listed in its bundle's ``large_files.yml``, its hash there is updated.

Examples:
  python scripts/ship_model.py --checkpoint runs/cxr/model.pt --output bundle/models/model.pt
  python scripts/ship_model.py --checkpoint models:/cxr_lung_opacity/3 --tracking-uri sqlite:///bundle/runs/mlruns.db
The second takes a version of the MLflow registered model a training run logged and tags that version with the
sha256 of the shipped file, so evaluate runs of the shipped weights name the training run behind them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from scripts.checkpoints import state_dict_of  # noqa: E402
from scripts.label_io import atomic_write  # noqa: E402
from scripts.severity_calibration import file_sha256  # noqa: E402


def update_large_file_hash(weights_file: str) -> str | None:
    """Put the sha256 of ``weights_file`` in ``<bundle>/large_files.yml`` when that lists it (``<bundle>/models/...``);
    returns the updated list file, or None."""
    import yaml

    bundle = os.path.dirname(os.path.dirname(os.path.abspath(weights_file)))
    listing = os.path.join(bundle, "large_files.yml")
    if not os.path.isfile(listing):
        return None
    relative = os.path.relpath(os.path.abspath(weights_file), bundle).replace(os.sep, "/")
    text = Path(listing).read_text()
    entries = [entry for entry in yaml.safe_load(text)["large_files"] if entry["path"] == relative]
    if not entries:
        return None
    if entries[0]["hash_type"] != "sha256":
        raise ValueError(f"{listing}: {relative} has hash_type {entries[0]['hash_type']}; this tool writes sha256")
    text = text.replace(str(entries[0]["hash_val"]), file_sha256(weights_file))
    atomic_write(listing, lambda path: Path(path).write_text(text))
    return listing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True,
        help="model.pt or checkpoint_epoch=N.pt written by training, or a registered model version models:/<name>/<v>",
    )  # fmt: skip
    parser.add_argument("--tracking-uri", help="MLflow store of a models:/ checkpoint (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--output", default="bundle/models/model.pt")
    parser.add_argument("--fp32", action="store_true", help="keep float32 weights instead of float16")
    args = parser.parse_args(argv)
    registered = args.checkpoint.startswith("models:/")
    if registered:
        from scripts.mlflow_model import registered_weights

        weights = registered_weights(args.checkpoint, args.tracking_uri)
    else:
        weights = state_dict_of(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    if not args.fp32:
        weights = {key: value.half() if value.is_floating_point() else value for key, value in weights.items()}
    atomic_write(args.output, lambda path: torch.save(weights, path))
    size_mb = os.path.getsize(args.output) / 2**20
    print(f"wrote {len(weights)} tensors ({'fp32' if args.fp32 else 'fp16'}, {size_mb:.1f} MB) to {args.output}")
    if registered:
        from scripts.mlflow_model import tag_shipped_weights

        tag_shipped_weights(args.checkpoint, args.output, args.tracking_uri)
    listing = update_large_file_hash(args.output)
    if listing:
        print(f"updated the hash of {args.output} in {listing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Serve the previous published weights of a served bundle again (undo the last retraining round that was published).

Retraining through MONAI Label publishes new weights to ``<served bundle>/models/model.pt`` and keeps the weights it
replaced in ``models/previous/`` (the last 2 by default, train.yaml's ``publish_keep_previous``). This restores the
newest of them byte for byte; the weights it replaces are kept as ``models/rolled_back.pt``, and
``models/publish_record.json`` records the rollback. A running MONAI Label server serves the restored weights at its
next inference. Run it again to go one more round back.

Examples:
  python scripts/rollback_weights.py --served-bundle runs/monailabel/monaibundle/model/cxr_lung_opacity
  python scripts/rollback_weights.py --served-bundle <dir> --list
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from scripts.published_weights import previous_weights, rollback  # noqa: E402

WEIGHTS = os.path.join("models", "model.pt")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--served-bundle", required=True, help="the served bundle folder (holds models/model.pt)")
    parser.add_argument("--list", action="store_true", help="list the previous weights, newest first; restore none")
    args = parser.parse_args(argv)
    weights = os.path.join(args.served_bundle, WEIGHTS)
    if not os.path.isdir(os.path.join(args.served_bundle, "models")):
        print(f"error: {args.served_bundle} has no models/ folder: not a served bundle", file=sys.stderr)
        return 1
    if args.list:
        for path in previous_weights(weights):
            print(path)
        return 0
    try:
        restored, replaced = rollback(weights)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"restored {os.path.basename(restored)} as {weights}"
          + (f"; the replaced weights are kept as {replaced}" if replaced else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

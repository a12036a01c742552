"""The served weights file, the previous published weights kept beside it, its publish record, and rollback.

Layout next to the served weights (e.g. ``<served bundle>/models/model.pt``):

* ``previous/<stem>-<UTC time>.pt``: the weights each publish replaced, byte for byte, the newest ``keep`` of them;
* ``rolled_back.pt``: the weights the last rollback took out of service (so a rollback can itself be undone by hand);
* ``publish_record.json``: the last decision (published, kept or rolled back), why, and the figures behind it, with a
  short history of earlier ones (what MONAI Label's ``/info`` shows).

No torch, so the rollback command starts quickly, in the bundle's environment or MONAI Label's:
  python -m scripts.published_weights rollback <served bundle>/models/model.pt   (from the bundle folder)
  python scripts/rollback_weights.py --served-bundle <served bundle>             (from the repository)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from scripts.label_io import atomic_write, write_json

PREVIOUS_FOLDER = "previous"
ROLLED_BACK_NAME = "rolled_back.pt"
RECORD_NAME = "publish_record.json"
HISTORY_LENGTH = 20  # decisions kept in the record's history


def previous_folder(weights: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(weights)), PREVIOUS_FOLDER)


def record_path(weights: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(weights)), RECORD_NAME)


def previous_weights(weights: str) -> list[str]:
    """The kept previous weights of ``weights``, newest first."""
    folder, stem = previous_folder(weights), os.path.splitext(os.path.basename(weights))[0]
    if not os.path.isdir(folder):
        return []
    names = [name for name in os.listdir(folder) if name.startswith(stem + "-") and name.endswith(".pt")]
    return [os.path.join(folder, name) for name in sorted(names, reverse=True)]


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def _copy(source: str, target: str) -> None:
    atomic_write(target, lambda temporary: shutil.copyfile(source, temporary))


def archive(weights: str, keep: int) -> str | None:
    """Copy the current ``weights`` into ``previous/`` (newest ``keep`` kept); returns the copy, None if no file."""
    if not os.path.isfile(weights) or keep <= 0:
        return None
    stem = os.path.splitext(os.path.basename(weights))[0]
    copy = os.path.join(previous_folder(weights), f"{stem}-{_timestamp()}.pt")
    _copy(weights, copy)
    for older in previous_weights(weights)[keep:]:
        os.unlink(older)
    return copy


def publish(weights: str, write, keep: int = 2) -> str | None:
    """Keep the current ``weights`` in ``previous/``, then ``write(temporary path)`` and rename it to ``weights``.

    Returns the kept copy of the replaced weights (None when there were none). The file is readable by all (0644).
    """
    kept = archive(weights, keep)
    atomic_write(weights, write)
    os.chmod(weights, 0o644)
    return kept


def read_record(weights: str) -> dict:
    try:
        with open(record_path(weights), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def write_record(weights: str, entry: dict) -> dict:
    """Make ``entry`` the record's last decision, with a one-line summary of it in the history; returns the record."""
    record = read_record(weights)
    summary = {key: entry[key] for key in ("time", "decision", "reason", "run") if key in entry}
    history = (record.get("history") or [])[-(HISTORY_LENGTH - 1) :] + [summary]
    record = {**entry, "previous_weights": [os.path.basename(path) for path in previous_weights(weights)],
              "history": history}  # fmt: skip
    write_json(record_path(weights), record)
    return record


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def rollback(weights: str) -> tuple[str, str | None]:
    """Serve the newest previous weights again, byte for byte; returns (restored copy, where the replaced went).

    The replaced weights are kept as ``rolled_back.pt``; the restored copy leaves ``previous/``, so a second
    rollback goes one further back. The restored file gets the current time, so a server that reloads a weights
    file whose time changed (MONAI Label) serves it at its next inference.
    """
    candidates = previous_weights(weights)
    if not candidates:
        raise FileNotFoundError(f"no previous weights of {weights} in {previous_folder(weights)}")
    restored = candidates[0]
    replaced = None
    if os.path.isfile(weights):
        replaced = os.path.join(os.path.dirname(os.path.abspath(weights)), ROLLED_BACK_NAME)
        _copy(weights, replaced)
    os.replace(restored, weights)
    os.utime(weights)
    os.chmod(weights, 0o644)
    write_record(weights, {"time": now_iso(), "decision": "rolled_back",
                           "reason": f"rollback: {os.path.basename(restored)} restored by hand", "weights": weights,
                           "restored": os.path.basename(restored),
                           "replaced_kept_as": os.path.basename(replaced) if replaced else None})  # fmt: skip
    return restored, replaced


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="List or restore the previous published weights of a served model.")
    parser.add_argument("action", choices=("rollback", "list"))
    parser.add_argument("weights", help="the served weights file, e.g. <served bundle>/models/model.pt")
    args = parser.parse_args(argv)
    if args.action == "list":
        for path in previous_weights(args.weights):
            print(path)
        return 0
    try:
        restored, replaced = rollback(args.weights)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"restored {restored} as {args.weights}"
        + (f"; the replaced weights are kept as {replaced}" if replaced else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

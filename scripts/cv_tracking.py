#!/usr/bin/env python
"""MLflow parent run of a cross-validation (``TRACKING=mlflow`` in scripts/retrain.sh): one child run per fold.

The store is the one the bundle's workflows choose (``MLFLOW_TRACKING_URI``, else ``--tracking-uri``, else
``<bundle root>/runs/mlruns.db``; a server gets a copy of the local run):
  start    opens the parent run (an unfinished one of the same name is continued) and prints its id
  run-id   prints the id of the newest run of a name (e.g. a fold's training run, to nest its evaluate run under)
  finish   logs the cv_summary.py table as the parent's metrics and the table as an artifact, ends the run and
           copies it to the server

Example:
  parent=$(python scripts/cv_tracking.py start --run-name cross_validation --folds 0 1)
  python scripts/cv_tracking.py finish --run-id "$parent" --summary runs/cv_summary.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from monai.utils import path_to_sqlite_uri  # noqa: E402

from scripts.mlflow_mirror import PARENT_TAG, RunMirror  # noqa: E402
from scripts.mlflow_tracking import TrackingStore  # noqa: E402

ALL_FOLDS = "all folds"  # cv_summary.py's row over every fold


def summary_metrics(table: dict) -> dict:
    """cv_summary.py's table as metrics: ``<fold>/<figure>`` per fold, ``<figure>`` over all folds; characters that
    MLflow does not allow in a key become ``_``; an undefined figure (NaN) is left out."""
    metrics = {}
    for fold, figures in table.items():
        prefix = "" if fold == ALL_FOLDS else re.sub(r"[^\w\-. /]", "_", fold) + "/"
        for figure, value in figures.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                metrics[prefix + re.sub(r"[^\w\-. /]", "_", figure)] = value
    return metrics


def open_store(args: argparse.Namespace, run_name: str = "") -> TrackingStore:
    """The store the bundle's workflows write to with the same options (``--bundle_root`` etc.)."""
    local_uri = args.local_tracking_uri or path_to_sqlite_uri(os.path.join(args.bundle_root, "runs", "mlruns.db"))
    return TrackingStore(
        tracking_uri=args.tracking_uri or local_uri, local_uri=local_uri, enabled=True,
        experiment_name=args.experiment_name, run_name=run_name, bundle_root=args.bundle_root,
        output_dir=os.path.join(args.bundle_root, "runs"),  # no executed config is written here: none is logged
        mirror_interval=3600,  # no background copy: the fold runs copy the parent, `finish` sends it complete
    )  # fmt: skip


def start(args: argparse.Namespace) -> None:
    """Open the parent run (or continue the unfinished one of that name), tag it and print its id."""
    store = open_store(args, args.run_name)
    store.open_run(tags={"cv_folds": " ".join(args.folds) if args.folds else None})  # with the git commit
    print(store.run_id)


def run_id(args: argparse.Namespace) -> None:
    """Print the id of the newest run of a name (optionally nested under a given run) in the local store."""
    store = open_store(args)
    experiment = store.client.get_experiment_by_name(args.experiment_name)
    if experiment is None:
        raise SystemExit(f"error: no MLflow experiment {args.experiment_name!r} in {store.uri}")
    query = f"attributes.run_name = '{args.run_name}'"
    if args.parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{args.parent_run_id}'"
    runs = store.client.search_runs([experiment.experiment_id], query, order_by=["start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"error: no MLflow run {args.run_name!r} in {store.uri}")
    print(runs[0].info.run_id)


def finish(args: argparse.Namespace) -> None:
    """Log the summary table as the parent's metrics and artifact, end the run and copy it to the server."""
    store = open_store(args)
    store.run_id = args.run_id
    with open(args.summary, encoding="utf-8") as handle:
        store.log_metrics(summary_metrics(json.load(handle)), 0)
    store.log_artifact(args.summary)
    store.client.set_terminated(args.run_id, "FINISHED")
    if store.server_uri:  # a warning says how to send it later when the server does not answer
        if RunMirror(store.uri, store.server_uri, args.run_id).finish(store.final_wait):
            print(f"cross-validation run {args.run_id} sent to {store.server_uri}", file=sys.stderr)
    store.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("start", start.__doc__), ("run-id", run_id.__doc__), ("finish", finish.__doc__)):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--tracking-uri", help="MLflow store or server (MLFLOW_TRACKING_URI wins)")
        command.add_argument("--local-tracking-uri", help="local store (default: <bundle root>/runs/mlruns.db)")
        command.add_argument("--bundle-root", default="bundle")
        command.add_argument("--experiment-name", default="cxr_lung_opacity")
        if name in ("start", "run-id"):
            command.add_argument("--run-name", required=True)
        if name == "start":
            command.add_argument("--folds", nargs="*", help="the folds, tagged as cv_folds")
        if name == "run-id":
            command.add_argument("--parent-run-id", help="only runs nested under this run")
        if name == "finish":
            command.add_argument("--run-id", required=True)
            command.add_argument("--summary", required=True, help="cv_summary.py's JSON table")
    args = parser.parse_args(argv)
    {"start": start, "run-id": run_id, "finish": finish}[args.command](args)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    sys.exit(main())

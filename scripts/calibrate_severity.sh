#!/usr/bin/env bash
# Refit the severity score constants of the shipped weights (bundle/models/severity_calibration.json) in one command:
#   bash scripts/calibrate_severity.sh [DATA_ROOT]
# DATA_ROOT holds cohen-cxr/{images,severity_scores.csv,metadata.csv}. Runs the bundle's inference on the scored
# radiographs (runs/severity_calibration/inference: no overlays, published rules, so no earlier constants are read),
# then scripts/calibrate_severity.py: 5-fold cross-validation by patient, printed and recorded, and the constants
# fitted on all scored images. Run it again after every change of bundle/models/model.pt: the constants are fitted
# on that model's masks.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${1:-../shared/data}
COHEN=$DATA_ROOT/cohen-cxr
WORK=runs/severity_calibration
PYTHON=.venv/bin/python

rm -rf "$WORK/images"
mkdir -p "$WORK/images"
$PYTHON - "$COHEN" "$WORK/images" <<'PY'
import csv, os, sys
cohen, folder = sys.argv[1:]
for row in csv.DictReader(open(os.path.join(cohen, "severity_scores.csv"), newline="")):
    os.symlink(os.path.abspath(os.path.join(cohen, "images", row["filename"])), os.path.join(folder, row["filename"]))
PY
$PYTHON -m monai.bundle run --meta_file bundle/configs/metadata.json --config_file "['bundle/configs/common.yaml','bundle/configs/inference.yaml']" \
    --logging_file bundle/configs/logging.conf --bundle_root bundle --dataset_dir "$WORK/images" \
    --output_dir "$WORK/inference" --write_overlays false --severity_calibration ''
$PYTHON scripts/calibrate_severity.py --severity "$WORK/inference/severity.csv" \
    --scores "$COHEN/severity_scores.csv" --metadata "$COHEN/metadata.csv" \
    --output bundle/models/severity_calibration.json --force

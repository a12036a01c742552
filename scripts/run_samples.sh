#!/usr/bin/env bash
# Install, then run the bundle's inference with the shipped weights on the sample radiographs in bundle/docs/samples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUTPUT=${OUTPUT:-outputs/samples}
.venv/bin/python -m monai.bundle run --meta_file bundle/configs/metadata.json --config_file "['bundle/configs/common.yaml','bundle/configs/inference.yaml']" \
    --logging_file bundle/configs/logging.conf --bundle_root bundle --dataset_dir bundle/docs/samples --output_dir "$OUTPUT"
echo
echo "masks and overlays: $OUTPUT/<image name>/  severity table: $OUTPUT/severity.csv (and severity.json)"
column -s, -t < "$OUTPUT/severity.csv" | cut -c1-160

#!/usr/bin/env bash
# Retrain the shipped model from ../shared/data-style inputs with the shipped hyper-parameters and a fixed seed:
# data preparation, training through the bundle's train.yaml, then fp16 weights into bundle/models/model.pt.
#   bash scripts/retrain.sh [DATA_ROOT] [RUN_NAME]
# DATA_ROOT holds cohen-cxr/{images,lung_masks,lung_masks_lungvae,metadata.csv} and opacity-labelme/.
# Interrupted? Run the same command again: training continues from its last checkpoint in runs/RUN_NAME.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${1:-../shared/data}
RUN_NAME=${2:-cxr_fold0}
HOLDOUT_FOLD=${HOLDOUT_FOLD:-0}   # opacity-annotated patients of this fold validate; -1 trains on all of them
EPOCHS=${EPOCHS:-45}
PREPARED=data/${RUN_NAME}
.venv/bin/python scripts/prepare_data.py --images "$DATA_ROOT/cohen-cxr/images" \
    --masks "$DATA_ROOT/cohen-cxr/lung_masks" --extra-masks "$DATA_ROOT/cohen-cxr/lung_masks_lungvae" \
    --labelme "$DATA_ROOT/opacity-labelme" --metadata "$DATA_ROOT/cohen-cxr/metadata.csv" \
    --output "$PREPARED" --seed 0 --holdout-opacity-fold "$HOLDOUT_FOLD"
.venv/bin/python -m monai.bundle run training --meta_file bundle/configs/metadata.json \
    --config_file bundle/configs/train.yaml --logging_file bundle/configs/logging.conf --bundle_root bundle \
    --dataset_dir "$PREPARED" --run_name "$RUN_NAME" --output_dir "runs/$RUN_NAME" --num_epochs "$EPOCHS" --seed 0
echo "best checkpoint: runs/$RUN_NAME/model.pt; to ship it:"
echo "  .venv/bin/python scripts/ship_model.py --checkpoint runs/$RUN_NAME/model.pt --output bundle/models/model.pt"

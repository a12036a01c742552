#!/usr/bin/env bash
# Retrain the shipped model from ../shared/data-style inputs with the shipped recipe and a fixed seed.
#   bash scripts/retrain.sh [DATA_ROOT]
# DATA_ROOT holds cohen-cxr/{images,lung_masks,lung_masks_lungvae,metadata.csv} and opacity-labelme/.
# Stage 1 (45 epochs from scratch): lung masks with opacity not annotated, LabelMe opacity of the training fold,
#   synthetic opacities.
# Stage 2 (12 epochs, fine-tuning stage 1 at a lower learning rate): the same data plus clear-lung examples: images
#   whose finding is "No Finding", their lungs from the V7 masks or, where none exists, from stage 1's prediction.
# The validation patients stay the same in both stages. Interrupted? Run again: each stage continues from its last
# checkpoint. The final checkpoint of stage 2 is shipped (fp16) into bundle/models/model.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${1:-../shared/data}
COHEN=$DATA_ROOT/cohen-cxr
HOLDOUT_FOLD=${HOLDOUT_FOLD:-0}   # opacity-annotated patients of this fold validate; -1 trains on all of them
BUNDLE_ARGS=(--meta_file bundle/configs/metadata.json --logging_file bundle/configs/logging.conf --bundle_root bundle)
PREPARE_ARGS=(--images "$COHEN/images" --masks "$COHEN/lung_masks" --labelme "$DATA_ROOT/opacity-labelme"
    --metadata "$COHEN/metadata.csv" --seed 0 --holdout-opacity-fold "$HOLDOUT_FOLD")

.venv/bin/python scripts/prepare_data.py "${PREPARE_ARGS[@]}" --extra-masks "$COHEN/lung_masks_lungvae" \
    --output data/stage1
.venv/bin/python -m monai.bundle run training "${BUNDLE_ARGS[@]}" --config_file bundle/configs/train.yaml \
    --dataset_dir data/stage1 --run_name stage1 --output_dir runs/stage1 --num_epochs 45 --seed 0

# lung masks of the unlabelled "No Finding" radiographs, predicted by stage 1
mkdir -p data/no_finding data/stage1_lungs
.venv/bin/python - "$COHEN" <<'PY'
import csv, json, os, sys
cohen = sys.argv[1]
unlabelled = {os.path.basename(path) for path in json.load(open("data/stage1/preparation_report.json"))["unlabelled"]}
for row in csv.DictReader(open(os.path.join(cohen, "metadata.csv"))):
    target = os.path.join("data/no_finding", row["filename"])
    if row["finding"] == "No Finding" and row["filename"] in unlabelled and not os.path.exists(target):
        os.symlink(os.path.abspath(os.path.join(cohen, "images", row["filename"])), target)
PY
.venv/bin/python -m monai.bundle run "${BUNDLE_ARGS[@]}" --config_file bundle/configs/inference.yaml \
    --dataset_dir data/no_finding --output_dir data/no_finding_predictions --ckpt_path runs/stage1/model.pt
for folder in data/no_finding_predictions/*/; do
    stem=$(basename "$folder")
    cp "$folder/${stem}_lung.png" "data/stage1_lungs/$stem.png"
done

.venv/bin/python scripts/prepare_data.py "${PREPARE_ARGS[@]}" --extra-masks "$COHEN/lung_masks_lungvae" \
    --extra-masks data/stage1_lungs --clear-finding "No Finding" --split-from data/stage1/datalist.json \
    --output data/stage2
.venv/bin/python -m monai.bundle run training "${BUNDLE_ARGS[@]}" --config_file bundle/configs/train.yaml \
    --dataset_dir data/stage2 --run_name stage2 --output_dir runs/stage2 --num_epochs 12 --learning_rate 0.0003 \
    --init_checkpoint runs/stage1/model.pt --seed 0
.venv/bin/python scripts/ship_model.py --checkpoint runs/stage2/model_final.pt --output bundle/models/model.pt

#!/usr/bin/env bash
# Retrain the shipped model from ../shared/data-style inputs with the shipped recipe and a fixed seed.
#   bash scripts/retrain.sh [DATA_ROOT]                      # base + fine-tune on every annotation, shipped
#   FOLDS="0 1 all" bash scripts/retrain.sh [DATA_ROOT]      # the same with the 2-fold cross-validation first
# DATA_ROOT holds cohen-cxr/{images,lung_masks,lung_masks_lungvae,metadata.csv} and opacity-labelme/.
# Base (26 epochs from scratch): every lung mask (opacity not annotated) and synthetic opacities; every patient with
#   LabelMe opacity annotations is held out.
# Pseudo-labels: the base model's lung fields of the unlabelled "No Finding" radiographs, taken as clear lung.
# Fine-tune (10 epochs from the base, lower learning rate): the same data, the clear lungs, and the LabelMe
#   annotations of the training folds listed 6 times per epoch, on the lung field of their V7 masks (the LabelMe lung
#   outlines are 12-41 % smaller). Fold k holds out the LabelMe patients of fold k and is evaluated on them
#   (runs/cv_fold<k>); "all" trains on every annotation and is shipped into bundle/models/model.pt (fp16).
#   Fine-tunes keep the base's other validation patients.
# Interrupted? Run again: each training continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${1:-../shared/data}
COHEN=$DATA_ROOT/cohen-cxr
FOLDS=${FOLDS:-all}
PYTHON=.venv/bin/python
BUNDLE_ARGS=(--meta_file bundle/configs/metadata.json --logging_file bundle/configs/logging.conf --bundle_root bundle)
PREPARE_ARGS=(--images "$COHEN/images" --masks "$COHEN/lung_masks" --labelme "$DATA_ROOT/opacity-labelme"
    --metadata "$COHEN/metadata.csv" --seed 0)

$PYTHON scripts/prepare_data.py "${PREPARE_ARGS[@]}" --extra-masks "$COHEN/lung_masks_lungvae" \
    --opacity-folds 1 --holdout-opacity-fold 0 --output data/base
$PYTHON -m monai.bundle run training "${BUNDLE_ARGS[@]}" --config_file bundle/configs/train.yaml \
    --dataset_dir data/base --run_name base --output_dir runs/base --num_epochs 26 --seed 0

# lung fields of the unlabelled "No Finding" radiographs, predicted by the base model
mkdir -p data/no_finding data/base_lungs
$PYTHON - "$COHEN" <<'PY'
import csv, json, os, sys
cohen = sys.argv[1]
unlabelled = {os.path.basename(path) for path in json.load(open("data/base/preparation_report.json"))["unlabelled"]}
for row in csv.DictReader(open(os.path.join(cohen, "metadata.csv"))):
    target = os.path.join("data/no_finding", row["filename"])
    if row["finding"] == "No Finding" and row["filename"] in unlabelled and not os.path.exists(target):
        os.symlink(os.path.abspath(os.path.join(cohen, "images", row["filename"])), target)
PY
$PYTHON -m monai.bundle run "${BUNDLE_ARGS[@]}" --config_file bundle/configs/inference.yaml \
    --dataset_dir data/no_finding --output_dir data/no_finding_predictions --ckpt_path runs/base/model.pt
for folder in data/no_finding_predictions/*/; do
    stem=$(basename "$folder")
    cp "$folder/${stem}_lung.png" "data/base_lungs/$stem.png"
done

cv_runs=()
for fold in $FOLDS; do
    holdout=$([ "$fold" = all ] && echo -1 || echo "$fold")
    $PYTHON scripts/prepare_data.py "${PREPARE_ARGS[@]}" --extra-masks "$COHEN/lung_masks_lungvae" \
        --extra-masks data/base_lungs --clear-finding "No Finding" --split-from data/base/datalist.json \
        --labelme-lungs-from-masks --opacity-folds 2 --holdout-opacity-fold "$holdout" --repeat-labelme 6 \
        --output "data/fold_$fold"
    $PYTHON -m monai.bundle run training "${BUNDLE_ARGS[@]}" --config_file bundle/configs/train.yaml \
        --dataset_dir "data/fold_$fold" --run_name "fold_$fold" --output_dir "runs/fold_$fold" --num_epochs 10 \
        --learning_rate 0.0003 --init_checkpoint runs/base/model.pt --seed 0
    if [ "$fold" = all ]; then
        $PYTHON scripts/ship_model.py --checkpoint runs/fold_all/model_final.pt --output bundle/models/model.pt
    else  # the final checkpoint on the held-out fold (and the other validation patients), full resolution
        $PYTHON -m monai.bundle run "${BUNDLE_ARGS[@]}" \
            --config_file "['bundle/configs/inference.yaml','bundle/configs/evaluate.yaml']" \
            --dataset_dir "data/fold_$fold" --output_dir "runs/cv_fold$fold" --ckpt_path "runs/fold_$fold/model_final.pt"
        cv_runs+=("runs/cv_fold$fold")
    fi
done
if [ ${#cv_runs[@]} -gt 0 ]; then
    $PYTHON scripts/cv_summary.py "${cv_runs[@]}" --output runs/cv_summary.json
fi

#!/usr/bin/env bash
# Retrain the shipped model from ../shared/data-style inputs with the shipped recipe and a fixed seed.
#   bash scripts/retrain.sh [DATA_ROOT]                      # stages 1-4, the stage-4 model shipped
#   FOLDS="0 1 all" bash scripts/retrain.sh [DATA_ROOT]      # the same with the stage-2 cross-validation first
#   TRACKING=mlflow FOLDS="0 1 all" bash scripts/retrain.sh  # the same, stage 2 tracked in MLflow (see below)
# DATA_ROOT holds cohen-cxr/{images,lung_masks,lung_masks_lungvae,metadata.csv,severity_scores.csv},
# opacity-labelme/ and covid-qu-ex/{images,lung_masks,infection_masks,index.csv}.
# Stage 1, base (26 epochs from scratch): every cohen-cxr lung mask (opacity not annotated) and synthetic opacities;
#   every patient with LabelMe opacity annotations is held out.
# Stage 2, fine-tune (10 epochs from the base, release 0.3.0): the same data, the base's lung fields of the
#   unlabelled "No Finding" radiographs as clear lung, and the LabelMe annotations of the training folds listed 6 times
#   per epoch on the lung field of their V7 masks. Fold k holds out the LabelMe patients of fold k and is evaluated on
#   them (runs/cv_fold<k>); "all" trains on every annotation.
# Stage 3, all sources (release 0.4.0, from the stage-2 weights): stage 2's data plus COVID-QU-Ex (infection masks:
#   opacity annotated; normals: clear lungs; the authors' val split held out as test rows), whose lung masks stop at
#   the heart border: the stage-2 model's lung fields widen them (lung there labelled "opacity not annotated"). No
#   synthetic opacities. Stages 1-3 run at 224 px.
# Stage 4, the same data at 256 px (release 0.6.0, from the stage-3 weights; bundle/docs/README.md, "Training"):
#   a 256 px copy of the data, two runs in batches of 32. Shipped into bundle/models/model.pt (fp16), evaluated on the
#   held-out rows, and the severity scores calibrated against the radiologists' scores (scripts/calibrate_severity.py).
# Wall time: stages 1-3 about 2 h on 2 CPU cores. Stage 4 took 10 min on one H100 GPU (13 s an epoch beside another
#   run, 8 s alone); on 2 CPU cores expect about 13 h (46 epochs of about 17 min: stage 3's 12.8 min an epoch at
#   224 px times (256/224)^2; not run on a CPU). Interrupted runs continue, so it can span several sessions.
# STAGE2_WEIGHTS=<file> skips stages 1-2 and starts stage 3 from those weights (release 0.4.0 started from the 0.3.0
#   weights, which stages 1-2 reproduce). The docs' sample radiographs are never trained on.
# TRACKING=mlflow tracks stage 2 in MLflow (bundle/docs/mlflow.md; store: MLFLOW_TRACKING_URI if set, else
#   bundle/runs/mlruns.db): with cross-validation folds, a parent run "cross_validation" (scripts/cv_tracking.py) with
#   one child training run per fold (fold_<k>), each fold's evaluate run nested under its training run, and the
#   cv_summary.py table as the parent's metrics ("cv_fold<k>/<figure>" per fold, "<figure>" over all folds).
# Interrupted? Run again: each training continues from its last checkpoint (and its MLflow run, under the unfinished
#   parent run).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${1:-../shared/data}
COHEN=$DATA_ROOT/cohen-cxr
QUEX=$DATA_ROOT/covid-qu-ex
FOLDS=${FOLDS:-all}
STAGE2_WEIGHTS=${STAGE2_WEIGHTS:-runs/fold_all/model_final.pt}
STAGE3_EPOCHS=${STAGE3_EPOCHS:-6}
TRACKING=${TRACKING:-}
PYTHON=.venv/bin/python
INFERENCE_CONFIGS="['bundle/configs/common.yaml','bundle/configs/inference.yaml']"
TRAINING_CONFIGS="['bundle/configs/common.yaml','bundle/configs/train.yaml']"
EVALUATE_CONFIGS="['bundle/configs/common.yaml','bundle/configs/inference.yaml','bundle/configs/evaluate.yaml']"
BUNDLE_ARGS=(--meta_file bundle/configs/metadata.json --logging_file bundle/configs/logging.conf --bundle_root bundle)
STAGES_1_3_SIZE=(--image_size "[224,224]")  # releases 0.3.0-0.5.x ran at 224 px; stage 4 at the bundle's 256 px
PREPARE_ARGS=(--images "$COHEN/images" --masks "$COHEN/lung_masks" --labelme "$DATA_ROOT/opacity-labelme"
    --metadata "$COHEN/metadata.csv" --seed 0)
STAGE2_PREPARE_ARGS=("${PREPARE_ARGS[@]}" --extra-masks "$COHEN/lung_masks_lungvae" --extra-masks data/no_finding_lungs
    --clear-finding "No Finding" --split-from data/base/datalist.json --labelme-lungs-from-masks --opacity-folds 2
    --repeat-labelme 6)

# each stage prints its start, and its end with the time it took; the end of the script prints the total (or where
# it stopped); the commands of a stage show their own progress
RETRAIN_START=$(date +%s)
STAGE_NAME=""
STAGE_START=$RETRAIN_START
elapsed() {  # h:mm:ss since the epoch second $1
    local seconds=$(($(date +%s) - $1))
    printf '%d:%02d:%02d' $((seconds / 3600)) $((seconds % 3600 / 60)) $((seconds % 60))
}
stage_done() {
    if [ -n "$STAGE_NAME" ]; then
        echo "== retrain: finished $STAGE_NAME in $(elapsed "$STAGE_START") ($(date +%H:%M:%S))"
    fi
    STAGE_NAME=""
}
stage() { stage_done; STAGE_NAME=$*; STAGE_START=$(date +%s); echo "== retrain: $* ($(date +%H:%M:%S))"; }
finish() {
    local status=$?
    if [ "$status" -eq 0 ]; then
        stage_done
        echo "== retrain: all stages done in $(elapsed "$RETRAIN_START")"
    else
        echo "== retrain: stopped (exit $status) in ${STAGE_NAME:-the set-up} after $(elapsed "$STAGE_START");" \
            "run again to go on"
    fi
}
trap finish EXIT

# lung_fields MODEL IMAGES OUTPUT: the model's lung masks of a folder of radiographs, as OUTPUT/<stem>.png
lung_fields() {
    $PYTHON -m monai.bundle run "${BUNDLE_ARGS[@]}" "${STAGES_1_3_SIZE[@]}" --config_file "${INFERENCE_CONFIGS}" \
        --dataset_dir "$2" --output_dir "$3.predictions" --ckpt_path "$1" --write_overlays false
    mkdir -p "$3"
    for folder in "$3".predictions/*/; do
        stem=$(basename "$folder")
        [ -f "$folder/${stem}_lung.png" ] && cp "$folder/${stem}_lung.png" "$3/$stem.png"
    done
}

stage "preparing the cohen-cxr split"
$PYTHON scripts/prepare_data.py "${PREPARE_ARGS[@]}" --extra-masks "$COHEN/lung_masks_lungvae" \
    --opacity-folds 1 --holdout-opacity-fold 0 --output data/base

# the unlabelled "No Finding" radiographs, except the docs' samples (kept unseen for the README's check)
mkdir -p data/no_finding
$PYTHON - "$COHEN" <<'PY'
import csv, json, os, sys
cohen = sys.argv[1]
unlabelled = {os.path.basename(path) for path in json.load(open("data/base/preparation_report.json"))["unlabelled"]}
samples = {os.path.splitext(name)[0] for name in os.listdir("bundle/docs/samples")}
for row in csv.DictReader(open(os.path.join(cohen, "metadata.csv"))):
    target = os.path.join("data/no_finding", row["filename"])
    wanted = row["finding"] == "No Finding" and row["filename"] in unlabelled
    if wanted and os.path.splitext(row["filename"])[0] not in samples and not os.path.exists(target):
        os.symlink(os.path.abspath(os.path.join(cohen, "images", row["filename"])), target)
PY

if [ ! -f "$STAGE2_WEIGHTS" ]; then
    stage "stage 1: base"
    $PYTHON -m monai.bundle run training "${BUNDLE_ARGS[@]}" "${STAGES_1_3_SIZE[@]}" \
        --config_file "${TRAINING_CONFIGS}" --dataset_dir data/base --run_name base --output_dir runs/base \
        --num_epochs 26 --seed 0
    [ -d data/no_finding_lungs ] || lung_fields runs/base/model.pt data/no_finding data/no_finding_lungs

    cv_runs=()
    parent=""  # the cross-validation's MLflow run (TRACKING=mlflow): each fold's training run is its child
    tracking=()
    if [ "$TRACKING" = mlflow ]; then
        tracking=(--tracking mlflow)
        if [ -n "$(for fold in $FOLDS; do [ "$fold" = all ] || echo "$fold"; done)" ]; then  # cross-validation folds
            parent=$($PYTHON scripts/cv_tracking.py start --run-name cross_validation --folds $FOLDS)
            tracking+=(--mlflow_parent_run_id "$parent")
        fi
    fi
    for fold in $FOLDS; do
        stage "stage 2: fine-tune, fold $fold"
        holdout=$([ "$fold" = all ] && echo -1 || echo "$fold")
        $PYTHON scripts/prepare_data.py "${STAGE2_PREPARE_ARGS[@]}" --holdout-opacity-fold "$holdout" \
            --output "data/fold_$fold"
        $PYTHON -m monai.bundle run training "${BUNDLE_ARGS[@]}" "${STAGES_1_3_SIZE[@]}" \
            --config_file "${TRAINING_CONFIGS}" --dataset_dir "data/fold_$fold" --run_name "fold_$fold" \
            --output_dir "runs/fold_$fold" --num_epochs 10 --learning_rate 0.0003 --init_checkpoint runs/base/model.pt \
            --seed 0 "${tracking[@]}"
        if [ "$fold" != all ]; then  # the final checkpoint on the held-out fold (and the other validation patients)
            evaluate_tracking=("${tracking[@]}")
            if [ -n "$parent" ]; then  # nested under the fold's training run
                fold_run=$($PYTHON scripts/cv_tracking.py run-id --run-name "fold_$fold" --parent-run-id "$parent")
                evaluate_tracking=(--tracking mlflow --mlflow_parent_run_id "$fold_run")
            fi
            $PYTHON -m monai.bundle run "${BUNDLE_ARGS[@]}" "${STAGES_1_3_SIZE[@]}" \
                --config_file "${EVALUATE_CONFIGS}" \
                --dataset_dir "data/fold_$fold" --output_dir "runs/cv_fold$fold" \
                --ckpt_path "runs/fold_$fold/model_final.pt" "${evaluate_tracking[@]}"
            cv_runs+=("runs/cv_fold$fold")
        fi
    done
    if [ ${#cv_runs[@]} -gt 0 ]; then
        $PYTHON scripts/cv_summary.py "${cv_runs[@]}" --output runs/cv_summary.json
    fi
    if [ -n "$parent" ]; then  # the table as the parent run's metrics; the run ends (and is sent to a server)
        $PYTHON scripts/cv_tracking.py finish --run-id "$parent" --summary runs/cv_summary.json
    fi
fi

stage "stage 3: lung fields of the stage-2 model"
[ -d data/no_finding_lungs ] || lung_fields "$STAGE2_WEIGHTS" data/no_finding data/no_finding_lungs
[ -d data/covid-qu-ex_lung_fields ] || lung_fields "$STAGE2_WEIGHTS" "$QUEX/images" data/covid-qu-ex_lung_fields
$PYTHON scripts/prepare_data.py "${STAGE2_PREPARE_ARGS[@]}" --holdout-opacity-fold -1 \
    --mask-source "name=covid-qu-ex,images=$QUEX/images,lungs=$QUEX/lung_masks,opacity=$QUEX/infection_masks,split=$QUEX/index.csv,lung_field=data/covid-qu-ex_lung_fields" \
    --output data/all_sources
stage "stage 3: training on all sources"
$PYTHON -m monai.bundle run training "${BUNDLE_ARGS[@]}" --config_file "${TRAINING_CONFIGS}" \
    --dataset_dir data/all_sources --run_name all_sources --output_dir runs/all_sources --num_epochs "$STAGE3_EPOCHS" \
    --learning_rate 0.0005 --val_interval 1 --synthetic_opacity_prob 0.0 --init_checkpoint "$STAGE2_WEIGHTS" \
    "${STAGES_1_3_SIZE[@]}" --seed 0

# Stage 4 (release 0.6.0): the same data at 256 px (the COVID-QU-Ex images' own size), in batches of 32: a 40-epoch
# cosine schedule from the stage-3 weights stopped after epoch 28 (the GPU session's time limit), then 18 epochs at a
# lower rate from its best checkpoint. Each epoch reads a 256 px copy of the data (scripts/resize_dataset.py).
stage "stage 4: a 256 px copy of the data"
$PYTHON scripts/resize_dataset.py --dataset data/all_sources --size 256 --jpeg-quality 85 --output data/all_sources_256
STAGE4_ARGS=(--dataset_dir data/all_sources_256 --image_size "[256,256]" --batch_size 32 --val_interval 1
    --synthetic_opacity_prob 0.0 --seed 0)
stage "stage 4: training at 256 px"
$PYTHON -m monai.bundle run training "${BUNDLE_ARGS[@]}" --config_file "${TRAINING_CONFIGS}" "${STAGE4_ARGS[@]}" \
    --run_name all_sources_256 --output_dir runs/all_sources_256 --num_epochs 28 --lr_scheduler#T_max 40 \
    --learning_rate 0.0005 --init_checkpoint runs/all_sources/model.pt
stage "stage 4: lower learning rate"
$PYTHON -m monai.bundle run training "${BUNDLE_ARGS[@]}" --config_file "${TRAINING_CONFIGS}" "${STAGE4_ARGS[@]}" \
    --run_name all_sources_256_anneal --output_dir runs/all_sources_256_anneal --num_epochs 18 \
    --learning_rate 0.0002 --init_checkpoint runs/all_sources_256/model.pt
$PYTHON scripts/ship_model.py --checkpoint runs/all_sources_256_anneal/model.pt --output bundle/models/model.pt

stage "evaluation of the shipped weights"
evaluate() {  # evaluate DATASET_DIR DATALIST_KEY OUTPUT
    $PYTHON -m monai.bundle run "${BUNDLE_ARGS[@]}" \
        --config_file "${EVALUATE_CONFIGS}" \
        --dataset_dir "$1" --datalist_key "$2" --output_dir "$3"
}
evaluate data/all_sources test runs/evaluation_test              # the COVID-QU-Ex authors' val split: never trained on
evaluate data/all_sources validation runs/evaluation_validation  # V7 lungs of 34 unseen patients; COVID-QU-Ex tuning rows
evaluate data/base validation runs/evaluation_labelme            # the 10 LabelMe images as drawn (trained on in stage 3)
stage "severity score calibration"
bash scripts/calibrate_severity.sh "$DATA_ROOT"

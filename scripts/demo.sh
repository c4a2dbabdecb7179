#!/usr/bin/env bash
# The main job end to end on the embedded default, the synthetic MSD task:
#   generate -> preprocess -> train (fold 0) -> predict NIfTI masks of the fold's validation cases -> evaluate.
# Raw data lands in ./data, everything produced in ./results (both git-ignored). No GPU needed: 1 min 53 s on
# 2 CPU cores (measured with `time bash scripts/demo.sh` after `rm -rf data results`, .venv already built).
# Knobs (environment): CASES (20), EPOCHS (20), DATA, RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
DATA=${DATA:-data}
RESULTS=${RESULTS:-results}
EPOCHS=${EPOCHS:-20}
RUN="$RESULTS/00_3d_fold0"

echo "== 1. generate the synthetic task"
$PY -m preprocess.synthetic --out "$DATA" --cases "${CASES:-20}" --seed 0
echo "== 2. preprocess (training, validation and test cases)"
for mode in training val test; do
  $PY -m preprocess --task 00 --dim 3 --data "$DATA" --results "$RESULTS" --exec_mode $mode --n_jobs 2
done
echo "== 3. train fold 0"
rm -rf "$RUN"
$PY train.py --task 00 --dim 3 --fold 0 --data "$RESULTS/00_3d" --results "$RUN" \
  --filters 8,16,32,64 --learning_rate 3e-3 --min_epochs "$EPOCHS" --max_epochs "$EPOCHS"
echo "== 4. predict the fold's validation cases (NIfTI in the source geometry) and the test cases"
$PY predict.py --data "$RESULTS/00_3d/val" --fold 0 --ckpt_path "$RUN" --results "$RUN/preds_val" --overlays
$PY predict.py --data "$RESULTS/00_3d/test" --ckpt_path "$RUN" --results "$RUN/preds_test"
echo "== 5. evaluate against the source labels"
$PY evaluate.py --preds "$RUN/preds_val" --lbls "$DATA/Task00_Synthetic/labelsTr" --fold 0 --data "$RESULTS/00_3d" \
  --hd95 --nsd
$PY visualize.py --logs "$RUN/logs.json" --out "$RUN/curves.png"
echo "done: training curves $RUN/curves.png, scores $RUN/preds_val/evaluation.json"

#!/usr/bin/env bash
# The main job end to end on the embedded default: generate the synthetic MSD task and preprocess it.
# Everything lands under ./data (raw task) and ./results (preprocessed volumes); both are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
DATA=${DATA:-data}
RESULTS=${RESULTS:-results}

$PY -m preprocess.synthetic --out "$DATA" --cases ${CASES:-12} --seed 0
$PY -m preprocess --task 00 --dim 3 --data "$DATA" --results "$RESULTS" --exec_mode training --n_jobs 2
$PY -m preprocess --task 00 --dim 3 --data "$DATA" --results "$RESULTS" --exec_mode test --n_jobs 2

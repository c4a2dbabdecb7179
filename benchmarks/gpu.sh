#!/usr/bin/env bash
# The seed's benchmark tables in one call on a GPU machine (docs/reference.md §9):
#   3D, task 01 patch 128³, 4 channels, batch 1/2/4: train and predict, AMP (bf16) and TF32 (fp32 default
#   precision); 2D, task 01 patch 192×160, batch 64: train and predict, AMP and TF32.
# Needs only jax (with CUDA), flax, optax, orbax-checkpoint, absl-py and numpy: synthetic device-resident
# batches, no DALI, nibabel or ml_collections. Wheels placed in benchmarks/wheels/ (e.g. a missing flax/optax,
# or monai for BASELINE=monai) are installed first without network access.
#
#   bash benchmarks/gpu.sh                       # full tables (STEPS timed steps after WARMUP per row)
#   STEPS=50 WARMUP=5 BASELINE=monai bash benchmarks/gpu.sh
# Environment: PY (python), OUT_DIR (perf JSON folder, default $OUT or benchmarks/out), STEPS, WARMUP,
# BASELINE (none|monai), ONLY (3d|2d|all), EXTRA_3D / EXTRA_2D (extra benchmark.py flags, e.g. a tiny
# --patch/--filters for a CPU smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=${OUT_DIR:-${OUT:-benchmarks/out}}
STEPS=${STEPS:-100}
WARMUP=${WARMUP:-10}
BASELINE=${BASELINE:-none}
ONLY=${ONLY:-all}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"

if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps benchmarks/wheels/*.whl
fi
"$PY" - <<'EOF'
import jax
d = jax.devices()[0]
print(f"jax {jax.__version__} on {jax.default_backend()}: {len(jax.devices())} x {d.device_kind}")
EOF

bench() {  # $1 = json name, rest = benchmark.py flags
  local name=$1; shift
  echo "== benchmark.py $*"
  "$PY" benchmark.py "$@" --warmup "$WARMUP" --baseline "$BASELINE" --results "$OUT_DIR" --logname "$name.json"
}

if [[ $ONLY == all || $ONLY == 3d ]]; then
  for prec in amp noamp; do
    bench "train3d_$prec" --mode train --dim 3 --task 01 --batch_size 1,2,4 --"$prec" \
      --train_batches "$STEPS" ${EXTRA_3D:-}
    bench "predict3d_$prec" --mode predict --dim 3 --task 01 --batch_size 1,2,4 --"$prec" \
      --test_batches "$STEPS" ${EXTRA_3D:-}
  done
fi
if [[ $ONLY == all || $ONLY == 2d ]]; then
  for prec in amp noamp; do
    bench "train2d_$prec" --mode train --dim 2 --task 01 --batch_size 64 --"$prec" \
      --train_batches "$STEPS" ${EXTRA_2D:-}
    bench "predict2d_$prec" --mode predict --dim 2 --task 01 --batch_size 64 --"$prec" \
      --test_batches "$STEPS" ${EXTRA_2D:-}
  done
fi

"$PY" - "$OUT_DIR" <<'EOF'
import sys
from pathlib import Path

from nnunet_jax.benchmarking import format_rows, read_perf_json

rows = read_perf_json(sorted(Path(sys.argv[1]).glob("*.json")))
rows.sort(key=lambda r: (r["dim"], r["mode"] != "train", r["precision"], r["framework"], r["batch_size"]))
print("\n== all results (img/s = global batch / mean step time; latency per batch)")
print(format_rows(rows))


def find(mode, batch):
    for r in rows:
        if (r["framework"], r["dim"], r["mode"], r["batch_size"], r["precision"]) == ("jax", 3, mode, batch,
                                                                                       "amp-bf16"):
            return r["throughput_img_s"]
    return None


print("\n== targets on one H100/H200 (printed, not asserted)")
for mode, batch, target in (("train", 2, 80.0), ("predict", 1, 200.0)):
    got = find(mode, batch)
    shown = "not measured" if got is None else f"{got:.1f} img/s"
    print(f"3D AMP {mode} batch {batch}: {shown} (target >= {target:.0f} img/s; seed A100 "
          f"{'15.97' if mode == 'train' else '47.16'})")
EOF

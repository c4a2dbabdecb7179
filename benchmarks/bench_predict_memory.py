"""Peak RSS of mapping a prediction back to a large CT's source geometry (the memory claim of predict.py).

    .venv/bin/python benchmarks/bench_predict_memory.py            # 512×512×400 CT, 3 classes

Scenario: a source CT of (Z, Y, X) = 400×512×512 at 1.0×0.78×0.78 mm, preprocessed to 1.6×0.79×0.79 mm
(Spleen-like), so the network output is (3, 250, 505, 505) float32 logits. Each mode runs in a fresh
process and reports its peak RSS (ru_maxrss) next to the sizes of what it holds:

- ``labels``: predict.py's default path — :func:`to_source_labels` (resize streamed in slabs of Z rows,
  all channels in step, running max + argmax per slab) and the NIfTI write; never holds a class map,
  nor a full-size resampling intermediate, at the source resolution.
- ``probs``: ``--save_preds`` — all K probability maps at the source resolution (the reference's output),
  each channel resized slab by slab straight into the output, softmax slab by slab.

"extra" = peak RSS minus the RSS just before the export (logits already allocated, no temporaries).
Measured (2 shared CPU cores; old and new interleaved, two runs each, same load):

    mode    before (whole-volume passes)         after (slabs of 32 rows, restore_* default)
    labels  3671 MB peak, extra 2730, 24.5 s     1383 MB peak, extra 444, 18.8 s
    probs   3870 MB peak, extra 2932, 18.8 s     2286 MB peak, extra 1350 (output 1200), 18.3 s
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rss import peak_rss_mb, rss_mb  # benchmarks/rss.py (this folder is on sys.path when run)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = (400, 512, 512)
SPACING = (1.0, 0.78, 0.78)
TARGET = (1.6, 0.79, 0.79)
N_CLASS = 3


def run(mode: str, shape=SHAPE, n_class: int = N_CLASS) -> dict:
    from nnunet_jax.inference.predictor import (
        Prediction,
        save_prediction,
        to_source_labels,
        to_source_probabilities,
    )
    from nnunet_jax.preprocessing.case import CaseMeta, target_shape

    resampled = target_shape(shape, SPACING, TARGET)
    meta = CaseMeta(crop_box=[[0, s] for s in shape], original_shape=shape, cropped_shape=shape,
                    resampled_shape=resampled, source_spacing=SPACING, target_spacing=TARGET,
                    affine=np.diag([*SPACING[::-1], 1.0]), padding=np.zeros((3, 2)))
    rng = np.random.default_rng(0)
    logits = np.empty((n_class, *resampled), np.float32)
    for c in range(n_class):  # in place: no full-size temporary raises the peak before the export
        rng.standard_normal(dtype=np.float32, out=logits[c])
    base = rss_mb()
    t0, cpu0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "labels":
            labels = to_source_labels(logits, meta, "logits")
            save_prediction(Prediction("ct", labels, meta.affine), tmp)
        else:
            probs = to_source_probabilities(logits, meta, "logits")
            assert probs.shape == (n_class, *shape)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    voxels = int(np.prod(shape))
    return {"mode": mode, "source_shape": list(shape), "network_output_shape": [n_class, *resampled],
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_mb": round(base, 1),
            "extra_mb": round(peak_rss_mb() - base, 1),
            "logits_mb": round(logits.nbytes / 2**20, 1),
            "one_source_channel_mb": round(voxels * 4 / 2**20, 1),
            "all_source_channels_mb": round(n_class * voxels * 4 / 2**20, 1), "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu, 1)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("labels", "probs"):
        print(json.dumps(run(sys.argv[1])))
        return
    rows = []
    for mode in ("labels", "probs"):
        out = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"source {SHAPE} (Z, Y, X), {N_CLASS} classes; network output {rows[0]['network_output_shape']} "
          f"= {rows[0]['logits_mb']} MB; one source channel = {rows[0]['one_source_channel_mb']} MB, "
          f"all = {rows[0]['all_source_channels_mb']} MB")
    print(f"{'mode':<7} {'peak RSS MB':>12} {'before MB':>10} {'extra MB':>9} {'seconds':>8} {'CPU s':>6}")
    for r in rows:
        print(f"{r['mode']:<7} {r['peak_rss_mb']:>12} {r['rss_before_mb']:>10} {r['extra_mb']:>9} "
              f"{r['seconds']:>8} {r['cpu_seconds']:>6}")


if __name__ == "__main__":
    main()

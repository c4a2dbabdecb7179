"""nnU-Net v2's export alone: its ``convert_predicted_logits_to_segmentation_with_correct_shape`` against
ours (``nnunet_jax.interop.nnunetv2.export.logits_to_segmentation``) on the same fp16 logits.

    .venv-oracle/bin/python benchmarks/bench_nnv2_export.py                 # labels, then probabilities
    .venv-oracle/bin/python benchmarks/bench_nnv2_export.py --scale 0.5     # a smaller volume
    .venv-oracle/bin/python benchmarks/bench_nnv2_export.py --modes labels

Scenario (the case v2's users complain about): a 14-class model, a 512×512×300 CT at 0.8×0.8×1.5 mm
(reader order z, y, x = 300×512×512 at 1.5, 0.8, 0.8), a 1.5 mm isotropic 3d_fullres plan, so the network
output is (14, 300, 273, 273) fp16 logits that the export resamples (linear, no separate z) back to
300×512×512. Smooth random logits (many classes appear). Each side runs in its own fresh process, one
after the other (v2 needs the oracle environment: torch + nnunetv2; ours imports neither); each reports
wall time of the call and peak RSS (ru_maxrss); "extra" is the peak minus the RSS just before the call
(the logits loaded, libraries imported). The label maps are compared voxel by voxel, the probabilities
by their largest difference.

Measured here (2 shared CPU cores, full size, ``--modes labels`` then ``--modes probs``):

    mode    side    wall s  peak MB  extra MB
    labels  v2      104.65     6089      5131
    labels  ours     20.29      848       188
    labels  ratio ours/v2: time 0.19, peak 0.14, extra 0.04; labels equal: True
    probs   v2      128.21    12104     11145
    probs   ours     46.28     5076      4416   (the output alone: 14×300×512×512 float32 = 4.4 GB)
    probs   ratio ours/v2: time 0.36, peak 0.42, extra 0.40; labels equal: True; max |Δp| 3.58e-07
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rss import peak_rss_mb, rss_mb  # benchmarks/rss.py (this folder is on sys.path when run)

ROOT = Path(__file__).resolve().parents[1]

SHAPE = (300, 512, 512)  # reader order (z, y, x)
SPACING = (1.5, 0.8, 0.8)
TARGET = (1.5, 1.5, 1.5)
N_CLASS = 14


def plans_dict(net_shape) -> dict:
    """A v2 plans.json for the scenario (only what the export reads, plus what the readers check)."""
    rs = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans",
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 40.0, "std": 50.0, "percentile_00_5": -50.0, "percentile_99_5": 200.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [128, 128, 128], "median_image_size_in_voxels": list(net_shape),
            "spacing": list(TARGET), "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {**rs, "order": 3},
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {**rs, "is_seg": True},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": rs, "batch_dice": True,
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {}, "_kw_requires_import": []}}},
    }


def dataset_dict() -> dict:
    labels = {"background": 0, **{f"organ{i}": i for i in range(1, N_CLASS)}}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}


def props_dict(shape) -> dict:
    box = [[0, s] for s in shape]
    return {"spacing": list(SPACING), "shape_before_cropping": tuple(shape), "bbox_used_for_cropping": box,
            "shape_after_cropping_and_before_resampling": tuple(shape),
            "sitk_stuff": {"spacing": SPACING[::-1], "origin": (0.0, 0.0, 0.0),
                           "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}}


def make_logits(net_shape, path: Path) -> None:
    """Smooth fp16 logits: per class a sum of separable sinusoids (cheap to make, many classes win)."""
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(N_CLASS, *net_shape))
    grids = [np.arange(n, dtype=np.float32) for n in net_shape]
    for c in range(N_CLASS):
        f = [np.sin(g * rng.uniform(0.02, 0.12) + rng.uniform(0, 6.3)) * rng.uniform(2, 5) for g in grids]
        out[c] = (f[0][:, None, None] + f[1][None, :, None] + f[2][None, None, :]).astype(np.float16)
    out.flush()


def child(side: str, work: Path, probs: bool) -> None:
    """One side of one mode, in this (fresh) process: writes its labels (and probabilities), prints JSON."""
    meta = json.loads((work / "meta.json").read_text())
    if side == "v2":
        import torch
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape as v2_convert,
        )
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        pm = PlansManager(meta["plans"])
        lm = pm.get_label_manager(meta["dataset"])
        cm = pm.get_configuration("3d_fullres")
        logits = torch.from_numpy(np.load(work / "logits.npy"))
        props = props_dict(meta["shape"])
        before = rss_mb()
        t0 = time.perf_counter()
        out = v2_convert(logits, pm, cm, lm, props, return_probabilities=probs,
                         num_threads_torch=meta["threads"])
        wall = time.perf_counter() - t0
        seg, p = out if probs else (out, None)
    else:
        sys.path.insert(0, str(ROOT))
        from nnunet_jax.interop.nnunetv2.export import logits_to_segmentation
        from nnunet_jax.interop.nnunetv2.plans import V2Labels, V2Plans
        from nnunet_jax.interop.nnunetv2.preprocessing import CaseProps

        plans = V2Plans.from_dict(meta["plans"])
        labels = V2Labels.from_dataset_json(meta["dataset"])
        shape = tuple(meta["shape"])
        props = CaseProps(SPACING, SPACING, shape, tuple((0, s) for s in shape), shape)
        logits = np.load(work / "logits.npy")
        before = rss_mb()
        t0 = time.perf_counter()
        seg, p = logits_to_segmentation(logits, props, plans, "3d_fullres", labels, save_probabilities=probs)
        wall = time.perf_counter() - t0
    peak = peak_rss_mb()
    np.save(work / f"seg_{side}.npy", np.ascontiguousarray(seg))
    if p is not None:
        np.save(work / f"probs_{side}.npy", np.ascontiguousarray(p))
    print(json.dumps({"side": side, "wall_s": round(wall, 2), "peak_mb": round(peak),
                      "extra_mb": round(peak - before)}))


def _run_child(side: str, work: Path, probs: bool) -> dict:
    py = sys.executable
    cmd = [py, __file__, "--child", side, "--work", str(work)] + (["--probs"] if probs else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_abs_diff(a: Path, b: Path) -> float:
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    if x.shape != y.shape:
        return float("inf")
    return max(float(np.abs(x[c].astype(np.float32) - y[c]).max()) for c in range(x.shape[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="scale the in-plane size (1.0: 512x512)")
    ap.add_argument("--slices", type=int, default=SHAPE[0], help="number of slices (300)")
    ap.add_argument("--modes", default="labels,probs", help="labels, probs or both")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for v2's softmax (default 1)")
    ap.add_argument("--child")
    ap.add_argument("--work")
    ap.add_argument("--probs", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.work), args.probs)
        return
    side = int(round(SHAPE[1] * args.scale))
    shape = (args.slices, side, side)
    net_shape = tuple(int(round(s * sp / t)) for s, sp, t in zip(shape, SPACING, TARGET, strict=True))
    with tempfile.TemporaryDirectory(prefix="bench_nnv2_export_") as tmp:
        work = Path(tmp)
        make_logits(net_shape, work / "logits.npy")
        meta = {"plans": plans_dict(net_shape), "dataset": dataset_dict(), "shape": shape,
                "threads": args.threads}
        (work / "meta.json").write_text(json.dumps(meta))
        print(f"source {shape} at {SPACING} mm, logits {(N_CLASS, *net_shape)} fp16 at {TARGET} mm")
        print(f"{'mode':7s} {'side':5s} {'wall s':>8s} {'peak MB':>8s} {'extra MB':>9s}")
        for mode in args.modes.split(","):
            probs = mode == "probs"
            res = {s: _run_child(s, work, probs) for s in ("v2", "ours")}
            for s in ("v2", "ours"):
                r = res[s]
                print(f"{mode:7s} {s:5s} {r['wall_s']:8.2f} {r['peak_mb']:8d} {r['extra_mb']:9d}")
            same = np.array_equal(np.load(work / "seg_v2.npy"), np.load(work / "seg_ours.npy"))
            o, v = res["ours"], res["v2"]
            line = (f"{mode:7s} ratio ours/v2: time {o['wall_s'] / v['wall_s']:.2f}, "
                    f"peak {o['peak_mb'] / v['peak_mb']:.2f}, "
                    f"extra {o['extra_mb'] / max(v['extra_mb'], 1):.2f}; labels equal: {same}")
            if probs:
                line += f"; max |Δp| {_max_abs_diff(work / 'probs_v2.npy', work / 'probs_ours.npy'):.2e}"
                for s in ("v2", "ours"):
                    (work / f"probs_{s}.npy").unlink()
            print(line, flush=True)


if __name__ == "__main__":
    main()

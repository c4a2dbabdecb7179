"""An nnU-Net v2 trained model end to end: nnU-Net v2's own predictor against ours on this CPU.

    .venv-oracle/bin/python benchmarks/bench_nnunetv2.py                    # both scenarios
    .venv-oracle/bin/python benchmarks/bench_nnunetv2.py --scale 0.5        # a quick, smaller run
    .venv-oracle/bin/python benchmarks/bench_nnunetv2.py --scenarios mirror

Scenarios (a CT at 0.8×0.8×1.5 mm through a 1.5 mm isotropic 3d_fullres plan with v2's default plain
network for a 128³ patch: 6 stages, 32-320 features; random weights, the time does not depend on them):
- ``plain``: a 200×352×352 (z, y, x) volume, resampled to 200×188×188, 12 tiles, mirroring off;
- ``mirror``: a 120×240×240 volume (120×128×128 after resampling, 1 tile), mirroring on (8 forwards).
Each side runs in its own fresh process, one after the other: v2 (``nnUNetPredictor.predict_from_files_
sequential``, CPU, step 0.5, Gaussian) in the oracle environment, ours (``V2Predictor``) in ``.venv``
(Python >= 3.12, jax's oneDNN convolutions), once in fp32 (the default: v2's labels exactly) and once with
``amp=True`` (``ours_bf16``: bf16 convolutions, oneDNN's AVX512-BF16 path where the CPU has it).
Wall time covers loading the model, reading, preprocessing, the
sliding window (our compile included), the export and writing; peak RSS is ru_maxrss. The written label
maps are compared voxel by voxel.

Measured here (2 CPU cores, nothing else running; ``.venv-oracle/bin/python benchmarks/bench_nnunetv2.py``):

    scenario  side        wall s  peak MB
    plain     v2           150.4     2809
    plain     ours          66.6     2949
    plain     ours_bf16     38.9     1951
    plain     ours/v2: time 0.44 (2.26x faster), peak 1.05; labels equal on 100.000 % of voxels
    plain     ours_bf16/v2: time 0.26 (3.87x faster), peak 0.69; labels equal on 99.364 % of voxels
    mirror    v2            76.0     2639
    mirror    ours          46.9     1748
    mirror    ours_bf16     26.8     1312
    mirror    ours/v2: time 0.62 (1.62x faster), peak 0.66; labels equal on 100.000 % of voxels
    mirror    ours_bf16/v2: time 0.35 (2.84x faster), peak 0.50; labels equal on 99.847 % of voxels

The model folder is made by v2's own code (``get_network_from_plans``, ``torch.save``), so this script
needs the oracle environment; our side never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_nnv2_export import plans_dict as export_plans  # this folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
SPACING_ZYX = (1.5, 0.8, 0.8)
SCENARIOS = {"plain": ((200, 352, 352), False), "mirror": ((120, 240, 240), True)}
SIDES = ("v2", "ours", "ours_bf16")
N_CLASS = 3


def plans_dict() -> dict:
    """The export benchmark's plans (CT normalisation, 1.5 mm isotropic, 128³ patch) with v2's default
    6-stage plain U-Net for that patch."""
    n = 6
    arch = {"n_stages": n, "features_per_stage": [32, 64, 128, 256, 320, 320],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    plans = export_plans((160, 171, 171))
    plans["configurations"]["3d_fullres"]["architecture"] = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    return plans


def dataset_dict() -> dict:
    return {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
            "numTraining": 1, "file_ending": ".nii.gz"}


def make_model(model_dir: Path, mirror: bool) -> None:
    """The results folder with fold_0/checkpoint_final.pth, written by v2's own code (random weights)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    model_dir.mkdir(parents=True, exist_ok=True)
    plans, dataset = plans_dict(), dataset_dict()
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (model_dir / "dataset.json").write_text(json.dumps(dataset, indent=2))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 1, N_CLASS, deep_supervision=True)
    with torch.no_grad():
        for head in net.decoder.seg_layers:
            head.weight.mul_(6.0)
            head.bias.zero_()
    ckpt = {"network_weights": net.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
            "logging": {}, "_best_ema": 0.0, "current_epoch": 1000,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2) if mirror else None}
    (model_dir / "fold_0").mkdir(exist_ok=True)
    torch.save(ckpt, model_dir / "fold_0" / "checkpoint_final.pth")


def make_case(path: Path, shape_zyx) -> None:
    """A CT-like volume: soft-tissue blobs in air with a body outline, int16 HU, 0.8×0.8×1.5 mm."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    z, y, x = shape_zyx
    yy, xx = np.mgrid[:y, :x]
    body = ((yy - y / 2) / (0.42 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 < 1
    noise = gaussian_filter(rng.standard_normal((z // 4 + 1, y // 8 + 1, x // 8 + 1)), 1.0)
    from scipy.ndimage import zoom

    tissue = zoom(noise, (z / noise.shape[0], y / noise.shape[1], x / noise.shape[2]), order=1)[:z, :y, :x]
    vol = np.where(body[None], 40 + 120 * tissue, -1000) + rng.normal(0, 15, (z, y, x))
    aff = np.diag([SPACING_ZYX[2], SPACING_ZYX[1], SPACING_ZYX[0], 1.0])
    nib.save(nib.Nifti1Image(np.round(vol).astype(np.int16).transpose(2, 1, 0), aff), str(path))


def child(side: str, work: Path, threads: int) -> None:
    """One side in this fresh process: predict work/in into work/out_<side>, print JSON."""
    from rss import peak_rss_mb  # benchmarks/rss.py

    t0 = time.perf_counter()
    out = work / f"out_{side}"
    out.mkdir(parents=True, exist_ok=True)  # v2 writes its arguments there before its first case
    if side == "v2":
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        torch.set_num_threads(threads)
        meta = json.loads((work / "meta.json").read_text())
        p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=meta["mirror"],
                            perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                            allow_tqdm=False)
        p.initialize_from_trained_model_folder(str(work / "model"), use_folds=(0,))
        p.predict_from_files_sequential(str(work / "in"), str(out), save_probabilities=False, overwrite=True)
    else:
        sys.path.insert(0, str(ROOT))
        from nnunet_jax.interop.nnunetv2.predictor import V2Predictor

        V2Predictor.from_model_folder(work / "model", (0,), amp=side == "ours_bf16").predict_files(
            [work / "in"], out, log=None)
    print(json.dumps({"side": side, "wall_s": round(time.perf_counter() - t0, 1),
                      "peak_mb": round(peak_rss_mb())}))


def _run_child(side: str, work: Path, threads: int) -> dict:
    py = sys.executable if side == "v2" else str(ROOT / ".venv" / "bin" / "python")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.run([py, __file__, "--child", side, "--work", str(work), "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=["plain", "mirror"])
    ap.add_argument("--scale", type=float, default=1.0, help="scale the in-plane size (0.5: a quick run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", choices=SIDES)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.work, args.threads)
        return
    import nibabel as nib

    print(f"{'scenario':9} {'side':9} {'wall s':>8} {'peak MB':>8}")
    for name in args.scenarios:
        shape, mirror = SCENARIOS[name]
        shape = (shape[0], *(max(64, int(round(s * args.scale))) for s in shape[1:]))
        with tempfile.TemporaryDirectory(prefix="bench_nnv2_") as tmp:
            work = Path(tmp)
            (work / "in").mkdir()
            make_model(work / "model", mirror)
            make_case(work / "in" / "ct_0000.nii.gz", shape)
            (work / "meta.json").write_text(json.dumps({"mirror": mirror}))
            res = {side: _run_child(side, work, args.threads) for side in SIDES}
            for side in SIDES:
                print(f"{name:9} {side:9} {res[side]['wall_s']:8.1f} {res[side]['peak_mb']:8d}", flush=True)
            a = np.asarray(nib.load(str(work / "out_v2" / "ct.nii.gz")).dataobj)
            for side in SIDES[1:]:
                b = np.asarray(nib.load(str(work / f"out_{side}" / "ct.nii.gz")).dataobj)
                t, m = res[side]["wall_s"] / res["v2"]["wall_s"], res[side]["peak_mb"] / res["v2"]["peak_mb"]
                print(f"{name:9} {side}/v2: time {t:.2f} ({1 / t:.2f}x faster), peak {m:.2f}; volume {shape} "
                      f"(z, y, x); labels equal on {(a == b).mean() * 100:.3f} % of voxels; labels present "
                      f"{np.unique(a).tolist()}", flush=True)


if __name__ == "__main__":
    main()

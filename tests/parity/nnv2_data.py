"""Fixture helpers for the nnU-Net v2 parity tests: tiny synthetic raw datasets in v2's format, and v2's
own planning + preprocessing run on them (``nnUNetv2_plan_and_preprocess`` in a subprocess).

Datasets (all made here, seeded, a few seconds to write):
- ``ct`` (901): 3D CT, anisotropic (the 3 mm axis is the file's first axis, so v2 transposes), with a
  zero border on some cases (cropping), spacings differing per case (resampling, separate z).
- ``mri`` (902): 3D, 2 channels, a wide zero border (v2 turns on ZScore's use_mask_for_norm), mildly
  anisotropic, spacings differing per case.
- ``2d`` (903): 2D grey PNGs (v2's NaturalImage2DIO).
- ``regions`` (904): 3D, labels with regions and ``regions_class_order``.

Usage: ``root = make_dataset(tmp, "ct")`` then ``plan_and_preprocess(tmp, "ct", ["3d_fullres"])``;
``v2_env(tmp)`` has the three ``nnUNet_*`` folders; ``load_preprocessed(tmp, "ct", cfg, case)``.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

DATASETS = {"ct": (901, "Dataset901_TinyCT"), "mri": (902, "Dataset902_TinyMRI"),
            "2d": (903, "Dataset903_Tiny2D"), "regions": (904, "Dataset904_TinyRegions")}


def v2_env(root: Path) -> dict:
    """The environment v2's commands need, rooted at ``root``."""
    root = Path(root)
    env = dict(os.environ)
    for k, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                   ("nnUNet_results", "results")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[k] = str(root / sub)
    env.setdefault("nnUNet_def_n_proc", "1")
    env["OMP_NUM_THREADS"] = "1"
    return env


def raw_dir(root: Path, kind: str) -> Path:
    return Path(root) / "raw" / DATASETS[kind][1]


def _blob_volume(rng, shape, n_blobs, value_range):
    """A smooth random volume (sum of Gaussian blobs) and the blob index map (labels)."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    img = np.zeros(shape)
    lab = np.zeros(shape, np.uint8)
    for i in range(n_blobs):
        c = [rng.uniform(0.25 * s, 0.75 * s) for s in shape]
        r = [rng.uniform(0.12 * s, 0.25 * s) for s in shape]
        d2 = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r, strict=True))
        img += rng.uniform(*value_range) * np.exp(-d2)
        lab[d2 < 1.0] = i % 2 + 1
    return img, lab


def _save_nii(arr_xyz: np.ndarray, pixdim_xyz, path: Path, dtype) -> None:
    aff = np.diag([*pixdim_xyz, 1.0])
    aff[:3, 3] = [-5.0, 3.0, 7.5]
    img = nib.Nifti1Image(arr_xyz.astype(dtype), aff)
    img.header.set_zooms(pixdim_xyz)
    nib.save(img, str(path))


def make_dataset(root: Path, kind: str, n_cases: int = 3, seed: int = 0) -> Path:
    """Write the raw dataset ``kind`` under ``root/raw`` and return its folder."""
    rng = np.random.default_rng(seed + DATASETS[kind][0])
    d = raw_dir(root, kind)
    (d / "imagesTr").mkdir(parents=True, exist_ok=True)
    (d / "labelsTr").mkdir(parents=True, exist_ok=True)
    (d / "imagesTs").mkdir(parents=True, exist_ok=True)
    ending = ".png" if kind == "2d" else ".nii.gz"
    labels: dict = {"background": 0, "a": 1, "b": 2}
    channels = {"0": "CT"} if kind == "ct" else {"0": "T1", "1": "T2"} if kind == "mri" else {"0": "img"}
    extra: dict = {}
    if kind == "regions":
        labels = {"background": 0, "whole": [1, 2], "core": 2}
        extra["regions_class_order"] = [1, 2]
    cases = [f"case{i:02d}" for i in range(n_cases)]
    for i, case in enumerate(cases):
        folder, stem = "imagesTr", case
        if kind == "2d":
            from PIL import Image

            shape = (int(rng.integers(36, 48)), int(rng.integers(40, 52)))
            img, lab = _blob_volume(rng, shape, 3, (60, 200))
            img = np.clip(img + rng.normal(0, 5, shape) + 20, 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(d / folder / f"{stem}_0000.png")
            Image.fromarray(lab).save(d / "labelsTr" / f"{case}.png")
            continue
        if kind == "ct":
            inplane = (0.9, 0.8, 0.75)[i % 3]  # differing spacings: every configuration resamples some case
            pixdim = ((3.0, 2.5, 3.5)[i % 3], inplane, inplane)
            shape = (int(rng.integers(10, 14)), int(rng.integers(36, 44)), int(rng.integers(38, 46)))
            img, lab = _blob_volume(rng, shape, 3, (200, 900))
            img = img - 1000 + rng.normal(0, 20, shape)
            if i % 2 == 0:  # a zero border: cropping
                img[:, :3] = 0
                img[:, :, -4:] = 0
                lab[:, :3] = 0
                lab[:, :, -4:] = 0
            _save_nii(np.round(img), pixdim, d / folder / f"{stem}_0000{ending}", np.int16)
        else:
            pixdim = ((1.0, 1.1, 1.25)[i % 3], (1.0, 0.9, 1.0)[i % 3], 1.5)
            shape = (int(rng.integers(30, 38)), int(rng.integers(32, 40)), int(rng.integers(18, 24)))
            n_ch = 2 if kind == "mri" else 1
            inner = tuple(slice(5, s - 5) for s in shape)
            for c in range(n_ch):
                img, lab = _blob_volume(rng, shape, 3, (100, 400))
                img = img + 50 + rng.normal(0, 10, shape)
                full = np.zeros(shape)
                full[inner] = img[inner]
                _save_nii(full, pixdim, d / folder / f"{stem}_{c:04d}{ending}", np.float32)
            lab2 = np.zeros(shape, np.uint8)
            lab2[inner] = lab[inner]
            lab = lab2
        _save_nii(lab.astype(np.uint8), pixdim, d / "labelsTr" / f"{case}{ending}", np.uint8)
    meta = {"channel_names": channels, "labels": labels, "numTraining": n_cases, "file_ending": ending,
            "name": DATASETS[kind][1], **extra}
    (d / "dataset.json").write_text(json.dumps(meta, indent=2))
    return d


def run_v2(args: list[str], root: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of v2's console scripts (installed beside this interpreter) with ``v2_env(root)``."""
    exe = Path(sys.executable).parent / args[0]
    proc = subprocess.run([str(exe), *args[1:]], env=v2_env(root), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc


def plan_and_preprocess(root: Path, kind: str, configurations: list[str]) -> Path:
    """v2's fingerprint, plans and preprocessing of dataset ``kind``; returns its preprocessed folder."""
    ds_id = DATASETS[kind][0]
    run_v2(["nnUNetv2_plan_and_preprocess", "-d", str(ds_id), "-c", *configurations, "-npfp", "1",
            "-np", *["1"] * len(configurations)], root)
    return Path(root) / "preprocessed" / DATASETS[kind][1]


def load_preprocessed(root: Path, kind: str, configuration: str, case: str):
    """(data, seg, properties) of one case as v2's preprocessing stored them."""
    import blosc2

    folder = Path(root) / "preprocessed" / DATASETS[kind][1] / f"nnUNetPlans_{configuration}"
    data = blosc2.open(urlpath=str(folder / f"{case}.b2nd"), mode="r")[:]
    seg = blosc2.open(urlpath=str(folder / f"{case}_seg.b2nd"), mode="r")[:]
    with open(folder / f"{case}.pkl", "rb") as f:
        props = pickle.load(f)
    return np.asarray(data), np.asarray(seg), props


def case_files(root: Path, kind: str, case: str, folder: str = "imagesTr") -> list[Path]:
    d = raw_dir(root, kind)
    ending = ".png" if kind == "2d" else ".nii.gz"
    return sorted((d / folder).glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))


CONFIGS = {"ct": ("3d_fullres", "2d"), "mri": ("3d_fullres", "2d"), "2d": ("2d",),
           "regions": ("3d_fullres", "2d")}
_PREPARED: dict[str, Path] = {}


def prepared(tmp_path_factory) -> Path:
    """All four datasets, planned and preprocessed by v2 (2d and 3d_fullres) once per test session;
    returns the root holding raw/, preprocessed/ and results/."""
    if "root" not in _PREPARED:
        root = tmp_path_factory.mktemp("nnv2")
        for kind in DATASETS:
            make_dataset(root, kind)
        run_v2(["nnUNetv2_plan_and_preprocess", "-d", *[str(v[0]) for v in DATASETS.values()],
                "-c", "2d", "3d_fullres", "-npfp", "1", "-np", "1", "1"], root)
        _PREPARED["root"] = root
    return _PREPARED["root"]


RESENC_BLOCKS = (1, 2, 2, 2, 2, 2, 2)  # a small ResEnc (blocks per stage) for the tests


def save_model(root: Path, kind: str, configuration: str, folds=(0, 1), seed: int = 0,
               resenc: bool = False, mirror_axes="default") -> Path:
    """A results folder as v2's training leaves it (``dataset.json``, ``plans.json``,
    ``fold_k/checkpoint_final.pth``) with random weights made by v2's own ``get_network_from_plans``.

    The seg heads are scaled and their biases zeroed so every class wins somewhere (random-init logits are
    otherwise dominated by one bias). ``resenc`` turns the configuration's network into a
    ``ResidualEncoderUNet`` (as v2's ResEnc presets write it) in the saved plans."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    name = DATASETS[kind][1]
    plans = json.loads((Path(root) / "preprocessed" / name / "nnUNetPlans.json").read_text())
    dataset = json.loads((raw_dir(root, kind) / "dataset.json").read_text())
    arch = plans["configurations"][configuration]["architecture"]
    if resenc:
        kw = dict(arch["arch_kwargs"])
        n = kw["n_stages"]
        kw["n_blocks_per_stage"] = list(RESENC_BLOCKS[:n])
        kw["n_conv_per_stage_decoder"] = [1] * (n - 1)
        kw.pop("n_conv_per_stage")
        arch = dict(arch, network_class_name="dynamic_network_architectures.architectures.unet."
                                             "ResidualEncoderUNet", arch_kwargs=kw)
        plans["configurations"][configuration]["architecture"] = arch
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    lm = LabelManager(dataset["labels"], dataset.get("regions_class_order"))
    n_in = len(dataset["channel_names"])
    ndim = len(plans["configurations"][configuration]["patch_size"])
    trainer = "nnUNetTrainer"
    model_dir = (Path(root) / "results" / name /
                 f"{trainer}__{plans['plans_name']}{'ResEnc' if resenc else ''}__{configuration}")
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (model_dir / "dataset.json").write_text(json.dumps(dataset, indent=2))
    axes = (0, 1, 2) if ndim == 3 else (0, 1)
    for fold in folds:
        torch.manual_seed(seed * 100 + int(fold) + DATASETS[kind][0])
        net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                     arch["_kw_requires_import"], n_in, lm.num_segmentation_heads,
                                     deep_supervision=True)
        with torch.no_grad():
            for m in net.modules():  # norm affine away from (1, 0): the weights' layout is then checked
                if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
            for head in net.decoder.seg_layers:
                head.weight.mul_(6.0)
                head.bias.zero_()
        ckpt = {"network_weights": net.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [0.5]}, "_best_ema": 0.5, "current_epoch": 1000,
                "init_args": {"plans": plans, "configuration": configuration, "fold": int(fold),
                              "dataset_json": dataset, "device": torch.device("cpu")},
                "trainer_name": trainer,
                "inference_allowed_mirroring_axes": axes if mirror_axes == "default" else mirror_axes}
        (model_dir / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(ckpt, model_dir / f"fold_{fold}" / "checkpoint_final.pth")
    return model_dir


def write_test_cases(root: Path, kind: str, out: Path, big: bool = True) -> Path:
    """Input images for prediction: copies of the training images, plus (``big``) one case about twice
    the median size in-plane, so the sliding window runs several overlapping tiles."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = raw_dir(root, kind)
    ending = ".png" if kind == "2d" else ".nii.gz"
    for p in sorted((d / "imagesTr").glob(f"*{ending}")):
        (out / p.name).write_bytes(p.read_bytes())
    if big and kind != "2d":
        rng = np.random.default_rng(7)
        if kind == "ct":
            shape, pixdim = (14, 60, 56), (3.0, 0.8, 0.8)
            img, _ = _blob_volume(rng, shape, 6, (200, 900))
            _save_nii(np.round(img - 1000 + rng.normal(0, 20, shape)), pixdim, out / f"big_0000{ending}",
                      np.int16)
        else:
            shape, pixdim = (44, 50, 22), (1.0, 1.0, 1.5)
            n_ch = 2 if kind == "mri" else 1
            for c in range(n_ch):
                img, _ = _blob_volume(rng, shape, 6, (100, 400))
                _save_nii(img + 50 + rng.normal(0, 10, shape), pixdim, out / f"big_{c:04d}{ending}",
                          np.float32)
    return out

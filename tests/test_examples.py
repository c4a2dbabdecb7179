"""The notebooks in examples/ run end to end as scripts (tiny settings) and produce what they promise.

Each example runs in a subprocess on one CPU device (the 8 simulated devices of conftest would multiply the
global batch by 8) with a tiny network, one epoch and five cases. Expected plan values are derived here from
the NIfTI files with numpy and the docs/reference.md rules, not read back from our planning code.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax.data.folds import split_cases
from nnunet_jax.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
TINY = {"EPOCHS": "1", "CASES": "5", "TEST_CASES": "1", "FILTERS": "4,8,16,32"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_example(name: str, work: Path) -> str:
    """Run ``examples/<name>`` with the tiny settings in ``work``; returns its stdout."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env.update({f"NNUNET_EXAMPLE_{k}": v for k, v in TINY.items()})
    env["NNUNET_EXAMPLE_WORK"] = str(work)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not drawn"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000, f"{path} is not a real PNG"


def assert_trained(run: Path, epochs: int) -> None:
    for kind in ("best", "last"):
        steps = [p for p in (run / "checkpoints" / kind).iterdir() if p.name.isdigit()]
        assert steps, f"no finished {kind} checkpoint in {run}"
    records = [json.loads(line) for line in (run / "logs.json").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["mean_dice"] <= 100 for r in records)
    assert_png(run / "curves.png")


def assert_source_geometry(pred: Path, image: Path, n_class: int) -> np.ndarray:
    """The predicted mask has the source image's spatial shape and affine; returns it as (X, Y, Z)."""
    assert pred.is_file(), f"missing prediction {pred}"
    p, src = nib.load(str(pred)), nib.load(str(image))
    assert p.shape == src.shape[:3]
    np.testing.assert_allclose(p.affine, src.affine, atol=1e-4)
    labels = np.asarray(p.dataobj)
    assert np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() < n_class
    return labels


def seed_dice(pred: np.ndarray, label: np.ndarray, n_class: int) -> list[float]:
    """docs/reference.md §4 per class: 1 when the class is absent from both, else 2TP / (|pred| + |label|)."""
    out = []
    for c in range(1, n_class):
        p, g = pred == c, label == c
        out.append(1.0 if not g.any() and not p.any() else 2 * (p & g).sum() / (p.sum() + g.sum()))
    return out


def printed_mean_dice(stdout: str) -> float:
    match = re.search(r"validation mean dice \(%\): (\S+)", stdout)
    assert match, f"no mean dice printed:\n{stdout[-2000:]}"
    value = float(match.group(1))
    assert 0.0 <= value <= 100.0  # percent, as training logs it
    return value


@pytest.mark.slow
def test_quickstart(tmp_path):
    stdout = run_example("quickstart.py", tmp_path)
    task = tmp_path / "data" / "Task00_Synthetic"
    run = tmp_path / "results" / "00_3d_fold0"
    assert_trained(run, int(TINY["EPOCHS"]))

    cases = sorted(p.name[: -len(".nii.gz")] for p in (task / "imagesTr").glob("*.nii.gz"))
    assert len(cases) == int(TINY["CASES"])
    _, val_cases = split_cases(cases, 0)
    dice = []
    for case in val_cases:
        name = f"{case}.nii.gz"
        pred = assert_source_geometry(run / "preds_val" / name, task / "imagesTr" / name, 3)
        label = np.asarray(nib.load(str(task / "labelsTr" / name)).dataobj)
        dice.append(seed_dice(pred, label, 3))
        assert_png(run / "pictures" / f"{case}_overlay.png")
    assert sorted(p.name for p in (run / "preds_val").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in val_cases]
    # The printed score is the Dice of the files on disk (mean over cases per class, then over classes), in
    # percent with two decimals.
    assert printed_mean_dice(stdout) == pytest.approx(100 * float(np.mean(np.mean(dice, axis=0))), abs=1e-2)
    saved = json.loads((run / "preds_val" / "evaluation.json").read_text())
    assert saved["n_cases"] == len(val_cases)

    test_images = sorted((task / "imagesTs").glob("*.nii.gz"))
    assert len(test_images) == int(TINY["TEST_CASES"])
    for image in test_images:
        assert_source_geometry(run / "preds_test" / image.name, image, 3)
    assert_png(run / "pictures" / "curves.png")


@pytest.mark.slow
def test_custom_dataset(tmp_path):
    stdout = run_example("custom_dataset.py", tmp_path)
    dataset = tmp_path / "raw" / "MyOrganCT"
    plan = json.loads((tmp_path / "results" / "MyOrganCT_3d" / "plan.json").read_text())
    assert plan["task"] == "MyOrganCT" and plan["normalization"] == "CT" and plan["in_channels"] == 1

    meta = json.loads((dataset / "dataset.json").read_text())
    images = [dataset / e["image"] for e in meta["training"]]
    labels = [dataset / e["label"] for e in meta["training"]]
    headers = [nib.load(str(p)).header for p in images]
    spacings = np.array([[float(z) for z in h.get_zooms()[:3][::-1]] for h in headers])  # (Z, Y, X)
    shapes = np.array([h.get_data_shape()[:3][::-1] for h in headers])

    # Target spacing: per-axis median; anisotropic (≥ 3) → the coarsest axis (Z) at its 10th percentile.
    median = np.median(spacings, axis=0)
    assert median.max() / median.min() >= 3 and np.argmax(median) == 0
    expected = median.copy()
    expected[0] = np.percentile(spacings[:, 0], 10)
    assert expected[0] < median[0]  # the rule changes something here
    np.testing.assert_allclose(plan["spacing"], expected, rtol=1e-6)
    assert Plan.from_dict(plan).anisotropic is True

    # Topology of docs/reference.md §1 for patch 12×48×48 at 2.7×0.8×0.8 mm (worked by hand): Z is too coarse
    # for a 3-kernel and a stride at first; strides stop when Z < 8 voxels and Y, X < 8.
    assert plan["topology"]["kernels"] == [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert plan["topology"]["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]]
    # Patch: the median resampled shape rounded down to the total downsampling per axis (under 128³).
    resampled = np.floor(spacings / expected * shapes).astype(int)
    median_shape = np.median(resampled, axis=0)
    factor = np.prod(np.array(plan["topology"]["strides"]), axis=0)
    assert plan["patch_size"] == [int(m) // f * f for m, f in zip(median_shape, factor, strict=True)]
    assert f"patch_size: {json.dumps(plan['patch_size'])}" in stdout

    # CT statistics: 0.5/99.5 percentiles, mean and std of every foreground voxel of the raw images.
    fg = []
    for image, label in zip(images, labels, strict=True):
        voxels = np.asarray(nib.load(str(image)).dataobj, np.float64)
        fg.append(voxels[np.asarray(nib.load(str(label)).dataobj) > 0])
    fg = np.concatenate(fg)
    np.testing.assert_allclose(plan["ct_stats"], [*np.percentile(fg, [0.5, 99.5]), fg.mean(), fg.std()],
                               rtol=1e-5)

    run = tmp_path / "results" / "MyOrganCT_3d_fold0"
    assert_trained(run, int(TINY["EPOCHS"]))
    _, val_cases = split_cases(plan["cases"]["training"], 0)
    for case in val_cases:
        name = f"{case}.nii.gz"
        assert_source_geometry(run / "preds_val" / name, dataset / "imagesTr" / name, 3)
    printed_mean_dice(stdout)
    for entry in meta["test"]:
        image = dataset / entry
        pred = assert_source_geometry(run / "preds_test" / image.name, image, 3)
        assert pred.shape[2] < pred.shape[0]  # thick slices kept: the source has fewer slices than rows
        assert_png(run / "pictures" / f"{image.name[: -len('.nii.gz')]}_overlay.png")

"""evaluate.py: docs/reference.md §4 Dice, HD95 / NSD in mm with the label's spacing, file matching and
outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax import scoring

ROOT = Path(__file__).resolve().parents[1]


def _nii(path: Path, data: np.ndarray, pixdim=(1.0, 1.0, 1.0)) -> None:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*pixdim, 1.0])), path)


def _case_a() -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) label / prediction with hand-countable overlaps (see test_dice_by_hand)."""
    lab = np.zeros((6, 4, 3), np.uint8)
    lab[0:3, 0:2, 0] = 1  # 6 voxels of class 1
    pred = np.zeros_like(lab)
    pred[0:2, 0:2, 0] = 1  # TP = 4, FN = 2
    pred[5, 0:2, 2] = 1  # FP = 2
    pred[5, 3, 2] = 3  # class 3 predicted, absent from the label
    return pred, lab


def _case_b() -> tuple[np.ndarray, np.ndarray]:
    lab = np.zeros((5, 5, 2), np.uint8)
    lab[1:3, 1:3, :] = 1
    lab[4, 4, 1] = 2
    return lab.copy(), lab


@pytest.fixture()
def folders(tmp_path):
    preds, lbls = tmp_path / "preds", tmp_path / "lbls"
    preds.mkdir()
    lbls.mkdir()
    for name, (p, lab) in {"a": _case_a(), "b": _case_b()}.items():
        _nii(preds / f"{name}.nii.gz", p)
        _nii(lbls / f"{name}.nii.gz", lab)
    _nii(lbls / "missing.nii.gz", np.zeros((3, 3, 3)))
    _nii(preds / "extra.nii.gz", np.zeros((3, 3, 3)))
    _nii(lbls / "badshape.nii.gz", np.zeros((3, 3, 3)))
    _nii(preds / "badshape.nii.gz", np.zeros((3, 3, 4)))
    _nii(lbls / "corrupt.nii.gz", np.zeros((3, 3, 3)))
    (preds / "corrupt.nii.gz").write_bytes(b"not a nifti file")
    (preds / "notes.txt").write_text("ignored")
    return preds, lbls


def test_dice_by_hand(folders):
    report = scoring.evaluate_folders(*folders)
    assert report.n_class == 4  # 1 + the largest value seen (3, predicted in case a)
    # case a: class 1 2TP / (2TP + FP + FN) = 8 / 12; class 2 absent from both → 1; class 3 only predicted → 0
    np.testing.assert_allclose(report.cases["a"]["dice"], [8 / 12, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(report.cases["b"]["dice"], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(report.mean()["dice"], [(8 / 12 + 1) / 2, 1.0, 0.5], atol=1e-6)
    assert report.summary()["dice"] == pytest.approx(((8 / 12 + 1) / 2 + 1.0 + 0.5) / 3)
    # problems by name, not crashes
    assert report.missing == ["missing"] and report.extra == ["extra"]
    assert set(report.errors) == {"badshape", "corrupt"}
    assert "(3, 3, 3)" in report.errors["badshape"] or "(4, 3, 3)" in report.errors["badshape"]
    assert "corrupt" in report.errors["corrupt"]


def test_surface_metrics_use_the_label_spacing(tmp_path):
    """One voxel each, 3 voxels apart along NIfTI X with pixdim X = 0.5 mm → 1.5 mm (Z would give 6)."""
    preds, lbls = tmp_path / "p", tmp_path / "l"
    preds.mkdir()
    lbls.mkdir()
    p, lab = np.zeros((6, 4, 4), np.uint8), np.zeros((6, 4, 4), np.uint8)
    p[0, 1, 1], lab[3, 1, 1] = 1, 1
    # lines 2 voxels apart along Y (1 mm): every distance is 2 mm
    p[0:4, 0, 3], lab[0:4, 2, 3] = 2, 2
    _nii(preds / "c.nii.gz", p, (0.5, 1.0, 2.0))
    _nii(lbls / "c.nii.gz", lab, (0.5, 1.0, 2.0))
    r = scoring.evaluate_folders(preds, lbls, hd95=True, nsd=True, nsd_tolerance=1.0)
    np.testing.assert_allclose(r.cases["c"]["hd95"], [1.5, 2.0])
    np.testing.assert_allclose(r.cases["c"]["nsd"], [0.0, 0.0])
    r = scoring.evaluate_folders(preds, lbls, hd95=True, nsd=True, nsd_tolerance=1.75)
    np.testing.assert_allclose(r.cases["c"]["nsd"], [1.0, 0.0])
    np.testing.assert_allclose(r.cases["c"]["dice"], [0.0, 0.0])


def test_hd95_percentile_by_hand():
    """Label: a row of 21 voxels; prediction: the same row with its last voxel moved 10 voxels away.

    Thin rows are all surface. Prediction → label: 20 zeros and one 10; label → prediction: 20 zeros and one
    1. With 21 sorted values the 95th percentile sits at index 0.95 · 20 = 19, a zero on both sides: HD95 = 0
    where the plain Hausdorff distance would be 10.
    """
    lab = np.zeros((1, 1, 40), np.int32)
    lab[0, 0, :21] = 1
    pred = lab.copy()
    pred[0, 0, 20] = 0
    pred[0, 0, 30] = 1
    scores = scoring.score_case(pred, lab, 2, (1.0, 1.0, 1.0), ("dice", "hd95", "nsd"), 0.5)
    assert scores["hd95"] == [0.0]
    assert scores["nsd"] == pytest.approx([40 / 42])  # all but the moved voxel and label voxel 20
    assert scores["dice"] == pytest.approx([40 / 42])


def test_npy_predictions_and_preprocessed_labels(tmp_path):
    """(C, Z, Y, X) float probabilities are argmaxed; <case>_y.npy labels (1, Z, Y, X) match <case>."""
    preds, lbls = tmp_path / "p", tmp_path / "l"
    preds.mkdir()
    lbls.mkdir()
    lab = np.zeros((1, 3, 4, 5), np.uint8)
    lab[0, 1, 1:3, 1:4] = 1
    probs = np.zeros((2, 3, 4, 5), np.float32)
    probs[0] = 0.9
    probs[1, 1, 1:3, 1:3] = 0.95  # 4 of the 6 label voxels
    np.save(preds / "k.npy", probs)
    np.save(lbls / "k_y.npy", lab)
    np.save(lbls / "k_x.npy", np.zeros((1, 3, 4, 5), np.float32))  # images are no labels
    r = scoring.evaluate_folders(preds, lbls, n_class=2)
    assert list(r.cases) == ["k"] and not r.missing and not r.extra
    assert r.cases["k"]["dice"] == pytest.approx([8 / 10])


def test_outputs_json_csv_and_cli(folders, tmp_path):
    preds, lbls = folders
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    evaluate = [sys.executable, str(ROOT / "evaluate.py")]
    proc = subprocess.run([*evaluate, "--preds", str(preds), "--lbls", str(lbls),
                           "--hd95", "--nsd", "--out_json", str(out_json), "--out_csv", str(out_csv)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = ((8 / 12 + 1) / 2 + 1.0 + 0.5) / 3
    assert f"mean dice: {want:.4f}" in proc.stdout
    assert "missing predictions (1): missing" in proc.stdout and "extra predictions (1): extra" in proc.stdout
    assert "skipped corrupt" in proc.stdout and "skipped badshape" in proc.stdout
    doc = json.loads(out_json.read_text())
    assert doc["mean"]["mean dice"] == pytest.approx(want)
    assert doc["missing_predictions"] == ["missing"] and set(doc["errors"]) == {"badshape", "corrupt"}
    assert doc["cases"]["a"]["hd95"][2] is None  # class 3 only predicted: inf → null in JSON
    rows = list(csv.reader(out_csv.open()))
    assert rows[0][:4] == ["case", "dice_1", "dice_2", "dice_3"] and len(rows[0]) == 10
    assert [r[0] for r in rows[1:]] == ["a", "b", "mean"]
    assert float(rows[1][1]) == pytest.approx(8 / 12)
    # nothing to score: non-zero exit
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([*evaluate, "--preds", str(empty), "--lbls", str(lbls)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and "missing predictions (5)" in proc.stdout


def test_case_names():
    assert scoring.case_of("x/BRATS_001.nii.gz") == "BRATS_001"
    assert scoring.case_of("BRATS_001_y.npy") == "BRATS_001"
    assert scoring.case_of("BRATS_001_pred.npy") == "BRATS_001"
    assert scoring.case_of("BRATS_001_x.npy") is None
    assert scoring.case_of("BRATS_001_meta.npy") is None
    assert scoring.case_of("evaluation.json") is None


# ------------------------------------------------------------------------------------ BraTS regions


def _brats_case_a() -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) prediction (predict.py's region labels WT 2, TC 1, ET 3) and raw BraTS label (ET = 4).

    Label: oedema 2 at [0:4, 0], necrosis 1 at [0:2, 1], ET 4 at [0:2, 2]: WT 8, TC 4, ET 2 voxels.
    Prediction: 3 of the 4 oedema voxels, the necrosis called ET (3), the ET called necrosis (1), 1 stray WT.
    WT: 8 predicted, TP 7 → 14/16; TC: 4 predicted, TP 4 → 1; ET: 2 predicted, TP 0 → 0.
    """
    lab = np.zeros((6, 4, 3), np.uint8)
    lab[0:4, 0, 0], lab[0:2, 1, 0], lab[0:2, 2, 0] = 2, 1, 4
    pred = np.zeros_like(lab)
    pred[0:3, 0, 0], pred[0:2, 1, 0], pred[0:2, 2, 0], pred[5, 3, 2] = 2, 3, 1, 2
    return pred, lab


def _brats_case_b() -> tuple[np.ndarray, np.ndarray]:
    """Oedema only in the label; the prediction adds one ET voxel: WT 2·2/(2+3), TC 0 and ET 0 (label empty,
    prediction not)."""
    lab = np.zeros((4, 4, 2), np.uint8)
    lab[1:3, 1, 0] = 2
    pred = lab.copy()
    pred[3, 3, 1] = 3
    return pred, lab


def test_brats_region_dice_of_label_maps_by_hand(tmp_path):
    preds, lbls = tmp_path / "p", tmp_path / "l"
    preds.mkdir()
    lbls.mkdir()
    for name, (p, lab) in {"a": _brats_case_a(), "b": _brats_case_b()}.items():
        _nii(preds / f"{name}.nii.gz", p)
        _nii(lbls / f"{name}.nii.gz", lab)
    _nii(preds / "c.nii.gz", np.full((2, 2, 2), 5))  # 5 is no BraTS label
    _nii(lbls / "c.nii.gz", np.zeros((2, 2, 2)))
    r = scoring.evaluate_folders(preds, lbls, brats=True, hd95=True)
    assert r.columns == ["WT", "TC", "ET"]
    np.testing.assert_allclose(r.cases["a"]["dice"], [14 / 16, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(r.cases["b"]["dice"], [4 / 5, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(r.mean()["dice"], [(14 / 16 + 4 / 5) / 2, 0.5, 0.0], atol=1e-6)
    assert len(r.cases["a"]["hd95"]) == 3 and r.cases["a"]["hd95"][1] == 0.0  # TC masks are identical
    assert "c" in r.errors and "not a BraTS label" in r.errors["c"]
    # both empty scores 1: a case without any tumour, predicted without any
    _nii(preds / "d.nii.gz", np.zeros((3, 3, 3)))
    _nii(lbls / "d.nii.gz", np.zeros((3, 3, 3)))
    assert scoring.evaluate_folders(preds, lbls, brats=True).cases["d"]["dice"] == [1.0, 1.0, 1.0]

    # the CLI: region columns in the table, the CSV and the JSON
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--preds", str(preds), "--lbls",
                           str(lbls), "--brats", "--out_json", str(out_json), "--out_csv", str(out_csv)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dice_WT" in proc.stdout.splitlines()[0]
    want = ((14 / 16 + 4 / 5 + 1) / 3 + (1 + 0 + 1) / 3 + (0 + 0 + 1) / 3) / 3
    assert f"mean dice: {want:.4f}" in proc.stdout
    assert next(csv.reader(out_csv.open())) == ["case", "dice_WT", "dice_TC", "dice_ET"]
    assert json.loads(out_json.read_text())["classes"] == ["WT", "TC", "ET"]


def test_brats_region_sigmoids_npy(tmp_path):
    """Float (3, Z, Y, X) region sigmoids against a preprocessed label with ET = 4."""
    preds, lbls = tmp_path / "p", tmp_path / "l"
    preds.mkdir()
    lbls.mkdir()
    lab = np.zeros((1, 2, 3, 4), np.uint8)
    lab[0, 0, 0, 0:3] = 2
    lab[0, 0, 1, 0:2] = 4  # WT 5, TC 2, ET 2
    sig = np.zeros((3, 2, 3, 4), np.float32)
    sig[0, 0, 0:2, 0:2] = 0.9  # WT: 4 voxels, all in the label's WT
    sig[1:, 0, 1, 0] = 0.8  # TC and ET: 1 of the 2 ET voxels
    np.save(preds / "k.npy", sig)
    np.save(lbls / "k_y.npy", lab)
    r = scoring.evaluate_folders(preds, lbls, brats=True)
    np.testing.assert_allclose(r.cases["k"]["dice"], [8 / 9, 2 / 3, 2 / 3], atol=1e-6)

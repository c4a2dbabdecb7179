"""evaluate.py: docs/reference.md §4 Dice (in percent, as training logs it), HD95 / NSD with the label's
spacing, file matching, exit codes, class names and outputs."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax import atomic, scoring

ROOT = Path(__file__).resolve().parents[1]


def _nii(path: Path, data: np.ndarray, pixdim=(1.0, 1.0, 1.0)) -> None:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*pixdim, 1.0])), path)


def evaluate(*args: str | Path) -> subprocess.CompletedProcess:
    """``python evaluate.py ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


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


def _good(tmp_path: Path) -> tuple[Path, Path]:
    """Cases a and b, both predicted: nothing to complain about."""
    preds, lbls = tmp_path / "preds", tmp_path / "lbls"
    preds.mkdir(parents=True)
    lbls.mkdir()
    for name, (p, lab) in {"a": _case_a(), "b": _case_b()}.items():
        _nii(preds / f"{name}.nii.gz", p)
        _nii(lbls / f"{name}.nii.gz", lab)
    return preds, lbls


@pytest.fixture()
def folders(tmp_path):
    """a, b scorable; one label without prediction, one prediction without label, one of the wrong shape, one
    unreadable."""
    preds, lbls = _good(tmp_path)
    _nii(lbls / "missing.nii.gz", np.zeros((3, 3, 3)))
    _nii(preds / "extra.nii.gz", np.zeros((3, 3, 3)))
    _nii(lbls / "badshape.nii.gz", np.zeros((3, 3, 3)))
    _nii(preds / "badshape.nii.gz", np.zeros((3, 3, 4)))
    _nii(lbls / "corrupt.nii.gz", np.zeros((3, 3, 3)))
    (preds / "corrupt.nii.gz").write_bytes(b"not a nifti file")
    (preds / "notes.txt").write_text("ignored")
    return preds, lbls


MEAN_A_B = ((8 / 12 + 1) / 2 + 1.0 + 0.5) / 3  # mean over classes of the per-class means, 0-1


def test_dice_by_hand(folders):
    report = scoring.evaluate_folders(*folders)
    assert report.n_class == 4  # 1 + the largest value seen (3, predicted in case a)
    # case a: class 1 2TP / (2TP + FP + FN) = 8 / 12; class 2 absent from both → 1; class 3 only predicted
    # → 0; in percent, training's scale
    np.testing.assert_allclose(report.cases["a"]["dice"], [800 / 12, 100.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(report.cases["b"]["dice"], [100.0, 100.0, 100.0])
    np.testing.assert_allclose(report.mean()["dice"], [(800 / 12 + 100) / 2, 100.0, 50.0], atol=1e-4)
    assert report.summary()["dice"] == pytest.approx(100 * MEAN_A_B)
    # problems by name, not crashes
    assert report.missing == ["missing"] and report.extra == ["extra"]
    assert set(report.errors) == {"badshape", "corrupt"}
    assert report.errors["badshape"] == "shape (4, 3, 3) != label (3, 3, 3) (Z, Y, X)"
    assert report.errors["corrupt"].startswith("unreadable prediction: ")
    assert "corrupt.nii.gz" in report.errors["corrupt"]
    assert list(report.not_scored()) == ["badshape", "corrupt", "missing"]
    assert report.not_scored()["missing"] == "no prediction"


def test_temp_and_hidden_files_are_ignored(tmp_path):
    """A write killed mid-way leaves ``.<name>.nnunet-tmp.<random><suffix>``: never a case, nor a dot file."""
    preds, lbls = _good(tmp_path)
    temps = [preds / ".a.nii.gz.nnunet-tmp.k3j_x9.nii.gz", preds / ".c_pred.npy.nnunet-tmp.q1w2.npy",
             lbls / ".d.nii.gz.nnunet-tmp.zz.nii.gz"]
    assert all(atomic.is_temp(t) for t in temps)
    for t in temps:
        t.write_bytes(b"half a file")
    _nii(preds / ".hidden.nii.gz", np.zeros((3, 3, 3)))
    np.save(lbls / ".e_y.npy", np.zeros((1, 3, 3, 3), np.uint8))
    assert set(scoring.index_folder(preds)[0]) == set(scoring.index_folder(lbls)[0]) == {"a", "b"}
    report = scoring.evaluate_folders(preds, lbls)
    assert sorted(report.cases) == ["a", "b"]
    assert not report.extra and not report.missing and not report.errors


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
    np.testing.assert_allclose(r.cases["c"]["hd95"], [1.5, 2.0])  # mm
    np.testing.assert_allclose(r.cases["c"]["nsd"], [0.0, 0.0])
    r = scoring.evaluate_folders(preds, lbls, hd95=True, nsd=True, nsd_tolerance=1.75)
    np.testing.assert_allclose(r.cases["c"]["nsd"], [100.0, 0.0])  # percent
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
    assert scores["nsd"] == pytest.approx([100 * 40 / 42])  # all but the moved voxel and label voxel 20
    assert scores["dice"] == pytest.approx([100 * 40 / 42])


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
    assert r.cases["k"]["dice"] == pytest.approx([80.0])


def test_outputs_in_percent_json_csv_and_cli(folders, tmp_path):
    """Dice and NSD in percent, HD95 in mm, each header saying so; unscored cases listed, exit 0 only with
    --allow_missing."""
    preds, lbls = folders
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    proc = evaluate("--preds", preds, "--lbls", lbls, "--hd95", "--nsd", "--allow_missing",
                    "--out_json", out_json, "--out_csv", out_csv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head = proc.stdout.splitlines()[0].split("  ")
    assert {"dice_1 (%)", "dice_3 (%)", "hd95_1 (mm)", "nsd_2 (%)"} <= {h.strip() for h in head}
    assert f"mean dice (%): {100 * MEAN_A_B:.2f}" in proc.stdout
    assert "mean hd95 (mm): " in proc.stdout and "mean nsd (%): " in proc.stdout
    assert "not scored (3): badshape (shape (4, 3, 3) != label (3, 3, 3) (Z, Y, X)), corrupt (unreadable " \
        "prediction: " in proc.stdout and proc.stdout.count("missing (no prediction)") == 1
    assert "warning: 3 cases not scored: badshape (shape" in proc.stderr
    assert "warning: 1 prediction without a label, not scored: extra" in proc.stderr
    doc = json.loads(out_json.read_text())
    assert doc["classes"] == ["1", "2", "3"]
    assert doc["mean"]["mean dice (%)"] == pytest.approx(100 * MEAN_A_B)
    assert doc["per_class"]["dice (%)"] == pytest.approx({"1": (800 / 12 + 100) / 2, "2": 100.0, "3": 50.0})
    assert doc["cases"]["a"]["dice (%)"]["1"] == pytest.approx(800 / 12)
    assert doc["cases"]["a"]["hd95 (mm)"]["3"] is None  # class 3 only predicted: inf → null in JSON
    assert doc["missing_predictions"] == ["missing"] and set(doc["errors"]) == {"badshape", "corrupt"}
    assert list(doc["not_scored"]) == ["badshape", "corrupt", "missing"]
    rows = list(csv.reader(out_csv.open()))
    assert rows[0][:4] == ["case", "dice_1 (%)", "dice_2 (%)", "dice_3 (%)"] and len(rows[0]) == 10
    assert rows[0][4] == "hd95_1 (mm)" and rows[0][7] == "nsd_1 (%)"
    # the unscored cases have a row too, with empty cells: a CSV reader sees them, the means do not
    assert [r[0] for r in rows[1:]] == ["a", "b", "badshape", "corrupt", "missing", "mean"]
    assert float(rows[1][1]) == pytest.approx(800 / 12) and rows[3][1:] == [""] * 9
    assert float(rows[-1][1]) == pytest.approx((800 / 12 + 100) / 2)


def test_exit_codes(folders, tmp_path):
    """Anything expected and not scored → exit 1 naming it; extra predictions only warn; bad folders → 2."""
    preds, lbls = folders
    proc = evaluate("--preds", preds, "--lbls", lbls)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: 3 cases not scored: badshape \(shape \(4, 3, 3\) != label \(3, 3, 3\) "
                        r"\(Z, Y, X\)\), corrupt \(unreadable prediction: .*\), missing \(no prediction\)",
                        last), last
    # a truncated .npy prediction alone is enough
    good_p, good_l = _good(tmp_path / "g")
    proc = evaluate("--preds", good_p, "--lbls", good_l)
    assert proc.returncode == 0 and "error" not in proc.stderr and "warning" not in proc.stderr, proc.stderr
    np.save(good_l / "t_y.npy", np.zeros((1, 3, 3, 3), np.uint8))
    (good_p / "t.npy").write_bytes(np.lib.format.magic(1, 0) + b"\x00\x10{'descr'")
    proc = evaluate("--preds", good_p, "--lbls", good_l, "--spacing", "1,1,1")
    assert proc.returncode == 1 and "error: 1 case not scored: t (unreadable prediction: " in proc.stderr
    (good_p / "t.npy").unlink()
    (good_l / "t_y.npy").unlink()
    # extra predictions: a warning, exit 0
    _nii(good_p / "x.nii.gz", np.zeros((3, 3, 3)))
    proc = evaluate("--preds", good_p, "--lbls", good_l)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: 1 prediction without a label, not scored: x" in proc.stderr
    assert "error" not in proc.stderr
    # a bad folder: exit 2, one line
    proc = evaluate("--preds", tmp_path / "nowhere", "--lbls", lbls)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "nowhere" in proc.stderr
    # nothing to score: exit 1, even with --allow_missing
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = evaluate("--preds", empty, "--lbls", lbls, "--allow_missing")
    assert proc.returncode == 1 and "not scored (5)" in proc.stdout and "no case scored" in proc.stderr


def test_case_names():
    assert scoring.case_of("x/BRATS_001.nii.gz") == "BRATS_001"
    assert scoring.case_of("BRATS_001_y.npy") == "BRATS_001"
    assert scoring.case_of("BRATS_001_pred.npy") == "BRATS_001"
    assert scoring.case_of("BRATS_001_x.npy") is None
    assert scoring.case_of("BRATS_001_meta.npy") is None
    assert scoring.case_of("evaluation.json") is None


def _dataset_json(task: Path, labels: dict[str, str]) -> None:
    task.mkdir(parents=True, exist_ok=True)
    (task / "dataset.json").write_text(json.dumps({
        "name": "T", "modality": {"0": "MRI"}, "labels": labels,
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}], "test": []}))


def test_class_names_from_dataset_json_beside_the_labels(tmp_path):
    """``--lbls TaskXX/labelsTr`` → TaskXX/dataset.json names the columns; a class it lacks keeps its
    number."""
    task = tmp_path / "Task09_Toy"
    preds, _ = _good(task)
    (task / "lbls").rename(task / "labelsTr")
    lbls = task / "labelsTr"
    _dataset_json(task, {"0": "background", "1": "edema", "2": "core"})
    report = scoring.evaluate_folders(preds, lbls)
    assert report.columns == ["edema", "core", "3"]  # class 3 (predicted in case a) is not in dataset.json
    assert scoring.evaluate_folders(preds, lbls, class_names={}).columns == ["1", "2", "3"]
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    proc = evaluate("--preds", preds, "--lbls", lbls, "--hd95", "--out_json", out_json, "--out_csv", out_csv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head = [h.strip() for h in proc.stdout.splitlines()[0].split("  ") if h.strip()]
    assert head == ["case", "dice_edema (%)", "dice_core (%)", "dice_3 (%)", "hd95_edema (mm)",
                    "hd95_core (mm)", "hd95_3 (mm)"]
    doc = json.loads(out_json.read_text())
    assert doc["classes"] == ["edema", "core", "3"] and list(doc["per_class"]["dice (%)"]) == doc["classes"]
    assert doc["cases"]["b"]["dice (%)"] == {"edema": 100.0, "core": 100.0, "3": 100.0}
    assert next(csv.reader(out_csv.open()))[:3] == ["case", "dice_edema (%)", "dice_core (%)"]
    # an unreadable dataset.json: numbers, and a note saying why
    (task / "dataset.json").write_text("{broken")
    report = scoring.evaluate_folders(preds, lbls)
    assert report.columns == ["1", "2", "3"] and any("dataset.json" in n for n in report.notes)


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
    # the dataset's class names do not rename the regions
    _dataset_json(tmp_path, {"0": "background", "1": "edema", "2": "non-enhancing", "3": "enhancing"})
    for name, (p, lab) in {"a": _brats_case_a(), "b": _brats_case_b()}.items():
        _nii(preds / f"{name}.nii.gz", p)
        _nii(lbls / f"{name}.nii.gz", lab)
    _nii(preds / "c.nii.gz", np.full((2, 2, 2), 5))  # 5 is no BraTS label
    _nii(lbls / "c.nii.gz", np.zeros((2, 2, 2)))
    r = scoring.evaluate_folders(preds, lbls, brats=True, hd95=True)
    assert r.columns == ["WT", "TC", "ET"]
    np.testing.assert_allclose(r.cases["a"]["dice"], [1400 / 16, 100.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(r.cases["b"]["dice"], [80.0, 0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(r.mean()["dice"], [(1400 / 16 + 80) / 2, 50.0, 0.0], atol=1e-4)
    assert len(r.cases["a"]["hd95"]) == 3 and r.cases["a"]["hd95"][1] == 0.0  # TC masks are identical
    assert "c" in r.errors and "not a BraTS label" in r.errors["c"]
    # both empty scores 100: a case without any tumour, predicted without any
    _nii(preds / "d.nii.gz", np.zeros((3, 3, 3)))
    _nii(lbls / "d.nii.gz", np.zeros((3, 3, 3)))
    assert scoring.evaluate_folders(preds, lbls, brats=True).cases["d"]["dice"] == [100.0, 100.0, 100.0]
    (preds / "c.nii.gz").unlink()
    (lbls / "c.nii.gz").unlink()

    # the CLI: region columns in the table, the CSV and the JSON
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    proc = evaluate("--preds", preds, "--lbls", lbls, "--brats", "--out_json", out_json, "--out_csv", out_csv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dice_WT (%)" in proc.stdout.splitlines()[0]
    want = ((14 / 16 + 4 / 5 + 1) / 3 + (1 + 0 + 1) / 3 + (0 + 0 + 1) / 3) / 3
    assert f"mean dice (%): {100 * want:.2f}" in proc.stdout
    assert next(csv.reader(out_csv.open())) == ["case", "dice_WT (%)", "dice_TC (%)", "dice_ET (%)"]
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
    np.testing.assert_allclose(r.cases["k"]["dice"], [800 / 9, 200 / 3, 200 / 3], atol=1e-4)

"""evaluate.py --fold: exactly training's validation split (PreprocessedDataset.fold over the plan's training
cases), only those cases expected, the plan's class names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax import scoring
from nnunet_jax.data.dataset import PreprocessedDataset

ROOT = Path(__file__).resolve().parents[1]
TRAINING = [f"case_{i:03d}" for i in range(10)]
LABELLED = TRAINING + ["case_010", "case_011"]  # labelsTr holds two cases the plan does not train on


def evaluate(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def _label(i: int) -> np.ndarray:
    lab = np.zeros((4, 4, 3), np.uint8)
    lab[: 1 + i % 3, :2, 0] = 1
    lab[3, 3, :] = 2
    return lab


@pytest.fixture()
def task(tmp_path):
    """A preprocessed folder (plan.json listing TRAINING, in no particular order), labelsTr NIfTI of LABELLED,
    and predictions (copies of the labels) of exactly fold 0's validation cases."""
    pre, lbls, preds = tmp_path / "00_3d", tmp_path / "Task00_Toy" / "labelsTr", tmp_path / "preds"
    for d in (pre, lbls, preds):
        d.mkdir(parents=True)
    plan = {"task": "00", "dim": 3, "patch_size": [4, 4, 4], "n_class": 3, "in_channels": 1,
            "labels": {"0": "background", "1": "left", "2": "right"},
            "cases": {"training": TRAINING[::-1], "test": []}}
    (pre / "plan.json").write_text(json.dumps(plan))
    for i, case in enumerate(LABELLED):
        lab = _label(i)
        nib.save(nib.Nifti1Image(lab, np.eye(4)), lbls / f"{case}.nii.gz")
        if case in TRAINING:
            np.save(pre / f"{case}_x.npy", np.zeros((1, *lab.shape[::-1]), np.float32))
            np.save(pre / f"{case}_y.npy", lab.transpose(2, 1, 0)[None])
    val = PreprocessedDataset.open(pre).fold(0, 5)[1]  # what training/loop.py's open_data validates on
    assert len(val) == 2 and set(val) <= set(TRAINING)
    for case in val:
        (preds / f"{case}.nii.gz").write_bytes((lbls / f"{case}.nii.gz").read_bytes())
    return pre, lbls, preds, val


def test_fold_scores_exactly_the_validation_cases(task, tmp_path):
    pre, lbls, preds, val = task
    for source in (["--data", pre], ["--plan", pre / "plan.json"]):
        out = tmp_path / "r.json"
        proc = evaluate("--preds", preds, "--lbls", lbls, "--fold", "0", *source, "--out_json", out)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "not scored" not in proc.stdout and "error" not in proc.stderr and "warning" not in proc.stderr
        doc = json.loads(out.read_text())
        assert sorted(doc["cases"]) == val and doc["missing_predictions"] == [] and doc["not_scored"] == {}
        assert doc["classes"] == ["left", "right"]  # the plan's names
        assert doc["mean"]["mean dice (%)"] == pytest.approx(100.0)
    # without --fold every labelled case is expected: the other 10 are missing
    proc = evaluate("--preds", preds, "--lbls", lbls)
    assert proc.returncode == 1 and "error: 10 cases not scored: " in proc.stderr
    # one validation prediction gone: exit 1 naming it (and only it)
    (preds / f"{val[1]}.nii.gz").unlink()
    proc = evaluate("--preds", preds, "--lbls", lbls, "--fold", "0", "--data", pre)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: 1 case not scored: {val[1]} (no prediction)"
    proc = evaluate("--preds", preds, "--lbls", lbls, "--fold", "0", "--data", pre, "--allow_missing")
    assert proc.returncode == 0 and f"warning: 1 case not scored: {val[1]} (no prediction)" in proc.stderr


def test_fold_needs_the_plan(task):
    pre, lbls, preds, _ = task
    proc = evaluate("--preds", preds, "--lbls", lbls, "--fold", "0")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--data" in proc.stderr and "--plan" in proc.stderr
    proc = evaluate("--preds", preds, "--lbls", lbls, "--fold", "5", "--data", pre)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "fold 5 " in proc.stderr and "0..4" in proc.stderr


def test_fold_cases_library(task):
    """The library call the CLI makes: training's split for --data, the plan's list for --plan, any nfolds."""
    pre, lbls, preds, val = task
    assert scoring.fold_cases(0, data=pre) == val == scoring.fold_cases(0, plan=pre / "plan.json")
    assert scoring.fold_cases(1, 2, data=pre) == PreprocessedDataset.open(pre).fold(1, 2)[1]
    old = json.loads((pre / "plan.json").read_text())
    del old["cases"]  # an older plan: training splits the labelled cases on disk, which only --data has
    (pre / "plan.json").write_text(json.dumps(old))
    assert scoring.fold_cases(0, data=pre) == val
    with pytest.raises(ValueError, match="--data"):
        scoring.fold_cases(0, plan=pre / "plan.json")
    report = scoring.evaluate_folders(preds, lbls, cases=val)
    assert sorted(report.cases) == val and not report.missing and not report.extra

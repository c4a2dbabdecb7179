"""find_best_configuration.py: configurations named on the command line, their cross-validation Dice and
their ensembles', the winner, its post-processing and its commands; clear errors on bad inputs. Fold
prediction folders are built directly here (tests/pp_cases.py data, two folds); the whole train → predict →
decide → predict --postprocess flow on the synthetic task is tests/test_best_configuration_e2e.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax import model_selection as ms
from nnunet_jax import postprocessing as pp
from nnunet_jax.labels import LabelSpec
from nnunet_jax.scoring import load_segmentation
from tests import pp_cases as pc
from tests.test_postprocessing import _fake_run

ROOT = Path(__file__).resolve().parents[1]
FOLDS = {0: pc.cases()[:3], 1: pc.cases()[3:]}


def _write_config(root: Path, name: str, preds: Path, shift: int) -> str:
    """Configuration ``name``: fold folders of masks (``preds`` rolled by ``shift``) and probabilities whose
    argmax they are (confidence varying by voxel, so an ensemble differs from both); returns its
    ``--config`` value."""
    rng = np.random.default_rng(shift)
    for k, cases in FOLDS.items():
        _fake_run(root / name / f"fold{k}")
        out = root / name / f"preds{k}"
        out.mkdir(parents=True)
        for case in cases:
            img = nib.load(preds / f"{case}.nii.gz")
            seg = np.roll(np.asarray(img.dataobj), shift, axis=0)
            nib.save(nib.Nifti1Image(seg, img.affine), out / f"{case}.nii.gz")
            zyx = seg.transpose(2, 1, 0)
            confidence = rng.uniform(0.1, 1.0, zyx.shape).astype(np.float32)
            probs = 0.1 + confidence * np.eye(3, dtype=np.float32)[zyx].transpose(3, 0, 1, 2)
            np.save(out / f"{case}.npy", probs)
    return f"{name}={root / name}/preds{{fold}}:{root / name}/fold{{fold}}"


@pytest.fixture
def two_configs(tmp_path):
    preds, labels = pc.write(tmp_path / "data", "classes")
    return tmp_path, labels, [_write_config(tmp_path, "a", preds, 0), _write_config(tmp_path, "b", preds, 1)]


def test_scores_ensembles_and_winner(two_configs):
    root, labels, texts = two_configs
    configs = [ms.parse_configuration(t, [0, 1]) for t in texts]
    sel = ms.Selection(configs, labels, LabelSpec(3))
    assert sel.cases == pc.cases()
    cands = sel.candidates()
    assert [c.name for c in cands] == ["a", "b", "a+b"]
    # the single configuration's score is the decision's "before" of its masks
    single = pp.score_cases(pc.cases(), pc.loader(root / "data" / "preds", labels), [], [1, 2])
    assert cands[0].dice == pytest.approx(single.mean, abs=1e-12)
    # the ensemble: argmax of the mean of the two configurations' probabilities, scored the same way
    def ensemble(case):
        k = 0 if case in FOLDS[0] else 1
        mean = np.mean([np.load(root / n / f"preds{k}" / f"{case}.npy") for n in "ab"], axis=0)
        return mean.argmax(0), load_segmentation(labels / f"{case}.nii.gz").labels

    assert cands[2].dice == pytest.approx(pp.score_cases(pc.cases(), ensemble, [], [1, 2]).mean, abs=1e-12)
    assert len({c.dice for c in cands}) == 3
    assert ms.best_of(cands) is max(cands, key=lambda c: c.dice)
    tie = [ms.Candidate("x", (), pp.Scores([0.5])), ms.Candidate("y", (), pp.Scores([0.5]))]
    assert ms.best_of(tie).name == "x"  # a tie goes to the first (the simpler)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "find_best_configuration.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_reports_writes_the_decision_and_the_commands(two_configs):
    root, labels, texts = two_configs
    proc = _cli("--lbls", str(labels), "--folds", "0,1", "--config", texts[0], "--config", texts[1])
    assert proc.returncode == 0, proc.stderr
    report = json.loads((root / "best_configuration.json").read_text())
    assert set(report["dice (%)"]) == {"a", "b", "a+b"}
    best = report["best"]
    assert best == max(report["dice (%)"], key=report["dice (%)"].get)
    decision = pp.load(report["postprocessing"])
    assert f"best: {best}" in proc.stdout and report["commands"][0] in proc.stdout
    if "+" in best:  # an ensemble: predict each with probabilities, then ensemble with the decision
        assert decision.path.parent == root and len(report["commands"]) == 3
        assert "--ensemble OUTPUT_FOLDER_a,OUTPUT_FOLDER_b" in report["commands"][-1]
    else:  # beside the winner's runs, for exactly those runs: predict.py applies it by itself
        assert decision.path == root / best / pp.FILE_NAME
        assert pp.find_for_runs([root / best / "fold0", root / best / "fold1"]).path == decision.path
        assert f"--postprocess {decision.path}" in report["commands"][0]


def test_cli_ensemble_mode_applies_the_decision(two_configs, tmp_path):
    root, labels, _ = two_configs
    steps = [(1,)]
    decision = tmp_path / "pp.json"
    decision.write_text(json.dumps({"format": pp.FORMAT, "steps": [{"keep_largest_component": [1]}]}))
    proc = _cli("--ensemble", f"{root}/a/preds0,{root}/b/preds0", "--ckpt_path", str(root / "a" / "fold0"),
                "--results", str(tmp_path / "out"), "--postprocess", str(decision))
    assert proc.returncode == 0, proc.stderr
    for case in FOLDS[0]:
        mean = np.mean([np.load(root / n / "preds0" / f"{case}.npy") for n in "ab"], axis=0)
        got = load_segmentation(tmp_path / "out" / f"{case}.nii.gz")
        np.testing.assert_array_equal(got.labels, pp.apply(mean.argmax(0).astype(np.uint8), steps))
        assert np.allclose(got.affine, nib.load(root / "a" / "preds0" / f"{case}.nii.gz").affine)


@pytest.mark.parametrize(("breakage", "message"), [
    ("no_fold", "no prediction folder .*b/preds1"),
    ("no_label", "case_0.nii.gz: no label for case case_0"),
    ("no_npy", "case_4.npy is missing: ensembles need the probabilities"),
    ("duplicate", "case case_0 is in two folds"),
    ("syntax", "expected NAME=PREDICTIONS:RUNS"),
    ("no_run", "fold1 does not exist"),
])
def test_cli_bad_inputs_are_one_clear_error(two_configs, breakage, message):
    import re
    import shutil

    root, labels, texts = two_configs
    if breakage == "no_fold":
        shutil.rmtree(root / "b" / "preds1")
    elif breakage == "no_label":
        (labels / "case_0.nii.gz").unlink()
    elif breakage == "no_npy":
        (root / "b" / "preds1" / "case_4.npy").unlink()
    elif breakage == "duplicate":
        shutil.copy(root / "a" / "preds0" / "case_0.nii.gz", root / "a" / "preds1")
    elif breakage == "syntax":
        texts[1] = "b=/somewhere"
    elif breakage == "no_run":
        shutil.rmtree(root / "b" / "fold1")
    proc = _cli("--lbls", str(labels), "--folds", "0,1", "--config", texts[0], "--config", texts[1])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("find_best_configuration: ") and re.search(message, last), proc.stderr

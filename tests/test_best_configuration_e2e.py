"""Train → predict → decide → predict --postprocess on the synthetic task, as a user runs it: two tiny
configurations (the same small 3D U-Net with different seeds and learning rates), 2 folds of 8 cases, 3
epochs each; find_best_configuration.py over their fold predictions; then the commands it prints, run on the
test images, against the same prediction without post-processing. Also: with the decision file in place,
the cross-validation command (one fold's run) still writes what it wrote before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunet_jax import postprocessing as pp
from nnunet_jax.scoring import load_segmentation

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"lr1e-2": ["--learning_rate", "1e-2"], "lr3e-3": ["--learning_rate", "3e-3", "--seed", "2"]}
TINY = ["--task", "00", "--dim", "3", "--nfolds", "2", "--filters", "4,8,16,32", "--min_epochs", "3",
        "--max_epochs", "3", "--noprogress"]


def _py(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: load_segmentation(p).labels for p in sorted(folder.glob("*.nii.gz"))}


@pytest.mark.slow
def test_train_predict_decide_predict_postprocessed(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "results"
    prep = str(data / "00_3d")
    _py("-m", "preprocess.synthetic", "--out", str(data), "--cases", "8", "--test_cases", "2")
    for mode in ("training", "val"):
        _py("-m", "preprocess", "--task", "00", "--dim", "3", "--data", str(data), "--results", str(data),
            "--exec_mode", mode, "--n_jobs", "1")
    for name, extra in CONFIGS.items():
        for k in (0, 1):
            run, fold = runs / name / f"fold{k}", str(k)
            _py("train.py", *TINY, *extra, "--fold", fold, "--data", prep, "--results", str(run))
            _py("predict.py", "--data", str(data / "00_3d" / "val"), "--fold", fold, "--ckpt_path", str(run),
                "--results", str(runs / name / f"preds{k}"), "--save_preds")
    pattern = "{n}={runs}/{n}/preds{{fold}}:{runs}/{n}/fold{{fold}}"
    configs = [a for n in CONFIGS for a in ("--config", pattern.format(n=n, runs=runs))]
    out = _py("find_best_configuration.py", "--lbls", str(data / "Task00_Synthetic" / "labelsTr"),
              "--folds", "0,1", *configs)
    print(out)  # the report's example output (pytest -s)
    report = json.loads((runs / "best_configuration.json").read_text())
    assert set(report["dice (%)"]) == {*CONFIGS, "+".join(CONFIGS)} and report["n_cases"] == 8
    decision = pp.load(report["postprocessing"])
    assert decision.runs  # decided for the winner's runs

    # the printed commands on the test images, against the winner's plain prediction
    images, final = data / "Task00_Synthetic" / "imagesTs", tmp_path / "final"
    for line in report["commands"]:
        line = line.replace("INPUT_FOLDER", str(images)).replace("OUTPUT_FOLDER", str(final))
        assert line.startswith("python ")
        _py(*line.split()[1:])
    best = report["best"].split("+")
    plain = tmp_path / "plain"
    if len(best) == 1:
        ckpts = f"{runs}/{best[0]}/fold0,{runs}/{best[0]}/fold1"
        _py("predict.py", "--data", str(images), "--ckpt_path", ckpts, "--results", str(plain),
            "--postprocess", "none")
        auto = tmp_path / "auto"  # the decision beside the runs applies by itself to exactly those runs
        assert "post-processing" in _py("predict.py", "--data", str(images), "--ckpt_path", ckpts,
                                        "--results", str(auto))
        assert {k: v.tolist() for k, v in _masks(auto).items()} == {k: v.tolist() for k, v in
                                                                      _masks(final).items()}
    else:
        _py("find_best_configuration.py", "--ensemble", f"{final}_{best[0]},{final}_{best[1]}", "--ckpt_path",
            f"{runs}/{best[0]}/fold0", "--results", str(plain))
    got, raw = _masks(final), _masks(plain)
    assert len(got) == 2 and got.keys() == raw.keys()
    for case, labels in raw.items():
        np.testing.assert_array_equal(got[case], pp.apply(labels, decision.steps), err_msg=case)

    # the cross-validation command of one fold is unchanged by the decision file beside its run
    name = best[0]
    again = tmp_path / "again"
    _py("predict.py", "--data", str(data / "00_3d" / "val"), "--fold", "0", "--ckpt_path",
        f"{runs}/{name}/fold0", "--results", str(again))
    before = _masks(runs / name / "preds0")
    assert {k: v.tolist() for k, v in _masks(again).items()} == {k: v.tolist() for k, v in before.items()}

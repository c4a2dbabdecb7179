"""``--preset resenc_m`` end to end on the synthetic task: train.py plans the patch and batch, trains the
residual-encoder U-Net through the real loader, checkpoints; predict.py restores it from the run's
config.json and checkpoint and segments a raw test image. Tiny: 4 cases, widths 4-16, 2 steps, 1 device."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax.plan import Plan
from nnunet_jax.planning.presets import PRESETS, plan_preset
from tests.test_training_utils import ROOT


@pytest.mark.slow
def test_resenc_m_trains_checkpoints_and_predicts(tmp_path):
    from nnunet_jax.datasets.synthetic import generate
    from nnunet_jax.preprocessing.driver import preprocess_dataset

    raw = generate(tmp_path / "data", cases=4, test_cases=1, seed=3)
    pre = preprocess_dataset(tmp_path / "data", "00", 3, tmp_path / "pre", progress=False)
    plan = Plan.load(pre)
    planned = plan_preset(plan, PRESETS["resenc_m"])
    filters = ",".join(str(min(4 * 2**i, 16)) for i in range(planned.topology.depth))
    run = tmp_path / "run"
    train = [sys.executable, "train.py", "--data", str(pre), "--results", str(run), "--preset", "resenc_m",
             "--gpus", "1", "--nfolds", "2", "--max_epochs", "1", "--min_epochs", "1", "--train_batches", "2",
             "--val_cases", "1", "--filters", filters, "--deep_supervision", "--deep_supr_num", "1",
             "--num_workers", "1", "--noprogress"]
    proc = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    settings = json.loads((run / "config.json").read_text())
    assert settings["config"]["preset"] == "resenc_m" and settings["identity"]["preset"] == "resenc_m"
    assert settings["config"]["batch_size"] == planned.batch_size == settings["global_batch"]
    run_plan = Plan.from_dict(settings["plan"])
    assert (run_plan.patch_size, run_plan.topology) == (planned.patch_size, planned.topology)
    assert "resenc_m" in run_plan.source["preset"]
    logs = [json.loads(line) for line in (run / "logs.json").read_text().splitlines()]
    assert len(logs) == 1 and np.isfinite(logs[0]["train_loss"])

    image = sorted((raw / "imagesTs").glob("*.nii.gz"))[0]
    predict = [sys.executable, "predict.py", "--data", str(image), "--results", str(tmp_path / "out"),
               "--ckpt_path", str(run)]
    proc = subprocess.run(predict, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = nib.load(str(tmp_path / "out" / image.name))
    assert out.shape == nib.load(str(image)).shape[:3]
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}

    # the preprocessed plan.json (the seed's topology) given explicitly: the preset's is planned again
    proc = subprocess.run([*predict[:5], str(tmp_path / "out_plan"), *predict[6:], "--plan",
                           str(pre / "plan.json")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = np.asarray(nib.load(str(tmp_path / "out_plan" / image.name)).dataobj)
    np.testing.assert_array_equal(again, np.asarray(out.dataobj))

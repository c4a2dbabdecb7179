"""BraTS region mode end to end: 3 sigmoid outputs (WT, TC, ET), region loss, per-region validation Dice
named in logs.json, checkpoints that refuse non-region runs, and a predictor that knows from the run's
settings that it has a region model (labels WT 2, TC 1, ET 3).

The dataset is written directly in the preprocessed layout: 5 cases (1, 20, 20, 20) of nested spheres —
oedema 2 around necrosis 1 around enhancing tumour 3 (one case without 3, so the empty-region rule runs) — on
a 4-class plan with a 16³ patch and a 3-level topology.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunet_jax import parallel
from nnunet_jax.training import loop, validation
from tests.test_training_utils import ROOT, tiny_config

SHAPE = (20, 20, 20)
TOPOLOGY = {"kernels": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "filters": [4, 8, 16]}


def tumour(rng: np.random.Generator, with_et: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image (*SHAPE) float32, label (*SHAPE) uint8): nested spheres 2 ⊃ 1 ⊃ 3, intensity by label."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)
    dist = np.linalg.norm(grid - rng.uniform(8, 12, 3), axis=-1)
    label = np.zeros(SHAPE, np.uint8)
    label[dist < rng.uniform(5, 7)] = 2
    label[dist < 3.5] = 1
    if with_et:
        label[dist < 2.0] = 3
    image = rng.normal(0.0, 0.5, SHAPE) + np.array([0.0, 2.0, 1.0, 3.0])[label]
    return image.astype(np.float32), label


def write_brats_dataset(root: Path, n_cases: int = 5, seed: int = 0) -> dict:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"case_{i}" for i in range(n_cases)]
    for i, name in enumerate(names):
        image, label = tumour(rng, with_et=i != 1)
        np.save(root / f"{name}_x.npy", image[None])
        np.save(root / f"{name}_y.npy", label[None])
    plan = {"task": "00", "task_name": "Task00_TinyBraTS", "dim": 3, "patch_size": [16, 16, 16],
            "spacing": [1.0, 1.0, 1.0], "n_class": 4, "in_channels": 1, "normalization": "MRI",
            "labels": {"0": "background", "1": "necrosis", "2": "oedema", "3": "enhancing"},
            "modalities": {"0": "MRI"}, "ct_stats": None, "topology": TOPOLOGY, "anisotropic": False,
            "cases": {"training": names, "test": []}}
    (root / "plan.json").write_text(json.dumps(plan))
    return plan


def brats_config(results: Path, data: Path, **overrides):
    settings = dict(data=str(data), brats=True, gpus=1, batch_size=2, num_workers=1, filters=(4, 8, 16),
                    learning_rate=1e-2)
    return tiny_config(results, **{**settings, **overrides})


# ----------------------------------------------------------------------------------- validation, by hand


def _region_logits_from_label(variables, x):
    """A fake net whose input holds the label: WT, TC exact; ET exact, or everywhere with variables["et"]."""
    import jax.numpy as jnp

    from nnunet_jax.labels import brats_regions

    regions = brats_regions(jnp.round(x[..., 0]).astype(jnp.int32))
    regions = regions.at[..., 2].set(jnp.maximum(regions[..., 2], variables["et"]))
    return 20.0 * regions - 10.0


def test_validation_region_dice_by_hand():
    from nnunet_jax.labels import LabelSpec
    from nnunet_jax.losses import make_loss

    rng = np.random.default_rng(3)
    cases = {"a": tumour(rng)[1], "b": tumour(rng, with_et=False)[1]}  # "b" has no ET
    load = lambda name: (cases[name][..., None].astype(np.float32), cases[name].astype(np.int32))  # noqa: E731
    mesh = parallel.local_mesh(1)
    validator = validation.Validator(_region_logits_from_label, LabelSpec(4, brats=True), (16, 16, 16),
                                     make_loss(brats=True), mesh)
    run = lambda et: validator({"et": np.float32(et)}, ["a", "b"], load)  # noqa: E731
    perfect = run(0.0)
    assert perfect["dice"] == pytest.approx([100.0, 100.0, 100.0])  # "b": ET empty in both → 100
    assert perfect["mean_dice"] == pytest.approx(100.0)
    # ET predicted everywhere: case a scores 2|ET| / (|ET| + N), case b (no ET in the label) scores 0
    n_et, n = int((cases["a"] == 3).sum()), cases["a"].size
    everywhere = run(1.0)
    want_et = 100.0 * (2 * n_et / (n_et + n) + 0.0) / 2
    assert everywhere["dice"] == pytest.approx([100.0, 100.0, want_et], abs=1e-3)
    assert everywhere["mean_dice"] == pytest.approx((200.0 + want_et) / 3, abs=1e-3)
    assert everywhere["val_loss"] > perfect["val_loss"]


def test_brats_needs_brats_labels(tmp_path):
    data = tmp_path / "00_3d"
    plan = write_brats_dataset(data)
    (data / "plan.json").write_text(json.dumps({**plan, "n_class": 3}))
    with pytest.raises(loop.TrainingError, match="--brats needs BraTS labels .* n_class 3"):
        loop.train_and_evaluate(brats_config(tmp_path / "r", data))


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_brats_train_log_evaluate_predict(tmp_path):
    data, results = tmp_path / "00_3d", tmp_path / "results"
    write_brats_dataset(data)
    loop.train_and_evaluate(brats_config(results, data, max_epochs=2))
    logs = [json.loads(line) for line in (results / "logs.json").read_text().splitlines()]
    assert [r["epoch"] for r in logs] == [1, 2]
    for r in logs:
        assert len(r["dice"]) == 3 and all(0.0 <= d <= 100.0 for d in r["dice"])
        assert [r["dice_WT"], r["dice_TC"], r["dice_ET"]] == r["dice"]
        assert r["mean_dice"] == pytest.approx(np.mean(r["dice"]))
    settings = json.loads((results / "config.json").read_text())
    assert settings["config"]["brats"] is True and settings["identity"]["brats"] is True

    # the checkpoint refuses a per-class run (resumed or evaluated) in the same place
    with pytest.raises(loop.TrainingError, match="brats"):
        loop.train_and_evaluate(brats_config(results, data, brats=False, resume_training=True))
    with pytest.raises(loop.TrainingError, match="brats"):
        loop.train_and_evaluate(brats_config(results, data, brats=False, exec_mode="evaluate"))

    # train.py --exec_mode evaluate --brats (a bool flag made from the config) reproduces the logged Dice
    best = max(logs, key=lambda r: r["mean_dice"])
    cmd = [sys.executable, str(ROOT / "train.py"), "--exec_mode", "evaluate", "--brats", "--data", str(data),
           "--results", str(results), "--task", "00", "--gpus", "1", "--filters", "4,8,16", "--nvol", "1",
           "--noprogress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((results / "evaluation.json").read_text())
    assert ev["epoch"] == best["epoch"]
    assert ev["dice"] == pytest.approx(best["dice"], abs=1e-3)
    assert [ev["dice_WT"], ev["dice_TC"], ev["dice_ET"]] == ev["dice"]

    # the predictor reads "region model" from the run's settings: no brats option needed
    from nnunet_jax.inference.predictor import Predictor, predict_inputs

    predictor = Predictor.from_checkpoints(results)
    assert predictor.brats and predictor.output_kind == "regions"
    probs = predictor.predict_preprocessed(np.load(data / "case_0_x.npy"))  # region sigmoids
    assert probs.shape == (3, *SHAPE) and probs.min() >= 0.0 and probs.max() <= 1.0
    written = predict_inputs(predictor, [data], tmp_path / "preds", save_nifti=False, cases=["case_0"],
                             log=lambda _: None)
    pred = np.load(written[0])
    assert pred.shape == SHAPE and set(np.unique(pred)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(pred == 3, probs[2] > 0.5)  # ET = 3, painted last
    np.testing.assert_array_equal(pred > 0, (probs > 0.5).any(0))  # any region → a tumour label
    with pytest.raises(ValueError, match="is a BraTS region model"):
        Predictor.from_checkpoints(results, brats=False)

"""2D training end to end on a tiny preprocessed dataset: the DALI slice-block loader (``nvol`` blocks of
``batch_size // nvol`` slices), slice-by-slice validation of whole volumes, ``exec_mode evaluate`` reproducing
the logged Dice, and the predictor on the 2D run's checkpoint.

The dataset is written directly in the preprocessed layout (docs/CONTRACTS.md): 5 cases (1, Z, 20, 20) of a
bright disc per slice (label 1) in noise; a 2D plan with a 16² patch and a 3-level topology.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_jax.training import loop
from tests.test_training_utils import tiny_config

PATCH_2D = (16, 16)
TOPOLOGY_2D = {"kernels": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]], "filters": [4, 8, 16]}
SHAPE = (5, 20, 20)  # (Z, Y, X) of every case


def write_2d_dataset(root: Path, n_cases: int = 5, seed: int = 0) -> dict:
    """Preprocessed 2D dataset: ``<case>_x.npy`` (1, Z, Y, X) float32, ``<case>_y.npy`` (1, Z, Y, X) uint8."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    names = [f"case_{i}" for i in range(n_cases)]
    for name in names:
        label = np.zeros(SHAPE, np.uint8)
        for z in range(SHAPE[0]):
            cy, cx, r = rng.uniform(6, 14), rng.uniform(6, 14), rng.uniform(2.5, 4.5)
            label[z] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image = rng.normal(0.0, 1.0, SHAPE) + 2.5 * label
        np.save(root / f"{name}_x.npy", image[None].astype(np.float32))
        np.save(root / f"{name}_y.npy", label[None])
    plan = {"task": "00", "task_name": "Task00_Tiny2D", "dim": 2, "patch_size": list(PATCH_2D),
            "spacing": [1.0, 1.0], "labels": {"0": "background", "1": "disc"}, "n_class": 2,
            "modalities": {"0": "MRI"}, "in_channels": 1, "normalization": "MRI", "ct_stats": None,
            "topology": TOPOLOGY_2D, "anisotropic": False, "cases": {"training": names, "test": []}}
    (root / "plan.json").write_text(json.dumps(plan))
    return plan


def config_2d(results: Path, data: Path, **overrides):
    """One device, global batch 4 = 2 volumes (nvol) × 2 contiguous slices."""
    settings = dict(data=str(data), dim=2, gpus=1, batch_size=4, nvol=2, num_workers=1, filters=(4, 8, 16),
                    learning_rate=1e-2)
    return tiny_config(results, **{**settings, **overrides})


@pytest.mark.slow
def test_2d_train_validate_evaluate_predict(tmp_path):
    data, results = tmp_path / "00_2d", tmp_path / "results"
    write_2d_dataset(data)
    summary = loop.train_and_evaluate(config_2d(results, data, max_epochs=2))
    logs = [json.loads(line) for line in (results / "logs.json").read_text().splitlines()]
    assert [r["epoch"] for r in logs] == [1, 2]
    # 4 training cases, nvol 2 volumes per step: 2 steps per epoch of 4 slices each
    assert [r["step"] for r in logs] == [2, 4]
    for r in logs:
        assert len(r["dice"]) == 1 and 0.0 <= r["mean_dice"] <= 100.0 and np.isfinite(r["val_loss"])
        assert r["mean_dice"] == pytest.approx(r["dice"][0])
    settings = json.loads((results / "config.json").read_text())
    assert settings["identity"]["dim"] == 2 and settings["identity"]["kernels"] == [[3, 3]] * 3
    assert settings["global_batch"] == 4 and settings["steps_per_epoch"] == 2
    assert summary["TOP_mean"] == pytest.approx(max(r["mean_dice"] for r in logs))

    # exec_mode evaluate: the best checkpoint, validated again slice by slice, gives the logged Dice
    best = max(logs, key=lambda r: r["mean_dice"])
    ev = loop.train_and_evaluate(config_2d(results, data, exec_mode="evaluate"))
    assert ev["epoch"] == best["epoch"] and ev["cases"] == 1
    assert ev["mean_dice"] == pytest.approx(best["mean_dice"], abs=1e-3)
    assert ev["val_loss"] == pytest.approx(best["val_loss"], rel=1e-4)

    # the predictor runs the 2D plan slice by slice: one label per voxel of the (Z, Y, X) volume, and its
    # labels of the validation case give exactly the Dice the run logged for it
    from nnunet_jax.inference.predictor import Predictor, predict_inputs
    from nnunet_jax.metrics import dice_per_class

    predictor = Predictor.from_checkpoints(results / "checkpoints" / "best")
    assert predictor.dim == 2 and not predictor.brats
    config = config_2d(results, data)
    val_case = loop.open_data(config, loop._training_mesh(config)).val_cases
    written = predict_inputs(predictor, [data], tmp_path / "preds", save_nifti=False, cases=val_case,
                             log=lambda _: None)
    assert [p.name for p in written] == [f"{val_case[0]}_pred.npy"]
    pred = np.load(written[0])
    label = np.load(data / f"{val_case[0]}_y.npy")[0]
    assert pred.shape == SHAPE and set(np.unique(pred)) <= {0, 1}
    assert 100 * float(dice_per_class(pred, label, 2)[0]) == pytest.approx(best["mean_dice"], abs=1e-3)


def test_2d_batch_must_split_into_nvol_blocks(tmp_path):
    data = tmp_path / "00_2d"
    write_2d_dataset(data)
    with pytest.raises(loop.TrainingError, match="global batch of 4 slices .* not a multiple of nvol 3"):
        loop.train_and_evaluate(config_2d(tmp_path / "r", data, nvol=3, max_epochs=1))

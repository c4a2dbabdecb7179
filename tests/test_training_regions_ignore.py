"""Region-based training and the ignore label end to end on the synthetic task (tiny net, CPU).

The synthetic task's cases (nnunet_jax.datasets.synthetic: oedema 1 around core 2, two MRI channels) are
resized to 20³ and written in the preprocessed layout with a 16³ patch and a 3-level topology, as an nnU-Net
v2 dataset would record them: regions {lesion: 1, 2; core: 2} with regions_class_order (1, 2), or the classes
with the training cases' labels 90 % ignored (fully labelled validation case).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from nnunet_jax import scoring
from nnunet_jax.data.dataset import PreprocessedDataset
from nnunet_jax.datasets.sparse import sparsify
from nnunet_jax.datasets.synthetic import LABELS, make_case
from nnunet_jax.training import loop
from tests.test_training_utils import tiny_config

SIZE = 20
TOPOLOGY = {"kernels": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "filters": [4, 8, 16]}
REGIONS = {"regions": {"lesion": [1, 2], "core": [2]}, "regions_class_order": [1, 2]}


def write_synthetic(root: Path, n_cases: int = 5, **plan_extra) -> list[str]:
    """The first ``n_cases`` synthetic cases at 20³ (z-scored in the head) with their plan."""
    root.mkdir(parents=True)
    names = [f"synth_{i:03d}" for i in range(n_cases)]
    for i, name in enumerate(names):
        image, label, _ = make_case(0, i)  # (X, Y, Z, 2), (X, Y, Z)
        zoom = [SIZE / s for s in label.shape]
        label = ndimage.zoom(label, zoom, order=0).transpose(2, 1, 0)
        channels = [ndimage.zoom(image[..., c], zoom, order=1).transpose(2, 1, 0) for c in range(2)]
        head = channels[0] > 0
        x = np.stack([np.where(head, (c - c[head].mean()) / c[head].std(), 0.0) for c in channels])
        np.save(root / f"{name}_x.npy", x.astype(np.float32))
        np.save(root / f"{name}_y.npy", label[None].astype(np.uint8))
    plan = {"task": "00", "task_name": "Task00_Synthetic", "dim": 3, "patch_size": [16, 16, 16],
            "spacing": [1.0, 1.0, 1.0], "n_class": 3, "in_channels": 2, "normalization": "MRI",
            "labels": LABELS, "modalities": {"0": "T1", "1": "T2"}, "topology": TOPOLOGY,
            "cases": {"training": names, "test": []}, **plan_extra}
    (root / "plan.json").write_text(json.dumps(plan))
    return names


def _config(results: Path, data: Path, **overrides):
    settings = dict(data=str(data), gpus=1, batch_size=2, num_workers=1, filters=(4, 8, 16),
                    learning_rate=1e-2, max_epochs=2, train_batches=2)
    return tiny_config(results, **{**settings, **overrides})


def _logs(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "logs.json").read_text().splitlines()]


@pytest.mark.slow
def test_regions_train_validate_predict_evaluate(tmp_path):
    data, results = tmp_path / "00_3d", tmp_path / "results"
    write_synthetic(data, **REGIONS)
    loop.train_and_evaluate(_config(results, data))
    logs = _logs(results)
    for r in logs:
        assert len(r["dice"]) == 2 and [r["dice_lesion"], r["dice_core"]] == r["dice"]
        assert np.isfinite(r["train_loss"]) and r["mean_dice"] == pytest.approx(np.mean(r["dice"]))
    settings = json.loads((results / "config.json").read_text())
    assert settings["identity"]["regions"] == ["lesion", "core"] and not settings["identity"]["brats"]

    from nnunet_jax.inference.predictor import Predictor, predict_inputs

    predictor = Predictor.from_checkpoints(results)
    assert predictor.output_kind == "regions" and predictor.labels.regions_class_order == (1, 2)
    _, val = PreprocessedDataset.open(data).fold(0, 5)
    probs = predictor.predict_preprocessed(np.load(data / f"{val[0]}_x.npy"))
    assert probs.shape == (2, SIZE, SIZE, SIZE) and 0.0 <= probs.min() and probs.max() <= 1.0
    preds = tmp_path / "preds"
    predict_inputs(predictor, [data], preds, save_nifti=False, cases=val, log=lambda _: None)
    pred = np.load(preds / f"{val[0]}_pred.npy")
    np.testing.assert_array_equal(pred == 2, probs[1] > 0.5)  # core painted last
    np.testing.assert_array_equal(pred == 1, (probs[0] > 0.5) & (probs[1] <= 0.5))

    # evaluate's region Dice of the written label maps is the validation's Dice of the same model
    report = scoring.evaluate_folders(preds, data, regions=REGIONS["regions"], cases=val)
    assert report.columns == ["lesion", "core"]
    best = max(logs, key=lambda r: r["mean_dice"])
    np.testing.assert_allclose(report.mean()["dice"], best["dice"], atol=0.5)


@pytest.mark.slow
def test_ignore_label_train_and_validate_on_full_labels(tmp_path):
    data, results = tmp_path / "00_3d", tmp_path / "results"
    write_synthetic(data)
    train, val = PreprocessedDataset.open(data).fold(0, 5)
    full = np.load(data / f"{val[0]}_y.npy")
    plan = sparsify(data, train, 0.9)
    assert plan.ignore_label == 3 and np.array_equal(np.load(data / f"{val[0]}_y.npy"), full)
    loop.train_and_evaluate(_config(results, data))
    logs = _logs(results)
    assert len(logs) == 2
    for r in logs:
        assert len(r["dice"]) == 2 and all(0.0 <= d <= 100.0 for d in r["dice"])
        assert np.isfinite(r["val_loss"]) and np.isfinite(r["train_loss"])
    from nnunet_jax.inference.predictor import Predictor

    predictor = Predictor.from_checkpoints(results)
    assert predictor.labels.ignore_label == 3 and predictor.labels.n_outputs == 3  # no output for "ignore"
    pred = predictor.predict(np.load(data / f"{val[0]}_x.npy"), preprocessed=True).labels
    assert set(np.unique(pred)) <= {0, 1, 2}

"""The embedded synthetic task: MSD layout, determinism per seed, per-case variety, learnable contrasts."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from nnunet_jax.datasets.synthetic import generate
from nnunet_jax.io import load_case
from nnunet_jax.planning.dataset_json import load_dataset


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), cases=8, test_cases=2, seed=0)


def _arrays(root):
    ds = load_dataset(root)
    return [load_case(c.image, c.label, labels=ds.label_values, n_channels=ds.in_channels)
            for c in ds.training]


def test_msd_layout(task):
    meta = json.loads((task / "dataset.json").read_text())
    assert task.name == "Task00_Synthetic"
    assert meta["labels"] == {"0": "background", "1": "oedema", "2": "core"}
    assert len(meta["modality"]) == 2 and "CT" not in meta["modality"].values()
    assert meta["numTraining"] == 8 and len(meta["training"]) == 8 and len(meta["test"]) == 2
    ds = load_dataset(task)  # every listed file exists and is NIfTI
    assert [c.name for c in ds.test] == ["synth_008", "synth_009"]
    assert sorted(p.name for p in task.parent.iterdir()) == ["Task00_Synthetic"]  # no temp folder left
    test = load_case(ds.test[0].image)
    assert test.image.shape[0] == 2 and test.label is None


def test_variety_and_learnable_contrast(task):
    cases = _arrays(task)
    shapes = {c.image.shape[1:] for c in cases}
    spacings = {c.spacing for c in cases}
    extents = np.array([np.array(c.image.shape[1:]) * c.spacing for c in cases])  # mm
    assert len(shapes) >= 6 and extents.min() >= 27 and extents.max() <= 45
    assert any(sp[0] == pytest.approx(1.5) for sp in spacings) and (1.0, 1.0, 1.0) in spacings
    for c in cases:
        image, label = c.image, c.label[0]
        assert set(np.unique(label)) == {0, 1, 2}
        head = image[0] > 0
        assert np.array_equal(head, image[1] > 0)
        assert 0.15 < head.mean() < 0.6  # zero background around a head: cropping removes something
        assert not head[0].any() and not head[-1].any()
        assert not head[label > 0].size or head[label > 0].all()
        tissue = (label == 0) & head
        ratio = image[1] / np.where(head, image[0], 1)  # T2 / T1 cancels scale and bias field
        assert np.median(ratio[label == 1]) > 1.5 * np.median(ratio[tissue])  # oedema: bright T2, dark T1
        assert np.median(ratio[label == 2]) < np.median(ratio[label == 1]) / 1.3  # core differs from oedema
        assert np.median(image[0][label == 2]) > 1.2 * np.median(image[0][tissue])  # core bright on T1
    scales = [np.median(c.image[0][c.label[0] == 0][c.image[0][c.label[0] == 0] > 0]) for c in cases]
    assert max(scales) / min(scales) > 1.5  # intensity scale varies between cases


def test_deterministic_per_seed(task, tmp_path):
    again = generate(tmp_path / "a", cases=3, test_cases=0, seed=0)
    other = generate(tmp_path / "b", cases=3, test_cases=0, seed=1)
    first, second, third = _arrays(task)[:3], _arrays(again), _arrays(other)
    for a, b, c in zip(first, second, third, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert a.spacing == b.spacing
        assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_cli_and_speed(tmp_path):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "preprocess.synthetic", "--out", str(tmp_path), "--cases", "12",
                    "--seed", "0"], check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, elapsed  # ~1 s here; the budget is 10 s for 12 cases
    meta = json.loads((tmp_path / "Task00_Synthetic" / "dataset.json").read_text())
    assert meta["numTraining"] == 12 and len(meta["test"]) == 3

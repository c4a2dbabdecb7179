"""plan.json: task-table plans, custom-dataset planning (spacing, CT statistics, patch size), fit check."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax.datasets.synthetic import generate
from nnunet_jax.io import DatasetError
from nnunet_jax.plan import Plan
from nnunet_jax.planning.dataset_json import find_task_dir, load_dataset
from nnunet_jax.planning.planner import (
    check_patch_fits,
    ct_statistics,
    make_plan,
    median_target_spacing,
    parallel_map,
    plan_patch_size,
    resampled_shape,
    tidy_spacing,
    unguarded_main_script,
)
from nnunet_jax.planning.topology import plan_topology


def test_median_spacing_and_coarsest_axis_rule():
    iso, aniso = median_target_spacing([[1.0, 1.0, 1.0], [1.2, 0.9, 0.9], [0.8, 1.1, 1.1]])
    assert iso == pytest.approx([1.0, 1.0, 1.0]) and not aniso
    spacings = [[2.5, 0.7, 0.7], [3.0, 0.7, 0.7], [3.5, 0.8, 0.8], [4.0, 0.6, 0.6], [5.0, 0.7, 0.7]]
    target, aniso = median_target_spacing(spacings)
    # median Z 3.5 vs 0.7 in-plane: ratio 5 ≥ 3 → the COARSEST axis (Z) goes to its 10th percentile,
    # 2.5 + 0.4 · (3.0 − 2.5) = 2.7; the finest axes keep their medians.
    assert aniso and target == pytest.approx([2.7, 0.7, 0.7])
    # The coarse axis can be any axis (here X).
    target, _ = median_target_spacing([[s[1], s[2], s[0]] for s in spacings])
    assert target == pytest.approx([0.7, 0.7, 2.7])


def test_patch_size_rule():
    # Median 37×50×45 at 1 mm: three halvings on every axis (45 → 22.5 → 11.25 → 5.6 < 8 stops), so each
    # axis is rounded down to a multiple of 8.
    assert plan_patch_size([37, 50, 45], [1.0, 1.0, 1.0], 3) == [32, 48, 40]
    big = plan_patch_size([200.5, 300, 280], [1.0, 1.0, 1.0], 3)
    strides = np.prod(np.array(plan_topology(big, [1.0, 1.0, 1.0]).strides), axis=0)
    assert math.prod(big) <= 128**3 and all(p % s == 0 for p, s in zip(big, strides, strict=True))
    assert all(p <= m for p, m in zip(big, [200, 300, 280], strict=True))
    flat = plan_patch_size([300, 600], [0.8, 0.8], 2)
    assert math.prod(flat) <= 512**2 and all(p % 32 == 0 for p in flat)  # five halvings per axis in 2D


def test_planned_patch_never_exceeds_the_largest_case():
    rng = np.random.default_rng(0)
    for _ in range(200):
        dim = int(rng.integers(2, 4))
        shapes = rng.integers(1, 400, size=(int(rng.integers(1, 6)), dim))
        spacing = rng.uniform(0.5, 4.0, size=dim)
        largest = shapes.max(axis=0)
        patch = plan_patch_size(np.median(shapes, axis=0), spacing, dim, largest=largest)
        assert all(1 <= p <= m for p, m in zip(patch, largest, strict=True)), (shapes, patch)
        check_patch_fits(patch, {str(i): s for i, s in enumerate(shapes)}, "cropped")  # never raises
    # A bound below the median (not possible from real shapes, but the bound must hold): Z 30 → 15 → 7.5
    # is halved twice, so it is rounded down to a multiple of 4: 28.
    assert plan_patch_size([64, 64, 64], [1.0, 1.0, 1.0], 3, largest=[30, 64, 64]) == [28, 64, 64]


def test_patch_larger_than_every_case():
    shapes = {"a": [36, 50, 35], "b": [42, 58, 41], "c": [30, 44, 33]}  # Hippocampus-like: some need padding
    check_patch_fits([40, 56, 40], shapes, "resampled")  # fine: case b reaches the patch on every axis
    with pytest.raises(DatasetError, match=r"patch size \[40, 64, 40\].*axis Y.*\[42, 58, 41\]"):
        check_patch_fits([40, 64, 40], shapes, "resampled")


def _ct_dataset(root, n=4, seed=0):
    """A tiny CT-like MSD dataset: air around a body at ~40 HU with a ~100 HU organ, varied spacing."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training, images, labels = [], [], []
    for i in range(n):
        shape = tuple(int(v) for v in rng.integers(12, 20, size=3))
        spacing = (0.7 + 0.05 * i, 0.7 + 0.05 * i, [2.5, 3.0, 3.5, 5.0][i % 4])  # X, Y, Z
        image = rng.normal(40, 20, size=shape).astype(np.float32)
        image[:2] = -1000
        label = np.zeros(shape, np.uint8)
        label[3:9, 4:10, 2:7] = 1
        image[label == 1] = rng.normal(100, 30, size=int((label == 1).sum()))
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"ct_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"ct_{i}.nii.gz"))
        training.append({"image": f"./imagesTr/ct_{i}.nii.gz", "label": f"./labelsTr/ct_{i}.nii.gz"})
        images.append(image)
        labels.append(label)
    meta = {"name": "TinyCT", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"},
            "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return images, labels


def test_custom_ct_dataset_plan(tmp_path):
    root = tmp_path / "TinyCT"
    images, labels = _ct_dataset(root)
    task_dir, info = find_task_dir(tmp_path / "elsewhere", str(root))
    assert task_dir == root and info is None
    plan = make_plan(load_dataset(task_dir), "TinyCT", None, 3, progress=False).to_dict()
    fg = np.concatenate([im[lb > 0] for im, lb in zip(images, labels, strict=True)]).astype(np.float64)
    expected = [np.percentile(fg, 0.5), np.percentile(fg, 99.5), fg.mean(), fg.std()]
    assert plan["normalization"] == "CT"
    np.testing.assert_allclose(plan["ct_stats"], expected, rtol=1e-5)
    # Z spacings 2.5, 3, 3.5, 5 → median 3.25 vs in-plane ~0.77: anisotropic, Z → 10th percentile 2.65.
    assert plan["spacing"][0] == pytest.approx(np.percentile([2.5, 3.0, 3.5, 5.0], 10))
    assert plan["spacing"][1:] == pytest.approx([np.median([0.7, 0.75, 0.8, 0.85])] * 2)
    assert Plan.from_dict(plan).anisotropic is True and "anisotropic" not in plan  # derived, not stored
    assert plan["topology"] == plan_topology(plan["patch_size"], plan["spacing"]).to_dict()
    assert plan["source"]["patch_size"] == "planned from the median shape"
    assert plan["n_class"] == 2 and plan["in_channels"] == 1 and plan["cases"]["training"][0] == "ct_0"


def test_ct_statistics_bounded_sample(tmp_path):
    root = tmp_path / "TinyCT"
    images, labels = _ct_dataset(root, n=3, seed=1)
    ds = load_dataset(root)
    fg = np.concatenate([im[lb > 0] for im, lb in zip(images, labels, strict=True)]).astype(np.float64)
    lo, hi, mean, std = ct_statistics(ds.training, ds.label_values, 1, max_voxels_per_case=50, progress=False)
    assert mean == pytest.approx(fg.mean(), rel=1e-9) and std == pytest.approx(fg.std(), rel=1e-9)  # exact
    assert abs(lo - np.percentile(fg, 0.5)) < 0.15 * fg.std() + 30  # sampled, still in the tail
    assert hi > np.percentile(fg, 90) and lo < np.percentile(fg, 10)


def test_msd_table_plan_and_overrides(tmp_path):
    generate(tmp_path, cases=3, test_cases=1, seed=0)
    task_dir, info = find_task_dir(tmp_path, "0")
    ds = load_dataset(task_dir)
    plan = make_plan(ds, "00", info, 3, progress=False).to_dict()
    assert plan["patch_size"] == [32, 32, 32] and plan["spacing"] == [1.0, 1.0, 1.0]
    assert plan["labels"] == {"0": "background", "1": "oedema", "2": "core"} and plan["n_class"] == 3
    assert plan["modalities"] == {"0": "T1", "1": "T2"} and plan["in_channels"] == 2
    assert plan["normalization"] == "MRI" and plan["ct_stats"] is None
    assert Plan.from_dict(plan).anisotropic is False
    assert plan["topology"]["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert plan["cases"] == {"training": ["synth_000", "synth_001", "synth_002"], "test": ["synth_003"]}
    plan2d = make_plan(ds, "00", info, 2, progress=False).to_dict()
    assert plan2d["patch_size"] == [32, 32] and plan2d["spacing"] == [1.0, 1.0]
    assert plan2d["topology"]["strides"][0] == [1, 1]
    custom = make_plan(ds, "00", info, 3, patch_size=[16, 24, 16], progress=False).to_dict()
    assert custom["patch_size"] == [16, 24, 16] and custom["source"]["patch_size"] == "--patch_size"
    with pytest.raises(DatasetError, match="3 positive values"):
        make_plan(ds, "00", info, 3, patch_size=[16, 16], progress=False)
    # The same folder as a custom dataset: spacing from the data, patch planned.
    own = make_plan(ds, "Task00_Synthetic", None, 3, progress=False).to_dict()
    assert own["spacing"] == pytest.approx([1.0, 1.0, 1.0])  # medians of (1|1.5, 1|1.2, 1|1.2)
    factor = np.prod(np.array(own["topology"]["strides"]), axis=0)
    assert all(p % f == 0 for p, f in zip(own["patch_size"], factor, strict=True))


F32 = [float(np.float32(v)) for v in (0.8, 1.6, 3.2)]  # what NIfTI pixdim holds: 0.800000011920929, ...


def ct_body_dataset(root, air: float = -1000.0):
    """Three CT-like cases whose body (> 0 HU) fills only a box of the field of view, air elsewhere.

    Case (stored X, Y, Z; here in Z, Y, X) | spacing (Z, Y, X) | body box → cropped shape:
      body_0  20×64×64 | 1.6, 0.8, 0.8 | Z 2:18,  Y 10:50, X 12:52 → 16×40×40
      body_1  20×64×64 | 1.6, 0.8, 0.8 | Z 0:20,  Y 5:49,  X 0:36  → 20×44×36
      body_2  10×64×64 | 3.2, 0.8, 0.8 | Z 1:9,   Y 8:56,  X 4:50  → 8×48×46, resampled to Z 16 → 16×48×46
    """
    rng = np.random.default_rng(5)
    cases = [((20, 64, 64), (1.6, 0.8, 0.8), (slice(2, 18), slice(10, 50), slice(12, 52))),
             ((20, 64, 64), (1.6, 0.8, 0.8), (slice(0, 20), slice(5, 49), slice(0, 36))),
             ((10, 64, 64), (3.2, 0.8, 0.8), (slice(1, 9), slice(8, 56), slice(4, 50)))]
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i, (shape, spacing, box) in enumerate(cases):
        image = (air + rng.normal(0, 10, shape)).astype(np.float32)  # air: never > 0
        image[box] = rng.uniform(20, 60, size=image[box].shape)  # soft tissue: always > 0
        label = np.zeros(shape, np.uint8)
        inner = tuple(slice(b.start + 2, b.start + 6) for b in box)
        label[inner] = 1
        image[inner] += 60
        affine = np.diag([*spacing[::-1], 1.0])  # NIfTI axes are X, Y, Z
        name = f"body_{i}.nii.gz"
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": "BodyCT", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"},
            "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_ct_patch_planned_from_cropped_shapes(tmp_path):
    ds = load_dataset(ct_body_dataset(tmp_path / "BodyCT"))
    plan = make_plan(ds, "BodyCT", None, 3, progress=False).to_dict()
    # Target spacing: medians (1.6, 0.8, 0.8), ratio 2 < 3. Cropped and resampled shapes (docstring):
    # 16×40×40, 20×44×36, 16×48×46 → median 16×44×40 (the uncropped median would be 20×64×64, and a
    # patch of 64 in-plane fits no case). Topology at 1.6×0.8×0.8 mm: strides 2,2,2 then 2,2,2 (Z 8 → 4),
    # then 1,2,2 (Z 4 < 8; Y 11, X 10 ≥ 8) → factors Z 4, Y 8, X 8 → patch 16×40×40.
    assert plan["median_shape"] == [16.0, 44.0, 40.0]
    assert plan["patch_size"] == [16, 40, 40]
    assert plan["topology"]["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert plan["spacing"] == [1.6, 0.8, 0.8]  # exactly: no float32 noise (0.800000011920929)
    assert plan["source"]["median_shape"].startswith("training cases cropped")
    fg = []  # the CT statistics come from the same pass over the images
    for entry in json.loads((ds.root / "dataset.json").read_text())["training"]:
        image = np.asarray(nib.load(str(ds.root / entry["image"])).dataobj, np.float64)
        fg.append(image[np.asarray(nib.load(str(ds.root / entry["label"])).dataobj) > 0])
    fg = np.concatenate(fg)
    np.testing.assert_allclose(plan["ct_stats"], [*np.percentile(fg, [0.5, 99.5]), fg.mean(), fg.std()],
                               rtol=1e-5)
    # one pass in 2 processes
    assert make_plan(ds, "BodyCT", None, 3, n_jobs=2, progress=False).to_dict() == plan
    # 2D: cropped (Y, X) slices 40×40, 44×36, 48×46 → median 44×40 → three halvings → 40×40.
    plan2d = make_plan(ds, "BodyCT", None, 2, progress=False).to_dict()
    assert plan2d["median_shape"] == [44.0, 40.0] and plan2d["patch_size"] == [40, 40]
    assert plan2d["spacing"] == [0.8, 0.8]
    # A given patch is checked against the cropped shapes (largest 20×48×46), not the 64×64 headers.
    with pytest.raises(DatasetError, match=r"patch size \[16, 48, 48\].*axis X: the largest cropped and "
                                           r"resampled shape per axis is \[20, 48, 46\]"):
        make_plan(ds, "BodyCT", None, 3, patch_size=[16, 48, 48], progress=False)


def test_tidy_spacing_keeps_what_gets_resampled():
    f32 = [float(np.float32(v)) for v in (0.35, 0.7)]
    # 0.8f cases onto 0.8f: rounding to 0.8 changes neither the "no resampling" nor the 1.6f case's shape.
    assert tidy_spacing([F32[0], 1.0, 1.0], np.array([[F32[0], 1, 1], [F32[1], 1, 1]]),
                        [[10, 5, 5], [10, 5, 5]]) == [0.8, 1.0, 1.0]
    # 0.7f / 0.35f is exactly 2 (10 → 20 voxels) but 0.7f / 0.35 is 1.99999997 (→ 19): keep the raw value.
    assert resampled_shape([10, 5, 5], [f32[1], 1, 1], [0.35, 1, 1]) == [19, 5, 5]
    assert tidy_spacing([f32[0], 1.0, 1.0], np.array([[f32[1], 1, 1]]), [[10, 5, 5]]) == [f32[0], 1.0, 1.0]
    # A case resampling to nothing is not tidy_spacing's to reject (2D plans never resample it).
    assert tidy_spacing([2.0, 1.0, 1.0], np.array([[0.5, 1, 1]]), [[1, 8, 8]]) == [2.0, 1.0, 1.0]


def test_unguarded_main_script_detection(tmp_path, monkeypatch):
    import sys
    import types

    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert unguarded_main_script() is None  # interactive: no file
    script = tmp_path / "run.py"
    main.__file__ = str(script)
    script.write_text("from nnunet_jax.preprocessing.driver import preprocess_dataset\n"
                      "preprocess_dataset('d', '00', 3, 'r', n_jobs=2)\n")
    assert unguarded_main_script() == script
    with pytest.raises(RuntimeError, match=r"run.py to run its work under `if __name__ == \"__main__\":`"):
        parallel_map(abs, [1, 2], 2, "test", progress=False)
    assert parallel_map(abs, [-1, -2], 1, "test", progress=False) == [1, 2]  # serial: no processes, fine
    script.write_text("def main():\n    pass\n\n\nif '__main__' == __name__:\n    main()\n")
    assert unguarded_main_script() is None


def test_dead_worker_is_a_clear_error():
    import os

    with pytest.raises(RuntimeError, match="worker process died.*out of memory.*__main__"):
        parallel_map(os._exit, [3, 3], 2, "test", progress=False)

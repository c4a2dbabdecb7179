"""Synthetic prediction / label NIfTI folders on which keeping the largest connected component helps some
targets and hurts others (used by tests/test_postprocessing.py and the nnU-Net v2 parity test).

Each case (16³): class 1 a ball, class 2 a ball touching it (their union is one component); predictions are
the labels shifted by a voxel plus stray cubes. Scenarios:

* ``classes``: stray class-1 cubes (removing them helps 1); in half the cases class 2 has a second true
  blob that the prediction finds too (removing it hurts 2, so "all foreground as one" is refused); one case
  without class 2 anywhere (its Dice is NaN, left out); one stray voxel touching class 1 only diagonally
  (full connectivity keeps it).
* ``all_fg``: stray cubes of both classes, no second true blob: all foreground as one helps.
* ``regions``: the ``classes`` data scored as regions whole = (1, 2) and core = 2.
* ``ignore``: ``classes`` with label 3 (ignore) over a slab of the references that holds stray cubes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (16, 16, 16)
N_CASES = 6
DATASET_LABELS = {
    "classes": {"background": 0, "a": 1, "b": 2},
    "all_fg": {"background": 0, "a": 1, "b": 2},
    "regions": {"background": 0, "whole": [1, 2], "core": 2},
    "ignore": {"background": 0, "a": 1, "b": 2, "ignore": 3},
}
TARGETS = {"classes": [1, 2], "all_fg": [1, 2], "regions": [(1, 2), 2], "ignore": [1, 2]}
IGNORE = {"ignore": 3}


def _ball(centre, radius) -> np.ndarray:
    grid = np.indices(SHAPE)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def _case(rng: np.random.Generator, i: int, scenario: str) -> tuple[np.ndarray, np.ndarray]:
    lab = np.zeros(SHAPE, np.uint8)
    c1 = rng.integers(6, 9, 3)
    lab[_ball(c1, 3.2)] = 1
    if i != N_CASES - 1:  # the last case has no class 2 anywhere
        lab[_ball(c1 + np.array([0, 0, 4]), 2.2)] = 2
        if scenario != "all_fg" and i % 2 == 0:  # a second true blob of class 2, far from the first
            lab[1:3, 1:3, 12:15] = 2
    pred = np.roll(lab, 1, axis=int(rng.integers(0, 3)))
    if i == 1:  # touches class 1 diagonally only: one component under full connectivity, not under 6
        top = np.argwhere(pred == 1)
        top = top[top[:, 0] == top[:, 0].max()]
        q = tuple(top[len(top) // 2] + 1)
        faces = [tuple(np.add(q, d)) for d in np.vstack([np.eye(3, dtype=int), -np.eye(3, dtype=int)])]
        assert not any(pred[f] for f in faces), "the diagonal voxel must not touch a face"
        pred[q] = 1
    for _ in range(int(rng.integers(1, 3))):  # stray class-1 cubes in a corner region
        z, y = rng.integers(12, 14, 2)
        pred[z:z + 2, y:y + 2, 1:3] = 1
    if scenario == "all_fg":
        pred[1:3, 13:15, 13:15] = 2
    if scenario == "ignore":
        lab[:, 14:, :4] = 3  # over part of the stray cubes: those voxels count nowhere
    return pred, lab


def write(root: Path, scenario: str, seed: int = 0) -> tuple[Path, Path]:
    """``root/preds`` and ``root/labels`` (``case_<i>.nii.gz``) plus ``root/dataset.json`` (v2 style)."""
    rng = np.random.default_rng(seed)
    preds, labels = root / "preds", root / "labels"
    preds.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(N_CASES):
        pred, lab = _case(rng, i, scenario)
        for array, folder in ((pred, preds), (lab, labels)):
            nib.save(nib.Nifti1Image(array, np.eye(4)), folder / f"case_{i}.nii.gz")
    dataset = {"labels": DATASET_LABELS[scenario], "file_ending": ".nii.gz", "channel_names": {"0": "x"},
               "numTraining": N_CASES}
    if scenario == "regions":
        dataset["regions_class_order"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(dataset))
    return preds, labels


def loader(preds: Path, labels: Path):
    """case → (prediction, label) arrays, as the decision reads them."""
    from nnunet_jax.scoring import load_segmentation

    return lambda case: (load_segmentation(preds / f"{case}.nii.gz").labels,
                         load_segmentation(labels / f"{case}.nii.gz").labels)


def cases() -> list[str]:
    return [f"case_{i}" for i in range(N_CASES)]

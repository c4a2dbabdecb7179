"""Dice with the docs/reference.md §4 empty-class rule vs direct counts, the tracker, HD95/NSD on hand-made
masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnunet_jax.metrics import (
    dice_from_logits,
    dice_per_class,
    hd95,
    nsd,
    region_dice,
    surface_metrics,
    surface_voxels,
)


def _numpy_dice(pred, label, n_class):
    out = []
    for c in range(1, n_class):
        p, t = pred == c, label == c
        if not t.any():
            out.append(0.0 if p.any() else 1.0)
        else:
            tp, fp, fn = np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)
            out.append(2 * tp / (2 * tp + fp + fn))
    return np.array(out)


@pytest.mark.parametrize("shape", [(17, 13), (9, 8, 7)])
def test_dice_matches_counts_with_empty_rule(shape):
    rng = np.random.default_rng(0)
    n_class = 5
    label = rng.choice([0, 1, 2], size=shape)  # 3, 4 absent from the label
    pred = rng.choice([0, 1, 2, 4], size=shape)  # 3 absent from both, 4 a false positive
    ours = np.asarray(jax.jit(dice_per_class, static_argnums=2)(pred, label, n_class))
    ref = _numpy_dice(pred, label, n_class)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert ours[2] == 1.0 and ours[3] == 0.0  # empty-class rule, both branches
    np.testing.assert_allclose(np.asarray(dice_per_class(pred, label[..., None], n_class)), ref, rtol=1e-6)


def test_dice_from_logits_is_argmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 7, 5, 3)).astype(np.float32)
    label = rng.integers(0, 3, size=(6, 7, 5))
    ref = _numpy_dice(logits.argmax(-1), label, 3)
    np.testing.assert_allclose(np.asarray(jax.jit(dice_from_logits)(logits, label)), ref, rtol=1e-6)
    perfect = 10.0 * np.eye(3)[label]
    np.testing.assert_array_equal(np.asarray(dice_from_logits(perfect, label)), [1.0, 1.0])


def test_region_dice():
    label = np.array([[0, 1, 2], [3, 3, 0]])
    logits = np.full((2, 3, 3), -5.0, np.float32)
    logits[0, 1] = [5, 5, -5]  # the NCR voxel: WT and TC right
    logits[1, 0] = [5, 5, 5]  # one of two ET voxels
    d = np.asarray(region_dice(jnp.asarray(logits), jnp.asarray(label)))
    # WT: label {(0,1),(0,2),(1,0),(1,1)}, pred {(0,1),(1,0)} -> 4/6; TC: {(0,1),(1,0),(1,1)} vs 2 -> 4/5
    np.testing.assert_allclose(d, [4 / 6, 4 / 5, 2 / 3], rtol=1e-6)


def test_surface_voxels_include_image_border():
    full = np.ones((4, 5), bool)
    s = surface_voxels(full)
    assert s.sum() == 4 * 5 - 2 * 3 and not s[1:-1, 1:-1].any()
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert surface_voxels(cube).sum() == 26


def test_single_voxels_with_spacing():
    gt = np.zeros((10, 12), bool)
    pred = np.zeros((10, 12), bool)
    gt[5, 5] = True
    pred[5, 8] = True  # 3 voxels along an axis of 2 mm
    assert hd95(pred, gt, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    assert nsd(pred, gt, 5.9, spacing=(1.0, 2.0)) == 0.0
    assert nsd(pred, gt, 6.0, spacing=(1.0, 2.0)) == 1.0


def test_lines_with_outlier_percentile():
    gt = np.zeros((12, 20), bool)
    gt[5, 2:7] = True
    pred = np.zeros((12, 20), bool)
    pred[7, 2:7] = True  # every voxel 2 away
    pred[7, 16] = True  # outlier: nearest gt voxel (5, 6), sqrt(4 + 100)
    # pred->gt distances [2, 2, 2, 2, 2, sqrt(104)]: linear 95th percentile at position 4.75
    expected = 2 + 0.75 * (math.sqrt(104) - 2)
    assert hd95(pred, gt) == pytest.approx(expected, rel=1e-9)
    assert nsd(pred, gt, 2.0) == pytest.approx(10 / 11)


def test_empty_rules_and_per_class():
    label = np.zeros((8, 8, 8), np.int64)
    label[2:6, 2:6, 2:6] = 1
    pred = label.copy()
    h, n = surface_metrics(pred, label, 3, spacing=(2.0, 1.0, 1.0), tolerance=1.0)
    np.testing.assert_array_equal(h, [0.0, 0.0])  # identical; class 2 empty in both -> 0 / 1
    np.testing.assert_array_equal(n, [1.0, 1.0])
    pred[pred == 1] = 2
    h, n = surface_metrics(pred, label, 3)
    assert np.all(np.isnan(h)) and np.all(n == 0.0)  # one side empty (MONAI's HD95 NaN)

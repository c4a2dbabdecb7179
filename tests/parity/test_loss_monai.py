"""Losses vs MONAI: DiceCELoss (the nnU-Net default), FocalLoss, and the BraTS region composition.

MONAI's FocalLoss semantics (1.x): with ``use_softmax=True, to_onehot_y=True`` the per-element terms are
``-(1 - p)**gamma * log p * onehot`` and ``reduction="mean"`` divides by N * K * voxels, i.e. by K more than
the seed's focal loss (MONAI 0.4: mean over voxels of the true-class term). Ours follows the seed, so
``ours == K * MONAI``. For the sigmoid regions MONAI's default (``use_softmax=False``) is the sigmoid focal
loss averaged over elements, which is exactly ours per region.
"""

import jax
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss, FocalLoss

from nnunet_jax.losses import make_loss


def _data(shape, n_class, absent, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(size=shape + (n_class,))).astype(np.float32)
    present = [c for c in range(n_class) if c != absent]
    labels = rng.choice(present, size=shape).astype(np.int32)
    return logits, labels


def _torch(logits, labels):
    x = torch.from_numpy(np.moveaxis(logits, -1, 1).copy()).requires_grad_(True)
    y = torch.from_numpy(labels[:, None].astype(np.int64))
    return x, y


SHAPES = [(2, 12, 10), (2, 6, 8, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("absent", [2, None])
def test_dice_ce_matches_monai(shape, absent):
    logits, labels = _data(shape, 4, absent)
    assert absent is None or not (labels == absent).any()
    x, y = _torch(logits, labels)
    ref = DiceCELoss(include_background=False, softmax=True, to_onehot_y=True, batch=True)(x, y)
    ref.backward()
    loss_fn = make_loss()
    ours, grad = jax.value_and_grad(loss_fn)(logits, labels)
    np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.moveaxis(x.grad.numpy(), 1, -1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_dice_ce_bf16_logits_computed_in_fp32(shape):
    logits, labels = _data(shape, 3, None, seed=3)
    logits_bf16 = jax.numpy.asarray(logits, jax.numpy.bfloat16)
    x, y = _torch(np.asarray(logits_bf16.astype(np.float32)), labels)
    ref = DiceCELoss(include_background=False, softmax=True, to_onehot_y=True, batch=True)(x, y).item()
    ours = make_loss()(logits_bf16, labels)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(float(ours), ref, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_focal_matches_monai(shape):
    n_class = 3
    logits, labels = _data(shape, n_class, None, seed=1)
    x, y = _torch(logits, labels)
    dice = DiceLoss(include_background=False, softmax=True, to_onehot_y=True, batch=True)(x, y)
    focal = FocalLoss(include_background=True, to_onehot_y=True, gamma=2.0, use_softmax=True)(x, y)
    ref = dice.item() + n_class * focal.item()
    ours = make_loss(focal=True)(logits, labels)
    np.testing.assert_allclose(float(ours), ref, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("focal", [False, True])
def test_region_loss_matches_monai(shape, focal):
    rng = np.random.default_rng(2)
    logits = (2 * rng.normal(size=shape + (3,))).astype(np.float32)
    labels = rng.choice([0, 1, 2, 4], size=shape).astype(np.int32)  # raw BraTS labels, 4 = ET
    x = torch.from_numpy(np.moveaxis(logits, -1, 1).copy())
    y = torch.from_numpy(labels[:, None].astype(np.int64))
    regions = [y > 0, (y == 1) | (y == 4), y == 4]
    dice = DiceLoss(sigmoid=True, batch=True)
    second = FocalLoss(gamma=2.0, to_onehot_y=False) if focal else torch.nn.BCEWithLogitsLoss()
    ref = sum(
        (dice(x[:, i : i + 1], r.float()) + second(x[:, i : i + 1], r.float())).item()
        for i, r in enumerate(regions)
    )
    ours = make_loss(brats=True, focal=focal)(logits, labels)
    np.testing.assert_allclose(float(ours), ref, rtol=1e-5)

"""Loss properties (docs/reference.md §2-3): formulas vs direct NumPy, fp32 under bf16, deep-supervision
weighting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnunet_jax.labels import brats_regions
from nnunet_jax.losses import (
    deep_supervision_weights,
    dice_loss,
    downsample_labels,
    focal_loss,
    make_loss,
)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_dice_ce(logits, labels):
    """docs/reference.md §3 written out with NumPy in float64."""
    k = logits.shape[-1]
    p = _softmax(logits.astype(np.float64))
    y = np.eye(k)[labels]
    axes = tuple(range(labels.ndim))
    inter, g, q = (p * y)[..., 1:].sum(axes), y[..., 1:].sum(axes), p[..., 1:].sum(axes)
    dice = np.mean(1 - (2 * inter + 1e-5) / (g + q + 1e-5))
    ce = -np.mean(np.log(np.take_along_axis(p, labels[..., None], -1)))
    return dice + ce


def _data(shape, k, seed=0, absent=None):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape + (k,)).astype(np.float32) * 2
    labels = rng.choice([c for c in range(k) if c != absent], size=shape)
    return logits, labels


@pytest.mark.parametrize("shape", [(2, 9, 7), (2, 5, 6, 4)])
@pytest.mark.parametrize("absent", [None, 2])
def test_dice_ce_matches_formula(shape, absent):
    logits, labels = _data(shape, 4, absent=absent)
    loss = jax.jit(make_loss())(logits, labels)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), _numpy_dice_ce(logits, labels), rtol=1e-5)


def test_absent_class_is_not_masked():
    """An absent class with predicted mass adds ~1 / (n_fg) to the Dice term (docs/reference.md §3)."""
    logits, labels = _data((2, 8, 8), 3, absent=2)
    d = float(dice_loss(logits, labels))
    p = _softmax(logits.astype(np.float64))
    y = np.eye(3)[labels]
    term1 = 1 - (2 * (p * y)[..., 1].sum() + 1e-5) / (y[..., 1].sum() + p[..., 1].sum() + 1e-5)
    term2 = 1 - 1e-5 / (p[..., 2].sum() + 1e-5)
    np.testing.assert_allclose(d, (term1 + term2) / 2, rtol=1e-5)
    assert term2 > 0.99


def test_perfect_prediction_is_near_zero_and_labels_with_channel_axis():
    labels = np.random.default_rng(0).integers(0, 3, size=(2, 6, 6, 5))
    logits = 30.0 * (np.eye(3)[labels] - 0.5)
    loss_fn = make_loss()
    assert float(loss_fn(logits, labels)) < 1e-5
    np.testing.assert_allclose(float(loss_fn(logits, labels[..., None])), float(loss_fn(logits, labels)))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(logits, labels[:, :5])


def test_bf16_logits_give_fp32_loss():
    logits, labels = _data((2, 8, 8, 8), 3)
    lo = jnp.asarray(logits, jnp.bfloat16)
    out = make_loss()(lo, labels)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(
        float(out), _numpy_dice_ce(np.asarray(lo.astype(jnp.float32)), labels), rtol=1e-5
    )


def test_focal_properties():
    logits, labels = _data((2, 7, 9), 3, seed=4)
    p = _softmax(logits.astype(np.float64))
    pt = np.take_along_axis(p, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        float(focal_loss(logits, labels)), np.mean(-((1 - pt) ** 2) * np.log(pt)), rtol=1e-5
    )
    np.testing.assert_allclose(float(focal_loss(logits, labels, gamma=0.0)), np.mean(-np.log(pt)), rtol=1e-5)
    full = float(make_loss(focal=True)(logits, labels))
    np.testing.assert_allclose(
        full, float(dice_loss(logits, labels)) + float(focal_loss(logits, labels)), rtol=1e-6
    )


def test_brats_regions_and_region_loss():
    labels = np.array([0, 1, 2, 3, 4])
    np.testing.assert_array_equal(
        np.asarray(brats_regions(jnp.asarray(labels))),
        [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]],
    )
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, 2, 3], size=(2, 6, 6, 4))
    logits = rng.normal(size=labels.shape + (3,)).astype(np.float32)
    target = np.stack([labels > 0, np.isin(labels, [1, 3]), labels == 3], -1).astype(np.float64)
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    axes = (0, 1, 2, 3)
    dice = 1 - (2 * (s * target).sum(axes) + 1e-5) / (target.sum(axes) + s.sum(axes) + 1e-5)
    bce = -np.mean(target * np.log(s) + (1 - target) * np.log(1 - s), axis=axes)
    np.testing.assert_allclose(float(make_loss(brats=True)(logits, labels)), np.sum(dice + bce), rtol=1e-5)
    with pytest.raises(ValueError, match="3 output channels"):
        make_loss(brats=True)(logits[..., :2], labels)


def test_deep_supervision_weights_and_label_downsampling():
    np.testing.assert_allclose(deep_supervision_weights(3), np.array([1, 0.5, 0.25]) / 1.75, rtol=1e-6)
    labels = jnp.arange(2 * 8 * 6).reshape(2, 8, 6)
    np.testing.assert_array_equal(
        np.asarray(downsample_labels(labels, (4, 3))), np.asarray(labels)[:, ::2, ::2]
    )
    np.testing.assert_array_equal(
        np.asarray(downsample_labels(labels, (8, 3))), np.asarray(labels)[:, :, ::2]
    )


@pytest.mark.parametrize("brats", [False, True])
def test_deep_supervision_loss(brats):
    rng = np.random.default_rng(3)
    k = 3
    labels = rng.integers(0, k, size=(2, 16, 12, 8))
    heads = tuple(rng.normal(size=(2, 16 // f, 12 // f, 8 // f, k)).astype(np.float32) for f in (1, 2, 4))
    single = make_loss(brats=brats)
    expected = sum(
        w * float(single(h, labels[:, :: 2**i, :: 2**i, :: 2**i]))
        for i, (w, h) in enumerate(zip(deep_supervision_weights(3), heads, strict=True))
    )
    ds = make_loss(brats=brats, deep_supervision=True)
    np.testing.assert_allclose(float(jax.jit(ds)(heads, labels)), expected, rtol=1e-5)
    # validation passes the main output alone: weight 1
    np.testing.assert_allclose(float(ds(heads[0], labels)), float(single(heads[0], labels)), rtol=1e-6)
    with pytest.raises(ValueError, match="deep_supervision=False"):
        single(heads, labels)


def test_gradient_is_finite_and_jittable():
    logits, labels = _data((2, 6, 6, 6), 3)
    grad = jax.jit(jax.grad(make_loss(deep_supervision=True)))(
        (jnp.asarray(logits), jnp.asarray(logits[:, ::2, ::2, ::2])), labels
    )
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grad)

"""nnU-Net training losses (docs/reference.md §2 and §3), channels-last and jit-able.

Every loss takes logits ``(N, *spatial, K)`` in any float dtype and integer labels ``(N, *spatial)`` or
``(N, *spatial, 1)`` and returns an fp32 scalar: the arithmetic runs in float32 whatever the model computed
in, so bf16 training keeps the same loss values.

- Default: batch soft Dice over the foreground classes + cross-entropy, summed (MONAI's
  ``DiceCELoss(include_background=False, softmax=True, to_onehot_y=True, batch=True)``).
- ``focal``: the cross-entropy term becomes the softmax focal loss with gamma 2 and no class weights, averaged
  over voxels: ``mean(-(1 - p_t)^2 log p_t)`` (the seed's MONAI FocalLoss; MONAI >= 0.6 averages the same
  terms over voxels *and* channels, i.e. divides by K).
- ``brats``: three sigmoid region channels WT = y > 0, TC = y in {1, 3}, ET = y == 3 (label 4 counts as 3, so
  raw BraTS labels work too); per region batch soft Dice + BCE (sigmoid focal with ``focal``), summed.
- ``deep_supervision``: ``sum_i w_i loss(head_i, labels_i)`` with ``w_i = 0.5**i / sum_j 0.5**j``. We follow
  the original nnU-Net: the labels are downsampled (nearest: the first voxel of each stride block, PyTorch's
  ``interpolate(mode="nearest")`` indexing) to each head's resolution, which is cheaper than upsampling the
  logits of every head to full size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nnunet_jax.labels import REGIONS, brats_regions

SMOOTH = 1e-5
FOCAL_GAMMA = 2.0

LossFn = Callable[[jax.Array | Sequence[jax.Array], jax.Array], jax.Array]


def _int_labels(labels: jax.Array, logits: jax.Array) -> jax.Array:
    """Labels as int32 ``(N, *spatial)``: drop a trailing channel axis of size 1."""
    if labels.ndim == logits.ndim:
        if labels.shape[-1] != 1:
            raise ValueError(f"labels {labels.shape} must be (N, *spatial) or (N, *spatial, 1)")
        labels = labels[..., 0]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {labels.shape} do not match logits {logits.shape} (channels-last)")
    return labels.astype(jnp.int32)


def batch_soft_dice_loss(probs: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over channels of ``1 - (2I + s) / (G + P + s)``, sums over batch and space together."""
    axes = tuple(range(probs.ndim - 1))
    intersection = jnp.sum(probs * target, axis=axes)
    ground = jnp.sum(target, axis=axes)
    pred = jnp.sum(probs, axis=axes)
    return jnp.mean(1.0 - (2.0 * intersection + SMOOTH) / (ground + pred + SMOOTH))


def dice_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax over all channels, one-hot labels, background dropped, batch Dice (absent classes kept)."""
    logits = logits.astype(jnp.float32)
    labels = _int_labels(labels, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return batch_soft_dice_loss(probs[..., 1:], onehot[..., 1:])


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over every voxel of the batch, all classes, no class weights."""
    logits = logits.astype(jnp.float32)
    labels = _int_labels(labels, logits)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = FOCAL_GAMMA) -> jax.Array:
    """Softmax focal loss ``mean(-(1 - p_t)**gamma * log p_t)`` over voxels (no alpha)."""
    logits = logits.astype(jnp.float32)
    labels = _int_labels(labels, logits)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    log_pt = jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    return jnp.mean(-((1.0 - jnp.exp(log_pt)) ** gamma) * log_pt)


def dice_ce_loss(logits: jax.Array, labels: jax.Array, focal: bool = False) -> jax.Array:
    """The nnU-Net default: Dice + CE (or Dice + focal), summed."""
    second = focal_loss(logits, labels) if focal else cross_entropy_loss(logits, labels)
    return dice_loss(logits, labels) + second


def region_loss(logits: jax.Array, labels: jax.Array, focal: bool = False) -> jax.Array:
    """BraTS regions: per region batch soft Dice(sigmoid) + BCE (or sigmoid focal), summed over regions."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] != len(REGIONS):
        raise ValueError(
            f"the BraTS region loss needs 3 output channels (WT, TC, ET), got {logits.shape[-1]}"
        )
    target = brats_regions(_int_labels(labels, logits))
    axes = tuple(range(logits.ndim - 1))
    probs = jax.nn.sigmoid(logits)
    intersection = jnp.sum(probs * target, axis=axes)
    dice = 1.0 - (2.0 * intersection + SMOOTH) / (
        jnp.sum(target, axis=axes) + jnp.sum(probs, axis=axes) + SMOOTH
    )
    if focal:
        second = optax.sigmoid_focal_loss(logits, target, gamma=FOCAL_GAMMA)
    else:
        second = optax.sigmoid_binary_cross_entropy(logits, target)
    return jnp.sum(dice + jnp.mean(second, axis=axes))


def deep_supervision_weights(n_outputs: int) -> np.ndarray:
    """``w_i = 0.5**i`` normalised to sum 1 (i = 0 is the full-resolution output)."""
    w = 0.5 ** np.arange(n_outputs, dtype=np.float64)
    return (w / w.sum()).astype(np.float32)


def downsample_labels(labels: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """Nearest downsampling of ``(N, *spatial)`` labels: output index j reads input floor(j * in / out)."""
    out = labels
    for axis, (size_in, size_out) in enumerate(zip(labels.shape[1:], spatial_shape, strict=True), start=1):
        if size_in != size_out:
            index = np.floor(np.arange(size_out) * (size_in / size_out)).astype(np.int32)
            out = jnp.take(out, jnp.asarray(index), axis=axis)
    return out


def make_loss(focal: bool = False, brats: bool = False, deep_supervision: bool = False) -> LossFn:
    """Return ``loss_fn(outputs, labels) -> fp32 scalar`` (docs/CONTRACTS.md).

    ``outputs`` is the model output: logits, or with ``deep_supervision`` the tuple ``(main, head_1, ...)``
    (a plain array is accepted too, e.g. for validation, and then gets weight 1).
    """

    def single(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return region_loss(logits, labels, focal) if brats else dice_ce_loss(logits, labels, focal)

    def loss_fn(outputs: jax.Array | Sequence[jax.Array], labels: jax.Array) -> jax.Array:
        if not deep_supervision or not isinstance(outputs, tuple | list):
            if isinstance(outputs, tuple | list):
                raise ValueError(f"got {len(outputs)} outputs but deep_supervision=False")
            return single(outputs, labels)
        main = outputs[0]
        labels = _int_labels(labels, main)
        weights = deep_supervision_weights(len(outputs))
        total = jnp.float32(0.0)
        for w, head in zip(weights, outputs, strict=True):
            total = total + w * single(head, downsample_labels(labels, head.shape[1:-1]))
        return total

    return loss_fn

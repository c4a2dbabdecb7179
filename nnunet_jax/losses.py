"""nnU-Net training losses (docs/reference.md §2 and §3), channels-last and jit-able.

Every loss takes logits ``(N, *spatial, K)`` in any float dtype and integer labels ``(N, *spatial)`` or
``(N, *spatial, 1)`` and returns an fp32 scalar: the arithmetic runs in float32 whatever the model computed
in, so bf16 training keeps the same loss values.

- Default: batch soft Dice over the foreground classes + cross-entropy, summed (MONAI's
  ``DiceCELoss(include_background=False, softmax=True, to_onehot_y=True, batch=True)``).
- ``focal``: the cross-entropy term becomes the softmax focal loss with gamma 2 and no class weights, averaged
  over voxels: ``mean(-(1 - p_t)^2 log p_t)`` (the seed's MONAI FocalLoss; MONAI >= 0.6 averages the same
  terms over voxels *and* channels, i.e. divides by K).
- regions (``brats``, or a plan's regions through :class:`nnunet_jax.labels.LabelSpec`): one sigmoid channel
  per region (BraTS: WT = y > 0, TC = y in {1, 3}, ET = y == 3, label 4 counting as 3); per region batch soft
  Dice + BCE (sigmoid focal with ``focal``), summed over the regions. nnU-Net v2's ``DC_and_BCE_loss``
  (``do_bg=True``) has the same terms but averages over the regions and writes its Dice term as -Dice: ours is
  R times v2's plus R, which keeps the seed's BraTS loss unchanged.
- ignore label (a plan from a v2 dataset with an ``ignore`` label): :func:`ignore_dice_ce_loss`, exactly
  nnU-Net v2's ``DC_and_CE_loss`` with ``ignore_label``; regions with an ignore label mask their Dice and BCE
  terms the same way.
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

from nnunet_jax.labels import BRATS_REGIONS, LabelSpec, region_targets

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


def soft_dice(probs: jax.Array, target: jax.Array, mask: jax.Array | None = None, batch: bool = True
              ) -> jax.Array:
    """Per channel ``(2I + s) / (G + P + s)``: sums over batch and space together (``batch``), else over
    space per sample (shape ``(N, K)``); ``mask`` ``(..., 1)`` drops voxels from all three sums."""
    axes = tuple(range(0 if batch else 1, probs.ndim - 1))
    if mask is not None:
        probs, target = probs * mask, target * mask
    intersection = jnp.sum(probs * target, axis=axes)
    ground = jnp.sum(target, axis=axes)
    pred = jnp.sum(probs, axis=axes)
    return (2.0 * intersection + SMOOTH) / (ground + pred + SMOOTH)


def batch_soft_dice_loss(probs: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over channels of ``1 - (2I + s) / (G + P + s)``, sums over batch and space together."""
    return jnp.mean(1.0 - soft_dice(probs, target))


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


def _focal_terms(logits: jax.Array, labels: jax.Array, gamma: float = FOCAL_GAMMA) -> jax.Array:
    """Per voxel ``-(1 - p_t)**gamma * log p_t`` of fp32 logits and int32 labels."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    log_pt = jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    return -((1.0 - jnp.exp(log_pt)) ** gamma) * log_pt


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = FOCAL_GAMMA) -> jax.Array:
    """Softmax focal loss ``mean(-(1 - p_t)**gamma * log p_t)`` over voxels (no alpha)."""
    logits = logits.astype(jnp.float32)
    return jnp.mean(_focal_terms(logits, _int_labels(labels, logits), gamma))


def dice_ce_loss(logits: jax.Array, labels: jax.Array, focal: bool = False) -> jax.Array:
    """The nnU-Net default: Dice + CE (or Dice + focal), summed."""
    second = focal_loss(logits, labels) if focal else cross_entropy_loss(logits, labels)
    return dice_loss(logits, labels) + second


def _masked_mean(values: jax.Array, mask: jax.Array, axes: tuple[int, ...] | None = None) -> jax.Array:
    """Mean of ``values`` over the voxels where ``mask`` is 1 (0 when there are none)."""
    return jnp.sum(values * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)


def ignore_dice_ce_loss(logits: jax.Array, labels: jax.Array, ignore_label: int, focal: bool = False,
                        batch_dice: bool = True) -> jax.Array:
    """Dice + CE where voxels labelled ``ignore_label`` count for nothing: nnU-Net v2's
    ``DC_and_CE_loss({'batch_dice': batch_dice, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {},
    ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)``, value for value.

    What is matched: the CE is the mean over the annotated voxels (0 when there are none); the softmax Dice of
    the foreground classes sums over the annotated voxels only (the loss mask) and enters as ``-mean(Dice)``,
    v2's sign convention, so this loss is 1 lower than the seed's ``1 - Dice`` form would be (same
    gradients). ``batch_dice`` True pools the batch as the seed's Dice does; False is v2's per-sample Dice.
    With ``focal`` the CE term becomes the focal term, averaged over the same voxels (no v2 counterpart).
    """
    logits = logits.astype(jnp.float32)
    labels = _int_labels(labels, logits)
    annotated = labels != ignore_label
    target = jnp.where(annotated, labels, 0)
    mask = annotated.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=jnp.float32)
    dice = soft_dice(probs[..., 1:], onehot[..., 1:], mask[..., None], batch=batch_dice)
    if focal:
        per_voxel = _focal_terms(logits, target)
    else:
        per_voxel = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    return _masked_mean(per_voxel, mask) - jnp.mean(dice)


def region_loss(logits: jax.Array, labels: jax.Array, focal: bool = False,
                regions: tuple[tuple[int, ...], ...] = tuple(v for _, v in BRATS_REGIONS),
                ignore_label: int | None = None) -> jax.Array:
    """Regions (label values per output channel; BraTS by default): per region batch soft Dice(sigmoid) +
    BCE (or sigmoid focal), summed over regions; ``ignore_label`` voxels drop out of both terms."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] != len(regions):
        raise ValueError(f"the region loss needs {len(regions)} output channels (one per region), got "
                         f"{logits.shape[-1]}")
    labels = _int_labels(labels, logits)
    target = region_targets(labels, regions).astype(jnp.float32)
    axes = tuple(range(logits.ndim - 1))
    mask = None if ignore_label is None else (labels != ignore_label)[..., None].astype(jnp.float32)
    dice = 1.0 - soft_dice(jax.nn.sigmoid(logits), target, mask)
    if focal:
        second = optax.sigmoid_focal_loss(logits, target, gamma=FOCAL_GAMMA)
    else:
        second = optax.sigmoid_binary_cross_entropy(logits, target)
    second = jnp.mean(second, axis=axes) if mask is None else _masked_mean(second, mask, axes)
    return jnp.sum(dice + second)


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


def make_loss(focal: bool = False, brats: bool = False, deep_supervision: bool = False,
              labels: LabelSpec | None = None) -> LossFn:
    """Return ``loss_fn(outputs, labels) -> fp32 scalar`` (docs/CONTRACTS.md).

    ``labels`` (the run's :class:`nnunet_jax.labels.LabelSpec`) picks the loss: regions → :func:`region_loss`,
    an ignore label → :func:`ignore_dice_ce_loss`, else :func:`dice_ce_loss`; without it ``brats`` decides.
    ``outputs`` is the model output: logits, or with ``deep_supervision`` the tuple ``(main, head_1, ...)``
    (a plain array is accepted too, e.g. for validation, and then gets weight 1).
    """
    spec = labels if labels is not None else LabelSpec(0, brats=brats)

    def single(logits: jax.Array, labels: jax.Array) -> jax.Array:
        if spec.uses_regions:
            return region_loss(logits, labels, focal, spec.region_values, spec.ignore_label)
        if spec.ignore_label is not None:
            return ignore_dice_ce_loss(logits, labels, spec.ignore_label, focal)
        return dice_ce_loss(logits, labels, focal)

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

"""Validation and evaluation metrics (docs/reference.md §4).

Dice runs on the device inside jit (from label maps or logits, one volume at a time; validation averages it
over volumes, nnunet_jax.training.validation); the surface metrics (HD95, NSD) run on the host with
NumPy/SciPy.

Surface-metric conventions (MONAI ``compute_hausdorff_distance(percentile=95)`` and
``compute_surface_dice(use_subvoxels=False)`` are the oracle): the surface of a mask is its voxels removed by
one binary erosion (face connectivity, outside of the image counts as background); distances are Euclidean
between surface voxel centres scaled by the voxel spacing; HD95 = max of the two directed 95th percentiles
(linear interpolation); NSD = (surface voxels of both masks within ``tolerance`` mm of the other surface) /
(all surface voxels). Edge cases: one mask empty -> HD95 = NaN, NSD = 0, as MONAI (its directed distances are
all inf and the interpolated percentile of inf is NaN; its plain maximum Hausdorff would be inf), so aggregate
HD95 with ``np.nanmean`` and report how many were undefined; both masks empty -> HD95 = 0, NSD = 1, consistent
with the Dice rule (MONAI returns NaN for both there).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from nnunet_jax.labels import BRATS_REGIONS, LabelSpec, region_targets


def _squeeze_channel(x: jax.Array, like_ndim: int) -> jax.Array:
    return x[..., 0] if x.ndim == like_ndim + 1 and x.shape[-1] == 1 else x


def confusion_matrix(pred_labels: jax.Array, labels: jax.Array, n_class: int) -> jax.Array:
    """``(n_class, n_class)`` int32 counts ``cm[true, pred]``; values outside [0, n_class) are ignored."""
    if pred_labels.ndim != labels.ndim:
        labels = _squeeze_channel(labels, pred_labels.ndim)
        pred_labels = _squeeze_channel(pred_labels, labels.ndim)
    if pred_labels.shape != labels.shape:
        raise ValueError(f"prediction {pred_labels.shape} and label {labels.shape} shapes differ")
    t = labels.reshape(-1).astype(jnp.int32)
    p = pred_labels.reshape(-1).astype(jnp.int32)
    valid = (t >= 0) & (t < n_class) & (p >= 0) & (p < n_class)
    flat = jnp.where(valid, t * n_class + p, n_class * n_class)
    return jnp.bincount(flat, length=n_class * n_class).reshape(n_class, n_class)


def dice_from_confusion(cm: jax.Array) -> jax.Array:
    """Per foreground class: label empty -> 1 if prediction empty else 0; otherwise 2TP / (2TP + FP + FN)."""
    cm = cm.astype(jnp.float32)
    tp = jnp.diagonal(cm)
    in_label = jnp.sum(cm, axis=1)  # TP + FN
    in_pred = jnp.sum(cm, axis=0)  # TP + FP
    empty = jnp.where(in_pred == 0, 1.0, 0.0)
    dice = 2.0 * tp / jnp.maximum(in_label + in_pred, 1.0)
    return jnp.where(in_label == 0, empty, dice)[1:]


def dice_per_class(pred_labels: jax.Array, labels: jax.Array, n_class: int) -> jax.Array:
    """Dice of one volume for classes 1..n_class-1 (docs/reference.md §4 empty-class rule); fp32
    ``(n_class - 1,)``."""
    return dice_from_confusion(confusion_matrix(pred_labels, labels, n_class))


def _unlabelled(labels: jax.Array, ignore_label: int | None) -> jax.Array:
    """Labels with ``ignore_label`` voxels set to -1, which no Dice counts."""
    return labels if ignore_label is None else jnp.where(labels == ignore_label, -1, labels)


def dice_from_logits(logits: jax.Array, labels: jax.Array, ignore_label: int | None = None) -> jax.Array:
    """Argmax of channels-last logits ``(*spatial, K)`` then :func:`dice_per_class`; ``ignore_label``
    voxels count neither as prediction nor as label (nnU-Net v2's evaluation)."""
    return dice_per_class(jnp.argmax(logits, axis=-1), _unlabelled(labels, ignore_label), logits.shape[-1])


def region_dice(logits: jax.Array, labels: jax.Array,
                regions: tuple[tuple[int, ...], ...] = tuple(v for _, v in BRATS_REGIONS),
                ignore_label: int | None = None) -> jax.Array:
    """Region mode (BraTS WT, TC, ET by default): Dice per region of sigmoid > 0.5 vs label in the region's
    values, same empty rule; ``ignore_label`` voxels are left out; ``(R,)`` fp32."""
    labels = _squeeze_channel(labels, logits.ndim - 1)
    pred = logits > 0
    target = region_targets(labels, regions)
    if ignore_label is not None:
        annotated = (labels != ignore_label)[..., None]
        pred, target = pred & annotated, target & annotated
    axes = tuple(range(pred.ndim - 1))
    tp = jnp.sum(pred & target, axis=axes).astype(jnp.float32)
    n_pred = jnp.sum(pred, axis=axes).astype(jnp.float32)
    n_true = jnp.sum(target, axis=axes).astype(jnp.float32)
    return jnp.where(
        n_true == 0, jnp.where(n_pred == 0, 1.0, 0.0), 2.0 * tp / jnp.maximum(n_true + n_pred, 1.0)
    )


def label_dice(logits: jax.Array, labels: jax.Array, spec: LabelSpec) -> jax.Array:
    """The validation Dice of one volume for a run's outputs: per region or per foreground class."""
    if spec.uses_regions:
        return region_dice(logits, labels, spec.region_values, spec.ignore_label)
    return dice_from_logits(logits, labels, spec.ignore_label)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` removed by one binary erosion (face connectivity; outside counts as background)."""
    mask = np.asarray(mask, bool)
    return mask ^ ndimage.binary_erosion(mask)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each prediction surface voxel to the label surface, and the reverse.

    Works on the bounding box of both masks (plus one empty voxel each side, so erosion sees the same
    neighbourhood) and uses SciPy's exact Euclidean distance transform with the voxel spacing. An empty side
    gives distances of ``inf`` from the other side.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and label {gt.shape} shapes differ")
    spacing = (
        np.ones(pred.ndim) if spacing is None else np.broadcast_to(np.asarray(spacing, float), (pred.ndim,))
    )
    union = pred | gt
    if not union.any():
        return np.zeros(0), np.zeros(0)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(union))
    pred_s = surface_voxels(np.pad(pred[box], 1))
    gt_s = surface_voxels(np.pad(gt[box], 1))

    def directed(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        if not dst.any():
            return np.full(int(src.sum()), np.inf)
        return ndimage.distance_transform_edt(~dst, sampling=spacing)[src]

    return directed(pred_s, gt_s), directed(gt_s, pred_s)


def hd95_from_distances(d_pred_gt: np.ndarray, d_gt_pred: np.ndarray) -> float:
    if d_pred_gt.size == 0 and d_gt_pred.size == 0:
        return 0.0
    if d_pred_gt.size == 0 or d_gt_pred.size == 0:
        return float("nan")
    return float(max(np.percentile(d_pred_gt, 95), np.percentile(d_gt_pred, 95)))


def nsd_from_distances(d_pred_gt: np.ndarray, d_gt_pred: np.ndarray, tolerance: float) -> float:
    total = d_pred_gt.size + d_gt_pred.size
    if total == 0:
        return 1.0
    return float((np.sum(d_pred_gt <= tolerance) + np.sum(d_gt_pred <= tolerance)) / total)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two binary masks."""
    return hd95_from_distances(*surface_distances(pred, gt, spacing))


def nsd(pred: np.ndarray, gt: np.ndarray, tolerance: float, spacing: Sequence[float] | None = None) -> float:
    """Normalised surface Dice at ``tolerance`` mm between two binary masks."""
    return nsd_from_distances(*surface_distances(pred, gt, spacing), tolerance)


def surface_metrics(
    pred_labels: np.ndarray,
    labels: np.ndarray,
    n_class: int,
    spacing: Sequence[float] | None = None,
    tolerance: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """HD95 and NSD per foreground class of one volume of label maps: two ``(n_class - 1,)`` arrays."""
    pred_labels, labels = np.asarray(pred_labels), np.asarray(labels)
    out_hd, out_nsd = np.zeros(n_class - 1), np.zeros(n_class - 1)
    for c in range(1, n_class):
        d = surface_distances(pred_labels == c, labels == c, spacing)
        out_hd[c - 1] = hd95_from_distances(*d)
        out_nsd[c - 1] = nsd_from_distances(*d, tolerance)
    return out_hd, out_nsd

"""nnU-Net v2's export: network logits → label map (and probabilities) at the source geometry
(docs/nnunetv2.md §5), equal to v2's ``convert_predicted_logits_to_segmentation_with_correct_shape``.

Steps as v2: resample the logits (in their own dtype, fp16 for v2 models; float64 inside) with the
configuration's ``resampling_fn_probabilities`` from the plans spacing (whose anisotropy is looked at
first) to the case's transposed spacing at the cropped shape; argmax over channels (first index wins
ties), or for regions sigmoid then ``regions_class_order`` (later entries overwrite); with probabilities,
softmax/sigmoid in float32 first and the argmax of those. Paste into the box of the uncropped shape
(probabilities outside it: [1, 0, ...], regions 0), then ``transpose_backward``.

Memory-lean: v2 holds every channel at the source resolution (and a float64 copy of the logits); here
all channels advance together one slab of output rows at a time (:func:`preprocessing.resample_slabs`), so
besides the inputs and outputs only a few MB per channel exist at once.

Interface: ``logits_to_segmentation(logits, props, plans, config_name, labels, save_probabilities=False)
-> (seg in reader order, probabilities (K, *reader shape) float32 or None)``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, softmax

from nnunet_jax.interop.nnunetv2.plans import V2Labels, V2Plans
from nnunet_jax.interop.nnunetv2.preprocessing import CaseProps, resample_slabs, target_spacing

SLAB_BYTES = 48 << 20  # float64 bytes of one streamed slab, all channels together


def _slab_rows(n_channels: int, out_shape) -> int:
    plane = int(np.prod(out_shape[1:]))
    return max(1, SLAB_BYTES // (8 * n_channels * max(plane, 1)))


def _labels_of(block: np.ndarray, labels: V2Labels, with_probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(label slab, probability slab float32 or None) of a resampled logit slab, v2's rules."""
    if labels.has_regions:
        probs = expit(block.astype(np.float32))
        seg = np.zeros(block.shape[1:], np.uint16)
        for i, c in enumerate(labels.regions_class_order):
            seg[probs[i] > 0.5] = c
        return seg, probs if with_probs else None
    if with_probs:
        probs = softmax(block.astype(np.float32), axis=0)
        return probs.argmax(0), probs
    return block.argmax(0), None


def logits_to_segmentation(logits: np.ndarray, props: CaseProps, plans: V2Plans, config_name: str,
                           labels: V2Labels, save_probabilities: bool = False,
                           slab: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """logits (K, *network-input shape) fp16/fp32 → (seg (reader order), probabilities or None)."""
    cfg = plans.configuration(config_name)
    logits = np.asarray(logits)
    cropped = tuple(props.shape_after_cropping_and_before_resampling)
    if logits.ndim != 4 or logits.shape[0] != labels.num_heads:
        raise ValueError(f"logits must be ({labels.num_heads}, a0, a1, a2) for {labels.source}, "
                         f"got shape {logits.shape}")
    if len(props.bbox) != 3 or any(b - a != n for (a, b), n in zip(props.bbox, cropped, strict=True)):
        raise ValueError(f"crop box {props.bbox} does not match the cropped shape {cropped}")
    current = target_spacing(cfg, props.spacing_transposed)
    k = logits.shape[0]
    seg_dtype = np.uint8 if len(labels.foreground_labels) < 255 else np.uint16
    seg = np.zeros(props.shape_before_cropping, seg_dtype)
    box = tuple(slice(a, b) for a, b in props.bbox)
    inside = seg[box]
    probs = probs_in = None
    if save_probabilities:
        probs = np.zeros((k, *props.shape_before_cropping), np.float32)
        if not labels.has_regions:
            probs[0] = 1.0
        probs_in = probs[(slice(None), *box)]
    rows = slab or _slab_rows(k, cropped)
    for idx, block in resample_slabs(logits, cropped, current, props.spacing_transposed,
                                     cfg.resampling_probabilities, slab=rows):
        block = block.astype(logits.dtype, copy=False)  # v2's resampled logits keep their dtype
        part, p = _labels_of(block, labels, save_probabilities)
        inside[idx] = part
        if p is not None:
            probs_in[(slice(None), *idx)] = p
        block = part = p = None  # freed before the next slab is computed
    tb = plans.transpose_backward
    seg = seg.transpose(tb)
    if probs is not None:
        probs = probs.transpose(0, *[a + 1 for a in tb])
    return seg, probs

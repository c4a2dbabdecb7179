"""nnU-Net v2's per-case preprocessing for inference, from its plans (docs/nnunetv2.md §3).

Order (v2's ``DefaultPreprocessor.run_case_npy``): ``transpose_forward`` → crop to the non-zero box →
new shape from the spacings (computed before normalising) → normalise each channel with its scheme →
resample to the configuration's spacing. The resampling is the project's own
(``nnunet_jax.preprocessing.resample``, equal to skimage/scipy), driven by v2's rule for a separate
low-resolution axis (:func:`separate_axis`).

Interface: ``preprocess_case(images, spacing, plans, config_name, geometry=None) -> (data, CaseProps)``;
``resample_slabs`` / ``resample`` are v2's ``resample_data_or_seg_to_shape`` for data (also used by the
export); ``CaseProps.to_v2()`` gives the property dict v2 stores for the case.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_fill_holes

from nnunet_jax.interop.nnunetv2.imageio import Geometry
from nnunet_jax.interop.nnunetv2.plans import V2Configuration, V2Plans, V2Resampling
from nnunet_jax.preprocessing.resample import resize_slabs

RESAMPLE_SLAB_ROWS = 16  # output rows per streamed slab: a few MB per channel for a large CT


@dataclass(frozen=True)
class CaseProps:
    """What the export needs to undo the preprocessing, in v2's terms. Shapes and ``bbox`` (half-open
    [start, end) per axis) are in the transposed order; ``spacing`` is in reader order."""

    spacing: tuple[float, ...]
    spacing_transposed: tuple[float, ...]
    shape_before_cropping: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]
    shape_after_cropping_and_before_resampling: tuple[int, ...]
    geometry: Geometry | None = None

    def to_v2(self) -> dict:
        """The keys v2's preprocessing stores for the case (besides the reader's geometry)."""
        return {"spacing": list(self.spacing), "shape_before_cropping": self.shape_before_cropping,
                "bbox_used_for_cropping": [list(b) for b in self.bbox],
                "shape_after_cropping_and_before_resampling": self.shape_after_cropping_and_before_resampling}


def compute_new_shape(shape, old_spacing, new_spacing) -> tuple[int, ...]:
    """round(old / new · shape) per axis in float64, Python's round (half to even), as v2."""
    return tuple(int(round(float(o) / float(n) * int(s))) for s, o, n in zip(shape, old_spacing, new_spacing,
                                                                             strict=True))


def separate_axis(current_spacing, new_spacing, rs: V2Resampling) -> int | None:
    """The axis v2 resamples separately (with ``order_z``), or None.

    Forced by ``force_separate_z`` (True: the current spacing's largest axis); otherwise the first of the
    current, then the target spacing whose max/min ratio exceeds the threshold names its largest axis.
    Two or three axes tied for the largest spacing mean no separate axis."""
    def lowres(spacing) -> list[int]:
        sp = np.asarray(spacing, dtype=np.float64)
        return [int(a) for a in np.flatnonzero(sp.max() / sp == 1)]

    def aniso(spacing) -> bool:
        sp = np.asarray(spacing, dtype=np.float64)
        return bool(sp.max() / sp.min() > rs.threshold)

    if rs.force_separate_z is not None:
        axes = lowres(current_spacing) if rs.force_separate_z else []
    elif aniso(current_spacing):
        axes = lowres(current_spacing)
    elif aniso(new_spacing):
        axes = lowres(new_spacing)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


def resample_slabs(data: np.ndarray, new_shape, current_spacing, new_spacing, rs: V2Resampling,
                   slab: int = RESAMPLE_SLAB_ROWS) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """v2's ``resample_data_or_seg_to_shape`` for data (C, a0, a1, a2), streamed: yields (index into the
    output's spatial axes, block (C, ...) float64) slab by slab along the separate axis (else axis 0).

    Each channel is resampled in float64, as v2 does: with ``rs.order`` on all axes and clipped to the
    channel's range, or, with a separate axis, in-plane per slice (clipped per slice) and then along that
    axis with ``rs.order_z``. Linear interpolation is evaluated in scipy's own order (``joint``), so fp16
    logits round to the same fp16 values as v2's. An unchanged shape yields the data itself."""
    new_shape = tuple(int(s) for s in new_shape)
    if data.ndim != 4 or len(new_shape) != 3:
        raise ValueError(f"expected data (C, a0, a1, a2) and a 3-D shape, got {data.shape} -> {new_shape}")
    if rs.is_seg:
        raise ValueError("resample_slabs resamples images and probabilities, not label maps")
    if tuple(data.shape[1:]) == new_shape:
        for k0 in range(0, new_shape[0], slab):
            sl = slice(k0, min(k0 + slab, new_shape[0]))
            yield (sl,), data[:, sl]
        return
    axis = separate_axis(current_spacing, new_spacing, rs)
    stream_axis = 0 if axis is None else axis
    moved = np.moveaxis(data, stream_axis + 1, 1)
    shape_m = (new_shape[stream_axis], *[n for a, n in enumerate(new_shape) if a != stream_axis])
    streams = [resize_slabs(moved[c], shape_m, rs.order, slab=slab, dtype=np.float64,
                            order0=None if axis is None else rs.order_z, joint=rs.order == 1)
               for c in range(data.shape[0])]
    pre = (slice(None),) * stream_axis
    for parts in zip(*streams, strict=True):
        block = np.stack([p[1] for p in parts])
        yield (*pre, parts[0][0]), np.moveaxis(block, 1, stream_axis + 1)


def resample(data: np.ndarray, new_shape, current_spacing, new_spacing, rs: V2Resampling) -> np.ndarray:
    """:func:`resample_slabs` assembled into one array of the input's dtype (as v2 returns it)."""
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(data.shape[1:]) == new_shape:
        return data
    out = np.empty((data.shape[0], *new_shape), data.dtype)
    for idx, block in resample_slabs(data, new_shape, current_spacing, new_spacing, rs):
        out[(slice(None), *idx)] = block
    return out


def crop_to_nonzero(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, int], ...]]:
    """(cropped data, non-zero mask inside the box, half-open box): the mask is the OR over channels of
    ``x != 0`` with holes filled; an empty mask keeps the whole image."""
    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    mask = binary_fill_holes(mask)
    box = []
    for a in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))
        box.append((int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, mask.shape[a]))
    sl = tuple(slice(a, b) for a, b in box)
    return data[(slice(None), *sl)], mask[sl], tuple(box)


def normalize_channel(image: np.ndarray, scheme: str, use_mask: bool, mask: np.ndarray,
                      stats: dict[str, float] | None) -> np.ndarray:
    """One channel (float32, changed in place where v2 does) with v2's scheme; eps 1e-8. ``stats``: the
    plans' foreground intensity properties of the channel (CTNormalization)."""
    eps = 1e-8
    if scheme == "CTNormalization":
        np.clip(image, stats["percentile_00_5"], stats["percentile_99_5"], out=image)
        image -= stats["mean"]
        image /= max(stats["std"], eps)
    elif scheme == "ZScoreNormalization":
        if use_mask:
            mean, std = image[mask].mean(), image[mask].std()
            image[mask] = (image[mask] - mean) / max(std, eps)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
    elif scheme == "RGBTo01Normalization":
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"RGBTo01Normalization needs values in 0..255, got {image.min()}..{image.max()}")
        image /= 255.0
    elif scheme != "NoNormalization":
        raise ValueError(f"unknown normalization scheme {scheme!r}")
    return image


def target_spacing(cfg: V2Configuration, spacing_transposed) -> tuple[float, ...]:
    """The configuration's spacing for all three axes (a 2D configuration keeps the first axis's)."""
    if len(cfg.spacing) < len(spacing_transposed):
        return (float(spacing_transposed[0]), *cfg.spacing)
    return tuple(cfg.spacing)


def preprocess_case(images: np.ndarray, spacing, plans: V2Plans, config_name: str,
                    geometry: Geometry | None = None) -> tuple[np.ndarray, CaseProps]:
    """images (C, *reader shape) → (data (C, *network-input shape) float32, CaseProps), as v2 does."""
    cfg = plans.configuration(config_name)
    images = np.asarray(images)
    if images.ndim != 4 or len(spacing) != 3:
        raise ValueError(f"images must be (C, a0, a1, a2) with 3 spacings, got {images.shape} and {spacing}")
    if images.shape[0] != len(cfg.normalization_schemes):
        raise ValueError(f"the case has {images.shape[0]} channel(s) but configuration {config_name!r} "
                         f"normalises {len(cfg.normalization_schemes)}")
    tf = plans.transpose_forward
    data = images.astype(np.float32).transpose(0, *[a + 1 for a in tf])  # a copy, as v2's astype
    spacing_t = tuple(float(spacing[a]) for a in tf)
    shape_before = tuple(int(s) for s in data.shape[1:])
    data, mask, bbox = crop_to_nonzero(data)
    data = np.ascontiguousarray(data)
    cropped = tuple(int(s) for s in data.shape[1:])
    target = target_spacing(cfg, spacing_t)
    new_shape = compute_new_shape(cropped, spacing_t, target)
    for c, scheme in enumerate(cfg.normalization_schemes):
        normalize_channel(data[c], scheme, cfg.use_mask_for_norm[c], mask,
                          plans.foreground_intensity_properties.get(c))
    data = resample(data, new_shape, spacing_t, target, cfg.resampling_data)
    props = CaseProps(tuple(float(s) for s in spacing), spacing_t, shape_before, bbox, cropped, geometry)
    return data, props

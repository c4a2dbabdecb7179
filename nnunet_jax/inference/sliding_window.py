"""Jitted sliding-window inference (docs/reference.md §8): exactly the windows, padding and weights of MONAI's
``sliding_window_inference`` (the oracle), for 2D and 3D channels-last volumes of any shape.

Definition (per axis): a volume smaller than the window is zero-padded, half before (floor) and half after;
interval = max(int(roi * (1 - overlap)), 1) (roi when the padded size equals roi); window starts 0, interval,
..., the last moved back to size - roi. Output = sum_w weight * logits / sum_w weight with weight = 1
(``constant``) or MONAI's Gaussian (``compute_importance_map``: sigma = sigma_scale * roi, centred at
(roi - 1) / 2, max 1, clamped below at max(min, 1e-3)), accumulated in fp32 on the device.

One compile per *bucket*, not per volume shape. The traced function sees the volume placed in a zero frame
whose size per axis is rounded up to roi + m * interval, m on the ladder 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
(2**k and 3 * 2**(k-1); lengths roi and roi + 1 are their own buckets), so the frame wastes at most ~1.5x per
axis. The window starts, a validity mask and the number of window batches are *data* (a ``while_loop`` runs
only the batches the true shape needs), so the model runs on exactly MONAI's windows of the true shape and the
frame padding never enters the weights. A dataset of varied shapes compiles once per distinct bucket tuple
(measured: 200 random Task09-like shapes -> 21 buckets); when the shapes are known up front (training
validation), pass ``frame_shape=common_frame_shape(shapes, roi)`` and the whole set compiles once. Cropping
the result is an eager slice (a tiny per-shape op, not a model compile). ``params`` is an argument of the
jitted function, so new weights each epoch do not recompile; ``apply_fn`` is a static argument: pass the
*same* function object every call (e.g. build ``functools.partial(model.apply, train=False)`` once), a fresh
lambda per call recompiles.

``grid="nnunetv2"`` runs nnU-Net v2's sliding window instead (docs/nnunetv2.md §4), for its models: tiles
n = ceil((I - P) / (P * step)) + 1 per axis at round-half-even(k (I - P) / (n - 1)), its Gaussian (scipy's
truncated kernel of an impulse, sigma P / 8, max 10, cast to fp16, zeros raised to the smallest value), the
same centred zero padding, and, by default, its fp16 accumulation: every ``L += p * g`` and ``W += g`` is
rounded to fp16 as v2's half-precision buffers do, in v2's tile order, and L / W is fp16. With
``accumulate="float32"`` the same tiles and weights are summed in fp32 (what v2's numbers would be without
its fp16 buffers). v2 mirrors inside each tile, not the whole volume: wrap ``apply_fn`` with
:func:`mirrored` for its TTA; ``tta`` (whole-volume flips, the seed's) is refused in this mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nnunet_jax.inference.tta import flip_combinations

ApplyFn = Callable[[Any, jax.Array], jax.Array]
BLENDS = ("gaussian", "constant")
GRIDS = ("monai", "nnunetv2")
ACCUMULATE = {"float32": jnp.float32, "float16": jnp.float16}


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> tuple[float, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} {value} must have one value per spatial axis ({ndim})")
    return values


def scan_intervals(roi_size: Sequence[int], overlap: float | Sequence[float]) -> tuple[int, ...]:
    """``max(int(roi * (1 - overlap)), 1)`` per axis."""
    overlaps = _per_axis(overlap, len(roi_size), "overlap")
    for o in overlaps:
        if not 0.0 <= o < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return tuple(max(int(r * (1 - o)), 1) for r, o in zip(roi_size, overlaps, strict=True))


def window_starts(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float]
) -> np.ndarray:
    """MONAI's window starts ``(n_windows, ndim)``, last axis fastest, for an image of at least ``roi``."""
    axes = []
    for size, roi, interval in zip(image_size, roi_size, scan_intervals(roi_size, overlap), strict=True):
        if size < roi:
            raise ValueError(f"image size {tuple(image_size)} is smaller than the window {tuple(roi_size)}")
        step = roi if size == roi else interval
        n = 1 + math.ceil((size - roi) / step)
        axes.append([min(d * step, size - roi) for d in range(n)])
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.reshape(-1) for g in grid], axis=1).astype(np.int32)


@lru_cache(maxsize=32)
def blend_weights(
    roi_size: tuple[int, ...], blend: str = "gaussian", sigma_scale: float = 0.125
) -> np.ndarray:
    """The per-window weight map ``roi_size`` float32 (MONAI ``compute_importance_map``)."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if blend == "constant":
        return np.ones(roi_size, np.float32)
    weights = np.ones((), np.float32)
    for roi, scale in zip(roi_size, _per_axis(sigma_scale, len(roi_size), "sigma_scale"), strict=True):
        x = np.arange(-(roi - 1) / 2.0, (roi - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / np.float32(-2 * (roi * scale) ** 2)).astype(np.float32)
        weights = weights[..., None] * g
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def v2_window_starts(image_size: Sequence[int], roi_size: Sequence[int], step: float = 0.5) -> np.ndarray:
    """nnU-Net v2's tile starts ``(n_windows, ndim)`` (``compute_steps_for_sliding_window``), first axis
    outermost, for an image of at least ``roi``."""
    if not 0.0 < step <= 1.0:
        raise ValueError(f"tile step must be in (0, 1], got {step}")
    axes = []
    for size, roi in zip(image_size, roi_size, strict=True):
        if size < roi:
            raise ValueError(f"image size {tuple(image_size)} is smaller than the tile {tuple(roi_size)}")
        n = int(np.ceil((size - roi) / (roi * step))) + 1
        actual = (size - roi) / (n - 1) if n > 1 else 0.0
        axes.append([int(np.round(actual * k)) for k in range(n)])
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.reshape(-1) for g in grid], axis=1).astype(np.int32)


@lru_cache(maxsize=8)
def v2_gaussian(roi_size: tuple[int, ...]) -> np.ndarray:
    """nnU-Net v2's tile weights (``compute_gaussian``, value scaling 10) as float16: the discrete Gaussian
    of an impulse at ``roi // 2`` (sigma roi / 8, scipy's 4-sigma truncation), max 10, zeros replaced by the
    smallest non-zero value (an fp16 subnormal for large tiles)."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(roi_size)
    impulse[tuple(r // 2 for r in roi_size)] = 1.0
    g = gaussian_filter(impulse, [r / 8 for r in roi_size], 0, mode="constant", cval=0)
    g = (g / (np.max(g) / 10)).astype(np.float16)
    g[g == 0] = g[g != 0].min()
    return g


def mirrored(apply_fn: ApplyFn, axes: Sequence[int]) -> ApplyFn:
    """v2's per-tile mirroring (``_internal_maybe_mirror_and_predict``): ``apply_fn`` on the windows plus
    every non-empty combination of flips of the spatial ``axes`` (0-based, itertools order), flipped back,
    summed in fp32 and divided by their number. Build once and reuse (it is the jit's static argument)."""
    import itertools

    axes = tuple(int(a) for a in axes)
    combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    flippers = [partial(jnp.flip, axis=tuple(a + 1 for a in c)) for c in combos]

    def forward(params: Any, x: jax.Array) -> jax.Array:
        out = apply_fn(params, x).astype(jnp.float32)
        if not combos:
            return out

        # One traced network in a loop, not 8 unrolled copies: XLA then runs the passes one after the other
        # in the same buffers (unrolled, it kept several passes' activations alive: 4x v2's peak memory) and
        # compiles the network once.
        def one_flip(i: jax.Array, total: jax.Array) -> jax.Array:
            y = apply_fn(params, lax.switch(i, flippers, x)).astype(jnp.float32)
            return total + lax.switch(i, flippers, y)

        return lax.fori_loop(0, len(combos), one_flip, out) / (len(combos) + 1)

    return forward


def _ladder(m: int) -> int:
    """Smallest value >= m among 0..4 and 2**k, 3 * 2**(k-1)."""
    if m <= 4:
        return m
    p = 1 << (m.bit_length() - 1)
    return m if m == p else (3 * p // 2 if m <= 3 * p // 2 else 2 * p)


def bucket_length(length: int, roi: int, interval: int) -> int:
    """Frame length of the compile bucket holding an axis of ``length`` (>= roi)."""
    if length <= roi + 1:
        return length
    return roi + _ladder(math.ceil((length - roi) / interval)) * interval


def frame_length(shape: Sequence[int], roi_size: Sequence[int], tta: bool = False) -> tuple[int, ...]:
    """Frame size a volume needs per axis: max(size, roi), or size + 2 * ceil((roi - size) / 2) with TTA."""
    return tuple(
        s + 2 * ((r - s + 1) // 2) if tta and s < r else max(s, r)
        for s, r in zip(shape, roi_size, strict=True)
    )


def common_frame_shape(
    shapes: Sequence[Sequence[int]], roi_size: Sequence[int], tta: bool = False
) -> tuple[int, ...]:
    """The smallest ``frame_shape`` that holds every spatial shape in ``shapes`` (one compile for all)."""
    if not shapes:
        raise ValueError("common_frame_shape needs at least one shape")
    return tuple(int(v) for v in np.max([frame_length(s, roi_size, tta) for s in shapes], axis=0))


def _max_windows(frame: int, roi: int, interval: int) -> int:
    return 1 if frame == roi else 1 + math.ceil((frame - roi) / interval)


def _flip(x: jax.Array, flags: jax.Array, axes: Sequence[int]) -> jax.Array:
    for flag, axis in zip(flags, axes, strict=True):
        x = jnp.where(flag, jnp.flip(x, axis), x)
    return x


@partial(jax.jit, static_argnames=("apply_fn", "roi_size", "batch_size", "acc_dtype"))
def _blend_windows(
    params: Any,
    frame: jax.Array,
    starts: jax.Array,
    valid: jax.Array,
    flips: jax.Array,
    n_batches: jax.Array,
    weight: jax.Array,
    *,
    apply_fn: ApplyFn,
    roi_size: tuple[int, ...],
    batch_size: int,
    acc_dtype: Any = jnp.float32,
) -> jax.Array:
    """Per flip pass f: sum_w weight * logits / sum_w weight over the valid windows; mean over passes.

    The sums live in ``acc_dtype``: each window's ``acc + logits * w`` and ``wsum + w`` are computed in fp32
    and rounded back to it, window by window in ``starts`` order (fp16: v2's rounding)."""
    ndim, n_chan = len(roi_size), frame.shape[-1]
    window = jax.ShapeDtypeStruct((batch_size, *roi_size, n_chan), frame.dtype)
    out_shape = jax.eval_shape(apply_fn, params, window).shape
    if tuple(out_shape[:-1]) != (batch_size, *roi_size):
        raise ValueError(f"apply_fn maps {window.shape} to {out_shape}; expected (B, *roi, K)")
    n_out = out_shape[-1]
    win_axes = tuple(range(1, ndim + 1))
    acc0 = jnp.zeros((*frame.shape[:-1], n_out), acc_dtype)
    wsum0 = jnp.zeros((*frame.shape[:-1], 1), acc_dtype)
    f32 = jnp.float32

    def one_pass(f: jax.Array, total: jax.Array) -> jax.Array:
        flags = flips[f]
        w_map = _flip(weight, flags, tuple(range(ndim)))[..., None]

        def body(carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
            b, acc, wsum = carry
            idx = lax.dynamic_slice_in_dim(starts[f], b * batch_size, batch_size)
            ok = lax.dynamic_slice_in_dim(valid[f], b * batch_size, batch_size)
            wins = jnp.stack(
                [lax.dynamic_slice(frame, (*idx[j], 0), (*roi_size, n_chan)) for j in range(batch_size)]
            )
            logits = apply_fn(params, _flip(wins, flags, win_axes)).astype(jnp.float32)
            logits = _flip(logits, flags, win_axes)
            for j in range(batch_size):
                pos = (*idx[j], 0)
                w_j = w_map.astype(f32) * ok[j]
                acc_j = lax.dynamic_slice(acc, pos, (*roi_size, n_out)).astype(f32) + logits[j] * w_j
                acc = lax.dynamic_update_slice(acc, acc_j.astype(acc_dtype), pos)
                wsum_j = lax.dynamic_slice(wsum, pos, (*roi_size, 1)).astype(f32) + w_j
                wsum = lax.dynamic_update_slice(wsum, wsum_j.astype(acc_dtype), pos)
            return b + 1, acc, wsum

        _, acc, wsum = lax.while_loop(lambda c: c[0] < n_batches, body, (jnp.int32(0), acc0, wsum0))
        covered = wsum > 0
        mean = acc.astype(f32) / jnp.where(covered, wsum, 1).astype(f32)
        return total + jnp.where(covered, mean.astype(acc_dtype), 0).astype(acc_dtype)

    total = lax.fori_loop(0, flips.shape[0], one_pass, acc0)
    return total if flips.shape[0] == 1 else total / flips.shape[0]


def compile_cache_size() -> int:
    """Number of compiled sliding-window executables held by jit (for tests and logs)."""
    return _blend_windows._cache_size()


def sliding_window_inference(
    volume: jax.Array | np.ndarray,
    apply_fn: ApplyFn,
    params: Any,
    roi_size: Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    sigma_scale: float | Sequence[float] = 0.125,
    tta: bool = False,
    bucket: bool = True,
    frame_shape: Sequence[int] | None = None,
    grid: str = "monai",
    accumulate: str | None = None,
) -> jax.Array:
    """Blend ``apply_fn(params, windows)`` over one volume ``(*spatial, C)`` -> fp32 logits ``(*spatial, K)``.

    ``apply_fn(params, x)`` maps ``(batch_size, *roi_size, C)`` to ``(batch_size, *roi_size, K)`` logits (any
    float dtype). ``tta=True`` averages the logits over the identity and all flips of the spatial axes, each
    flip being a whole-volume flip -> sliding window -> flip back (the seed's definition). ``bucket=False``
    compiles for the exact shape (no frame padding). ``frame_shape`` fixes the frame instead (e.g.
    :func:`common_frame_shape` of all validation cases: one compile for the whole set).

    ``grid="nnunetv2"``: nnU-Net v2's tiles (tile step = 1 - ``overlap``) and Gaussian (``sigma_scale`` is
    v2's fixed 1/8), accumulated in ``accumulate`` ("float16" by default there, as v2; "float32" otherwise);
    the result has that dtype.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    accumulate = accumulate or ("float16" if grid == "nnunetv2" else "float32")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {tuple(ACCUMULATE)}, got {accumulate!r}")
    if grid == "nnunetv2" and tta:
        raise ValueError("nnU-Net v2 mirrors each tile: wrap apply_fn with mirrored(...) instead of tta=True")
    roi = tuple(int(r) for r in roi_size)
    ndim = len(roi)
    if volume.ndim != ndim + 1:
        raise ValueError(
            f"volume {volume.shape} must be (*spatial, C) with {ndim} spatial axes for roi {roi}"
        )
    if batch_size < 1 or min(roi) < 1:
        raise ValueError(f"batch_size ({batch_size}) and roi_size {roi} must be positive")
    shape = tuple(int(s) for s in volume.shape[:-1])
    intervals = scan_intervals(roi, overlap)
    if grid == "nnunetv2":
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        weight = v2_gaussian(roi) if blend == "gaussian" else np.ones(roi, np.float16)
    else:
        weight = blend_weights(roi, blend, tuple(_per_axis(sigma_scale, ndim, "sigma_scale")))

    before = [max(r - s, 0) // 2 for s, r in zip(shape, roi, strict=True)]
    after = [max(r - s, 0) - b for s, r, b in zip(shape, roi, before, strict=True)]
    # With TTA the flipped passes pad the *flipped* volume floor-before, i.e. ceil-before here: pad ceil on
    # both sides so every pass's windows lie inside one frame.
    offset = after if tta else before
    length = frame_length(shape, roi, tta)
    if frame_shape is not None:
        frame_shape = [int(f) for f in frame_shape]
        if len(frame_shape) != ndim or any(f < n for f, n in zip(frame_shape, length, strict=True)):
            raise ValueError(f"frame_shape {tuple(frame_shape)} cannot hold volume {shape} (needs {length})")
    else:
        frame_shape = [
            bucket_length(n, r, i) if bucket else n for n, r, i in zip(length, roi, intervals, strict=True)
        ]

    padded = [max(s, r) for s, r in zip(shape, roi, strict=True)]
    if grid == "nnunetv2":
        base = v2_window_starts(padded, roi, 1.0 - _per_axis(overlap, ndim, "overlap")[0])
    else:
        base = window_starts(padded, roi, overlap)
    flips = flip_combinations(ndim) if tta else np.zeros((1, ndim), bool)
    sz, rz, bz, oz = (np.asarray(v) for v in (shape, roi, before, offset))
    starts = np.stack([np.where(flags, oz + sz - rz - base + bz, base + oz - bz) for flags in flips])
    n_windows = base.shape[0]
    capacity = math.prod(_max_windows(f, r, i) for f, r, i in zip(frame_shape, roi, intervals, strict=True))
    # no batch wider than the frame's windows (a one-window case at batch 4 ran the network on 3 blanks);
    # the capacity is the bucket's, so this keeps one compile per bucket
    batch_size = min(batch_size, max(capacity, n_windows))
    capacity = batch_size * math.ceil(max(capacity, n_windows) / batch_size)
    starts_pad = np.zeros((len(flips), capacity, ndim), np.int32)
    starts_pad[:, :n_windows] = starts
    valid = np.zeros((len(flips), capacity), np.float32)
    valid[:, :n_windows] = 1.0

    pads = [(o, f - o - s) for o, f, s in zip(offset, frame_shape, shape, strict=True)] + [(0, 0)]
    frame = np.pad(volume, pads) if isinstance(volume, np.ndarray) else jnp.pad(volume, pads)
    out = _blend_windows(
        params,
        jnp.asarray(frame),
        jnp.asarray(starts_pad),
        jnp.asarray(valid),
        jnp.asarray(flips),
        jnp.int32(math.ceil(n_windows / batch_size)),
        jnp.asarray(weight),
        apply_fn=apply_fn,
        roi_size=roi,
        batch_size=batch_size,
        acc_dtype=ACCUMULATE[accumulate],
    )
    if tuple(out.shape[:-1]) == shape:
        return out
    return out[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))]

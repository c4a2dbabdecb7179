"""Separable resampling that reproduces ``skimage.transform.resize(..., mode='edge'|'constant',
anti_aliasing=False, clip=True)`` (which is ``scipy.ndimage.zoom(..., grid_mode=True)``), but faster.

Why separable is exact: the tensor-product B-spline interpolant of a volume, sampled on the Cartesian
output grid, factors into one 1-D linear map per axis (scipy's edge pre-padding, spline pre-filter and
tap weights are each per-axis operations). Applying the axes one after the other costs 4 taps per axis
(order 3) instead of 4**3 per output voxel and skips axes whose size does not change. Results agree with
scipy's joint evaluation up to float rounding (~1e-7 relative; labels identical except exact 0.5 ties).

Coordinates, tap starts, weights and the 12-voxel edge pre-padding follow ``scipy.ndimage.zoom`` with
``grid_mode=True``: input coordinate of output index k is ``(k + 0.5) * n_in / n_out - 0.5``.

Bounded memory (:func:`resize_slabs`, used to map predictions back to a large CT): the same passes, but
the output is produced a slab of axis-0 rows at a time. Passes along the other axes work row by row, so
they stream exactly; the axis-0 spline prefilter is a recursive filter over whole lines, but its reach
decays geometrically, so a window with ``_MARGIN`` extra rows gives the same float32 coefficients.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import scipy.ndimage as ndi

_NPAD = 12  # scipy.ndimage pre-pads by 12 voxels (edge mode) before the spline filter for mode 'nearest'
# Rows of spline-prefilter context kept on each side of a slab's taps in resize_slabs. The cubic prefilter
# is an IIR filter with pole z = sqrt(3) - 2: a row's coefficient depends on rows d away as |z|**d, and
# |z|**24 ≈ 2e-14 is far below float32 rounding: the windowed coefficients round to the same float32
# (up to a rare last-bit flip).
_MARGIN = 24
_CHUNK_ROWS = 8  # resize_slabs: input rows pre-passed (in-plane) per call
_WINDOW_BYTES = 8 << 20  # resize_slabs: size of one column block of the axis-0 filter window


@lru_cache(maxsize=64)
def axis_taps(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices (T, n_out) and weights (T, n_out) of one axis, as scipy's zoom computes them.

    Order 3 indices point into the coefficient line pre-padded by ``_NPAD``; order 1 indices are clamped
    (mode 'nearest' = skimage 'edge'); order 0 indices of -1 mean "outside" (mode 'grid-constant', cval 0).
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"cannot resample an axis of length {n_in} to {n_out}")
    scale = np.float64(n_in) / np.float64(n_out)
    cc = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    if order == 3:
        cc = cc + _NPAD
        start = np.floor(cc)
        t = cc - start
        z = 1.0 - t
        w1 = (t * t * (t - 2.0) * 3.0 + 4.0) / 6.0
        w2 = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
        w0 = z * z * z / 6.0
        w3 = 1.0 - w0 - w1 - w2
        idx = start.astype(np.int64)[None] - 1 + np.arange(4)[:, None]
        idx = np.clip(idx, 0, n_in + 2 * _NPAD - 1)
        return idx, np.stack([w0, w1, w2, w3])
    if order == 1:
        start = np.floor(cc)
        w0 = 1.0 - (cc - start)
        idx = start.astype(np.int64)[None] + np.arange(2)[:, None]
        return np.clip(idx, 0, n_in - 1), np.stack([w0, 1.0 - w0])
    if order == 0:
        idx = np.floor(cc + 0.5).astype(np.int64)
        idx[(idx < 0) | (idx >= n_in)] = -1
        return idx[None], np.ones((1, n_out))
    raise ValueError(f"unsupported interpolation order {order} (use 0, 1 or 3)")


def _gather(arr: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray, dtype) -> np.ndarray:
    """Sum_t w[t] * arr.take(idx[t], axis): one axis of the separable interpolation."""
    arr = arr.astype(dtype, copy=False)
    bshape = [1] * arr.ndim
    bshape[axis] = idx.shape[1]
    w = w.astype(dtype)
    out = np.take(arr, idx[0], axis=axis)
    out *= w[0].reshape(bshape)
    buf = np.empty_like(out)
    for t in range(1, idx.shape[0]):
        np.take(arr, idx[t], axis=axis, out=buf)
        buf *= w[t].reshape(bshape)
        out += buf
    return out


def resize_axis(arr: np.ndarray, axis: int, n_out: int, order: int, dtype=np.float64) -> np.ndarray:
    """Resample one axis of ``arr`` to ``n_out`` samples (no clipping)."""
    n_in = arr.shape[axis]
    if n_in == n_out:
        return arr.astype(dtype, copy=False)
    idx, w = axis_taps(n_in, n_out, order)
    if order == 0:
        valid = idx[0] >= 0
        out = np.take(arr, np.where(valid, idx[0], 0), axis=axis).astype(dtype, copy=False)
        if not valid.all():
            sl = [slice(None)] * arr.ndim
            sl[axis] = ~valid
            out[tuple(sl)] = 0
        return out
    if order == 3:
        pad = [(0, 0)] * arr.ndim
        pad[axis] = (_NPAD, _NPAD)
        arr = np.pad(arr, pad, mode="edge")  # a fresh array: filter it in place when the dtype allows
        arr = ndi.spline_filter1d(arr, 3, axis=axis, mode="nearest",
                                  output=arr if arr.dtype == dtype else dtype)
    return _gather(arr, axis, idx, w, dtype)


def resize(arr: np.ndarray, new_shape, order: int, axes=None, dtype=np.float64,
           clip: bool = True) -> np.ndarray:
    """``skimage.transform.resize(arr, new_shape, order, mode='edge', anti_aliasing=False, clip=clip)``.

    ``axes``: resample only these axes (others must keep their size): e.g. (1, 2) resizes every slice of a
    (Z, Y, X) volume in-plane, with clipping per slice as a per-slice skimage call would do.
    Order 0 uses mode 'constant' with cval 0, as the reference's Z pass does.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if len(new_shape) != arr.ndim or min(new_shape) < 1:
        raise ValueError(f"new shape {new_shape} does not fit an array of shape {arr.shape}")
    axes = tuple(range(arr.ndim)) if axes is None else tuple(axes)
    for a in range(arr.ndim):
        if a not in axes and arr.shape[a] != new_shape[a]:
            raise ValueError(f"axis {a} is not resampled but its size changes {arr.shape} -> {new_shape}")
    out = arr
    for a in _pass_order(arr.shape, new_shape, axes):
        out = resize_axis(out, a, new_shape[a], order, dtype)
    out = out.astype(dtype, copy=out is arr)
    if clip and order > 0:
        lo = arr.min(axis=axes, keepdims=True)
        hi = arr.max(axis=axes, keepdims=True)
        np.clip(out, lo, hi, out=out)
    return out


def _pass_order(shape, new_shape, axes) -> list[int]:
    """Axes in the order resize applies them: shrink first, so later passes run on fewer voxels."""
    return sorted(axes, key=lambda a: new_shape[a] / shape[a])


def resize_slabs(arr: np.ndarray, new_shape, order: int = 3, slab: int = 32, dtype=np.float32,
                 clip: bool = True, margin: int = _MARGIN, order0: int | None = None,
                 joint: bool = False) -> Iterator[tuple[slice, np.ndarray]]:
    """:func:`resize` of all axes, streamed: yields (output axis-0 slice, block) for consecutive slabs of
    ``slab`` output rows, so no full-size intermediate is ever held (memory ≈ a few slabs).

    Same passes in the same order as :func:`resize`. Passes before the axis-0 pass run once per input row
    (kept in a rolling window); the axis-0 pass runs per slab on a window of (pre-passed, edge-padded)
    rows: its spline prefilter is fed ``margin`` extra rows beyond the slab's taps, which makes the
    coefficients equal to the whole-line ones (see ``_MARGIN``; in practice bit-identical). Later passes
    run on the slab. Clipping uses the range of the whole input, as :func:`resize`.

    ``order0`` (0 or 1): axis 0 is a separate low-resolution axis, nnU-Net v2's rule for anisotropic data
    (docs/nnunetv2.md §3): every axis-0 row is first resized in-plane with ``order`` (and clipped to that
    row's own range, as a per-slice resize would be), then axis 0 with ``order0`` (mode nearest, unclipped).

    ``joint`` (order 1 only): evaluate the interpolation the way scipy's zoom does, jointly over the
    resampled axes, corner by corner (sum in C order of value · w_axis0 · w_axis1 · ...), instead of one
    axis after the other. Same value up to float64 rounding, but bit-equal to skimage/scipy, which matters
    where the result is then rounded to float16 (nnU-Net v2's export of fp16 logits: about one voxel in
    a thousand would otherwise land one fp16 step away).
    """
    new_shape = tuple(int(s) for s in new_shape)
    if arr.ndim < 2 or len(new_shape) != arr.ndim or min(new_shape) < 1 or min(arr.shape) < 1:
        raise ValueError(f"new shape {new_shape} does not fit an array of shape {arr.shape} (2-D or more)")
    if order not in (1, 3) or slab < 1 or margin < 0 or order0 not in (None, 0, 1):
        raise ValueError(f"resize_slabs needs order 1 or 3, slab >= 1, margin >= 0, order0 None, 0 or 1 "
                         f"(got {order}, {slab}, {margin}, {order0})")
    if joint:
        if order != 1:
            raise ValueError(f"resize_slabs(joint=True) needs order 1, got {order}")
        yield from _joint_slabs(arr, new_shape, slab, dtype, clip, order0)
        return
    passes = _pass_order(arr.shape, new_shape, range(arr.ndim))
    pre, post = passes[:passes.index(0)], passes[passes.index(0) + 1:]
    separate = order0 is not None
    if separate:
        pre, post = [a for a in passes if a != 0], []
    lo = hi = None
    if clip and not separate:
        lo, hi = arr.min(keepdims=True), arr.max(keepdims=True)

    def inplane(block: np.ndarray, axes, clip_rows: bool = separate and clip) -> np.ndarray:
        src = block
        for a in axes:
            block = resize_axis(block, a, new_shape[a], order, dtype)
        if clip_rows and axes:
            rest = tuple(range(1, src.ndim))
            block = block.astype(dtype, copy=np.may_share_memory(block, arr))
            np.clip(block, src.min(axis=rest, keepdims=True), src.max(axis=rest, keepdims=True), out=block)
        return block

    def finish(block: np.ndarray) -> np.ndarray:
        block = block.astype(dtype, copy=np.may_share_memory(block, arr))
        if lo is not None:
            np.clip(block, lo, hi, out=block)
        return block

    n_in, n_out = arr.shape[0], new_shape[0]
    if n_in == n_out:
        for k0 in range(0, n_out, slab):
            sl = slice(k0, min(k0 + slab, n_out))
            yield sl, finish(inplane(arr[sl], pre + post))
        return
    order_0 = order0 if separate else order
    idx, w = axis_taps(n_in, n_out, order_0)
    if order_0 == 0:  # mode nearest (the coordinates never leave the line; clamp to be safe)
        idx = np.clip(idx, 0, n_in - 1)
    npad, n_rows = (_NPAD, n_in + 2 * _NPAD) if order_0 == 3 else (0, n_in)
    if order_0 != 3:
        margin = 0
    chunks: list[tuple[int, np.ndarray]] = []  # (first input row, those rows pre-passed): rolling window
    done = 0  # input rows pre-passed so far
    for k0 in range(0, n_out, slab):
        sl = slice(k0, min(k0 + slab, n_out))
        taps = idx[:, sl]
        w0, w1 = max(int(taps.min()) - margin, 0), min(int(taps.max()) + 1 + margin, n_rows)
        rows = np.clip(np.arange(w0, w1) - npad, 0, n_in - 1)  # window rows → input rows (edge padding)
        if pre:
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            chunks = [(a, c) for a, c in chunks if a + len(c) > r0]
            for a in range(max(done, r0), r1, _CHUNK_ROWS):  # small chunks: little retained beyond r0
                chunks.append((a, inplane(arr[a:min(a + _CHUNK_ROWS, r1)], pre)))
            done = max(done, r1)
            src = chunks
        else:
            src = [(0, arr)]
        # no name holds the block while suspended: once the caller drops it, it is freed
        yield sl, finish(inplane(_axis0_block(src, rows, taps - w0, w[:, sl], order_0, dtype), post,
                                 clip_rows=False))
        del src


def _joint_linear(src: np.ndarray, taps: list, dtype) -> np.ndarray:
    """Order-1 interpolation of ``src`` with per-axis taps (``None``: axis kept), as scipy evaluates it:
    each corner's value times its weights in axis order, the corners added one by one in C order."""
    acc = None
    for part in _corners(src, taps, dtype, 0):
        if acc is None:
            acc = part
        else:
            acc += part
    return src.astype(dtype) if acc is None or acc is src else acc  # kept axes only: a copy


def _corners(src: np.ndarray, taps: list, dtype, axis: int) -> Iterator[np.ndarray]:
    """The corner terms of :func:`_joint_linear` (value · w_axis0 · w_axis1 ...), in C order."""
    while axis < src.ndim and taps[axis] is None:
        axis += 1
    if axis == src.ndim:
        yield src
        return
    idx, w = taps[axis]
    bshape = [1] * src.ndim
    bshape[axis] = idx.shape[1]
    for t in range(2):
        part = np.take(src, idx[t], axis=axis).astype(dtype, copy=False)
        part *= w[t].astype(dtype).reshape(bshape)
        yield from _corners(part, taps, dtype, axis + 1)
        part = None


def _joint_slabs(arr: np.ndarray, new_shape, slab: int, dtype, clip: bool,
                 order0: int | None) -> Iterator[tuple[slice, np.ndarray]]:
    """:func:`resize_slabs` with ``joint=True`` (order 1): see there."""
    taps = [None if n == m else axis_taps(n, m, 1) for n, m in zip(arr.shape, new_shape, strict=True)]
    n_in, n_out = arr.shape[0], new_shape[0]
    lo = hi = None
    if clip and order0 is None:
        lo, hi = arr.min(keepdims=True), arr.max(keepdims=True)
    if order0 is not None:  # in-plane per row (clipped per row), then axis 0 with order0
        t0 = None if n_in == n_out else axis_taps(n_in, n_out, order0)
        if t0 is not None and order0 == 0:
            t0 = (np.clip(t0[0], 0, n_in - 1), t0[1])
    else:
        t0 = taps[0]
    for k0 in range(0, n_out, slab):
        sl = slice(k0, min(k0 + slab, n_out))
        if t0 is None:
            rows, local = arr[sl], None
        else:
            idx = t0[0][:, sl]
            r0 = int(idx.min())
            rows, local = arr[r0:int(idx.max()) + 1], (idx - r0, t0[1][:, sl])
        if order0 is None:
            block = _joint_linear(rows, [local, *taps[1:]], dtype)
        else:
            block = _joint_linear(rows, [None, *taps[1:]], dtype)
            if clip and any(t is not None for t in taps[1:]):
                rest = tuple(range(1, rows.ndim))
                np.clip(block, rows.min(axis=rest, keepdims=True), rows.max(axis=rest, keepdims=True),
                        out=block)
            if local is not None:
                block = _gather(block, 0, local[0], local[1], dtype)
        if lo is not None:
            np.clip(block, lo, hi, out=block)
        yield sl, block


def _axis0_block(src: list[tuple[int, np.ndarray]], rows: np.ndarray, taps: np.ndarray, w: np.ndarray,
                 order: int, dtype) -> np.ndarray:
    """Axis-0 pass of one slab: gather the window ``rows`` from the row chunks ``src`` (first row, rows),
    prefilter (order 3) and interpolate with ``taps`` / ``w``, a column block of a few MB at a time."""
    first = src[-1][1]
    plane = first.shape[1:]
    block = np.empty((taps.shape[1], *plane), dtype)
    step = max(1, _WINDOW_BYTES // (len(rows) * int(np.prod(plane[1:])) * first.itemsize))
    for y0 in range(0, plane[0], step):
        ys = slice(y0, y0 + step)
        window = np.empty((len(rows), *first[:0, ys].shape[1:]), first.dtype)
        for a, c in src:  # rows ascend: each chunk fills one contiguous run of the window
            i0, i1 = np.searchsorted(rows, [a, a + len(c)])
            np.take(c[:, ys], rows[i0:i1] - a, axis=0, out=window[i0:i1], mode="clip")
        if order == 3:  # in place when the dtype allows: scipy filters line by line through a buffer
            window = ndi.spline_filter1d(window, 3, axis=0, mode="nearest",
                                         output=window if window.dtype == dtype else dtype)
        block[:, ys] = _gather(window, 0, taps, w, dtype)
    return block


def slab_window_rows(n_in: int, n_out: int, slab: int, order: int = 3) -> int:
    """About how many (pre-passed) input rows one :func:`resize_slabs` stream holds at a time."""
    if n_in == n_out:
        return 0
    return min(int(np.ceil(slab * n_in / n_out)) + 4 + (2 * _MARGIN if order == 3 else 0), n_in)


def _workers(n: int, workers: int | None) -> int:
    return max(1, min(n, workers if workers is not None else (os.cpu_count() or 1)))


def resample_image(image: np.ndarray, new_shape, anisotropic: bool, workers: int | None = 1,
                   dtype=np.float64) -> np.ndarray:
    """(C, Z, Y, X) float image → (C, *new_shape) float32, per channel.

    Regular: cubic spline on all axes, clipped to the channel's input range. Anisotropic: cubic in-plane
    per slice (clipped per slice), then nearest along Z (mode constant), as the reference does.
    ``dtype``: working precision. float64 (default) reproduces skimage to ~5e-8 and, importantly, the same
    set of exactly-zero voxels (the spline tails next to a zero background are ~1e-40 and decide which
    voxels the MRI z-score counts as non-zero); float32 is ~2x faster, ~2e-7 relative, but its denormal
    rounding flips ~0.2% of those near-zero voxels.
    ``workers`` > 1 runs channels in threads (scipy and numpy release the GIL); None = all cores.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if image.ndim != 4 or len(new_shape) != 3:
        raise ValueError(f"expected a (C, Z, Y, X) image and a 3-D shape, got {image.shape} -> {new_shape}")
    out = np.empty((image.shape[0], *new_shape), np.float32)

    def one(c: int) -> None:
        x = image[c]
        if anisotropic:
            x = resize(x, (x.shape[0], *new_shape[1:]), 3, axes=(1, 2), dtype=dtype)
            out[c] = resize_axis(x, 0, new_shape[0], 0, dtype=dtype)
        else:
            out[c] = resize(x, new_shape, 3, dtype=dtype)

    n = _workers(image.shape[0], workers)
    if n == 1:
        for c in range(image.shape[0]):
            one(c)
    else:
        with ThreadPoolExecutor(n) as ex:
            list(ex.map(one, range(image.shape[0])))
    return out


def _class_block(mask: np.ndarray, new_shape, axes) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Linear (order 1) resampling of a binary mask, computed only over the output block its taps reach."""
    others = [tuple(b for b in range(mask.ndim) if b != a) for a in range(mask.ndim)]
    nz = [np.flatnonzero(mask.any(axis=o)) for o in others]
    if any(len(v) == 0 for v in nz):
        return None
    out_sl, in_sl, taps = [], [], []
    for a in range(mask.ndim):
        n_in, n_out = mask.shape[a], new_shape[a]
        if a not in axes or n_in == n_out:
            lo, hi = nz[a][0], nz[a][-1] + 1
            out_sl.append(slice(lo, hi))
            in_sl.append(slice(lo, hi))
            taps.append(None)
            continue
        idx, w = axis_taps(n_in, n_out, 1)
        hit = ((idx >= nz[a][0]) & (idx <= nz[a][-1])).any(axis=0)
        ks = np.flatnonzero(hit)
        k0, k1 = ks[0], ks[-1] + 1
        i0, i1 = idx[:, k0:k1].min(), idx[:, k0:k1].max() + 1
        out_sl.append(slice(k0, k1))
        in_sl.append(slice(i0, i1))
        taps.append((idx[:, k0:k1] - i0, w[:, k0:k1]))
    block = mask[tuple(in_sl)].astype(np.float64)
    for a in sorted(range(mask.ndim), key=lambda a: (out_sl[a].stop - out_sl[a].start) / block.shape[a]):
        if taps[a] is not None:
            block = _gather(block, a, taps[a][0], taps[a][1], np.float64)
    return tuple(out_sl), block


def _resample_label_linear(lab: np.ndarray, new_shape, axes) -> np.ndarray:
    """Per class c = 1..max: one-hot, linear, >= 0.5 → c; later classes win (classes absent: skipped)."""
    out = np.zeros(new_shape, np.uint8)
    present = np.flatnonzero(np.bincount(lab.ravel(), minlength=1))  # uint8: faster than np.unique's sort
    for c in present[present > 0]:
        res = _class_block(lab == c, new_shape, axes)
        if res is not None:
            sl, val = res
            out[sl][val >= 0.5] = c
    return out


def resample_label(label: np.ndarray, new_shape, anisotropic: bool) -> np.ndarray:
    """(1, Z, Y, X) uint8 label → (1, *new_shape) uint8 with the reference's per-class rule.

    Anisotropic: the per-class linear rule per slice in-plane, then nearest along Z. Since the in-plane
    result assigns one class per voxel, the reference's per-class nearest Z pass equals one gather.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if label.ndim != 4 or label.shape[0] != 1 or len(new_shape) != 3:
        raise ValueError(f"expected a (1, Z, Y, X) label and a 3-D shape, got {label.shape} -> {new_shape}")
    lab = label[0]
    if anisotropic:
        inplane = _resample_label_linear(lab, (lab.shape[0], *new_shape[1:]), axes=(1, 2))
        out = resize_axis(inplane, 0, new_shape[0], 0, dtype=np.uint8)
    else:
        out = _resample_label_linear(lab, new_shape, axes=(0, 1, 2))
    return out[None]

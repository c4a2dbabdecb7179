"""Per-case preprocessing (docs/reference.md §5, steps 2-6) and its inverse for predictions
(docs/reference.md §8).

Arrays come in as loaded by :mod:`nnunet_jax.io`: image float32 (C, Z, Y, X), label uint8 (1, Z, Y, X),
spacing (Z, Y, X) in mm. Steps, in the reference's order: crop to the non-zero box → resample to the target
spacing (3D only) → CT clip / normalise → training mode: pad to the patch (2D: pad, then centre-crop H, W).
Every shape change is recorded in a :class:`CaseMeta`, so :func:`restore_to_source` can put a prediction
back into the source geometry.

2D (what the reference does): no resampling and no Z padding; in training mode H and W are zero-padded to
at least the 2D patch, then centre-cropped to exactly the patch (start ``(size - patch) // 2``). So 2D
training volumes are exactly patch-sized in-plane and lose their borders when larger than the patch; the
record keeps this as negative padding (cropped voxels), which :func:`undo_padding` turns back into fill.
In test mode nothing is padded or cropped, in 2D and in 3D.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np

from nnunet_jax.atomic import save_npy
from nnunet_jax.io import DatasetError
from nnunet_jax.plan import ANISOTROPY_RATIO
from nnunet_jax.preprocessing.resample import resample_image, resample_label, resize_slabs, slab_window_rows

__all__ = [
    "CaseMeta", "crop_to_nonzero", "is_anisotropic", "target_shape", "needs_resampling", "resampled_shape",
    "checked_resampled_shape", "resample_image", "resample_label", "normalize", "pad_amounts", "pad_to_patch",
    "center_crop_2d", "preprocess_case", "undo_padding", "restore_to_source", "restore_label_map",
]

_META_DTYPE = np.dtype([
    ("version", "<i4"),
    ("crop_box", "<i8", (3, 2)),
    ("original_shape", "<i8", (3,)),
    ("cropped_shape", "<i8", (3,)),
    ("resampled_shape", "<i8", (3,)),
    ("source_spacing", "<f8", (3,)),
    ("target_spacing", "<f8", (3,)),
    ("affine", "<f8", (4, 4)),
    ("padding", "<i8", (3, 2)),
])
_META_VERSION = 1


@dataclass
class CaseMeta:
    """Geometry of one preprocessed case: enough to map a prediction back onto the source image.

    ``crop_box`` rows are (start, end) per axis Z, Y, X, end exclusive. ``padding`` rows are (before, after)
    voxels added per axis in training mode; negative = voxels removed by the 2D centre crop.
    ``target_spacing`` is the spacing of the preprocessed voxels (2D: the source spacing, not resampled).
    """

    crop_box: np.ndarray
    original_shape: tuple[int, int, int]
    cropped_shape: tuple[int, int, int]
    resampled_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    target_spacing: tuple[float, float, float]
    affine: np.ndarray
    padding: np.ndarray

    def __post_init__(self) -> None:
        self.crop_box = np.asarray(self.crop_box, np.int64).reshape(3, 2)
        self.padding = np.asarray(self.padding, np.int64).reshape(3, 2)
        self.affine = np.asarray(self.affine, np.float64).reshape(4, 4)
        for name in ("original_shape", "cropped_shape", "resampled_shape"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("source_spacing", "target_spacing"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))

    @property
    def final_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the saved ``<case>_x.npy`` (after padding / 2D centre crop)."""
        return tuple(int(s + p.sum()) for s, p in zip(self.resampled_shape, self.padding, strict=True))

    def to_record(self) -> np.ndarray:
        rec = np.zeros((), _META_DTYPE)
        rec["version"] = _META_VERSION
        for f in fields(self):
            rec[f.name] = getattr(self, f.name)
        return rec

    @classmethod
    def from_record(cls, rec: np.ndarray, where: str = "record") -> CaseMeta:
        names = set(rec.dtype.names or ())
        missing = [f.name for f in fields(cls) if f.name not in names]
        if missing or rec.size != 1:
            raise ValueError(f"{where}: not a case meta record (missing fields {missing}, size {rec.size})")
        rec = rec.reshape(())
        return cls(**{f.name: np.array(rec[f.name]) for f in fields(cls)})

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` atomically (temp file in the same folder, then rename); no pickle."""
        save_npy(self.to_record(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CaseMeta:
        try:
            rec = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read case meta ({e})") from e
        return cls.from_record(rec, where=str(path))


# ---------------------------------------------------------------------------------------------- steps 2-5


def _check_image(image: np.ndarray, case: str) -> None:
    if image.ndim != 4 or min(image.shape) < 1:
        raise ValueError(f"case {case!r}: image must be (C, Z, Y, X), got shape {image.shape}")


def _check_label(label: np.ndarray | None, image: np.ndarray, case: str) -> None:
    if label is not None and (label.ndim != 4 or label.shape[0] != 1 or label.shape[1:] != image.shape[1:]):
        raise ValueError(f"case {case!r}: label shape {label.shape} does not match image {image.shape}")


def nonzero_box(image: np.ndarray) -> np.ndarray:
    """(3, 2) [start, end) of voxels where any channel > 0; the full volume when there are none."""
    mask = image[0] > 0
    tmp = np.empty_like(mask)
    for c in range(1, image.shape[0]):
        np.greater(image[c], 0, out=tmp)
        mask |= tmp
    inplane = mask.any(axis=0)
    proj = [mask.any(axis=(1, 2)), inplane.any(axis=1), inplane.any(axis=0)]
    if not proj[0].any():
        return np.array([[0, s] for s in image.shape[1:]], np.int64)
    box = []
    for p in proj:
        nz = np.flatnonzero(p)
        box.append((nz[0], nz[-1] + 1))
    return np.array(box, np.int64)


def crop_to_nonzero(image: np.ndarray, label: np.ndarray | None = None, case: str = "?"):
    """Crop image (and label) to the non-zero box → (image view, label view or None, box (3, 2))."""
    _check_image(image, case)
    _check_label(label, image, case)
    box = nonzero_box(image)
    sl = (slice(None),) + tuple(slice(int(a), int(b)) for a, b in box)
    return image[sl], (None if label is None else label[sl]), box


def is_anisotropic(spacing, target) -> bool:
    """The reference's rule: max/min spacing ≥ ANISOTROPY_RATIO (3) for the source or the target spacing."""
    ratios = [float(np.max(s) / np.min(s)) for s in (np.asarray(spacing, float), np.asarray(target, float))]
    return max(ratios) >= ANISOTROPY_RATIO


def target_shape(shape, spacing, target) -> tuple[int, ...]:
    """new_shape = int(spacing / target · shape) (truncation, as the reference); unchecked, may hold zeros."""
    ratio = np.asarray(spacing, np.float64) / np.asarray(target, np.float64)
    return tuple(int(v) for v in (ratio * np.asarray(shape)).astype(int))


def needs_resampling(spacing, target) -> bool:
    """True when the spacings differ beyond float32 precision of NIfTI pixdim (the reference compares ==,
    which resamples e.g. float32(0.7676) onto 0.7676 and can truncate a voxel away)."""
    return not np.allclose(np.asarray(spacing, float), np.asarray(target, float), rtol=1e-6, atol=0)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """The 3D shape preprocessing resamples ``shape`` to: :func:`target_shape`, or ``shape`` itself when the
    spacings agree (:func:`needs_resampling`); unchecked, so planning can compare candidate targets."""
    if not needs_resampling(spacing, target):
        return [int(s) for s in shape]
    return list(target_shape(shape, spacing, target))


def checked_resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float],
                            case: str) -> list[int]:
    """:func:`resampled_shape`, or a DatasetError naming the case when an axis would resample to nothing:
    the one check planning (before any case is written) and preprocessing (each case) share."""
    new = resampled_shape(shape, spacing, target)
    if min(new) < 1:
        raise DatasetError(f"case {case!r}: resampling its shape {[int(s) for s in shape]} at "
                           f"{[float(s) for s in spacing]} mm to {[float(t) for t in target]} mm gives an "
                           f"empty shape {new}")
    return new


def _slice_sum(o: np.ndarray, square: bool = False) -> float:
    """Σ o (or Σ o²) in float64, one slice at a time through a reused contiguous buffer: no full-size
    temporary, and the same rounding whatever o's memory layout (padded or not → identical outputs)."""
    slices = o if o.ndim > 1 else o[None]
    buf = np.empty(slices.shape[1:], np.float32)
    total = 0.0
    for sl in slices:
        np.square(sl, out=buf) if square else np.copyto(buf, sl)
        total += float(buf.sum(dtype=np.float64))
    return total


def _zscore_nonzero(x: np.ndarray, o: np.ndarray) -> None:
    """o = (x - mean) / std over x != 0, 0 elsewhere. Copies x into o first and then works in place on
    that contiguous-row buffer: no full-size float temporaries (each is a fresh mmap whose page faults
    cost as much as the arithmetic) and no slow strided passes over the cropped view."""
    np.copyto(o, x)
    zero = o == 0
    n = zero.size - np.count_nonzero(zero)
    if n == 0:
        return
    mean = np.float32(_slice_sum(o) / n)  # zeros add nothing to the sum
    o -= mean
    np.copyto(o, 0, where=zero)
    std = np.sqrt(_slice_sum(o, square=True) / n)  # two-pass variance: no cancellation when mean >> std
    o /= np.float32(std if std > 0 else 1.0)


def normalize(image: np.ndarray, scheme: str, ct_stats=None, out: np.ndarray | None = None,
              workers: int | None = 1) -> np.ndarray:
    """CT: clip to [min, max] then (x − mean) / std with dataset stats (min, max, mean, std).
    MRI / other: per-channel z-score over voxels ≠ 0 only; zeros stay 0 (MONAI NormalizeIntensity with
    nonzero=True, channel_wise=True: std 0 → 1, no non-zero voxel → unchanged). Returns float32.
    ``workers`` > 1 normalises channels in threads (numpy releases the GIL); None = all cores."""
    out = np.empty(image.shape, np.float32) if out is None else out
    if scheme.upper() == "CT":
        if ct_stats is None or len(ct_stats) != 4:
            raise ValueError(f"CT normalisation needs ct_stats (min, max, mean, std), got {ct_stats}")
        lo, hi, mean, std = (np.float32(v) for v in ct_stats)
        np.clip(image, lo, hi, out=out)
        out -= mean
        out /= std
        return out
    n = max(1, min(image.shape[0], workers if workers is not None else (os.cpu_count() or 1)))
    if n == 1:
        for c in range(image.shape[0]):
            _zscore_nonzero(image[c], out[c])
    else:
        with ThreadPoolExecutor(n) as ex:
            list(ex.map(lambda c: _zscore_nonzero(image[c], out[c]), range(image.shape[0])))
    return out


def pad_amounts(shape, patch) -> np.ndarray:
    """(n, 2) zero padding (floor before, ceil after) to reach at least ``patch`` per axis."""
    extra = np.maximum(np.asarray(patch) - np.asarray(shape), 0)
    return np.stack([extra // 2, extra - extra // 2], axis=1).astype(np.int64)


def pad_to_patch(image: np.ndarray, label: np.ndarray | None, patch):
    """Zero-pad (C, Z, Y, X) arrays to at least ``patch`` (Z, Y, X); a 2-D patch (Y, X) leaves Z alone.
    Returns (image, label or None, padding (3, 2))."""
    patch = tuple(patch)
    if len(patch) == 2:
        patch = (image.shape[1], *patch)
    pads = pad_amounts(image.shape[1:], patch)
    if not pads.any():
        return image, label, pads
    width = [(0, 0), *map(tuple, pads)]
    return (np.pad(image, width), None if label is None else np.pad(label, width), pads)


def center_crop_2d(image: np.ndarray, label: np.ndarray | None, patch_2d):
    """Centre-crop H, W of (C, Z, H, W) arrays to ``patch_2d`` (start (size − patch) // 2), as the
    reference does for 2D training data after padding. Returns (image, label, removed (3, 2) ≥ 0)."""
    removed = np.zeros((3, 2), np.int64)
    sl = [slice(None), slice(None)]
    for a, p in enumerate(patch_2d, start=1):
        size = image.shape[a + 1]
        start = max((size - int(p)) // 2, 0)
        stop = min(start + int(p), size)
        removed[a] = (start, size - stop)
        sl.append(slice(start, stop))
    sl = tuple(sl)
    return image[sl], (None if label is None else label[sl]), removed


def preprocess_case(
    image: np.ndarray,
    label: np.ndarray | None,
    spacing,
    *,
    target_spacing,
    patch_size,
    dim: int = 3,
    normalization: str = "MRI",
    ct_stats=None,
    mode: str = "training",
    affine: np.ndarray | None = None,
    case: str = "?",
    workers: int | None = 1,
) -> tuple[np.ndarray, np.ndarray | None, CaseMeta]:
    """Steps 2-5 of docs/reference.md §5 for one case → (x float32 (C, Z, Y, X), y uint8 (1, Z, Y, X) or None,
    meta). Keyword arguments are the plan.json fields (``spacing`` → target_spacing, ``patch_size``, ``dim``,
    ``normalization``, ``ct_stats``); ``mode`` is "training" (pad / 2D crop) or "test". ``workers``: threads
    over channels for resampling and normalisation (None = all cores); 1 by default because dataset
    drivers usually run cases in parallel processes already."""
    if mode not in ("training", "test"):
        raise ValueError(f"case {case!r}: mode must be 'training' or 'test', got {mode!r}")
    if dim not in (2, 3):
        raise ValueError(f"case {case!r}: dim must be 2 or 3, got {dim}")
    _check_image(image, case)
    _check_label(label, image, case)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"case {case!r}: spacing must be 3 positive numbers (Z, Y, X), got {spacing}")
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != dim:
        raise ValueError(f"case {case!r}: a {dim}D patch needs {dim} sizes, got {patch_size}")
    original_shape = image.shape[1:]
    image, label, box = crop_to_nonzero(image, label, case)
    cropped_shape = image.shape[1:]

    out_spacing = spacing
    if dim == 3:
        target = tuple(float(s) for s in target_spacing)
        if len(target) != 3:
            raise ValueError(f"case {case!r}: 3D target spacing needs 3 values, got {target}")
        new_shape = checked_resampled_shape(cropped_shape, spacing, target, case)
        if needs_resampling(spacing, target):
            aniso = is_anisotropic(spacing, target)
            image = resample_image(image, new_shape, aniso, workers=workers)
            if label is not None:
                label = resample_label(label, new_shape, aniso)
        out_spacing = target
    resampled_shape = image.shape[1:]

    padding = np.zeros((3, 2), np.int64)
    if mode == "training":
        padding = pad_amounts(resampled_shape, patch_size if dim == 3 else (resampled_shape[0], *patch_size))
    final_shape = tuple(int(s + p.sum()) for s, p in zip(resampled_shape, padding, strict=True))
    # Normalise straight into the padded output: no second full-size copy for the padding.
    x = np.zeros((image.shape[0], *final_shape), np.float32)
    interior = (slice(None),) + tuple(slice(int(b), int(b + s)) for (b, _), s in zip(padding, resampled_shape,
                                                                                    strict=True))
    normalize(image, normalization, ct_stats, out=x[interior], workers=workers)
    y = None
    if label is not None:
        y = np.zeros((1, *final_shape), np.uint8)
        y[interior] = label
    if dim == 2 and mode == "training":
        x, y, removed = center_crop_2d(x, y, patch_size)
        padding = padding - removed
        x = np.ascontiguousarray(x)
        y = None if y is None else np.ascontiguousarray(y)

    meta = CaseMeta(
        crop_box=box, original_shape=original_shape, cropped_shape=cropped_shape,
        resampled_shape=resampled_shape, source_spacing=spacing, target_spacing=out_spacing,
        affine=np.eye(4) if affine is None else affine, padding=padding,
    )
    return x, y, meta


# ------------------------------------------------------------------------------------------ the inverse


def _outside_fill(n_channels: int, kind: str) -> np.ndarray:
    """Per-channel value meaning "background" outside the crop box: one-hot for probabilities; for logits
    0 for background and -1e4 for the others (softmax gives exactly one-hot background)."""
    if kind not in ("probs", "logits"):
        raise ValueError(f"kind must be 'probs' or 'logits', got {kind!r}")
    fill = np.full(n_channels, 0.0 if kind == "probs" else -1e4, np.float32)
    fill[0] = 1.0 if kind == "probs" else 0.0
    return fill


def undo_padding(arr: np.ndarray, padding, fill=0.0) -> np.ndarray:
    """Remove the training-mode padding of (K, Z, Y, X) ``arr``; negative padding (2D centre crop) is
    re-added as ``fill`` (scalar or per channel (K,))."""
    padding = np.asarray(padding, np.int64).reshape(3, 2)
    sl = (slice(None),) + tuple(slice(max(b, 0), s - max(a, 0)) for (b, a), s in zip(padding, arr.shape[1:],
                                                                                   strict=True))
    arr = arr[sl]
    grow = np.maximum(-padding, 0)
    if not grow.any():
        return arr
    fill = np.broadcast_to(np.asarray(fill, arr.dtype), (arr.shape[0],))
    shape = tuple(int(s + g.sum()) for s, g in zip(arr.shape[1:], grow, strict=True))
    out = np.empty((arr.shape[0], *shape), arr.dtype)
    out[...] = fill.reshape(-1, 1, 1, 1)
    out[(slice(None),) + tuple(slice(int(b), int(b) + s) for (b, _), s in zip(grow, arr.shape[1:],
                                                                             strict=True))] = arr
    return out


# Output rows per streamed slab when mapping back to the source: with a 512×512 plane that is 32 MB per
# float32 slab; the rolling window behind it holds ~50 more (pre-resampled) rows per channel.
RESTORE_SLAB_ROWS = 32


def _unpadded(pred: np.ndarray, meta: CaseMeta, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(prediction without the training padding, per-channel background fill), with shape checks."""
    if pred.ndim != 4:
        raise ValueError(f"prediction must be (K, Z, Y, X), got shape {pred.shape}")
    fill = _outside_fill(pred.shape[0], kind)
    if tuple(pred.shape[1:]) != meta.final_shape:
        raise ValueError(f"prediction spatial shape {pred.shape[1:]} != preprocessed {meta.final_shape}")
    pred = undo_padding(pred, meta.padding, fill)
    if tuple(pred.shape[1:]) != meta.resampled_shape:
        raise ValueError(f"after removing padding {pred.shape[1:]} != resampled shape {meta.resampled_shape}")
    return pred, fill


def _channel_slabs(ch: np.ndarray, shape, slab: int) -> Iterator[tuple[slice, np.ndarray]]:
    """(Z slice, float32 block) of one channel at the cropped pre-resampling ``shape``, slab by slab:
    cubic resize (skimage order 3, edge, clipped to the channel's range) without full-size temporaries."""
    if ch.shape == tuple(shape):
        for z0 in range(0, shape[0], slab):
            sl = slice(z0, min(z0 + slab, shape[0]))
            yield sl, ch[sl]
        return
    yield from resize_slabs(ch, shape, 3, slab=slab, dtype=np.float32)


def restore_to_source(pred: np.ndarray, meta: CaseMeta, kind: str = "probs", softmax: bool = False,
                      slab: int = RESTORE_SLAB_ROWS) -> np.ndarray:
    """Prediction (K, z, y, x) at the preprocessed geometry → (K, *original_shape) float32 at the source.

    Per channel and per slab of ``slab`` source Z rows (peak memory ≈ output + a few slabs): remove
    padding, cubic resize (skimage order 3, edge, clipped per channel) to the cropped pre-resampling
    shape, paste at the crop box; outside it, background (see ``kind``). ``softmax``: apply softmax over
    channels afterwards (for logits, as the reference does), also slab by slab."""
    pred, fill = _unpadded(pred, meta, kind)
    out = np.empty((pred.shape[0], *meta.original_shape), np.float32)
    box = tuple(slice(int(a), int(b)) for a, b in meta.crop_box)
    for c in range(pred.shape[0]):
        out[c] = fill[c]
        inside = out[c][box]
        for sl, block in _channel_slabs(pred[c], meta.cropped_shape, slab):
            inside[sl] = block
            block = None  # freed before the next one is computed
    if softmax:
        for z0 in range(0, out.shape[1], slab):
            part = out[:, z0:z0 + slab]
            part -= part.max(axis=0, keepdims=True)
            np.exp(part, out=part)
            part /= part.sum(axis=0, keepdims=True)
    return out


def restore_label_map(pred: np.ndarray, meta: CaseMeta, kind: str = "probs",
                      slab: int = RESTORE_SLAB_ROWS) -> np.ndarray:
    """Argmax label map (uint8, original_shape) of :func:`restore_to_source` (first channel wins ties),
    streamed: the K class maps never exist at the source resolution.

    Few channels: all channels advance slab by slab together, so only one slab's running max exists
    (memory ≈ labels + K rolling windows of ~``slab`` + 50 rows). Many channels: one channel after the
    other against a running max of the cropped volume (float32), whichever needs less memory."""
    pred, _ = _unpadded(pred, meta, kind)
    window = slab_window_rows(pred.shape[1], meta.cropped_shape[0], slab)  # rows held per channel
    return _label_map(pred, meta, slab, together=pred.shape[0] * window <= meta.cropped_shape[0])


def _label_map(pred: np.ndarray, meta: CaseMeta, slab: int, together: bool) -> np.ndarray:
    """restore_label_map of an unpadded prediction; ``together``: slab-outer (else channel-outer) loop."""
    n, shape = pred.shape[0], meta.cropped_shape
    if n > 256:
        raise ValueError(f"a uint8 label map holds at most 256 classes, got {n} channels")
    out = np.zeros(meta.original_shape, np.uint8)
    labels = out[tuple(slice(int(a), int(b)) for a, b in meta.crop_box)]
    streams = [_channel_slabs(pred[c], shape, slab) for c in range(n)]
    n_slabs = -(-shape[0] // slab)
    full = None if together else np.empty(shape, np.float32)  # channel-outer: running max of the volume
    order = ([c for _ in range(n_slabs) for c in range(n)] if together
             else [c for c in range(n) for _ in range(n_slabs)])
    best = None
    for c in order:
        sl, ch = next(streams[c])
        if c == 0 and together:  # a new slab and its own running max (a copy unless ch is already ours)
            best = ch.astype(np.float32, copy=np.may_share_memory(ch, pred))
        elif c == 0:
            full[sl] = ch
        else:
            run = best if together else full[sl]
            better = np.greater(ch, run)
            labels[sl][better] = c
            np.maximum(run, ch, out=run)
            better = None
        ch = None  # freed before the next block is computed
    return out

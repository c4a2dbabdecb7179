"""DALI pipelines: the training pipeline (docs/reference.md §6): foreground-biased crops and augmentations.

All pipelines read the on-disk ``(C, Z, Y, X)`` arrays with ``fn.readers.numpy`` from an explicit file list
(the caller decides the order, which is what makes epochs reproducible and resumable, see ``loader.py``)
and emit channels-last samples: 3D ``(*patch, C)`` float32 images and ``(*patch, 1)`` uint8 labels.

Where the work runs: the reader, the foreground-biased crop (``random_object_bbox`` etc. are CPU-only) and
the slice run on the CPU; with ``device_id`` set (a GPU) the sample is moved to the GPU right after the
crop and every augmentation runs there; with ``device_id=None`` everything runs on the CPU. The same
graph is built either way.

2D (``data2d_dim`` 3 in the reference, the only layout we support): the 2D preprocessed cases are 3D volumes
whose Y, X are already the 2D patch (docs/reference.md §5). A DALI sample is a block of ``block`` contiguous
slices cropped from one volume, laid out ``FHWC`` (F = frames) so that zoom, flips and blur act in-plane on
each slice with the parameters drawn once per block, as in the reference; the loader reshapes ``nvol`` blocks
into ``nvol * block`` 2D samples. Neighbour slices are *not* stacked as channels (the model's input channels
are the modalities).

Each augmentation is a per-sample coin (DALI conditionals, so the ~85 % of samples that skip an expensive
step such as blur or zoom do not pay for it). Probabilities and ranges live in :class:`AugmentConfig`;
a probability of 0 removes the step from the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_jax.data.layout import channels_last_perm


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of docs/reference.md §6 (reference defaults)."""

    oversampling: float = 0.33  # probability that a crop is forced to contain a foreground voxel
    zoom_prob: float = 0.15
    zoom_range: tuple[float, float] = (0.7, 1.0)
    flip_prob: float = 0.5  # per spatial axis
    noise_prob: float = 0.15
    noise_std: tuple[float, float] = (0.0, 0.33)
    blur_prob: float = 0.15
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    brightness_prob: float = 0.15
    brightness_range: tuple[float, float] = (0.7, 1.3)
    contrast_prob: float = 0.15
    contrast_range: tuple[float, float] = (0.65, 1.5)

    PROBS = ("zoom_prob", "flip_prob", "noise_prob", "blur_prob", "brightness_prob", "contrast_prob")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "oversampling" or f.name.endswith("_prob"):
                if not 0.0 <= v <= 1.0:
                    raise ValueError(f"AugmentConfig.{f.name} = {v} is not a probability")
            elif len(v) != 2 or v[0] > v[1]:
                raise ValueError(f"AugmentConfig.{f.name} = {v} is not a (low, high) range")

    @classmethod
    def none(cls, oversampling: float = 0.0) -> AugmentConfig:
        """No augmentation at all (uniform crops unless ``oversampling`` says otherwise)."""
        return cls(oversampling=oversampling, **{p: 0.0 for p in cls.PROBS})

    def only(self, *names: str) -> AugmentConfig:
        """This config with every augmentation probability except ``names`` (e.g. "blur_prob") set to 0."""
        unknown = set(names) - set(self.PROBS)
        if unknown:
            raise ValueError(f"unknown augmentations {sorted(unknown)}; choose from {self.PROBS}")
        return dataclasses.replace(self, **{p: 0.0 for p in self.PROBS if p not in names})


def _dali() -> Any:
    try:
        import nvidia.dali as dali
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "NVIDIA DALI is needed for the data pipelines: pip install 'nnunet-jax[dali-cuda12]' "
            "(or [dali] for CUDA 13)"
        ) from e
    return dali


def _files(paths: Sequence[str | Path]) -> list[str]:
    if len(paths) == 0:
        raise ValueError("a pipeline needs at least one file")
    return [str(p) for p in paths]


def _read(files: Sequence[str | Path], name: str) -> Any:
    from nvidia.dali import fn

    return fn.readers.numpy(files=_files(files), random_shuffle=False, name=name)


def _crop_at(img: Any, lbl: Any | None, anchor: Any, crop_shape: Sequence[int]) -> tuple[Any, Any]:
    """Spatial crop at ``anchor`` (int64, (Z, Y, X)) of ``(C, Z, Y, X)`` arrays; outside the volume = 0."""
    from nvidia.dali import fn, types

    shape = types.Constant(list(crop_shape), dtype=types.INT64)
    out = [
        fn.slice(a, anchor, shape, axes=[1, 2, 3], out_of_bounds_policy="pad", fill_values=0)
        if a is not None
        else None
        for a in (img, lbl)
    ]
    return out[0], out[1]


def _channels_last(x: Any, layout: str) -> Any:
    from nvidia.dali import fn

    return fn.transpose(x, perm=channels_last_perm(4), output_layout=layout)


def _biased_anchor(lbl: Any, crop_shape: Sequence[int], oversampling: float, ignore_label: int | None = None
                   ) -> Any:
    """Crop anchor: with p ``oversampling`` the window contains a voxel of a class drawn uniformly among
    the classes present (``random_object_bbox`` picks the class, ``random_mask_pixel`` a voxel of it);
    otherwise (or for a volume without foreground) a uniformly placed window inside the volume.

    With ``ignore_label`` (sparse annotation) the ignored voxels are no class to draw, and the other windows
    contain a random annotated voxel (any class, background included) instead of being uniform, so that no
    patch is all "ignore" (nnU-Net v2's sampling with an ignore label); a volume without annotated voxels
    falls back to uniform windows."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    mask = lbl[0]
    shape = fn.cast(mask.shape(), dtype=types.INT32)
    start = types.Constant([0, 0, 0], dtype=types.INT32)
    end = shape
    if ignore_label is not None:
        annotated = fn.cast(mask != ignore_label, dtype=types.UINT8)
        voxel = fn.cast(fn.segmentation.random_mask_pixel(annotated, foreground=1), dtype=types.INT32)
        some = fn.cast(fn.reductions.max(annotated) > 0, dtype=types.INT32)
        start = some * voxel
        end = some * (voxel + 1) + (1 - some) * shape
        mask = mask * annotated  # ignored voxels count as background for the class draw
    if oversampling > 0:
        _, _, cls = fn.segmentation.random_object_bbox(
            mask, format="start_end", foreground_prob=1.0, output_class=True
        )
        voxel = fn.cast(fn.segmentation.random_mask_pixel(mask, value=cls, foreground=1), dtype=types.INT32)
        coin = fn.random.coin_flip(probability=oversampling, dtype=types.BOOL)
        fg = fn.cast(coin & (cls > 0), dtype=types.INT32)  # no foreground in the volume -> the other window
        start = fg * voxel + (1 - fg) * start
        end = fg * (voxel + 1) + (1 - fg) * end
    # a volume smaller than the patch along an axis (2D blocks deeper than the volume): the window starts at 0
    # and the rest is zero-padded; otherwise it stays inside the volume
    bounds = dmath.max(shape, types.Constant(list(crop_shape), dtype=types.INT32))
    anchor = fn.roi_random_crop(crop_shape=list(crop_shape), roi_start=start, roi_end=end, in_shape=bounds)
    return fn.cast(anchor, dtype=types.INT64)


def _coin(p: float) -> Any:
    from nvidia.dali import fn, types

    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _augment(img: Any, lbl: Any, patch: Sequence[int], cfg: AugmentConfig, frames: bool) -> tuple[Any, Any]:
    """docs/reference.md §6 steps 2-7 on channels-last samples (``DHWC`` 3D, or ``FHWC`` 2D blocks:
    in-plane)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    if cfg.zoom_prob > 0:
        if _coin(cfg.zoom_prob):
            scale = fn.random.uniform(range=list(cfg.zoom_range))
            axes = {"crop_h": scale * patch[-2], "crop_w": scale * patch[-1]}
            if not frames:
                axes["crop_d"] = scale * patch[0]
            size = list(patch[-2:]) if frames else list(patch)
            img = fn.resize(fn.crop(img, **axes), size=size, interp_type=types.INTERP_CUBIC, antialias=False)
            lbl = fn.resize(fn.crop(lbl, **axes), size=size, interp_type=types.INTERP_NN, antialias=False)
    if cfg.flip_prob > 0:
        flips = {
            "horizontal": fn.random.coin_flip(probability=cfg.flip_prob),
            "vertical": fn.random.coin_flip(probability=cfg.flip_prob),
        }
        if not frames:
            flips["depthwise"] = fn.random.coin_flip(probability=cfg.flip_prob)
        img, lbl = fn.flip(img, **flips), fn.flip(lbl, **flips)
    if cfg.noise_prob > 0:
        if _coin(cfg.noise_prob):
            img = img + fn.random.normal(img, stddev=fn.random.uniform(range=list(cfg.noise_std)))
    if cfg.blur_prob > 0:
        if _coin(cfg.blur_prob):
            img = fn.gaussian_blur(img, sigma=fn.random.uniform(range=list(cfg.blur_sigma)))
    if cfg.brightness_prob > 0:
        if _coin(cfg.brightness_prob):
            img = img * fn.random.uniform(range=list(cfg.brightness_range))
    if cfg.contrast_prob > 0:
        if _coin(cfg.contrast_prob):
            low, high = fn.reductions.min(img), fn.reductions.max(img)
            img = dmath.clamp(img * fn.random.uniform(range=list(cfg.contrast_range)), low, high)
    return img, lbl


def _to_device(x: Any, device_id: int | None) -> Any:
    return x.gpu() if device_id is not None and x is not None else x


def _common(batch_size: int, device_id: int | None, seed: int, num_threads: int, prefetch: int) -> dict:
    return dict(
        batch_size=batch_size,
        device_id=device_id,
        seed=int(seed) & 0x7FFFFFFF,
        num_threads=num_threads,
        prefetch_queue_depth=prefetch,
        enable_conditionals=True,
    )


def train_pipeline(
    image_files: Sequence[str | Path],
    label_files: Sequence[str | Path],
    patch: Sequence[int],
    *,
    batch_size: int,
    seed: int,
    aug: AugmentConfig | None = None,
    block: int | None = None,
    device_id: int | None = None,
    num_threads: int = 2,
    prefetch: int = 2,
    ignore_label: int | None = None,
) -> Any:
    """Built training pipeline over the files in the given order (one sample per file, cycling).

    ``patch``: (Z, Y, X) for 3D, (Y, X) for 2D; with ``block`` set (2D) a sample is ``block`` contiguous
    slices, output ``(block, Y, X, C)``. Outputs ``image`` ``(*patch, C)`` float32, ``label`` ``(*patch, 1)``
    uint8. The same files, seed and batch size give the same batches; ``aug`` defaults to the reference's.
    ``ignore_label``: the plan's unannotated value; crops then always hold annotated voxels
    (:func:`_biased_anchor`).
    """
    dali = _dali()
    aug = aug or AugmentConfig()
    frames = block is not None
    if len(patch) != (2 if frames else 3):
        raise ValueError(
            f"patch {tuple(patch)} must have {2 if frames else 3} axes ({'2D' if frames else '3D'})"
        )
    crop_shape = [block, *patch] if frames else list(patch)
    if len(image_files) != len(label_files):
        raise ValueError(f"{len(image_files)} image files but {len(label_files)} label files")

    @dali.pipeline_def(**_common(batch_size, device_id, seed, num_threads, prefetch))
    def pipe():
        img, lbl = _read(image_files, "image_reader"), _read(label_files, "label_reader")
        anchor = _biased_anchor(lbl, crop_shape, aug.oversampling, ignore_label)
        img, lbl = _crop_at(img, lbl, anchor, crop_shape)
        layout = "FHWC" if frames else "DHWC"
        img, lbl = _channels_last(img, layout), _channels_last(lbl, layout)
        img, lbl = _to_device(img, device_id), _to_device(lbl, device_id)
        return _augment(img, lbl, list(patch), aug, frames)

    p = pipe()
    p.build()
    return p

"""U-Net topology (kernels, strides, filters) from a patch size and a spacing, as docs/reference.md §1.

Kept apart from the model so that planning (preprocessing), the model and the checkpoint converter agree on
one definition and the plan file can carry it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Topology:
    kernels: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    filters: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.strides)

    def to_dict(self) -> dict:
        return {k: [list(v) if isinstance(v, tuple) else v for v in vs] for k, vs in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Topology:
        return cls(
            kernels=tuple(tuple(int(k) for k in ks) for ks in d["kernels"]),
            strides=tuple(tuple(int(s) for s in ss) for ss in d["strides"]),
            filters=tuple(int(f) for f in d["filters"]),
        )


def get_kernels_strides(
    patch_size: Sequence[int], spacing: Sequence[float], min_fmap: int = 4, depth: int = 5
) -> tuple[list[list[int]], list[list[int]]]:
    """The reference's kernel/stride planning loop: halve an axis while it is fine enough and big enough."""
    if len(patch_size) != len(spacing):
        raise ValueError(f"patch size {tuple(patch_size)} and spacing {tuple(spacing)} differ in length")
    sizes = [float(p) for p in patch_size]
    spacings = [float(s) for s in spacing]
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    while True:
        smallest = min(spacings)
        ratios = [s / smallest for s in spacings]
        stride = [2 if r <= 2 and sz >= 2 * min_fmap else 1 for r, sz in zip(ratios, sizes, strict=True)]
        kernel = [3 if r <= 2 else 1 for r in ratios]
        if all(s == 1 for s in stride):
            break
        sizes = [sz / st for sz, st in zip(sizes, stride, strict=True)]
        spacings = [sp * st for sp, st in zip(spacings, stride, strict=True)]
        kernels.append(kernel)
        strides.append(stride)
        if len(strides) == depth:
            break
    ndim = len(patch_size)
    strides.insert(0, [1] * ndim)
    kernels.append([3] * ndim)
    return kernels, strides


def fit_patch(patch_size: Sequence[int], spacing: Sequence[float]) -> list[int]:
    """Round every axis down to a multiple of its total downsampling factor (the product of the topology's
    strides along it), recomputing the topology until it no longer changes, so the U-Net halves each axis
    exactly. No axis gets longer: an axis is strided only while ≥ 8 voxels long, so its factor never
    exceeds it."""
    patch = [int(p) for p in patch_size]
    while True:
        _, strides = get_kernels_strides(patch, spacing)
        factors = [math.prod(s[axis] for s in strides) for axis in range(len(patch))]
        rounded = [max(f, p // f * f) for p, f in zip(patch, factors, strict=True)]
        if rounded == patch:
            return patch
        patch = rounded


def default_filters(n_levels: int, dim: int) -> list[int]:
    """32, 64, 128, ... capped at 320 (3D) or 512 (2D)."""
    cap = 320 if dim == 3 else 512
    return [min(2 ** (5 + level), cap) for level in range(n_levels)]


def plan_topology(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    filters: Sequence[int] | None = None,
    min_fmap: int = 4,
    depth: int = 5,
) -> Topology:
    """Kernels, strides and filters for a patch; ``filters`` overrides the default widths (same length)."""
    kernels, strides = get_kernels_strides(patch_size, spacing, min_fmap=min_fmap, depth=depth)
    if filters is None:
        filters = default_filters(len(strides), len(patch_size))
    elif len(filters) != len(strides):
        raise ValueError(f"{len(filters)} filters given for a {len(strides)}-level network")
    return Topology(
        kernels=tuple(tuple(k) for k in kernels),
        strides=tuple(tuple(s) for s in strides),
        filters=tuple(int(f) for f in filters),
    )

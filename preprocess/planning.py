"""The per-dataset plan (plan.json, docs/CONTRACTS.md): patch size, target spacing, normalisation, topology.

MSD tasks take patch size, spacing and CT statistics from the task table (configs/tasks.py), as the reference
does. A custom dataset is planned from its training data (SPEC section 5):

- target spacing: per-axis median of the training spacings; when the result has max/min ≥ 3, the coarsest
  axis is set to the 10th percentile of that axis's spacings (what the original nnU-Net and the seed's
  README mean; the seed's code picks the finest axis by mistake);
- CT statistics: 0.5/99.5 percentiles, mean and std of the foreground (label > 0) voxels of the raw training
  images. Mean and std are exact (merged per-case moments); percentiles come from at most
  ``max_voxels_per_case`` voxels per case (weighted by each case's foreground size), so memory stays bounded;
- patch size (when ``--patch_size`` is not given), the rule documented in :func:`plan_patch_size`.
Spacings and shapes are read from the NIfTI headers only; voxels are read for CT statistics alone.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

import nibabel as nib
import numpy as np
from tqdm import tqdm

from configs.tasks import TaskInfo
from nnunet_jax.io import DatasetError, load_case, nifti_spacing
from nnunet_jax.topology import get_kernels_strides, plan_topology
from preprocess.dataset import CaseFiles, Dataset

ANISOTROPY_RATIO = 3.0
VOXEL_BUDGET = {3: 128**3, 2: 512**2}


def parallel_map(fn: Callable, items: Sequence, n_jobs: int, desc: str, progress: bool = True) -> list:
    """``[fn(i) for i in items]`` in ``n_jobs`` processes with a progress bar; results in input order.

    Workers get small arguments (paths) and load their own files, so memory is bounded by ``n_jobs`` cases.
    Processes are spawned (not forked): the parent may have JAX's threads running.
    """
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress, dynamic_ncols=True)
    results: list = [None] * len(items)
    try:
        if n_jobs <= 1 or len(items) <= 1:
            for i, item in enumerate(items):
                results[i] = fn(item)
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            try:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return results
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------- geometry
def read_geometry(case: CaseFiles) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, spacing) in (Z, Y, X) from the image header, without reading voxels."""
    try:
        header = nib.load(str(case.image)).header
    except Exception as e:
        raise DatasetError(f"case {case.name!r} ({case.image}): not a readable NIfTI file ({e})") from e
    shape = tuple(int(s) for s in header.get_data_shape()[:3][::-1])
    return shape, nifti_spacing(header)


def median_target_spacing(spacings: np.ndarray) -> tuple[list[float], bool]:
    """Per-axis median; if max/min ≥ 3 the coarsest axis becomes its 10th percentile → (spacing, aniso)."""
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.median(spacings, axis=0)
    anisotropic = bool(target.max() / target.min() >= ANISOTROPY_RATIO)
    if anisotropic:
        coarse = int(np.argmax(target))
        target[coarse] = np.percentile(spacings[:, coarse], 10)
    return [float(s) for s in target], anisotropic


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """The reference's resampled shape: int(spacing / target · shape), truncating."""
    return [int(sp / tg * sh) for sh, sp, tg in zip(shape, spacing, target, strict=True)]


def plan_patch_size(median_shape: Sequence[float], spacing: Sequence[float], dim: int) -> list[int]:
    """Patch size from the median (resampled) image shape.

    Rule: start from the median shape (floored, at least 1 per axis); while the patch has more voxels than the
    budget (128³ in 3D, 512² in 2D), shrink the largest axis by 10%; then round every axis down to a multiple
    of its total downsampling factor (the product of the topology's strides along it), recomputing the
    topology until it no longer changes, so the U-Net halves each axis exactly.
    """
    patch = [max(int(s), 1) for s in median_shape]
    budget = VOXEL_BUDGET[dim]
    while math.prod(patch) > budget:
        i = int(np.argmax(patch))
        patch[i] = max(int(patch[i] * 0.9), 1)
    while True:
        _, strides = get_kernels_strides(patch, spacing)
        factor = np.prod(np.array(strides), axis=0)
        rounded = [max(int(f), p // int(f) * int(f)) for p, f in zip(patch, factor, strict=True)]
        if rounded == patch:
            return patch
        patch = rounded


def check_patch_fits(patch: Sequence[int], shapes: dict[str, Sequence[int]], what: str) -> None:
    """Error when along some axis the patch is larger than every training case (all would be padding there).

    Padding a few small cases up to the patch is normal (MSD Hippocampus cases are smaller than its patch on
    some axes), but a patch that no case reaches along an axis is a planning mistake.
    """
    if not shapes:
        return
    largest = np.max(np.array(list(shapes.values())), axis=0)
    too_big = [i for i, (p, m) in enumerate(zip(patch, largest, strict=True)) if p > m]
    if too_big:
        axes = "ZYX"[-len(patch):]
        raise DatasetError(
            f"patch size {list(patch)} is larger than every training case along axis "
            f"{', '.join(axes[i] for i in too_big)}: the largest {what} shape per axis is {largest.tolist()} "
            f"({len(shapes)} cases); choose a smaller --patch_size"
        )


# ----------------------------------------------------------------------------------------------- CT stats
def foreground_moments(job: tuple[CaseFiles, list[int], int, int]) -> tuple[int, float, float, np.ndarray]:
    """Foreground voxels of one case: (count, mean, sum of squared deviations, weighted sample)."""
    case, labels, n_channels, max_voxels = job
    loaded = load_case(case.image, case.label, labels=labels, n_channels=n_channels, case=case.name)
    values = loaded.image[:, loaded.label[0] > 0].astype(np.float64).ravel()
    n = values.size
    if n == 0:
        return 0, 0.0, 0.0, np.zeros(0, np.float32)
    mean = float(values.mean())
    m2 = float(((values - mean) ** 2).sum())
    if n > max_voxels:
        rng = np.random.default_rng(zlib.crc32(case.name.encode()))
        values = rng.choice(values, size=max_voxels, replace=False)
    return n, mean, m2, values.astype(np.float32)


def ct_statistics(
    cases: Iterable[CaseFiles], labels: list[int], n_channels: int, n_jobs: int = 1,
    max_voxels_per_case: int = 200_000, progress: bool = True,
) -> list[float]:
    """[0.5 percentile, 99.5 percentile, mean, std] of all foreground voxels of the training images."""
    jobs = [(c, labels, n_channels, max_voxels_per_case) for c in cases]
    parts = parallel_map(foreground_moments, jobs, n_jobs, "CT statistics", progress)
    parts = [p for p in parts if p[0] > 0]
    if not parts:
        raise DatasetError("CT statistics: no training label has a foreground voxel (label > 0)")
    counts = np.array([p[0] for p in parts], dtype=np.float64)
    means = np.array([p[1] for p in parts])
    total = counts.sum()
    mean = float((counts * means).sum() / total)
    m2 = sum(p[2] for p in parts) + float((counts * (means - mean) ** 2).sum())  # Chan et al. merge
    std = math.sqrt(m2 / total)
    samples = [p[3] for p in parts]
    if all(s.size == p[0] for s, p in zip(samples, parts, strict=True)):
        lo, hi = np.percentile(np.concatenate(samples), [0.5, 99.5])  # exact, as the reference
    else:
        weights = np.concatenate([np.full(s.size, p[0] / s.size) for s, p in zip(samples, parts,
                                                                                       strict=True)])
        lo, hi = np.percentile(np.concatenate(samples), [0.5, 99.5], weights=weights, method="inverted_cdf")
    return [float(lo), float(hi), mean, std]


# ----------------------------------------------------------------------------------------------- the plan
def make_plan(
    dataset: Dataset,
    task: str,
    info: TaskInfo | None,
    dim: int,
    patch_size: Sequence[int] | None = None,
    n_jobs: int = 1,
    progress: bool = True,
) -> dict:
    """The plan.json dictionary for ``dataset`` (see docs/CONTRACTS.md); table values for MSD tasks."""
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    geometry = parallel_map(read_geometry, dataset.training, 1, "headers", progress=False)
    shapes = np.array([g[0] for g in geometry])
    spacings = np.array([g[1] for g in geometry])
    source: dict[str, str] = {}

    if info is not None:
        spacing_3d, source["spacing"] = [float(s) for s in info.spacing_3d], "task table"
    else:
        spacing_3d, _ = median_target_spacing(spacings)
        source["spacing"] = "median of training spacings (anisotropic: coarsest axis at its 10th percentile)"
    if dim == 3:
        planned_shapes = {
            c.name: resampled_shape(s, sp, spacing_3d) for c, s, sp in zip(dataset.training, shapes, spacings,
                                                                         strict=True)
        }
        spacing = spacing_3d
    else:  # 2D: slices are not resampled (SPEC 5.5)
        planned_shapes = {c.name: [int(v) for v in s[1:]] for c, s in zip(dataset.training, shapes,
                                                                           strict=True)}
        spacing = spacing_3d[1:]
    median_shape = np.median(np.array(list(planned_shapes.values())), axis=0)

    if patch_size:
        patch = [int(p) for p in patch_size]
        if len(patch) != dim or min(patch) < 1:
            raise DatasetError(f"--patch_size {patch} must have {dim} positive values for --dim {dim}")
        source["patch_size"] = "--patch_size"
    elif info is not None:
        patch, source["patch_size"] = list(info.patch(dim)), "task table"
    else:
        patch = plan_patch_size(median_shape, spacing, dim)
        source["patch_size"] = "planned from the median shape"
    check_patch_fits(patch, planned_shapes, "resampled image" if dim == 3 else "image slice")

    ct_stats = None
    if dataset.is_ct:
        if info is not None and info.ct_stats is not None:
            ct_stats, source["ct_stats"] = [float(v) for v in info.ct_stats], "task table"
        else:
            ct_stats = ct_statistics(dataset.training, dataset.label_values, dataset.in_channels, n_jobs,
                                     progress=progress)
            source["ct_stats"] = "foreground voxels of the training images"

    topology = plan_topology(patch, spacing)
    return {
        "task": task,
        "task_name": dataset.root.name,
        "dim": dim,
        "patch_size": patch,
        "spacing": [float(s) for s in spacing],
        "labels": dataset.labels,
        "n_class": dataset.n_class,
        "modalities": dataset.modalities,
        "in_channels": dataset.in_channels,
        "normalization": "CT" if dataset.is_ct else "MRI",
        "ct_stats": ct_stats,
        "topology": topology.to_dict(),
        "anisotropic": bool(max(spacing) / min(spacing) >= ANISOTROPY_RATIO),
        "cases": {"training": [c.name for c in dataset.training], "test": [c.name for c in dataset.test]},
        "median_shape": [float(v) for v in median_shape],
        "source": {"data": str(dataset.root), **source},
    }

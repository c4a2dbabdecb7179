"""The per-dataset plan (plan.json, docs/CONTRACTS.md): patch size, target spacing, normalisation, topology.

MSD tasks take patch size, spacing and CT statistics from the task table (configs/tasks.py), as the reference
does. A custom dataset is planned from its training data (docs/reference.md §5):

- target spacing: per-axis median of the training spacings; when the result has max/min ≥ 3, the coarsest
  axis is set to the 10th percentile of that axis's spacings (what the original nnU-Net and the seed's
  README mean; the seed's code picks the finest axis by mistake); stored rounded to 7 significant digits
  (NIfTI pixdim is float32: 0.800000011920929 → 0.8) unless that changes any case's resampling;
- CT statistics: 0.5/99.5 percentiles, mean and std of the foreground (label > 0) voxels of the raw training
  images. Mean and std are exact (merged per-case moments); percentiles come from at most
  ``max_voxels_per_case`` voxels per case (weighted by each case's foreground size), so memory stays bounded;
- patch size (when ``--patch_size`` is not given), the rule documented in :func:`plan_patch_size`, applied
  to the median of the shapes preprocessing will really produce: each case cropped to its non-zero box (for
  CT in HU that drops the air around the body) and resampled to the target spacing, as the original
  nnU-Net does. A patch (planned or given) is checked against those shapes here, before any case is
  preprocessed.
Finding the non-zero boxes means reading every training image once, in one parallel pass (one case per
worker at a time) that also gathers the CT statistics. MSD tasks with their table patch skip that pass and
read the headers only (preprocessing checks the patch against the cropped shapes afterwards).
"""

from __future__ import annotations

import ast
import math
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from nnunet_jax.configs.tasks import TaskInfo
from nnunet_jax.io import DatasetError, load_case, nifti_spacing
from nnunet_jax.plan import ANISOTROPY_RATIO, Plan
from nnunet_jax.planning.dataset_json import CaseFiles, Dataset
from nnunet_jax.planning.topology import fit_patch, plan_topology
from nnunet_jax.preprocessing.case import (
    checked_resampled_shape,
    needs_resampling,
    nonzero_box,
    resampled_shape,
)

VOXEL_BUDGET = {3: 128**3, 2: 512**2}


def unguarded_main_script() -> Path | None:
    """The script ``__main__`` runs from when it has no top-level ``if __name__ == "__main__":`` block.

    Spawned worker processes re-import the main script; without that guard they re-run its top level (which
    calls us again, and may rewrite the very files the parent is reading), fail, and the parent only sees
    BrokenProcessPool. None for a guarded script, an interactive session or a source we cannot parse.
    """
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not str(path).endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            parts = [node.test.left, *node.test.comparators]
            names = {n.id for n in parts if isinstance(n, ast.Name)}
            consts = {n.value for n in parts if isinstance(n, ast.Constant)}
            if "__name__" in names and "__main__" in consts:
                return None
    return Path(path)


def _guard_advice(script: Path | None) -> str:
    where = f"the script {script}" if script else "your script"
    return (f"worker processes are spawned and re-import the main script, so n_jobs > 1 needs {where} to "
            f"run its work under `if __name__ == \"__main__\":` (or use n_jobs=1)")


def parallel_map(fn: Callable, items: Sequence, n_jobs: int, desc: str, progress: bool = True) -> list:
    """``[fn(i) for i in items]`` in ``n_jobs`` processes with a progress bar; results in input order.

    Workers get small arguments (paths) and load their own files, so memory is bounded by ``n_jobs`` cases.
    Processes are spawned (not forked): the parent may have JAX's threads running. Spawned workers re-import
    the main script, so with ``n_jobs > 1`` a calling script needs an ``if __name__ == "__main__":`` guard:
    an unguarded one is refused up front (RuntimeError), and a pool broken anyway (a worker re-ran the
    script, or was killed, e.g. out of memory) is reported as a RuntimeError that says so.
    """
    parallel = n_jobs > 1 and len(items) > 1
    if parallel and (script := unguarded_main_script()) is not None:
        raise RuntimeError(f"{desc}: {_guard_advice(script)}")
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress, dynamic_ncols=True)
    results: list = [None] * len(items)
    try:
        if not parallel:
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
    except BrokenProcessPool as e:
        raise RuntimeError(f"{desc}: a worker process died before finishing its case. Either it ran out of "
                           f"memory (try fewer n_jobs) or {_guard_advice(None)}") from e
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------- geometry
CT_SAMPLE_VOXELS = 200_000  # foreground voxels kept per case for the CT percentiles


def read_geometry(case: CaseFiles) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, spacing) in (Z, Y, X) from the image header, without reading voxels."""
    try:
        header = nib.load(str(case.image)).header
    except Exception as e:
        raise DatasetError(f"case {case.name!r} ({case.image}): not a readable NIfTI file ({e})") from e
    shape = tuple(int(s) for s in header.get_data_shape()[:3][::-1])
    return shape, nifti_spacing(header)


Moments = tuple[int, float, float, np.ndarray]  # foreground (count, mean, sum of squared deviations, sample)


@dataclass(frozen=True)
class CaseSurvey:
    """What planning reads from one training case's voxels."""

    name: str
    shape: tuple[int, ...]  # (Z, Y, X) as stored
    cropped_shape: tuple[int, ...]  # (Z, Y, X) of the non-zero box preprocessing crops the case to
    spacing: tuple[float, ...]
    moments: Moments | None  # CT foreground statistics, when asked for


def survey_case(job: tuple[CaseFiles, list[int], int, int | None]) -> CaseSurvey:
    """Load one case (in a worker): its non-zero box and, when ``ct_voxels`` is set, its CT moments.

    The label is read (and checked) only for CT statistics; the box needs the image alone.
    """
    case, labels, n_channels, ct_voxels = job
    label = case.label if ct_voxels is not None else None
    loaded = load_case(case.image, label, labels=labels, n_channels=n_channels, case=case.name)
    box = nonzero_box(loaded.image)
    moments = None
    if ct_voxels is not None:
        moments = _moments(loaded.image, loaded.label, case.name, ct_voxels)
    return CaseSurvey(case.name, tuple(int(s) for s in loaded.image.shape[1:]),
                      tuple(int(b - a) for a, b in box), loaded.spacing, moments)


def survey_cases(cases: Sequence[CaseFiles], labels: list[int], n_channels: int, n_jobs: int = 1,
                 ct_voxels: int | None = None, progress: bool = True) -> list[CaseSurvey]:
    """:func:`survey_case` for every case, ``n_jobs`` at a time (memory: one loaded case per worker)."""
    jobs = [(c, labels, n_channels, ct_voxels) for c in cases]
    return parallel_map(survey_case, jobs, n_jobs, "planning: reading training images", progress)


def median_target_spacing(spacings: np.ndarray) -> tuple[list[float], bool]:
    """Per-axis median; if max/min ≥ 3 the coarsest axis becomes its 10th percentile → (spacing, aniso)."""
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.median(spacings, axis=0)
    anisotropic = bool(target.max() / target.min() >= ANISOTROPY_RATIO)
    if anisotropic:
        coarse = int(np.argmax(target))
        target[coarse] = np.percentile(spacings[:, coarse], 10)
    return [float(s) for s in target], anisotropic


def tidy_spacing(target: Sequence[float], spacings: np.ndarray,
                 shapes: Sequence[Sequence[int]]) -> list[float]:
    """``target`` rounded to 7 significant digits, which drops the float32 noise of NIfTI pixdim
    (0.800000011920929 → 0.8), unless that would change whether some case is resampled or to which shape;
    then ``target`` unchanged. ``spacings``/``shapes``: the cases' source spacings and cropped shapes."""
    raw = [float(v) for v in target]
    rounded = [float(f"{v:.7g}") for v in raw]

    def outcome(t: list[float]) -> list[list[int]]:
        return [resampled_shape(sh, sp, t) + [needs_resampling(sp, t)]
                for sh, sp in zip(shapes, spacings, strict=True)]

    return rounded if outcome(rounded) == outcome(raw) else raw


def plan_patch_size(median_shape: Sequence[float], spacing: Sequence[float], dim: int,
                    largest: Sequence[int] | None = None) -> list[int]:
    """Patch size from the median (cropped, resampled) image shape.

    Rule: start from the median shape (floored, at least 1 per axis, at most ``largest``); while the patch
    has more voxels than the budget (128³ in 3D, 512² in 2D), shrink the largest axis by 10%; then round
    every axis down to a multiple of its total downsampling factor (:func:`fit_patch`). No step makes an
    axis longer, so the patch never exceeds ``largest`` (the largest training case per axis).
    """
    patch = [max(int(s), 1) for s in median_shape]
    if largest is not None:
        patch = [max(min(p, int(m)), 1) for p, m in zip(patch, largest, strict=True)]
    budget = VOXEL_BUDGET[dim]
    while math.prod(patch) > budget:
        i = int(np.argmax(patch))
        patch[i] = max(int(patch[i] * 0.9), 1)
    return fit_patch(patch, spacing)


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
def _moments(image: np.ndarray, label: np.ndarray, name: str, max_voxels: int) -> Moments:
    values = image[:, label[0] > 0].astype(np.float64).ravel()
    n = values.size
    if n == 0:
        return 0, 0.0, 0.0, np.zeros(0, np.float32)
    mean = float(values.mean())
    m2 = float(((values - mean) ** 2).sum())
    if n > max_voxels:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        values = rng.choice(values, size=max_voxels, replace=False)
    return n, mean, m2, values.astype(np.float32)


def foreground_moments(job: tuple[CaseFiles, list[int], int, int]) -> Moments:
    """Foreground voxels of one case: (count, mean, sum of squared deviations, weighted sample)."""
    case, labels, n_channels, max_voxels = job
    loaded = load_case(case.image, case.label, labels=labels, n_channels=n_channels, case=case.name)
    return _moments(loaded.image, loaded.label, case.name, max_voxels)


def merge_moments(parts: Iterable[Moments]) -> list[float]:
    """[0.5 percentile, 99.5 percentile, mean, std] from per-case :func:`foreground_moments`."""
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


def ct_statistics(
    cases: Iterable[CaseFiles], labels: list[int], n_channels: int, n_jobs: int = 1,
    max_voxels_per_case: int = CT_SAMPLE_VOXELS, progress: bool = True,
) -> list[float]:
    """[0.5 percentile, 99.5 percentile, mean, std] of all foreground voxels of the training images."""
    jobs = [(c, labels, n_channels, max_voxels_per_case) for c in cases]
    return merge_moments(parallel_map(foreground_moments, jobs, n_jobs, "CT statistics", progress))


# ----------------------------------------------------------------------------------------------- the plan
def _planned_shapes(names: Sequence[str], shapes: Sequence[Sequence[int]], spacings: np.ndarray,
                    target: Sequence[float], dim: int) -> dict[str, list[int]]:
    """Per case, the shape preprocessing produces before padding: 3D resampled, 2D the (Y, X) slice."""
    out = {}
    for name, shape, sp in zip(names, shapes, spacings, strict=True):
        if dim == 2:  # slices are not resampled (docs/reference.md §5.5)
            out[name] = [int(v) for v in shape[1:]]
            continue
        out[name] = checked_resampled_shape(shape, sp, target, name)
    return out


def make_plan(
    dataset: Dataset,
    task: str,
    info: TaskInfo | None,
    dim: int,
    patch_size: Sequence[int] | None = None,
    n_jobs: int = 1,
    progress: bool = True,
) -> Plan:
    """The :class:`~nnunet_jax.plan.Plan` of ``dataset`` (see docs/CONTRACTS.md); table values for MSD tasks.

    Raises DatasetError when the patch (planned, given or from the table) is larger than every training
    case along some axis: with the training images read (custom datasets, ``patch_size`` given, CT
    statistics to compute) against the cropped and resampled shapes, else against the header shapes.
    """
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    if patch_size:
        patch = [int(p) for p in patch_size]
        if len(patch) != dim or min(patch) < 1:
            raise DatasetError(f"--patch_size {patch} must have {dim} positive values for --dim {dim}")
    names = [c.name for c in dataset.training]
    need_ct = dataset.is_ct and (info is None or info.ct_stats is None)
    surveyed = None
    if info is None or patch_size or need_ct:  # the voxels are needed: read every case once
        surveyed = survey_cases(dataset.training, dataset.label_values, dataset.in_channels, n_jobs,
                                CT_SAMPLE_VOXELS if need_ct else None, progress)
        shapes = [s.cropped_shape for s in surveyed]
        spacings = np.array([s.spacing for s in surveyed])
        what = "cropped and resampled" if dim == 3 else "cropped slice"
        shapes_source = "training cases cropped to their non-zero box"
    else:  # MSD table patch and statistics: headers suffice (preprocessing checks the cropped shapes)
        geometry = [read_geometry(c) for c in dataset.training]
        shapes = [g[0] for g in geometry]
        spacings = np.array([g[1] for g in geometry])
        what = "resampled image" if dim == 3 else "image slice"
        shapes_source = "training image headers (not cropped)"
    source: dict[str, str] = {}

    if info is not None:
        spacing_3d, source["spacing"] = [float(s) for s in info.spacing_3d], "task table"
    else:
        spacing_3d = tidy_spacing(median_target_spacing(spacings)[0], spacings, shapes)
        source["spacing"] = "median of training spacings (anisotropic: coarsest axis at its 10th percentile)"
    spacing = spacing_3d if dim == 3 else spacing_3d[1:]
    planned_shapes = _planned_shapes(names, shapes, spacings, spacing_3d, dim)
    stacked = np.array(list(planned_shapes.values()))
    median_shape = np.median(stacked, axis=0)
    source["median_shape"] = shapes_source + (", resampled" if dim == 3 else ", (Y, X)")

    if patch_size:
        source["patch_size"] = "--patch_size"
    elif info is not None:
        patch, source["patch_size"] = list(info.patch(dim)), "task table"
    else:
        patch = plan_patch_size(median_shape, spacing, dim, largest=stacked.max(axis=0))
        source["patch_size"] = "planned from the median shape"
    check_patch_fits(patch, planned_shapes, what)

    ct_stats = None
    if dataset.is_ct:
        if not need_ct:
            ct_stats, source["ct_stats"] = [float(v) for v in info.ct_stats], "task table"
        else:
            ct_stats = merge_moments(s.moments for s in surveyed)
            source["ct_stats"] = "foreground voxels of the training images"

    topology = plan_topology(patch, spacing)
    return Plan.from_dict({
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
        "cases": {"training": names, "test": [c.name for c in dataset.test]},
        "median_shape": [float(v) for v in median_shape],
        "source": {"data": str(dataset.root), **source},
    }, where=f"the plan of {dataset.root}")

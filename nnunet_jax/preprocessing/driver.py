"""Dataset-level preprocessing: a raw dataset folder (MSD task or nnU-Net v2 ``DatasetXXX_Name``, see
:mod:`nnunet_jax.planning.dataset_json`) → ``<results>/<task>_<dim>d/`` of .npy cases + plan.json.

Layout written (as the seed does):
- ``--exec_mode training``: ``RESULTS/<task>_<dim>d/`` with ``<case>_x.npy`` (float32 (C, Z, Y, X)),
  ``<case>_y.npy`` (uint8 (1, Z, Y, X)), ``<case>_meta.npy`` and ``plan.json``; cases padded to the patch.
  Re-running training replaces the whole folder, its ``val``/``test`` sub-folders included (they may have
  been made with another plan).
- ``--exec_mode val``: the labelled training cases without padding in ``RESULTS/<task>_<dim>d/val/``.
- ``--exec_mode test``: the unlabelled test images (no ``_y``) in ``RESULTS/<task>_<dim>d/test/``.
``<task>`` is the two-digit MSD number (``01_3d``) or, for a custom or nnU-Net v2 dataset folder, the
folder's name (``Dataset001_Name_3d``). A v2 dataset's cases go through the same steps (its NIfTI cases give
exactly the arrays of the same images stored as an MSD task); its plan also records v2's label definition
(regions, ``ignore``), which training follows (a sigmoid output per region; ignored voxels count for nothing).
val/test reuse ``RESULTS/<task>_<dim>d/plan.json`` when training was preprocessed first, so all modes share
one plan; each output folder gets its own copy of the plan.

Nothing partial is left behind: the output is written in a hidden temporary folder next to the target and
renamed into place only after every case succeeded; on any error (bad case, Ctrl-C) it is deleted.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from nnunet_jax.atomic import make_temp_dir, replace_dir, save_npy
from nnunet_jax.io import DatasetError, load_case
from nnunet_jax.locks import FolderBusyError, folder_lock
from nnunet_jax.plan import PLAN_FILE, Plan, folder_name
from nnunet_jax.planning.dataset_json import V2, CaseFiles, Dataset, find_task_dir, load_dataset
from nnunet_jax.planning.planner import check_patch_fits, make_plan, parallel_map

EXEC_MODES = ("training", "val", "test")

__all__ = ["EXEC_MODES", "DatasetError", "output_dir", "preprocess_dataset"]


@dataclass(frozen=True)
class CaseJob:
    """Everything a worker process needs for one case; small, so it pickles cheaply."""

    case: CaseFiles
    out_dir: str
    exec_mode: str
    dim: int
    labels: tuple[int, ...]
    n_channels: int
    target_spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    normalization: str
    ct_stats: tuple[float, float, float, float] | None
    workers: int | None = None  # resampling threads per case; 1 when cases already run in parallel


def process_case(job: CaseJob) -> dict:
    """Load, check and preprocess one case in a worker; writes its three files; returns its shapes."""
    with_label = job.exec_mode != "test"
    loaded = load_case(job.case.image, job.case.label if with_label else None, labels=job.labels,
                       n_channels=job.n_channels, case=job.case.name)
    notes = blank_image_notes(loaded.image, loaded.label, _where(job))
    from nnunet_jax.preprocessing import case as pp  # imported here: workers are spawned, keep startup light
    try:
        x, y, meta = pp.preprocess_case(
            loaded.image, loaded.label, loaded.spacing,
            target_spacing=job.target_spacing, patch_size=job.patch_size, dim=job.dim,
            normalization=job.normalization, ct_stats=job.ct_stats,
            mode="training" if job.exec_mode == "training" else "test",  # val: labelled, not padded
            affine=loaded.affine, case=job.case.name, workers=job.workers,
        )
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"case {job.case.name!r} ({job.case.image}): preprocessing failed: {e}") from e
    out = Path(job.out_dir)
    save_npy(np.ascontiguousarray(x, dtype=np.float32), out / f"{job.case.name}_x.npy")
    if with_label and y is not None:
        save_npy(np.ascontiguousarray(y, dtype=np.uint8), out / f"{job.case.name}_y.npy")
    meta.save(out / f"{job.case.name}_meta.npy")
    unpadded = list(meta.resampled_shape) if job.dim == 3 else list(meta.resampled_shape[1:])
    return {"name": job.case.name, "shape": [int(v) for v in x.shape], "unpadded": unpadded, "notes": notes}


def _where(job: CaseJob) -> str:
    return f"case {job.case.name!r} ({job.case.image})"


def blank_image_notes(image: np.ndarray, label: np.ndarray | None, where: str) -> list[str]:
    """Warnings for image channels that hold one value only (e.g. all zeros: a failed export).

    Warned, not refused: a zero-filled channel is how multi-modal datasets mark a missing sequence, and one
    blank test image must not stop the others; but a label with foreground on a blank image teaches the
    network nothing true, so the warning says so.
    """
    notes = []
    for c, channel in enumerate(image):
        lo, hi = float(channel.min()), float(channel.max())
        if lo != hi:
            continue
        fg = int(np.count_nonzero(label)) if label is not None else 0
        tail = (f"; its label has {fg} foreground voxels the network cannot see: check the image file"
                if fg else "")
        notes.append(f"{where}: image channel {c} is constant (every voxel {lo:g}){tail}")
    return notes


def output_dir(results: str | os.PathLike, task_dir: Path, task_number: str | None, dim: int,
               exec_mode: str) -> Path:
    """``RESULTS/<task>_<dim>d`` for training, with ``/val`` or ``/test`` below it for the other modes."""
    base = Path(results) / folder_name(task_number if task_number else task_dir.name, dim)
    return base if exec_mode == "training" else base / exec_mode


def _load_or_make_plan(dataset: Dataset, task: str, info, dim: int, exec_mode: str, base: Path,
                       patch_size: Sequence[int] | None, n_jobs: int, progress: bool) -> Plan:
    training_plan = base / PLAN_FILE
    if exec_mode != "training" and training_plan.is_file():
        plan = Plan.load(training_plan)
        if not patch_size or tuple(int(p) for p in patch_size) == plan.patch_size:
            return plan
    return with_v2_labels(make_plan(dataset, task, info, dim, patch_size, n_jobs, progress), dataset)


def with_v2_labels(plan: Plan, dataset: Dataset) -> Plan:
    """The plan with an nnU-Net v2 dataset's label definition (regions in head order, their class order,
    the ignore value) and its layout in ``source``, so later stages need not re-read the raw dataset.json;
    an MSD dataset's plan is returned unchanged."""
    v2 = dataset.v2
    if dataset.layout != V2 or v2 is None:
        return plan
    regions = None
    if v2.has_regions:
        regions = {name: ((v,) if isinstance(v, int) else tuple(v)) for name, v in v2.labels.items()
                   if name != "ignore" and set((v,) if isinstance(v, int) else v) != {0}}
    return replace(plan, regions=regions, regions_class_order=v2.regions_class_order if regions else None,
                   ignore_label=v2.ignore_label, source={**plan.source, "layout": "nnU-Net v2 raw"})


def _label_notes(plan: Plan) -> list[str]:
    """How training will read the plan's nnU-Net v2 label definition (regions, ignore label)."""
    notes = []
    if plan.regions is not None:
        notes.append(f"the plan records nnU-Net v2 regions {list(plan.regions)}: training predicts one "
                     "sigmoid output per region")
    if plan.ignore_label is not None:
        notes.append(f"the label maps keep the nnU-Net v2 ignore value {plan.ignore_label}: training leaves "
                     "those voxels out of the loss and the validation Dice")
    return notes


@contextmanager
def _own(base: Path) -> Iterator[None]:
    """Hold the lock of ``RESULTS/<task>_<dim>d`` (beside it: training replaces the folder) and remove the
    temp folders of killed preprocessings; another live preprocessing of it is a DatasetError."""
    try:
        with folder_lock(base, "python -m preprocess", beside=True):
            yield
    except FolderBusyError as e:
        raise DatasetError(str(e)) from None


def preprocess_dataset(
    data: str | os.PathLike,
    task: str,
    dim: int,
    results: str | os.PathLike,
    exec_mode: str = "training",
    n_jobs: int = 1,
    patch_size: Sequence[int] | None = None,
    progress: bool = True,
) -> Path:
    """Preprocess one task (``--task`` as :func:`~nnunet_jax.planning.dataset_json.find_task_dir` resolves
    it: MSD number, nnU-Net v2 number or name, or a folder path) and return the output folder.

    The plan (made first, unless val/test reuse the training plan) checks the patch against the training
    cases cropped and resampled, so a ``patch_size`` larger than every case along an axis fails
    (DatasetError) before any case is processed; MSD tasks with their table patch are checked after.

    ``n_jobs > 1`` runs cases in spawned processes, which re-import the calling script: call this from a
    script only under ``if __name__ == "__main__":`` (or use ``n_jobs=1``). An unguarded script is refused
    with a RuntimeError before any process starts; a worker that dies anyway (e.g. out of memory) is
    reported as a RuntimeError too, and nothing is left behind.
    """
    if exec_mode not in EXEC_MODES:
        raise ValueError(f"exec_mode must be one of {EXEC_MODES}, got {exec_mode!r}")
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    task_dir, info = find_task_dir(data, task)
    dataset = load_dataset(task_dir)
    cases = dataset.cases(exec_mode)
    if not cases:
        kind = "test" if exec_mode == "test" else "training"
        where = " (no imagesTs/ case files)" if dataset.layout == V2 and kind == "test" else ""
        raise DatasetError(f"{task_dir / 'dataset.json'}: no '{kind}' cases to preprocess "
                           f"in --exec_mode {exec_mode}{where}")
    for note in dataset.notes:
        print(f"warning: {note}", file=sys.stderr)
    number = info.number if info is not None else None
    out = output_dir(results, task_dir, number, dim, exec_mode)
    base = out if exec_mode == "training" else out.parent
    with _own(base):  # one run per <task>_<dim>d: training replaces it whole, val/test read its plan
        plan = _load_or_make_plan(dataset, info.number if info else task_dir.name, info, dim, exec_mode, base,
                                  patch_size, n_jobs, progress)
        for note in _label_notes(plan):
            print(f"note: {note}", file=sys.stderr)

        Path(results).mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out, exec_mode)
        try:
            jobs = [
                CaseJob(c, str(tmp), exec_mode, dim, tuple(dataset.label_values), dataset.in_channels,
                        plan.spacing, plan.patch_size, plan.normalization, plan.ct_stats,
                        1 if n_jobs > 1 else None)
                for c in cases
            ]
            done = parallel_map(process_case, jobs, n_jobs, f"preprocess {exec_mode}", progress)
            for note in (n for d in done for n in d["notes"]):
                print(f"warning: {note}", file=sys.stderr)
            if exec_mode == "training":  # planning checked the same shapes, except for MSD table patches
                check_patch_fits(plan.patch_size, {d["name"]: d["unpadded"] for d in done},
                                 "cropped and resampled" if dim == 3 else "cropped slice")
            plan.with_extra(exec_mode=exec_mode, preprocessed=[d["name"] for d in done]).save(tmp / PLAN_FILE)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out

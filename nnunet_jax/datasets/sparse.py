"""Sparse annotation made from a fully labelled preprocessed dataset: the ignore-label experiment.

nnU-Net v2 trains on partially annotated cases by marking unannotated voxels with an ``ignore`` label. To show
that our training still converges from such labels, :func:`sparsify` turns some cases of a preprocessed
folder (``<case>_y.npy`` + ``plan.json``) into that form: a random ``fraction`` of each case's voxels become
the ignore value (nnU-Net v2's rule: the highest class + 1, i.e. ``n_class``), and the plan records it. The
other cases stay fully labelled, so validation Dice on them measures the real segmentation.

    python -m benchmarks.bench_convergence --ignore_fraction 0.9     # training cases of fold 0 at 10 %
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_jax.atomic import save_npy
from nnunet_jax.plan import Plan, label_file

__all__ = ["sparsify"]


def sparsify(folder: str | os.PathLike, cases: Sequence[str], fraction: float, seed: int = 0) -> Plan:
    """Set a random ``fraction`` of the voxels of each case's label in ``folder`` to the ignore value
    ``n_class`` (per case from ``(seed, case index)``) and record it in the folder's plan; returns the plan.
    A folder already sparsified with that ignore value is refused (its labels would be thinned twice)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the ignored fraction must be in [0, 1), got {fraction}")
    folder = Path(folder)
    plan = Plan.load(folder)
    if plan.ignore_label is not None:
        raise ValueError(f"{folder}: the plan already has the ignore label {plan.ignore_label}")
    ignore = plan.n_class
    for i, case in enumerate(sorted(cases)):
        path = folder / label_file(case)
        label = np.load(path)
        drop = np.random.default_rng([int(seed), i]).random(label.shape) < fraction
        save_npy(np.where(drop, ignore, label).astype(label.dtype), path)
    plan = Plan.from_dict({**plan.to_dict(), "ignore_label": ignore}, where=folder)
    plan.save(folder)
    return plan

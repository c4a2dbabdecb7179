"""Validation: the predictor's windowed forward over every validation volume of the fold, split across
processes/devices, scored with the loss and the Dice.

Each process takes every ``process_count``-th case and runs its windows sharded over its own devices (a local
mesh: the processes see different numbers of windows, so they must not share a global computation); the
per-case rows (per-class Dice, loss) are then gathered from all processes. Dice follows docs/reference.md §4
via :func:`nnunet_jax.metrics.label_dice` (per foreground class; region mode: per region of the sigmoids
> 0.5 with the same empty rule; voxels of the plan's ignore label count for nothing); reported numbers are
means over cases ×100. A 2D net validates a 3D volume slice by slice, scored on the whole volume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from nnunet_jax import parallel
from nnunet_jax.inference.forward import ApplyFn, WindowedForward, host_copy, window_batch
from nnunet_jax.labels import LabelSpec

# name -> (image (*spatial, C), label (*spatial)); 3D volumes also for 2D nets (validated slice by slice)
LoadCase = Callable[[str], tuple[np.ndarray, np.ndarray]]


def _gather_rows(rows: np.ndarray, n_cases: int) -> np.ndarray:
    """Reassemble the per-case rows of all processes (process p holds cases p, p+P, ...) in case order."""
    nproc = jax.process_count()
    if nproc == 1:
        return rows
    per = math.ceil(n_cases / nproc)
    padded = np.zeros((per, rows.shape[1]), rows.dtype)
    padded[: len(rows)] = rows
    everything = np.asarray(multihost_utils.process_allgather(padded))  # (P, per, k)
    out = np.zeros((n_cases, rows.shape[1]), rows.dtype)
    for p in range(nproc):
        mine = np.arange(p, n_cases, nproc)
        out[mine] = everything[p, : len(mine)]
    return out


class Validator:
    """The validation of one run; build once (the windowed forward compiles per object), call per epoch.

    ``forward`` is :func:`nnunet_jax.inference.forward.make_forward` of the model on ``mesh`` (any
    ``forward(variables, windows) -> logits`` works); ``labels`` says whether its outputs are classes or
    regions and which label is ignored, ``loss_fn`` must match it.
    """

    def __init__(self, forward: ApplyFn, labels: LabelSpec, roi_size: Sequence[int], loss_fn: Callable,
                 mesh: Mesh, *, overlap: float = 0.5, blend: str = "gaussian", batch_size: int = 4,
                 tta: bool = False):
        self.labels, self.loss_fn, self.mesh = labels, loss_fn, mesh
        self.window = WindowedForward(forward, tuple(int(r) for r in roi_size), overlap, blend,
                                      window_batch(batch_size, mesh), tta)

    def __call__(self, variables: Any, cases: Sequence[str], load_case: LoadCase) -> dict[str, Any]:
        """Per-class (or per-region) Dice (0–100), ``mean_dice`` and ``val_loss`` over ``cases``, identical on
        every process; region runs also name the regions (``dice_WT``, ...)."""
        local_vars = jax.device_put(host_copy(variables), parallel.replicated(self.mesh))
        rows = []
        for name in list(cases)[jax.process_index():: jax.process_count()]:
            image, label = load_case(name)
            logits = self.window(local_vars, image)
            dice, loss = _score_jit(logits, jnp.asarray(label, jnp.int32), loss_fn=self.loss_fn,
                                    spec=self.labels)
            rows.append(np.append(np.asarray(dice, np.float64), float(loss)))
        rows_arr = np.asarray(rows, np.float64).reshape(len(rows), self.labels.n_scores + 1)  # dice…, loss
        table = _gather_rows(rows_arr, len(cases))
        per_class = table[:, :-1].mean(axis=0) * 100.0
        result = {"dice": [float(d) for d in per_class], "mean_dice": float(per_class.mean()),
                  "val_loss": float(table[:, -1].mean()), "cases": len(cases)}
        if self.labels.uses_regions:  # name the regions in the logs: dice_WT, dice_TC, dice_ET
            result.update({f"dice_{n}": d for n, d in zip(self.labels.score_names, result["dice"],
                                                           strict=True)})
        return result


@partial(jax.jit, static_argnames=("loss_fn", "spec"))
def _score_jit(logits: jax.Array, label: jax.Array, *, loss_fn: Callable,
               spec: LabelSpec) -> tuple[jax.Array, jax.Array]:
    """The Dice of ``logits (*spatial, K)`` vs ``label (*spatial)`` and the loss of the volume as a batch of
    one."""
    from nnunet_jax.metrics import label_dice

    return label_dice(logits, label, spec), loss_fn(logits[None], label[None])

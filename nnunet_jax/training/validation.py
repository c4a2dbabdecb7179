"""Validation: the sliding window over every validation volume of the fold, split across processes/devices.

Each process takes every ``process_count``-th case and runs its windows sharded over its own devices (a local
mesh: the processes see different numbers of windows, so they must not share a global computation); the
per-case rows (per-class Dice, loss) are then gathered from all processes. Dice follows docs/reference.md §4
via :func:`nnunet_jax.metrics.dice_from_logits` (BraTS region mode: :func:`nnunet_jax.metrics.region_dice`,
the WT, TC, ET Dice of the sigmoids > 0.5 with the same empty rule); reported numbers are means over cases
×100. A 2D net validates a 3D volume slice by slice (each slice a 2D sliding window), scored on the whole
volume.
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


def make_apply_fn(model: Any, mesh: Mesh) -> Callable[[Any, jax.Array], jax.Array]:
    """``apply(variables, windows) -> fp32 logits`` with the window batch split over ``mesh`` (local devices).

    Build it once per run: the sliding window compiles per function object (a static argument).
    """
    sharding = parallel.batch_sharding(mesh)

    def apply(variables: Any, x: jax.Array) -> jax.Array:
        x = jax.lax.with_sharding_constraint(x, sharding)
        out = model.apply(variables, x, train=False)
        return (out[0] if isinstance(out, tuple | list) else out).astype(jnp.float32)

    return apply


def window_batch(batch_size: int, mesh: Mesh) -> int:
    """Windows per model call: ``val_batch_size`` rounded up to a multiple of the local devices."""
    n_dev = mesh.devices.size
    return max(1, math.ceil(batch_size / n_dev)) * n_dev


def validate(variables: Any, apply_fn: Callable, cases: Sequence[str], load_case: LoadCase, n_class: int,
             roi_size: Sequence[int], *, loss_fn: Callable, mesh: Mesh, overlap: float = 0.5,
             blend: str = "gaussian", batch_size: int = 4, tta: bool = False,
             brats: bool = False) -> dict[str, Any]:
    """Per-class Dice (0–100), ``mean_dice`` and ``val_loss`` over ``cases``, identical on every process.

    ``variables`` are the (replicated) model variables, ``apply_fn`` from :func:`make_apply_fn` on ``mesh``.
    With ``brats`` the model has 3 region outputs and ``dice`` holds the WT, TC, ET Dice (``n_class`` is then
    unused); ``loss_fn`` must be the matching (region) loss.
    """
    from nnunet_jax.inference.sliding_window import sliding_window_inference
    from nnunet_jax.metrics import dice_from_logits, region_dice

    host = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a,
                        variables)
    local_vars = jax.device_put(host, parallel.replicated(mesh))
    windows = window_batch(batch_size, mesh)
    rows = []
    for name in list(cases)[jax.process_index():: jax.process_count()]:
        image, label = load_case(name)
        roi = tuple(int(r) for r in roi_size)
        run = partial(sliding_window_inference, apply_fn=apply_fn, params=local_vars, roi_size=roi,
                      overlap=overlap, blend=blend, batch_size=windows, tta=tta)
        if len(roi) == image.ndim - 2:  # a 2D net on a 3D volume: slice by slice along Z, Dice on the volume
            logits = jnp.stack([run(image[z]) for z in range(image.shape[0])])
        else:
            logits = run(image)
        dice, loss = _score(logits, jnp.asarray(label, jnp.int32), loss_fn, region_dice if brats
                            else dice_from_logits)
        rows.append(np.append(np.asarray(dice, np.float64), float(loss)))
    n_scores = 3 if brats else n_class - 1
    rows_arr = np.asarray(rows, np.float64).reshape(len(rows), n_scores + 1)  # dice per class/region + loss
    table = _gather_rows(rows_arr, len(cases))
    per_class = table[:, :-1].mean(axis=0) * 100.0
    return {"dice": [float(d) for d in per_class], "mean_dice": float(per_class.mean()),
            "val_loss": float(table[:, -1].mean()), "cases": len(cases)}


def _score(logits: jax.Array, label: jax.Array, loss_fn: Callable,
           dice_fn: Callable) -> tuple[jax.Array, jax.Array]:
    """``dice_fn(logits (*spatial, K), label (*spatial))`` and the loss of the volume as a batch of one."""
    return _score_jit(logits, label, loss_fn=loss_fn, dice_fn=dice_fn)


@partial(jax.jit, static_argnames=("loss_fn", "dice_fn"))
def _score_jit(logits: jax.Array, label: jax.Array, *, loss_fn: Callable,
               dice_fn: Callable) -> tuple[jax.Array, jax.Array]:
    return dice_fn(logits, label), loss_fn(logits[None], label[None])

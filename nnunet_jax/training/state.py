"""The train state: everything a resumed run needs to continue exactly where the killed one stopped.

Weights, batch statistics, optimizer state (with the injected learning rate), step and epoch counters, the
RNG key, early-stopping bookkeeping (best mean Dice and its epoch, epochs without improvement), the plateau
scheduler's memory, the loader position inside the epoch (with the epoch's running loss, so logs match too)
and the fp16 dynamic loss scale. One pytree of arrays, so Orbax saves and restores it in one piece.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

# Host-side bookkeeping fields: scalars that the loop (not the jitted step) updates between epochs.
HOST_FIELDS = ("epoch", "best_score", "best_epoch", "patience", "plateau_best", "plateau_bad", "loader_step",
               "loss_sum")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken (global)
    epoch: jax.Array  # int32: completed epochs
    params: Any
    batch_stats: Any  # {} unless norm="batch"
    opt_state: Any
    rng: jax.Array  # uint32 raw data of an 'rbg' key; per-step keys are fold_in(rng, step)
    best_score: jax.Array  # float32 best validation mean Dice (0-100), -1 before the first validation
    best_epoch: jax.Array  # int32 epoch (1-based, as logged) of best_score, -1 if none
    patience: jax.Array  # int32 validations since best_score last improved
    plateau_best: jax.Array  # float32 ReduceLROnPlateau memory: best validation loss (+inf at start)
    plateau_bad: jax.Array  # int32 ReduceLROnPlateau memory: epochs without improvement
    loader_step: jax.Array  # int32 steps already taken inside the current epoch
    loss_sum: jax.Array  # float32 sum of the train losses of the current epoch's steps so far
    loss_scale: jax.Array  # float32 fp16 dynamic loss scale (1 when unused)
    good_steps: jax.Array  # int32 finite steps since the loss scale last changed


def create(params: Any, batch_stats: Any, opt_state: Any, rng: jax.Array,
           loss_scale: float = 1.0) -> TrainState:
    """A fresh state (traceable: used inside the jitted initialiser)."""
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return TrainState(
        step=i32(0), epoch=i32(0), params=params, batch_stats=batch_stats, opt_state=opt_state, rng=rng,
        best_score=f32(-1.0), best_epoch=i32(-1), patience=i32(0), plateau_best=f32(np.inf),
        plateau_bad=i32(0), loader_step=i32(0), loss_sum=f32(0.0), loss_scale=f32(loss_scale),
        good_steps=i32(0),
    )


def host_scalars(state: TrainState) -> dict[str, float | int]:
    """The bookkeeping scalars as Python numbers (one device→host transfer)."""
    vals = jax.device_get({k: getattr(state, k) for k in (*HOST_FIELDS, "step")})
    return {k: float(v) if np.issubdtype(np.asarray(v).dtype, np.floating) else int(v)
            for k, v in vals.items()}


def replace_scalars(state: TrainState, sharding: jax.sharding.Sharding, **values: float | int) -> TrainState:
    """Set bookkeeping scalars from the host, keeping each field's dtype and the replicated sharding."""
    new = {}
    for name, value in values.items():
        old = getattr(state, name)
        new[name] = jax.device_put(np.asarray(value, dtype=old.dtype), sharding)
    return state.replace(**new)

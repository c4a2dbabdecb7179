"""The train state, in two parts: what the jitted step needs on the device, and the host's bookkeeping.

:class:`TrainState` (device, one pytree Orbax saves in one piece): step, weights, batch statistics, optimizer
state (with the injected learning rate), the RNG key and flax's fp16 dynamic loss scale. :class:`Progress`
(host, plain Python numbers, saved in the checkpoint's JSON meta next to the arrays): the epoch, the loader
position inside it with the epoch's running loss, early stopping (best mean Dice, its epoch, validations
without improvement) and the plateau scheduler's memory. Together they are everything a resumed run needs to
continue exactly where the killed one stopped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.training.dynamic_scale import DynamicScale

SCALE_PERIOD = 2000  # finite fp16 steps before the loss scale doubles (PyTorch GradScaler's growth_interval)
INITIAL_FP16_SCALE = 2.0**15


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken (global)
    params: Any
    batch_stats: Any  # {} unless norm="batch"
    opt_state: Any
    rng: jax.Array  # uint32 raw data of an 'rbg' key; per-step keys are fold_in(rng, step)
    dynamic_scale: DynamicScale  # fp16 loss scale (scale 1, unused, in fp32/bf16 runs)

    @property
    def loss_scale(self) -> jax.Array:
        return self.dynamic_scale.scale

    @property
    def good_steps(self) -> jax.Array:
        """Finite steps since the loss scale last changed."""
        return self.dynamic_scale.fin_steps


def loss_scaler(scale: float) -> DynamicScale:
    """GradScaler's rule: halve on a non-finite step (not below 1), double after SCALE_PERIOD finite ones
    (flax grows on the step after ``growth_interval`` finite steps, hence the ``- 1``)."""
    return DynamicScale(growth_factor=2.0, backoff_factor=0.5, growth_interval=SCALE_PERIOD - 1,
                        fin_steps=jnp.asarray(0, jnp.int32), scale=jnp.asarray(scale, jnp.float32),
                        minimum_scale=1.0)


def create(params: Any, batch_stats: Any, opt_state: Any, rng: jax.Array, loss_scale: float = 1.0
           ) -> TrainState:
    """A fresh state (traceable: used inside the jitted initialiser)."""
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=opt_state, rng=rng, dynamic_scale=loss_scaler(loss_scale))


@dataclass
class Progress:
    """Host-side bookkeeping of a run, saved in each checkpoint's meta (``progress``)."""

    epoch: int = 0  # completed epochs
    loader_step: int = 0  # steps already taken inside the current epoch
    loss_sum: float = 0.0  # float32 sum of the current epoch's train losses so far (summed as float32)
    best_score: float = -1.0  # best validation mean Dice (0-100), -1 before the first validation
    best_epoch: int = -1  # epoch (1-based, as logged) of best_score, -1 if none
    patience: int = 0  # validations since best_score last improved
    plateau_best: float = math.inf  # ReduceLROnPlateau memory: best validation loss
    plateau_bad: int = 0  # ReduceLROnPlateau memory: epochs without improvement

    def add_loss(self, loss: Any) -> None:
        """One step's loss into the running sum, in float32 (as the device would sum it)."""
        self.loss_sum = float(np.float32(self.loss_sum) + np.float32(loss))
        self.loader_step += 1

    def end_epoch(self) -> None:
        self.epoch += 1
        self.loader_step, self.loss_sum = 0, 0.0

    def to_meta(self) -> dict[str, Any]:
        """JSON-safe (infinity as None)."""
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> Progress:
        meta = meta or {}
        out = cls()
        for f in fields(cls):
            if f.name in meta:
                value = meta[f.name]
                setattr(out, f.name, math.inf if value is None else type(getattr(out, f.name))(value))
        return out

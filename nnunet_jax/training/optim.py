"""Optimizer factory and the per-epoch learning-rate schedulers of the seed (docs/reference.md §7).

The learning rate is an ``optax.inject_hyperparams`` hyperparameter, so it lives in the optimizer state (and
therefore in every checkpoint) and the per-epoch schedulers only rewrite one scalar between epochs, without
recompiling the train step.

Chain order: clip(global norm) → radam/adam/sgd-momentum → + wd·p → × (−lr) → × warm-up(step). This is the
decoupled decay of the reference (torch_optimizer RAdam / AdamW): p ← p − lr·wd·p − lr·update, with the decay
term computed from the parameters before the step and scaled by the same (warmed-up) learning rate.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

PLATEAU_THRESHOLD = 1e-4  # torch ReduceLROnPlateau defaults: mode min, rel threshold 1e-4, cooldown 0


def _chain(learning_rate, *, optimizer: str, weight_decay: float, momentum: float, clip: float,
           warmup_steps: int) -> optax.GradientTransformation:
    parts: list[optax.GradientTransformation] = []
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if optimizer == "radam":
        parts.append(optax.scale_by_radam(b1=0.9, b2=0.999, eps=1e-8))
    elif optimizer == "adam":
        parts.append(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))
    elif optimizer == "sgd":
        parts.append(optax.trace(decay=momentum, nesterov=False))
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected radam, adam or sgd")
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if warmup_steps > 0:
        parts.append(optax.scale_by_schedule(lambda count: jnp.minimum(1.0, (count + 1.0) / warmup_steps)))
    return optax.chain(*parts)


def make_optimizer(config: Any, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """The optimizer of ``config`` (optimizer, learning_rate, weight_decay, momentum, gradient_clip_val,
    lr_warmup_epochs); ``learning_rate`` is injected (see :func:`set_learning_rate`)."""
    return optax.inject_hyperparams(_chain, static_args=(
        "optimizer", "weight_decay", "momentum", "clip", "warmup_steps"))(
        learning_rate=float(config.learning_rate),
        optimizer=str(config.optimizer),
        weight_decay=float(config.weight_decay),
        momentum=float(config.momentum),
        clip=float(config.gradient_clip_val),
        warmup_steps=int(config.get("lr_warmup_epochs", 0)) * int(steps_per_epoch),
    )


def get_learning_rate(opt_state: Any) -> float:
    return float(np.asarray(opt_state.hyperparams["learning_rate"]))


def set_learning_rate(opt_state: Any, lr: float) -> Any:
    """A copy of ``opt_state`` with the injected learning rate replaced (same dtype and sharding)."""
    old = opt_state.hyperparams["learning_rate"]
    new = jnp.asarray(lr, dtype=old.dtype)
    if hasattr(old, "sharding"):
        import jax

        new = jax.device_put(new, old.sharding)
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": new})


def epoch_learning_rate(config: Any, epoch: int) -> float:
    """Learning rate of epoch ``epoch`` (0-based) for the stateless schedulers (none, multistep, cosine).

    multistep = torch ``MultiStepLR(milestones=steps, gamma=factor)``; cosine = ``CosineAnnealingLR(T_max=
    max_epochs)`` with eta_min 0; both stepped once per epoch.
    """
    base = float(config.learning_rate)
    kind = str(config.scheduler)
    if kind in ("none", "plateau"):
        return base
    if kind == "multistep":
        return base * float(config.factor) ** sum(1 for m in config.steps if epoch >= int(m))
    if kind == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(epoch, config.max_epochs) / config.max_epochs))
    raise ValueError(f"unknown scheduler {kind!r}; expected none, multistep, cosine or plateau")


def plateau_step(lr: float, best: float, bad_epochs: int, val_loss: float, factor: float,
                 patience: int, threshold: float = PLATEAU_THRESHOLD) -> tuple[float, float, int]:
    """One ``ReduceLROnPlateau.step(val_loss)`` (mode min, relative threshold): returns (lr, best, bad)."""
    if val_loss < best * (1.0 - threshold):  # torch's test, whatever the sign; best starts at +inf
        return lr, val_loss, 0
    bad_epochs += 1
    if bad_epochs > patience:
        return lr * factor, best, 0
    return lr, best, bad_epochs

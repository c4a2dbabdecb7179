"""The jitted train step and the state initialiser.

Data parallelism = one ``jax.jit`` with shardings: the state is replicated, the batch is split over the mesh's
``data`` axis, the state is donated. The loss is the mean over the *global* batch, so XLA's all-reduce of the
gradient is the whole story (no pmean: DESIGN.md, traps) and N devices compute what one device would.

Mixed precision: the model computes in ``compute_dtype`` (bf16 by default under ``--amp``) from fp32 master
params and returns fp32 logits; the loss is fp32. With fp16 the loss is multiplied by a dynamic scale: a step
whose gradients are not finite is skipped and halves the scale, 2000 finite steps in a row double it (flax's
``DynamicScale`` with PyTorch GradScaler's schedule, see ``state.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from nnunet_jax import parallel
from nnunet_jax.inference.forward import model_variables
from nnunet_jax.training import state as state_lib
from nnunet_jax.training.state import INITIAL_FP16_SCALE, TrainState

# XLA's RngBitGenerator instead of threefry: compiling threefry for a U-Net's ~30 initialisers took minutes on
# XLA:CPU (jax 0.12, measured: 20 normal draws 110-170 s vs 1 s), for no statistical benefit here.
PRNG_IMPL = "rbg"


def raw_key(seed: int) -> jax.Array:
    """The raw (uint32) data of the run's root key; the state stores raw data so Orbax sees plain arrays."""
    return jax.random.key_data(jax.random.key(seed, impl=PRNG_IMPL))


def _init_fn(model: Any, tx: optax.GradientTransformation, input_shape: tuple[int, ...],
             fp16: bool) -> Callable[[jax.Array], TrainState]:
    def init(raw_key: jax.Array) -> TrainState:
        init_key, state_key = jax.random.split(jax.random.wrap_key_data(raw_key, impl=PRNG_IMPL))
        variables = model.init({"params": init_key, "dropout": init_key}, jnp.zeros((1, *input_shape)),
                               train=False)
        params = variables["params"]
        return state_lib.create(params, variables.get("batch_stats", {}), tx.init(params),
                                jax.random.key_data(state_key), INITIAL_FP16_SCALE if fp16 else 1.0)

    return init


def init_state(model: Any, tx: optax.GradientTransformation, input_shape: tuple[int, ...], seed: int,
               mesh: Mesh, fp16: bool = False) -> TrainState:
    """Initialise params and optimizer state directly replicated on ``mesh``.

    ``input_shape`` = ``(*patch, C)`` (one sample, channels last).
    """
    init = _init_fn(model, tx, input_shape, fp16)
    return jax.jit(init, out_shardings=parallel.replicated(mesh))(raw_key(seed))


def abstract_state(model: Any, tx: optax.GradientTransformation, input_shape: tuple[int, ...], mesh: Mesh,
                   fp16: bool = False) -> TrainState:
    """Shapes, dtypes and shardings of the state without allocating it (the restore target)."""
    shapes = jax.eval_shape(_init_fn(model, tx, input_shape, fp16), raw_key(0))
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def make_train_step(model: Any, loss_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh,
                    fp16: bool = False) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``.

    batch = ``{"image": (N, *patch, C), "label": (N, *patch[, 1])}`` as global arrays split on ``data``;
    metrics (replicated scalars): loss, grad_norm, finite."""

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=PRNG_IMPL), state.step)

        def loss_of(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            variables = model_variables(params, state.batch_stats)
            if state.batch_stats:
                out, updates = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"],
                                           rngs={"dropout": key})
                new_stats = updates["batch_stats"]
            else:
                out = model.apply(variables, batch["image"], train=True, rngs={"dropout": key})
                new_stats = state.batch_stats
            loss = loss_fn(out, batch["label"]).astype(jnp.float32)
            return loss, (loss, new_stats)

        if fp16:  # flax's DynamicScale multiplies the loss and divides the gradients back
            dyn, finite, (_, (loss, new_stats)), grads = state.dynamic_scale.value_and_grad(
                loss_of, has_aux=True)(state.params)
        else:
            grads, (loss, new_stats) = jax.grad(loss_of, has_aux=True)(state.params)
            dyn = state.dynamic_scale
        grad_norm = optax.tree.norm(grads)
        if not fp16:
            finite = jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if fp16:  # skip a non-finite step entirely (the scale has already been halved)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, opt_state, new_stats = (keep(params, state.params), keep(opt_state, state.opt_state),
                                            keep(new_stats, state.batch_stats))
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                                  opt_state=opt_state, dynamic_scale=dyn)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    repl = parallel.replicated(mesh)
    return jax.jit(step, in_shardings=(repl, parallel.batch_sharding(mesh)), out_shardings=(repl, repl),
                   donate_argnums=0)


def eval_variables(state: TrainState) -> dict[str, Any]:
    """The model variables of a train state (what the forward and the checkpoint reader take)."""
    return model_variables(state.params, state.batch_stats)

"""Optimizer / scheduler semantics (docs/reference.md §7) checked against hand-derived values."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nnunet_jax import parallel
from nnunet_jax.configs.default import get_config
from nnunet_jax.training import optim
from nnunet_jax.training import step as step_lib


def _cfg(**kw):
    c = get_config()
    for k, v in kw.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("name", ["radam", "adam", "sgd"])
def test_weight_decay_is_decoupled(name):
    # Zero gradient: the optimizer's own update is 0, so one step is exactly p <- p - lr * wd * p.
    tx = optim.make_optimizer(_cfg(optimizer=name, learning_rate=0.1, weight_decay=0.5))
    p = {"w": jnp.array([1.0, -2.0, 4.0])}
    upd, _ = tx.update({"w": jnp.zeros(3)}, tx.init(p), p)
    np.testing.assert_allclose(optax.apply_updates(p, upd)["w"], p["w"] * (1 - 0.1 * 0.5), rtol=1e-6)


def test_adam_decay_uses_params_before_the_step():
    # AdamW / torch_optimizer RAdam: p1 = p0 - lr * (update + wd * p0), update of step 1 = sign(g) (Adam).
    tx = optim.make_optimizer(_cfg(optimizer="adam", learning_rate=0.01, weight_decay=0.1))
    p = {"w": jnp.array([2.0, -3.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    upd, _ = tx.update(g, tx.init(p), p)
    expected = p["w"] - 0.01 * (jnp.sign(g["w"]) * (1 / (1 + 1e-8 / jnp.abs(g["w"]))) + 0.1 * p["w"])
    np.testing.assert_allclose(optax.apply_updates(p, upd)["w"], expected, rtol=1e-6)


def test_sgd_momentum_accumulates():
    tx = optim.make_optimizer(_cfg(optimizer="sgd", learning_rate=0.1, weight_decay=0.0, momentum=0.99))
    p = {"w": jnp.array([0.0])}
    s = tx.init(p)
    g = {"w": jnp.array([1.0])}
    u1, s = tx.update(g, s, p)
    u2, s = tx.update(g, s, p)
    np.testing.assert_allclose([u1["w"][0], u2["w"][0]], [-0.1, -0.1 * 1.99], rtol=1e-6)


def test_gradient_clipping_by_global_norm():
    tx = optim.make_optimizer(_cfg(optimizer="sgd", learning_rate=1.0, weight_decay=0.0,
                                   gradient_clip_val=1.0))
    p = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    u, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(np.concatenate([u["a"], u["b"]]), -np.array([3.0, 0.0, 4.0]) / 5.0, rtol=1e-6)
    tx0 = optim.make_optimizer(_cfg(optimizer="sgd", learning_rate=1.0, weight_decay=0.0))
    u0, _ = tx0.update(g, tx0.init(p), p)
    np.testing.assert_allclose(u0["b"], [-4.0])  # no clipping by default (gradient_clip_val 0)


def test_learning_rate_lives_in_the_state_and_can_be_changed():
    tx = optim.make_optimizer(_cfg(optimizer="sgd", learning_rate=0.1, weight_decay=0.0))
    p = {"w": jnp.zeros(1)}
    s = tx.init(p)
    assert optim.get_learning_rate(s) == pytest.approx(0.1)
    s = optim.set_learning_rate(s, 0.02)
    u, s = tx.update({"w": jnp.ones(1)}, s, p)
    np.testing.assert_allclose(u["w"], [-0.02], rtol=1e-6)
    assert optim.get_learning_rate(s) == pytest.approx(0.02)


def test_linear_warmup_per_step():
    tx = optim.make_optimizer(_cfg(optimizer="sgd", learning_rate=1.0, weight_decay=0.0, momentum=0.0,
                                   lr_warmup_epochs=2), steps_per_epoch=2)
    p = {"w": jnp.zeros(1)}
    s = tx.init(p)
    got = []
    for _ in range(6):
        u, s = tx.update({"w": jnp.ones(1)}, s, p)
        got.append(-float(u["w"][0]))
    np.testing.assert_allclose(got, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rtol=1e-6)


def test_multistep_and_cosine_schedules():
    c = _cfg(scheduler="multistep", steps=(2, 4), factor=0.3, learning_rate=1.0)
    np.testing.assert_allclose([optim.epoch_learning_rate(c, e) for e in range(6)],
                               [1, 1, 0.3, 0.3, 0.09, 0.09], rtol=1e-9)
    c = _cfg(scheduler="cosine", max_epochs=4, learning_rate=2.0)
    np.testing.assert_allclose([optim.epoch_learning_rate(c, e) for e in range(5)],
                               [2.0, 1.0 + math.sqrt(0.5), 1.0, 1.0 - math.sqrt(0.5), 0.0], atol=1e-12)
    assert optim.epoch_learning_rate(_cfg(scheduler="none", learning_rate=0.5), 99) == 0.5
    with pytest.raises(ValueError, match="unknown scheduler"):
        optim.epoch_learning_rate(_cfg(scheduler="linear"), 0)


def test_plateau_follows_torch_reduce_lr_on_plateau():
    # torch ReduceLROnPlateau(factor=0.5, patience=2), mode min, threshold 1e-4 rel: the lr drops on the
    # 3rd epoch in a row without a relative improvement of 1e-4, and the bad-epoch count restarts.
    lr, best, bad = 1.0, math.inf, 0
    losses = [1.0, 0.9, 0.9, 0.89995, 0.95, 0.95, 0.8, 0.8, 0.8, 0.8]
    lrs = []
    for v in losses:
        lr, best, bad = optim.plateau_step(lr, best, bad, v, factor=0.5, patience=2)
        lrs.append(lr)
    # 0.89995 is not < 0.9 * (1 - 1e-4) = 0.89991: a bad epoch (3rd: 0.9, 0.89995, 0.95 -> drop at 0.95)
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25]


class Lin(nn.Module):
    """The smallest model the train step takes."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(2)(x)


def test_fp16_loss_scaling_skips_overflowing_steps():
    mesh = parallel.make_mesh()
    tx = optim.make_optimizer(_cfg(optimizer="sgd", learning_rate=0.1, weight_decay=0.0))

    def loss_fn(out, y):
        return jnp.mean(out**2) * y.mean()

    state = step_lib.init_state(Lin(), tx, (3,), 0, mesh, fp16=True)
    assert float(state.loss_scale) == 2.0**15
    train = step_lib.make_train_step(Lin(), loss_fn, tx, mesh, fp16=True)
    n = mesh.devices.size
    ok = parallel.global_batch({"image": np.ones((n, 3), np.float32),
                                "label": np.ones((n,), np.float32)}, mesh)
    bad = parallel.global_batch({"image": np.ones((n, 3), np.float32),
                                 "label": np.full((n,), np.inf, np.float32)}, mesh)
    before = jax.device_get(state.params)
    state, m = train(state, bad)
    assert not bool(m["finite"]) and float(state.loss_scale) == 2.0**14
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)  # step skipped
    state, m = train(state, ok)
    assert bool(m["finite"]) and int(state.good_steps) == 1
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params), before)
    assert any(jax.tree.leaves(changed))


def test_fp16_loss_scale_doubles_after_2000_finite_steps():
    """PyTorch GradScaler's schedule (growth_interval 2000): the 2000th finite step in a row doubles."""
    from nnunet_jax.training.state import SCALE_PERIOD

    mesh = parallel.make_mesh()
    tx = optim.make_optimizer(_cfg(optimizer="sgd", learning_rate=0.0, weight_decay=0.0))
    state = step_lib.init_state(Lin(), tx, (2,), 0, mesh, fp16=True)
    train = step_lib.make_train_step(Lin(), lambda out, y: jnp.mean(out**2) * 0.0 + jnp.mean(y) * 0.0, tx,
                                     mesh, fp16=True)
    n = mesh.devices.size
    ok = parallel.global_batch({"image": np.ones((n, 2), np.float32), "label": np.ones((n,), np.float32)},
                               mesh)
    for _ in range(SCALE_PERIOD - 1):
        state, _ = train(state, ok)
    assert float(state.loss_scale) == 2.0**15 and int(state.good_steps) == SCALE_PERIOD - 1
    state, _ = train(state, ok)
    assert float(state.loss_scale) == 2.0**16 and int(state.good_steps) == 0

"""The CPU convolution (models/conv.py): value and gradients equal lax's, and the switch leaves other programs
exactly as they were."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nnunet_jax.models import conv as conv_lib
from nnunet_jax.models.unet import UNet, same_padding

CASES = [  # (spatial shape, kernel, stride)
    ((8, 8, 8), (3, 3, 3), (1, 1, 1)),
    ((8, 8, 8), (3, 3, 3), (2, 2, 2)),
    ((7, 9, 6), (3, 3, 3), (2, 2, 2)),  # odd sizes: the last stride block is partial
    ((4, 8, 8), (1, 3, 3), (1, 1, 1)),
    ((4, 8, 8), (1, 3, 3), (1, 2, 2)),
    ((6, 6, 6), (1, 1, 1), (1, 1, 1)),
    ((6, 6, 6), (1, 1, 1), (2, 2, 2)),
    ((12, 12), (3, 3), (1, 1)),
    ((12, 10), (3, 3), (2, 2)),
    ((9, 11), (1, 1), (1, 1)),
]


def _spec(nd):
    sp = "DHW"[3 - nd:]
    return f"N{sp}C", f"{sp}IO", f"N{sp}C"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("spatial", "kernel", "stride"), CASES)
def test_value_and_gradients_equal_lax(spatial, kernel, stride, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, *spatial, 5)), dtype)
    w = jnp.asarray(rng.standard_normal((*kernel, 5, 6)) * 0.2, dtype)
    pads = same_padding(kernel, stride)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, _spec(len(spatial)))
    out_shape = [-(-n // s) for n, s in zip(spatial, stride, strict=True)]
    probe = jnp.asarray(rng.standard_normal((2, *out_shape, 6)), dtype)

    def loss(conv):
        return lambda x_, w_: (conv(x_, w_, stride, pads, dimension_numbers=dn).astype(jnp.float32)
                               * probe).sum()

    ref_val = lax.conv_general_dilated(x, w, stride, pads, dimension_numbers=dn)
    val = jax.jit(lambda a, b: conv_lib.conv_general_dilated(a, b, stride, pads, dimension_numbers=dn))(x, w)
    np.testing.assert_array_equal(np.asarray(val, np.float32), np.asarray(ref_val, np.float32))
    ref = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    if len(spatial) == 3:  # the path nn.Conv takes on the CPU
        ours = jax.jit(jax.grad(loss(conv_lib.conv_general_dilated), (0, 1)))(x, w)
    else:  # 2D convs keep XLA's gradients; the formulation itself is N-d
        ours = (ref[0], jax.jit(conv_lib.weight_gradient, static_argnums=(2, 3, 4))(
            x, probe, kernel, stride, tuple(pads)).astype(dtype))
    if any(s > 1 for s in stride):  # the strided input gradient, checked directly in 2D and 3D
        dx = jax.jit(conv_lib.strided_input_gradient, static_argnums=(2, 3, 4))(
            probe, w, x.shape, stride, tuple(pads)).astype(dtype)
        ours = (dx, ours[1])
    # float32: summation order only; bf16: ours sums in float32 (one rounding), lax partly in bf16
    rtol = 2e-5 if dtype == jnp.float32 else 2e-2
    for name, a, b in zip(("input", "weight"), ref, ours, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * np.abs(a).max(), err_msg=name)


def test_unsupported_forms_are_lax_unchanged():
    x, w = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    grouped = conv_lib.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
    jaxpr = jax.make_jaxpr(lambda a, b: conv_lib.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2))(x, w)
    assert "custom_vjp" not in str(jaxpr)
    plain = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
    np.testing.assert_array_equal(grouped, plain)


def _lowered_train_grad(monkeypatch, backend=None, switch=None):
    if backend is not None:
        monkeypatch.setattr(conv_lib.jax, "default_backend", lambda: backend)
    if switch is not None:
        monkeypatch.setenv(conv_lib.SWITCH_ENV, switch)
    model = UNet(2, ((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), filters=(4, 8, 16))
    x = jnp.zeros((1, 8, 8, 8, 1))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def loss(v, x_):
        return model.apply(v, x_, train=True).sum()

    return jax.jit(jax.grad(loss)).lower(variables, x).as_text()


def test_switch_off_and_gpu_programs_are_the_plain_ones(monkeypatch):
    """Off the CPU (or with the switch off) nn.Conv gets lax's own convolution: the same program as before."""
    on = _lowered_train_grad(monkeypatch)
    with monkeypatch.context() as m:
        gpu = _lowered_train_grad(m, backend="gpu")
    with monkeypatch.context() as m:
        off = _lowered_train_grad(m, switch="xla")
    with monkeypatch.context() as m:
        m.setattr(conv_lib, "conv_general_dilated_fn", lambda: lax.conv_general_dilated)
        import nnunet_jax.models.unet as unet

        m.setattr(unet, "conv_general_dilated_fn", lambda: None)  # flax's default: lax's convolution
        plain = _lowered_train_grad(m, switch="")
    assert gpu == off == plain
    assert on != plain  # on the CPU the custom gradient is in the program
    with monkeypatch.context() as m:
        m.setattr(conv_lib.jax, "default_backend", lambda: "gpu")
        assert conv_lib.conv_general_dilated_fn() is lax.conv_general_dilated
        assert not conv_lib.fast_cpu_conv_enabled()

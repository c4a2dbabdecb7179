"""U-Net shapes, padding, dtypes, init statistics, parameter count, options and the weight converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnunet_jax.interop.monai import params_to_torch_state_dict, torch_state_dict_to_variables
from nnunet_jax.models import UNet, count_params
from nnunet_jax.models.unet import UpConv, _conv, conv_init, same_padding, upconv_init
from nnunet_jax.planning.topology import plan_topology

K3, S1, S2 = (3, 3, 3), (1, 1, 1), (2, 2, 2)
ANISO_K = ((1, 3, 3), (1, 3, 3), (3, 3, 3))
ANISO_S = ((1, 1, 1), (1, 2, 2), (1, 2, 2))


def tiny(dim=3, **options):
    """A 3-level net with 4/8/16 filters (2D: 3x3 kernels)."""
    k, s1, s2 = (3,) * dim, (1,) * dim, (2,) * dim
    options.setdefault("filters", (4, 8, 16))
    return UNet(3, (k, k, k), (s1, s2, s2), **options)


def init(model, shape, seed=0):
    """Variables of ``model`` without ``model.init``: shapes from ``jax.eval_shape``, values from numpy.

    (Threefry initialisation compiles ~1 s per parameter shape on these CPUs; init itself is tested below.)
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.8, 1.2, size=leaf.shape)
        else:
            value = rng.uniform(-0.1, 0.1, size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (tiny(3), (2, 16, 16, 16, 2)),
        (tiny(2), (3, 16, 24, 1)),
        (UNet(2, ANISO_K, ANISO_S, filters=(4, 8, 16)), (1, 5, 12, 8, 3)),  # odd depth, stride 1 in Z
    ],
    ids=["3d", "2d", "anisotropic"],
)
def test_output_shape_and_dtype(model, shape):
    variables = init(model, shape)
    out = model.apply(variables, rand(shape))
    assert out.shape == (*shape[:-1], model.n_class)
    assert out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_deep_supervision_heads():
    model = UNet(2, ANISO_K + ((3, 3, 3),), ANISO_S + ((2, 2, 2),), filters=(4, 8, 8, 16),
                 deep_supervision=True, deep_supr_num=2)
    shape = (1, 4, 16, 16, 1)
    variables = init(model, shape)  # heads exist although init ran with train=False
    assert {"ds_head_1", "ds_head_2"} <= set(variables["params"])
    assert variables["params"]["ds_head_2"]["kernel"].shape == (1, 1, 1, 8, 2)
    x = rand(shape)
    main, h1, h2 = model.apply(variables, x, train=True)
    assert main.shape == (1, 4, 16, 16, 2)
    assert h1.shape == (1, 4, 8, 8, 2)  # level 1: strides (1,1,1)*(1,2,2)
    assert h2.shape == (1, 4, 4, 4, 2)  # level 2: * (1,2,2)
    assert h1.dtype == h2.dtype == jnp.float32
    evaluated = model.apply(variables, x, train=False)
    assert isinstance(evaluated, jax.Array)
    np.testing.assert_allclose(evaluated, main, rtol=1e-5, atol=1e-5)  # instance norm: same in both modes


def _numpy_conv2d(x, w, stride, pad):
    """Direct cross-correlation, NHWC x HWIO, symmetric zero padding."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[:2]
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[-1]), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j] = np.einsum("nhwc,hwco->no", patch, w)
    return out


@pytest.mark.parametrize("size", [(7, 9), (8, 6)])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_padding_symmetric(size, stride):
    assert same_padding((3, 1), (2, 2)) == [(1, 1), (0, 0)]
    x = np.random.default_rng(1).normal(size=(1, *size, 2))
    conv = _conv(3, (3, 3), (stride, stride), "c", jnp.float32, jnp.float32)
    variables = conv.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    w = np.asarray(variables["params"]["kernel"], np.float64)
    got = conv.apply(variables, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, _numpy_conv2d(x, w, stride, pad=1), rtol=1e-5, atol=1e-5)


def test_upconv_places_kernel_offset_like_pytorch():
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 4)).astype(np.float32)  # (N, H, W, C)
    up = UpConv(6, (2, 3))
    variables = up.init(jax.random.key(0), jnp.asarray(x))
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    params["bias"] = np.arange(6, dtype=np.float32)
    got = np.asarray(up.apply({"params": params}, jnp.asarray(x)))
    assert got.shape == (2, 6, 15, 6)
    w = params["kernel"]  # (2, 3, I, O): out[2i + r, 3j + q] = x[i, j] @ w[r, q] + b
    want = np.zeros(got.shape, np.float32)
    for r in range(2):
        for q in range(3):
            want[:, r::2, q::3] = np.einsum("nhwi,io->nhwo", x, w[r, q]) + params["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # docs/reference.md §2: lax.conv_transpose needs the kernel flipped to place it the same way.
    flipped = jax.lax.conv_transpose(jnp.asarray(x), jnp.asarray(w[::-1, ::-1]), (2, 3), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(flipped + params["bias"], want, rtol=1e-5, atol=1e-5)


def test_bf16_compute_fp32_params_and_logits():
    shape = (1, 16, 16, 16, 2)
    f32, bf16 = tiny(3), tiny(3, dtype=jnp.bfloat16)
    variables = init(bf16, shape)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    x = rand(shape)
    out, inter = bf16.apply(variables, x, capture_intermediates=True)
    assert out.dtype == jnp.float32
    block_out = inter["intermediates"]["encoder_1"]["__call__"][0]
    norm_out = inter["intermediates"]["encoder_1"]["norm1"]["__call__"][0]
    assert block_out.dtype == norm_out.dtype == jnp.bfloat16
    ref = f32.apply(variables, x)
    err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 0 < err < 0.1


def test_initialisers_match_pytorch_kaiming():
    gain = np.sqrt(2.0 / (1 + 0.01**2))  # kaiming_normal_(a=0.01)
    conv = np.asarray(conv_init(jax.random.key(3), (3, 3, 3, 64, 32)))  # fan_in = 64 * 27
    assert abs(conv.std() / (gain / np.sqrt(64 * 27)) - 1) < 0.03
    assert abs(conv.mean()) < 0.02 * conv.std()
    up = np.asarray(upconv_init(jax.random.key(4), (2, 2, 2, 128, 64)))  # PyTorch: fan_in = out * prod(k)
    assert abs(up.std() / (gain / np.sqrt(64 * 8)) - 1) < 0.03


def test_model_init_uses_them():
    model = tiny(3, norm="batch", filters=(8, 16, 16))
    key = jax.random.key(0, impl="unsafe_rbg")  # same initialisers, faster to compile than threefry
    variables = model.init(key, jnp.zeros((1, 4, 4, 4, 1)))
    params, stats = variables["params"], variables["batch_stats"]
    conv = np.asarray(params["encoder_1"]["conv2"]["kernel"])
    assert abs(conv.std() / np.sqrt(2 / (16 * 27)) - 1) < 0.1
    up = np.asarray(params["decoder_0"]["upconv"]["kernel"])  # (2,2,2,16,8): fan_in 8 * 8
    assert up.shape == (2, 2, 2, 16, 8)
    assert abs(up.std() / np.sqrt(2 / (8 * 8)) - 1) < 0.15
    np.testing.assert_array_equal(params["decoder_1"]["upconv"]["bias"], 0)
    np.testing.assert_array_equal(params["head"]["bias"], 0)
    np.testing.assert_array_equal(params["encoder_1"]["norm1"]["scale"], 1)
    np.testing.assert_array_equal(params["encoder_1"]["norm1"]["bias"], 0)
    np.testing.assert_array_equal(stats["encoder_1"]["norm1"]["mean"], 0)
    np.testing.assert_array_equal(stats["encoder_1"]["norm1"]["var"], 1)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


def test_param_count_task01():
    topology = plan_topology((128, 128, 128), (1.0, 1.0, 1.0))
    model = UNet.from_topology(topology, 4)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 128, 128, 128, 4),
                                                                                 jnp.float32))
    assert count_params(shapes["params"]) == 31_192_868
    ds = UNet.from_topology(topology.to_dict(), 4, deep_supervision=True, deep_supr_num=2)
    shapes = jax.eval_shape(ds.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 64, 4), jnp.float32))
    assert count_params(shapes["params"]) == 31_192_868 + (64 * 4 + 4) + (128 * 4 + 4)
    wide = UNet.from_topology(topology, 4, filters=(16, 32, 64, 128, 256, 256))
    assert wide.widths == (16, 32, 64, 128, 256, 256)


OPTIONS = [
    dict(norm="batch"),
    dict(norm="group"),
    dict(residual=True),
    dict(residual=True, norm="batch"),
    dict(attention=True),
    dict(drop_block=True),
    dict(deep_supervision=True, deep_supr_num=1),
    dict(negative_slope=0.2, attention=True, residual=True, drop_block=True, norm="group",
         deep_supervision=True, deep_supr_num=1, dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options_build_and_run(options):
    model = tiny(2, **options)
    shape = (2, 16, 16, 1)
    variables = init(model, shape)
    x = rand(shape)
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(1)})
    main = out[0] if options.get("deep_supervision") else out
    assert main.shape == (2, 16, 16, 3) and main.dtype == jnp.float32
    assert np.isfinite(np.asarray(main)).all()
    if options.get("norm") == "batch":
        new_mean = updates["batch_stats"]["input_block"]["norm1"]["mean"]
        assert not np.allclose(new_mean, 0)  # running statistics moved
    evaluated = model.apply(variables, x)
    assert evaluated.shape == main.shape
    if options.get("residual"):
        assert "conv3" in variables["params"]["input_block"]  # 1 -> 4 channels: projection shortcut
        assert "conv3" in variables["params"]["encoder_1"]


def test_residual_identity_shortcut():
    model = UNet(2, (K3, K3, K3), (S1, S2, S1), filters=(4, 8, 8), residual=True)
    variables = init(model, (1, 8, 8, 8, 4))
    assert "conv3" not in variables["params"]["bottleneck"]  # same width, stride 1: identity shortcut
    assert "conv3" not in variables["params"]["input_block"]


def test_drop_block_is_random_in_training_only():
    model = tiny(2, drop_block=True)
    shape = (1, 16, 16, 1)
    variables, x = init(model, shape), rand(shape)

    def run(seed):
        return model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed)})

    assert not np.allclose(run(0), run(1))
    np.testing.assert_array_equal(run(0), run(0))
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, x, train=True)


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="divisible"):
        init(tiny(3), (1, 10, 16, 16, 1))
    with pytest.raises(ValueError, match="deep_supr_num"):
        init(tiny(2, deep_supervision=True, deep_supr_num=2), (1, 16, 16, 1))
    with pytest.raises(ValueError, match="norm"):
        init(tiny(2, norm="layer"), (1, 16, 16, 1))
    with pytest.raises(ValueError, match="rank"):
        init(tiny(2), (1, 16, 16, 16, 1))
    with pytest.raises(ValueError, match="filters"):
        init(tiny(2, filters=(4, 8)), (1, 16, 16, 1))


def _random_variables(model, shape):
    """Init, then perturb every leaf so that a transposition mistake cannot hide behind zeros/ones."""
    leaves, treedef = jax.tree_util.tree_flatten(init(model, shape))
    rng = np.random.default_rng(5)
    leaves = [jnp.asarray(rng.uniform(0.5, 1.5, size=leaf.shape).astype(np.float32)) for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize(
    "options",
    [
        dict(norm="batch", residual=True, deep_supervision=True, deep_supr_num=1),
        dict(attention=True, norm="group"),
    ],
    ids=["batch-res-ds", "attention"],
)
def test_convert_round_trip(options):
    model = UNet(2, ANISO_K, ANISO_S, filters=(4, 8, 16), **options)
    shape = (1, 3, 8, 8, 2)
    variables = _random_variables(model, shape)
    sd = params_to_torch_state_dict(variables)
    assert sd["input_block.conv1.conv.weight"].shape == (4, 2, 1, 3, 3)  # (O, I, *k)
    assert sd["upsamples.0.transp_conv.conv.weight"].shape == (16, 8, 1, 2, 2)  # (I, O, *k)
    np.testing.assert_array_equal(sd["input_block.conv1.conv.weight"],
                                  np.transpose(variables["params"]["input_block"]["conv1"]["kernel"],
                                               (4, 3, 0, 1, 2)))
    back = torch_state_dict_to_variables(sd, model)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    if options.get("norm") == "batch":
        assert sd["input_block.norm1.num_batches_tracked"].dtype == np.int64
        assert "skip_layers.next_layer.next_layer.conv3.conv.weight" in sd  # MONAI's alias of bottleneck
        assert "skip_layers.next_layer.super_head.conv.conv.bias" in sd
    # NVIDIA nnU-Net (Lightning) checkpoints: {"state_dict": {"model." + key: ...}} plus non-model keys.
    nvidia = {"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "loss.dummy": np.zeros(1)}}
    again = torch_state_dict_to_variables(nvidia, model)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


def test_convert_errors_name_the_keys():
    model = tiny(2)
    variables = _random_variables(model, (1, 8, 8, 1))
    sd = params_to_torch_state_dict(variables, monai_aliases=False)
    missing = {k: v for k, v in sd.items() if k != "bottleneck.conv2.conv.weight"}
    with pytest.raises(KeyError, match=r"missing \['bottleneck.conv2.conv.weight'\]"):
        torch_state_dict_to_variables(missing, model)
    with pytest.raises(KeyError, match="unexpected.*bottleneck.conv9.conv.weight"):
        torch_state_dict_to_variables({**sd, "bottleneck.conv9.conv.weight": np.zeros(1)}, model)
    reshaped = {**sd, "output_block.conv.conv.weight": np.zeros((3, 5, 1, 1), np.float32)}
    expected = r"output_block.conv.conv.weight: \(3, 5, 1, 1\) != expected \(3, 4, 1, 1\)"
    with pytest.raises(ValueError, match=expected):
        torch_state_dict_to_variables(reshaped, model)
    # MONAI's default trans_bias=False: no transposed-conv biases at all → zeros
    no_bias = params_to_torch_state_dict(variables, trans_bias=False)
    assert not any(k.endswith("transp_conv.conv.bias") for k in no_bias)
    loaded = torch_state_dict_to_variables(no_bias, model)
    np.testing.assert_array_equal(loaded["params"]["decoder_0"]["upconv"]["bias"], 0)
    np.testing.assert_array_equal(loaded["params"]["decoder_0"]["upconv"]["kernel"],
                                  variables["params"]["decoder_0"]["upconv"]["kernel"])

"""nnU-Net v2's networks in flax (models.dynamic_unet) and their plans/weights interop
(interop.nnunetv2.network), without torch: output shapes, parameter counts against dna's layer list, and one
clear error naming the file and the field for each bad plans.json or state dict. Numerical parity with dna is
in tests/parity/test_nnv2_network.py."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnunet_jax.interop.nnunetv2.network import load_weights, network_from_plans, state_dict_shapes
from nnunet_jax.interop.nnunetv2.plans import V2Plans
from nnunet_jax.io import DatasetError
from nnunet_jax.models.dynamic_unet import PlainConvUNet, ResidualEncoderUNet
from nnunet_jax.models.unet import count_params

from .test_unet import init as variables_for  # variables without module.init (fast)

ANISO3 = dict(n_stages=4, features_per_stage=[4, 8, 8, 16],
              kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
              strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
DNA = "dynamic_network_architectures.architectures.unet"
SMALL2 = dict(n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=3, strides=[1, 2, 2])


def param_count(module, in_channels, spatial):
    x = jax.ShapeDtypeStruct((1, *spatial, in_channels), jnp.float32)
    return count_params(jax.eval_shape(module.init, jax.random.key(0), x)["params"])


@pytest.mark.parametrize("cls,extra", [(PlainConvUNet, {"n_conv_per_stage": 2}),
                                       (ResidualEncoderUNet, {"n_blocks_per_stage": [1, 2, 1, 2]})])
def test_shapes_3d_with_and_without_deep_supervision(cls, extra):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 16, 16, 2)), jnp.float32)
    net = cls(num_classes=3, n_conv_per_stage_decoder=1, **ANISO3, **extra)
    variables = variables_for(net, x.shape)
    y = jax.jit(net.apply)(variables, x)
    assert y.shape == (2, 4, 16, 16, 3) and y.dtype == jnp.float32
    ds = cls(num_classes=3, n_conv_per_stage_decoder=1, deep_supervision=True, **ANISO3, **extra)
    outs = jax.jit(ds.apply)(variables, x)  # the same variables: every head exists after init
    assert isinstance(outs, list)
    assert [o.shape for o in outs] == [(2, 4, 16, 16, 3), (2, 4, 8, 8, 3), (2, 2, 4, 4, 3)]  # highest first
    np.testing.assert_allclose(outs[0], y, rtol=1e-6, atol=1e-6)
    heads = sorted(k for k in variables["params"]["decoder"] if k.startswith("seg_layers_"))
    assert heads == ["seg_layers_0", "seg_layers_1", "seg_layers_2"]


def test_shapes_2d_and_bfloat16_compute():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 32, 24, 1)), jnp.float32)
    net = ResidualEncoderUNet(num_classes=2, n_blocks_per_stage=1, n_conv_per_stage_decoder=1, **SMALL2)
    variables = variables_for(net, x.shape, seed=1)
    y = jax.jit(net.apply)(variables, x)
    assert y.shape == (1, 32, 24, 2)
    half = ResidualEncoderUNet(num_classes=2, n_blocks_per_stage=1, n_conv_per_stage_decoder=1,
                               dtype=jnp.bfloat16, **SMALL2)
    yh = jax.jit(half.apply)(variables, x)
    assert yh.dtype == jnp.float32
    shapes = jax.eval_shape(half.init, jax.random.key(1), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(shapes))  # params stay float32
    assert float(jnp.abs(yh - y).max() / jnp.abs(y).max()) < 5e-2
    with pytest.raises(ValueError, match="not divisible by the total stride"):
        net.apply(variables, x[:, :30])


def test_parameter_count_equals_dna_layer_list():
    """Torch-layout counts of dna's layers, by hand: conv(i, o, k) = i*o*k + o (bias), norm = 2*o,
    transposed conv = i*o*prod(stride) + o, head = i*classes + classes, ResEnc skip = i*o (no bias) + norm."""
    conv3 = lambda i, o: i * o * 9 + o + 2 * o  # noqa: E731  (3x3 conv with bias + affine instance norm)
    up = lambda i, o: i * o * 4 + o  # noqa: E731  (2x2 transposed conv with bias)
    plain = PlainConvUNet(num_classes=3, n_conv_per_stage=2, n_conv_per_stage_decoder=1, **SMALL2)
    encoder = conv3(1, 4) + conv3(4, 4) + conv3(4, 8) + conv3(8, 8) + conv3(8, 16) + conv3(16, 16)
    decoder = up(16, 8) + conv3(16, 8) + (8 * 3 + 3) + up(8, 4) + conv3(8, 4) + (4 * 3 + 3)
    assert encoder + decoder == 6838  # sum(p.numel()) of dna's PlainConvUNet with these kwargs
    assert param_count(plain, 1, (16, 16)) == 6838

    resenc = ResidualEncoderUNet(num_classes=2, n_blocks_per_stage=[1, 2, 1], n_conv_per_stage_decoder=1,
                                 **SMALL2)
    skip = lambda i, o: i * o + 2 * o  # noqa: E731
    stem = conv3(1, 4)
    stages = (2 * conv3(4, 4)  # stage 0: 4 -> 4, stride 1, identity skip
              + conv3(4, 8) + conv3(8, 8) + skip(4, 8) + 2 * conv3(8, 8)
              + conv3(8, 16) + conv3(16, 16) + skip(8, 16))
    decoder = up(16, 8) + conv3(16, 8) + (8 * 2 + 2) + up(8, 4) + conv3(8, 4) + (4 * 2 + 2)
    assert stem + stages + decoder == 8388
    assert param_count(resenc, 1, (16, 16)) == 8388


def test_parameter_count_of_v2_default_networks():
    """docs/nnunetv2.md §2: the example 3d_fullres networks have 5,520,681 (Plain) and 25,813,097 (ResEncM)
    parameters in dna."""
    kw = dict(n_stages=4, features_per_stage=[32, 64, 128, 256], num_classes=3,
              kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
              strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    plain = PlainConvUNet(n_conv_per_stage=2, n_conv_per_stage_decoder=2, **kw)
    resenc = ResidualEncoderUNet(n_blocks_per_stage=[1, 3, 4, 6], n_conv_per_stage_decoder=1, **kw)
    assert param_count(plain, 1, (4, 8, 8)) == 5_520_681
    assert param_count(resenc, 1, (4, 8, 8)) == 25_813_097
    shapes = state_dict_shapes(plain, 1, 3)
    assert len(shapes) == 68  # dna's distinct tensors
    assert shapes["encoder.stages.0.0.convs.0.conv.weight"] == (32, 1, 1, 3, 3)
    assert shapes["decoder.stages.2.convs.1.conv.weight"] == (32, 32, 1, 3, 3)
    assert shapes["decoder.transpconvs.0.weight"] == (256, 128, 2, 2, 2)
    assert shapes["decoder.seg_layers.2.weight"] == (3, 32, 1, 1, 1)
    shapes = state_dict_shapes(resenc, 1, 3)
    assert len(shapes) == 149
    assert shapes["encoder.stages.1.blocks.0.skip.1.conv.weight"] == (64, 32, 1, 1, 1)
    assert shapes["encoder.stages.1.blocks.0.conv1.conv.weight"] == (64, 32, 3, 3, 3)


# ------------------------------------------------------------------------------------------ load_weights

def fake_state_dict(module, in_channels, ndim, seed=0, aliases=True):
    """Random tensors under dna's keys, with the ``all_modules`` and ``decoder.encoder`` aliases it writes."""
    rng = np.random.default_rng(seed)
    shapes = state_dict_shapes(module, in_channels, ndim)
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    if aliases:
        for k in list(sd):
            for sub, idx in ((".conv.", 0), (".norm.", 1)):
                if sub in k and not k.startswith("decoder.transpconvs"):
                    sd[k.replace(sub, f".all_modules.{idx}.")] = sd[k]
        for k in [k for k in sd if k.startswith("encoder.")]:
            sd["decoder." + k] = sd[k]
    return sd


def test_load_weights_layouts_and_aliases():
    net = PlainConvUNet(num_classes=2, n_conv_per_stage=1, n_conv_per_stage_decoder=1, **ANISO3)
    sd = fake_state_dict(net, 2, 3)
    variables = load_weights(net, sd, "ck.pth", 3)
    p = variables["params"]
    np.testing.assert_array_equal(p["encoder"]["stages_1"]["convs_0"]["conv"]["kernel"],
                                  sd["encoder.stages.1.0.convs.0.conv.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(p["decoder"]["transpconvs_0"]["kernel"],
                                  sd["decoder.transpconvs.0.weight"].transpose(2, 3, 4, 0, 1))
    np.testing.assert_array_equal(p["encoder"]["stages_0"]["convs_0"]["norm"]["scale"],
                                  sd["encoder.stages.0.0.convs.0.norm.weight"])
    np.testing.assert_array_equal(p["decoder"]["seg_layers_0"]["bias"], sd["decoder.seg_layers.0.bias"])
    x = jnp.zeros((1, 4, 8, 8, 2))
    template = jax.eval_shape(net.init, jax.random.key(0), x)
    assert jax.tree_util.tree_structure(template) == jax.tree_util.tree_structure(variables)
    assert net.apply(variables, x).shape == (1, 4, 8, 8, 2)


def test_load_weights_batch_norm_and_no_conv_bias():
    net = ResidualEncoderUNet(num_classes=2, n_blocks_per_stage=1, n_conv_per_stage_decoder=1,
                              conv_bias=False, norm="batch", **SMALL2)
    sd = fake_state_dict(net, 1, 2, aliases=False)
    assert not any(k.startswith("decoder.transpconvs") and k.endswith("bias") for k in sd)
    sd["encoder.stem.convs.0.norm.num_batches_tracked"] = np.array(7)
    variables = load_weights(net, sd, "ck.pth", 2)
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(variables["batch_stats"]["encoder"]["stem"]["convs_0"]["norm"]["var"],
                                  sd["encoder.stem.convs.0.norm.running_var"])
    assert not np.any(variables["params"]["decoder"]["transpconvs_0"]["bias"])  # dna has none: zeros
    with pytest.raises(DatasetError, match=r"unexpected 1 key.*decoder\.transpconvs\.0\.bias"):
        load_weights(net, {**sd, "decoder.transpconvs.0.bias": np.zeros(8, np.float32)}, "ck.pth", 2)


def test_load_weights_errors_name_the_file_and_keys():
    net = PlainConvUNet(num_classes=2, n_conv_per_stage=1, n_conv_per_stage_decoder=1, **SMALL2)
    good = fake_state_dict(net, 1, 2)
    load_weights(net, good, "ck.pth", 2)
    src = "/results/fold_0/checkpoint_final.pth"

    sd = dict(good)
    del sd["decoder.seg_layers.0.weight"]  # a deep-supervision head: still required
    with pytest.raises(DatasetError, match=r"checkpoint_final\.pth: .*missing 1 key\(s\): "
                                           r"decoder\.seg_layers\.0\.weight"):
        load_weights(net, sd, src, 2)

    sd = dict(good, **{"decoder.stages.1.convs.0.conv.weight": np.zeros((4, 8, 5, 5), np.float32)})
    with pytest.raises(DatasetError, match=r"checkpoint_final\.pth: .*wrong shape for 1 key\(s\): "
                                           r"decoder\.stages\.1\.convs\.0\.conv\.weight \(4, 8, 5, 5\) "
                                           r"\(expected \(4, 8, 3, 3\)\)"):
        load_weights(net, sd, src, 2)

    sd = dict(good, **{"decoder.extra.weight": np.zeros(3, np.float32),
                       "encoder.stages.0.0.convs.0.all_modules.2.running_mean": np.zeros(4, np.float32)})
    with pytest.raises(DatasetError, match=r"unexpected 2 key\(s\): decoder\.extra\.weight, "
                                           r"encoder\.stages\.0\.0"):
        load_weights(net, sd, src, 2)

    sd = dict(good)
    sd["encoder.stages.2.0.convs.0.all_modules.1.weight"] = sd["encoder.stages.2.0.convs.0.norm.weight"] + 1
    with pytest.raises(DatasetError,
                       match=r"aliases differing.*encoder\.stages\.2\.0\.convs\.0\.all_modules\.1"):
        load_weights(net, sd, src, 2)

    with pytest.raises(DatasetError, match=r"checkpoint_final\.pth: not the weights of a 3D PlainConvUNet"):
        load_weights(PlainConvUNet(num_classes=2, n_conv_per_stage=1, n_conv_per_stage_decoder=1, **ANISO3),
                     good, src, 3)
    resenc = ResidualEncoderUNet(num_classes=2, n_blocks_per_stage=1, n_conv_per_stage_decoder=1, **SMALL2)
    with pytest.raises(DatasetError, match=r"encoder\.stem\.convs\.0\.conv\.weight' is missing"):
        load_weights(resenc, good, src, 2)


# ---------------------------------------------------------------------------------------- network_from_plans

ARCH = {"network_class_name": f"{DNA}.PlainConvUNet",
        "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16],
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
RESENC = dict(ARCH, network_class_name=f"{DNA}.ResidualEncoderUNet")
RS = {f"resampling_fn_{w}": "resample_data_or_seg_to_shape" for w in ("data", "seg", "probabilities")}
RS.update({f"resampling_fn_{w}_kwargs": {"is_seg": w == "seg", "order": 1, "order_z": 0,
                                         "force_separate_z": None}
           for w in ("data", "seg", "probabilities")})
SOURCE = "/preprocessed/Dataset001_X/nnUNetPlans.json"


def configuration(arch=ARCH, patch=(8, 32, 32), **changes):
    arch = copy.deepcopy(arch)
    for k, v in changes.items():
        if v is ...:
            arch["arch_kwargs"].pop(k)
        else:
            arch["arch_kwargs"][k] = v
    conf = {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": list(patch),
            "spacing": [1.0] * len(patch), "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "architecture": arch, **RS}
    plans = {"dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": conf}}
    return V2Plans.from_dict(plans, SOURCE).configuration("3d_fullres")


def test_network_from_plans_builds_the_named_class():
    net = network_from_plans(configuration(), 1, 3, source=SOURCE)
    assert isinstance(net, PlainConvUNet)
    assert (net.features_per_stage, net.n_conv_per_stage, net.num_classes) == ((4, 8, 16), (2, 2, 2), 3)
    assert (net.norm, net.norm_eps, net.norm_affine, net.nonlin, net.negative_slope) == \
        ("instance", 1e-5, True, "leaky_relu", 0.01)
    assert not net.deep_supervision
    cfg = configuration(RESENC, n_conv_per_stage=..., n_blocks_per_stage=[1, 2, 2],
                        n_conv_per_stage_decoder=1,
                        norm_op_kwargs={"eps": 1e-5})  # torch's InstanceNorm default: no affine
    net = network_from_plans(cfg, 2, 4, deep_supervision=True, dtype=jnp.bfloat16, source=SOURCE)
    assert isinstance(net, ResidualEncoderUNet) and net.deep_supervision and net.dtype == jnp.bfloat16
    assert net.n_blocks_per_stage == (1, 2, 2) and net.n_conv_per_stage_decoder == (1, 1)
    assert not net.norm_affine
    two_d = configuration(patch=(32, 32), conv_op="torch.nn.Conv2d", kernel_sizes=3, strides=[1, 2, 2],
                          norm_op="torch.nn.BatchNorm2d", norm_op_kwargs=None, nonlin="torch.nn.ReLU")
    net = network_from_plans(two_d, 1, 2, source=SOURCE)
    assert net.kernel_sizes == ((3, 3),) * 3 and net.strides == ((1, 1), (2, 2), (2, 2))
    assert (net.norm, net.norm_affine, net.nonlin) == ("batch", True, "relu")
    x = jnp.zeros((1, 32, 32, 1))
    assert jax.jit(net.apply)(variables_for(net, x.shape), x).shape == (1, 32, 32, 2)


FIELD = "/preprocessed/Dataset001_X/nnUNetPlans.json: field 'configurations.3d_fullres.architecture."


@pytest.mark.parametrize("arch,changes,field,message", [
    (dict(ARCH, network_class_name=f"{DNA}.ResidualUNet"), {}, "network_class_name",
     "names .*ResidualUNet.*supported"),
    (dict(ARCH, network_class_name="my.module.PlainConvUNet"), {}, "network_class_name", "names"),
    (ARCH, {"conv_op": "torch.nn.modules.conv.Conv2d"}, "arch_kwargs.conv_op", "patch_size .* is 3D"),
    (ARCH, {"norm_op": "torch.nn.GroupNorm"}, "arch_kwargs.norm_op", "supported for a 3D patch"),
    (ARCH, {"norm_op": "torch.nn.InstanceNorm2d"}, "arch_kwargs.norm_op", "InstanceNorm3d"),
    (ARCH, {"norm_op_kwargs": {"eps": 1e-5, "num_groups": 2}}, "arch_kwargs.norm_op_kwargs.num_groups",
     "not supported"),
    (ARCH, {"norm_op_kwargs": {"track_running_stats": True}},
     "arch_kwargs.norm_op_kwargs.track_running_stats", "not supported"),
    (ARCH, {"nonlin": "torch.nn.GELU"}, "arch_kwargs.nonlin", "LeakyReLU, ReLU"),
    (ARCH, {"nonlin": "mypackage.Swish"}, "arch_kwargs.nonlin", "torch.nn class"),
    (ARCH, {"nonlin_kwargs": {"negative_slope": 0.1, "alpha": 1}}, "arch_kwargs.nonlin_kwargs.alpha",
     "not supported"),
    (ARCH, {"squeeze_excitation": True}, "arch_kwargs.squeeze_excitation",
     "not a parameter of PlainConvUNet"),
    (ARCH, {"num_classes": 3}, "arch_kwargs.num_classes", "not a parameter"),
    (ARCH, {"n_conv_per_stage": ...}, "arch_kwargs.n_conv_per_stage", "is missing"),
    (ARCH, {"features_per_stage": [4, 8]}, "arch_kwargs.features_per_stage", "list of 3 integers"),
    (ARCH, {"kernel_sizes": [[3, 3], [3, 3], [3, 3]]}, "arch_kwargs.kernel_sizes", "3 values"),
    (ARCH, {"kernel_sizes": [[1, 3, 3], [3, 4, 3], [3, 3, 3]]}, "arch_kwargs.kernel_sizes", "must be odd"),
    (ARCH, {"strides": [[1, 1, 1], [1, 0, 2], [2, 2, 2]]}, "arch_kwargs.strides", "positive integer"),
    (ARCH, {"n_conv_per_stage_decoder": [2, 2, 2]}, "arch_kwargs.n_conv_per_stage_decoder", "list of 2"),
    (ARCH, {"conv_bias": "yes"}, "arch_kwargs.conv_bias", "true/false"),
    (ARCH, {"dropout_op": "torch.nn.modules.dropout.Dropout9d"}, "arch_kwargs.dropout_op", "supported"),
    (RESENC, {"n_blocks_per_stage": 1, "n_conv_per_stage": ...,
              "block": "dynamic_network_architectures.building_blocks.residual.BottleneckD"},
     "arch_kwargs.block", "BottleneckD is not"),
    (RESENC, {}, "arch_kwargs.n_conv_per_stage", "not a parameter of ResidualEncoderUNet"),
])
def test_network_from_plans_errors_name_the_field(arch, changes, field, message):
    cfg = configuration(arch, **changes)
    with pytest.raises(DatasetError, match=f"{FIELD}{field}' .*{message}".replace(".json", r"\.json")):
        network_from_plans(cfg, 1, 3, source=SOURCE)


def test_network_from_plans_2d_conv_op_for_3d_plans_and_bad_counts():
    two_d = configuration(patch=(32, 32), kernel_sizes=3, strides=[1, 2, 2])  # conv_op stays Conv3d
    with pytest.raises(DatasetError, match=r"arch_kwargs\.conv_op' names 'torch\.nn\.modules\.conv\.Conv3d', "
                                           r"but the patch_size \[32, 32\] is 2D"):
        network_from_plans(two_d, 1, 3, source=SOURCE)
    with pytest.raises(ValueError, match="num_heads"):
        network_from_plans(configuration(), 1, 0, source=SOURCE)

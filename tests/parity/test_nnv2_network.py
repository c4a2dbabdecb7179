"""Our PlainConvUNet / ResidualEncoderUNet vs dynamic_network_architectures' (nnU-Net v2's networks) with the
same weights, float32, eval mode.

Weights go dna → ours through ``interop.nnunetv2.network.load_weights`` from the full state dict (its
``all_modules`` and ``decoder.encoder`` aliases included). Error measure: max |ours - dna| / max |dna| over
the logits, required <= 1e-4, for every output with deep supervision.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
dna_unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
v2_net = pytest.importorskip("nnunetv2.utilities.get_network_from_plans")

from nnunet_jax.interop.nnunetv2.network import load_weights, network_from_plans  # noqa: E402
from nnunet_jax.interop.nnunetv2.plans import V2Plans  # noqa: E402
from nnunet_jax.io import DatasetError  # noqa: E402
from nnunet_jax.models.dynamic_unet import PlainConvUNet, ResidualEncoderUNet  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4
tnn = torch.nn

# v2's 3d_fullres shape (4 stages, anisotropic first kernel and strides), narrower.
ANISO3 = dict(n_stages=4, features_per_stage=[8, 16, 24, 32],
              kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
              strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
TWO_D = dict(n_stages=5, features_per_stage=[8, 16, 16, 24, 32], kernel_sizes=[[3, 3]] * 5,
             strides=[[1, 1], [2, 2], [2, 2], [2, 2], [2, 1]])
INSTANCE = dict(norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=tnn.LeakyReLU,
                nonlin_kwargs={"inplace": True})


@pytest.fixture(autouse=True)
def _torch_seed():
    """dna's own initialisation of the conv weights draws from torch's global generator."""
    torch.manual_seed(0)


def perturb(net, seed: int):
    """Norm scales, all biases and running statistics away from their 1 / 0 initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".norm." in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 - 0.2)
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.rand(b.shape, generator=g) - 0.5)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 1.5 + 0.5)
    return net.eval()


def numpy_state_dict(net) -> dict:
    return {k: v.detach().numpy() for k, v in net.state_dict().items()}


def rel_err(ours, ref) -> float:
    return float(np.abs(np.moveaxis(np.asarray(ours), -1, 1) - ref).max() / np.abs(ref).max())


def forward_both(torch_net, ours, shape, seed=0):
    """Torch and our outputs (lists, highest resolution first) for one random input of ``shape`` (NC...)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        ref = torch_net(torch.from_numpy(x))
    ref = [r.numpy() for r in ref] if isinstance(ref, (list, tuple)) else [ref.numpy()]
    variables = load_weights(ours, numpy_state_dict(torch_net), "dna.pth", len(shape) - 2)
    out = jax.jit(ours.apply)(variables, jnp.asarray(np.moveaxis(x, 1, -1)))
    out = out if isinstance(out, list) else [out]
    return out, ref


def check(out, ref, label):
    assert len(out) == len(ref), label
    errs = []
    for o, r in zip(out, ref, strict=True):
        assert o.shape == np.moveaxis(r, 1, -1).shape and o.dtype == jnp.float32, label
        errs.append(rel_err(o, r))
    print(f"{label}: max rel diff per output {[f'{e:.2e}' for e in errs]}")
    assert max(errs) <= TOL, (label, errs)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_plain_3d_anisotropic(deep_supervision):
    kw = dict(ANISO3, n_conv_per_stage=[2, 2, 2, 2], n_conv_per_stage_decoder=[2, 2, 2], conv_bias=True,
              num_classes=3)
    torch_net = perturb(dna_unet.PlainConvUNet(2, conv_op=tnn.Conv3d, norm_op=tnn.InstanceNorm3d,
                                               deep_supervision=deep_supervision, **INSTANCE, **kw), 0)
    ours = PlainConvUNet(deep_supervision=deep_supervision, **kw)
    check(*forward_both(torch_net, ours, (1, 2, 16, 32, 32)), f"plain-3d ds={deep_supervision}")


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_resenc_3d_anisotropic(deep_supervision):
    kw = dict(ANISO3, n_blocks_per_stage=[1, 2, 2, 3], n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True,
              num_classes=2)
    torch_net = perturb(dna_unet.ResidualEncoderUNet(1, conv_op=tnn.Conv3d, norm_op=tnn.InstanceNorm3d,
                                                     deep_supervision=deep_supervision, **INSTANCE, **kw), 1)
    ours = ResidualEncoderUNet(deep_supervision=deep_supervision, **kw)
    check(*forward_both(torch_net, ours, (2, 1, 8, 32, 32)), f"resenc-3d ds={deep_supervision}")


def test_plain_2d_batchnorm_relu_nonlin_first_no_bias_dropout():
    """Batch norm in eval (running statistics), ReLU before the norm, no conv bias (dna's transposed convs
    then lack one too), and a dropout layer that shifts the ``all_modules`` indices."""
    kw = dict(TWO_D, n_conv_per_stage=[1, 2, 2, 2, 1], n_conv_per_stage_decoder=[1, 2, 1, 2], conv_bias=False,
              num_classes=4)
    torch_net = perturb(dna_unet.PlainConvUNet(
        3, conv_op=tnn.Conv2d, norm_op=tnn.BatchNorm2d, norm_op_kwargs={"eps": 1e-3, "momentum": 0.2},
        dropout_op=tnn.Dropout2d, dropout_op_kwargs={"p": 0.3}, nonlin=tnn.ReLU,
        nonlin_kwargs={"inplace": True}, nonlin_first=True, deep_supervision=True, **kw), 2)
    ours = PlainConvUNet(norm="batch", norm_eps=1e-3, norm_momentum=0.2, nonlin="relu", nonlin_first=True,
                         deep_supervision=True, **kw)
    check(*forward_both(torch_net, ours, (2, 3, 48, 32)), "plain-2d batch/relu/nonlin_first/no-bias ds=True")


def test_resenc_2d_stem_channels_plain_instance_norm():
    """A stem narrower than stage 0 (its first block projects without an AvgPool: ``skip.0``), instance norm
    without affine and another eps, LeakyReLU with another slope."""
    kw = dict(TWO_D, n_blocks_per_stage=2, n_conv_per_stage_decoder=1, conv_bias=True, num_classes=3)
    torch_net = perturb(dna_unet.ResidualEncoderUNet(
        2, conv_op=tnn.Conv2d, norm_op=tnn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-3},
        nonlin=tnn.LeakyReLU, nonlin_kwargs={"negative_slope": 0.1}, stem_channels=6, deep_supervision=True,
        **kw), 3)
    assert "encoder.stages.0.blocks.0.skip.0.conv.weight" in torch_net.state_dict()
    ours = ResidualEncoderUNet(norm_eps=1e-3, norm_affine=False, negative_slope=0.1, stem_channels=6,
                               deep_supervision=True, **kw)
    check(*forward_both(torch_net, ours, (2, 2, 32, 48)), "resenc-2d stem/no-affine ds=True")


ARCH_KWARGS = {
    "n_stages": 4, "features_per_stage": [8, 16, 24, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], "n_blocks_per_stage": [1, 2, 2, 2],
    "n_conv_per_stage_decoder": [1, 1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True}}
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
RESAMPLING = {f"resampling_fn_{w}": "resample_data_or_seg_to_shape" for w in ("data", "seg", "probabilities")}
RESAMPLING.update({f"resampling_fn_{w}_kwargs": {"is_seg": w == "seg", "order": 3 if w == "data" else 1,
                                                 "order_z": 0, "force_separate_z": None}
                   for w in ("data", "seg", "probabilities")})
DNA = "dynamic_network_architectures.architectures.unet"


def plans_dict(class_name: str, arch_kwargs: dict) -> dict:
    """plans.json as nnU-Net v2 (ResEnc planner) writes it, one 3d_fullres configuration."""
    return {
        "dataset_name": "Dataset001_Tiny", "plans_name": "nnUNetResEncUNetMPlans",
        "original_median_spacing_after_transp": [3.0, 0.8, 0.8], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [16, 32, 32], "median_image_size_in_voxels": [20, 60, 60],
            "spacing": [3.0, 0.8, 0.8], "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], **RESAMPLING,
            "architecture": {"network_class_name": f"{DNA}.{class_name}",
                             "arch_kwargs": copy.deepcopy(arch_kwargs), "_kw_requires_import": REQ_IMPORT},
            "batch_dice": True}},
        "experiment_planner_used": "nnUNetPlannerResEncM", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0, "std": 2.0}},
    }


def test_network_from_plans_matches_get_network_from_plans():
    """plans.json → v2's ``get_network_from_plans`` (dna, He init, then perturbed) and our
    ``network_from_plans`` compute the same logits, also with deep supervision."""
    plans = V2Plans.from_dict(plans_dict("ResidualEncoderUNet", ARCH_KWARGS), "plans.json")
    cfg = plans.configuration("3d_fullres")
    torch_net = v2_net.get_network_from_plans(cfg.architecture.network_class_name, ARCH_KWARGS, REQ_IMPORT,
                                              1, 3, allow_init=True, deep_supervision=True)
    ours = network_from_plans(cfg, 1, 3, deep_supervision=True)
    assert isinstance(ours, ResidualEncoderUNet)
    out, ref = forward_both(perturb(torch_net, 4), ours, (1, 1, 16, 32, 32))
    check(out, ref, "network_from_plans resenc-3d ds=True")


def test_load_weights_rejects_the_other_network():
    plain = dna_unet.PlainConvUNet(1, conv_op=tnn.Conv3d, norm_op=tnn.InstanceNorm3d, n_conv_per_stage=2,
                                   n_conv_per_stage_decoder=2, num_classes=3, **INSTANCE, **ANISO3)
    resenc = ResidualEncoderUNet(n_blocks_per_stage=2, num_classes=3, n_conv_per_stage_decoder=2, **ANISO3)
    with pytest.raises(DatasetError, match=r"fold_0/checkpoint_final\.pth.*ResidualEncoderUNet"):
        load_weights(resenc, numpy_state_dict(plain), "fold_0/checkpoint_final.pth", 3)
    ours = PlainConvUNet(n_conv_per_stage=2, num_classes=3, n_conv_per_stage_decoder=2, **ANISO3)
    sd = numpy_state_dict(plain)
    sd["decoder.encoder.stages.1.0.convs.0.all_modules.0.weight"] = sd[
        "decoder.encoder.stages.1.0.convs.0.all_modules.0.weight"] + 1.0
    with pytest.raises(DatasetError, match=r"aliases differing.*decoder\.encoder\.stages\.1\.0\.convs\.0"):
        load_weights(ours, sd, "ck.pth", 3)

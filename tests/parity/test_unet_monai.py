"""Our U-Net vs MONAI's DynUNet (the network NVIDIA's newer nnU-Net trains) with the same weights, float32.

Weights go MONAI → ours through nnunet_jax.interop.monai (and ours → MONAI in one test). Error measure:
max |ours - monai| / max |monai| over the logits, required <= 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from nnunet_jax.interop.monai import params_to_torch_state_dict, torch_state_dict_to_variables  # noqa: E402
from nnunet_jax.models import UNet, count_params  # noqa: E402
from nnunet_jax.planning.topology import plan_topology  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4

ISO3 = dict(kernels=[[3, 3, 3]] * 4, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
            filters=[8, 16, 32, 32])
ANISO3 = dict(kernels=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
              strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]], filters=[8, 16, 16, 32])
TWO_D = dict(kernels=[[3, 3]] * 4, strides=[[1, 1], [2, 2], [2, 2], [2, 2]], filters=[8, 16, 32, 64])


def monai_unet(kernels, strides, filters, in_channels, n_class, norm="instance", residual=False,
               deep_supervision=False, deep_supr_num=1, trans_bias=True, seed=0):
    """A DynUNet with every parameter and running statistic made non-trivial."""
    torch.manual_seed(seed)
    norm_name = {"instance": ("INSTANCE", {"affine": True}), "batch": ("BATCH", {}),
                 "group": ("GROUP", {"num_groups": 32})}[norm]
    net = monai_nets.DynUNet(len(kernels[0]), in_channels, n_class, kernels, strides, strides[1:],
                             filters=filters, norm_name=norm_name, res_block=residual,
                             deep_supervision=deep_supervision, deep_supr_num=deep_supr_num,
                             trans_bias=trans_bias)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return net


def ours_for(cfg, n_class, **options):
    return UNet(n_class, cfg["kernels"], cfg["strides"], filters=cfg["filters"], **options)


def channels_last(a):
    return np.moveaxis(np.asarray(a), 1, -1)


def rel_err(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


CASES = {
    "3d-iso-instance": (ISO3, (2, 2, 16, 16, 16), {}),
    "3d-aniso-instance": (ANISO3, (1, 1, 6, 16, 16), {}),
    "2d-instance": (TWO_D, (2, 3, 32, 24), {}),
    "2d-no-trans-bias": (TWO_D, (1, 1, 16, 16), {"trans_bias": False}),
    "3d-residual-instance": (ISO3, (1, 2, 16, 16, 16), {"residual": True}),
    "3d-aniso-residual": (ANISO3, (1, 2, 6, 16, 16), {"residual": True}),
    "3d-batch-eval": (ISO3, (2, 2, 16, 16, 16), {"norm": "batch"}),
    "2d-residual-batch-eval": (TWO_D, (2, 1, 16, 24), {"norm": "batch", "residual": True}),
    "2d-group": (dict(kernels=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], filters=[32, 64, 64]),
                 (2, 1, 16, 16), {"norm": "group"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_monai(case):
    cfg, shape, options = CASES[case]
    net = monai_unet(**cfg, in_channels=shape[1], n_class=3, **options).eval()
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    model = ours_for(cfg, 3, norm=options.get("norm", "instance"), residual=options.get("residual", False))
    variables = torch_state_dict_to_variables(net.state_dict(), model)
    ours = model.apply(variables, jnp.asarray(channels_last(x)))
    err = rel_err(ours, channels_last(ref))
    print(f"{case}: max relative error {err:.2e}")
    assert err <= TOL


def test_deep_supervision_heads_match_monai():
    """Heads compared before upsampling (hooked on MONAI's ``deep_supervision_heads``) and, in addition, after
    MONAI's own nearest upsampling against ours upsampled by repetition (what ``interpolate`` does for integer
    factors)."""
    cfg, shape = ANISO3, (2, 2, 6, 16, 16)
    net = monai_unet(**cfg, in_channels=2, n_class=3, deep_supervision=True, deep_supr_num=2).train()
    hooked = {}
    for i, head in enumerate(net.deep_supervision_heads):
        head.register_forward_hook(lambda mod, inp, out, i=i: hooked.__setitem__(i + 1, out.detach().numpy()))
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    with torch.no_grad():
        stacked = net(torch.from_numpy(x)).numpy()  # (N, 1 + k, C, *spatial)
    model = ours_for(cfg, 3, deep_supervision=True, deep_supr_num=2)
    variables = torch_state_dict_to_variables(net.state_dict(), model)
    main, *heads = model.apply(variables, jnp.asarray(channels_last(x)), train=True)
    assert len(heads) == 2 and sorted(hooked) == [1, 2]
    assert rel_err(main, channels_last(stacked[:, 0])) <= TOL
    for i, head in enumerate(heads, start=1):
        assert head.shape[1:-1] == hooked[i].shape[2:]
        err = rel_err(head, channels_last(hooked[i]))
        print(f"deep supervision head {i} {head.shape}: max relative error {err:.2e}")
        assert err <= TOL
        up = np.asarray(head)
        for axis, (small, big) in enumerate(zip(head.shape[1:-1], main.shape[1:-1], strict=True), start=1):
            up = np.repeat(up, big // small, axis=axis)
        assert rel_err(up, channels_last(stacked[:, i])) <= TOL


def test_our_weights_load_into_monai():
    """Export direction: our (perturbed) variables → DynUNet.load_state_dict(strict=True) → same logits."""
    cfg, shape = TWO_D, (2, 2, 16, 16)
    model = ours_for(cfg, 3, norm="batch", residual=True, deep_supervision=True, deep_supr_num=2)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 2), jnp.float32))
    rng = np.random.default_rng(2)  # random values everywhere (positive, so variances stay valid)
    variables = jax.tree_util.tree_map(lambda a: rng.uniform(0.05, 0.3, a.shape).astype(np.float32), shapes)
    net = monai_unet(**cfg, in_channels=2, n_class=3, norm="batch", residual=True, deep_supervision=True,
                     deep_supr_num=2)
    sd = params_to_torch_state_dict(variables)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    net.eval()
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    ours = model.apply(variables, jnp.asarray(channels_last(x)))
    assert rel_err(ours, channels_last(ref)) <= TOL


def test_param_count_task01_matches_monai():
    topo = plan_topology((128, 128, 128), (1.0, 1.0, 1.0))
    net = monai_nets.DynUNet(3, 4, 4, [list(k) for k in topo.kernels], [list(s) for s in topo.strides],
                             [list(s) for s in topo.strides[1:]], filters=list(topo.filters), trans_bias=True)
    monai_count = sum(p.numel() for p in net.parameters())
    model = UNet.from_topology(topo, 4)
    x = jax.ShapeDtypeStruct((1, 32, 32, 32, 4), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    ours = count_params(shapes["params"])
    print(f"task 01 parameters: ours {ours:,}, MONAI {monai_count:,}")
    assert ours == monai_count == 31_192_868

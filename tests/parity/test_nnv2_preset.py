"""``--preset resenc_m|l|xl`` vs nnU-Net v2's ResEnc planners and dna's ResidualEncoderUNet.

- Planning: v2's own ``get_plans_for_configuration`` of nnUNetPlannerResEncM/L/XL, run with our topology rule
  in place of v2's ``get_pool_and_conv_props`` (the one part we keep ours, docs/presets.md), plans the same
  patch, batch and architecture as ``planning.presets.plan_preset``; our feature-map count equals dna's
  ``compute_conv_feature_map_size``.
- Network: the model ``build_model`` makes for a preset run, loaded with the weights of the dna network
  built from v2's plans (``get_network_from_plans``), computes the same logits (max |ours - dna| / max |dna|
  <= 1e-4), every deep-supervision head included.
"""

import math
from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
planners = pytest.importorskip("nnunetv2.experiment_planning.experiment_planners.residual_unets."
                               "residual_encoder_unet_planners")
default_planner = pytest.importorskip("nnunetv2.experiment_planning.experiment_planners."
                                      "default_experiment_planner")
v2_net = pytest.importorskip("nnunetv2.utilities.get_network_from_plans")

from nnunet_jax.configs.default import get_config  # noqa: E402
from nnunet_jax.interop.nnunetv2.network import load_weights  # noqa: E402
from nnunet_jax.models.build import build_model  # noqa: E402
from nnunet_jax.models.resenc import ResEncUNet  # noqa: E402
from nnunet_jax.plan import Plan  # noqa: E402
from nnunet_jax.planning.presets import PRESETS, apply_preset, feature_map_size, plan_preset  # noqa: E402
from nnunet_jax.planning.topology import fit_patch, get_kernels_strides  # noqa: E402
from tests.parity.test_nnv2_network import check, forward_both, numpy_state_dict, perturb  # noqa: E402

pytestmark = pytest.mark.parity
V2_CLASSES = {"resenc_m": planners.nnUNetPlannerResEncM, "resenc_l": planners.nnUNetPlannerResEncL,
              "resenc_xl": planners.nnUNetPlannerResEncXL}
N_TRAINING = 40
# (spacing, median shape, n_class): isotropic, thick slices, and a dataset smaller than any budget
DATASETS = {"iso": ((1.0, 1.0, 1.0), (138.0, 169.0, 138.0), 4),
            "aniso": ((3.6, 0.62, 0.62), (20.0, 320.0, 320.0), 3),
            "tiny": ((2.0, 1.0, 1.0), (12.0, 30.0, 26.0), 3)}


def _our_topology_as_v2(spacing, patch_size, min_feature_map_size, max_numpool):
    """Our topology rule (docs/reference.md §1) in the shape of v2's ``get_pool_and_conv_props``."""
    patch = fit_patch([int(p) for p in patch_size], spacing)
    kernels, strides = get_kernels_strides(patch, spacing)
    must = [math.prod(s[a] for s in strides) for a in range(len(patch))]
    return [int(math.log2(m)) for m in must], strides, kernels, patch, must


@pytest.fixture
def v2_planner(monkeypatch):
    """A v2 planner object without a raw dataset on disk: its constructor reads a fake dataset.json and
    fingerprint; its topology function is ours."""
    def make(preset: str, n_class: int):
        dataset_json = {"channel_names": {"0": "MRI"}, "labels": {str(i): i for i in range(n_class)},
                        "numTraining": N_TRAINING, "file_ending": ".nii.gz"}
        fingerprint = {"median_relative_size_after_cropping": 1.0}
        for name, value in (("nnUNet_raw", "/nonexistent"), ("nnUNet_preprocessed", "/nonexistent"),
                            ("isfile", lambda p: p.endswith("dataset_fingerprint.json")),
                            ("get_filenames_of_train_images_and_targets", lambda *a: {}),
                            ("load_json",
                             lambda p: dataset_json if p.endswith("dataset.json") else fingerprint)):
            monkeypatch.setattr(default_planner, name, value)
        monkeypatch.setattr(planners, "get_pool_and_conv_props", _our_topology_as_v2)
        return V2_CLASSES[preset]("Dataset999_Fake")
    return make


def _plan(spacing, median, n_class) -> Plan:
    return Plan.from_dict({"task": "99", "dim": 3, "patch_size": [8, 8, 8], "n_class": n_class,
                           "in_channels": 1, "spacing": list(spacing), "median_shape": list(median),
                           "cases": {"training": [f"c{i}" for i in range(N_TRAINING)], "test": []},
                           "topology": {"kernels": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]],
                                        "filters": [4, 8]}})


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_planning_equals_v2s_resenc_planner(v2_planner, preset, dataset):
    spacing, median, n_class = DATASETS[dataset]
    planner = v2_planner(preset, n_class)
    assert planner.UNet_vram_target_GB == PRESETS[preset].vram_gb
    v2 = planner.get_plans_for_configuration(np.array(spacing), np.array(median), "id",
                                             float(np.prod(median) * N_TRAINING), {})
    ours = plan_preset(_plan(spacing, median, n_class), PRESETS[preset])
    assert tuple(int(p) for p in v2["patch_size"]) == ours.patch_size
    assert v2["batch_size"] == ours.batch_size
    kw = v2["architecture"]["arch_kwargs"]
    topo = ours.topology
    assert [list(s) for s in kw["strides"]] == [list(s) for s in topo.strides]
    assert [list(k) for k in kw["kernel_sizes"]] == [list(k) for k in topo.kernels]
    assert tuple(kw["features_per_stage"]) == topo.filters
    model = build_model({"preset": preset}, replace(_plan(spacing, median, n_class), topology=topo))
    assert tuple(kw["n_blocks_per_stage"]) == tuple(model.n_blocks_per_stage)
    assert tuple(kw["n_conv_per_stage_decoder"]) == tuple(model.n_conv_per_stage_decoder)


@pytest.mark.parametrize(("patch", "strides", "features"), [
    ((40, 56, 48), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], (32, 64, 128, 256)),
    ((16, 96, 80), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], (32, 64, 128, 256, 320)),
    ((64, 48), [[1, 1], [2, 2], [2, 2], [2, 1]], (32, 64, 128, 256)),
])
def test_feature_map_size_equals_dnas(patch, strides, features):
    nd = len(patch)
    net = v2_net.get_network_from_plans(
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        {"n_stages": len(strides), "features_per_stage": features,
         "conv_op": f"torch.nn.modules.conv.Conv{nd}d", "kernel_sizes": [[3] * nd] * len(strides),
         "strides": strides, "n_blocks_per_stage": (1, 3, 4, 6, 6)[:len(strides)],
         "n_conv_per_stage_decoder": [1] * (len(strides) - 1), "conv_bias": True,
         "norm_op": f"torch.nn.InstanceNorm{nd}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
         "nonlin": "torch.nn.LeakyReLU"}, ("conv_op", "norm_op", "nonlin"), 2, 3, allow_init=False)
    assert feature_map_size(patch, strides, features, 3) == int(net.compute_conv_feature_map_size(patch))


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_preset_network_forward_equals_dnas(v2_planner, deep_supervision):
    """The tiny dataset (patch 12x24x24, 3 levels): v2's network of its plans vs build_model's."""
    spacing, median, n_class = DATASETS["tiny"]
    v2 = v2_planner("resenc_m", n_class).get_plans_for_configuration(
        np.array(spacing), np.array(median), "id", float(np.prod(median) * N_TRAINING), {})
    arch = v2["architecture"]
    torch_net = perturb(v2_net.get_network_from_plans(
        arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 2, n_class,
        deep_supervision=deep_supervision), seed=3)
    config = get_config()
    config.preset, config.deep_supervision = "resenc_m", deep_supervision
    config.batch_size = 0
    plan = apply_preset(config, _plan(spacing, median, n_class))
    assert config.batch_size == v2["batch_size"]
    model = build_model(config, plan)
    assert isinstance(model, ResEncUNet)
    levels = len(plan.topology.strides)
    model = model.clone(deep_supr_num=levels - 2)
    shape = (1, 2, *plan.patch_size)
    out, ref = forward_both(torch_net, model, shape)  # eval: the main output only
    check(out, ref[:1], "eval")
    if deep_supervision:  # train=True: (main, head_1, ..), dna's outputs in dna's order
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        variables = load_weights(model, numpy_state_dict(torch_net), "dna.pth", 3)
        heads = model.apply(variables, jnp.asarray(np.moveaxis(x, 1, -1)), train=True)
        assert isinstance(heads, tuple) and len(heads) == levels - 1 == len(ref)  # every head
        check(list(heads), ref, "train")  # instance norm: dna's eval mode computes what its train mode does

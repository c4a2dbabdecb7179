"""``--preset``: the planning of patch and batch for a memory target, the network build_model makes, the
flag. (Equality with nnU-Net v2's planners and dna's network: tests/parity/test_nnv2_preset.py.)"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import replace

import jax
import jax.numpy as jnp
import pytest

from nnunet_jax.configs.default import get_config
from nnunet_jax.io import DatasetError
from nnunet_jax.models.build import build_model
from nnunet_jax.models.resenc import ResEncUNet
from nnunet_jax.models.unet import UNet
from nnunet_jax.plan import Plan
from nnunet_jax.planning.presets import (
    PRESETS,
    apply_preset,
    encoder_blocks,
    feature_map_size,
    plan_preset,
    preset_of,
)
from tests.test_training_utils import run_python


def _plan(spacing=(1.0, 1.0, 1.0), median=(138.0, 169.0, 138.0), n_cases=40, dim=3) -> Plan:
    return Plan.from_dict({"task": "99", "dim": dim, "patch_size": [16] * dim, "n_class": 3, "in_channels": 2,
                           "spacing": list(spacing), "median_shape": list(median),
                           "cases": {"training": [f"c{i}" for i in range(n_cases)], "test": []},
                           "topology": {"kernels": [[3] * dim] * 3,
                                        "strides": [[1] * dim, [2] * dim, [2] * dim], "filters": [4, 8, 16]}})


def _config(**fields):
    c = get_config()
    for k, v in fields.items():
        setattr(c, k, v)
    return c


def test_default_preset_changes_nothing():
    plan, config = _plan(), _config()
    assert preset_of(config) is None and config.preset == "nnunet"
    assert apply_preset(config, plan) is plan and config.batch_size == 2
    assert isinstance(build_model(config, plan), UNet)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize(("spacing", "median"), [((1.0, 1.0, 1.0), (138.0, 169.0, 138.0)),
                                                 ((3.6, 0.62, 0.62), (20.0, 320.0, 320.0)),
                                                 ((0.8, 0.8), (512.0, 512.0))])
def test_planned_patch_fits_the_budget_and_the_topology(name, spacing, median):
    preset = PRESETS[name]
    planned = plan_preset(_plan(spacing, median, dim=len(spacing)), preset)
    topo, patch = planned.topology, planned.patch_size
    assert all(p <= m for p, m in zip(patch, median, strict=True))
    for axis, p in enumerate(patch):  # the U-Net halves every axis exactly
        assert p % math.prod(s[axis] for s in topo.strides) == 0
    assert planned.estimate == feature_map_size(patch, topo.strides, topo.filters, 3)
    assert planned.estimate <= preset.budget(len(spacing))
    assert planned.batch_size >= 2
    assert name in planned.describe() and f"{preset.vram_gb:g} GB" in planned.describe()


def test_bigger_targets_plan_at_least_as_much_work():
    """Patch voxels x batch grows with the memory target (M 8 GB ≤ L 24 GB ≤ XL 40 GB)."""
    work = []
    for name in ("resenc_m", "resenc_l", "resenc_xl"):
        p = plan_preset(_plan(), PRESETS[name])
        work.append(math.prod(p.patch_size) * p.batch_size)
    assert work == sorted(work) and work[0] < work[-1], work


def test_small_dataset_batch_is_capped_by_its_voxels():
    """A dataset smaller than the budget: the patch is the median shape, the batch at most as many patches
    as the dataset holds (but never below 2)."""
    plan = _plan(median=(32.0, 40.0, 36.0), n_cases=3)
    p = plan_preset(plan, PRESETS["resenc_xl"])
    assert p.patch_size == (32, 40, 32)
    assert p.batch_size == round(32 * 40 * 36 * 3 / (32 * 40 * 32))
    assert plan_preset(_plan(median=(32.0, 40.0, 36.0), n_cases=1), PRESETS["resenc_xl"]).batch_size == 2


def test_apply_preset_takes_the_planned_batch_only_when_asked():
    config = _config(preset="resenc_l", batch_size=0)
    plan = apply_preset(config, _plan())
    planned = plan_preset(_plan(), PRESETS["resenc_l"])
    assert config.batch_size == planned.batch_size
    assert (plan.patch_size, plan.topology) == (planned.patch_size, planned.topology)
    assert "resenc_l" in plan.source["preset"] and plan.source["patch_size"].endswith("resenc_l")
    assert apply_preset(config, plan) == plan  # a pure function of what the preset leaves alone
    given = _config(preset="resenc_l", batch_size=3)
    apply_preset(given, _plan())
    assert given.batch_size == 3
    as_saved = {"preset": "resenc_l", "batch_size": 0}  # a run's config.json, read back
    assert apply_preset(as_saved, _plan()) == plan and as_saved["batch_size"] == planned.batch_size


def test_plan_without_median_shape_says_preprocess_again():
    with pytest.raises(DatasetError, match="median_shape.*preprocess the dataset again"):
        plan_preset(replace(_plan(), median_shape=None), PRESETS["resenc_m"])


def test_build_model_makes_the_resenc_network_with_the_runs_options():
    plan = apply_preset(_config(preset="resenc_m"), _plan(median=(16.0, 24.0, 20.0)))
    assert plan.patch_size == (16, 24, 20) and plan.topology.depth == 3
    config = _config(preset="resenc_m", filters=(4, 8, 8), deep_supervision=True, deep_supr_num=1)
    model = build_model(config, plan)
    assert isinstance(model, ResEncUNet) and model.dtype == jnp.float32
    assert build_model(_config(preset="resenc_m", amp=True), plan).dtype == jnp.bfloat16
    assert model.widths == (4, 8, 8) and model.conv_bias
    assert tuple(model.n_blocks_per_stage) == encoder_blocks(3) == (1, 3, 4)
    assert tuple(model.n_conv_per_stage_decoder) == (1, 1)
    x = jnp.zeros((1, *plan.patch_size, 2))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only: values are the parity test's
    both = jax.eval_shape(lambda v, x: (model.apply(v, x, train=True), model.apply(v, x)), variables, x)
    train, infer = both
    assert isinstance(train, tuple) and [o.shape[1:-1] for o in train] == [(16, 24, 20), (8, 12, 10)]
    assert all(o.dtype == jnp.float32 and o.shape[-1] == 3 for o in train)
    assert infer.shape == (1, 16, 24, 20, 3)


@pytest.mark.parametrize(("option", "message"), [({"residual": True}, "--residual"),
                                                  ({"attention": True}, "--attention"),
                                                  ({"norm": "group"}, "--norm group"),
                                                  ({"filters": (4, 8)}, "2 filters given for a 4-level")])
def test_seed_only_options_are_refused(option, message):
    plan = apply_preset(_config(preset="resenc_m"), _plan(median=(32.0, 40.0, 36.0)))
    with pytest.raises(ValueError, match=message):
        build_model(_config(preset="resenc_m", **option), plan)


def test_deep_supr_num_beyond_the_levels_is_refused():
    plan = apply_preset(_config(preset="resenc_m"), _plan(median=(16.0, 24.0, 20.0)))
    model = build_model(_config(preset="resenc_m", filters=(4, 8, 8), deep_supervision=True,
                                deep_supr_num=2), plan)
    with pytest.raises(ValueError, match=r"deep_supr_num must be in \[1, 1\]"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *plan.patch_size, 2)))


def test_train_py_preset_flag_leaves_the_batch_to_the_preset_unless_given():
    code = textwrap.dedent("""
        import sys, json
        from nnunet_jax.cli import train
        train.define_flags()
        out = []
        for argv in ([], ["--preset", "resenc_m"], ["--preset", "resenc_xl", "--batch_size", "3"]):
            train.FLAGS.unparse_flags()
            train.FLAGS(["train.py", *argv])
            c = train.build_config()
            out.append([c.preset, c.batch_size])
        print(json.dumps(out))
    """)
    got = json.loads(run_python(code).stdout.strip().splitlines()[-1])
    assert got == [["nnunet", 2], ["resenc_m", 0], ["resenc_xl", 3]]
    proc = run_python("import sys; sys.argv = ['train.py', '--preset', 'resenc_s']\nimport runpy; "
                      "runpy.run_path('train.py', run_name='__main__')", check=False)
    assert proc.returncode != 0 and "resenc_m" in proc.stderr  # the enum lists the presets


def test_run_identity_records_the_preset_and_older_checkpoints_read_as_nnunet():
    from nnunet_jax.training import loop

    plan = _plan()
    ours = loop.run_identity(_config(preset="resenc_m"), plan, (4, 8, 16))
    seed = loop.run_identity(_config(), plan, (4, 8, 16))
    assert ours["preset"] == "resenc_m" and loop.identity_diff(seed, ours) == ["preset"]
    older = {k: v for k, v in seed.items() if k != "preset"}  # written before --preset existed
    assert loop.identity_diff(older, seed) == []

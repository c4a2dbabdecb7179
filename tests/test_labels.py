"""The label/region rules in one place (nnunet_jax.labels) and the model built from a plan (models.build)."""

import jax.numpy as jnp
import numpy as np
import pytest

from nnunet_jax.labels import LabelSpec, brats_regions, region_masks, regions_to_labels, use_brats
from nnunet_jax.models.build import build_model, compute_dtype, uses_fp16
from nnunet_jax.plan import Plan

TOPOLOGY = {"kernels": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "filters": [4, 8, 16]}


def _plan(n_class: int, labels: dict | None = None) -> Plan:
    return Plan.from_dict({"dim": 3, "patch_size": [16, 16, 16], "n_class": n_class, "in_channels": 1,
                           "labels": labels or {}, "topology": TOPOLOGY})


def test_label_spec_classes_and_regions():
    classes = LabelSpec.of(_plan(3))
    assert (classes.n_outputs, classes.n_scores, classes.score_names) == (3, 2, ["1", "2"])
    msd = LabelSpec.of(_plan(4, {"0": "bg", "1": "edema", "2": "non-enh", "3": "enh"}), brats=True)
    assert (msd.n_outputs, msd.n_scores, msd.score_names, msd.et_label) == (3, 3, ["WT", "TC", "ET"], 3)
    raw = LabelSpec.of(_plan(5, {"0": "bg", "1": "ncr", "2": "ed", "4": "et"}), brats=True)
    assert raw.et_label == 4
    with pytest.raises(ValueError, match="--brats needs BraTS labels.*n_class 3"):
        LabelSpec.of(_plan(3), brats=True)
    assert use_brats({"brats": True}) and not use_brats({})  # configs saved before the flag existed


def test_region_targets_masks_and_labels_agree():
    labels = np.array([0, 1, 2, 3, 4])
    targets = np.asarray(brats_regions(jnp.asarray(labels)))
    np.testing.assert_array_equal(targets.T, region_masks(labels))
    np.testing.assert_array_equal(region_masks(labels), [[0, 1, 1, 1, 1], [0, 1, 0, 1, 1], [0, 0, 0, 1, 1]])
    # regions → labels → regions is the identity on the MSD labels (0-3)
    back = regions_to_labels(region_masks(labels[:4]).astype(np.float32))
    np.testing.assert_array_equal(back, [0, 1, 2, 3])
    spec = LabelSpec(4, brats=True, et_label=4)
    np.testing.assert_array_equal(spec.to_labels(region_masks(labels[:4]).astype(np.float32)), [0, 1, 2, 4])
    np.testing.assert_array_equal(LabelSpec(3).to_labels(np.eye(3)[:, [2, 0, 1]]), [2, 0, 1])


def test_model_from_plan_and_options():
    assert compute_dtype({}) == jnp.float32 and not uses_fp16({"amp_dtype": "fp16"})
    assert compute_dtype({"amp": True}) == jnp.bfloat16 and not uses_fp16({"amp": True})
    assert compute_dtype({"amp": True, "amp_dtype": "fp16"}) == jnp.float16
    assert uses_fp16({"amp": True, "amp_dtype": "fp16"})
    with pytest.raises(ValueError, match="amp_dtype"):
        compute_dtype({"amp": True, "amp_dtype": "fp8"})
    model = build_model({"filters": (2, 4, 8), "brats": True, "deep_supervision": True},
                        _plan(4))
    assert model.n_class == 3 and model.widths == (2, 4, 8) and model.deep_supervision
    assert build_model({}, _plan(3)).widths == (4, 8, 16)  # the plan's topology filters

"""Our nnU-Net v2 export against v2's own ``convert_predicted_logits_to_segmentation_with_correct_shape``
on the same logits: label maps identical, probabilities within 1e-6, same shapes and dtypes.

The cases and their properties come from v2's preprocessing of the tiny datasets (tests/parity/nnv2_data.py):
anisotropic CT (transposed, separate-z resampling of the logits), 2-channel MRI, 2D PNGs and regions, in the
3d_fullres and 2d configurations. Our side uses our own preprocessing's CaseProps, so the chain
preprocess → export is checked, not only the export. Logits: smooth random fields, fp16 as v2's sliding
window returns them (and fp32 once, our fp32 mode).
"""

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from nnunet_jax.interop.nnunetv2 import imageio
from nnunet_jax.interop.nnunetv2 import preprocessing as pp
from nnunet_jax.interop.nnunetv2.export import logits_to_segmentation
from nnunet_jax.interop.nnunetv2.plans import V2Labels, V2Plans

from . import nnv2_data as nd

pytestmark = pytest.mark.parity
RUNS = [(k, c) for k, cs in nd.CONFIGS.items() for c in cs]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return nd.prepared(tmp_path_factory)


def _logits(shape, k, seed, dtype):
    rng = np.random.default_rng(seed)
    x = np.stack([gaussian_filter(rng.standard_normal(shape), 1.0) * 6 for _ in range(k)])
    return x.astype(dtype)


def _v2_export(logits, root, kind, config, v2props, probs):
    import torch
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape as v2_convert,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(root / "preprocessed" / nd.DATASETS[kind][1] / "nnUNetPlans.json"))
    lm = pm.get_label_manager(json.loads((nd.raw_dir(root, kind) / "dataset.json").read_text()))
    out = v2_convert(
        torch.from_numpy(logits.copy()), pm, pm.get_configuration(config), lm, dict(v2props),
        return_probabilities=probs, num_threads_torch=1)
    return out if probs else (out, None)


@pytest.mark.parametrize(("kind", "config"), RUNS)
@pytest.mark.parametrize("probs", [False, True])
def test_export_equals_v2(root, kind, config, probs):
    plans = V2Plans.load(root / "preprocessed" / nd.DATASETS[kind][1] / "nnUNetPlans.json")
    labels = V2Labels.load(nd.raw_dir(root, kind) / "dataset.json")
    resampled = 0
    for i, case in enumerate(("case00", "case01", "case02")):
        data, _, v2props = nd.load_preprocessed(root, kind, config, case)
        img = imageio.read_images(nd.case_files(root, kind, case), plans.image_reader_writer)
        _, props = pp.preprocess_case(img.data, img.spacing, plans, config, img.geometry)
        dtype = np.float32 if (i == 2 and not probs) else np.float16
        logits = _logits(data.shape[1:], labels.num_heads, 10 * i + probs, dtype)
        want_seg, want_p = _v2_export(logits, root, kind, config, v2props, probs)
        got_seg, got_p = logits_to_segmentation(logits, props, plans, config, labels,
                                                save_probabilities=probs)
        want_seg = np.asarray(want_seg)
        assert got_seg.shape == want_seg.shape == img.data.shape[1:]
        assert got_seg.dtype == want_seg.dtype
        np.testing.assert_array_equal(got_seg, want_seg, err_msg=f"{kind} {config} {case}")
        assert len(np.unique(got_seg)) > 1  # the logits make more than one class: the test can fail
        if probs:
            want_p = np.asarray(want_p)
            assert got_p.shape == want_p.shape == (labels.num_heads, *img.data.shape[1:])
            assert got_p.dtype == np.float32
            np.testing.assert_allclose(got_p, want_p, rtol=0, atol=1e-6)
        else:
            assert got_p is None
        resampled += data.shape[1:] != props.shape_after_cropping_and_before_resampling
    if kind != "2d":
        assert resampled > 0

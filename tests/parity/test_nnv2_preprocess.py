"""Our nnU-Net v2 preprocessing (read → transpose → crop → normalise → resample) against the arrays and
properties that nnU-Net v2's own ``nnUNetv2_plan_and_preprocess`` stored for the same raw cases.

Datasets (tests/parity/nnv2_data.py): anisotropic CT (CTNormalization, transposed, separate-z resampling),
2-channel MRI (ZScore with use_mask_for_norm), 2D PNGs, a region dataset; each in its 3d_fullres and 2d
configurations. Tolerance 1e-5 absolute (measured: bit-identical).
"""

import numpy as np
import pytest

from nnunet_jax.interop.nnunetv2 import imageio
from nnunet_jax.interop.nnunetv2 import preprocessing as pp
from nnunet_jax.interop.nnunetv2.plans import V2Labels, V2Plans

from . import nnv2_data as nd

pytestmark = pytest.mark.parity
CASES = ("case00", "case01", "case02")
RUNS = [(k, c) for k, cs in nd.CONFIGS.items() for c in cs]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return nd.prepared(tmp_path_factory)


def _plans(root, kind):
    return V2Plans.load(root / "preprocessed" / nd.DATASETS[kind][1] / "nnUNetPlans.json")


@pytest.mark.parametrize(("kind", "config"), RUNS)
def test_preprocessed_arrays_and_props_equal_v2(root, kind, config):
    plans = _plans(root, kind)
    labels = V2Labels.load(nd.raw_dir(root, kind) / "dataset.json")
    cfg = plans.configuration(config)
    resampled = 0
    for case in CASES:
        want, _, v2props = nd.load_preprocessed(root, kind, config, case)
        files = nd.case_files(root, kind, case)
        assert len(files) == labels.num_channels
        img = imageio.read_images(files, plans.image_reader_writer)
        got, props = pp.preprocess_case(img.data, img.spacing, plans, config, img.geometry)
        assert got.dtype == np.float32 and got.shape == want.shape, (case, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{kind} {config} {case}")
        ours = props.to_v2()
        assert np.allclose(ours["spacing"], v2props["spacing"], rtol=0, atol=1e-12)
        for key in ("shape_before_cropping", "shape_after_cropping_and_before_resampling"):
            assert tuple(ours[key]) == tuple(v2props[key]), (case, key)
        v2box = [list(map(int, b)) for b in v2props["bbox_used_for_cropping"]]
        assert v2box == ours["bbox_used_for_cropping"], case
        resampled += got.shape[1:] != props.shape_after_cropping_and_before_resampling
    if kind != "2d":  # the comparison covered resampling, not only the crop and the normalisation
        assert resampled > 0
    if kind == "ct" and config == "3d_fullres":
        assert list(plans.transpose_forward) != [0, 1, 2]
        assert cfg.normalization_schemes == ("CTNormalization",)
        sp = [float(s) for s in v2props["spacing"]]
        assert pp.separate_axis([sp[a] for a in plans.transpose_forward], cfg.spacing,
                                cfg.resampling_data) == 0
    if kind == "mri":
        assert all(cfg.use_mask_for_norm) and labels.num_channels == 2


def test_cropping_happened(root):
    """The CT and MRI cases have zero borders: v2's box is smaller than the image (and ours equal)."""
    for kind in ("ct", "mri"):
        _, _, v2props = nd.load_preprocessed(root, kind, "3d_fullres", "case00")
        assert tuple(v2props["shape_after_cropping_and_before_resampling"]) != tuple(
            v2props["shape_before_cropping"])

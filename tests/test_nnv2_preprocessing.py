"""Units of the nnU-Net v2 preprocessing rules (the end-to-end comparison with nnU-Net v2 itself is
tests/parity/test_nnv2_preprocess.py): the separate-axis rule, half-even shapes, the crop box, and the
streamed separate-axis resampling against scipy/skimage composed as v2 composes them."""

import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from skimage.transform import resize as sk_resize

from nnunet_jax.interop.nnunetv2 import preprocessing as pp
from nnunet_jax.interop.nnunetv2.plans import V2Resampling
from nnunet_jax.preprocessing.resample import resize_slabs

AUTO = V2Resampling(order=3, order_z=0, force_separate_z=None)


@pytest.mark.parametrize(("cur", "new", "rs", "want"), [
    ((3.0, 0.9, 0.9), (3.0, 0.9, 0.9), AUTO, 0),  # 3.33 > 3: the current spacing's coarse axis
    ((0.8, 0.8, 2.5), (4.0, 1.0, 1.0), AUTO, 2),  # 3.125 > 3: the current spacing wins over the target
    ((1.0, 1.0, 1.0), (1.0, 3.5, 1.0), AUTO, 1),  # else the target spacing decides
    ((1.0, 1.0, 2.9), (1.0, 1.0, 2.9), AUTO, None),  # 2.9 <= 3
    ((3.5, 3.5, 1.0), (3.5, 3.5, 1.0), AUTO, None),  # two axes tied for the largest: none
    ((1.0, 1.0, 2.0), (1.0, 1.0, 2.0), V2Resampling(3, 0, True), 2),  # forced
    ((5.0, 1.0, 1.0), (5.0, 1.0, 1.0), V2Resampling(3, 0, False), None),  # forced off
])
def test_separate_axis_rule(cur, new, rs, want):
    assert pp.separate_axis(cur, new, rs) == want


def test_new_shape_rounds_half_to_even():
    assert pp.compute_new_shape((5, 7, 10), (1.0, 1.0, 1.0), (2.0, 2.0, 4.0)) == (2, 4, 2)  # 2.5, 3.5, 2.5
    assert pp.compute_new_shape((10,), (0.7,), (1.0,)) == (7,)


def test_crop_box_fills_holes_and_keeps_empty_images_whole():
    x = np.zeros((2, 6, 7, 8), np.float32)
    x[1, 1:4, 2:6, 3:8] = 1
    x[1, 2, 3, 4] = 0  # a hole: filled, stays in the mask
    data, mask, box = pp.crop_to_nonzero(x)
    assert box == ((1, 4), (2, 6), (3, 8)) and data.shape == (2, 3, 4, 5) and mask.all()
    assert pp.crop_to_nonzero(np.zeros((1, 3, 4, 5)))[2] == ((0, 3), (0, 4), (0, 5))


def _v2_separate_z(x, new_shape, order, order_z):
    """v2's composition: per-slice skimage resize (clip per slice), then map_coordinates along axis 0."""
    inplane = np.stack([sk_resize(s, new_shape[1:], order=order, mode="edge", anti_aliasing=False)
                        for s in x.astype(np.float64)])
    if inplane.shape[0] == new_shape[0]:
        return inplane
    grid = np.mgrid[tuple(slice(0, n) for n in new_shape)].astype(np.float64)
    grid[0] = inplane.shape[0] / new_shape[0] * (grid[0] + 0.5) - 0.5
    return map_coordinates(inplane, grid, order=order_z, mode="nearest")


@pytest.mark.parametrize(("shape", "new"), [((6, 11, 9), (14, 8, 12)), ((13, 10, 9), (5, 10, 14)),
                                            ((5, 7, 7), (5, 9, 4))])
@pytest.mark.parametrize(("order", "order_z"), [(3, 0), (1, 0), (3, 1)])
def test_separate_axis_slabs_equal_v2_composition(shape, new, order, order_z):
    x = np.random.default_rng(0).standard_normal(shape) * 10
    want = _v2_separate_z(x, new, order, order_z)
    for slab in (1, 4, 100):
        got = np.concatenate([b for _, b in resize_slabs(x, new, order, slab=slab, dtype=np.float64,
                                                          order0=order_z)])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_resample_streams_along_the_separate_axis():
    x = np.random.default_rng(1).standard_normal((2, 9, 5, 8)).astype(np.float32)
    new = (12, 5, 3)
    got = pp.resample(x, new, (1.0, 1.0, 4.0), (1.0, 1.0, 4.0), AUTO)  # axis 2 is separate
    want = np.stack([np.moveaxis(_v2_separate_z(np.moveaxis(c, 2, 0), (3, 12, 5), 3, 0), 0, 2) for c in x])
    assert got.dtype == np.float32 and got.shape == (2, *new)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=0, atol=1e-5)
    assert pp.resample(x, x.shape[1:], (1, 1, 1), (1, 1, 1), AUTO) is x  # unchanged shape: the data itself


@pytest.mark.parametrize(("shape", "new"), [((6, 11, 9), (14, 8, 12)), ((13, 10, 9), (13, 21, 4)),
                                            ((5, 7, 7), (9, 7, 7))])
def test_joint_linear_is_bit_equal_to_skimage(shape, new):
    """Order 1 evaluated as scipy does: bit-equal, also after rounding to fp16 (v2's resampled logits)."""
    x = (np.random.default_rng(2).standard_normal(shape) * 8).astype(np.float16)
    want = sk_resize(x.astype(np.float64), new, order=1, mode="edge", anti_aliasing=False)
    for slab in (1, 3, 100):
        got = np.concatenate([b for _, b in resize_slabs(x, new, 1, slab=slab, dtype=np.float64, joint=True)])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got.astype(np.float16), want.astype(np.float16))
    sep = np.concatenate([b for _, b in resize_slabs(x, new, 1, slab=4, dtype=np.float64, order0=0,
                                                      joint=True)])
    np.testing.assert_array_equal(sep, _v2_separate_z(x, new, 1, 0))

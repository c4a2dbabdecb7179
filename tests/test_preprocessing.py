"""Per-case preprocessing steps against docs/reference.md §5 (hand-computable cases), and the inverse."""

import re
import tracemalloc

import numpy as np
import pytest

from nnunet_jax.io import DatasetError
from nnunet_jax.preprocessing import case as pp
from nnunet_jax.preprocessing.case import CaseMeta


def _vol(c=2, shape=(6, 7, 8), seed=0):
    return np.random.default_rng(seed).uniform(0.5, 2.0, size=(c, *shape)).astype(np.float32)


# --- crop -------------------------------------------------------------------------------------------------


def test_crop_box_is_union_over_channels_end_exclusive():
    img = np.zeros((2, 10, 12, 14), np.float32)
    img[0, 2, 3, 4] = 1.0
    img[1, 7, 9, 5] = 0.5
    img[1, 8, 1, 13] = -3.0  # not > 0: ignored
    lab = np.zeros((1, 10, 12, 14), np.uint8)
    lab[0, 2, 3, 4] = 2
    x, y, box = pp.crop_to_nonzero(img, lab)
    np.testing.assert_array_equal(box, [[2, 8], [3, 10], [4, 6]])
    assert x.shape == (2, 6, 7, 2) and y.shape == (1, 6, 7, 2)
    assert x[0, 0, 0, 0] == 1.0 and x[1, -1, -1, 1] == 0.5 and y[0, 0, 0, 0] == 2


def test_crop_all_zero_or_negative_keeps_full_box():
    img = -np.ones((1, 4, 5, 6), np.float32)
    img[0, 1, 1, 1] = 0.0
    x, y, box = pp.crop_to_nonzero(img)
    np.testing.assert_array_equal(box, [[0, 4], [0, 5], [0, 6]])
    assert x.shape == img.shape and y is None


def test_crop_rejects_mismatched_label():
    with pytest.raises(ValueError, match="case 'c7'.*label shape"):
        pp.crop_to_nonzero(np.ones((1, 4, 4, 4), np.float32), np.zeros((1, 4, 4, 5), np.uint8), case="c7")


# --- shapes and anisotropy --------------------------------------------------------------------------------


def test_target_shape_truncates():
    assert pp.target_shape((10, 10, 3), (2.5, 1.0, 3.6), (1.0, 1.0, 1.0)) == (25, 10, 10)  # 10.8 -> 10
    assert pp.target_shape((20, 320, 320), (4.0, 0.625, 0.625), (3.6, 0.62, 0.62)) == (22, 322, 322)
    assert pp.target_shape((7, 7, 7), (0.7, 0.7, 0.7), (1, 1, 1)) == (4, 4, 4)  # 4.9 -> 4


def test_resampled_shape_and_the_empty_shape_check():
    assert pp.resampled_shape((7, 7, 7), (0.7, 0.7, 0.7), (1, 1, 1)) == [4, 4, 4]
    assert pp.resampled_shape((7, 7, 7), (0.7, 1.0, 1.0), (0.7, 1.0, 1.0)) == [7, 7, 7]  # no resampling
    assert pp.resampled_shape((1, 8, 8), (0.5, 1, 1), (2, 1, 1)) == [0, 8, 8]  # unchecked
    assert pp.checked_resampled_shape((2, 8, 8), (0.5, 1, 1), (1, 1, 1), "c3") == [1, 8, 8]
    want = "case 'c3': resampling its shape [1, 8, 8] at [0.5, 1.0, 1.0] mm to [2.0, 1.0, 1.0] mm gives"
    with pytest.raises(DatasetError, match=re.escape(f"{want} an empty shape [0, 8, 8]")):
        pp.checked_resampled_shape((1, 8, 8), np.array([0.5, 1, 1]), (2, 1, 1), "c3")


def test_is_anisotropic_source_or_target_ratio_at_least_3():
    assert pp.is_anisotropic((3.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert not pp.is_anisotropic((2.9, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert pp.is_anisotropic((1.0, 1.0, 1.0), (3.6, 0.62, 0.62))
    assert not pp.is_anisotropic((1.5, 0.8, 0.8), (1.5, 0.8, 0.8))


def test_needs_resampling_ignores_float32_rounding_of_pixdim():
    assert not pp.needs_resampling((float(np.float32(0.7676)),) * 3, (0.7676,) * 3)
    assert pp.needs_resampling((0.625, 0.625, 4.0), (0.62, 0.62, 3.6))


# --- resampling (hand-computed; the skimage oracle is in tests/parity) ----------------------------------


def test_label_linear_rule_and_later_class_wins():
    lab = np.array([0, 1], np.uint8).reshape(1, 1, 1, 2)
    # coords (k + .5) / 2 - .5 = -.25, .25, .75, 1.25 -> 0, .25, .75, 1 -> [0, 0, 1, 1]
    out = pp.resample_label(lab, (1, 1, 4), anisotropic=False)
    np.testing.assert_array_equal(out.ravel(), [0, 0, 1, 1])
    lab = np.array([1, 2], np.uint8).reshape(1, 1, 1, 2)
    # middle output at coordinate 0.5: class 1 and class 2 both reach 0.5 -> the later class (2) wins
    out = pp.resample_label(lab, (1, 1, 3), anisotropic=False)
    np.testing.assert_array_equal(out.ravel(), [1, 2, 2])


def test_anisotropic_z_pass_is_nearest():
    img = _vol(1, (4, 5, 6))
    lab = (img > 1.2).astype(np.uint8)
    # in-plane unchanged; Z 4 -> 2 at coordinates (k + .5) * 2 - .5 = .5, 2.5 -> nearest rounds up: 1, 3
    np.testing.assert_array_equal(pp.resample_image(img, (2, 5, 6), anisotropic=True), img[:, [1, 3]])
    np.testing.assert_array_equal(pp.resample_label(lab, (2, 5, 6), anisotropic=True), lab[:, [1, 3]])


def test_cubic_resample_constant_stays_and_output_clipped():
    const = np.full((1, 5, 6, 7), 3.25, np.float32)
    np.testing.assert_allclose(pp.resample_image(const, (9, 4, 11), anisotropic=False), 3.25, rtol=1e-6)
    img = np.zeros((2, 6, 6, 6), np.float32)
    img[:, 3, 3, 3] = [1.0, 5.0]  # a spike rings: cubic splines overshoot below 0 without clipping
    out = pp.resample_image(img, (13, 13, 13), anisotropic=False)
    assert out.dtype == np.float32 and out.shape == (2, 13, 13, 13)
    assert out.min() >= 0.0 and out[0].max() <= 1.0 and out[1].max() <= 5.0 and out[1].max() > 1.0


def test_resample_same_shape_is_identity():
    img = _vol()
    np.testing.assert_array_equal(pp.resample_image(img, img.shape[1:], anisotropic=False), img)


# --- normalisation ----------------------------------------------------------------------------------------


def test_mri_zscore_over_nonzero_keeps_zeros():
    img = _vol(2, (4, 5, 6))
    img[0, :2] = 0.0
    img[1, :, :, 0] = 0.0
    out = pp.normalize(img, "MRI")
    for c in range(2):
        nz = img[c] != 0
        v = img[c][nz].astype(np.float64)
        np.testing.assert_allclose(out[c][nz], (v - v.mean()) / v.std(), atol=1e-5)
        assert (out[c][~nz] == 0).all()
    assert out.dtype == np.float32


def test_mri_constant_and_empty_channels():
    img = np.zeros((2, 3, 3, 3), np.float32)
    img[0, 1] = 7.0  # std 0 -> divide by 1
    out = pp.normalize(img, "MRI")
    assert (out == 0).all()


def test_ct_clip_then_standardise():
    img = np.array([-2000.0, -17.0, 0.0, 99.4, 500.0], np.float32).reshape(1, 1, 1, 5)
    out = pp.normalize(img, "CT", (-17.0, 201.0, 99.4, 39.36))
    want = (np.array([-17.0, -17.0, 0.0, 99.4, 201.0]) - 99.4) / 39.36
    np.testing.assert_allclose(out.ravel(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ct_stats"):
        pp.normalize(img, "CT", None)


# --- padding ----------------------------------------------------------------------------------------------


def test_pad_floor_before_ceil_after():
    np.testing.assert_array_equal(pp.pad_amounts((5, 10, 3), (8, 10, 6)), [[1, 2], [0, 0], [1, 2]])
    img, lab = _vol(1, (5, 10, 3)), np.ones((1, 5, 10, 3), np.uint8)
    x, y, pads = pp.pad_to_patch(img, lab, (8, 4, 6))
    assert x.shape == (1, 8, 10, 6) and y.shape == (1, 8, 10, 6)
    np.testing.assert_array_equal(x[:, 1:6, :, 1:4], img)
    assert x.sum() == pytest.approx(img.sum()) and y.sum() == lab.sum()
    x2, _, pads2 = pp.pad_to_patch(img, None, (12, 6))  # 2D patch: Z untouched
    assert x2.shape == (1, 5, 12, 6) and pads2[0].tolist() == [0, 0]


# --- meta record ------------------------------------------------------------------------------------------


def _meta():
    return CaseMeta(crop_box=[[1, 5], [0, 7], [2, 8]], original_shape=(6, 7, 9), cropped_shape=(4, 7, 6),
                    resampled_shape=(8, 7, 6), source_spacing=(2.0, 1.0, 1.0), target_spacing=(1.0, 1.0, 1.0),
                    affine=np.diag([1.0, 1.0, 2.0, 1.0]), padding=[[0, 0], [1, 2], [0, 0]])


def test_meta_round_trip_without_pickle(tmp_path):
    meta = _meta()
    path = tmp_path / "case_meta.npy"
    meta.save(path)
    rec = np.load(path, allow_pickle=False)
    assert rec.dtype.names and not rec.dtype.hasobject
    back = CaseMeta.load(path)
    for name in ("original_shape", "cropped_shape", "resampled_shape", "source_spacing", "target_spacing"):
        assert getattr(back, name) == getattr(meta, name)
    for name in ("crop_box", "affine", "padding"):
        np.testing.assert_array_equal(getattr(back, name), getattr(meta, name))
    assert back.final_shape == (8, 10, 6)
    assert [p.name for p in tmp_path.iterdir()] == ["case_meta.npy"]  # no temp file left


def test_meta_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.npy"
    _meta().save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pp.np, "save", boom)
    other = _meta()
    other.original_shape = (1, 2, 3)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.npy"]


def test_meta_load_rejects_other_files(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(ValueError, match="x.npy.*not a case meta"):
        CaseMeta.load(tmp_path / "x.npy")


# --- the whole case and its inverse -----------------------------------------------------------------------


def _case(shape=(10, 12, 14), box=((2, 8), (3, 9), (1, 13))):
    img = np.zeros((2, *shape), np.float32)
    sl = (slice(None),) + tuple(slice(a, b) for a, b in box)
    img[sl] = _vol(2, tuple(b - a for a, b in box), seed=3)
    lab = np.zeros((1, *shape), np.uint8)
    inner = tuple(slice(a + 1, b - 1) for a, b in box)
    lab[(0, *inner)] = 1
    lab[0, box[0][0] + 2, box[1][0] + 2, box[2][0] + 2] = 2
    return img, lab


def test_preprocess_case_training_identity_spacing():
    img, lab = _case()
    x, y, meta = pp.preprocess_case(img, lab, (1.0, 1.0, 1.0), target_spacing=(1.0, 1.0, 1.0),
                                    patch_size=(8, 8, 8), case="c1")
    np.testing.assert_array_equal(meta.crop_box, [[2, 8], [3, 9], [1, 13]])
    assert meta.cropped_shape == meta.resampled_shape == (6, 6, 12)
    np.testing.assert_array_equal(meta.padding, [[1, 1], [1, 1], [0, 0]])
    assert x.shape == (2, 8, 8, 12) and y.shape == (1, 8, 8, 12) and x.dtype == np.float32
    assert y.dtype == np.uint8 and y.sum() == lab.sum()
    inner = x[:, 1:7, 1:7, :]
    np.testing.assert_allclose(inner.reshape(2, -1).mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(inner.reshape(2, -1).std(1), 1, atol=1e-4)
    assert (x[:, 0] == 0).all() and (x[:, -1] == 0).all()


def test_preprocess_case_test_mode_resamples_and_skips_padding():
    img, lab = _case()
    x, y, meta = pp.preprocess_case(img, None, (2.0, 1.0, 1.0), target_spacing=(1.0, 1.0, 1.0),
                                    patch_size=(64, 64, 64), mode="test")
    assert y is None and meta.resampled_shape == (12, 6, 12) and x.shape == (2, 12, 6, 12)
    assert not meta.padding.any() and meta.target_spacing == (1.0, 1.0, 1.0)


def test_restore_to_source_inverts_crop_and_padding():
    img, lab = _case()
    x, y, meta = pp.preprocess_case(img, lab, (1.0, 1.0, 1.0), target_spacing=(1.0, 1.0, 1.0),
                                    patch_size=(8, 8, 8))
    probs = np.stack([y[0] == c for c in range(3)]).astype(np.float32)
    back = pp.restore_to_source(probs, meta)
    assert back.shape == (3, *img.shape[1:])
    np.testing.assert_array_equal(back.argmax(0), lab[0])
    np.testing.assert_array_equal(back[0][lab[0] == 0], 1.0)  # outside the box: background
    np.testing.assert_array_equal(pp.restore_label_map(probs, meta), lab[0])
    logits = np.log(np.clip(probs, 1e-6, 1))
    soft = pp.restore_to_source(logits, meta, kind="logits", softmax=True)
    np.testing.assert_allclose(soft.sum(0), 1, rtol=1e-6)
    np.testing.assert_array_equal(soft.argmax(0), lab[0])
    with pytest.raises(ValueError, match="preprocessed"):
        pp.restore_to_source(probs[:, 1:], meta)


def test_restore_to_source_undoes_resampling_shape():
    img, lab = _case()
    x, y, meta = pp.preprocess_case(img, lab, (2.0, 1.0, 1.0), target_spacing=(1.0, 1.0, 1.0),
                                    patch_size=(16, 8, 8))
    assert meta.resampled_shape == (12, 6, 12) and x.shape == (2, 16, 8, 12)
    probs = np.stack([y[0] == c for c in range(3)]).astype(np.float32)
    back = pp.restore_to_source(probs, meta)
    assert back.shape == (3, *img.shape[1:])
    assert back.min() >= 0 and back.max() <= 1  # clipped per channel
    lm = pp.restore_label_map(probs, meta)
    np.testing.assert_array_equal(lm, back.argmax(0))
    # upsample x2 in Z, then back: the interior of class 1 survives
    assert (lm[lab[0] == 1] == 1).mean() > 0.9 and (lm[img[0] == 0] == 0).all()


def test_preprocess_2d_pads_then_center_crops_and_restores():
    img, lab = _case(shape=(5, 8, 15), box=((0, 5), (2, 6), (3, 12)))  # cropped in-plane (4, 9)
    x, y, meta = pp.preprocess_case(img, lab, (3.0, 1.0, 1.0), target_spacing=(1.0, 1.0), patch_size=(6, 6),
                                    dim=2)
    assert x.shape == (2, 5, 6, 6) and y.shape == (1, 5, 6, 6)
    assert meta.resampled_shape == meta.cropped_shape == (5, 4, 9)  # no resampling in 2D
    np.testing.assert_array_equal(meta.padding, [[0, 0], [1, 1], [-1, -2]])  # crop start (9 - 6) // 2 = 1
    assert meta.target_spacing == (3.0, 1.0, 1.0) and meta.final_shape == (5, 6, 6)
    np.testing.assert_array_equal(y[0, :, 1:5, :], lab[0, :, 2:6, 4:10])
    probs = np.stack([y[0] == c for c in range(3)]).astype(np.float32)
    lm = pp.restore_label_map(probs, meta)
    want = np.zeros_like(lab[0])
    want[:, 2:6, 4:10] = lab[0, :, 2:6, 4:10]
    np.testing.assert_array_equal(lm, want)


def test_preprocess_case_errors_name_the_case():
    img, lab = _case()
    with pytest.raises(ValueError, match="case 'bad'.*spacing"):
        pp.preprocess_case(img, lab, (1.0, 0.0, 1.0), target_spacing=(1, 1, 1), patch_size=(8, 8, 8),
                           case="bad")
    with pytest.raises(ValueError, match="case 'bad'.*patch"):
        pp.preprocess_case(img, lab, (1.0, 1.0, 1.0), target_spacing=(1, 1, 1), patch_size=(8, 8), case="bad")
    with pytest.raises(ValueError, match="case 'bad'.*image"):
        pp.preprocess_case(img[0], None, (1.0, 1.0, 1.0), target_spacing=(1, 1, 1), patch_size=(8, 8, 8),
                           case="bad")
    with pytest.raises(DatasetError, match="case 'bad'.*gives an empty shape"):
        pp.preprocess_case(img, lab, (1.0, 1.0, 1.0), target_spacing=(100, 1, 1), patch_size=(8, 8, 8),
                           case="bad")


def test_restore_streams_one_channel_at_a_time():
    img = np.zeros((1, 40, 48, 44), np.float32)
    img[0, 2:38, 3:45, 1:43] = 1.0
    _, _, meta = pp.preprocess_case(img, None, (1.5, 1.0, 1.0), target_spacing=(1, 1, 1),
                                    patch_size=(64, 48, 48))
    k = 16
    pred = np.random.default_rng(0).random((k, *meta.final_shape)).astype(np.float32)
    unit = np.prod(meta.cropped_shape) * 4  # one channel at the cropped source shape
    tracemalloc.start()
    out = pp.restore_to_source(pred, meta)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak - out.nbytes < 10 * unit  # all channels at once would need >= k units more
    tracemalloc.start()
    lm = pp.restore_label_map(pred, meta)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * unit
    np.testing.assert_array_equal(lm, out.argmax(0))


def test_threads_give_the_same_result():
    img, lab = _case()
    a = pp.preprocess_case(img, lab, (2.0, 1.0, 3.5), target_spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8))
    b = pp.preprocess_case(img, lab, (2.0, 1.0, 3.5), target_spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8),
                           workers=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_padded_and_unpadded_outputs_are_identical():
    img, lab = _case()
    kw = dict(target_spacing=(1, 1, 1), patch_size=(16, 9, 15))
    x, y, meta = pp.preprocess_case(img, lab, (2.0, 1.0, 1.0), **kw)
    xt, _, mt = pp.preprocess_case(img, lab, (2.0, 1.0, 1.0), mode="test", **kw)
    assert meta.padding[1:].any() and xt.shape[1:] == mt.resampled_shape
    inner = [slice(int(b), int(b) + s) for (b, _), s in zip(meta.padding, mt.resampled_shape, strict=True)]
    np.testing.assert_array_equal(x[(slice(None), *inner)], xt)  # same rounding whatever the layout


# --- streamed (slab) resizing for the inverse --------------------------------------------------------------

# (input shape, output shape): Z up / down / unchanged, Z passed first / between / last, anisotropic Z,
# a single input row, and Z long enough that interior slabs see a truncated prefilter window.
SLAB_CASES = [
    ((90, 8, 9), (150, 9, 9)),  # Z up, passed last
    ((150, 8, 9), (90, 6, 11)),  # Z down, passed first
    ((40, 10, 11), (25, 15, 5)),  # Z passed between the in-plane axes
    ((12, 10, 9), (60, 7, 8)),  # anisotropic: Z x5
    ((7, 9, 9), (7, 12, 5)),  # Z unchanged
    ((1, 5, 5), (3, 7, 7)),  # one input row
]


@pytest.mark.parametrize(("shape", "new"), SLAB_CASES)
@pytest.mark.parametrize("order", [1, 3])
def test_resize_slabs_equals_resize(shape, new, order, monkeypatch):
    from nnunet_jax.preprocessing import resample

    x = (np.random.default_rng(3).standard_normal(shape) * 4).astype(np.float32)
    want = resample.resize(x, new, order, dtype=np.float32)
    for slab, col_bytes in [(1, 8 << 20), (7, 2000), (1000, 8 << 20)]:  # 2000 B: window in column blocks
        monkeypatch.setattr(resample, "_WINDOW_BYTES", col_bytes)
        got, stop = np.full(new, np.nan, np.float32), 0
        for sl, block in resample.resize_slabs(x, new, order, slab=slab):
            assert sl.start == stop and block.dtype == np.float32  # consecutive, edge slab included
            got[sl], stop = block, sl.stop
        assert stop == new[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
        assert (got == want).mean() > 0.999  # in practice bit-identical


def test_resize_slabs_margin_is_what_makes_it_exact():
    from nnunet_jax.preprocessing import resample

    x = (np.random.default_rng(4).standard_normal((90, 6, 7)) * 4).astype(np.float32)
    want = resample.resize(x, (150, 6, 7), 3, dtype=np.float32)
    got = np.concatenate([b for _, b in resample.resize_slabs(x, (150, 6, 7), 3, slab=5, margin=2)])
    assert np.abs(got - want).max() > 1e-3  # a short window is visibly wrong: the test above can fail


def test_resize_slabs_rejects_bad_arguments():
    from nnunet_jax.preprocessing.resample import resize_slabs

    with pytest.raises(ValueError, match="order"):
        next(resize_slabs(np.zeros((4, 4, 4), np.float32), (5, 5, 5), 0))
    with pytest.raises(ValueError, match="shape"):
        next(resize_slabs(np.zeros((4, 4, 4), np.float32), (5, 5), 3))


def _long_case(k=3, seed=0, shape=(300, 14, 12)):
    """Source ``shape`` at 1 mm in Z, preprocessed at 2 mm → half the rows: many slabs, cropped box."""
    img = np.zeros((1, *shape), np.float32)
    img[0, 3:-3, 1:, 2:-1] = 1.0
    _, _, meta = pp.preprocess_case(img, None, (1.0, 0.8, 0.8), target_spacing=(2.0, 0.8, 0.9),
                                    patch_size=(64, 16, 16))
    pred = (np.random.default_rng(seed).standard_normal((k, *meta.final_shape)) * 3).astype(np.float32)
    return pred, meta


@pytest.mark.parametrize("slab", [1, 6, 500])
def test_restore_slab_size_does_not_change_results(slab):
    pred, meta = _long_case()
    want = pp.restore_to_source(pred, meta, "logits", softmax=True, slab=500)
    got = pp.restore_to_source(pred, meta, "logits", softmax=True, slab=slab)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    unpadded, _ = pp._unpadded(pred, meta, "logits")
    for together in (True, False):  # slab-outer (few channels) and channel-outer (many) loops
        np.testing.assert_array_equal(pp._label_map(unpadded, meta, slab, together), want.argmax(0))
    np.testing.assert_array_equal(pp.restore_label_map(pred, meta, "logits", slab=slab), want.argmax(0))


def test_label_map_peak_is_below_one_source_channel():
    pred, meta = _long_case(shape=(800, 24, 20))
    voxels = int(np.prod(meta.original_shape))
    tracemalloc.start()
    lm = pp.restore_label_map(pred, meta, "logits", slab=8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the labels (1 B/voxel) plus rolling windows: less than one float32 channel at the source, which
    # the whole-volume version needed three of (running max, channel, resize intermediate)
    assert peak < voxels * 4
    assert lm.shape == meta.original_shape and lm.max() == 2

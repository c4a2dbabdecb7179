"""Sliding window (docs/reference.md §8): identity/linear maps reproduce the volume, a slow NumPy definition
of the blend matches, window starts and weights by hand, one compile per bucket, TTA semantics."""

import jax.numpy as jnp
import numpy as np
import pytest

from nnunet_jax.inference import (
    blend_weights,
    bucket_length,
    common_frame_shape,
    compile_cache_size,
    flip_tta,
    sliding_window_inference,
    window_starts,
)


def identity(params, x):
    return x


def linear(params, x):
    return x @ params


def positional(params, x):
    """Depends on the position inside the window, so the blend weights decide the result."""
    grids = jnp.meshgrid(*[jnp.arange(r, dtype=jnp.float32) / r for r in x.shape[1:-1]], indexing="ij")
    return x @ params["w"] + sum(grids)[None, ..., None] * params["gain"]


def _params(c_in=2, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(c_in, k)), jnp.float32),
        "gain": jnp.asarray(rng.normal(size=k), jnp.float32),
    }


def _reference(volume, params, roi, overlap, blend, sigma_scale=0.125):
    """docs/reference.md §8 written as plain loops in NumPy float64."""
    shape = volume.shape[:-1]
    pads = [
        ((r - s) // 2, r - s - (r - s) // 2) if s < r else (0, 0) for s, r in zip(shape, roi, strict=True)
    ]
    v = np.pad(volume.astype(np.float64), pads + [(0, 0)])
    axes_starts = []
    for size, r in zip(v.shape[:-1], roi, strict=True):
        step = r if size == r else max(int(r * (1 - overlap)), 1)
        starts, s = [], 0
        while s + r < size:
            starts.append(s)
            s += step
        axes_starts.append(starts + [size - r])
    weight = np.ones(roi)
    if blend == "gaussian":
        g = [np.exp(-((np.arange(r) - (r - 1) / 2) ** 2) / (2 * (sigma_scale * r) ** 2)) for r in roi]
        weight = np.prod(np.meshgrid(*g, indexing="ij"), axis=0)
        weight = np.maximum(weight, max(weight.min(), 1e-3))
    w = {k: np.asarray(val, np.float64) for k, val in params.items()}
    pos = sum(np.meshgrid(*[np.arange(r) / r for r in roi], indexing="ij"))
    acc = np.zeros(v.shape[:-1] + (w["w"].shape[1],))
    wsum = np.zeros(v.shape[:-1] + (1,))
    for start in np.stack(np.meshgrid(*axes_starts, indexing="ij"), -1).reshape(-1, len(roi)):
        sl = tuple(slice(s, s + r) for s, r in zip(start, roi, strict=True))
        out = v[sl] @ w["w"] + pos[..., None] * w["gain"]
        acc[sl] += out * weight[..., None]
        wsum[sl] += weight[..., None]
    res = acc / wsum
    return res[tuple(slice(b, b + s) for (b, _), s in zip(pads, shape, strict=True))]


@pytest.mark.parametrize(
    "shape,roi", [((21, 10, 13), (8, 8, 8)), ((5, 17, 9), (8, 8, 6)), ((31, 9), (12, 12)), ((7, 40), (8, 16))]
)
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_identity_and_linear_reproduce_volume(shape, roi, blend):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=shape + (2,)).astype(np.float32)
    out = sliding_window_inference(volume, identity, None, roi, overlap=0.5, blend=blend, batch_size=3)
    np.testing.assert_allclose(np.asarray(out), volume, atol=1e-6)
    w = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    out = sliding_window_inference(jnp.asarray(volume), linear, w, roi, overlap=0.25, blend=blend, tta=True)
    assert out.shape == shape + (3,) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), volume @ np.asarray(w), atol=1e-5)


@pytest.mark.parametrize(
    "shape,roi", [((21, 10, 13), (8, 8, 8)), ((5, 17, 9), (8, 8, 6)), ((7, 40), (8, 16))]
)
@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("bucket", [True, False])
def test_matches_numpy_definition(shape, roi, overlap, bucket):
    volume = np.random.default_rng(1).normal(size=shape + (2,)).astype(np.float32)
    params = _params()
    ref = _reference(volume, params, roi, overlap, "gaussian")
    ours = sliding_window_inference(
        volume, positional, params, roi, overlap=overlap, batch_size=2, bucket=bucket
    )
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)
    assert np.std(ref) > 0.1


def test_tta_is_whole_volume_flip_mean():
    volume = np.random.default_rng(2).normal(size=(11, 6, 9, 2)).astype(np.float32)  # odd padding in axis 1
    params = _params()
    roi = (8, 8, 8)
    ours = sliding_window_inference(volume, positional, params, roi, tta=True, batch_size=2)
    ref = flip_tta(
        lambda v: sliding_window_inference(v, positional, params, roi, batch_size=2), jnp.asarray(volume)
    )
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
    plain = sliding_window_inference(volume, positional, params, roi, batch_size=2)
    assert np.max(np.abs(np.asarray(ours) - np.asarray(plain))) > 1e-2  # TTA does something here


def test_tta_of_flip_equivariant_function_is_identity():
    def pointwise(params, x):
        return jnp.concatenate([x**2, jnp.sin(x)], axis=-1)

    volume = np.random.default_rng(3).normal(size=(13, 10, 2)).astype(np.float32)
    out = sliding_window_inference(volume, pointwise, None, (8, 8), tta=True)
    np.testing.assert_allclose(np.asarray(out), np.concatenate([volume**2, np.sin(volume)], -1), atol=1e-5)


def test_window_starts_by_hand():
    np.testing.assert_array_equal(window_starts((20,), (8,), 0.5)[:, 0], [0, 4, 8, 12])
    np.testing.assert_array_equal(window_starts((21,), (8,), 0.5)[:, 0], [0, 4, 8, 12, 13])
    np.testing.assert_array_equal(window_starts((20,), (8,), 0.25)[:, 0], [0, 6, 12])
    np.testing.assert_array_equal(window_starts((8,), (8,), 0.5)[:, 0], [0])
    np.testing.assert_array_equal(window_starts((9,), (8,), 0.9)[:, 0], [0, 1])  # interval floor 0 -> 1
    np.testing.assert_array_equal(window_starts((10, 8), (8, 8), 0.5), [[0, 0], [2, 0]])
    with pytest.raises(ValueError, match="smaller than the window"):
        window_starts((7,), (8,), 0.5)


def test_blend_weights_by_hand():
    w = blend_weights((5,), "gaussian", 0.2)  # sigma 1, centre 2
    np.testing.assert_allclose(w, np.exp(-np.array([4, 1, 0, 1, 4]) / 2), rtol=1e-6)
    w = blend_weights((16, 16), "gaussian", 0.125)  # corners exp(-7.5^2 / 8)^2 < 1e-3 -> clamped
    assert w.min() == pytest.approx(1e-3) and w.max() < 1 and np.allclose(w, w[::-1, ::-1])
    assert np.all(blend_weights((4, 6), "constant") == 1)
    with pytest.raises(ValueError, match="blend"):
        blend_weights((4,), "linear")


def test_bucket_ladder():
    # roi 8, interval 4: lengths 8, 9 exact; then 8 + 4 * {1, 2, 3, 4, 6, 8, 12, ...}
    got = [bucket_length(n, 8, 4) for n in (8, 9, 10, 12, 13, 20, 21, 24, 25, 32, 33, 40, 41, 56)]
    assert got == [8, 9, 12, 12, 16, 20, 24, 24, 32, 32, 40, 40, 56, 56]


def test_one_compile_per_bucket():
    calls = []

    def counted(params, x):
        calls.append(x.shape)
        return x @ params

    w = jnp.ones((2, 3), jnp.float32)
    roi = (8, 8, 8)
    before = compile_cache_size()
    rng = np.random.default_rng(4)
    sliding_window_inference(rng.normal(size=(20, 13, 11, 2)).astype(np.float32), counted, w, roi)
    assert compile_cache_size() == before + 1
    traced = len(calls)
    # another shape in the same bucket (20, 16, 12) and new parameter values: no trace, no compile
    out = sliding_window_inference(rng.normal(size=(19, 14, 12, 2)).astype(np.float32), counted, 2 * w, roi)
    assert out.shape == (19, 14, 12, 3)
    assert compile_cache_size() == before + 1 and len(calls) == traced
    # a shape in another bucket compiles once more
    sliding_window_inference(rng.normal(size=(30, 13, 11, 2)).astype(np.float32), counted, w, roi)
    assert compile_cache_size() == before + 2


def test_common_frame_one_compile_and_same_result():
    def counted(params, x):  # a distinct function object: its own cache entries
        return x @ params

    w = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3)), jnp.float32)
    roi = (8, 8, 8)
    shapes = [(5, 30, 9), (21, 10, 13), (12, 8, 17)]
    frame = common_frame_shape(shapes, roi, tta=True)
    assert frame == (21, 30, 17)  # axis 0: max(5 + 2 * ceil(3 / 2), 21, 12); axis 1: 8 stays 8 with TTA
    before = compile_cache_size()
    for shape in shapes:
        volume = np.random.default_rng(6).normal(size=shape + (2,)).astype(np.float32)
        ours = sliding_window_inference(volume, counted, w, roi, tta=True, frame_shape=frame)
        ref = sliding_window_inference(volume, counted, w, roi, tta=True, bucket=False)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
    assert compile_cache_size() == before + 1 + len(shapes)  # one shared + one exact per shape
    with pytest.raises(ValueError, match="cannot hold"):
        sliding_window_inference(np.zeros((30, 8, 8, 2), np.float32), counted, w, roi, frame_shape=frame)


def test_bad_input():
    with pytest.raises(ValueError, match="spatial axes"):
        sliding_window_inference(np.zeros((8, 8, 1), np.float32), identity, None, (8, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(np.zeros((8, 8, 1), np.float32), identity, None, (8, 8), overlap=1.0)


def _v2_reference(volume, fn, roi, step=0.5, dtype=np.float16):
    """nnU-Net v2's sliding window (docs/nnunetv2.md §4) as plain NumPy loops: centred zero padding, its
    tiles and Gaussian, buffers of ``dtype`` rounded after every addition, L / W in ``dtype``."""
    from nnunet_jax.inference.sliding_window import v2_gaussian, v2_window_starts

    shape = volume.shape[:-1]
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(shape, roi, strict=True)]
    v = np.pad(volume, pads + [(0, 0)])
    g = v2_gaussian(tuple(roi)).astype(np.float32)
    acc = wsum = None
    for start in v2_window_starts(v.shape[:-1], roi, step):
        sl = tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))
        p = fn(v[sl]) * g[..., None]
        if acc is None:
            acc = np.zeros((*v.shape[:-1], p.shape[-1]), dtype)
            wsum = np.zeros(v.shape[:-1], dtype)
        acc[sl] = (acc[sl].astype(np.float32) + p).astype(dtype)
        wsum[sl] = (wsum[sl].astype(np.float32) + g).astype(dtype)
    out = (acc.astype(np.float32) / wsum[..., None].astype(np.float32)).astype(dtype)
    return out[tuple(slice(a, a + s) for (a, _), s in zip(pads, shape, strict=True))]


@pytest.mark.parametrize("shape", [(30, 47, 35), (10, 20, 40), (60, 70, 56)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_v2_grid_fp16_accumulation_is_bit_exact(shape, batch_size):
    """grid='nnunetv2' rounds every tile sum to fp16 in v2's tile order, so it equals v2's loops bit for bit
    (a linear map on dyadic values keeps the per-tile outputs exact on both sides); the large-patch case has
    fp16-subnormal Gaussian corners. fp32 accumulation differs from fp16 (the mode matters)."""
    rng = np.random.default_rng(1)
    roi = (44, 56, 56) if shape[0] >= 44 else (12, 20, 18)
    w = (np.round(rng.normal(size=(2, 3)) * 20) / 4).astype(np.float32)
    volume = (np.round(rng.normal(size=(*shape, 2)) * 8) / 8).astype(np.float32)
    ours = np.asarray(sliding_window_inference(volume, linear, w, roi, batch_size=batch_size,
                                               grid="nnunetv2"))
    ref = _v2_reference(volume, lambda x: (x.astype(np.float64) @ w).astype(np.float32), roi)
    assert ours.dtype == np.float16
    np.testing.assert_array_equal(ours, ref)
    f32 = np.asarray(sliding_window_inference(volume, linear, w, roi, batch_size=batch_size, grid="nnunetv2",
                                              accumulate="float32"))
    assert f32.dtype == np.float32 and not np.array_equal(f32.astype(np.float16), ours)
    ref32 = _v2_reference(volume, lambda x: (x.astype(np.float64) @ w).astype(np.float32), roi,
                          dtype=np.float32)
    np.testing.assert_allclose(f32, ref32, rtol=1e-5, atol=1e-5)


def test_v2_tiles_and_mirroring():
    from nnunet_jax.inference.sliding_window import mirrored, v2_window_starts

    starts = v2_window_starts((100, 57, 44), (44, 56, 44), 0.5)
    assert sorted(set(starts[:, 0].tolist())) == [0, 19, 37, 56]  # docs/nnunetv2.md §4's example
    assert sorted(set(starts[:, 1].tolist())) == [0, 1] and set(starts[:, 2].tolist()) == {0}
    assert starts[:3, 2].tolist() == [0, 0, 0] and starts[:2, 1].tolist() == [0, 1]  # a0 outermost
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 5, 4, 1)), jnp.float32)
    pos = mirrored(positional, (0, 1, 2))
    params = _params(c_in=1)
    expect = sum(jnp.flip(positional(params, jnp.flip(x, a)), a)
                 for a in [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]) / 8
    np.testing.assert_allclose(np.asarray(pos(params, x)), np.asarray(expect), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mirrored"):
        sliding_window_inference(np.zeros((8, 8, 1), np.float32), identity, None, (8, 8), grid="nnunetv2",
                                 tta=True)


@pytest.mark.parametrize("grid", ["monai", "nnunetv2"])
def test_batch_no_wider_than_the_windows(grid):
    """A one-window volume at batch 4 used to run the network on 3 blank windows (4x the work)."""
    seen = []

    def record(params, x):
        seen.append(x.shape[0])  # at trace time: the batch the network is compiled for
        return x

    volume = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype(np.float32)
    out = sliding_window_inference(volume, record, None, (8, 8, 8), batch_size=4, grid=grid, blend="constant")
    np.testing.assert_allclose(np.asarray(out, np.float32), volume, atol=2e-3)  # fp16 sums on the v2 grid
    assert seen and set(seen) == {1}
    seen.clear()
    sliding_window_inference(np.zeros((12, 8, 8, 1), np.float32), record, None, (8, 8, 8), batch_size=4,
                             grid=grid)
    assert set(seen) == {2}  # two windows along the first axis, as the frame holds them


def test_mirroring_traces_the_network_once():
    """Mirrored passes loop over one traced network (buffers reused, one compile), not 8 copies."""
    import jax

    from nnunet_jax.inference.sliding_window import mirrored

    calls = []

    def count(params, x):
        calls.append(1)
        return positional(params, x)

    jax.jit(mirrored(count, (0, 1, 2))).lower(_params(c_in=1), jnp.zeros((1, 6, 5, 4, 1))).compile()
    assert len(calls) == 2  # the identity pass and the loop body

"""Data layer: layout helpers, case index, DALI pipelines (docs/reference.md §6) and the sharded iterator.

Augmentations are checked one at a time (the others' probabilities set to 0) on synthetic volumes whose
channels encode the label and the voxel coordinates, so each augmentation's effect can be read back:
its rate against a binomial tolerance and its parameter against the spec's range.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nnunet_jax.data.dataset import DatasetError, PreprocessedDataset
from nnunet_jax.data.folds import split_cases
from nnunet_jax.data.layout import to_channels_first, to_channels_last

# --------------------------------------------------------------------------------------------- helpers


def write_dataset(
    root: Path,
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    dim: int = 3,
    patch: tuple[int, ...] = (16, 16, 16),
    n_class: int = 2,
    test: tuple[str, ...] = (),
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for case, x in images.items():
        np.save(root / f"{case}_x.npy", x.astype(np.float32))
    for case, y in labels.items():
        np.save(root / f"{case}_y.npy", y.astype(np.uint8))
    plan = {
        "task": "99",
        "dim": dim,
        "patch_size": list(patch),
        "n_class": n_class,
        "in_channels": next(iter(images.values())).shape[0],
        "cases": {"training": sorted(labels), "test": list(test)},
    }
    (root / "plan.json").write_text(json.dumps(plan))
    return root


def within_binomial(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k / n - p) <= sigmas * np.sqrt(p * (1 - p) / n) + 1e-9


def run_batches(pipe, n: int) -> tuple[np.ndarray, np.ndarray]:
    imgs, lbls = [], []
    for _ in range(n):
        i, lab = pipe.run()
        imgs.append(i.as_array())
        lbls.append(lab.as_array())
    return np.concatenate(imgs), np.concatenate(lbls)


SHAPE = (16, 16, 64)  # (Z, Y, X); the patch equals the volume in the augmentation tests: crop = identity


@pytest.fixture(scope="module")
def coded_volume(tmp_path_factory) -> tuple[str, str, np.ndarray]:
    """Channels: 0 = label (as float), 1/2/3 = z/y/x coordinate; label asymmetric along every axis."""
    z, y, x = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    lab = ((x >= 40) & (y >= 4) & (z >= 2)).astype(np.uint8)
    img = np.stack([lab, z, y, x]).astype(np.float32)
    d = tmp_path_factory.mktemp("coded")
    np.save(d / "a_x.npy", img)
    np.save(d / "a_y.npy", lab[None])
    return str(d / "a_x.npy"), str(d / "a_y.npy"), img


def aug_samples(coded_volume, aug, n_batches: int = 8, batch: int = 50, seed: int = 0):
    from nnunet_jax.data.pipelines import train_pipeline

    xf, yf, img = coded_volume
    pipe = train_pipeline([xf], [yf], SHAPE, batch_size=batch, seed=seed, aug=aug)
    out, lab = run_batches(pipe, n_batches)
    return out, lab, to_channels_last(img)


def _dali():
    return pytest.importorskip("nvidia.dali")


# ---------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("xp", [np, jnp])
def test_layout_round_trip(xp):
    case3 = xp.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # (C, Z, Y, X)
    assert to_channels_last(case3).shape == (3, 4, 5, 2)
    assert to_channels_last(case3)[1, 2, 3, 1] == case3[1, 1, 2, 3]
    batch3 = xp.arange(6 * 2 * 3 * 4 * 5).reshape(6, 2, 3, 4, 5)
    assert to_channels_last(batch3).shape == (6, 3, 4, 5, 2)
    batch2 = xp.arange(6 * 2 * 4 * 5).reshape(6, 2, 4, 5)  # (N, C, Y, X): ambiguous rank, say it is 2D
    assert to_channels_last(batch2, spatial_dims=2).shape == (6, 4, 5, 2)
    assert to_channels_last(batch2, spatial_dims=2)[5, 3, 4, 1] == batch2[5, 1, 3, 4]
    for a, sd in [(case3, None), (batch3, None), (batch2, 2), (xp.ones((2, 4, 5)), 2)]:
        assert (to_channels_first(to_channels_last(a, sd), sd) == a).all()
    with pytest.raises(ValueError):
        to_channels_last(xp.ones((2, 3)), spatial_dims=3)


# --------------------------------------------------------------------------------------------- dataset


def test_dataset_index_and_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        PreprocessedDataset.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="plan.json is missing"):
        PreprocessedDataset.open(tmp_path / "empty")

    cases = [f"case_{i:02d}" for i in range(7)]
    imgs = {c: np.zeros((2, 4, 5, 6)) for c in cases + ["t0"]}
    labs = {c: np.zeros((1, 4, 5, 6)) for c in cases}
    root = write_dataset(tmp_path / "ds", imgs, labs, test=("t0",))
    ds = PreprocessedDataset.open(root)
    assert ds.training == tuple(cases) and ds.test == ("t0",)
    assert (ds.dim, ds.patch_size, ds.n_class, ds.in_channels) == (3, (16, 16, 16), 2, 2)
    assert ds.fold(2) == split_cases(cases, 2)
    assert ds.shape("case_03") == (2, 4, 5, 6)
    # Test cases live in <root>/test (preprocessed separately), so their absence here is fine.
    (root / "t0_x.npy").unlink()
    assert PreprocessedDataset.open(root).test == ("t0",)

    (root / "case_04_y.npy").unlink()
    with pytest.raises(DatasetError, match="case_04"):
        PreprocessedDataset.open(root).fold(0)
    np.save(root / "case_04_y.npy", np.zeros((1, 4, 5, 7), np.uint8))
    with pytest.raises(DatasetError, match="case_04_y.npy.*does not match"):
        PreprocessedDataset.open(root).check_labels(["case_04"])
    (root / "case_05_x.npy").unlink()
    with pytest.raises(DatasetError, match="case_05_x.npy"):
        PreprocessedDataset.open(root)
    plan = json.loads((root / "plan.json").read_text())
    del plan["patch_size"]
    (root / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(DatasetError, match="patch_size"):
        PreprocessedDataset.open(root)


# ------------------------------------------------------------------------------------ augmentations


def test_config_only_and_validation():
    from nnunet_jax.data.pipelines import AugmentConfig

    cfg = AugmentConfig().only("blur_prob")
    assert cfg.blur_prob == 0.15 and cfg.zoom_prob == 0 and cfg.flip_prob == 0 and cfg.oversampling == 0.33
    with pytest.raises(ValueError):
        AugmentConfig(noise_prob=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(zoom_range=(1.0, 0.7))


def test_no_augmentation_is_identity(coded_volume):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig

    out, lab, ref = aug_samples(coded_volume, AugmentConfig.none(), n_batches=1, batch=4)
    assert out.dtype == np.float32 and lab.dtype == np.uint8
    assert out.shape == (4, *SHAPE, 4) and lab.shape == (4, *SHAPE, 1)
    np.testing.assert_array_equal(out, np.broadcast_to(ref, out.shape))
    np.testing.assert_array_equal(lab[..., 0], out[..., 0])


def test_flips(coded_volume):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig

    out, lab, ref = aug_samples(coded_volume, AugmentConfig().only("flip_prob"))
    n = len(out)
    flipped = np.stack([out[:, 1, 1, 1, c] > out[:, -2, -2, -2, c] for c in (1, 2, 3)], axis=1)  # z, y, x
    for axis in range(3):
        assert within_binomial(int(flipped[:, axis].sum()), n, 0.5), flipped[:, axis].mean()
    # independent coins: all four (z, y) combinations occur about equally often
    combos = np.bincount(flipped[:, 0] * 2 + flipped[:, 1], minlength=4)
    assert all(within_binomial(int(k), n, 0.25) for k in combos), combos
    for i in range(n):  # the sample is exactly the volume flipped along the detected axes, label alike
        expect = np.flip(ref, axis=tuple(a for a in range(3) if flipped[i, a]))
        np.testing.assert_array_equal(out[i], expect)
    np.testing.assert_array_equal(lab[..., 0], out[..., 0])


def test_zoom(coded_volume):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig

    out, lab, _ = aug_samples(coded_volume, AugmentConfig().only("zoom_prob"))
    slope = np.median(np.diff(out[:, 8, 8, :, 3], axis=-1), axis=-1)  # x spacing after centre-crop + resize
    zoomed = slope < 1 - 1.5 / SHAPE[2]
    # a zoom whose crop rounds to the full 64 voxels (scale >= 63.5/64) is invisible
    assert within_binomial(int(zoomed.sum()), len(out), 0.15 * (63.5 / 64 - 0.7) / 0.3), zoomed.mean()
    assert slope.min() >= 0.7 - 1 / SHAPE[2] and slope.max() <= 1 + 1e-6
    s = slope[zoomed]  # scale ~ U(0.7, 1): mean about 0.85 and both ends reached
    assert abs(s.mean() - 0.85) < 0.05 and s.min() < 0.76 and s.max() > 0.94
    np.testing.assert_allclose(out[zoomed, 8, 8, :, 3].mean(axis=-1), (SHAPE[2] - 1) / 2, atol=0.6)  # centred
    # label (nearest) and image (cubic) moved alike: the label boundary matches the rounded image channel
    agree = (np.round(out[..., 0]) == lab[..., 0]).mean(axis=(1, 2, 3))
    assert agree.min() > 0.97
    np.testing.assert_array_equal(np.unique(lab), [0, 1])


def test_noise(coded_volume):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig

    out, lab, ref = aug_samples(coded_volume, AugmentConfig().only("noise_prob"))
    resid = out - ref
    noisy = np.abs(resid).max(axis=(1, 2, 3, 4)) > 0
    assert within_binomial(int(noisy.sum()), len(out), 0.15), noisy.mean()
    sigma = resid[noisy].reshape(int(noisy.sum()), -1).std(axis=1)
    assert sigma.max() < 0.335 and abs(sigma.mean() - 0.165) < 0.05  # sigma ~ U(0, 0.33)
    assert abs(resid[noisy].mean()) < 0.01
    np.testing.assert_array_equal(lab[..., 0], np.broadcast_to(ref[..., 0], lab.shape[:-1]))


def test_blur(tmp_path):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig, train_pipeline

    impulse = np.zeros((1, 17, 17, 17), np.float32)
    impulse[0, 8, 8, 8] = 1.0
    np.save(tmp_path / "a_x.npy", impulse)
    np.save(tmp_path / "a_y.npy", np.zeros((1, 17, 17, 17), np.uint8))
    pipe = train_pipeline(
        [tmp_path / "a_x.npy"],
        [tmp_path / "a_y.npy"],
        (17, 17, 17),
        batch_size=100,
        seed=3,
        aug=AugmentConfig().only("blur_prob"),
    )
    out, _ = run_batches(pipe, 6)
    out = out[..., 0]
    blurred = out[:, 8, 8, 8] < 1
    assert within_binomial(int(blurred.sum()), len(out), 0.15), blurred.mean()
    k = np.arange(17) - 8
    sig = np.stack(
        [np.sqrt((out[blurred].sum(axis=tuple({1, 2, 3} - {a})) * k**2).sum(-1)) for a in (1, 2, 3)]
    )
    np.testing.assert_allclose(sig[0], sig[2], rtol=1e-3)  # the same sigma on every spatial axis
    np.testing.assert_allclose(sig[0], sig[1], rtol=1e-3)
    # sampled-Gaussian std: ~0.46 at sigma 0.5, ~sigma above 1
    assert sig.min() > 0.42 and sig.max() < 1.52 and sig.min() < 0.6 and sig.max() > 1.35
    np.testing.assert_allclose(out[blurred].sum(axis=(1, 2, 3)), 1.0, rtol=1e-4)


def test_brightness(coded_volume):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig

    out, _, ref = aug_samples(coded_volume, AugmentConfig().only("brightness_prob"))
    ratio = out[:, 5, 6, 7, 3] / ref[5, 6, 7, 3]
    np.testing.assert_allclose(out, ratio[:, None, None, None, None] * ref, rtol=1e-5, atol=1e-5)
    changed = np.abs(ratio - 1) > 1e-6
    assert within_binomial(int(changed.sum()), len(out), 0.15), changed.mean()
    assert ratio.min() >= 0.7 - 1e-6 and ratio.max() <= 1.3 + 1e-6
    assert ratio[changed].min() < 0.8 and ratio[changed].max() > 1.2


def test_contrast_is_clamped_to_the_input_range(coded_volume):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig

    out, _, ref = aug_samples(coded_volume, AugmentConfig().only("contrast_prob"))
    x = ref[..., 3]  # x coordinate 0..63: range [0, 63]
    xo = out[..., 3]
    changed = np.abs(xo - x).max(axis=(1, 2, 3)) > 1e-5
    assert within_binomial(int(changed.sum()), len(out), 0.15), changed.mean()
    assert xo.min() >= 0 and xo.max() <= 63
    scale = xo[:, 0, 0, 1] / x[0, 0, 1]  # 1 * s is never clamped (s <= 1.5 < 63)
    np.testing.assert_allclose(xo, np.clip(scale[:, None, None, None] * x, 0, 63), rtol=1e-5, atol=1e-4)
    s = scale[changed]
    assert s.min() >= 0.65 - 1e-6 and s.max() <= 1.5 + 1e-6 and s.min() < 0.75 and s.max() > 1.4
    assert (xo[changed & (scale > 1)].max(axis=(1, 2, 3)) == 63).all()  # clamped at the pre-step max


# ------------------------------------------------------------------------------ foreground-biased crop


@pytest.fixture(scope="module")
def sparse_volumes(tmp_path_factory):
    """48³ volumes, patch 16³: class 1 a 4³ blob in a corner, class 2 a 2³ blob in the opposite corner."""
    d = tmp_path_factory.mktemp("sparse")
    files = []
    for i in range(2):
        lab = np.zeros((1, 48, 48, 48), np.uint8)
        lab[0, 1:5, 1:5, 1:5] = 1
        lab[0, 44:46, 44:46, 44:46] = 2
        img = np.stack([lab[0], np.full(lab.shape[1:], i)]).astype(np.float32)
        np.save(d / f"c{i}_x.npy", img)
        np.save(d / f"c{i}_y.npy", lab)
        files.append((str(d / f"c{i}_x.npy"), str(d / f"c{i}_y.npy")))
    empty = np.zeros((1, 48, 48, 48), np.uint8)
    np.save(d / "e_x.npy", np.zeros((2, 48, 48, 48), np.float32))
    np.save(d / "e_y.npy", empty)
    return files, (str(d / "e_x.npy"), str(d / "e_y.npy"))


@pytest.mark.parametrize("oversampling", [0.33, 1.0, 0.0])
def test_foreground_fraction(sparse_volumes, oversampling):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig, train_pipeline

    files, _ = sparse_volumes
    pipe = train_pipeline(
        [f[0] for f in files],
        [f[1] for f in files],
        (16, 16, 16),
        batch_size=50,
        seed=5,
        aug=AugmentConfig.none(oversampling=oversampling),
    )
    img, lab = run_batches(pipe, 8)
    has1 = (lab == 1).any(axis=(1, 2, 3, 4))
    has2 = (lab == 2).any(axis=(1, 2, 3, 4))
    np.testing.assert_array_equal(img[..., 0], lab[..., 0])  # image and label cropped at the same place
    # a uniform 16³ window (33 positions per axis) touches the 4³ / 2³ corner blobs w.p. (5/33)³ / (3/33)³
    p_uniform = (5 / 33) ** 3 + (3 / 33) ** 3
    expect = oversampling + (1 - oversampling) * p_uniform
    assert within_binomial(int((has1 | has2).sum()), len(lab), expect), (has1 | has2).mean()
    if oversampling == 1.0:  # the class is drawn uniformly, not by voxel count (class 2 has 1/9 of them)
        assert within_binomial(int(has2.sum()), len(lab), 0.5)


def test_crop_without_foreground_or_smaller_volume(sparse_volumes, tmp_path):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig, train_pipeline

    _, empty = sparse_volumes
    pipe = train_pipeline(
        [empty[0]], [empty[1]], (16, 16, 16), batch_size=8, seed=0, aug=AugmentConfig.none(oversampling=1.0)
    )
    _, lab = run_batches(pipe, 1)
    assert lab.shape == (8, 16, 16, 16, 1) and not lab.any()
    small = np.ones((1, 6, 20, 20), np.float32)  # Z smaller than the patch: zero-padded
    np.save(tmp_path / "s_x.npy", small)
    np.save(tmp_path / "s_y.npy", small.astype(np.uint8))
    pipe = train_pipeline(
        [tmp_path / "s_x.npy"],
        [tmp_path / "s_y.npy"],
        (16, 16, 16),
        batch_size=4,
        seed=0,
        aug=AugmentConfig.none(oversampling=0.5),
    )
    img, lab = run_batches(pipe, 1)
    assert (img.sum(axis=(1, 2, 3, 4)) == 6 * 16 * 16).all()  # all 6 slices kept, the rest zeros
    np.testing.assert_array_equal(img[..., 0], lab[..., 0])


# -------------------------------------------------------------------------------- determinism, 2D, eval


def test_seeded_determinism(sparse_volumes):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig, train_pipeline

    files, _ = sparse_volumes
    aug = AugmentConfig(zoom_prob=0.5, noise_prob=0.5, blur_prob=0.5, brightness_prob=0.5, contrast_prob=0.5)

    def batches(seed):
        pipe = train_pipeline(
            [f[0] for f in files], [f[1] for f in files], (16, 16, 16), batch_size=4, seed=seed, aug=aug
        )
        return run_batches(pipe, 3)

    a, b, c = batches(7), batches(7), batches(8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def _write_2d(tmp_path, n_cases=3, depth=10):
    imgs, labs = {}, {}
    for i in range(n_cases):
        z = np.broadcast_to(np.arange(depth)[:, None, None], (depth, 8, 8))
        imgs[f"c{i}"] = np.stack([z, np.full_like(z, i)]).astype(np.float32)  # (z index, case id)
        lab = np.zeros((1, depth, 8, 8), np.uint8)
        lab[0, :, 2:4, 5:7] = 1
        labs[f"c{i}"] = lab
    return PreprocessedDataset.open(write_dataset(tmp_path / "ds2d", imgs, labs, dim=2, patch=(8, 8)))


def test_2d_block_sampling(tmp_path):
    _dali()
    from nnunet_jax.data.pipelines import AugmentConfig, train_pipeline

    ds = _write_2d(tmp_path)
    files = [ds.image_path(c) for c in ds.training], [ds.label_path(c) for c in ds.training]
    pipe = train_pipeline(
        *files,
        ds.patch_size,
        batch_size=2,
        seed=1,
        block=4,
        aug=AugmentConfig().only("flip_prob", "zoom_prob"),
    )
    img, lab = run_batches(pipe, 30)
    assert img.shape == (60, 4, 8, 8, 2) and lab.shape == (60, 4, 8, 8, 1)
    zs = img[:, :, 0, 0, 0]
    np.testing.assert_array_equal(np.diff(zs, axis=1), 1)  # contiguous slices, in order (no depth flip)
    assert (img[..., 1] == img[:, :1, :1, :1, 1]).all()  # one volume per block
    assert set(zs[:, 0].astype(int)) == set(range(7))  # every block start 0..depth-block occurs


# ------------------------------------------------------------------------------------- sharded loader


@pytest.fixture(scope="module")
def ds3d(tmp_path_factory):
    rng = np.random.default_rng(1)
    imgs, labs = {}, {}
    for i in range(11):
        lab = np.zeros((1, 12, 12, 12), np.uint8)
        lab[0, 3:6, 4:8, 2:5] = 1
        imgs[f"case{i:02d}"] = np.concatenate([rng.random((1, 12, 12, 12)), np.full((1, 12, 12, 12), i)])
        labs[f"case{i:02d}"] = lab
    return PreprocessedDataset.open(
        write_dataset(tmp_path_factory.mktemp("ds3d"), imgs, labs, patch=(8, 8, 8))
    )


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
    return Mesh(np.array(jax.devices()), ("data",))


def test_epoch_order_and_process_slices():
    from nnunet_jax.data.loader import epoch_order, process_slice, steps_per_epoch

    order = epoch_order(11, 4, seed=1, epoch=3)
    assert order.shape == (3, 4) == (steps_per_epoch(11, 3, 4), 4)
    assert set(order.ravel()) == set(range(11))
    np.testing.assert_array_equal(order, epoch_order(11, 4, seed=1, epoch=3))
    assert not np.array_equal(order, epoch_order(11, 4, seed=1, epoch=4))
    parts = [process_slice(order, p, 2).reshape(3, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), order)  # processes split each step
    assert steps_per_epoch(11, 2, batch_size=32, nvol=2) == 6
    with pytest.raises(ValueError):
        process_slice(order, 0, 3)


def test_train_iterator_sharding_and_epoch(ds3d, mesh):
    _dali()
    from nnunet_jax.data.loader import make_train_iterator
    from nnunet_jax.data.pipelines import AugmentConfig

    it = make_train_iterator(
        ds3d, ds3d.training, mesh, batch_size=8, seed=0, epoch=0, aug=AugmentConfig.none()
    )
    assert len(it) == 2
    batches = list(it)
    assert len(batches) == 2
    for b in batches:
        assert isinstance(b["image"], jax.Array)
        assert b["image"].shape == (8, 8, 8, 8, 2) and b["label"].shape == (8, 8, 8, 8, 1)
        assert b["image"].dtype == jnp.float32 and b["label"].dtype == jnp.uint8
        assert b["image"].sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("data")), 5)
        assert [s.data.shape[0] for s in b["image"].addressable_shards] == [1] * 8
    ids = np.concatenate([np.asarray(b["image"][:, 0, 0, 0, 1]) for b in batches]).astype(int)
    assert set(ids) == set(range(11))  # one epoch sees every case; the last batch filled up by wrapping


def test_resume_equals_uninterrupted(ds3d, mesh):
    _dali()
    from nnunet_jax.data.loader import make_train_iterator

    kw = dict(batch_size=8, seed=4, epoch=1)  # default augmentation: every random op in play
    # 11 cases / 8 per step -> 2 steps per epoch; a run resumed at step 1 continues like the full one
    full = [
        {k: np.asarray(v) for k, v in b.items()} for b in make_train_iterator(ds3d, ds3d.training, mesh, **kw)
    ]
    resumed = make_train_iterator(ds3d, ds3d.training, mesh, start_step=1, **kw)
    assert len(resumed) == 1
    rest = [{k: np.asarray(v) for k, v in b.items()} for b in resumed]
    for a, b in zip(full[1:], rest, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = next(make_train_iterator(ds3d, ds3d.training, mesh, batch_size=8, seed=4, epoch=2))
    assert not np.array_equal(np.asarray(other["image"]), full[0]["image"])


def test_2d_iterator_yields_slices(tmp_path, mesh):
    _dali()
    from nnunet_jax.data.loader import make_train_iterator

    ds = _write_2d(tmp_path, n_cases=4)
    it = make_train_iterator(ds, ds.training, mesh, batch_size=16, nvol=2, seed=0, epoch=0)
    assert len(it) == 2
    b = next(it)
    assert b["image"].shape == (16, 8, 8, 2) and b["label"].shape == (16, 8, 8, 1)
    case = np.asarray(b["image"][:, 0, 0, 1])
    assert (case[:8] == case[0]).all() and (case[8:] == case[8]).all()  # two blocks of 8 slices
    with pytest.raises(ValueError, match="multiple"):
        make_train_iterator(ds, ds.training, mesh, batch_size=12, nvol=2, seed=0, epoch=0)

"""Regions for any plan and the ignore label, below the training loop.

BraTS through the general region path gives what the seed's BraTS code gave (targets, loss, validation Dice,
label maps, evaluate scores); a v2 region plan gets one sigmoid per region; voxels of the ignore label count
for nothing (loss value and gradients, validation Dice, evaluate); crops always hold annotated voxels; and
:func:`nnunet_jax.datasets.sparse.sparsify` makes the sparse-annotation experiment's labels.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nnunet_jax import parallel, scoring
from nnunet_jax.datasets.sparse import sparsify
from nnunet_jax.labels import LabelSpec, brats_regions, regions_to_labels
from nnunet_jax.losses import dice_ce_loss, ignore_dice_ce_loss, make_loss
from nnunet_jax.metrics import dice_from_logits, label_dice
from nnunet_jax.plan import Plan
from nnunet_jax.training import loop, validation
from tests.test_pipelines import run_batches
from tests.test_training_brats import _region_logits_from_label, tumour

TOPOLOGY = {"kernels": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "filters": [4, 8, 16]}
BRATS_AS_V2 = {"regions": {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}, "regions_class_order": [2, 1, 3]}


def _plan(n_class: int, **extra) -> Plan:
    return Plan.from_dict({"dim": 3, "patch_size": [16, 16, 16], "n_class": n_class, "in_channels": 1,
                           "labels": {str(c): f"c{c}" for c in range(n_class)}, "topology": TOPOLOGY,
                           **extra})


def _seed_brats_loss(logits, labels, focal=False):
    """The seed's BraTS region loss as it was written before regions were generalised."""
    logits = logits.astype(jnp.float32)
    target = brats_regions(labels.astype(jnp.int32))
    axes = tuple(range(logits.ndim - 1))
    probs = jax.nn.sigmoid(logits)
    intersection = jnp.sum(probs * target, axis=axes)
    dice = 1.0 - (2.0 * intersection + 1e-5) / (jnp.sum(target, axis=axes) + jnp.sum(probs, axis=axes) + 1e-5)
    if focal:
        second = optax.sigmoid_focal_loss(logits, target, gamma=2.0)
    else:
        second = optax.sigmoid_binary_cross_entropy(logits, target)
    return jnp.sum(dice + jnp.mean(second, axis=axes))


def _seed_region_dice(logits, labels):
    """The seed's BraTS validation Dice (WT, TC, ET of the sigmoids > 0.5; both empty = 1)."""
    pred, target = logits > 0, np.asarray(brats_regions(labels)) > 0.5
    axes = tuple(range(pred.ndim - 1))
    tp, n_pred, n_true = ((pred & target).sum(axes), pred.sum(axes), target.sum(axes))
    return np.where(n_true == 0, (n_pred == 0) * 1.0, 2 * tp / np.maximum(n_true + n_pred, 1))


# ------------------------------------------------------------------------------ BraTS = general regions


@pytest.mark.parametrize("focal", [False, True])
def test_brats_through_the_general_regions_equals_the_seed(focal):
    general = LabelSpec.of(_plan(4, **BRATS_AS_V2))
    brats = LabelSpec.of(_plan(4), brats=True)
    assert general.uses_regions and brats.uses_regions and not general.brats
    assert (general.n_outputs, general.score_names) == (3, ["WT", "TC", "ET"]) == (brats.n_outputs,
                                                                                   brats.score_names)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(2, 6, 6, 4))
    logits = (2 * rng.normal(size=(*labels.shape, 3))).astype(np.float32)
    np.testing.assert_array_equal(general.targets(labels), brats_regions(labels))
    np.testing.assert_array_equal(brats.targets(np.arange(5)), brats_regions(np.arange(5)))  # 4 counts as 3
    seed = float(_seed_brats_loss(jnp.asarray(logits), jnp.asarray(labels), focal))
    for spec in (general, brats):
        assert float(make_loss(focal=focal, labels=spec)(logits, labels)) == pytest.approx(seed, rel=1e-6)
    assert float(make_loss(focal=focal, brats=True)(logits, labels)) == pytest.approx(seed, rel=1e-6)
    np.testing.assert_allclose(label_dice(logits[0], labels[0], general), _seed_region_dice(logits[0],
                                                                                            labels[0]))
    probs = jax.nn.sigmoid(jnp.moveaxis(jnp.asarray(logits[0]), -1, 0))
    np.testing.assert_array_equal(general.to_labels(probs), regions_to_labels(probs))
    raw = LabelSpec.of(_plan(5, labels={"0": "bg", "1": "ncr", "2": "ed", "4": "et"}), brats=True)
    np.testing.assert_array_equal(raw.to_labels(probs), regions_to_labels(probs, et_label=4))


def test_validation_of_brats_through_the_general_regions():
    rng = np.random.default_rng(3)
    cases = {"a": tumour(rng)[1], "b": tumour(rng, with_et=False)[1]}
    load = lambda name: (cases[name][..., None].astype(np.float32), cases[name].astype(np.int32))  # noqa: E731
    mesh = parallel.local_mesh(1)
    results = []
    general = LabelSpec.of(_plan(4, **BRATS_AS_V2))
    runs = ((LabelSpec(4, brats=True), make_loss(brats=True)), (general, make_loss(labels=general)))
    for spec, loss in runs:
        v = validation.Validator(_region_logits_from_label, spec, (16, 16, 16), loss, mesh)
        results.append(v({"et": np.float32(1.0)}, ["a", "b"], load))
    assert results[0] == results[1] and results[0]["dice_ET"] < 50.0  # ET painted everywhere


def test_evaluate_brats_through_the_general_regions(tmp_path):
    preds, lbls = tmp_path / "p", tmp_path / "l"
    preds.mkdir()
    lbls.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        label = tumour(rng)[1]
        pred = np.where(rng.random(label.shape) < 0.1, rng.integers(0, 4, label.shape), label)
        np.save(lbls / f"{name}.npy", label)
        np.save(preds / f"{name}.npy", pred.astype(np.uint8))
    brats = scoring.evaluate_folders(preds, lbls, brats=True, hd95=True)
    general = scoring.evaluate_folders(preds, lbls, regions=BRATS_AS_V2["regions"], hd95=True)
    assert general.columns == ["WT", "TC", "ET"] and general.cases == brats.cases
    assert 50.0 < general.summary()["dice"] < 100.0


# ------------------------------------------------------------------------------------ v2 region plans


def test_v2_region_plan():
    plan = _plan(3, regions={"whole": [1, 2], "core": [2]}, regions_class_order=[1, 2], ignore_label=3)
    spec = LabelSpec.of(plan)
    assert (spec.n_outputs, spec.n_scores, spec.score_names) == (2, 2, ["whole", "core"])
    assert spec.ignore_label == 3 and spec.region_values == ((1, 2), (2,))
    np.testing.assert_array_equal(spec.targets(np.array([0, 1, 2, 3])), [[0, 0], [1, 0], [1, 1], [0, 0]])
    probs = np.array([[0.9, 0.9, 0.1], [0.2, 0.7, 0.8]])  # core without whole still paints core (2)
    np.testing.assert_array_equal(spec.to_labels(probs), [1, 2, 2])
    with pytest.raises(ValueError, match="regions_class_order"):
        LabelSpec(3, regions=(("whole", (1, 2)),))
    unordered = Plan.from_dict({**plan.to_dict(), "regions_class_order": None})
    with pytest.raises(loop.TrainingError, match="no regions_class_order"):
        loop.check_plan(_config(), unordered, "here")


def _config():
    from nnunet_jax.configs.default import get_config

    c = get_config()
    c.task, c.dim = "", 3
    return c


# -------------------------------------------------------------------------------------- ignore label


def sparse_data(shape, n_class, fraction, seed=0):
    """Logits (N, *spatial, K) and labels with a random ``fraction`` of voxels set to the ignore value K."""
    rng = np.random.default_rng(seed)
    logits = (2 * rng.normal(size=(*shape, n_class))).astype(np.float32)
    labels = rng.integers(0, n_class, size=shape)
    labels[rng.random(shape) < fraction] = n_class
    return logits, labels


@pytest.mark.parametrize("regions", [False, True])
def test_ignored_voxels_count_for_nothing_in_the_loss(regions):
    k = 3
    logits, labels = sparse_data((2, 6, 5, 4), k, 0.6)
    extra = {"regions": {"whole": [1, 2], "core": [2]}, "regions_class_order": [1, 2]} if regions else {}
    spec = LabelSpec.of(_plan(k, ignore_label=k, **extra))
    logits = logits[..., : spec.n_outputs]
    loss = make_loss(labels=spec, deep_supervision=True)
    value, grad = jax.value_and_grad(loss)(logits, labels)
    ignored = labels == k
    assert np.abs(np.asarray(grad)[ignored]).max() == 0.0 and np.abs(np.asarray(grad)[~ignored]).max() > 0
    scrambled = np.where(ignored[..., None], 50.0, logits)  # anything at ignored voxels
    assert float(loss(scrambled, labels)) == pytest.approx(float(value), rel=1e-6)


def test_ignore_loss_without_ignored_voxels_is_the_seed_loss_minus_one():
    """v2's Dice term is -Dice where the seed's is 1 - Dice; everything else is the same."""
    logits, labels = sparse_data((2, 7, 6, 5), 4, 0.0, seed=2)
    assert float(ignore_dice_ce_loss(logits, labels, 4)) == pytest.approx(
        float(dice_ce_loss(logits, labels)) - 1.0, abs=1e-5)


def test_validation_dice_leaves_ignored_voxels_out():
    label = np.array([[0, 1, 1], [2, 2, 0]])
    logits = 10.0 * np.eye(3)[label]
    assert np.asarray(dice_from_logits(logits, label)).tolist() == [1.0, 1.0]
    sparse = label.copy()
    sparse[0, 1] = sparse[1, 0] = 3
    wrong = logits.copy()
    wrong[0, 1], wrong[1, 0] = 10.0 * np.eye(3)[2], 10.0 * np.eye(3)[0]  # errors only where ignored
    assert np.asarray(dice_from_logits(wrong, sparse, 3)).tolist() == [1.0, 1.0]
    assert np.asarray(dice_from_logits(wrong, label)).tolist() != [1.0, 1.0]
    spec = LabelSpec.of(_plan(3, regions={"whole": [1, 2], "core": [2]}, regions_class_order=[1, 2],
                              ignore_label=3))
    predicted = wrong.argmax(-1)
    region_logits = np.stack([np.where(predicted > 0, 9.0, -9.0), np.where(predicted == 2, 9.0, -9.0)], -1)
    assert np.asarray(label_dice(region_logits, sparse, spec)).tolist() == [1.0, 1.0]


def test_evaluate_leaves_ignored_voxels_out(tmp_path):
    preds, lbls = tmp_path / "p", tmp_path / "l"
    preds.mkdir()
    lbls.mkdir()
    label = np.zeros((6, 6, 6), np.uint8)
    label[1:4, 1:4, 1:4] = 1
    label[2, 2, 2] = 2
    pred = label.copy()
    pred[4:, 4:, 4:] = 2  # wrong, but only where the label is ignored
    sparse = label.copy()
    sparse[4:, 4:, 4:] = 3
    np.save(preds / "a.npy", pred)
    np.save(lbls / "a.npy", sparse)
    report = scoring.evaluate_folders(preds, lbls, ignore_label=3)
    assert report.columns == ["1", "2"] and report.cases["a"]["dice"] == [100.0, 100.0]
    assert scoring.evaluate_folders(preds, lbls, n_class=4).cases["a"]["dice"][1] < 100.0


def test_sparsify(tmp_path):
    folder = tmp_path / "00_3d"
    folder.mkdir()
    _plan(3).save(folder)
    label = np.random.default_rng(0).integers(0, 3, size=(1, 20, 20, 20)).astype(np.uint8)
    for case in ("a", "b", "c"):
        np.save(folder / f"{case}_y.npy", label)
    plan = sparsify(folder, ["a", "b"], 0.9)
    assert plan.ignore_label == 3 and Plan.load(folder).ignore_label == 3
    a, b, c = (np.load(folder / f"{case}_y.npy") for case in "abc")
    assert 0.88 < (a == 3).mean() < 0.92 and np.array_equal(a[a != 3], label[a != 3])
    assert not np.array_equal(a == 3, b == 3) and np.array_equal(c, label)  # c: fully labelled
    with pytest.raises(ValueError, match="already has the ignore label"):
        sparsify(folder, ["c"], 0.5)
    assert json.loads((folder / "plan.json").read_text())["ignore_label"] == 3


# --------------------------------------------------------------------------------------- patch sampling


@pytest.fixture(scope="module")
def mostly_ignored(tmp_path_factory):
    """A 48³ volume all ignore (2) but for an annotated 4³ corner: background with one class-1 voxel."""
    pytest.importorskip("nvidia.dali")
    d = tmp_path_factory.mktemp("ignored")
    lab = np.full((1, 48, 48, 48), 2, np.uint8)
    lab[0, 1:5, 1:5, 1:5] = 0
    lab[0, 2, 2, 2] = 1
    np.save(d / "a_x.npy", lab.astype(np.float32))
    np.save(d / "a_y.npy", lab)
    return str(d / "a_x.npy"), str(d / "a_y.npy")


@pytest.mark.parametrize("oversampling", [0.0, 1.0])
def test_crops_hold_annotated_voxels(mostly_ignored, oversampling):
    from nnunet_jax.data.pipelines import AugmentConfig, train_pipeline

    def crops(ignore_label):
        pipe = train_pipeline([mostly_ignored[0]], [mostly_ignored[1]], (16, 16, 16), batch_size=40, seed=1,
                              aug=AugmentConfig.none(oversampling=oversampling), ignore_label=ignore_label)
        return run_batches(pipe, 2)[1]

    lab = crops(2)
    assert (lab != 2).any(axis=(1, 2, 3, 4)).all()  # every crop holds annotated voxels
    if oversampling == 1.0:  # the ignore value is no class to draw: every crop holds class 1
        assert (lab == 1).any(axis=(1, 2, 3, 4)).all()
    seed_lab = crops(None)  # the seed's sampling: uniform crops, or around a drawn "class" 2 voxel
    assert (seed_lab != 2).any(axis=(1, 2, 3, 4)).mean() < 0.9

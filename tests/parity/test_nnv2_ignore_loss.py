"""The ignore-label and region losses vs nnU-Net v2's on the same logits.

- Classes with an ignore label: our ``make_loss(labels=LabelSpec(..., ignore_label=K))`` equals v2's
  ``DC_and_CE_loss({'batch_dice': b, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {}, weight_ce=1,
  weight_dice=1, ignore_label=K, dice_class=MemoryEfficientSoftDiceLoss)`` (what ``nnUNetTrainer._build_loss``
  builds) within 1e-5, gradients too; batches with one fully ignored sample and with no annotated voxel at all
  (v2 then drops its CE term) included.
- Regions (v2's ``DC_and_BCE_loss``, ``do_bg=True``): the same Dice and BCE terms, but ours sums over the R
  regions and writes Dice as 1 - Dice (the seed's BraTS loss) where v2 averages and writes -Dice; so
  ``ours = R * (1 + v2_dice) + s * v2_bce`` with s = R without ignore label (v2's BCE is a mean over regions
  too) and s = 1 with one (v2 divides its masked BCE sum by the annotated voxels only).
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
compound = pytest.importorskip("nnunetv2.training.loss.compound_losses")
v2_dice = pytest.importorskip("nnunetv2.training.loss.dice")

from nnunet_jax.labels import LabelSpec, region_targets  # noqa: E402
from nnunet_jax.losses import ignore_dice_ce_loss, make_loss  # noqa: E402
from tests.test_regions_ignore import sparse_data  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-5
SHAPES = [(2, 12, 10), (2, 6, 8, 7)]


def _torch(logits, labels):
    x = torch.from_numpy(np.moveaxis(logits, -1, 1).copy()).requires_grad_(True)
    return x, torch.from_numpy(labels[:, None].astype(np.int64))


def _v2_ce_loss(batch_dice, ignore):
    soft = {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}
    return compound.DC_and_CE_loss(soft, {}, weight_ce=1, weight_dice=1, ignore_label=ignore,
                                   dice_class=v2_dice.MemoryEfficientSoftDiceLoss)


def _ours(ignore, batch_dice):
    """The training loss of a plan with this ignore label; per-sample Dice through the function itself."""
    if batch_dice:
        return make_loss(labels=LabelSpec(ignore, ignore_label=ignore))
    return lambda logits, labels: ignore_dice_ce_loss(logits, labels, ignore, batch_dice=False)


def _check(ours_fn, logits, labels, ref_fn):
    x, y = _torch(logits, labels)
    ref = ref_fn(x, y)
    ref.backward()
    ours, grad = jax.value_and_grad(ours_fn)(logits, labels)
    np.testing.assert_allclose(float(ours), ref.item(), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(grad), np.moveaxis(x.grad.numpy(), 1, -1), rtol=1e-4, atol=1e-7)
    return float(ours)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("ignored", [0.0, 0.5, 0.9])
def test_ignore_label_loss_equals_v2(shape, batch_dice, ignored):
    k = 3
    logits, labels = sparse_data(shape, k, ignored)
    _check(_ours(k, batch_dice), logits, labels, _v2_ce_loss(batch_dice, k))


@pytest.mark.parametrize("batch_dice", [True, False])
def test_ignored_samples_and_batches(batch_dice):
    k = 4
    logits, labels = sparse_data((2, 6, 7, 5), k, 0.3, seed=4)
    labels[1] = k  # the second sample has no annotated voxel
    loss = _ours(k, batch_dice)
    _check(loss, logits, labels, _v2_ce_loss(batch_dice, k))
    labels[:] = k  # nothing annotated: v2 leaves out the CE term, the Dice term is -smooth/smooth
    value = _check(loss, logits, labels, _v2_ce_loss(batch_dice, k))
    assert value == pytest.approx(-1.0)


def _v2_region_terms(logits, labels, regions, ignore):
    """v2's DC_and_BCE_loss total and its Dice term, on v2's one-hot region target (+ ignore channel)."""
    target = region_targets(labels, regions, np, 1).astype(np.float32)
    if ignore is not None:
        target = np.concatenate([target, (labels == ignore)[:, None].astype(np.float32)], axis=1)
    x = torch.from_numpy(np.moveaxis(logits, -1, 1).copy())
    t = torch.from_numpy(target)
    soft = {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False}
    loss = compound.DC_and_BCE_loss({}, soft, use_ignore_label=ignore is not None,
                                    dice_class=v2_dice.MemoryEfficientSoftDiceLoss)
    total = loss(x, t).item()
    mask = None if ignore is None else torch.from_numpy((labels != ignore)[:, None])
    dice = loss.dc(x, t[:, : len(regions)], loss_mask=mask).item()
    return total, dice


@pytest.mark.parametrize("ignore", [None, 3])
def test_region_loss_is_v2s_terms_summed_over_regions(ignore):
    regions = (("whole", (1, 2)), ("core", (2,)))
    values = tuple(v for _, v in regions)
    logits, labels = sparse_data((2, 8, 6, 5), 2, 0.0, seed=2)
    labels = np.random.default_rng(5).integers(0, 3 if ignore is None else 4, size=labels.shape)
    spec = LabelSpec(3, regions=regions, regions_class_order=(1, 2), ignore_label=ignore)
    ours = float(make_loss(labels=spec)(logits, labels))
    total, dice = _v2_region_terms(logits, labels, values, ignore)
    r = len(regions)
    bce = total - dice
    assert ours == pytest.approx(r * (1.0 + dice) + (r if ignore is None else 1) * bce, rel=TOL, abs=TOL)

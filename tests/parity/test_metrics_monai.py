"""HD95 and NSD vs MONAI's compute_hausdorff_distance(percentile=95) and compute_surface_dice."""

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from nnunet_jax.metrics import surface_metrics

N_CLASS = 3


def _blobs(shape, seed):
    """Label maps with a few smooth blobs per class (and noise speckles), prediction = perturbed label."""
    rng = np.random.default_rng(seed)
    fields = ndimage.gaussian_filter(
        rng.normal(size=(N_CLASS - 1, *shape)), sigma=2.0, axes=range(1, len(shape) + 1)
    )
    label = np.zeros(shape, np.int64)
    for c in range(1, N_CLASS):
        label[fields[c - 1] > 0.08] = c
    noise = ndimage.gaussian_filter(
        rng.normal(size=(N_CLASS - 1, *shape)), sigma=1.5, axes=range(1, len(shape) + 1)
    )
    pred = np.zeros(shape, np.int64)
    for c in range(1, N_CLASS):
        pred[fields[c - 1] + 0.5 * noise[c - 1] > 0.08] = c
    return pred, label


def _monai(pred, label, spacing, tolerance):
    def onehot(x):
        return torch.from_numpy(np.stack([x == c for c in range(N_CLASS)])[None].astype(np.float32))

    p, y = onehot(pred), onehot(label)
    hd = compute_hausdorff_distance(p, y, percentile=95, spacing=list(spacing))[0].numpy()
    nsd = compute_surface_dice(p, y, [tolerance] * (N_CLASS - 1), spacing=list(spacing))[0].numpy()
    return hd, nsd


@pytest.mark.parametrize(
    "shape,spacing,tolerance",
    [((40, 36), (1.0, 1.0), 1.0), ((40, 36), (0.7, 1.3), 1.5), ((18, 20, 16), (2.5, 0.8, 0.8), 2.0)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_monai(shape, spacing, tolerance, seed):
    pred, label = _blobs(shape, seed)
    assert all((label == c).any() and (pred == c).any() for c in range(1, N_CLASS))
    ref_hd, ref_nsd = _monai(pred, label, spacing, tolerance)
    hd, nsd = surface_metrics(pred, label, N_CLASS, spacing=spacing, tolerance=tolerance)
    np.testing.assert_allclose(hd, ref_hd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nsd, ref_nsd, rtol=1e-6, atol=1e-6)
    assert np.all(hd > 0) and np.all(nsd < 1)  # non-trivial cases


@pytest.mark.filterwarnings("ignore:the (prediction|ground truth) of class")
def test_empty_cases():
    """One side empty: MONAI HD95 NaN, NSD 0, as ours. Both empty: MONAI NaN, ours 0 / 1 (documented)."""
    shape = (20, 20)
    label = np.zeros(shape, np.int64)
    label[4:10, 5:12] = 1
    pred = np.zeros(shape, np.int64)
    pred[4:10, 5:12] = 2  # class 1 missing from the prediction, class 2 missing from the label
    ref_hd, ref_nsd = _monai(pred, label, (1.0, 1.0), 1.0)
    hd, nsd = surface_metrics(pred, label, N_CLASS, spacing=(1.0, 1.0), tolerance=1.0)
    assert np.all(np.isnan(ref_hd)) and np.all(np.isnan(hd))
    np.testing.assert_array_equal(nsd, ref_nsd)
    np.testing.assert_array_equal(nsd, [0.0, 0.0])

    empty = np.zeros(shape, np.int64)
    ref_hd, ref_nsd = _monai(empty, empty, (1.0, 1.0), 1.0)
    assert np.all(np.isnan(ref_hd)) and np.all(np.isnan(ref_nsd))
    hd, nsd = surface_metrics(empty, empty, N_CLASS, spacing=(1.0, 1.0), tolerance=1.0)
    np.testing.assert_array_equal(hd, [0.0, 0.0])
    np.testing.assert_array_equal(nsd, [1.0, 1.0])

"""evaluate.py's HD95 / NSD against MONAI (compute_hausdorff_distance, compute_surface_dice) on NIfTI files.

MONAI gets the arrays in NIfTI order (X, Y, Z) with spacing = pixdim; we read the files as evaluate.py does
(transposed to (Z, Y, X), spacing reversed), so an axis-order slip in either the arrays or the spacing fails.
evaluate.py reports Dice and NSD in percent (training's scale), MONAI as fractions: MONAI's are scaled by 100.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")

from nnunet_jax import scoring  # noqa: E402

PIXDIM = (0.8, 1.3, 2.5)  # X, Y, Z in mm
K = 3


def _blobs(rng: np.random.Generator, shape) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    lab = np.zeros(shape, np.uint8)
    for c in (1, 2):
        for _ in range(2):
            centre = rng.uniform(0.25, 0.75, 3) * shape
            radii = rng.uniform(0.1, 0.25, 3) * shape
            lab[sum(((g - m) / r) ** 2 for g, m, r in zip(grid, centre, radii, strict=True)) <= 1] = c
    return lab


def _one_hot(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.eye(K, dtype=np.float32)[a].transpose(3, 0, 1, 2)[None])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_nsd_match_monai(tmp_path, seed):
    rng = np.random.default_rng(seed)
    shape = (24, 20, 12)
    lab, pred = _blobs(rng, shape), _blobs(rng, shape)
    assert all((lab == c).any() and (pred == c).any() for c in (1, 2))  # MONAI gives NaN/inf for empty masks
    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    affine = np.diag([*PIXDIM, 1.0])
    nib.save(nib.Nifti1Image(pred, affine), tmp_path / "p" / "c.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "l" / "c.nii.gz")
    tol = 2.0
    report = scoring.evaluate_folders(tmp_path / "p", tmp_path / "l", n_class=K, hd95=True, nsd=True,
                                         nsd_tolerance=tol)
    ours = report.cases["c"]

    hd = monai_metrics.compute_hausdorff_distance(_one_hot(pred), _one_hot(lab), include_background=False,
                                                  percentile=95, spacing=list(PIXDIM))
    nsd = monai_metrics.compute_surface_dice(_one_hot(pred), _one_hot(lab), class_thresholds=[tol] * (K - 1),
                                             include_background=False, spacing=list(PIXDIM))
    np.testing.assert_allclose(ours["hd95"], hd.numpy()[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours["nsd"], 100 * nsd.numpy()[0], rtol=1e-5, atol=1e-4)
    # and the Dice, from MONAI's DiceMetric
    dice = monai_metrics.DiceMetric(include_background=False)(_one_hot(pred), _one_hot(lab))
    np.testing.assert_allclose(ours["dice"], 100 * dice.numpy()[0], rtol=1e-5)

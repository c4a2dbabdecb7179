"""nnU-Net v2 raw datasets in SimpleITK formats (``.nrrd``) preprocess to the arrays of the same images as an
MSD task. Here because the oracle environment has SimpleITK (nnU-Net v2 depends on it); the main one does
not, and its tests check the error without it (tests/test_v2_raw_dataset.py)."""

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax.preprocessing.driver import preprocess_dataset
from tests.test_v2_raw_dataset import _edit, write_twin

pytestmark = pytest.mark.parity


def test_nrrd_through_simpleitk(tmp_path):
    import SimpleITK as sitk

    msd, v2 = write_twin(tmp_path / "raw")
    for p in sorted(v2.glob("*/*.nii.gz")):  # the same voxels and spacing as .nrrd
        nii = nib.load(str(p))
        im = sitk.GetImageFromArray(np.asarray(nii.dataobj).transpose(2, 1, 0))
        im.SetSpacing(tuple(float(z) for z in nii.header.get_zooms()[:3]))
        sitk.WriteImage(im, str(p).replace(".nii.gz", ".nrrd"))
        p.unlink()
    _edit(v2, file_ending=".nrrd")
    a = preprocess_dataset(msd.parent, str(msd), 3, tmp_path / "msd", progress=False)
    b = preprocess_dataset(v2.parent, str(v2), 3, tmp_path / "v2", progress=False)
    for case in ("twin_000", "twin_003"):
        for kind in ("x", "y"):
            assert np.load(a / f"{case}_{kind}.npy").tobytes() == np.load(b / f"{case}_{kind}.npy").tobytes()

"""NIfTI loading/saving in the (C, Z, Y, X) layout and one clear DatasetError per kind of bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax.io import DatasetError, case_name, load_case, save_label_nifti

AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.9, 0, 5.0], [0, 0, 2.5, 1.0], [0, 0, 0, 1]])


def _write(path, data, affine=AFFINE, dtype=None):
    img = nib.Nifti1Image(np.asarray(data), affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 5, 4, 2)).astype(np.float32)  # (X, Y, Z, C)
    label = rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8)
    return (_write(tmp_path / "case_1.nii.gz", image), _write(tmp_path / "case_1_seg.nii.gz", label),
            image, label)


def test_layout_spacing_and_types(pair):
    img_path, lbl_path, image, label = pair
    case = load_case(img_path, lbl_path, labels=[0, 1, 2])
    assert case.image.shape == (2, 4, 5, 6) and case.image.dtype == np.float32
    assert case.label.shape == (1, 4, 5, 6) and case.label.dtype == np.uint8
    # (C, Z, Y, X)[c, z, y, x] == NIfTI (X, Y, Z, C)[x, y, z, c]
    assert case.image[1, 3, 2, 5] == image[5, 2, 3, 1]
    assert case.label[0, 1, 4, 0] == label[0, 4, 1]
    assert case.spacing == pytest.approx((2.5, 0.9, 0.8))  # pixdim[1:4] reversed
    np.testing.assert_allclose(case.affine, AFFINE)


def test_3d_image_gets_channel_axis(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    case = load_case(_write(tmp_path / "a.nii", data))
    assert case.image.shape == (1, 4, 3, 2) and case.image.dtype == np.float32 and case.label is None
    np.testing.assert_array_equal(case.image[0], data.transpose(2, 1, 0))
    assert case_name(tmp_path / "x" / "BRATS_001.nii.gz") == "BRATS_001"


def _expect(match, *args, **kwargs):
    with pytest.raises(DatasetError, match=match) as info:
        load_case(*args, **kwargs)
    assert "case_1" in str(info.value)  # names the case
    return str(info.value)


def test_missing_and_not_nifti(pair, tmp_path):
    img_path, lbl_path, *_ = pair
    _expect("label file is missing", img_path, tmp_path / "case_1_nolabel.nii.gz", case="case_1")
    _expect("image file is missing", tmp_path / "case_1_none.nii.gz", lbl_path)
    txt = tmp_path / "case_1.txt"
    txt.write_text("hello")
    _expect("not NIfTI", txt, lbl_path)
    garbage = tmp_path / "case_1_bad.nii.gz"
    garbage.write_bytes(b"\x00" * 400)
    _expect("not a readable NIfTI|cannot read", garbage, lbl_path)


def test_shape_and_affine_mismatch(pair, tmp_path):
    img_path, _, image, label = pair
    bad = _write(tmp_path / "case_1_short.nii.gz", label[:, :, :3])
    msg = _expect("label shape", img_path, bad)
    assert "(6, 5, 3)" in msg and "(6, 5, 4)" in msg
    moved = AFFINE.copy()
    moved[0, 3] += 3.0
    _expect("affine differs", img_path, _write(tmp_path / "case_1_moved.nii.gz", label, moved))


def test_nan_inf_and_undeclared_labels(pair, tmp_path):
    img_path, lbl_path, image, label = pair
    for bad_value in (np.nan, np.inf):
        broken = image.copy()
        broken[1, 2, 3, 0] = bad_value
        _expect("NaN/inf", _write(tmp_path / "case_1_nan.nii.gz", broken), lbl_path)
    msg = _expect(r"label values \[2\] are not declared", img_path, lbl_path, labels=[0, 1])
    assert "dataset.json" in msg
    _expect("channel", img_path, lbl_path, n_channels=4)


def test_label_with_channel_axis(pair, tmp_path):
    img_path, _, _, label = pair
    _expect("channel axis", img_path, _write(tmp_path / "case_1_4d.nii.gz", label[..., None]))


def test_save_label_roundtrip_in_source_geometry(pair, tmp_path):
    img_path, lbl_path, _, label = pair
    case = load_case(img_path, lbl_path)
    out = tmp_path / "pred" / "case_1.nii.gz"
    save_label_nifti(case.label[0], case.affine, case.header, out)  # 4D image header → 3D label file
    saved = nib.load(str(out))
    assert saved.shape == label.shape and saved.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(saved.dataobj), label)
    np.testing.assert_allclose(saved.affine, AFFINE)
    np.testing.assert_allclose(saved.header.get_zooms(), (0.8, 0.9, 2.5))
    assert sorted(p.name for p in out.parent.iterdir()) == ["case_1.nii.gz"]  # no temp file left
    with pytest.raises(ValueError, match="Z, Y, X"):
        save_label_nifti(case.label, case.affine, case.header, out)

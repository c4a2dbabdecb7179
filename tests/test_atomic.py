"""Atomic writes leave either the old or the new content, never a partial file, and no temp files."""

import json
import stat

import numpy as np
import pytest

from nnunet_jax.atomic import atomic_path, make_temp_dir, replace_dir, save_npy, write_json


def test_error_keeps_old_file(tmp_path):
    target = tmp_path / "a.json"
    write_json({"v": 1}, target)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_npy_roundtrip_and_permissions(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    p = save_npy(arr, tmp_path / "sub" / "x.npy")
    np.testing.assert_array_equal(np.load(p), arr)
    assert p.stat().st_mode & stat.S_IRGRP  # not the 0600 of mkstemp


def test_suffix_kept_for_nifti(tmp_path):
    with atomic_path(tmp_path / "case.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "case.nii.gz").read_bytes() == b"x"


def test_replace_dir(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = make_temp_dir(final)
    (tmp / "new.txt").write_text("new")
    replace_dir(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

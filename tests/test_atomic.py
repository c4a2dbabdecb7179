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


def test_temp_names_are_recognisable_and_removed_as_stale(tmp_path):
    """A killed writer leaves names of one form (issue 10.3): is_temp knows them, remove_stale clears them."""
    import os

    from nnunet_jax.atomic import is_temp, remove_stale

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "case.nii.gz") as tmp:
        assert is_temp(tmp) and tmp.name.endswith(".nii.gz")
        os.link(tmp, tmp_path / tmp.name.replace(".nii.gz", ".x.nii.gz"))  # what a SIGKILL leaves behind
        raise RuntimeError("killed")
    folder = make_temp_dir(tmp_path / "00_3d", "training")
    assert is_temp(folder)
    (tmp_path / "00_3d").mkdir()
    (tmp_path / "keep.nii.gz").write_bytes(b"x")
    removed = remove_stale(tmp_path)
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_3d", "keep.nii.gz"]
    assert not is_temp(tmp_path / "keep.nii.gz") and not is_temp(tmp_path / ".hidden")

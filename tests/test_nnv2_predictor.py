"""The nnU-Net v2 predictor's input handling and command line, without torch (the end-to-end comparison
with nnU-Net v2 itself is tests/parity/test_nnv2_predict.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_jax.interop.nnunetv2.predictor import find_v2_cases
from nnunet_jax.io import DatasetError

ROOT = Path(__file__).resolve().parents[1]


def _touch(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in names]
    for p in paths:
        p.write_bytes(b"")
    return paths


def test_cases_grouped_by_channel(tmp_path):
    _touch(tmp_path / "ts", "a_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "notes.txt",
           "c_0000.png")
    cases = find_v2_cases([tmp_path / "ts"], ".nii.gz", 2)
    assert list(cases) == ["a", "b"]
    assert [p.name for p in cases["a"]] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    one = find_v2_cases([tmp_path / "ts" / "b_0001.nii.gz", tmp_path / "ts" / "b_0000.nii.gz"], ".nii.gz", 2)
    assert [p.name for p in one["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]


def test_case_errors_name_the_file(tmp_path):
    _touch(tmp_path / "ts", "a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz")
    with pytest.raises(DatasetError, match=r"case 'a': channel file\(s\) a_0001.nii.gz missing"):
        find_v2_cases([tmp_path / "ts"], ".nii.gz", 2)
    with pytest.raises(DatasetError, match=r"case 'b': channel\(s\) \[1\] beyond the model's 1"):
        find_v2_cases([tmp_path / "ts"], ".nii.gz", 1)
    _touch(tmp_path / "empty", "x.nii.gz")
    with pytest.raises(DatasetError, match=r"empty: no input files named <case>_<XXXX>.nii.gz"):
        find_v2_cases([tmp_path / "empty"], ".nii.gz", 1)
    with pytest.raises(DatasetError, match="x.nii.gz: an nnU-Net v2 input must be named"):
        find_v2_cases([tmp_path / "empty" / "x.nii.gz"], ".nii.gz", 1)
    with pytest.raises(DatasetError, match="nope: no such file or folder"):
        find_v2_cases([tmp_path / "nope"], ".nii.gz", 1)


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "predict.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_model_choice_and_errors(tmp_path):
    proc = _predict("--data", str(tmp_path), "--nnunetv2_model", str(tmp_path / "m"), "--ckpt_path", "x")
    assert proc.returncode == 1 and "give one of --ckpt_path" in proc.stderr
    proc = _predict("--data", str(tmp_path), "--nnunetv2_model", str(tmp_path / "m"), "--fold", "0")
    assert proc.returncode == 1 and "--fold selects validation cases" in proc.stderr
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    proc = _predict("--data", str(tmp_path), "--nnunetv2_model", str(model), "--results", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    assert "dataset.json" in proc.stderr and str(model) in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing left behind

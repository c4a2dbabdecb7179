"""``python -m preprocess`` end to end on a tiny synthetic task, and one clear error per kind of bad input
with nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax.datasets.synthetic import generate
from nnunet_jax.io import DatasetError
from nnunet_jax.preprocessing import driver as preprocess
from nnunet_jax.preprocessing.case import CaseMeta
from nnunet_jax.preprocessing.driver import preprocess_dataset
from tests.test_planning import ct_body_dataset

ROOT = Path(__file__).resolve().parents[1]
TASK = "Task00_Synthetic"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    generate(data, cases=4, test_cases=2, seed=3)
    return data


@pytest.fixture
def data(source, tmp_path):
    shutil.copytree(source, tmp_path / "data")
    return tmp_path / "data"


def _cli(*args, check=True):
    cmd = [sys.executable, "-m", "preprocess", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=check)


def _load(folder: Path, name: str):
    x = np.load(folder / f"{name}_x.npy")
    y_path = folder / f"{name}_y.npy"
    return x, (np.load(y_path) if y_path.exists() else None), CaseMeta.load(folder / f"{name}_meta.npy")


def test_cli_training_test_val_end_to_end(source, tmp_path):
    results = tmp_path / "results"
    common = ["--task", "00", "--dim", "3", "--data", str(source), "--results", str(results)]
    _cli(*common, "--exec_mode", "training", "--n_jobs", "2")
    _cli(*common, "--exec_mode", "test", "--n_jobs", "1")
    preprocess_dataset(source, "00", 3, results, "val", progress=False)  # in-process, reuses the plan
    out = results / "00_3d"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["task"] == "00" and plan["dim"] == 3 and plan["patch_size"] == [32, 32, 32]
    assert plan["n_class"] == 3 and plan["in_channels"] == 2 and plan["exec_mode"] == "training"
    assert plan["preprocessed"] == plan["cases"]["training"] == [f"synth_{i:03d}" for i in range(4)]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["plan.json", "test", "val"] + [f"synth_{i:03d}_{k}.npy" for i in range(4)
                                                           for k in ("x", "y", "meta")])
    for i in range(4):
        x, y, meta = _load(out, f"synth_{i:03d}")
        assert x.dtype == np.float32 and y.dtype == np.uint8 and x.shape[0] == 2 and y.shape[0] == 1
        assert x.shape[1:] == y.shape[1:] == meta.final_shape and min(x.shape[1:]) >= 32
        assert set(np.unique(y)) <= {0, 1, 2} and (y > 0).any()
        xv, yv, mv = _load(out / "val", f"synth_{i:03d}")  # val: same case, not padded
        assert xv.shape[1:] == mv.resampled_shape and yv.shape == (1, *mv.resampled_shape)
        pad = meta.padding
        inner = tuple(slice(int(b), int(b) + s) for (b, _), s in zip(pad, mv.resampled_shape, strict=True))
        np.testing.assert_array_equal(x[(slice(None), *inner)], xv)
        np.testing.assert_array_equal(y[(slice(None), *inner)], yv)
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(
        ["plan.json"] + [f"synth_{i:03d}_{k}.npy" for i in (4, 5) for k in ("x", "meta")])
    test_plan = json.loads((out / "test" / "plan.json").read_text())
    assert test_plan["exec_mode"] == "test" and test_plan["topology"] == plan["topology"]
    assert [p.name for p in results.iterdir()] == ["00_3d"]  # no temp folders left


def test_parallel_equals_serial_and_rerun_replaces(source, tmp_path):
    a = preprocess_dataset(source, "00", 3, tmp_path / "a", "training", n_jobs=2, progress=False)
    b = preprocess_dataset(source, "00", 3, tmp_path / "b", "training", n_jobs=1, progress=False)
    for i in range(4):
        for k in ("x", "y"):
            name = f"synth_{i:03d}_{k}.npy"
            np.testing.assert_array_equal(np.load(a / name), np.load(b / name))
    (b / "stale_x.npy").write_bytes(b"old")
    again = preprocess_dataset(source, "00", 3, tmp_path / "b", "training", n_jobs=1, progress=False)
    assert again == b and not (b / "stale_x.npy").exists()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["00_3d"]


def test_2d_and_custom_folder(source, tmp_path):
    out = preprocess_dataset(source, "00", 2, tmp_path / "r", "training", n_jobs=1, progress=False)
    assert out == tmp_path / "r" / "00_2d"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["dim"] == 2 and plan["patch_size"] == [32, 32] and len(plan["spacing"]) == 2
    x, y, meta = _load(out, "synth_000")
    assert x.shape[2:] == (32, 32) and x.shape[1] == meta.cropped_shape[0]  # no Z resampling or padding
    custom = preprocess_dataset(tmp_path, str(source / TASK), 3, tmp_path / "r", "training",
                                patch_size=[16, 16, 16], progress=False)
    assert custom == tmp_path / "r" / f"{TASK}_3d"
    assert json.loads((custom / "plan.json").read_text())["patch_size"] == [16, 16, 16]


# ------------------------------------------------------------------------------------------- bad inputs
def _rewrite(path: Path, fn, affine=None):
    img = nib.load(str(path))
    data = fn(np.asarray(img.dataobj).copy())
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), str(path))


def _edit_json(data: Path, fn):
    path = data / TASK / "dataset.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _nan(a):
    a = a.astype(np.float32)
    a[10, 10, 10, 0] = np.nan
    return a


def _undeclared(a):
    a[a == 2] = 7
    return a


IMG, LBL = Path(TASK) / "imagesTr", Path(TASK) / "labelsTr"
BAD = {
    "missing dataset.json": (lambda d: (d / TASK / "dataset.json").unlink(), "dataset.json is missing"),
    "malformed dataset.json": (lambda d: (d / TASK / "dataset.json").write_text('{"name": "x",'),
                               "not valid JSON"),
    "missing key": (lambda d: _edit_json(d, lambda m: m.pop("labels")), "'labels' is missing"),
    "listed file missing": (lambda d: (d / LBL / "synth_002.nii.gz").unlink(),
                            r"training\[2\].*synth_002.nii.gz is missing"),
    "not NIfTI": (lambda d: _edit_json(d, lambda m: m["training"][1].update(image="imagesTr/synth_001.mha")),
                  r"training\[1\].*synth_001.mha is not a NIfTI"),
    "shape mismatch": (lambda d: _rewrite(d / LBL / "synth_001.nii.gz", lambda a: a[:-1]),
                       "synth_001.*label shape"),
    "affine mismatch": (lambda d: _rewrite(d / LBL / "synth_003.nii.gz", lambda a: a,
                                           np.diag([1.0, 1.0, 2.0, 1.0])), "synth_003.*affine differs"),
    "nan voxels": (lambda d: _rewrite(d / IMG / "synth_002.nii.gz", _nan), "synth_002.*NaN/inf"),
    "undeclared label": (lambda d: _rewrite(d / LBL / "synth_000.nii.gz", _undeclared),
                         r"synth_000.*label values \[7\] are not declared in dataset.json"),
    "label channel axis": (lambda d: _rewrite(d / LBL / "synth_001.nii.gz", lambda a: a[..., None]),
                           "synth_001.*channel axis"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_one_clear_error_nothing_left(kind, data, tmp_path):
    corrupt, match = BAD[kind]
    corrupt(data)
    results = tmp_path / "results"
    n_jobs = 2 if kind == "nan voxels" else 1  # an error raised in a worker process reaches the caller
    with pytest.raises(DatasetError, match=match):
        preprocess_dataset(data, "00", 3, results, "training", n_jobs=n_jobs, progress=False)
    assert not results.exists() or list(results.iterdir()) == []


def _spy_cases(monkeypatch) -> list:
    """Record the cases preprocessing starts (serial runs only: the spy stays in this process)."""
    started: list = []
    real = preprocess.process_case

    def spy(job):
        started.append(job.case.name)
        return real(job)

    monkeypatch.setattr(preprocess, "process_case", spy)
    return started


def test_patch_larger_than_every_case(data, tmp_path, monkeypatch):
    started = _spy_cases(monkeypatch)
    with pytest.raises(DatasetError, match=r"patch size \[64, 32, 32\] is larger than every training case "
                                           r"along axis Z: the largest cropped and resampled shape"):
        preprocess_dataset(data, "00", 3, tmp_path / "r", "training", patch_size=[64, 32, 32], progress=False)
    assert started == []  # failed in planning, before any case was preprocessed
    assert not (tmp_path / "r").exists() or list((tmp_path / "r").iterdir()) == []


def test_ct_body_inside_field_of_view(tmp_path, monkeypatch):
    """CT in HU: the air (−1000) is cropped away, the patch is planned from what is left, and fits."""
    root = ct_body_dataset(tmp_path / "BodyCT")
    started = _spy_cases(monkeypatch)
    with pytest.raises(DatasetError, match=r"patch size \[16, 64, 40\] is larger than every training case "
                                           r"along axis Y: .* is \[20, 48, 46\]"):  # 64 = the header size
        preprocess_dataset(tmp_path, str(root), 3, tmp_path / "r", patch_size=[16, 64, 40], progress=False)
    assert started == [] and not (tmp_path / "r").exists()

    out = preprocess_dataset(tmp_path, str(root), 3, tmp_path / "r", progress=False)
    assert started == ["body_0", "body_1", "body_2"]
    text = (out / "plan.json").read_text()
    plan = json.loads(text)
    assert plan["patch_size"] == [16, 40, 40]  # hand-computed in tests/test_planning.py
    assert plan["spacing"] == [1.6, 0.8, 0.8] and "0.800000" not in text and "1.600000" not in text
    expected = {"body_0": ((16, 40, 40), (16, 40, 40)), "body_1": ((20, 44, 36), (20, 44, 36)),
                "body_2": ((8, 48, 46), (16, 48, 46))}  # (cropped, resampled): only body_2 (3.2 mm) resampled
    for name, (cropped, resampled) in expected.items():
        x, y, meta = _load(out, name)
        assert meta.cropped_shape == cropped and meta.resampled_shape == resampled
        assert all(s >= p for s, p in zip(x.shape[1:], plan["patch_size"], strict=True))
        assert (y > 0).any() and np.isfinite(x).all()


def test_unguarded_script_with_n_jobs_is_refused(source, tmp_path):
    """Spawned workers re-run an unguarded script (here: regenerating the data being read); refused."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from nnunet_jax.preprocessing.driver import preprocess_dataset\n"
        "print('started', flush=True)\n"
        f"preprocess_dataset({str(source)!r}, '00', 3, {str(tmp_path / 'r')!r}, n_jobs=2, progress=False)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stdout.count("started") == 1  # no worker re-ran the script
    assert "RuntimeError" in proc.stderr and 'if __name__ == "__main__":' in proc.stderr
    assert "BrokenProcessPool" not in proc.stderr and "unguarded.py" in proc.stderr
    assert not (tmp_path / "r").exists() or list((tmp_path / "r").iterdir()) == []


def test_failed_rerun_keeps_old_output_and_cli_reports(data, tmp_path):
    results = tmp_path / "results"
    out = preprocess_dataset(data, "00", 3, results, "training", progress=False)
    before = sorted(p.name for p in out.iterdir())
    _rewrite(data / TASK / "labelsTr" / "synth_000.nii.gz", _undeclared)
    proc = _cli("--task", "00", "--data", str(data), "--results", str(results), check=False)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "synth_000" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in results.iterdir()] == ["00_3d"]
    proc = _cli("--task", "00", "--data", str(data), "--results", str(results), "--exec_mode", "test",
                "--patch_size", "a,b", check=False)
    assert proc.returncode != 0 and "patch_size" in proc.stderr


def test_missing_task_folder_and_empty_test_list(data, tmp_path):
    with pytest.raises(DatasetError, match="Task04_Hippocampus does not exist"):
        preprocess_dataset(data, "04", 3, tmp_path / "r", progress=False)
    with pytest.raises(DatasetError, match="not an MSD task number"):
        preprocess_dataset(data, "NoSuchTask", 3, tmp_path / "r", progress=False)
    _edit_json(data, lambda m: m.update(test=[]))
    with pytest.raises(DatasetError, match="no 'test' cases"):
        preprocess_dataset(data, "00", 3, tmp_path / "r", "test", progress=False)
    assert not (tmp_path / "r").exists()

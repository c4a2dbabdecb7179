"""``python -m preprocess`` on nnU-Net v2 raw datasets (``DatasetXXX_Name``: one file per channel, labels by
name): the same arrays as the same images stored as an MSD task, 2D natural images, ``--task`` resolution,
one clear error per malformed input with nothing left behind, and a short train.py run on the result."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax.io import DatasetError
from nnunet_jax.plan import Plan
from nnunet_jax.planning.dataset_json import find_task_dir, load_dataset
from nnunet_jax.preprocessing.driver import preprocess_dataset

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"0": "background", "1": "edema", "2": "core"}
CHANNELS = {"0": "T1", "1": "T2"}
# (Z, Y, X) shape and spacing per case: different spacings, so planning picks a median and resamples.
CASES = [((14, 22, 20), (1.5, 0.8, 0.8)), ((12, 24, 22), (2.0, 0.8, 0.8)), ((16, 20, 24), (1.2, 0.9, 0.9)),
         ((14, 22, 22), (1.5, 0.8, 0.8))]
TEST_CASES = [((12, 20, 20), (1.5, 0.8, 0.8))]
V2_ONLY_PLAN_KEYS = {"regions", "regions_class_order", "ignore_label"}


def _volume(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    """(image (2, Z, Y, X) float32 zero outside a body box, label (Z, Y, X) uint8 with classes 1 and 2)."""
    image = np.zeros((2, *shape), np.float32)
    body = tuple(slice(1, s - 2) for s in shape)
    image[(slice(None), *body)] = rng.uniform(10, 100, (2, *(s - 3 for s in shape))).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    centre = tuple(slice(s // 2 - 3, s // 2 + 3) for s in shape)
    label[centre] = 1
    label[tuple(slice(s // 2 - 1, s // 2 + 1) for s in shape)] = 2
    image[(slice(None), *centre)] += 50
    return image, label


def _affine(spacing) -> np.ndarray:
    affine = np.diag([*spacing[::-1], 1.0])  # NIfTI axes are X, Y, Z
    affine[:3, 3] = [-10.0, 5.0, 2.5]
    return affine


def _v2_json(ending: str) -> dict:
    """The v2 dataset.json of the MSD task's LABELS and CHANNELS."""
    return {"name": "Twin", "channel_names": CHANNELS, "labels": {name: int(v) for v, name in LABELS.items()},
            "numTraining": len(CASES), "file_ending": ending}


def write_twin(data: Path, msd: str = "Task42_Twin", v2: str = "Dataset042_Twin", ending: str = ".nii.gz",
               seed: int = 0) -> tuple[Path, Path]:
    """The same 2-channel 3D cases as an MSD task (4D NIfTI) and as an nnU-Net v2 dataset (3D per channel)."""
    rng = np.random.default_rng(seed)
    m, d = data / msd, data / v2
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (m / sub).mkdir(parents=True)
        (d / sub).mkdir(parents=True)
    training, test = [], []
    for kind, cases in (("Tr", CASES), ("Ts", TEST_CASES)):
        for i, (shape, spacing) in enumerate(cases):
            name = f"twin_{i:03d}" if kind == "Tr" else f"twin_{100 + i:03d}"
            image, label = _volume(rng, shape)
            affine = _affine(spacing)
            xyz = image.transpose(3, 2, 1, 0)  # (X, Y, Z, C)
            nib.save(nib.Nifti1Image(xyz, affine), str(m / f"images{kind}" / f"{name}.nii.gz"))
            for c in range(image.shape[0]):
                nib.save(nib.Nifti1Image(np.ascontiguousarray(xyz[..., c]), affine),
                         str(d / f"images{kind}" / f"{name}_{c:04d}{ending}"))
            if kind == "Tr":
                lab = nib.Nifti1Image(label.transpose(2, 1, 0), affine)
                nib.save(lab, str(m / "labelsTr" / f"{name}.nii.gz"))
                nib.save(lab, str(d / "labelsTr" / f"{name}{ending}"))
                training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
            else:
                test.append(f"./imagesTs/{name}.nii.gz")
    (m / "dataset.json").write_text(json.dumps({"name": "Twin", "modality": CHANNELS, "labels": LABELS,
                                                "training": training, "test": test}))
    (d / "dataset.json").write_text(json.dumps(_v2_json(ending)))
    return m, d


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> tuple[Path, Path]:
    return write_twin(tmp_path_factory.mktemp("raw"))


@pytest.fixture
def v2_copy(twin, tmp_path) -> Path:
    """A private copy of the v2 dataset, to break."""
    return Path(shutil.copytree(twin[1], tmp_path / "data" / twin[1].name))


def _same_folder(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".npy"):
            x, y = np.load(a / name), np.load(b / name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes(), f"{name} differs"  # bit for bit


def _plan_fields(folder: Path) -> dict:
    plan = json.loads((folder / "plan.json").read_text())
    return {k: v for k, v in plan.items() if k not in ("task", "task_name", "source")}


# ------------------------------------------------------------------------------------------------ 3D NIfTI


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_v2_nifti_gives_the_msd_arrays_bit_for_bit(tmp_path, ending):
    msd, v2 = write_twin(tmp_path / "raw", ending=ending)
    out_m, out_v = tmp_path / "msd", tmp_path / "v2"
    for mode in ("training", "val", "test"):
        a = preprocess_dataset(msd.parent, str(msd), 3, out_m, mode, progress=False)
        b = preprocess_dataset(v2.parent, str(v2), 3, out_v, mode, progress=False)
        assert (a.name, b.name) == (("Task42_Twin_3d", "Dataset042_Twin_3d") if mode == "training"
                                    else (mode, mode))
        _same_folder(a, b)
        assert _plan_fields(a) == _plan_fields(b)
    plan = _plan_fields(out_v / "Dataset042_Twin_3d")
    assert plan["labels"] == LABELS and plan["modalities"] == CHANNELS and plan["in_channels"] == 2
    assert plan["cases"] == {"training": [f"twin_{i:03d}" for i in range(4)], "test": ["twin_100"]}
    assert not V2_ONLY_PLAN_KEYS & set(_plan_fields(out_m / "Task42_Twin_3d"))  # MSD plans as before
    v2_plan = Plan.load(out_v / "Dataset042_Twin_3d")
    assert v2_plan.task == "Dataset042_Twin" and v2_plan.source["layout"] == "nnU-Net v2 raw"
    assert v2_plan.regions is None and v2_plan.ignore_label is None


def test_v2_plain_labels_train_with_train_py(twin, tmp_path):
    """A v2 dataset with integer labels trains exactly like an MSD one: train.py, tiny net, one epoch; --task
    042 with --data the preprocessing's results folder finds Dataset042_Twin_3d, as --task 01 finds 01_3d."""
    out = preprocess_dataset(twin[1].parent, "042", 3, tmp_path / "pre", progress=False)
    depth = len(Plan.load(out).topology.filters)
    filters = ",".join(str(4 * 2**i) for i in range(depth))
    cmd = [sys.executable, "train.py", "--task", "042", "--data", str(out.parent), "--results",
           str(tmp_path / "run"), "--dim", "3",
           "--fold", "0", "--nfolds", "2", "--filters", filters, "--max_epochs", "1", "--min_epochs", "1",
           "--train_batches", "1", "--val_cases", "1", "--batch_size", "1", "--noprogress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads((tmp_path / "run" / "logs.json").read_text().splitlines()[-1])
    assert last["epoch"] == 1 and np.isfinite([last["train_loss"], last["val_loss"]]).all()
    assert len(last["dice"]) == 2  # edema, core
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["plan"]["task"] == "Dataset042_Twin" and config["identity"]["n_class"] == 3
    assert config["identity"]["in_channels"] == 2 and (tmp_path / "run" / "checkpoints").is_dir()


# ---------------------------------------------------------------------------------------------------- 2D


def _write_2d(data: Path, mode: str, ending: str) -> tuple[Path, Path]:
    """The same 2D images as an nnU-Net v2 dataset of natural images and as an MSD task of one-slice NIfTI
    volumes with v2's spacing for them (999 across, 1 in-plane)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    channels = {"0": "R", "1": "G", "2": "B"} if mode == "RGB" else {"0": "microscopy"}
    d, m = data / "Dataset043_Cells", data / "Task43_Cells"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (d / sub).mkdir(parents=True)
        (m / sub).mkdir(parents=True)
    training, test = [], []
    for i, (h, w) in enumerate([(40, 36), (44, 40), (38, 42), (36, 36), (40, 40)]):
        name = f"cell_{i}"
        pixels = rng.integers(1, 255, (h, w, 3) if mode == "RGB" else (h, w)).astype(np.uint8)
        pixels[:2] = 0
        label = np.zeros((h, w), np.uint8)
        label[h // 3: h // 2, w // 3: w // 2] = 1
        kind = "Ts" if i == 4 else "Tr"
        Image.fromarray(pixels, mode).save(d / f"images{kind}" / f"{name}_0000{ending}")
        chw = pixels.transpose(2, 0, 1) if mode == "RGB" else pixels[None]  # (C, Y, X)
        xyzc = chw[:, None].transpose(3, 2, 1, 0)  # (C, Z=1, Y, X) → (X, Y, Z, C)
        affine = np.diag([1.0, 1.0, 999.0, 1.0])
        nib.save(nib.Nifti1Image(xyzc, affine), str(m / f"images{kind}" / f"{name}.nii.gz"))
        if kind == "Tr":
            Image.fromarray(label, "L").save(d / "labelsTr" / f"{name}{ending}")
            nib.save(nib.Nifti1Image(label[None].transpose(2, 1, 0), affine),
                     str(m / "labelsTr" / f"{name}.nii.gz"))
            training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        else:
            test.append(f"./imagesTs/{name}.nii.gz")
    v2_meta = {"channel_names": channels, "numTraining": 4, "file_ending": ending,
               "labels": {"background": 0, "cell": 1}}
    (d / "dataset.json").write_text(json.dumps(v2_meta))
    (m / "dataset.json").write_text(json.dumps({"modality": channels, "training": training, "test": test,
                                                "labels": {"0": "background", "1": "cell"}}))
    return d, m


@pytest.mark.parametrize(("mode", "ending"), [("L", ".png"), ("RGB", ".png"), ("L", ".tif")])
def test_2d_natural_images_preprocess_with_dim_2(tmp_path, mode, ending):
    v2, msd = _write_2d(tmp_path / "data", mode, ending)
    for exec_mode in ("training", "test"):
        a = preprocess_dataset(tmp_path / "data", "043", 2, tmp_path / "out", exec_mode, progress=False)
        b = preprocess_dataset(tmp_path / "data", str(msd), 2, tmp_path / "msd", exec_mode, progress=False)
        _same_folder(a, b)
        assert _plan_fields(a) == _plan_fields(b)
    out = tmp_path / "out" / "Dataset043_Cells_2d"
    plan = Plan.load(out)
    assert plan.dim == 2 and plan.spacing == (1.0, 1.0) and plan.in_channels == (3 if mode == "RGB" else 1)
    x, y = np.load(out / "cell_0_x.npy"), np.load(out / "cell_0_y.npy")
    assert x.shape == (plan.in_channels, 1, *plan.patch_size) and y.shape == (1, 1, *plan.patch_size)
    assert set(np.unique(y)) == {0, 1}


# ------------------------------------------------------------------------------------------ --task rules


def test_task_resolution(twin, tmp_path, capsys):
    data = tmp_path / "data"
    for name in ("Task04_Hippocampus", "Dataset004_Hippo", "Dataset007_Other", "Dataset009_A",
                 "Dataset009_B", "Dataset050_Fifty"):
        (data / name).mkdir(parents=True)
    shutil.copytree(twin[1], data / "Dataset001_Twin")

    assert find_task_dir(data, "04")[0] == data / "Task04_Hippocampus"  # two digits: MSD, as before
    assert find_task_dir(data, "04")[1].number == "04"
    assert find_task_dir(data, "004") == (data / "Dataset004_Hippo", None)
    assert find_task_dir(data, "7") == (data / "Dataset007_Other", None)
    assert find_task_dir(data, "50") == (data / "Dataset050_Fifty", None)  # no Task50_*: the v2 folder
    assert find_task_dir(data, "Dataset004_Hippo") == (data / "Dataset004_Hippo", None)
    assert find_task_dir(tmp_path / "elsewhere", str(data / "Dataset001_Twin")) == (data / "Dataset001_Twin",
                                                                                    None)
    with pytest.raises(DatasetError, match=r"task 4 is ambiguous: MSD Task04_Hippocampus \(--task 04\) and "
                                           r"nnU-Net v2 Dataset004_Hippo \(--task 004\)"):
        find_task_dir(data, "4")
    with pytest.raises(DatasetError, match=r"Task07_Pancreas does not exist .*use --task 007"):
        find_task_dir(data, "07")
    with pytest.raises(DatasetError, match=r"Dataset009_A, Dataset009_B"):
        find_task_dir(data, "009")
    with pytest.raises(DatasetError, match=r"Dataset005_\*.*found in .*Dataset001_Twin, Dataset004_Hippo"):
        find_task_dir(data, "005")

    # --task 001 and --task 1 on the command line: the v2 folder, RESULTS/<its name>_<dim>d
    proc = subprocess.run([sys.executable, "-m", "preprocess", "--task", "001", "--dim", "3", "--data",
                           str(data), "--results", str(tmp_path / "res")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "res" / "Dataset001_Twin_3d" / "twin_003_x.npy").is_file()
    assert Plan.load(tmp_path / "res" / "Dataset001_Twin_3d").task == "Dataset001_Twin"
    out = preprocess_dataset(data, "1", 3, tmp_path / "res", "test", progress=False)
    assert out == tmp_path / "res" / "Dataset001_Twin_3d" / "test"
    proc = subprocess.run([sys.executable, "-m", "preprocess", "--task", "4", "--data", str(data),
                           "--results", str(tmp_path / "res")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "error: task 4 is ambiguous" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_case_list_comes_from_the_labels(v2_copy, capsys):
    images = v2_copy / "imagesTr"
    for c in range(2):
        shutil.copy(images / f"twin_000_{c:04d}.nii.gz", images / f"spare_{c:04d}.nii.gz")
    (v2_copy / "labelsTr" / "notes.txt").write_text("not a label")
    ds = load_dataset(v2_copy)
    assert [c.name for c in ds.training] == [f"twin_{i:03d}" for i in range(4)]
    assert [c.name for c in ds.test] == ["twin_100"]
    assert [p.name for p in ds.training[0].image.paths] == ["twin_000_0000.nii.gz", "twin_000_0001.nii.gz"]
    assert Path(ds.training[0].image) == images.resolve() / "twin_000_0000.nii.gz"  # path-like: first file
    assert ds.notes and "spare" in ds.notes[0] and "not used" in ds.notes[0]
    unchecked = load_dataset(v2_copy, check_files=False)
    assert [c.name for c in unchecked.training] == [c.name for c in ds.training]


# ----------------------------------------------------------------------------------------- bad datasets


def _edit(root: Path, **change) -> Path:
    path = root / "dataset.json"
    meta = json.loads(path.read_text())
    meta.update(change)
    meta = {k: v for k, v in meta.items() if v is not None}
    path.write_text(json.dumps(meta))
    return path


def _fails(root: Path, tmp_path: Path, *patterns: str) -> str:
    """preprocess_dataset raises one DatasetError matching ``patterns``, and writes nothing."""
    results = tmp_path / "results"
    with pytest.raises(DatasetError) as e:
        preprocess_dataset(root.parent, str(root), 3, results, progress=False)
    message = str(e.value)
    for p in patterns:
        assert re.search(p, message), f"{p!r} not in {message!r}"
    assert not results.exists() or not any(results.iterdir()), list(results.iterdir())
    return message


@pytest.mark.parametrize(("change", "field"), [
    ({"file_ending": None}, "'file_ending' is missing"),
    ({"file_ending": "nii.gz"}, "'file_ending' must start with '.'"),
    ({"file_ending": ".jpg"}, "'file_ending'"),
    ({"channel_names": {}}, "'channel_names' is empty"),
    ({"channel_names": {"1": "T1"}}, "'channel_names' must be keyed"),
    ({"labels": {"background": 1, "edema": 2}}, "'labels.background'"),
    ({"labels": {"background": 0, "edema": "one"}}, "'labels.edema'"),
    ({"labels": {"edema": 1}}, "'labels' has no 'background'"),
    ({"labels": {"background": 0, "edema": 1, "core": 3}}, "'labels' must use consecutive values"),
    ({"labels": {"background": 0, "edema": 1, "ignore": 5}}, "'labels.ignore'"),
    ({"labels": {"background": 0, "whole": [1, 2], "core": 2}}, "'regions_class_order' is missing"),
    ({"numTraining": 3}, "'numTraining' is 3, but .*labelsTr holds 4"),
    ({"numTraining": "four"}, "'numTraining' must be an integer"),
    ({"overwrite_image_reader_writer": "Tiff3DIO"}, "'overwrite_image_reader_writer'"),
    ({"dataset": {}}, "'dataset'"),
])
def test_each_malformed_field_is_one_error_naming_it(v2_copy, tmp_path, change, field):
    path = _edit(v2_copy, **change)
    _fails(v2_copy, tmp_path, re.escape(str(path)), field)


def test_missing_and_extra_channel_files(v2_copy, tmp_path):
    missing = v2_copy / "imagesTr" / "twin_002_0001.nii.gz"
    missing.rename(v2_copy / "imagesTr" / "twin_002_0002.nii.gz")
    _fails(v2_copy, tmp_path, "case 'twin_002'", re.escape(f"{missing} is missing"), "declares 2 channel")
    shutil.copy(v2_copy / "imagesTr" / "twin_002_0000.nii.gz", missing)
    extra = v2_copy / "imagesTr" / "twin_002_0002.nii.gz"
    _fails(v2_copy, tmp_path, "case 'twin_002'", re.escape(str(extra)), "is channel 2")
    extra.unlink()
    (v2_copy / "imagesTs" / "twin_100_0000.nii.gz").unlink()
    _fails(v2_copy, tmp_path, "case 'twin_100'", "twin_100_0000.nii.gz is missing")


def test_unexpected_label_value_names_the_file_and_values(v2_copy, tmp_path):
    path = v2_copy / "labelsTr" / "twin_003.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0], data[1, 0, 0] = 5, 7
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    _fails(v2_copy, tmp_path, re.escape(str(path)), r"label values \[5, 7\] are not declared",
           r"declared: \[0, 1, 2\]")


def test_ignore_label_is_kept_and_regions_are_recorded(v2_copy, tmp_path):
    path = v2_copy / "labelsTr" / "twin_001.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[:, :, :2] = 3  # the ignore value
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    regions = {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}
    _edit(v2_copy, labels=regions, regions_class_order=[1, 2])
    out = preprocess_dataset(v2_copy.parent, str(v2_copy), 3, tmp_path / "out", progress=False)
    plan = Plan.load(out)
    assert plan.ignore_label == 3 and plan.regions == {"whole": (1, 2), "core": (2,)}
    assert plan.regions_class_order == (1, 2) and plan.labels == {"0": "background", "1": "label 1",
                                                                  "2": "core"}
    assert plan.n_class == 3 and 3 in np.unique(np.load(out / "twin_001_y.npy"))
    assert Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(DatasetError, match="field 'regions_class_order'"):
        Plan.from_dict({**plan.to_dict(), "regions_class_order": [1]})


def test_simpleitk_formats_without_simpleitk_name_the_file(v2_copy, tmp_path, monkeypatch):
    for p in (*v2_copy.glob("*/*.nii.gz"),):
        p.rename(p.with_name(p.name.replace(".nii.gz", ".nrrd")))
    _edit(v2_copy, file_ending=".nrrd")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # as if not installed
    _fails(v2_copy, tmp_path, re.escape(str(v2_copy / "imagesTr" / "twin_000_0000.nrrd")),
           re.escape("pip install SimpleITK"))

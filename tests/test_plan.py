"""The Plan type: old plan.json files load, round trips keep every key, bad fields name file and field."""

import json
import re

import pytest

from nnunet_jax.io import DatasetError
from nnunet_jax.plan import Plan, case_of, folder_name, image_file, label_file, meta_file

OLD = {  # written before cases/median_shape existed, with the stored "anisotropic" flag
    "task": "04", "task_name": "Task04_Hippocampus", "dim": 3, "patch_size": [40, 56, 40],
    "spacing": [1.0, 1.0, 1.0], "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
    "n_class": 3, "modalities": {"0": "MRI"}, "in_channels": 1, "normalization": "MRI", "ct_stats": None,
    "topology": {"kernels": [[3, 3, 3]] * 4, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                 "filters": [32, 64, 128, 256]},
    "anisotropic": False, "exec_mode": "training", "preprocessed": ["hippocampus_001"]}


def test_old_plan_loads_and_derives(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps(OLD))
    plan = Plan.load(tmp_path)  # the folder or the file
    assert plan == Plan.load(tmp_path / "plan.json")
    assert plan.cases is None and plan.training_cases is None and plan.topology.depth == 4
    assert plan.input_shape == (40, 56, 40, 1) and plan.folder_name == "04_3d" == folder_name("04", 3)
    assert plan.anisotropic is False and plan.class_names() == {1: "Anterior", 2: "Posterior"}
    assert plan.label_values == (0, 1, 2) and plan.extra == {"exec_mode": "training",
                                                             "preprocessed": ["hippocampus_001"]}
    minimal = Plan.from_dict({"dim": 2, "patch_size": [32, 32], "n_class": 2, "in_channels": 1})
    assert minimal.topology is None and minimal.labels == {} and minimal.normalization == "MRI"


def test_round_trip_keeps_unknown_keys(tmp_path):
    plan = Plan.from_dict(OLD)
    again = Plan.from_dict(plan.to_dict())
    assert again == plan and again.to_dict() == plan.to_dict()
    written = plan.with_extra(exec_mode="val").save(tmp_path)
    on_disk = json.loads(written.read_text())
    assert on_disk["exec_mode"] == "val" and on_disk["preprocessed"] == ["hippocampus_001"]
    assert "anisotropic" not in on_disk  # derived from the spacing, no longer stored
    assert {k: v for k, v in on_disk.items() if k not in ("exec_mode", "anisotropic")} == \
        {k: v for k, v in OLD.items() if k not in ("exec_mode", "anisotropic")} | {"source": {}}


@pytest.mark.parametrize("change, field", [
    ({"patch_size": [32, 32]}, "patch_size"),
    ({"n_class": 2.5}, "n_class"),
    ({"dim": 4}, "dim"),
    ({"spacing": [1.0, -1.0, 1.0]}, "spacing"),
    ({"normalization": "PET"}, "normalization"),
    ({"topology": {"kernels": [[3, 3]], "strides": [[1, 1]], "filters": [4]}}, "topology"),
    ({"cases": {"training": "a"}}, "cases"),
])
def test_bad_field_names_file_and_field(tmp_path, change, field):
    (tmp_path / "plan.json").write_text(json.dumps({**OLD, **change}))
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'plan.json'}: field '{field}'")):
        Plan.load(tmp_path)


def test_missing_keys_and_files(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({k: v for k, v in OLD.items() if k != "dim"}))
    with pytest.raises(DatasetError, match=r"plan.json lacks the keys \['dim'\]"):
        Plan.load(tmp_path)
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(DatasetError, match="plan.json is not valid JSON"):
        Plan.load(tmp_path)
    with pytest.raises(DatasetError, match="missing"):
        Plan.load(tmp_path / "nothing")


def test_case_files():
    assert (image_file("c"), label_file("c"), meta_file("c")) == ("c_x.npy", "c_y.npy", "c_meta.npy")
    assert case_of("/data/01_3d/BRATS_001_x.npy") == "BRATS_001"
    with pytest.raises(ValueError, match="not a preprocessed image"):
        case_of("BRATS_001_y.npy")

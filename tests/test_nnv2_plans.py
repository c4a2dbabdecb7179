"""nnU-Net v2 plans.json / dataset.json reading: resolved configurations, LabelManager's rules, and one
clear error naming the file and the field for each malformed input (no nnunetv2 needed)."""

import copy
import json

import pytest

from nnunet_jax.interop.nnunetv2.plans import V2Labels, V2Plans
from nnunet_jax.io import DatasetError

ARCH = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 2, "features_per_stage": [8, 16], "strides": [[1, 1, 1], [1, 2, 2]]},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
RS = {"resampling_fn_data": "resample_data_or_seg_to_shape",
      "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
      "resampling_fn_seg": "resample_data_or_seg_to_shape",
      "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
      "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
      "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                             "force_separate_z": None}}
PLANS = {
    "dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [2, 0, 1], "transpose_backward": [1, 2, 0],
    "foreground_intensity_properties_per_channel": {"0": {"mean": 40.0, "std": 44.5, "percentile_00_5": -38.0,
                                                          "percentile_99_5": 190.0, "max": 300.0}},
    "configurations": {
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2,
                       "patch_size": [14, 40, 40], "spacing": [3.0, 0.9, 0.9],
                       "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                       "architecture": ARCH, **RS},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        "3d_lowres": {"inherits_from": "3d_fullres", "spacing": [4.0, 1.5, 1.5], "patch_size": [10, 30, 30]},
    },
}
DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
           "numTraining": 4, "file_ending": ".nii.gz"}


def test_configuration_resolved_and_typed():
    plans = V2Plans.from_dict(copy.deepcopy(PLANS))
    cfg = plans.configuration("3d_fullres")
    assert cfg.patch_size == (14, 40, 40) and cfg.spacing == (3.0, 0.9, 0.9) and cfg.ndim == 3
    assert cfg.resampling_data.order == 3 and cfg.resampling_data.order_z == 0
    assert cfg.resampling_data.force_separate_z is None and cfg.resampling_seg.is_seg
    assert cfg.resampling_probabilities.order == 1
    assert cfg.architecture.class_name == "PlainConvUNet"
    assert cfg.architecture.kw_requires_import[0] == "conv_op"
    assert plans.transpose_forward == (2, 0, 1) and plans.foreground_intensity_properties[0]["std"] == 44.5
    low = plans.configuration("3d_lowres")  # inherits: the child's keys win, the rest comes from the parent
    assert low.spacing == (4.0, 1.5, 1.5) and low.patch_size == (10, 30, 30)
    assert low.normalization_schemes == ("CTNormalization",)
    casc = plans.configuration("3d_cascade_fullres")
    assert casc.previous_stage == "3d_lowres" and casc.spacing == (3.0, 0.9, 0.9)
    d = copy.deepcopy(PLANS)
    d["configurations"]["3d_deeper"] = {"inherits_from": "3d_lowres", "batch_size": 5}  # two levels deep
    deeper = V2Plans.from_dict(d).configuration("3d_deeper")
    assert deeper.batch_size == 5 and deeper.spacing == (4.0, 1.5, 1.5) and deeper.ndim == 3


def _mutate(path, value):
    d = copy.deepcopy(PLANS)
    node = d
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


C = ("configurations", "3d_fullres")


@pytest.mark.parametrize(("path", "value", "field"), [
    (("transpose_forward",), [0, 0, 1], "transpose_forward"),
    (("transpose_backward",), [0, 1, 2], "transpose_backward"),
    (("configurations",), {}, "configurations"),
    ((*C, "patch_size"), [14, 40], "configurations.3d_fullres.spacing"),
    ((*C, "patch_size"), KeyError, "configurations.3d_fullres.patch_size"),
    ((*C, "patch_size"), [14, "40", 40], "configurations.3d_fullres.patch_size"),
    ((*C, "spacing"), [3.0, 0.0, 0.9], "configurations.3d_fullres.spacing"),
    ((*C, "normalization_schemes"), ["FancyNorm"], "configurations.3d_fullres.normalization_schemes"),
    ((*C, "use_mask_for_norm"), [], "configurations.3d_fullres.use_mask_for_norm"),
    ((*C, "resampling_fn_data"), "my_resampler", "configurations.3d_fullres.resampling_fn_data"),
    ((*C, "resampling_fn_data_kwargs", "order"), 5,
     "configurations.3d_fullres.resampling_fn_data_kwargs.order"),
    ((*C, "resampling_fn_seg_kwargs", "oder"), 1, "configurations.3d_fullres.resampling_fn_seg_kwargs.oder"),
    ((*C, "resampling_fn_probabilities_kwargs", "force_separate_z"), "yes",
     "configurations.3d_fullres.resampling_fn_probabilities_kwargs.force_separate_z"),
    ((*C, "architecture"), KeyError, "configurations.3d_fullres.architecture"),
    ((*C, "architecture", "network_class_name"), 3,
     "configurations.3d_fullres.architecture.network_class_name"),
    (("configurations", "3d_lowres", "inherits_from"), "3d_nope", "configurations.3d_lowres.inherits_from"),
    (("foreground_intensity_properties_per_channel", "0"), {"mean": 1.0},
     "foreground_intensity_properties_per_channel.0"),
])
def test_malformed_plans_name_file_and_field(tmp_path, path, value, field):
    p = tmp_path / "plans.json"
    p.write_text(json.dumps(_mutate(path, value)))
    with pytest.raises(DatasetError) as e:
        V2Plans.load(p).configuration("3d_lowres" if "3d_lowres" in path else "3d_fullres")
    msg = str(e.value)
    assert str(p) in msg and repr(field) in msg, msg


def test_inheritance_cycle_and_unknown_configuration(tmp_path):
    d = _mutate(("configurations", "3d_fullres", "inherits_from"), "3d_lowres")
    with pytest.raises(DatasetError, match="cycle"):
        V2Plans.from_dict(d, "p.json").configuration("3d_lowres")
    with pytest.raises(DatasetError, match=r"'2d' does not exist.*3d_fullres"):
        V2Plans.from_dict(copy.deepcopy(PLANS), "p.json").configuration("2d")


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(DatasetError, match="plans file is missing"):
        V2Plans.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"bad\.json: dataset\.json is not valid JSON"):
        V2Labels.load(tmp_path / "bad.json")


def test_labels_plain():
    lab = V2Labels.from_dataset_json(copy.deepcopy(DATASET))
    assert not lab.has_regions and lab.num_heads == 3 and lab.all_labels == (0, 1, 2)
    assert lab.foreground_labels == (1, 2) and lab.channel_names == {0: "CT"} and lab.num_channels == 1
    assert lab.file_ending == ".nii.gz" and lab.num_training == 4 and lab.ignore_label is None


def test_labels_regions_and_ignore():
    d = {**DATASET, "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3, "ignore": 4},
         "regions_class_order": [1, 2, 3], "modality": None}
    d.pop("modality")
    lab = V2Labels.from_dataset_json(d)
    assert lab.has_regions and lab.regions == ((1, 2, 3), (2, 3), (3,)) and lab.num_heads == 3
    assert lab.regions_class_order == (1, 2, 3) and lab.ignore_label == 4 and lab.all_labels == (0, 1, 2, 3)
    legacy = {**DATASET, "modality": {"0": "T1", "1": "T2"}}
    legacy.pop("channel_names")
    assert V2Labels.from_dataset_json(legacy).num_channels == 2  # v1-style key still read


@pytest.mark.parametrize(("change", "field"), [
    ({"labels": {"liver": 1}}, "'labels'"),
    ({"labels": {"background": 1, "liver": 2}}, "'labels.background'"),
    ({"labels": {"background": [0], "liver": 1}}, "'labels.background'"),
    ({"labels": {"background": 0, "liver": "1"}}, "'labels.liver'"),
    ({"labels": {"background": 0, "liver": 1, "ignore": 5}}, "'labels.ignore'"),
    ({"labels": {"background": 0, "liver": 1, "ignore": [2]}}, "'labels.ignore'"),
    ({"labels": {"background": 0, "a": [1, 2], "b": 2}}, "'regions_class_order'"),
    ({"labels": {"background": 0, "a": [1, 2], "b": 2}, "regions_class_order": [1]}, "'regions_class_order'"),
    ({"channel_names": {}}, "'channel_names'"),
    ({"channel_names": {"1": "CT"}}, "'channel_names'"),
    ({"channel_names": {"0": 5}}, "'channel_names.0'"),
    ({"file_ending": "nii.gz"}, "'file_ending'"),
    ({"file_ending": None}, "'file_ending'"),
    ({"numTraining": "4"}, "'numTraining'"),
    ({"numTraining": -1}, "'numTraining'"),
])
def test_malformed_dataset_json_names_the_field(change, field):
    d = {**copy.deepcopy(DATASET), **change}
    with pytest.raises(DatasetError) as e:
        V2Labels.from_dataset_json(d, "/data/Dataset001_X/dataset.json")
    assert "/data/Dataset001_X/dataset.json" in str(e.value) and field in str(e.value), str(e.value)

"""Post-processing (keep the largest connected component) and its decision: the component rules, v2's Dice
convention, the decision on tests/pp_cases.py's scenarios, the decision file and how predict.py finds it.
The decision itself is checked against nnU-Net v2 in tests/parity/test_postprocessing_nnv2.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_jax import postprocessing as pp
from tests import pp_cases as pc


def test_keep_largest_full_connectivity_ties_and_regions():
    seg = np.zeros((6, 6, 6), np.uint8)
    seg[0:2, 0:2, 0:2] = 1  # 8 voxels
    seg[2, 2, 2] = 1  # touches the cube only at a corner: part of it (26-connectivity)
    seg[4:6, 4:6, 4] = 1  # 4 voxels, separate
    seg[4:6, 0:2, 4:6] = 2
    out = pp.keep_largest(seg, (1,))
    assert out[2, 2, 2] == 1 and not out[4:6, 4:6, 4].any()
    assert (out == 2).sum() == 8 and seg[4, 4, 4] == 1  # other labels untouched, input unchanged
    tie = np.zeros((5, 5, 5), np.uint8)
    tie[0, 0, 0:2] = 3
    tie[4, 4, 3:5] = 3
    np.testing.assert_array_equal(pp.keep_largest(tie, (3,)), tie)  # equal sizes: both kept
    # a region is the union of its labels: 1 and 2 together are one component bigger than the stray 1
    seg2 = np.zeros((6, 6, 6), np.uint8)
    seg2[0:2, 0:2, 0:2], seg2[0:2, 0:2, 2:4], seg2[5, 5, 5] = 1, 2, 1
    out2 = pp.keep_largest(seg2, ((1, 2),))
    assert out2[5, 5, 5] == 0 and (out2 == 2).sum() == 8 and (out2 == 1).sum() == 8


def test_dice_counts_empty_cases_as_nan_and_skips_ignored_voxels():
    pred = np.array([[[1, 1, 0, 2]]])
    ref = np.array([[[1, 0, 0, 3]]])
    d = pp.dice_per_target(pred, ref, [1, 2, 4])
    assert d[0] == pytest.approx(2 / 3) and d[1] == 0.0 and math.isnan(d[2])
    assert math.isnan(pp.dice_per_target(pred, ref, [2], ignore_label=3)[0])  # its only voxel is ignored
    with pytest.raises(ValueError, match="shape"):
        pp.dice_per_target(pred, ref[..., :2], [1])


@pytest.mark.parametrize(("scenario", "steps"), [("classes", [(1,)]), ("all_fg", [(1, 2)]),
                                                 ("regions", [((1, 2),)]), ("ignore", [(1,)])])
def test_decision_on_the_scenarios(tmp_path, scenario, steps):
    preds, labels = pc.write(tmp_path, scenario)
    targets = pc.TARGETS[scenario]
    fg = sorted({v for t in targets for v in (t if isinstance(t, tuple) else (t,))})
    d = pp.determine(pc.cases(), pc.loader(preds, labels), targets, fg, pc.IGNORE.get(scenario))
    assert d.steps == steps
    taken = [x for x in d.decisions if x["applied"]]
    assert len(taken) == len(steps)
    assert all(x["dice (%) after"] > x["dice (%) before"] for x in taken)
    if scenario == "regions":  # as v2: a region's step is judged by that region only, though core loses here
        assert d.after.per_target[1] < d.before.per_target[1]
    else:
        assert d.after.mean > d.before.mean


def test_targets_of_label_specs():
    from nnunet_jax.labels import LabelSpec

    assert pp.targets_of(LabelSpec(3)) == ([1, 2], [1, 2], None)
    assert pp.targets_of(LabelSpec(4, brats=True)) == ([(1, 2, 3, 4), (1, 3, 4), (3, 4)], [1, 2, 3, 4], None)
    spec = LabelSpec(3, regions=(("whole", (1, 2)), ("core", (2,))), regions_class_order=(1, 2),
                     ignore_label=3)
    assert pp.targets_of(spec) == ([(1, 2), (2,)], [1, 2], 3)


def test_decision_file_round_trip_and_predicts_lookup(tmp_path):
    preds, labels = pc.write(tmp_path / "data", "classes")
    runs = [_fake_run(tmp_path / "cv" / f"fold{k}") for k in range(2)]
    d = pp.determine(pc.cases(), pc.loader(preds, labels), [1, 2], [1, 2])
    d.sources = {"runs": [pp.run_dir(r) for r in runs]}
    path = pp.save(d, tmp_path / "cv" / pp.FILE_NAME)
    data = json.loads(path.read_text())
    assert data["format"] == pp.FORMAT and data["steps"] == [{"keep_largest_component": [1]}]
    assert data["dice (%) after"]["per_target"]["1"] > data["dice (%) before"]["per_target"]["1"]
    assert pp.load(path).steps == d.steps
    # predict.py applies it to exactly these runs (any order, any way of naming them), never to one fold
    assert pp.find_for_runs([runs[1], runs[0] / "checkpoints" / "best"]).path == path
    assert pp.find_for_runs([runs[0]]) is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="bad.json"):
        pp.load(bad)
    other = tmp_path / "other"  # a foreign postprocessing.json beside the run: not ours, predict ignores it
    other_run = _fake_run(other / "fold0")
    (other / pp.FILE_NAME).write_text(bad.read_text())
    assert pp.find_for_runs([other_run]) is None
    with pytest.raises(FileNotFoundError, match="missing.json"):
        pp.load(tmp_path / "missing.json")


def test_apply_to_file_keeps_geometry(tmp_path):
    seg = np.zeros((8, 7, 6), np.uint8)
    seg[1:4, 1:4, 1:4], seg[6, 5, 4] = 1, 1
    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    path = tmp_path / "c.nii.gz"
    nib.save(nib.Nifti1Image(seg, affine), path)
    assert pp.apply_to_file(path, [(1,)])
    out = nib.load(path)
    assert out.get_data_dtype() == np.uint8 and np.allclose(out.affine, affine)
    assert np.asarray(out.dataobj).sum() == 27
    assert not pp.apply_to_file(path, [(1,)])  # nothing left to remove
    npy = tmp_path / "c_pred.npy"
    np.save(npy, seg.transpose(2, 1, 0))
    assert pp.apply_to_file(npy, [(1,)]) and np.load(npy).sum() == 27


def _fake_run(results: Path, plan: dict | None = None, brats: bool = False) -> Path:
    """A results folder as far as post-processing looks: config.json and a finished checkpoint step."""
    (results / "checkpoints" / "best" / "1").mkdir(parents=True)
    plan = plan or {"task": "99", "dim": 3, "patch_size": [8, 8, 8], "n_class": 3, "in_channels": 1,
                    "labels": {"0": "bg", "1": "a", "2": "b"}}
    (results / "config.json").write_text(json.dumps({"config": {"brats": brats}, "plan": plan}))
    return results

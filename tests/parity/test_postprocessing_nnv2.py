"""Our post-processing decision against nnU-Net v2's ``determine_postprocessing`` on the same predictions and
labels (tests/pp_cases.py: class labels, all-foreground-as-one, regions, an ignore label), run by v2 on the
CPU with one process: the same steps in the same order, the same Dice before and after, and the masks v2
post-processed equal to ours."""

import shutil

import numpy as np
import pytest

from nnunet_jax import postprocessing as pp
from nnunet_jax.scoring import load_segmentation
from tests import pp_cases as pc

rcc = pytest.importorskip("nnunetv2.postprocessing.remove_connected_components")

pytestmark = pytest.mark.parity
PLANS = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager"}


def _step(labels_or_regions) -> pp.Step:
    """v2's kwargs → our step (a list is a union of targets, a scalar or tuple one target)."""
    items = labels_or_regions if isinstance(labels_or_regions, list) else [labels_or_regions]
    return tuple(tuple(int(v) for v in t) if isinstance(t, tuple) else int(t) for t in items)


@pytest.mark.parametrize("scenario", list(pc.DATASET_LABELS))
def test_decision_and_masks_equal_v2(tmp_path, scenario):
    import json

    preds, labels = pc.write(tmp_path, scenario)
    v2_preds = tmp_path / "v2_preds"  # v2 writes summary.json and postprocessed/ into its input
    shutil.copytree(preds, v2_preds)
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    fns, kwargs = rcc.determine_postprocessing(str(v2_preds), str(labels), PLANS, dataset, num_processes=1,
                                               keep_postprocessed_files=True)
    v2_steps = [_step(k["labels_or_regions"]) for k in kwargs]

    targets = pc.TARGETS[scenario]
    foreground = sorted({v for t in targets for v in (t if isinstance(t, tuple) else (t,))})
    ours = pp.determine(pc.cases(), pc.loader(preds, labels), targets, foreground, pc.IGNORE.get(scenario))
    assert ours.steps == v2_steps
    summary = json.loads((v2_preds / "postprocessing.json").read_text())
    for key, scores in (("input_folder", ours.before), ("postprocessed", ours.after)):
        assert scores.mean == pytest.approx(summary[key]["foreground_mean"]["Dice"], abs=1e-12)
    # what each scenario is for: the decision is not trivial (taken and refused steps alike)
    applied = [d["applied"] for d in ours.decisions]
    assert applied[0] == (scenario == "all_fg")
    assert any(applied) and not all(applied)
    for case in pc.cases():
        v2_mask = load_segmentation(v2_preds / "postprocessed" / f"{case}.nii.gz").labels
        ours_mask = pp.apply(load_segmentation(preds / f"{case}.nii.gz").labels, ours.steps)
        np.testing.assert_array_equal(ours_mask, v2_mask, err_msg=f"{scenario} {case}")

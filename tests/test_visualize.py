"""Training-curve and overlay pictures: written, readable PNGs with the expected content."""

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from nnunet_jax.plots import class_color, overlay_png, pick_slices, plot_training_curves, read_logs


def _logs(path, n=5):
    with open(path, "w") as f:
        f.write(json.dumps({"settings": {"task": "00"}}) + "\n")  # a non-epoch line is skipped
        for e in range(n):
            rec = {"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1),
                   "dice": {"1": 10.0 * e, "2": 5.0 * e}, "mean_dice": 7.5 * e, "lr": 1e-3}
            f.write(json.dumps(rec) + "\n")


def test_curves_png(tmp_path):
    _logs(tmp_path / "logs.json")
    assert len(read_logs(tmp_path / "logs.json")) == 5
    out = plot_training_curves(tmp_path / "logs.json", tmp_path / "plots" / "curves.png",
                               {"1": "oedema", "2": "core"})
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 100
    assert not list((tmp_path / "plots").glob(".*"))  # no temp file left


def test_region_names_are_used():
    from nnunet_jax.plots import _per_class_dice

    rec = {"epoch": 1, "dice": [1.0, 2.0, 3.0], "dice_WT": 1.0, "dice_TC": 2.0, "dice_ET": 3.0}
    assert _per_class_dice(rec) == {"WT": 1.0, "TC": 2.0, "ET": 3.0}
    assert _per_class_dice({"epoch": 1, "dice": [5.0, 6.0]}) == {"1": 5.0, "2": 6.0}


def test_curves_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.json: line 1"):
        read_logs(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="no epoch"):
        plot_training_curves(tmp_path / "empty.json", tmp_path / "x.png")


def test_pick_slices_prefers_foreground():
    lab = np.zeros((10, 4, 4), np.uint8)
    lab[7] = 1
    lab[2, :2] = 2
    assert pick_slices(lab, 2) == [2, 7]
    assert pick_slices(np.zeros((5, 2, 2)), 3) == [0, 2, 4]


def test_overlay_colours(tmp_path):
    img = np.zeros((2, 6, 32, 32), np.float32)
    lab = np.zeros((6, 32, 32), np.uint8)
    lab[3, 8:24, 8:24] = 1
    out = overlay_png(img, lab, tmp_path / "ov.png", {1: "core"}, n_slices=1, alpha=1.0)
    rgb = mpimg.imread(out)[..., :3]
    # The class colour appears in the picture (alpha 1 on a black image gives the pure colour).
    assert np.any(np.all(np.abs(rgb - class_color(1)) < 0.02, axis=-1))
    with pytest.raises(ValueError, match="differ"):
        overlay_png(img, lab[:3], tmp_path / "bad.png")

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


# --------------------------------------------------------------------------- what a new user looks at

PLAN = {"dim": 3, "patch_size": [8, 8, 8], "n_class": 3, "in_channels": 1,
        "labels": {"0": "background", "1": "oedema", "2": "core"}}


def _records(n_epochs, n_classes, lr=lambda e: 0.003000000026077032):
    return [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "lr": lr(e),
             "dice": [10.0 * e + c for c in range(n_classes)], "mean_dice": 10.0 * e}
            for e in range(1, n_epochs + 1)]


def _ticks_shown(ax, axis="x"):
    ax.figure.canvas.draw()
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [t for t in ticks if lo <= t <= hi]


def test_curves_integer_epochs_percent_dice_and_class_names():
    import matplotlib.pyplot as plt

    from nnunet_jax.plots import training_curves_figure

    fig = training_curves_figure(_records(3, 2), {1: "oedema", 2: "core"})  # plan.class_names() keys
    try:
        for ax in fig.axes:
            ticks = _ticks_shown(ax)
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        dice = fig.axes[1]
        assert dice.get_ylabel() == "Dice (%)"
        assert [ln.get_label() for ln in dice.get_lines()] == ["oedema", "core", "mean"]
    finally:
        plt.close(fig)


def test_curves_one_class_has_no_mean_line():
    import matplotlib.pyplot as plt

    from nnunet_jax.plots import training_curves_figure

    fig = training_curves_figure(_records(4, 1), {"1": "lesion"})  # plan.labels keys
    try:
        assert [ln.get_label() for ln in fig.axes[1].get_lines()] == ["lesion"]
    finally:
        plt.close(fig)


def test_curves_learning_rate_axis():
    import matplotlib.pyplot as plt

    from nnunet_jax.plots import training_curves_figure

    fig = training_curves_figure(_records(3, 2))  # constant (float32) lr: 0, lr, 2 lr, plainly written
    try:
        lr_ax = fig.axes[2]
        assert lr_ax.get_ylim() == pytest.approx((0.0, 0.006))
        fig.canvas.draw()
        assert [t.get_text() for t in lr_ax.get_yticklabels()] == ["0", "0.003", "0.006"]
        assert "constant 0.003" in lr_ax.get_title()
    finally:
        plt.close(fig)
    fig = training_curves_figure(_records(30, 2, lr=lambda e: 1e-2 * 0.8 ** e))  # decays over decades
    try:
        assert fig.axes[2].get_yscale() == "log"
    finally:
        plt.close(fig)
    fig = training_curves_figure(_records(30, 2, lr=lambda e: 1e-2 * (1 - e / 60)))  # halved: linear
    try:
        assert fig.axes[2].get_yscale() == "linear" and len(_ticks_shown(fig.axes[2], "y")) <= 5
    finally:
        plt.close(fig)


def _run_folder(tmp_path, checkpoint: bool):
    run = tmp_path / "run"
    run.mkdir()
    _logs(run / "logs.json", n=3)
    (run / "config.json").write_text(json.dumps({"config": {}, "identity": {}, "plan": PLAN}))
    if checkpoint:  # what checkpoints.resolve_ckpt_path takes for a finished checkpoint
        (run / "checkpoints" / "last" / "3").mkdir(parents=True)
    return run


@pytest.mark.parametrize("checkpoint", [True, False])
def test_visualize_names_classes_from_the_runs_config(tmp_path, checkpoint):
    from nnunet_jax.cli.visualize import run_class_names

    run = _run_folder(tmp_path, checkpoint)
    assert run_class_names(str(run / "logs.json")) == {1: "oedema", 2: "core"}
    (run / "config.json").unlink()
    assert run_class_names(str(run / "logs.json")) is None


def test_visualize_cli_curves_use_the_runs_class_names(tmp_path):
    """``visualize.py --logs`` (as scripts/demo.sh runs it) passes the config.json's names to the plot."""
    import subprocess
    import sys

    run = _run_folder(tmp_path, checkpoint=True)
    code = ("import sys\nfrom nnunet_jax import plots\n"
            "plots.plot_training_curves = lambda logs, out, names: print('NAMES', sorted(names.items()))\n"
            "from nnunet_jax.cli.visualize import run\n"
            f"sys.argv = ['visualize.py', '--logs', {str(run / 'logs.json')!r}, '--out', 'x.png']\nrun()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "NAMES [(1, 'oedema'), (2, 'core')]" in proc.stdout


def test_visualize_help_has_no_broken_continuation():
    from pathlib import Path

    import nnunet_jax.cli.visualize as visualize

    assert "\\\n" not in Path(visualize.__file__).read_text()
    for line in visualize.__doc__.splitlines():  # a backslash-newline glued two lines with a run of spaces
        assert "   " not in line.strip(), line


def test_pick_slices_spread_over_the_foreground():
    lab = np.zeros((40, 8, 8), np.uint8)
    for z in range(10, 30):  # a lesion over z 10..29, widest at z 20
        r = 4 - abs(z - 20) // 3
        lab[z, 4 - r:4 + r, 4 - r:4 + r] = 1
    lab[20, 0, 0] = 2
    lab[1, 0, 0] = 1  # a stray voxel does not stretch the extent
    picked = pick_slices(lab, 3)
    assert 20 in picked and all(10 <= z <= 29 for z in picked), picked
    assert min(np.diff(picked)) >= 5, picked  # not adjacent
    # with a reference, the slices follow the ground truth
    ref = np.zeros_like(lab)
    ref[30:36, 2:6, 2:6] = 1
    assert all(30 <= z <= 35 for z in pick_slices(lab, 3, reference=ref))
    # no foreground: the centre
    assert pick_slices(np.zeros((9, 2, 2)), 1) == [4]
    assert len(pick_slices(lab[:3], 5)) <= 3


def _case_volume():
    img = np.zeros((12, 24, 24), np.float32)
    ref = np.zeros((12, 24, 24), np.uint8)
    ref[3:9, 6:18, 6:18] = 1
    ref[5:7, 10:14, 10:14] = 2
    pred = np.roll(ref, 2, axis=2)
    img[ref > 0] = 1.0
    return img, pred, ref


def test_overlay_draws_the_reference_as_contours(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.contour import ContourSet

    from nnunet_jax.plots import overlay_figure

    img, pred, ref = _case_volume()
    fig = overlay_figure(img, pred, {1: "oedema", 2: "core"}, n_slices=3, reference=ref, title="case_7")
    try:
        contours = [c for ax in fig.axes for c in ax.collections if isinstance(c, ContourSet)]
        colours = {tuple(np.round(c.get_edgecolor()[0][:3], 2)) for c in contours}
        assert colours == {tuple(np.round(class_color(1), 2)), tuple(np.round(class_color(2), 2))}
        title = fig.get_suptitle()
        assert "case_7" in title and "reference (contour)" in title
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == ["oedema", "core"]
    finally:
        plt.close(fig)
    fig = overlay_figure(img, pred, {1: "oedema", 2: "core"}, title="case_7")  # no reference: no contour
    try:
        assert not [c for ax in fig.axes for c in ax.collections if isinstance(c, ContourSet)]
        assert "reference" not in fig.get_suptitle()
    finally:
        plt.close(fig)
    out = overlay_png(img, pred, tmp_path / "ov.png", reference=ref, title="case_7")
    assert mpimg.imread(out).ndim == 3
    with pytest.raises(ValueError, match="reference shape"):
        overlay_png(img, pred, tmp_path / "bad.png", reference=ref[:3])


def test_predict_overlay_outlines_the_labelsTr_reference(tmp_path, monkeypatch):
    """``predict.py --overlays``: a source image in imagesTr gets its labelsTr file as the reference."""
    import nibabel as nib

    from nnunet_jax import plots
    from nnunet_jax.inference.predictor import Prediction, _overlay
    from nnunet_jax.plan import Plan

    img, pred, ref = _case_volume()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for folder, data in (("imagesTr", img), ("labelsTr", ref)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), affine), tmp_path / folder / "c1.nii.gz")
    seen = {}

    def fake_overlay_png(image, label, out, names, **kw):
        seen.update(image=image, label=label, names=names, **kw)
        return out

    monkeypatch.setattr(plots, "overlay_png", fake_overlay_png)
    logs = []
    plan = Plan.from_dict(PLAN)
    _overlay(Prediction("c1", pred, affine), tmp_path / "imagesTr" / "c1.nii.gz", tmp_path, plan, logs.append)
    np.testing.assert_array_equal(seen["reference"], ref)
    assert seen["names"] == {1: "oedema", 2: "core"} and seen["title"] == "c1"
    assert seen["image"].shape == (1, *ref.shape)
    # a label that does not fit its image: the overlay without a reference, and a note why
    nib.save(nib.Nifti1Image(ref[:6].transpose(2, 1, 0), affine), tmp_path / "labelsTr" / "c1.nii.gz")
    _overlay(Prediction("c1", pred, affine), tmp_path / "imagesTr" / "c1.nii.gz", tmp_path, plan, logs.append)
    assert seen["reference"] is None and "reference not drawn" in logs[-1]

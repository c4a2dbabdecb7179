"""Predictor and predict.py: masks in the source geometry, fold ensembles, TTA, BraTS regions, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from nnunet_jax.inference.predictor import (
    Predictor,
    find_inputs,
    predict_inputs,
    save_prediction,
    to_source_labels,
    to_source_probabilities,
)
from nnunet_jax.io import load_case
from nnunet_jax.labels import regions_to_labels
from nnunet_jax.preprocessing.case import CaseMeta, preprocess_case

ROOT = Path(__file__).resolve().parents[1]
K = 3  # classes, background included


def _blobs(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """(X, Y, Z) label with two ellipsoids of classes 1 and 2 (wide enough to survive resampling)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    lab = np.zeros(shape, np.uint8)
    for c, frac in ((1, 0.3), (2, 0.18)):
        centre = np.array(shape) * rng.uniform(0.4, 0.6, 3)
        radii = np.array(shape) * frac
        lab[sum(((g - m) / r) ** 2 for g, m, r in zip(grid, centre, radii, strict=True)) <= 1] = c
    return lab


def _write_case(folder: Path, name: str, shape, pixdim, border: int = 0, seed: int = 0):
    """Image (X, Y, Z) = label + 1 inside a box (zero outside when ``border``), oblique affine."""
    lab = _blobs(shape, seed)
    img = (lab + 1).astype(np.float32)
    if border:
        img[:border], img[-border:], lab[:border], lab[-border:] = 0, 0, 0, 0
        img[:, :, :border], lab[:, :, :border] = 0, 0
    affine = np.diag([*pixdim, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.5)
    affine[0, 1] = 0.1  # not axis aligned: the affine must be copied, not rebuilt from spacing
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, affine), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), folder / f"{name}_label.nii.gz")
    return folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz", lab, affine


def _plan(target, patch=(16, 16, 16), dim=3, in_channels=1) -> dict:
    # CT normalisation with min 0, mean 0, std 1 leaves intensities 0..K as they are: a "perfect" model can
    # read the class off the image.
    return {"task": "99", "dim": dim, "patch_size": list(patch), "spacing": list(target), "n_class": K,
            "in_channels": in_channels, "labels": {str(i): str(i) for i in range(K)}, "normalization": "CT",
            "ct_stats": [0.0, float(K), 0.0, 1.0],
            "topology": {"kernels": [[3] * dim] * 3, "strides": [[1] * dim] + [[2] * dim] * 2,
                         "filters": [4, 8, 16]}}


CASES = {  # name: (shape X, Y, Z; pixdim X, Y, Z; target spacing Z, Y, X; zero border)
    "isotropic": ((20, 18, 16), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 0),
    "anisotropic": ((20, 18, 8), (1.0, 1.0, 3.0), (1.0, 1.0, 1.0), 0),  # thick slices, resampled ×3 in Z
    "resampled": ((12, 10, 10), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), 0),  # regular (cubic / linear) path
    "cropped": ((24, 20, 18), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 3),  # crop by the non-zero box
}


@pytest.mark.parametrize("name", list(CASES))
def test_perfect_model_round_trip(tmp_path, name):
    """Preprocess, one-hot of the preprocessed label as logits, export: the source label, voxel for voxel."""
    shape, pixdim, target, border = CASES[name]
    img_path, lbl_path, lab_xyz, affine = _write_case(tmp_path / "raw", name, shape, pixdim, border)
    case = load_case(img_path, lbl_path)
    x, y, meta = preprocess_case(case.image, case.label, case.spacing, target_spacing=target,
                                 patch_size=(16, 16, 16), normalization="CT", ct_stats=[0, K, 0, 1],
                                 mode="test", affine=case.affine)
    if name == "cropped":
        assert x.shape[1:] != case.image.shape[1:]  # the crop really happened
    if name in ("anisotropic", "resampled"):
        assert x.shape[1:] != case.image.shape[1:]  # so did the resampling
    logits = 8.0 * np.eye(K, dtype=np.float32)[y[0]].transpose(3, 0, 1, 2) - 4.0
    labels = to_source_labels(logits, meta, "logits")
    [out] = save_prediction(_pred(name, labels, case), tmp_path / "out")
    written = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(written.dataobj), lab_xyz)
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    assert written.shape == shape
    assert written.header.get_zooms() == pytest.approx(nib.load(str(img_path)).header.get_zooms())
    # probabilities at the source geometry: (K, Z, Y, X), sum to 1, argmax = the label
    probs = to_source_probabilities(logits, meta, "logits")
    assert probs.shape == (K, *shape[::-1])
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), lab_xyz.transpose(2, 1, 0))


def _pred(name, labels, case):
    from nnunet_jax.inference.predictor import Prediction

    return Prediction(name, labels, case.affine, case.header)


# ------------------------------------------------------------------------- predictors with known forwards


def _one_hot_of_input(variables, x):
    """A "perfect" model for images whose intensity is class + 1 (0 = outside): one-hot logits."""
    cls = jnp.clip(jnp.round(x[..., 0]) - 1, 0, K - 1).astype(jnp.int32)
    return 10.0 * jnp.eye(K, dtype=jnp.float32)[cls] * variables["scale"]


def test_predictor_on_nifti_and_array(tmp_path):
    """The whole Predictor path (load → preprocess → sliding window → export) with a perfect model."""
    img_path, _, lab_xyz, affine = _write_case(tmp_path / "raw", "c", (20, 18, 16), (1.0, 1.0, 3.0), 0)
    predictor = Predictor(_plan((1.0, 1.0, 1.0)), _one_hot_of_input, [{"scale": jnp.float32(1.0)}])
    pred = predictor.predict(img_path)
    assert pred.case == "c"
    np.testing.assert_array_equal(pred.labels, lab_xyz.transpose(2, 1, 0))
    np.testing.assert_allclose(pred.affine, affine)
    # the same volume as an array with its spacing
    image = nib.load(str(img_path)).get_fdata().astype(np.float32).transpose(2, 1, 0)
    arr = predictor.predict(image, spacing=(3.0, 1.0, 1.0), probabilities=True)
    np.testing.assert_array_equal(arr.labels, pred.labels)
    assert arr.probabilities.shape == (K, *image.shape)


def _pointwise(variables, x):
    """logits = x · w: a sliding window of a pointwise model is the model itself (weights normalise)."""
    return x[..., :1] * variables["w"]


def test_fold_ensemble_is_mean_of_softmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 20, 18, 16)).astype(np.float32)
    w1, w2 = np.array([0.0, 1.0, -2.0], np.float32), np.array([0.5, -1.0, 3.0], np.float32)
    single = Predictor(_plan((1, 1, 1)), _pointwise, [{"w": jnp.asarray(w1)}], batch_size=2)
    np.testing.assert_allclose(single.predict_preprocessed(x), x * w1[:, None, None, None], atol=1e-5)
    assert single.output_kind == "logits"
    ens = Predictor(_plan((1, 1, 1)), _pointwise, [{"w": jnp.asarray(w1)}, {"w": jnp.asarray(w2)}])
    assert ens.output_kind == "probs"

    def softmax(z):
        e = np.exp(z - z.max(0))
        return e / e.sum(0)

    want = (softmax(x * w1[:, None, None, None]) + softmax(x * w2[:, None, None, None])) / 2
    np.testing.assert_allclose(ens.predict_preprocessed(x), want, atol=1e-5)


def _ramp(variables, x):
    """x · w plus a ramp along the window's first axis: not flip invariant, so TTA changes it."""
    roi = x.shape[1]
    ramp = jnp.arange(roi, dtype=jnp.float32) / (roi - 1)
    return x[..., :1] * variables["w"] + ramp[None, :, None, None, None]


def test_tta_averages_flips():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 16, 16, 16)).astype(np.float32)  # one window: volume = patch
    w = np.array([1.0, -1.0, 0.5], np.float32)
    base = x * w[:, None, None, None]
    ramp = (np.arange(16) / 15.0)[None, :, None, None]
    plain = Predictor(_plan((1, 1, 1)), _ramp, [{"w": jnp.asarray(w)}])
    np.testing.assert_allclose(plain.predict_preprocessed(x), base + ramp, atol=1e-5)
    tta = Predictor(_plan((1, 1, 1)), _ramp, [{"w": jnp.asarray(w)}], tta=True)
    # half of the 8 flips reverse the first axis: the ramp averages to 0.5 everywhere
    np.testing.assert_allclose(tta.predict_preprocessed(x), base + 0.5, atol=1e-5)


def test_2d_plan_runs_slice_by_slice():
    x = np.random.default_rng(2).normal(size=(1, 5, 20, 18)).astype(np.float32)
    w = np.array([1.0, 2.0, -1.0], np.float32)
    p = Predictor(_plan((1, 1), patch=(16, 16), dim=2), _pointwise, [{"w": jnp.asarray(w)}], tta=True)
    np.testing.assert_allclose(p.predict_preprocessed(x), x * w[:, None, None, None], atol=1e-5)


def test_regions_to_labels_and_brats_export():
    p = np.zeros((3, 1, 1, 5), np.float32)
    p[0, ..., 1:] = 0.9  # WT
    p[1, ..., 2:] = 0.8  # TC
    p[2, ..., 3] = 0.7  # ET
    np.testing.assert_array_equal(regions_to_labels(p)[0, 0], [0, 2, 1, 3, 1])
    np.testing.assert_array_equal(regions_to_labels(p, et_label=4)[0, 0], [0, 2, 1, 4, 1])
    # region export: outside the crop box nothing is predicted, inside the thresholds hold
    meta = CaseMeta(crop_box=[[1, 2], [0, 1], [0, 5]], original_shape=(3, 1, 5), cropped_shape=(1, 1, 5),
                    resampled_shape=(1, 1, 5), source_spacing=(1, 1, 1), target_spacing=(1, 1, 1),
                    affine=np.eye(4), padding=np.zeros((3, 2)))
    out = to_source_labels(p, meta, "probs", brats=True)
    np.testing.assert_array_equal(out[1, 0], [0, 2, 1, 3, 1])
    assert not out[0].any() and not out[2].any()


def test_find_inputs_errors(tmp_path):
    assert find_inputs(["", " "]) == ([], [])  # a trailing comma in --data a,b,
    with pytest.raises(FileNotFoundError, match="nothing.nii.gz"):
        find_inputs([tmp_path / "nothing.nii.gz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        find_inputs([tmp_path / "empty"])


def test_predict_preprocessed_folder(tmp_path):
    """A preprocessed test folder (x + meta) → NIfTI with the source geometry and header, + probabilities."""
    img_path, _, lab_xyz, affine = _write_case(tmp_path / "raw", "case_7", (20, 18, 8), (1.0, 1.0, 3.0), 0)
    case = load_case(img_path)
    x, _, meta = preprocess_case(case.image, None, case.spacing, target_spacing=(1, 1, 1),
                                 patch_size=(16, 16, 16), normalization="CT", ct_stats=[0, K, 0, 1],
                                 mode="training", affine=case.affine)
    pre = tmp_path / "pre"
    pre.mkdir()
    np.save(pre / "case_7_x.npy", x)
    meta.save(pre / "case_7_meta.npy")
    predictor = Predictor(_plan((1.0, 1.0, 1.0)), _one_hot_of_input, [{"scale": jnp.float32(1.0)}])
    written = predict_inputs(predictor, [pre], tmp_path / "out", save_preds=True, raw=tmp_path / "raw",
                             log=lambda s: None)
    assert sorted(p.name for p in written) == ["case_7.nii.gz", "case_7.npy"]
    out = nib.load(str(tmp_path / "out" / "case_7.nii.gz"))
    np.testing.assert_array_equal(np.asarray(out.dataobj), lab_xyz)
    np.testing.assert_allclose(out.affine, affine)
    probs = np.load(tmp_path / "out" / "case_7.npy")
    assert probs.shape == (K, 8, 18, 20) and probs.dtype == np.float32


# ------------------------------------------------------------------------------ predict.py end to end


def _write_run(results: Path, plan: dict, **overrides) -> None:
    """A training results dir as train.py leaves it: config.json and an Orbax `best` checkpoint."""
    from nnunet_jax import checkpoints as ckpt_lib
    from nnunet_jax import parallel
    from nnunet_jax.checkpoints import CONFIG_FILE
    from nnunet_jax.configs.default import get_config
    from nnunet_jax.models.build import build_model
    from nnunet_jax.plan import Plan
    from nnunet_jax.training import optim
    from nnunet_jax.training import step as step_lib

    config = get_config()
    config.filters = (4, 8, 16)
    config.update(overrides)
    model = build_model(config, Plan.from_dict(plan))
    target = step_lib.abstract_state(model, optim.make_optimizer(config),
                                     Plan.from_dict(plan).input_shape, parallel.make_mesh())
    # Random weights without compiling the initialiser (slow on a loaded CPU): only structure matters here.
    rng = np.random.default_rng(sum(map(ord, results.name)))
    state = jax.tree.map(lambda s: jax.device_put(
        (0.3 * rng.standard_normal(s.shape)).astype(s.dtype) if np.issubdtype(s.dtype, np.floating)
        else np.zeros(s.shape, s.dtype), s.sharding), target)
    ckpts = ckpt_lib.Checkpoints(results)
    ckpts.save("best", 1, state, {"identity": {"task": "99"}, "epoch": 1, "step": 1})
    ckpts.close()
    (results / CONFIG_FILE).write_text(json.dumps({"config": json.loads(config.to_json()), "plan": plan}))


def test_checkpoint_predictor_takes_the_runs_window_settings(tmp_path):
    """overlap, blend and windows per call default to the training run's config.json; given ones win."""
    from nnunet_jax import parallel
    from nnunet_jax.inference.predictor import Predictor

    plan = _plan((1.0, 1.0, 1.0))
    _write_run(tmp_path / "run", plan, overlap=0.25, blend="constant", val_batch_size=3)
    ours = Predictor.from_checkpoints(tmp_path / "run")
    n_dev = parallel.local_mesh().devices.size
    assert (ours.overlap, ours.blend) == (0.25, "constant")
    assert ours.batch_size == -(-3 // n_dev) * n_dev  # rounded up to the local devices
    given = Predictor.from_checkpoints(tmp_path / "run", overlap=0.6, blend="gaussian", batch_size=1)
    assert (given.overlap, given.blend, given.batch_size) == (0.6, "gaussian", n_dev)
    assert given.plan.patch_size == (16, 16, 16)  # the plan recorded by the run


@pytest.mark.slow
def test_predict_cli_checkpoint_ensemble(tmp_path):
    """predict.py with two checkpoints (ensemble) + TTA on raw NIfTI: source shape, affine, header."""
    plan = _plan((1.0, 1.0, 1.0))
    for fold in (0, 1):
        _write_run(tmp_path / f"fold{fold}", plan)
    img_path, _, lab_xyz, affine = _write_case(tmp_path / "raw", "c", (18, 17, 6), (1.0, 1.0, 3.0), 0)
    (tmp_path / "raw" / "c_label.nii.gz").unlink()
    cmd = [sys.executable, str(ROOT / "predict.py"), "--data", str(img_path),
           "--results", str(tmp_path / "out"), "--ckpt_path", f"{tmp_path / 'fold0'},{tmp_path / 'fold1'}",
           "--tta", "--save_preds", "--val_batch_size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = nib.load(str(tmp_path / "out" / "c.nii.gz"))
    assert out.shape == lab_xyz.shape
    np.testing.assert_allclose(out.affine, affine)
    assert out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= set(range(K))
    probs = np.load(tmp_path / "out" / "c.npy")
    assert probs.shape == (K, 6, 17, 18)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    # a missing checkpoint is a clear error, not a traceback
    bad = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--data", str(img_path), "--ckpt_path",
                          str(tmp_path / "nope")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "nope" in bad.stderr

"""nnU-Net v2 trained models run by us against nnU-Net v2's own predictor, end to end.

For each tiny dataset of tests/parity/nnv2_data.py (planned and preprocessed by v2 itself), a results
folder is written as v2's training leaves it (v2's own network code, random weights, 1 or 2 folds), then
predicted by ``nnUNetPredictor`` (CPU, step 0.5, Gaussian, mirroring over the checkpoint's axes, all folds)
and by our ``V2Predictor`` (which reads the ``.pth`` without torch). Inputs: the training images plus, in
3D, one larger case that needs several overlapping tiles. Checked per case: label maps equal on >= 99.9 %
of voxels, the probabilities (``--save_probabilities``) within 1e-4 on >= 99 % of voxels (both sides hold
fp16 logits: a one-step fp16 rounding difference moves a probability by ~1e-3), the written geometry equal
to the source's. Our fp32-accumulation mode is reported beside it (v2 rounds its tile sums to fp16).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from nnunet_jax.interop.nnunetv2.predictor import V2Predictor

from . import nnv2_data as nd

pytestmark = pytest.mark.parity

# (dataset, configuration, residual encoder, folds, mirroring axes in the checkpoint; "default": v2's own)
RUNS = [("ct", "3d_fullres", False, (0, 1), "default"), ("ct", "2d", False, (0,), "default"),
        ("mri", "3d_fullres", True, (0,), (0,)), ("2d", "2d", True, (0, 1), "default"),
        ("regions", "3d_fullres", False, (0,), None)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return nd.prepared(tmp_path_factory)


def _v2_predict(model_dir, inputs, out, folds):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                        perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                        verbose_preprocessing=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(model_dir), use_folds=folds,
                                           checkpoint_name="checkpoint_final.pth")
    p.predict_from_files_sequential(str(inputs), str(out), save_probabilities=True, overwrite=True)


_V2_RUNS: dict = {}


def v2_run(root, tmp_path_factory, kind, config, resenc, folds, mirror):
    """The model folder, its inputs and nnU-Net v2's predictions of them (once per session and run)."""
    key = (kind, config, resenc, folds, mirror)
    if key not in _V2_RUNS:
        work = tmp_path_factory.mktemp(f"v2run_{kind}_{config}")
        model_dir = nd.save_model(root, kind, config, folds=folds, resenc=resenc, mirror_axes=mirror)
        inputs = nd.write_test_cases(root, kind, work / "in", big=(kind, config) in (("ct", "3d_fullres"),
                                                                                    ("mri", "3d_fullres")))
        t0 = time.perf_counter()
        _v2_predict(model_dir, inputs, work / "v2", folds)
        _V2_RUNS[key] = (model_dir, inputs, work / "v2", time.perf_counter() - t0)
    return _V2_RUNS[key]


def _read(path):
    if path.suffix == ".png":
        from PIL import Image

        return np.asarray(Image.open(path)), None
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


@pytest.mark.parametrize(("kind", "config", "resenc", "folds", "mirror"), RUNS)
def test_predict_equals_nnunetv2(root, tmp_path_factory, tmp_path, kind, config, resenc, folds, mirror):
    model_dir, inputs, v2_out, v2_s = v2_run(root, tmp_path_factory, kind, config, resenc, folds, mirror)
    t0 = time.perf_counter()
    ours = V2Predictor.from_model_folder(model_dir, folds)
    default = (0, 1, 2) if config == "3d_fullres" else (0, 1)
    assert ours.mirror_axes == (default if mirror == "default" else mirror)
    ours.predict_files([inputs], tmp_path / "ours", save_probabilities=True, log=None)
    print(f"{kind} {config}: v2 {v2_s:.1f} s, ours {time.perf_counter() - t0:.1f} s (compile included)")
    ending = ".png" if kind == "2d" else ".nii.gz"
    cases = sorted(p.name[: -len(ending)] for p in v2_out.glob(f"*{ending}"))
    assert len(cases) == len(list(inputs.glob(f"*_0000{ending}"))) >= 3
    heads = set()
    for case in cases:
        ref, ref_aff = _read(v2_out / f"{case}{ending}")
        got, got_aff = _read(tmp_path / "ours" / f"{case}{ending}")
        assert got.shape == ref.shape and got.dtype == ref.dtype, case
        agree = float((got == ref).mean())
        assert agree >= 0.999, f"{case}: labels agree on {agree:.5f}"
        src, src_aff = _read(next(inputs.glob(f"{case}_0000{ending}")))
        assert got.shape == src.shape[:got.ndim]
        if src_aff is not None:
            np.testing.assert_allclose(got_aff, src_aff, atol=1e-6)
            np.testing.assert_allclose(ref_aff, src_aff, atol=1e-6)
        p_ref = np.load(v2_out / f"{case}.npz")["probabilities"]
        p_got = np.load(tmp_path / "ours" / f"{case}.npz")["probabilities"]
        assert p_got.shape == p_ref.shape and p_got.dtype == p_ref.dtype
        # Both sides hold fp16 logits: where the two networks' fp32 outputs (equal within ~1e-6) round to
        # neighbouring fp16 values, a logit moves by one fp16 step (2**-7 at |logit| 8), i.e. |dp| ~ 1e-3.
        dp = np.abs(p_got - p_ref)
        close = float((dp <= 1e-4).mean())
        assert close >= 0.99 and dp.max() <= 0.02, f"{case}: |dp| <= 1e-4 on {close:.5f}, max {dp.max()}"
        heads |= set(np.unique(ref).tolist())
        print(f"{kind} {config} {case}: labels agree {agree:.6f}, |dp| <= 1e-4 on {close:.6f}, "
              f"max |dp| {dp.max():.2e}")
    # the random weights were scaled so that the outputs use every label: the comparison is not trivial
    assert len(heads) >= 3


def test_fp32_accumulation_beside_fp16(root, tmp_path_factory, tmp_path):
    """Our fp32 mode against v2 on the multi-tile CT case: close to v2, but v2's fp16 sums move some labels;
    the default fp16 mode is the one that equals v2."""
    model_dir, inputs, v2_out, _ = v2_run(root, tmp_path_factory, *RUNS[0])
    ref, _ = _read(v2_out / "big.nii.gz")
    agree = {}
    for mode in ("float16", "float32"):
        V2Predictor.from_model_folder(model_dir, RUNS[0][3], accumulate=mode).predict_files(
            [inputs / "big_0000.nii.gz"], tmp_path / mode, log=None)
        got, _ = _read(tmp_path / mode / "big.nii.gz")
        agree[mode] = float((got == ref).mean())
    print(f"labels equal to v2: fp16 accumulation {agree['float16']:.6f}, fp32 {agree['float32']:.6f}")
    assert agree["float16"] >= 0.999
    assert agree["float32"] >= 0.99
    assert agree["float16"] >= agree["float32"]


def test_v2_gaussian_and_steps_equal_v2():
    import torch
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian,
        compute_steps_for_sliding_window,
    )

    from nnunet_jax.inference.sliding_window import v2_gaussian, v2_window_starts

    for patch in [(44, 56, 56), (20, 32, 28), (64, 80)]:
        ref = compute_gaussian(patch, sigma_scale=1 / 8, value_scaling_factor=10, dtype=torch.float16,
                               device=torch.device("cpu")).numpy()
        np.testing.assert_array_equal(v2_gaussian(patch), ref)
    for image, patch in [((100, 57, 200), (44, 56, 56)), ((45, 45, 46), (44, 44, 45)), ((64, 81), (64, 80))]:
        steps = compute_steps_for_sliding_window(image, patch, 0.5)
        starts = v2_window_starts(image, patch, 0.5)
        for axis, s in enumerate(steps):
            assert sorted(set(starts[:, axis].tolist())) == s
        assert len(starts) == int(np.prod([len(s) for s in steps]))

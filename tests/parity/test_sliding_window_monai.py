"""Sliding window and TTA vs MONAI's ``sliding_window_inference`` with the same predictor in torch and JAX.

The predictor is a zero-padded 3x3(x3) convolution plus a term that depends on the position inside the window,
so every window sees a different function and the blend weights decide the result.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax import lax
from monai.inferers import sliding_window_inference as monai_swi

from nnunet_jax.inference import sliding_window_inference

C_IN, K_OUT = 2, 3


def _predictors(ndim: int, roi: tuple[int, ...], seed: int = 0):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(K_OUT, C_IN) + (3,) * ndim).astype(np.float32)  # torch OI(D)HW
    pos_gain = rng.normal(size=K_OUT).astype(np.float32)
    grids = np.meshgrid(*[np.arange(r) / r for r in roi], indexing="ij")
    pos = sum(grids).astype(np.float32)  # (*roi)

    def torch_fn(x):  # (B, C, *roi)
        conv = F.conv3d if ndim == 3 else F.conv2d
        y = conv(x, torch.from_numpy(kernel), padding=1)
        return y + torch.from_numpy(pos)[None, None] * torch.from_numpy(pos_gain)[None, :, *([None] * ndim)]

    kernel_jax = jnp.asarray(np.moveaxis(kernel, (0, 1), (-1, -2)))  # (*k, I, O)
    spec = ("NDHWC", "DHWIO", "NDHWC") if ndim == 3 else ("NHWC", "HWIO", "NHWC")

    def jax_fn(params, x):  # (B, *roi, C)
        y = lax.conv_general_dilated(x, params["k"], (1,) * ndim, [(1, 1)] * ndim, dimension_numbers=spec)
        return y + params["pos"][None, ..., None] * params["gain"]

    params = {"k": kernel_jax, "pos": jnp.asarray(pos), "gain": jnp.asarray(pos_gain)}
    return torch_fn, jax_fn, params


def _monai(volume: np.ndarray, torch_fn, roi, overlap, mode, batch_size=3) -> np.ndarray:
    x = torch.from_numpy(np.moveaxis(volume, -1, 0)[None].copy())
    with torch.no_grad():
        y = monai_swi(x, roi, batch_size, torch_fn, overlap=overlap, mode=mode, sigma_scale=0.125)
    return np.moveaxis(y[0].numpy(), 0, -1)


CASES = [
    ((20, 13, 11), (8, 8, 8)),  # non-divisible
    ((5, 19, 12), (8, 8, 8)),  # smaller than the window in one axis (odd padding)
    ((37, 22), (16, 16)),
    ((11, 30), (16, 12)),
]

# One apply function object per (ndim, roi) so repeated calls reuse the compiled executable.
_FNS = {}


def _fns(ndim, roi):
    if (ndim, roi) not in _FNS:
        _FNS[(ndim, roi)] = _predictors(ndim, roi)
    return _FNS[(ndim, roi)]


@pytest.mark.parametrize("shape,roi", CASES)
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_matches_monai(shape, roi, mode, overlap):
    torch_fn, jax_fn, params = _fns(len(roi), roi)
    volume = np.random.default_rng(1).normal(size=shape + (C_IN,)).astype(np.float32)
    ref = _monai(volume, torch_fn, roi, overlap, mode)
    ours = np.asarray(
        sliding_window_inference(volume, jax_fn, params, roi, overlap=overlap, blend=mode, batch_size=3)
    )
    assert ours.shape == ref.shape == shape + (K_OUT,)
    assert np.max(np.abs(ours - ref)) <= 1e-5
    # the position term makes the blend matter: a wrong weight map would change the result
    assert np.std(ref) > 0.1


@pytest.mark.parametrize("shape,roi", [CASES[1], CASES[3]])
def test_tta_matches_flipped_monai(shape, roi):
    """TTA = mean over flips of flip(MONAI(flip(volume))) (the seed's whole-volume definition)."""
    torch_fn, jax_fn, params = _fns(len(roi), roi)
    volume = np.random.default_rng(2).normal(size=shape + (C_IN,)).astype(np.float32)
    ndim = len(roi)
    ref = np.zeros(shape + (K_OUT,), np.float32)
    n = 0
    for mask in range(2**ndim):
        axes = tuple(a for a in range(ndim) if mask >> a & 1)
        flipped = np.flip(volume, axes) if axes else volume
        out = _monai(np.ascontiguousarray(flipped), torch_fn, roi, 0.5, "gaussian")
        ref += np.flip(out, axes) if axes else out
        n += 1
    ref /= n
    ours = np.asarray(
        sliding_window_inference(volume, jax_fn, params, roi, overlap=0.5, tta=True, batch_size=3)
    )
    assert np.max(np.abs(ours - ref)) <= 1e-5

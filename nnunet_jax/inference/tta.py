"""Test-time augmentation by flips (docs/reference.md §8): the mean of the logits over the identity and every
combination of flips of the spatial axes (7 flips in 3D, 3 in 2D).

The seed flips the whole volume, runs the sliding window, and flips the logits back; with a sliding window the
window grid is not flip-symmetric, so this is not the same as flipping each window. ``sliding_window_inference
(..., tta=True)`` reproduces the whole-volume definition in a single traced loop (mirrored window positions);
:func:`flip_tta` is the plain definition for any ``predict`` function (whole-volume models, tests).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def flip_combinations(ndim: int) -> np.ndarray:
    """``(2**ndim, ndim)`` bool: which spatial axes each TTA pass flips; row 0 is the identity."""
    return np.array(list(itertools.product((False, True), repeat=ndim)), dtype=bool)


def flip_tta(predict: Callable[[jax.Array], jax.Array], volume: jax.Array) -> jax.Array:
    """``mean_f flip_f(predict(flip_f(volume)))`` for a channels-last volume ``(*spatial, C)``, fp32."""
    ndim = volume.ndim - 1
    total = None
    for flags in flip_combinations(ndim):
        axes = tuple(int(a) for a in np.flatnonzero(flags))
        out = predict(jnp.flip(volume, axes) if axes else volume).astype(jnp.float32)
        out = jnp.flip(out, axes) if axes else out
        total = out if total is None else total + out
    return total / (2**ndim)

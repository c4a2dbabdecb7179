"""The model's inference forward over a batch of windows: the one function the sliding window calls.

Training's validation and the predictor both build it here, so the two run the same program: inference mode
(deep-supervision heads dropped), fp32 logits whatever the compute dtype, the window batch split over the
local devices of ``mesh``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from nnunet_jax import parallel
from nnunet_jax.inference.sliding_window import ApplyFn, sliding_window_inference

__all__ = ["ApplyFn", "WindowedForward", "host_copy", "make_forward", "model_variables", "window_batch"]

def make_forward(model: Any, mesh: Mesh | None = None) -> ApplyFn:
    """``forward(variables, windows (B, *roi, C)) -> fp32 logits (B, *roi, K)``, windows split over ``mesh``.

    Not jitted itself: the sliding window jits it per window-shape bucket, and compiles once per function
    object (a static argument), so build it once per model and reuse it.
    """
    sharding = None if mesh is None else parallel.batch_sharding(mesh)

    def forward(variables: Any, x: jax.Array) -> jax.Array:
        if sharding is not None:
            x = jax.lax.with_sharding_constraint(x, sharding)
        out = model.apply(variables, x, train=False)
        return (out[0] if isinstance(out, tuple | list) else out).astype(jnp.float32)

    return forward


def window_batch(batch_size: int, mesh: Mesh) -> int:
    """Windows per model call: ``batch_size`` rounded up to a multiple of the mesh's devices."""
    n_dev = mesh.devices.size
    return max(1, math.ceil(batch_size / n_dev)) * n_dev


def model_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """The flax variables of a model: ``params`` and, for batch norm, ``batch_stats``."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def host_copy(tree: Any) -> Any:
    """NumPy copy of a (replicated) pytree, valid in multi-process runs (reads this process's replica)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a, tree)


@dataclass(frozen=True)
class WindowedForward:
    """A whole volume through the model: the jitted sliding window (Gaussian or constant blending, optional
    flip TTA) over :func:`make_forward`'s forward. Validation and the predictor both call this.

    Build once per model and reuse: ``forward`` is the sliding window's static argument (one compile per
    window-shape bucket and function object).
    """

    forward: ApplyFn
    roi_size: tuple[int, ...]
    overlap: float = 0.5
    blend: str = "gaussian"
    batch_size: int = 4
    tta: bool = False

    def __call__(self, variables: Any, volume: Any) -> jax.Array:
        """``volume`` (*spatial, C), channels last → fp32 logits (*spatial, K); a 2D net on a 3D volume runs
        slice by slice along Z (each slice its own 2D sliding window)."""
        run = partial(sliding_window_inference, apply_fn=self.forward, params=variables,
                      roi_size=tuple(int(r) for r in self.roi_size), overlap=float(self.overlap),
                      blend=str(self.blend), batch_size=int(self.batch_size), tta=bool(self.tta))
        if len(self.roi_size) == volume.ndim - 2:
            return jnp.stack([run(volume[z]) for z in range(volume.shape[0])])
        return run(volume)

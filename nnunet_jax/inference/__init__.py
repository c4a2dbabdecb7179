"""Inference: the jitted sliding window with Gaussian/constant blending and flip TTA (docs/reference.md
§8)."""

from nnunet_jax.inference.sliding_window import (
    blend_weights,
    bucket_length,
    common_frame_shape,
    compile_cache_size,
    frame_length,
    scan_intervals,
    sliding_window_inference,
    window_starts,
)
from nnunet_jax.inference.tta import flip_combinations, flip_tta

__all__ = [
    "blend_weights",
    "bucket_length",
    "common_frame_shape",
    "compile_cache_size",
    "frame_length",
    "flip_combinations",
    "flip_tta",
    "scan_intervals",
    "sliding_window_inference",
    "window_starts",
]

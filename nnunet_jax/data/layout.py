"""The one place where the on-disk layout (C, *spatial) meets the model layout (*spatial, C).

Everything that changes the axis order — numpy/jax helpers here and the DALI pipelines (which take their
permutation from :func:`channels_last_perm`) — goes through this module, so the convention lives once.
Both helpers accept a single case ``(C, *spatial)`` or a batch ``(N, C, *spatial)``; ``spatial_dims`` (2 or 3)
says which, since a 2D batch and a 3D case have the same rank.
"""

from __future__ import annotations

from typing import Any


def channels_last_perm(ndim: int, batched: bool = False) -> list[int]:
    """Axis permutation taking ``([N,] C, *spatial)`` to ``([N,] *spatial, C)``."""
    lead = 1 if batched else 0
    if ndim < lead + 2:
        raise ValueError(f"need at least {lead + 2} axes (batch={batched}), got {ndim}")
    return list(range(lead)) + list(range(lead + 1, ndim)) + [lead]


def channels_first_perm(ndim: int, batched: bool = False) -> list[int]:
    """Axis permutation taking ``([N,] *spatial, C)`` to ``([N,] C, *spatial)``."""
    lead = 1 if batched else 0
    if ndim < lead + 2:
        raise ValueError(f"need at least {lead + 2} axes (batch={batched}), got {ndim}")
    return list(range(lead)) + [ndim - 1] + list(range(lead, ndim - 1))


def _is_batched(ndim: int, spatial_dims: int | None) -> bool:
    if spatial_dims is None:  # unambiguous only when the rank says so: 3D case (4 axes) or 3D batch (5)
        spatial_dims = 3 if ndim >= 4 else 2
    if ndim not in (spatial_dims + 1, spatial_dims + 2):
        raise ValueError(f"an array with {ndim} axes is neither a {spatial_dims}D case nor a batch of them")
    return ndim == spatial_dims + 2


def to_channels_last(x: Any, spatial_dims: int | None = None) -> Any:
    """``(C, *spatial)`` → ``(*spatial, C)``, or ``(N, C, *spatial)`` → ``(N, *spatial, C)`` (numpy or jax).

    Without ``spatial_dims`` a 4-axis array is taken as one 3D case and a 5-axis array as a 3D batch;
    pass ``spatial_dims=2`` for 2D data.
    """
    return x.transpose(channels_last_perm(x.ndim, _is_batched(x.ndim, spatial_dims)))


def to_channels_first(x: Any, spatial_dims: int | None = None) -> Any:
    """Inverse of :func:`to_channels_last`."""
    return x.transpose(channels_first_perm(x.ndim, _is_batched(x.ndim, spatial_dims)))

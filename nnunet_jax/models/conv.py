"""The U-Net's convolution with a CPU-friendly weight gradient (a ``jax.custom_vjp``), behind one switch.

Why: XLA:CPU hands the weight gradient of a convolution to oneDNN as a *forward* convolution whose kernel is
the whole output gradient (64³ for a 64³ feature map) and whose input channels are the batch (2): oneDNN's
forward kernels run that at a fraction of their speed (a 32→32 conv at 64³, batch 2, on 2 cores: forward
~135 ms, input gradient ~130 ms, weight gradient ~880 ms). Here the weight gradient is a sum of matrix
products, computed in a loop over blocks of voxels so that each block's im2col stays in cache (~240 ms for
that conv).
The input gradient of a *strided* convolution is worse still: XLA makes it a base-dilated convolution, which
oneDNN does not take at all (~1 GFLOP/s); here it is one stride-1 convolution and a depth-to-space.

The formulation. Pad the input as the convolution does; a stride ``s`` becomes stride 1 by space-to-depth
(tap ``t`` of an axis = phase ``t % s`` at offset ``t // s``), so only stride-1 correlations remain. Lay the
padded input and the output gradient (zero-padded to the same grid) out as rows of one flat index; then tap
``o`` of the kernel is a constant row shift and ``dW[o] = sum_r x[r + o]^T g[r]``. Split each tap into a shift
of the input rows and a shift of the gradient rows (``o = ox + og``), build both small im2cols per block of
rows, and one matrix product per block gives all taps. Only the summation order differs from ``lax``'s, so
the gradient equals it up to float rounding. The forward pass and the input gradient are ``lax``'s own.

The switch: :func:`conv_general_dilated` is ``lax.conv_general_dilated`` itself (so the program is exactly the
one without this module) unless JAX's default backend is the CPU and ``NNUNET_JAX_CPU_CONV`` is not ``xla``.
It is read when the model is traced, so a GPU or TPU program never sees the custom gradient.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SWITCH_ENV = "NNUNET_JAX_CPU_CONV"  # "xla" turns the custom weight gradient off on the CPU
BLOCK_ROWS = 2048  # voxels per block of the weight-gradient loop (1024-4096 measured equally fast at 64³)


def fast_cpu_conv_enabled() -> bool:
    """Whether convolutions traced now use the custom weight gradient (CPU backend and the switch not off)."""
    return jax.default_backend() == "cpu" and os.environ.get(SWITCH_ENV, "").lower() != "xla"


def conv_general_dilated_fn() -> Callable:
    """The convolution for ``flax.linen.Conv(conv_general_dilated=...)``: ours on the CPU, else ``lax``'s."""
    return conv_general_dilated if fast_cpu_conv_enabled() else lax.conv_general_dilated


def _is_channels_last(dimension_numbers, ndim: int) -> bool:
    if dimension_numbers is None:
        return False
    spatial = tuple(range(1, ndim - 1))
    dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    return (dn.lhs_spec == (0, ndim - 1, *spatial) and dn.out_spec == dn.lhs_spec
            and dn.rhs_spec == (ndim - 1, ndim - 2, *range(ndim - 2)))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None) -> jax.Array:
    """``lax.conv_general_dilated`` with our gradients for 3D channels-last, undilated, ungrouped
    convolutions (flax's ``nn.Conv`` layout); anything else is ``lax``'s convolution unchanged. 2D stays on
    XLA's gradients: at 192², batch 4, they were as fast or faster (the slow paths above are 3D ones)."""
    nd = lhs.ndim - 2
    plain = partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                    lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                    precision=precision, preferred_element_type=preferred_element_type)
    undilated = all(d == 1 for d in (*(lhs_dilation or (1,) * nd), *(rhs_dilation or (1,) * nd)))
    simple = (nd == 3 and undilated and feature_group_count == 1 and batch_group_count == 1
              and preferred_element_type is None and _is_channels_last(dimension_numbers, lhs.ndim))
    if not simple:
        return plain(lhs, rhs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads, dimension_numbers, precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, dimension_numbers, precision):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dimension_numbers,
                                    precision=precision)


def _conv_fwd(x, w, strides, pads, dimension_numbers, precision):
    return _conv(x, w, strides, pads, dimension_numbers, precision), (x, w)


def _conv_bwd(strides, pads, dimension_numbers, precision, res, g):
    x, w = res

    def plain(x_, w_):
        return lax.conv_general_dilated(x_, w_, strides, pads, dimension_numbers=dimension_numbers,
                                        precision=precision)

    if all(s == 1 for s in strides):
        dx = jax.vjp(lambda x_: plain(x_, w), x)[1](g)[0]
        dw = weight_gradient(x, g, w.shape[:-2], strides, pads).astype(w.dtype)
    else:  # XLA's weight gradient of a strided conv is as fast as ours (fp32) or faster (bf16): keep it
        dx = strided_input_gradient(g, w, x.shape, strides, pads, precision).astype(x.dtype)
        dw = jax.vjp(lambda w_: plain(x, w_), w)[1](g)[0]
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def strided_input_gradient(g: jax.Array, w: jax.Array, x_shape: Sequence[int], strides: Sequence[int],
                           pads: Sequence[tuple[int, int]], precision=None) -> jax.Array:
    """d(loss)/d(input) of a strided channels-last convolution: one stride-1 convolution + depth-to-space.

    Padded-input position ``i = s*m + p`` (phase ``p``) receives ``sum_d g[m - d] w[s*d + p]``: for each phase
    a stride-1 correlation of ``g`` with the flipped taps ``w[p], w[p + s], ..``, so all phases together are
    one forward convolution with ``prod(s) * C`` output channels (taps past the kernel are zero). XLA's own
    input gradient is a base-dilated convolution that oneDNN does not take (~1 GFLOP/s on this CPU).
    """
    nd = g.ndim - 2
    kernel, cin, cout = w.shape[:-2], w.shape[-2], w.shape[-1]
    strides = tuple(int(s) for s in strides)
    offs = [(k - 1) // s for k, s in zip(kernel, strides, strict=True)]
    padded = [int(n) + lo + hi for n, (lo, hi) in zip(x_shape[1:-1], pads, strict=True)]
    grid = [-(-n // s) for n, s in zip(padded, strides, strict=True)]  # positions m per axis
    # Kernel (D+1, .., O, s1, .., C): tap d' of phase p is w[s * (D - d') + p] (zero past the kernel).
    tail = [(0, (o + 1) * s - k) for o, s, k in zip(offs, strides, kernel, strict=True)]
    wk = jnp.pad(w, tail + [(0, 0)] * 2)
    wk = wk.reshape([d for o, s in zip(offs, strides, strict=True) for d in (o + 1, s)] + [cin, cout])
    wk = jnp.flip(wk, axis=tuple(2 * i for i in range(nd)))
    perm = [2 * i for i in range(nd)] + [2 * nd + 1] + [2 * i + 1 for i in range(nd)] + [2 * nd]
    phases = int(np.prod(strides))
    wk = wk.transpose(perm).reshape(*[o + 1 for o in offs], cout, phases * cin)
    g_pads = [(o, m - n) for o, m, n in zip(offs, grid, g.shape[1:-1], strict=True)]
    dn = lax.conv_dimension_numbers(g.shape, wk.shape, _channels_last_spec(nd))
    out = lax.conv_general_dilated(g, wk.astype(g.dtype), (1,) * nd, g_pads, dimension_numbers=dn,
                                   precision=precision)  # (N, *grid, phases * C)
    # Depth-to-space, then drop the padding of the forward convolution.
    out = out.reshape(g.shape[0], *grid, *strides, cin)
    perm = [0] + [a for i in range(nd) for a in (1 + i, 1 + nd + i)] + [1 + 2 * nd]
    out = out.transpose(perm).reshape(g.shape[0], *[m * s for m, s in zip(grid, strides, strict=True)], cin)
    keep = tuple(slice(lo, lo + int(n)) for (lo, _), n in zip(pads, x_shape[1:-1], strict=True))
    return out[(slice(None), *keep, slice(None))]


def _channels_last_spec(nd: int) -> tuple[str, str, str]:
    sp = "DHW"[3 - nd:] if nd <= 3 else None
    if sp is None:
        raise ValueError(f"{nd}D convolutions are not supported")
    return f"N{sp}C", f"{sp}IO", f"N{sp}C"


def weight_gradient(x: jax.Array, g: jax.Array, kernel: Sequence[int], strides: Sequence[int],
                    pads: Sequence[tuple[int, int]], block_rows: int = BLOCK_ROWS) -> jax.Array:
    """d(loss)/d(kernel) of a channels-last convolution: ``x (N, *S, C)``, ``g (N, *S_out, O)`` →
    ``(*kernel, C, O)`` in float32 (bf16 inputs are multiplied in bf16 and summed in float32)."""
    nd = x.ndim - 2
    kernel, strides = tuple(int(k) for k in kernel), tuple(int(s) for s in strides)
    out_sp = g.shape[1:-1]
    cin = x.shape[-1]
    # Pad as the convolution does, then to a whole number of stride-blocks covering every tap.
    offs = [(k - 1) // s for k, s in zip(kernel, strides, strict=True)]  # largest offset per axis after s2d
    grid = [o + n for o, n in zip(offs, out_sp, strict=True)]  # s2d grid length per axis
    widths = [(0, 0)]
    for i in range(nd):
        lo, hi = pads[i]
        size = x.shape[1 + i] + lo + hi
        need = grid[i] * strides[i]
        widths.append((lo, hi + need - size) if need >= size else (lo, hi))
    widths.append((0, 0))
    xp = jnp.pad(x, [(max(lo, 0), max(hi, 0)) for lo, hi in widths])
    crop = tuple(slice(max(-lo, 0), xp.shape[a] - max(-hi, 0)) for a, (lo, hi) in enumerate(widths))
    xp = xp[crop]
    xp = xp[(slice(None),) + tuple(slice(0, grid[i] * strides[i]) for i in range(nd)) + (slice(None),)]
    # Space-to-depth: (N, Q1, s1, Q2, s2, .., C) -> (N, Q1, Q2, .., s1, s2, .., C) -> channels (phases, C).
    split = [x.shape[0]] + [d for i in range(nd) for d in (grid[i], strides[i])] + [cin]
    xs = xp.reshape(split)
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [1 + 2 * nd]
    phases = int(np.prod(strides))
    xs = xs.transpose(perm).reshape(x.shape[0], *grid, phases * cin)
    taps = tuple(o + 1 for o in offs)  # s2d kernel extent per axis
    dws = _stride1_weight_gradient(xs, g, taps, block_rows)  # (*taps, phases * C, O)
    # Back from (offset, phase) to taps t = offset * s + phase, dropping combinations past the kernel.
    dws = dws.reshape(*taps, *strides, cin, g.shape[-1])
    perm = [a for i in range(nd) for a in (i, nd + i)] + [2 * nd, 2 * nd + 1]
    dws = dws.transpose(perm).reshape(*[t * s for t, s in zip(taps, strides, strict=True)], cin, g.shape[-1])
    return dws[tuple(slice(0, k) for k in kernel)]


def _stride1_weight_gradient(x: jax.Array, g: jax.Array, taps: Sequence[int], block_rows: int) -> jax.Array:
    """``dW[t] = sum_p x[p + t]^T g[p]`` for ``x (N, *Q, C)``, ``g (N, *S, O)``, ``Q = S + taps - 1``."""
    nd, cin, cout = x.ndim - 2, x.shape[-1], g.shape[-1]
    acc_dtype = jnp.float32
    if all(t == 1 for t in taps):  # a 1x1 kernel: one matrix product
        dw = jnp.einsum("rc,ro->co", x.reshape(-1, cin), g.reshape(-1, cout),
                        preferred_element_type=acc_dtype)
        return dw.reshape(*taps, cin, cout)
    grid = x.shape[1:-1]
    row_stride = [int(np.prod(grid[i + 1:])) for i in range(nd)]
    # Taps of the leading `cut` axes shift the input rows, the others the gradient rows: pick the cut with
    # the smallest im2col per row.
    cut = min(range(nd + 1), key=lambda c: math.prod(taps[:c]) * cin + math.prod(taps[c:]) * cout)
    ox = [sum(t * row_stride[i] for i, t in enumerate(ts)) for ts in np.ndindex(*taps[:cut])]
    og = [sum(t * row_stride[cut + i] for i, t in enumerate(ts)) for ts in np.ndindex(*taps[cut:])]
    ox_max, og_max = max(ox), max(og)
    pad_g = [(0, 0)] + [(0, q - s) for q, s in zip(grid, g.shape[1:-1], strict=True)] + [(0, 0)]
    gf = jnp.pad(g, pad_g).reshape(-1, cout)
    xf = x.reshape(-1, cin)
    rows = gf.shape[0]  # rows r' = r + og span [0, rows); r' + ox stays inside one sample's grid
    block = min(block_rows, rows)
    n_blocks = -(-rows // block)
    total = n_blocks * block
    gf = jnp.pad(gf, ((og_max, total - rows), (0, 0)))  # row r' of the block reads gf[r' - og]
    xf = jnp.pad(xf, ((0, total + ox_max - rows), (0, 0)))

    def body(j: jax.Array, acc: jax.Array) -> jax.Array:
        xb = lax.dynamic_slice_in_dim(xf, j * block, block + ox_max)
        gb = lax.dynamic_slice_in_dim(gf, j * block, block + og_max)
        x_cols = jnp.concatenate([xb[o:o + block] for o in ox], axis=1)
        g_cols = jnp.concatenate([gb[og_max - o:og_max - o + block] for o in og], axis=1)
        return acc + jnp.einsum("rc,ro->co", x_cols, g_cols, preferred_element_type=acc_dtype)

    acc = lax.fori_loop(0, n_blocks, body, jnp.zeros((len(ox) * cin, len(og) * cout), acc_dtype))
    # (taps[:cut], C, taps[cut:], O) -> (*taps, C, O)
    acc = acc.reshape(*taps[:cut], cin, *taps[cut:], cout)
    perm = list(range(cut)) + [cut + 1 + i for i in range(nd - cut)] + [cut, nd + 1]
    return acc.transpose(perm)

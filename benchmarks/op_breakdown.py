"""Where a U-Net train step's time goes per op family, timing each layer of the net as its own jitted piece.

Why isolated pieces and not a profiler trace: XLA:CPU fuses across layers and runs the oneDNN custom calls in
its own thunks, so a trace names fusions, not layers; timing every distinct layer shape (forward, input
gradient and weight gradient of each conv separately) and multiplying by how often it occurs gives a table a
reader can act on, and its total is checked against the real step (the remainder is what fusion saves or the
pieces miss: optimizer update, concatenations, copies).

The layer list follows :class:`nnunet_jax.models.unet.UNet` (plain blocks, instance norm, no deep
supervision).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nnunet_jax.losses import make_loss
from nnunet_jax.models import conv as conv_lib
from nnunet_jax.models.unet import INSTANCE_NORM_EPS, UpConv, same_padding


@dataclass(frozen=True)
class ConvShape:
    res: tuple[int, ...]  # input spatial shape
    cin: int
    cout: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def out_res(self) -> tuple[int, ...]:
        return tuple(r // s for r, s in zip(self.res, self.stride, strict=True))

    def flops(self, batch: int) -> float:
        return 2.0 * batch * float(np.prod(self.out_res)) * float(np.prod(self.kernel)) * self.cin * self.cout


def layers(patch: Sequence[int], in_channels: int, n_class: int, kernels, strides, filters):
    """Counters of the conv, norm (res, channels), upconv (res, cin, cout, stride) shapes of one forward."""
    convs: Counter = Counter()
    norms: Counter = Counter()
    ups: Counter = Counter()
    res = [tuple(int(p) for p in patch)]
    for s in strides:
        res.append(tuple(r // int(v) for r, v in zip(res[-1], s, strict=True)))
    res = res[1:]  # res[l] = resolution after level l's first conv
    prev_res, prev_c = tuple(patch), in_channels
    ones = (1,) * len(patch)
    for lvl, (k, s, f) in enumerate(zip(kernels, strides, filters, strict=True)):
        k, s = tuple(k), tuple(s)
        convs[ConvShape(prev_res, prev_c, f, k, s)] += 1
        convs[ConvShape(res[lvl], f, f, k, ones)] += 1
        norms[(res[lvl], f)] += 2
        prev_res, prev_c = res[lvl], f
    for lvl in range(len(strides) - 2, -1, -1):
        k = tuple(kernels[lvl + 1])
        ups[(res[lvl + 1], filters[lvl + 1], filters[lvl], tuple(strides[lvl + 1]))] += 1
        convs[ConvShape(res[lvl], 2 * filters[lvl], filters[lvl], k, ones)] += 1
        convs[ConvShape(res[lvl], filters[lvl], filters[lvl], k, ones)] += 1
        norms[(res[lvl], filters[lvl])] += 2
    convs[ConvShape(res[0], filters[0], n_class, ones, ones)] += 1  # head
    return convs, norms, ups


def _time(fn: Callable, *args, repeats: int = 3) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _conv_times(c: ConvShape, batch: int, dtype, rng: np.random.Generator) -> dict[str, float]:
    x = jnp.asarray(rng.standard_normal((batch, *c.res, c.cin), np.float32), dtype)
    w = jnp.asarray(rng.standard_normal((*c.kernel, c.cin, c.cout), np.float32) * 0.05, dtype)
    g = jnp.asarray(rng.standard_normal((batch, *c.out_res, c.cout), np.float32), dtype)
    pads = same_padding(c.kernel, c.stride)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, _dn_spec(len(c.res)))

    def plain(x_, w_):
        return lax.conv_general_dilated(x_, w_, c.stride, pads, dimension_numbers=dn)

    dgrad = _time(lambda w_, g_: jax.vjp(lambda x_: plain(x_, w_), x)[1](g_)[0], w, g)
    out = {"conv fwd": _time(plain, x, w)}
    if any(s > 1 for s in c.stride):
        out["conv dgrad (xla)"] = dgrad
        out["conv dgrad (ours)"] = _time(
            lambda w_, g_: conv_lib.strided_input_gradient(g_, w_, x.shape, c.stride, pads), w, g)
    else:
        out["conv dgrad"] = dgrad
    wgrad = _time(lambda x_, g_: jax.vjp(lambda w_: plain(x_, w_), w)[1](g_)[0], x, g)
    if any(s > 1 for s in c.stride):  # models/conv.py keeps XLA's weight gradient for strided convs
        out["conv wgrad"] = wgrad
        return out
    out["conv wgrad (xla)"] = wgrad
    out["conv wgrad (ours)"] = _time(
        lambda x_, g_: conv_lib.weight_gradient(x_, g_, c.kernel, c.stride, pads), x, g)
    return out


def _dn_spec(nd: int) -> tuple[str, str, str]:
    sp = "DHW"[3 - nd:]
    return f"N{sp}C", f"{sp}IO", f"N{sp}C"


def _norm_act(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Instance norm (float32 statistics, as flax's) + leaky ReLU, the pair after every conv."""
    axes = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = xf.mean(axes, keepdims=True)
    var = ((xf - mean) ** 2).mean(axes, keepdims=True)
    y = ((xf - mean) * lax.rsqrt(var + INSTANCE_NORM_EPS) * scale + bias).astype(x.dtype)
    return jax.nn.leaky_relu(y, 0.01)


def _summed(module: UpConv, variables, x: jax.Array) -> jax.Array:
    return module.apply(variables, x).astype(jnp.float32).sum()


def breakdown(patch: Sequence[int], batch: int, in_channels: int, n_class: int, kernels, strides, filters,
              dtype=jnp.float32) -> list[tuple[str, float, float]]:
    """Rows ``(family, seconds per train step, GFLOP)`` summed over the net's layers."""
    rng = np.random.default_rng(0)
    convs, norms, ups = layers(patch, in_channels, n_class, kernels, strides, filters)
    total: Counter = Counter()
    flops: Counter = Counter()
    for c, n in convs.items():
        kind = "1x1 conv" if max(c.kernel) == 1 else "conv"
        kind = "strided conv" if any(s > 1 for s in c.stride) else kind
        times = _conv_times(c, batch, dtype if c.cout != n_class else jnp.float32, rng)
        is_input = c.cin == in_channels
        for name, t in times.items():
            if name.startswith("conv dgrad") and is_input:
                continue  # no gradient flows into the image
            family = name.replace("conv", kind)
            total[family] += n * t
            flops[family] += n * c.flops(batch) / 1e9
    for (res, ch), n in norms.items():
        x = jnp.asarray(rng.standard_normal((batch, *res, ch), np.float32), dtype)
        s, b = jnp.ones((ch,)), jnp.zeros((ch,))
        total["instance norm + lrelu fwd"] += n * _time(_norm_act, x, s, b)
        total["instance norm + lrelu bwd (incl. fwd)"] += n * _time(
            lambda x_, s_, b_: jax.vjp(lambda a: _norm_act(a, s_, b_), x_)[1](x_)[0], x, s, b)
    for (res, cin, cout, stride), n in ups.items():
        m = UpConv(cout, stride, dtype=dtype)
        x = jnp.asarray(rng.standard_normal((batch, *res, cin), np.float32), dtype)
        v = m.init(jax.random.PRNGKey(0), x)
        total["transposed conv fwd+bwd"] += n * _time(jax.grad(partial(_summed, m), (0, 1)), v, x)
    loss = make_loss()
    logits = jnp.asarray(rng.standard_normal((batch, *patch, n_class), np.float32))
    labels = jnp.asarray(rng.integers(0, n_class, (batch, *patch, 1)), jnp.uint8)
    total["loss fwd+bwd"] += _time(jax.grad(loss), logits, labels)
    return [(k, v, flops.get(k, 0.0)) for k, v in total.items()]


def format_breakdown(rows: list[tuple[str, float, float]], step_s: float | None, title: str) -> str:
    """The table; wgrad (xla) and wgrad (ours) are alternatives, so the sum counts the one in use."""
    in_use = "ours" if conv_lib.fast_cpu_conv_enabled() else "xla"
    other = "(xla)" if in_use == "ours" else "(ours)"
    lines = [title, f"{'op family':<42} {'s/step':>8} {'share':>6} {'GFLOP':>7} {'GFLOP/s':>8}"]
    used = sum(t for name, t, _ in rows if other not in name)
    for name, t, fl in rows:
        share = f"{100 * t / used:5.1f}%" if other not in name else "   alt"
        rate = f"{fl / t:8.1f}" if fl else f"{'':>8}"
        lines.append(f"{name:<42} {t:>8.3f} {share:>6} {fl:>7.1f} {rate}")
    lines.append(f"{'sum of pieces (wgrad ' + in_use + ')':<42} {used:>8.3f}")
    if step_s is not None:
        lines.append(f"{'measured train step':<42} {step_s:>8.3f}")
    return "\n".join(lines)

"""nnU-Net v2's networks, ``PlainConvUNet`` and ``ResidualEncoderUNet`` of ``dynamic_network_architectures``
("dna"), as Flax linen modules, channels-last, 2D or 3D (docs/nnunetv2.md §2).

Why not :class:`~nnunet_jax.models.unet.UNet`: that one follows MONAI's DynUNet, and v2's networks compute a
different function in details that a trained v2 checkpoint depends on: convs with a bias and padding
``(k - 1) // 2``; any number of convs per stage; a decoder stage with the kernel of its skip stage and a
1x1 head per decoder stage; ResEnc's stem and its BasicBlockD stages whose skip is AvgPool + 1x1 conv (no
bias) + norm. The transposed convs are ``UpConv`` (kernel = stride, one matmul), shared with ``UNet``.

Fields mirror dna's ``arch_kwargs`` (``nnunet_jax.interop.nnunetv2.network.network_from_plans`` translates
plans.json into them): like dna, ``features_per_stage``, ``n_conv_per_stage``, ... may be one int for every
stage, and a kernel or stride one int for every axis (the dimensionality is that of the input). The defaults
are those of v2's planners (instance norm with affine, eps 1e-5, LeakyReLU 0.01, conv bias).

Module names mirror dna's module paths (``stages_3`` for ``stages.3``), so that the state-dict mapping of
``interop.nnunetv2.network`` is structural. Deep-supervision heads are created at init whatever
``deep_supervision`` is, as dna builds them all: one set of variables serves training and inference.

Mixed precision as in ``UNet``: ``dtype`` is the compute dtype, ``param_dtype`` (float32) the storage dtype;
norm statistics are reduced in float32 and the heads run in float32, so the logits are float32.
Dropout (``dropout_op`` in the plans) is inactive in dna's eval mode and is not implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nnunet_jax.models.conv import conv_general_dilated_fn
from nnunet_jax.models.unet import INSTANCE_NORM_EPS, UpConv, conv_init

Dtype = Any
IntOrSeq = int | Sequence[int]

NORMS = ("instance", "batch", None)
NONLINS = ("leaky_relu", "relu", None)


@dataclass(frozen=True)
class LayerOps:
    """What follows each conv (dna's norm_op/nonlin with their kwargs), shared by every block of a network."""

    norm: str | None = "instance"
    norm_eps: float = INSTANCE_NORM_EPS
    norm_affine: bool = True
    norm_momentum: float = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
    nonlin: str | None = "leaky_relu"
    negative_slope: float = 0.01
    nonlin_first: bool = False

    def activate(self, x: jax.Array) -> jax.Array:
        if self.nonlin == "leaky_relu":
            return nn.leaky_relu(x, self.negative_slope)
        if self.nonlin == "relu":
            return nn.relu(x)
        return x


def _per_stage(value: Any, n: int, what: str) -> list:
    """dna's broadcasting of one value to every stage; a sequence must have ``n`` entries."""
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what} must have {n} entries, got {len(value)} ({value})")
    return value


def _per_axis(value: IntOrSeq, nd: int, what: str) -> tuple[int, ...]:
    """One kernel/stride: an int for every axis (dna's maybe_convert_scalar_to_list) or ``nd`` ints."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * nd
    value = tuple(int(v) for v in value)
    if len(value) != nd:
        raise ValueError(f"{what} {value} does not have {nd} entries (the input is {nd}D)")
    return value


class ConvNormNonlin(nn.Module):
    """dna's ConvDropoutNormReLU: conv (padding ``(k - 1) // 2``) → norm → nonlin (or nonlin → norm with
    ``nonlin_first``). ``use_nonlin=False`` for BasicBlockD's second conv and its skip projection;
    ``zero_init_norm`` for BasicBlockD's last norm (dna's ``init_last_bn_before_add_to_0``)."""

    features: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    conv_bias: bool
    ops: LayerOps
    use_nonlin: bool = True
    zero_init_norm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _norm(self, h: jax.Array, train: bool) -> jax.Array:
        o = self.ops
        scale_init = nn.initializers.zeros if self.zero_init_norm else nn.initializers.ones
        common = dict(epsilon=o.norm_eps, use_scale=o.norm_affine, use_bias=o.norm_affine,
                      scale_init=scale_init, dtype=self.dtype, param_dtype=self.param_dtype,
                      use_fast_variance=False, name="norm")
        if o.norm == "instance":
            return nn.InstanceNorm(**common)(h)
        if o.norm == "batch":
            return nn.BatchNorm(momentum=1.0 - o.norm_momentum, **common)(h, use_running_average=not train)
        if o.norm is None:
            return h
        raise ValueError(f"unknown norm {o.norm!r}; expected one of {NORMS}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pads = [((k - 1) // 2, (k - 1) // 2) for k in self.kernel]
        h = nn.Conv(self.features, self.kernel, strides=self.stride, padding=pads, use_bias=self.conv_bias,
                    dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_init,
                    conv_general_dilated=conv_general_dilated_fn(), name="conv")(x)
        act = self.ops.activate if self.use_nonlin else (lambda v: v)
        if self.ops.nonlin_first:
            return self._norm(act(h), train)
        return act(self._norm(h, train))


class StackedConvBlocks(nn.Module):
    """``n_convs`` ConvNormNonlin (``convs_<i>``); the first carries the stride and the change of width."""

    n_convs: int
    features: int
    kernel: tuple[int, ...]
    initial_stride: tuple[int, ...]
    conv_bias: bool
    ops: LayerOps
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        ones = (1,) * len(self.kernel)
        for i in range(self.n_convs):
            x = ConvNormNonlin(self.features, self.kernel, self.initial_stride if i == 0 else ones,
                               self.conv_bias, self.ops, dtype=self.dtype, param_dtype=self.param_dtype,
                               name=f"convs_{i}")(x, train)
        return x


class BasicBlockD(nn.Module):
    """ResNet-D block: ``nonlin(norm(conv2(conv1(x))) + skip(x))``. The skip is the identity unless the block
    strides (AvgPool with kernel = stride) or changes width (1x1 conv without bias + norm, ``skip``)."""

    features: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    conv_bias: bool
    ops: LayerOps
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt, pdt, ones = self.dtype, self.param_dtype, (1,) * len(self.kernel)
        h = ConvNormNonlin(self.features, self.kernel, self.stride, self.conv_bias, self.ops, dtype=dt,
                           param_dtype=pdt, name="conv1")(x, train)
        h = ConvNormNonlin(self.features, self.kernel, ones, self.conv_bias, self.ops, use_nonlin=False,
                           zero_init_norm=True, dtype=dt, param_dtype=pdt, name="conv2")(h, train)
        skip = x.astype(dt)
        if any(s != 1 for s in self.stride):
            skip = nn.avg_pool(skip, self.stride, strides=self.stride, padding="VALID")
        if x.shape[-1] != self.features:
            skip = ConvNormNonlin(self.features, ones, ones, False, self.ops, use_nonlin=False, dtype=dt,
                                  param_dtype=pdt, name="skip")(skip, train)
        return self.ops.activate(h + skip)


class StackedResidualBlocks(nn.Module):
    """``n_blocks`` BasicBlockD (``blocks_<b>``); the first carries the stride and the change of width."""

    n_blocks: int
    features: int
    kernel: tuple[int, ...]
    initial_stride: tuple[int, ...]
    conv_bias: bool
    ops: LayerOps
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        ones = (1,) * len(self.kernel)
        for b in range(self.n_blocks):
            x = BasicBlockD(self.features, self.kernel, self.initial_stride if b == 0 else ones,
                            self.conv_bias, self.ops, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=f"blocks_{b}")(x, train)
        return x


class PlainConvEncoder(nn.Module):
    """Stage ``s`` (``stages_<s>``) = StackedConvBlocks with stride ``strides[s]``; returns every stage's
    output (the skips, the last one the bottleneck)."""

    features_per_stage: Sequence[int]
    kernel_sizes: Sequence[tuple[int, ...]]
    strides: Sequence[tuple[int, ...]]
    n_conv_per_stage: Sequence[int]
    conv_bias: bool
    ops: LayerOps
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        skips = []
        for s, (f, k, st, n) in enumerate(zip(self.features_per_stage, self.kernel_sizes, self.strides,
                                              self.n_conv_per_stage, strict=True)):
            x = StackedConvBlocks(n, f, k, st, self.conv_bias, self.ops, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"stages_{s}")(x, train)
            skips.append(x)
        return skips


class ResidualEncoder(nn.Module):
    """``stem``: one ConvNormNonlin (kernel of stage 0, stride 1, ``stem_channels`` or ``features[0]``
    wide); then stage ``s`` = StackedResidualBlocks with stride ``strides[s]``. Returns every stage's
    output."""

    features_per_stage: Sequence[int]
    kernel_sizes: Sequence[tuple[int, ...]]
    strides: Sequence[tuple[int, ...]]
    n_blocks_per_stage: Sequence[int]
    conv_bias: bool
    ops: LayerOps
    stem_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        stem = self.stem_channels or self.features_per_stage[0]
        ones = (1,) * len(self.kernel_sizes[0])
        x = StackedConvBlocks(1, stem, self.kernel_sizes[0], ones, self.conv_bias, self.ops, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="stem")(x, train)
        skips = []
        for s, (f, k, st, n) in enumerate(zip(self.features_per_stage, self.kernel_sizes, self.strides,
                                              self.n_blocks_per_stage, strict=True)):
            x = StackedResidualBlocks(n, f, k, st, self.conv_bias, self.ops, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name=f"stages_{s}")(x, train)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """dna's UNetDecoder. Stage ``s`` (from the lowest resolution): ``transpconvs_<s>`` (kernel = stride =
    ``strides[-(s+1)]``), concat ``[up, skip]``, ``stages_<s>`` (StackedConvBlocks with the skip stage's
    kernel, stride 1), and its 1x1 head ``seg_layers_<s>``.

    Output: the last head's logits, or with ``deep_supervision`` every head's, highest resolution first
    (dna's order: ``[seg_layers_<n-2>, ..., seg_layers_0]``).
    """

    features_per_stage: Sequence[int]
    kernel_sizes: Sequence[tuple[int, ...]]
    strides: Sequence[tuple[int, ...]]
    n_conv_per_stage: Sequence[int]
    num_classes: int
    conv_bias: bool
    ops: LayerOps
    deep_supervision: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _head(self, s: int, h: jax.Array) -> jax.Array:
        conv = nn.Conv(self.num_classes, (1,) * (h.ndim - 2), padding="VALID", use_bias=True,
                       dtype=jnp.float32, param_dtype=self.param_dtype, kernel_init=conv_init,
                       conv_general_dilated=conv_general_dilated_fn(), name=f"seg_layers_{s}")
        return conv(h.astype(jnp.float32))

    @nn.compact
    def __call__(self, skips: Sequence[jax.Array], train: bool = False) -> jax.Array | list[jax.Array]:
        n = len(skips)
        h = skips[-1]
        outputs = []
        for s in range(n - 1):
            f = self.features_per_stage[-(s + 2)]
            up = UpConv(f, tuple(self.strides[-(s + 1)]), self.dtype, self.param_dtype,
                        name=f"transpconvs_{s}")(h)
            h = jnp.concatenate([up, skips[-(s + 2)].astype(self.dtype)], axis=-1)
            ones = (1,) * len(self.kernel_sizes[0])
            h = StackedConvBlocks(self.n_conv_per_stage[s], f, self.kernel_sizes[-(s + 2)], ones,
                                  self.conv_bias, self.ops, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=f"stages_{s}")(h, train)
            used = self.deep_supervision or s == n - 2
            if used or self.is_initializing():
                logits = self._head(s, h)
                if used:
                    outputs.append(logits)
        outputs.reverse()
        return outputs if self.deep_supervision else outputs[0]


Axes = tuple[int, ...]


def _resolve(n_stages: int, features: IntOrSeq, kernels: Any, strides: Any, x: jax.Array,
             per_stage: dict[str, Any]) -> tuple[list[int], list[Axes], list[Axes], dict[str, list[int]]]:
    """Broadcast dna-style scalars, check the lengths and that the input is divisible by the total stride."""
    nd = x.ndim - 2
    if nd not in (2, 3):
        raise ValueError(f"input must be (B, *spatial, C) with 2 or 3 spatial axes, got shape {x.shape}")
    feats = [int(f) for f in _per_stage(features, n_stages, "features_per_stage")]
    ks = [_per_axis(k, nd, "kernel") for k in _per_stage(kernels, n_stages, "kernel_sizes")]
    ss = [_per_axis(s, nd, "stride") for s in _per_stage(strides, n_stages, "strides")]
    counts = {name: [int(v) for v in _per_stage(value, n, name)] for name, (value, n) in per_stage.items()}
    total = np.prod(np.asarray(ss), axis=0)
    if any(d % t for d, t in zip(x.shape[1:-1], total, strict=True)):
        raise ValueError(f"spatial shape {x.shape[1:-1]} is not divisible by the total stride "
                         f"{tuple(int(t) for t in total)}")
    return feats, ks, ss, counts


class PlainConvUNet(nn.Module):
    """dna's PlainConvUNet. ``apply(variables, x, train=False)``: ``x (B, *spatial, C)`` → float32 logits
    ``(B, *spatial, num_classes)``, or their list (highest resolution first) with ``deep_supervision``.
    ``train`` only matters for batch norm (batch statistics, ``mutable=["batch_stats"]``)."""

    n_stages: int
    features_per_stage: IntOrSeq
    kernel_sizes: Any  # int | per stage: int | per axis
    strides: Any
    n_conv_per_stage: IntOrSeq
    num_classes: int
    n_conv_per_stage_decoder: IntOrSeq
    conv_bias: bool = True
    norm: str | None = "instance"
    norm_eps: float = INSTANCE_NORM_EPS
    norm_affine: bool = True
    norm_momentum: float = 0.1
    nonlin: str | None = "leaky_relu"
    negative_slope: float = 0.01
    nonlin_first: bool = False
    deep_supervision: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
        n = self.n_stages
        feats, ks, ss, counts = _resolve(n, self.features_per_stage, self.kernel_sizes, self.strides, x, {
            "n_conv_per_stage": (self.n_conv_per_stage, n),
            "n_conv_per_stage_decoder": (self.n_conv_per_stage_decoder, n - 1)})
        ops = _layer_ops(self, self.nonlin_first)
        dt, pdt = self.dtype, self.param_dtype
        skips = PlainConvEncoder(feats, ks, ss, counts["n_conv_per_stage"], self.conv_bias, ops, dtype=dt,
                                 param_dtype=pdt, name="encoder")(x.astype(dt), train)
        return UNetDecoder(feats, ks, ss, counts["n_conv_per_stage_decoder"], self.num_classes,
                           self.conv_bias, ops, self.deep_supervision, dtype=dt, param_dtype=pdt,
                           name="decoder")(skips, train)


class ResidualEncoderUNet(nn.Module):
    """dna's ResidualEncoderUNet (BasicBlockD blocks; BottleneckD is not supported): a residual encoder and
    the same plain-conv UNetDecoder as PlainConvUNet. Inputs and outputs as :class:`PlainConvUNet`."""

    n_stages: int
    features_per_stage: IntOrSeq
    kernel_sizes: Any
    strides: Any
    n_blocks_per_stage: IntOrSeq
    num_classes: int
    n_conv_per_stage_decoder: IntOrSeq
    conv_bias: bool = True
    norm: str | None = "instance"
    norm_eps: float = INSTANCE_NORM_EPS
    norm_affine: bool = True
    norm_momentum: float = 0.1
    nonlin: str | None = "leaky_relu"
    negative_slope: float = 0.01
    stem_channels: int | None = None
    deep_supervision: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
        n = self.n_stages
        feats, ks, ss, counts = _resolve(n, self.features_per_stage, self.kernel_sizes, self.strides, x, {
            "n_blocks_per_stage": (self.n_blocks_per_stage, n),
            "n_conv_per_stage_decoder": (self.n_conv_per_stage_decoder, n - 1)})
        ops = _layer_ops(self, False)
        dt, pdt = self.dtype, self.param_dtype
        skips = ResidualEncoder(feats, ks, ss, counts["n_blocks_per_stage"], self.conv_bias, ops,
                                self.stem_channels, dtype=dt, param_dtype=pdt,
                                name="encoder")(x.astype(dt), train)
        return UNetDecoder(feats, ks, ss, counts["n_conv_per_stage_decoder"], self.num_classes,
                           self.conv_bias, ops, self.deep_supervision, dtype=dt, param_dtype=pdt,
                           name="decoder")(skips, train)


DynamicUNet = PlainConvUNet | ResidualEncoderUNet


def _layer_ops(net: PlainConvUNet | ResidualEncoderUNet, nonlin_first: bool) -> LayerOps:
    if net.norm not in NORMS:
        raise ValueError(f"unknown norm {net.norm!r}; expected one of {NORMS}")
    if net.nonlin not in NONLINS:
        raise ValueError(f"unknown nonlin {net.nonlin!r}; expected one of {NONLINS}")
    return LayerOps(net.norm, float(net.norm_eps), bool(net.norm_affine), float(net.norm_momentum),
                    net.nonlin, float(net.negative_slope), bool(nonlin_first))

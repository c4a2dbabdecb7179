"""The nnU-Net U-Net (docs/reference.md §2) as a Flax linen module, channels-last, 2D or 3D.

Why linen and not NNX: the trainer keeps params, optimizer state and batch-norm statistics as plain pytrees
(optax updates them, orbax saves them, ``jax.jit`` shards them with NamedShardings) and calls
``model.apply(variables, x, train=..., mutable=["batch_stats"])``; a linen module is a stateless description,
so it stays out of those pytrees and works the same on flax 0.12.8 (Python 3.11) and newer.

Layer by layer it matches MONAI's ``DynUNet`` (the oracle of tests/parity), which is what NVIDIA's newer
nnU-Net trains: convs without bias and symmetric padding ``(k - s + 1) // 2``; strided-conv downsampling;
kernel = stride transposed convs with bias; ``concat([upsampled, skip])``; decoder block with the kernel of
the level below; 1x1 heads with bias. Parameter names follow the blocks (``input_block``, ``encoder_<l>``,
``bottleneck``, ``decoder_<l>``, ``head``, ``ds_head_<i>``) so that ``nnunet_jax.interop.monai`` can map
them to DynUNet's state-dict keys by structure.

Options beyond MONAI, from the March 2021 seed (DeepLearningExamples ``models/layers.py``):

- ``attention``: attention-gated skips. ``o = norm(conv3(upsampled))``, ``s = norm(conv3(skip))`` with
  ``f // 2`` channels, ``a = sigmoid(norm(conv3(relu(o + s))))`` with one channel, ``skip *= a``.
- ``drop_block``: DropBlock (Ghiasi et al. 2018, as the ``dropblock`` package computes it) after each conv and
  before its norm in the encoder blocks below the input level and in the bottleneck, in training only. The
  seed ramps the drop probability linearly from 0 to 0.1 over 10k steps; we use the fixed
  ``drop_block_prob`` (0.1) and block size 5 (clipped to the feature map). Needs ``rngs={"dropout": key}``.
- ``norm="group"``: ``GroupNorm`` with ``gcd(32, channels)`` groups (the seed's 32 wherever it is valid).

Mixed precision: ``dtype`` is the compute dtype of convs and activations, ``param_dtype`` (float32) the
storage dtype; normalisation statistics are reduced in float32 and the heads run in float32, so the logits are
float32 whatever ``dtype`` is.

Batch norm follows PyTorch's momentum 0.1 (flax ``momentum=0.9``) and eps 1e-5. One difference stays: flax
keeps the biased batch variance in ``batch_stats["var"]`` where PyTorch keeps the unbiased one (a factor
``n / (n - 1)`` on the running update, negligible for feature maps of thousands of voxels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nnunet_jax.models.conv import conv_general_dilated_fn
from nnunet_jax.planning.topology import Topology, default_filters

Dtype = Any

NORMS = ("instance", "batch", "group")
INSTANCE_NORM_EPS = 1e-5  # PyTorch/MONAI; flax's own default is 1e-6 (DESIGN.md traps)
_LEAKY_GAIN2 = 2.0 / (1.0 + 0.01**2)  # PyTorch kaiming_normal_(a=0.01): std = gain / sqrt(fan_in)

# fan_in = in_ch * prod(k) for a conv kernel (*k, I, O): jax's default axes.
conv_init = nn.initializers.variance_scaling(_LEAKY_GAIN2, "fan_in", "normal")
# PyTorch computes a ConvTranspose's fan_in from weight.size(1) = out_ch, i.e. out_ch * prod(k).
upconv_init = nn.initializers.variance_scaling(_LEAKY_GAIN2, "fan_in", "normal", in_axis=-1, out_axis=-2)


def same_padding(kernel: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int]]:
    """Symmetric padding ``(k - s + 1) // 2`` per axis as in PyTorch/MONAI (XLA 'SAME' pads (0, 1) at s=2)."""
    pads = []
    for k, s in zip(kernel, stride, strict=True):
        p = (k - s + 1) // 2
        if p < 0:
            raise ValueError(f"kernel {tuple(kernel)} smaller than stride {tuple(stride)}")
        pads.append((p, p))
    return pads


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct`` (as ``jax.eval_shape`` gives)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _norm(kind: str, x: jax.Array, name: str, train: bool, dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    """A norm layer named ``name`` in the calling module (statistics in float32, output in ``dtype``)."""
    if kind == "instance":
        layer = nn.InstanceNorm(epsilon=INSTANCE_NORM_EPS, dtype=dtype, param_dtype=param_dtype,
                                use_fast_variance=False, name=name)
        return layer(x)
    if kind == "batch":
        layer = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                             use_fast_variance=False, name=name)
        return layer(x, use_running_average=not train)
    if kind == "group":
        layer = nn.GroupNorm(num_groups=math.gcd(32, x.shape[-1]), epsilon=1e-5, dtype=dtype,
                             param_dtype=param_dtype, use_fast_variance=False, name=name)
        return layer(x)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


def _conv(features: int, kernel: Sequence[int], stride: Sequence[int], name: str, dtype: Dtype,
          param_dtype: Dtype) -> nn.Conv:
    return nn.Conv(features, tuple(kernel), strides=tuple(stride), padding=same_padding(kernel, stride),
                   use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=conv_init,
                   conv_general_dilated=conv_general_dilated_fn(), name=name)


def drop_block(x: jax.Array, rng: jax.Array, drop_prob: float, block_size: int) -> jax.Array:
    """DropBlock: zero random ``block_size``-cubes (shared over channels), rescale by kept fraction."""
    spatial = x.shape[1:-1]
    block = tuple(min(block_size, s) for s in spatial)
    gamma = drop_prob / float(np.prod(block))
    seeds = jax.random.bernoulli(rng, gamma, (x.shape[0], *spatial, 1)).astype(jnp.float32)
    dropped = jax.lax.reduce_window(seeds, 0.0, jax.lax.max, (1, *block, 1), (1,) * x.ndim, "SAME")
    keep = 1.0 - dropped
    scale = keep.size / jnp.maximum(keep.sum(), 1.0)
    return x * (keep * scale).astype(x.dtype)


class UpConv(nn.Module):
    """Transposed conv with kernel = stride (non-overlapping) and bias, as one matmul plus an interleave.

    ``kernel[r]`` (shape ``(*stride, in, out)``) lands at output offset ``r`` inside each block, which is
    PyTorch's placement; ``lax.conv_transpose`` would need the kernel flipped (docs/reference.md §2). A
    matmul also avoids XLA:CPU's slow input-dilated convolution.
    """

    features: int
    stride: tuple[int, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nd, cin, cout = len(self.stride), x.shape[-1], self.features
        kernel = self.param("kernel", upconv_init, (*self.stride, cin, cout), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (cout,), self.param_dtype)
        taps = int(np.prod(self.stride))
        w = kernel.reshape(taps, cin, cout).transpose(1, 0, 2).reshape(cin, taps * cout)
        y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
        n, spatial = x.shape[0], x.shape[1:-1]
        y = y.reshape(n, *spatial, *self.stride, cout)
        # (n, s0, s1, .., k0, k1, .., c) -> (n, s0, k0, s1, k1, .., c) -> (n, s0*k0, s1*k1, .., c)
        perm = [0] + [a for i in range(nd) for a in (1 + i, 1 + nd + i)] + [1 + 2 * nd]
        out_spatial = [s * k for s, k in zip(spatial, self.stride, strict=True)]
        y = y.transpose(perm).reshape(n, *out_spatial, cout)
        return y + bias.astype(self.dtype)


class ConvBlock(nn.Module):
    """conv(k, s) → norm → lrelu → conv(k, 1) → norm → lrelu.

    ``residual``: lrelu(conv-norm-lrelu-conv-norm + shortcut), the shortcut a 1x1 strided conv + norm when the
    width or the resolution changes (MONAI's UnetResBlock).
    """

    features: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    norm: str = "instance"
    negative_slope: float = 0.01
    residual: bool = False
    drop_block: bool = False
    drop_block_prob: float = 0.1
    drop_block_size: int = 5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _drop(self, h: jax.Array, train: bool) -> jax.Array:
        if self.drop_block and train and self.drop_block_prob > 0:
            return drop_block(h, self.make_rng("dropout"), self.drop_block_prob, self.drop_block_size)
        return h

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        ones = (1,) * len(self.kernel)
        h = _conv(self.features, self.kernel, self.stride, "conv1", dt, pdt)(x)
        h = _norm(self.norm, self._drop(h, train), "norm1", train, dt, pdt)
        h = nn.leaky_relu(h, self.negative_slope)
        h = _conv(self.features, self.kernel, ones, "conv2", dt, pdt)(h)
        h = _norm(self.norm, self._drop(h, train), "norm2", train, dt, pdt)
        if not self.residual:
            return nn.leaky_relu(h, self.negative_slope)
        shortcut = x.astype(dt)
        if x.shape[-1] != self.features or any(s != 1 for s in self.stride):
            shortcut = _conv(self.features, ones, self.stride, "conv3", dt, pdt)(x)
            shortcut = _norm(self.norm, self._drop(shortcut, train), "norm3", train, dt, pdt)
        return nn.leaky_relu(h + shortcut, self.negative_slope)


class UpBlock(nn.Module):
    """Decoder level: upconv → (attention gate on the skip) → concat [upsampled, skip] → basic block."""

    features: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    norm: str = "instance"
    negative_slope: float = 0.01
    attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array, train: bool = False) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        up = UpConv(self.features, self.stride, dt, pdt, name="upconv")(x)
        skip = skip.astype(dt)
        if self.attention:
            k3, ones = (3,) * len(self.kernel), (1,) * len(self.kernel)
            att = max(self.features // 2, 1)
            o = _norm(self.norm, _conv(att, k3, ones, "conv_o", dt, pdt)(up), "norm_o", train, dt, pdt)
            s = _norm(self.norm, _conv(att, k3, ones, "conv_s", dt, pdt)(skip), "norm_s", train, dt, pdt)
            psi = _conv(1, k3, ones, "conv_psi", dt, pdt)(nn.relu(o + s))
            skip = skip * nn.sigmoid(_norm(self.norm, psi, "norm_psi", train, dt, pdt))
        h = jnp.concatenate([up, skip], axis=-1)
        return ConvBlock(self.features, self.kernel, (1,) * len(self.kernel), self.norm, self.negative_slope,
                         dtype=dt, param_dtype=pdt, name="block")(h, train)


class UNet(nn.Module):
    """nnU-Net's U-Net. ``apply(variables, x, train)``: ``x (N, *spatial, C)`` → float32 logits.

    With ``deep_supervision`` and ``train=True`` the output is ``(main, head_1, .., head_k)``, ``head_i`` at
    decoder level ``i``'s resolution (not upsampled), ``k = deep_supr_num``. Heads are created at init
    whatever ``train`` is, so one set of variables serves training and inference.
    """

    n_class: int
    kernels: Sequence[Sequence[int]]
    strides: Sequence[Sequence[int]]
    filters: Sequence[int] | None = None
    norm: str = "instance"
    negative_slope: float = 0.01
    residual: bool = False
    deep_supervision: bool = False
    deep_supr_num: int = 2
    attention: bool = False
    drop_block: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    drop_block_prob: float = 0.1
    drop_block_size: int = 5

    @classmethod
    def from_topology(cls, topology: Topology | Mapping[str, Any], n_class: int, **options: Any) -> UNet:
        """Build from a :class:`Topology` or the ``topology`` dict of plan.json; ``filters=`` overrides."""
        if not isinstance(topology, Topology):
            topology = Topology.from_dict(dict(topology))
        filters = options.pop("filters", None) or topology.filters
        return cls(n_class=n_class, kernels=topology.kernels, strides=topology.strides,
                   filters=tuple(int(f) for f in filters), **options)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels per level (``filters`` or the nnU-Net default)."""
        if self.filters is not None:
            return tuple(int(f) for f in self.filters)
        return tuple(default_filters(len(self.strides), len(self.strides[0])))

    def _check(self, x: jax.Array) -> None:
        levels, nd = len(self.strides), len(self.strides[0])
        if len(self.kernels) != levels or levels < 3:
            raise ValueError(f"need >= 3 levels and as many kernels as strides, got {len(self.kernels)} "
                             f"kernels and {levels} strides")
        if any(len(k) != nd for k in self.kernels) or any(len(s) != nd for s in self.strides):
            raise ValueError(f"kernels {self.kernels} / strides {self.strides} mix dimensionalities")
        if len(self.widths) != levels:
            raise ValueError(f"{len(self.widths)} filters given for a {levels}-level network")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {NORMS}")
        if self.deep_supervision and not 1 <= self.deep_supr_num < levels - 1:
            raise ValueError(f"deep_supr_num must be in [1, {levels - 2}] for {levels} levels, "
                             f"got {self.deep_supr_num}")
        if x.ndim != nd + 2:
            raise ValueError(f"a {nd}D U-Net takes (N, *spatial, C) inputs of rank {nd + 2}, got {x.shape}")
        total = np.prod(np.asarray(self.strides), axis=0)
        if any(s % t for s, t in zip(x.shape[1:-1], total, strict=True)):
            raise ValueError(f"spatial shape {x.shape[1:-1]} is not divisible by the total stride "
                             f"{tuple(int(t) for t in total)}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | tuple[jax.Array, ...]:
        self._check(x)
        kernels = [tuple(int(v) for v in k) for k in self.kernels]
        strides = [tuple(int(v) for v in s) for s in self.strides]
        f, last = self.widths, len(strides) - 1
        common = dict(norm=self.norm, negative_slope=self.negative_slope, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        enc = dict(residual=self.residual, drop_block_prob=self.drop_block_prob,
                   drop_block_size=self.drop_block_size, **common)

        h = ConvBlock(f[0], kernels[0], strides[0], name="input_block", **enc)(x.astype(self.dtype), train)
        skips = [h]
        for lvl in range(1, last):
            h = ConvBlock(f[lvl], kernels[lvl], strides[lvl], drop_block=self.drop_block,
                          name=f"encoder_{lvl}", **enc)(h, train)
            skips.append(h)
        h = ConvBlock(f[last], kernels[last], strides[last], drop_block=self.drop_block, name="bottleneck",
                      **enc)(h, train)

        decoded: dict[int, jax.Array] = {}
        for lvl in range(last - 1, -1, -1):
            h = UpBlock(f[lvl], kernels[lvl + 1], strides[lvl + 1], attention=self.attention,
                        name=f"decoder_{lvl}", **common)(h, skips[lvl], train)
            decoded[lvl] = h

        def head(name: str, feats: jax.Array) -> jax.Array:
            conv = nn.Conv(self.n_class, (1,) * (feats.ndim - 2), use_bias=True,
                           padding="VALID", dtype=jnp.float32, param_dtype=self.param_dtype,
                           kernel_init=conv_init, conv_general_dilated=conv_general_dilated_fn(), name=name)
            return conv(feats.astype(jnp.float32))

        logits = head("head", h)
        if self.deep_supervision and (train or self.is_initializing()):
            heads = tuple(head(f"ds_head_{i}", decoded[i]) for i in range(1, self.deep_supr_num + 1))
            if train:
                return (logits, *heads)
        return logits

"""nnU-Net v2's network from its plans, and its PyTorch weights in our variables (docs/nnunetv2.md §2).

Interface (extend with keyword arguments only):

- ``network_from_plans(cfg, num_input_channels, num_heads, *, deep_supervision=False, dtype=jnp.float32,
  source="plans.json")`` → :class:`~nnunet_jax.models.dynamic_unet.PlainConvUNet` or
  :class:`~nnunet_jax.models.dynamic_unet.ResidualEncoderUNet`, built as v2's ``get_network_from_plans``
  builds dna's network from ``architecture.network_class_name`` and ``arch_kwargs``. What we cannot compute
  the same way (another class, a conv_op of the wrong dimensionality, an unknown norm or nonlin, a kwarg the
  class does not take) is one :class:`DatasetError` naming plans.json's field, before any weight is read.
- ``load_weights(module, state_dict, source, ndim)`` → ``{"params": ..., ["batch_stats": ...]}`` from dna's
  state dict (numpy arrays), strict: missing, unexpected or mis-shaped keys are one DatasetError naming
  ``source`` and a few of the keys.
- ``state_dict_shapes(module, num_input_channels, ndim)``: the primary keys and torch shapes it expects.

Key mapping, structural (our module names mirror dna's paths): ``stages_3`` ↔ ``stages.3``, with dna's extra
``.0`` of PlainConvEncoder's ``nn.Sequential`` stage (``encoder.stages.<s>.0.convs.<i>``) and BasicBlockD's
``skip.1`` (``skip.0`` is the AvgPool) or ``skip.0`` (no AvgPool when the block does not stride). Leaves:
``kernel``/``scale`` ↔ ``weight``, ``bias``, batch norm's ``mean``/``var`` ↔ ``running_mean``/``running_var``
(``num_batches_tracked`` is ignored). Layouts: Conv ``(out, in, *k)`` → ``(*k, in, out)``, ConvTranspose
``(in, out, *k)`` → ``(*k, in, out)`` without a flip (``UpConv`` places taps as PyTorch does).

dna's state dict names most tensors more than once: every ConvDropoutNormReLU also as ``.all_modules.<i>``
(the conv, dropout, norm, nonlin sequence), and the whole encoder again under ``decoder.encoder.``. Those
aliases are accepted when they equal the tensor they alias, an error otherwise. The deep-supervision heads
``decoder.seg_layers.<s>`` all load (training needs them), though inference runs only the last. With
``conv_bias`` false dna's transposed convs have no bias; ``UpConv`` always has one, loaded as zeros.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nnunet_jax.interop.nnunetv2.plans import V2Configuration
from nnunet_jax.io import DatasetError
from nnunet_jax.models.dynamic_unet import DynamicUNet, PlainConvUNet, ResidualEncoderUNet

DNA_MODULE = "dynamic_network_architectures.architectures.unet"
NETWORK_CLASSES = {"PlainConvUNet": PlainConvUNet, "ResidualEncoderUNet": ResidualEncoderUNet}
_COMMON_KWARGS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                  "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                  "dropout_op_kwargs", "nonlin", "nonlin_kwargs", "deep_supervision")
KWARGS = {"PlainConvUNet": _COMMON_KWARGS + ("n_conv_per_stage", "nonlin_first"),
          "ResidualEncoderUNet": _COMMON_KWARGS + ("n_blocks_per_stage", "block", "bottleneck_channels",
                                                   "stem_channels")}
_REQUIRED = {"PlainConvUNet": ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                               "n_conv_per_stage", "n_conv_per_stage_decoder"),
             "ResidualEncoderUNet": ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                                     "n_blocks_per_stage", "n_conv_per_stage_decoder")}
DROPOUTS = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")


class _ArchFields:
    """``arch_kwargs`` of one configuration; every error names the file and the dotted field."""

    def __init__(self, cfg: V2Configuration, source: str):
        self.kw = cfg.architecture.arch_kwargs
        self.source, self.nd = source, cfg.ndim
        self.prefix = f"configurations.{cfg.name}.architecture."

    def fail(self, field: str, what: str) -> DatasetError:
        return DatasetError(f"{self.source}: field '{self.prefix}{field}' {what}")

    def boolean(self, key: str, default: bool) -> bool:
        v = self.kw.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(f"arch_kwargs.{key}", f"must be true/false, got {v!r}")
        return v

    def positive(self, v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise self.fail(f"arch_kwargs.{key}", f"must be a positive integer, got {v!r}")
        return v

    def per_stage(self, key: str, n: int) -> tuple[int, ...]:
        """dna accepts one int for every stage or a list of ``n``."""
        v = self.kw[key]
        if isinstance(v, int) and not isinstance(v, bool):
            return (self.positive(v, key),) * n
        if not isinstance(v, list) or len(v) != n:
            raise self.fail(f"arch_kwargs.{key}", f"must be an integer or a list of {n} integers "
                                                  f"(one per stage), got {v!r}")
        return tuple(self.positive(x, key) for x in v)

    def per_stage_axes(self, key: str, n: int, odd: bool = False) -> tuple[tuple[int, ...], ...]:
        """Kernels / strides: an int, or per stage an int or a list with one entry per patch axis."""
        v = self.kw[key]
        stages = [v] * n if isinstance(v, int) and not isinstance(v, bool) else v
        if not isinstance(stages, list) or len(stages) != n:
            raise self.fail(f"arch_kwargs.{key}", f"must have {n} entries (one per stage), got {v!r}")
        out = []
        for s in stages:
            axes = [s] * self.nd if isinstance(s, int) and not isinstance(s, bool) else s
            if not isinstance(axes, list) or len(axes) != self.nd:
                raise self.fail(f"arch_kwargs.{key}", f"entries must have {self.nd} values (the patch is "
                                                      f"{self.nd}D), got {s!r}")
            axes = tuple(self.positive(a, key) for a in axes)
            if odd and any(a % 2 == 0 for a in axes):
                raise self.fail(f"arch_kwargs.{key}",
                                f"must be odd (dna pads (k - 1) // 2 per side), got {s!r}")
            out.append(axes)
        return tuple(out)

    def torch_class(self, key: str) -> str | None:
        """The class name of a ``torch.nn`` class given by its dotted path (as ``pydoc.locate`` takes it)."""
        v = self.kw.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v.startswith("torch.nn."):
            raise self.fail(f"arch_kwargs.{key}", f"must name a torch.nn class (like "
                                                  f"'torch.nn.modules.conv.Conv3d') or be null, got {v!r}")
        return v.rsplit(".", 1)[-1]

    def kwargs(self, key: str, known: dict[str, tuple[type, ...]]) -> dict:
        v = self.kw.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.fail(f"arch_kwargs.{key}", f"must be an object or null, got {v!r}")
        for k, x in v.items():
            if k not in known:
                raise self.fail(f"arch_kwargs.{key}.{k}", f"is not supported (known: {sorted(known)})")
            if (isinstance(x, bool) and bool not in known[k]) or not isinstance(x, known[k]):
                raise self.fail(f"arch_kwargs.{key}.{k}", f"has the wrong type: {x!r}")
        return v


def _norm(f: _ArchFields) -> dict[str, Any]:
    name = f.torch_class("norm_op")
    nd = f.nd
    if name is None:
        f.kwargs("norm_op_kwargs", {})
        return {"norm": None}
    known = {"eps": (int, float), "affine": (bool,), "momentum": (int, float), "track_running_stats": (bool,)}
    kw = f.kwargs("norm_op_kwargs", known)
    if name == f"InstanceNorm{nd}d":
        if kw.get("track_running_stats", False):
            raise f.fail("arch_kwargs.norm_op_kwargs.track_running_stats",
                         "true is not supported (instance norm with running statistics)")
        kind, affine = "instance", kw.get("affine", False)  # torch's InstanceNorm default: no affine
    elif name == f"BatchNorm{nd}d":
        if not kw.get("track_running_stats", True):
            raise f.fail("arch_kwargs.norm_op_kwargs.track_running_stats",
                         "false is not supported (batch norm without running statistics)")
        kind, affine = "batch", kw.get("affine", True)
    else:
        raise f.fail("arch_kwargs.norm_op", f"names {f.kw['norm_op']!r}; supported for a {nd}D patch: "
                                            f"torch.nn InstanceNorm{nd}d, BatchNorm{nd}d or null")
    eps = float(kw.get("eps", 1e-5))
    if eps <= 0:
        raise f.fail("arch_kwargs.norm_op_kwargs.eps", f"must be > 0, got {eps}")
    return {"norm": kind, "norm_eps": eps, "norm_affine": affine,
            "norm_momentum": float(kw.get("momentum", 0.1))}


def _nonlin(f: _ArchFields) -> dict[str, Any]:
    name = f.torch_class("nonlin")
    if name is None:
        f.kwargs("nonlin_kwargs", {})
        return {"nonlin": None}
    if name == "LeakyReLU":
        kw = f.kwargs("nonlin_kwargs", {"negative_slope": (int, float), "inplace": (bool,)})
        return {"nonlin": "leaky_relu", "negative_slope": float(kw.get("negative_slope", 0.01))}
    if name == "ReLU":
        f.kwargs("nonlin_kwargs", {"inplace": (bool,)})
        return {"nonlin": "relu"}
    raise f.fail("arch_kwargs.nonlin",
                 f"names {f.kw['nonlin']!r}; supported: torch.nn LeakyReLU, ReLU or null")


def network_from_plans(cfg: V2Configuration, num_input_channels: int, num_heads: int, *,
                       deep_supervision: bool = False, dtype: Any = jnp.float32,
                       source: str = "plans.json") -> DynamicUNet:
    """The flax network of configuration ``cfg`` (``num_heads`` output channels). ``num_input_channels`` is
    checked only (flax infers the input width); ``source`` names plans.json in errors."""
    for what, v in (("num_input_channels", num_input_channels), ("num_heads", num_heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    f = _ArchFields(cfg, source)
    arch = cfg.architecture
    module, _, cls_name = arch.network_class_name.rpartition(".")
    if cls_name not in NETWORK_CLASSES or module not in ("", DNA_MODULE):
        raise f.fail("network_class_name", f"names {arch.network_class_name!r}; supported: "
                                           f"{', '.join(f'{DNA_MODULE}.{c}' for c in NETWORK_CLASSES)}")
    unknown = sorted(set(f.kw) - set(KWARGS[cls_name]))
    if unknown:
        raise f.fail(f"arch_kwargs.{unknown[0]}", f"is not a parameter of {cls_name} that we support "
                                                  f"(known: {', '.join(KWARGS[cls_name])})")
    for key in _REQUIRED[cls_name]:
        if key not in f.kw:
            raise f.fail(f"arch_kwargs.{key}", f"is missing (required by {cls_name})")

    n = f.positive(f.kw["n_stages"], "n_stages")
    if n < 2:
        raise f.fail("arch_kwargs.n_stages", f"must be >= 2 (the decoder needs a stage), got {n}")
    conv = f.torch_class("conv_op")
    if conv != f"Conv{cfg.ndim}d":
        raise f.fail("arch_kwargs.conv_op", f"names {f.kw['conv_op']!r}, but the patch_size "
                                            f"{list(cfg.patch_size)} is {cfg.ndim}D (expected "
                                            f"'torch.nn.modules.conv.Conv{cfg.ndim}d')")
    dropout = f.torch_class("dropout_op")
    if dropout is not None and dropout not in DROPOUTS:
        raise f.fail("arch_kwargs.dropout_op", f"names {f.kw['dropout_op']!r}; supported: torch.nn "
                                               f"{', '.join(DROPOUTS)} or null")
    f.kwargs("dropout_op_kwargs", {"p": (int, float), "inplace": (bool,)})  # inactive at inference
    f.boolean("deep_supervision", False)  # v2 overrides it with its caller's value, as we do

    kwargs: dict[str, Any] = dict(
        n_stages=n, features_per_stage=f.per_stage("features_per_stage", n),
        kernel_sizes=f.per_stage_axes("kernel_sizes", n, odd=True), strides=f.per_stage_axes("strides", n),
        num_classes=num_heads, n_conv_per_stage_decoder=f.per_stage("n_conv_per_stage_decoder", n - 1),
        conv_bias=f.boolean("conv_bias", False), deep_supervision=bool(deep_supervision), dtype=dtype,
        **_norm(f), **_nonlin(f))
    if cls_name == "PlainConvUNet":
        return PlainConvUNet(n_conv_per_stage=f.per_stage("n_conv_per_stage", n),
                             nonlin_first=f.boolean("nonlin_first", False), **kwargs)
    block = f.kw.get("block")
    if block is not None and (not isinstance(block, str) or block.rsplit(".", 1)[-1] != "BasicBlockD"):
        raise f.fail("arch_kwargs.block", f"names {block!r}; supported: BasicBlockD (BottleneckD is not)")
    if f.kw.get("bottleneck_channels") is not None:
        raise f.fail("arch_kwargs.bottleneck_channels", "must be null (only BottleneckD blocks use it)")
    stem = f.kw.get("stem_channels")
    if stem is not None:
        f.positive(stem, "stem_channels")
    return ResidualEncoderUNet(n_blocks_per_stage=f.per_stage("n_blocks_per_stage", n), stem_channels=stem,
                               **kwargs)


# ---------------------------------------------------------------------------------------------- weights

_LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias", ("params", "scale"): "weight",
         ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_INDEXED = re.compile(r"^(.*)_(\d+)$")
_ALL_MODULES = re.compile(r"^(.*)\.all_modules\.\d+\.([A-Za-z_]+)$")
_SHOW = 5


def _strides(module: DynamicUNet, ndim: int) -> list[tuple[int, ...]]:
    s = module.strides
    stages = [s] * module.n_stages if isinstance(s, (int, np.integer)) else list(s)
    return [tuple([int(v)] * ndim) if isinstance(v, (int, np.integer)) else tuple(int(a) for a in v)
            for v in stages]


def _torch_key(module: DynamicUNet, path: tuple[str, ...], strides: list[tuple[int, ...]]) -> tuple[str, str]:
    """(collection, *modules, leaf) of our variables → (dna state-dict key, layout kind)."""
    collection, *mods, leaf = path
    parts: list[str] = []
    for i, m in enumerate(mods):
        hit = _INDEXED.match(m)
        parts.append(f"{hit.group(1)}.{hit.group(2)}" if hit else m)
        if mods[0] == "encoder" and i == 1 and m.startswith("stages_") and isinstance(module, PlainConvUNet):
            parts.append("0")  # PlainConvEncoder's stage is nn.Sequential(StackedConvBlocks)
        if m == "skip":  # BasicBlockD: skip = Sequential([AvgPool if it strides], ConvNormNonlin)
            stage, block = int(_INDEXED.match(mods[1]).group(2)), int(_INDEXED.match(mods[2]).group(2))
            parts[-1] = "skip.1" if block == 0 and any(v != 1 for v in strides[stage]) else "skip.0"
    kind = "vector"
    if leaf == "kernel":
        kind = "conv_transpose" if mods[-1].startswith("transpconvs_") else "conv"
    return ".".join(parts) + "." + _LEAF[(collection, leaf)], kind


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
    nd = value.ndim - 2
    if kind == "conv":  # (O, I, *k) -> (*k, I, O)
        return np.transpose(value, (*range(2, 2 + nd), 1, 0))
    if kind == "conv_transpose":  # (I, O, *k) -> (*k, I, O)
        return np.transpose(value, (*range(2, 2 + nd), 0, 1))
    return value


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "vector":
        return tuple(shape)
    *k, i, o = shape
    return (o, i, *k) if kind == "conv" else (i, o, *k)


def _template(module: DynamicUNet, num_input_channels: int, ndim: int) -> dict:
    strides = _strides(module, ndim)
    size = np.prod(np.asarray(strides), axis=0)
    x = jax.ShapeDtypeStruct((1, *(int(v) for v in size), int(num_input_channels)), jnp.float32)
    return traverse_util.flatten_dict(dict(jax.eval_shape(module.init, jax.random.key(0), x)))


def _expected(module: DynamicUNet, num_input_channels: int, ndim: int) -> dict[str, tuple]:
    """dna key → (our path, kind, our shape, dtype); transposed-conv biases left out without conv_bias."""
    strides = _strides(module, ndim)
    out = {}
    for path, leaf in _template(module, num_input_channels, ndim).items():
        key, kind = _torch_key(module, path, strides)
        out[key] = (path, kind, tuple(leaf.shape), leaf.dtype)
    return out


def _optional(module: DynamicUNet, key: str) -> bool:
    return not module.conv_bias and key.startswith("decoder.transpconvs.") and key.endswith(".bias")


def state_dict_shapes(module: DynamicUNet, num_input_channels: int, ndim: int) -> dict[str, tuple[int, ...]]:
    """The primary dna keys ``load_weights`` needs and their torch shapes (no aliases, no counters)."""
    return {k: _torch_shape(shape, kind) for k, (_, kind, shape, _) in
            _expected(module, num_input_channels, ndim).items() if not _optional(module, k)}


def _first_conv(module: DynamicUNet) -> str:
    if isinstance(module, ResidualEncoderUNet):
        return "encoder.stem.convs.0.conv.weight"
    return "encoder.stages.0.0.convs.0.conv.weight"


def _few(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_weights(module: DynamicUNet, state_dict: Mapping[str, np.ndarray], source: str, ndim: int) -> dict:
    """Flax variables of ``module`` from dna's ``state_dict`` ({key: numpy array}); ``source`` names the
    checkpoint in the one DatasetError that lists what does not match."""
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    first = _first_conv(module)
    if first not in sd or sd[first].ndim != ndim + 2:
        got = f"shape {sd[first].shape}" if first in sd else "missing"
        raise DatasetError(f"{source}: not the weights of a {ndim}D {type(module).__name__}: {first!r} is "
                           f"{got} (first keys: {_few(list(sd))})")
    expected = _expected(module, int(sd[first].shape[1]), ndim)
    flat, missing, shapes, unexpected, differing = {}, [], [], [], []
    for key, (path, kind, shape, dtype) in expected.items():
        if _optional(module, key):
            flat[path] = np.zeros(shape, dtype)
            continue
        if key not in sd:
            missing.append(key)
            continue
        want = _torch_shape(shape, kind)
        if sd[key].shape != want:
            shapes.append(f"{key} {tuple(sd[key].shape)} (expected {want})")
            continue
        flat[path] = _to_flax(sd[key], kind).astype(dtype)
    batch_norm = module.norm == "batch"
    for key in sd:
        if key in expected and not _optional(module, key):
            continue
        targets: list[str] = []
        if key.startswith("decoder.encoder."):
            targets = [key[len("decoder."):]]
        elif (m := _ALL_MODULES.match(key)) is not None:
            targets = [f"{m.group(1)}.{sub}.{m.group(2)}" for sub in ("conv", "norm")]
        elif batch_norm and key.endswith(".norm.num_batches_tracked") \
                and key.replace("num_batches_tracked", "running_mean") in expected:
            continue
        targets = [t for t in targets if t in sd]
        if not targets:
            unexpected.append(key)
        elif not any(sd[t].shape == sd[key].shape and np.array_equal(sd[t], sd[key]) for t in targets):
            differing.append(key)
    problems = [f"{what} {len(keys)} key(s): {_few(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape for", shapes),
                 ("aliases differing from the tensor they name,", differing)) if keys]
    if problems:
        raise DatasetError(f"{source}: the state dict does not match the {ndim}D {type(module).__name__} "
                           f"of the plans: " + "; ".join(problems))
    return traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in flat.items()})

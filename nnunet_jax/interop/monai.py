"""PyTorch weights ↔ our U-Net variables: MONAI ``DynUNet`` state dicts and NVIDIA nnU-Net checkpoints.

The mapping is structural: every leaf of our variables (from :class:`~nnunet_jax.models.unet.UNet`) has
exactly one DynUNet key, so a missing, extra or mis-shaped key is an error that names it. torch is optional:
values may be numpy arrays or tensors, and torch is imported only to read a checkpoint file.

Key scheme (DynUNet):           ours
  input_block.*                   input_block
  downsamples.<l-1>.*             encoder_<l>            l = 1 .. L-2
  bottleneck.*                    bottleneck
  upsamples.<L-2-l>.*             decoder_<l>            transp_conv.conv → upconv, conv_block → block
  output_block.conv.conv.*        head
  deep_supervision_heads.<i-1>.conv.conv.*   ds_head_<i>
  in blocks: convN.conv.weight → convN.kernel; normN.{weight, bias, running_mean, running_var} →
  normN.{scale, bias} (params) and normN.{mean, var} (batch_stats).
  attention (seed names, no MONAI equivalent): conv_o.conv / conv_o.norm, conv_s.*, psi.conv / psi.norm.

Layouts: Conv (O, I, *k) → (*k, I, O). ConvTranspose (I, O, *k) → (*k, I, O) **without** a flip: our
:class:`~nnunet_jax.models.unet.UpConv` places ``kernel[r]`` at output offset ``r`` as PyTorch does (a
``lax.conv_transpose`` port would need the spatial flip, docs/reference.md §2).

DynUNet's ``skip_layers.*`` keys alias the same tensors (its recursive forward) and are skipped on load and
written on export. MONAI's default ``trans_bias=False`` leaves transposed convs without bias: when all of them
lack one we load zeros, which computes the same function.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nnunet_jax.models.unet import UNet

_TOP = re.compile(r"^(input_block|bottleneck|head|encoder_(\d+)|decoder_(\d+)|ds_head_(\d+))$")
_ATTENTION = {"conv_o": "conv_o.conv", "norm_o": "conv_o.norm", "conv_s": "conv_s.conv",
              "norm_s": "conv_s.norm", "conv_psi": "psi.conv", "norm_psi": "psi.norm"}
_LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias", ("params", "scale"): "weight",
         ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_ALIAS_PREFIX = "skip_layers."


def _torch_module(path: tuple[str, ...], depth: int) -> str:
    """Our module path (without the leaf) → DynUNet module key."""
    top, rest = path[0], list(path[1:])
    m = _TOP.match(top)
    if m is None:
        raise KeyError(f"unexpected top-level module {top!r} in the variables")
    if top == "head":
        return "output_block.conv.conv"
    if m.group(4):
        return f"deep_supervision_heads.{int(m.group(4)) - 1}.conv.conv"
    if m.group(2):
        prefix = f"downsamples.{int(m.group(2)) - 1}"
    elif m.group(3):
        prefix = f"upsamples.{depth - 2 - int(m.group(3))}"
    else:
        prefix = top
    parts = [prefix]
    for name in rest:
        if name == "upconv":
            parts.append("transp_conv.conv")
        elif name == "block":
            parts.append("conv_block")
        elif name in _ATTENTION:
            parts.append(_ATTENTION[name])
        elif name.startswith("conv"):
            parts.append(f"{name}.conv")
        else:
            parts.append(name)
    return ".".join(parts)


def _depth(flat: Mapping[tuple[str, ...], Any]) -> int:
    decoders = {p[1] for p in flat if p[1].startswith("decoder_")}
    return len(decoders) + 1


def _key_map(template: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[str, str]]:
    """(collection, *path, leaf) → (torch key, kind) with kind in {conv, upconv, vector}."""
    flat = traverse_util.flatten_dict(dict(template))
    depth = _depth(flat)
    out = {}
    for path in flat:
        collection, *modules, leaf = path
        key = f"{_torch_module(tuple(modules), depth)}.{_LEAF[(collection, leaf)]}"
        kind = "vector"
        if leaf == "kernel":
            kind = "upconv" if modules[-1] == "upconv" else "conv"
        out[path] = (key, kind)
    return out


def _to_ours(value: np.ndarray, kind: str) -> np.ndarray:
    nd = value.ndim - 2
    if kind == "conv":  # (O, I, *k) -> (*k, I, O)
        return np.transpose(value, (*range(2, 2 + nd), 1, 0))
    if kind == "upconv":  # (I, O, *k) -> (*k, I, O)
        return np.transpose(value, (*range(2, 2 + nd), 0, 1))
    return value


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
    nd = value.ndim - 2
    if kind == "conv":  # (*k, I, O) -> (O, I, *k)
        return np.transpose(value, (nd + 1, nd, *range(nd)))
    if kind == "upconv":  # (*k, I, O) -> (I, O, *k)
        return np.transpose(value, (nd, nd + 1, *range(nd)))
    return value


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    return _to_torch(np.empty(shape, dtype=np.uint8), kind).shape


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A DynUNet state dict from itself, a ``{"state_dict": ...}`` checkpoint or NVIDIA's ``model.`` keys."""
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    keys = list(obj)
    if any(k.startswith("model.") for k in keys):  # NVIDIA nnU-Net (Lightning): model.<DynUNet key>
        obj = {k[len("model."):]: v for k, v in obj.items() if k.startswith("model.")}
    return {k: _as_numpy(v) for k, v in obj.items()
            if not k.startswith(_ALIAS_PREFIX) and not k.endswith("num_batches_tracked")}


def variables_template(model: UNet, in_channels: int) -> dict[str, Any]:
    """Shapes of ``model``'s variables (``jax.eval_shape``, nothing allocated)."""
    size = np.prod(np.asarray(model.strides), axis=0)
    x = jax.ShapeDtypeStruct((1, *(int(s) for s in size), in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def torch_state_dict_to_variables(state_dict: Mapping[str, Any], model: UNet,
                                  in_channels: int | None = None) -> dict[str, Any]:
    """Load a DynUNet/NVIDIA state dict into ``{"params": ..., ["batch_stats": ...]}`` for ``model``.

    ``in_channels`` defaults to the input width of ``input_block.conv1``. Raises ``KeyError`` for missing or
    unused keys and ``ValueError`` for shape mismatches, listing every offending key.
    """
    sd = unwrap_state_dict(state_dict)
    if in_channels is None:
        first = "input_block.conv1.conv.weight"
        if first not in sd:
            raise KeyError(f"state dict has no {first!r}: not a DynUNet/nnU-Net state dict "
                           f"(first keys: {sorted(sd)[:5]})")
        in_channels = int(sd[first].shape[1])
    template = variables_template(model, in_channels)
    mapping = _key_map(template)
    shapes = traverse_util.flatten_dict(dict(template))
    upconv_biases = [key for key, _ in mapping.values() if key.endswith("transp_conv.conv.bias")]
    zero_bias = bool(upconv_biases) and not any(k in sd for k in upconv_biases)

    flat, missing, bad_shape, used = {}, [], [], set()
    for path, (key, kind) in mapping.items():
        want = tuple(shapes[path].shape)
        if key not in sd:
            if zero_bias and key in upconv_biases:
                flat[path] = np.zeros(want, np.float32)
                continue
            missing.append(key)
            continue
        used.add(key)
        value = sd[key]
        if value.shape != _torch_shape(want, kind):
            bad_shape.append(f"{key}: {value.shape} != expected {_torch_shape(want, kind)}")
            continue
        flat[path] = _to_ours(value, kind).astype(shapes[path].dtype)
    extra = sorted(set(sd) - used)
    if missing or extra:
        raise KeyError(f"state dict does not match the model: missing {sorted(missing)}, unexpected {extra}")
    if bad_shape:
        raise ValueError("shape mismatch: " + "; ".join(bad_shape))
    return traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in flat.items()})


def _aliases(key: str, depth: int) -> list[str]:
    """DynUNet's ``skip_layers.*`` names of the same tensor (one recursion level per U-Net level)."""
    m = re.match(r"^(input_block|bottleneck|downsamples\.(\d+)|upsamples\.(\d+)|"
                 r"deep_supervision_heads\.(\d+)\.conv)\.(.*)$", key)
    if m is None:
        return []
    head, rest = m.group(1), m.group(5)
    if head == "input_block":
        return [f"{_ALIAS_PREFIX}downsample.{rest}"]
    if head == "bottleneck":
        return [_ALIAS_PREFIX + "next_layer." * (depth - 1) + rest]
    if m.group(2) is not None:
        return [_ALIAS_PREFIX + "next_layer." * (int(m.group(2)) + 1) + "downsample." + rest]
    if m.group(3) is not None:
        return [_ALIAS_PREFIX + "next_layer." * (depth - 2 - int(m.group(3))) + "upsample." + rest]
    return [_ALIAS_PREFIX + "next_layer." * (int(m.group(4)) + 1) + "super_head.conv." + rest]


def params_to_torch_state_dict(variables: Mapping[str, Any], *, trans_bias: bool = True,
                               monai_aliases: bool = True) -> dict[str, np.ndarray]:
    """Our variables → a DynUNet state dict of numpy arrays (``torch.from_numpy`` each to load it).

    ``trans_bias=False`` drops the transposed-conv biases (MONAI's default ``DynUNet(trans_bias=False)``);
    ``monai_aliases`` adds the ``skip_layers.*`` keys that ``DynUNet.load_state_dict(strict=True)`` expects.
    """
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    mapping = _key_map(variables)
    flat = traverse_util.flatten_dict(variables)
    depth = _depth(flat)
    out: dict[str, np.ndarray] = {}
    for path, (key, kind) in mapping.items():
        if not trans_bias and key.endswith("transp_conv.conv.bias"):
            continue
        out[key] = np.ascontiguousarray(_to_torch(np.array(flat[path], dtype=np.float32), kind))
    for key in [k for k in out if k.endswith("running_mean")]:
        out[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    if monai_aliases:
        out.update({alias: value for key, value in list(out.items()) for alias in _aliases(key, depth)})
    return out


def load_torch_checkpoint(path: str | Path, model: UNet, in_channels: int | None = None) -> dict[str, Any]:
    """Read a ``.pt``/``.ckpt`` file (needs torch); convert it with :func:`torch_state_dict_to_variables`."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is optional
        raise ImportError(f"reading {path} needs torch (pip install torch); or pass a state dict of numpy "
                          "arrays to torch_state_dict_to_variables") from err
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot read a PyTorch checkpoint: {err}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    try:
        return torch_state_dict_to_variables(obj, model, in_channels)
    except (KeyError, ValueError) as err:
        raise type(err)(f"{path}: {err}") from err

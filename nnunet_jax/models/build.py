"""The network of a run, built in one place from its plan and options (training, validation, prediction).

A run's options are the config fields that shape the model (filters, norm, residual, deep supervision, ...),
its precision (``--amp`` with ``--amp_dtype``: bf16 or fp16 compute on fp32 master weights) and the label
mode (BraTS regions: 3 sigmoid outputs). ``--preset resenc_m|l|xl`` builds nnU-Net v2's residual-encoder
U-Net (models/resenc.py) on the plan's topology instead of the seed's U-Net. Training and prediction build
the same model from the same options, so a checkpoint always fits the model that restores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from nnunet_jax.labels import LabelSpec, use_brats
from nnunet_jax.models.unet import UNet

if TYPE_CHECKING:
    from nnunet_jax.models.resenc import ResEncUNet

__all__ = ["build_model", "compute_dtype", "uses_fp16"]

_AMP_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


def uses_fp16(config: Mapping[str, Any] | Any) -> bool:
    """fp16 mixed precision (needs the dynamic loss scale); bf16 does not."""
    return bool(config.get("amp", False)) and str(config.get("amp_dtype", "bf16")) == "fp16"


def compute_dtype(config: Mapping[str, Any] | Any) -> Any:
    """The dtype the network computes in: fp32, or the ``--amp_dtype`` under ``--amp``."""
    if not config.get("amp", False):
        return jnp.float32
    name = str(config.get("amp_dtype", "bf16"))
    if name not in _AMP_DTYPES:
        raise ValueError(f"--amp_dtype must be one of {sorted(_AMP_DTYPES)}, got {name!r}")
    return _AMP_DTYPES[name]


def build_model(config: Mapping[str, Any] | Any, plan: Any) -> UNet | ResEncUNet:
    """The network of ``plan`` (a :class:`nnunet_jax.plan.Plan`; with a preset, the plan
    ``planning.presets.apply_preset`` made) with the run's options from ``config``."""
    if plan.topology is None:
        raise ValueError("the plan has no topology (preprocess the dataset again)")
    spec = LabelSpec.of(plan, use_brats(config))
    if str(config.get("preset") or "nnunet") != "nnunet":  # imported only then: the plan/NIfTI modules stay
        from nnunet_jax.models.resenc import resenc_from_topology  # out of bare benchmark runs
        from nnunet_jax.planning.presets import preset_of

        preset_of(config)  # an unknown name is an error here, before any network is built
        return resenc_from_topology(plan.topology, spec.n_outputs, config, compute_dtype(config))
    return UNet.from_topology(
        plan.topology, spec.n_outputs, filters=tuple(config.get("filters") or ()) or None,
        norm=str(config.get("norm", "instance")), negative_slope=float(config.get("negative_slope", 0.01)),
        residual=bool(config.get("residual", False)),
        deep_supervision=bool(config.get("deep_supervision", False)),
        deep_supr_num=int(config.get("deep_supr_num", 2)), attention=bool(config.get("attention", False)),
        drop_block=bool(config.get("drop_block", False)), dtype=compute_dtype(config))

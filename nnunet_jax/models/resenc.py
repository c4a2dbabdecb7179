"""The residual-encoder U-Net of ``--preset resenc_m|l|xl`` in the training loop's interface.

The network is dna's ``ResidualEncoderUNet`` as ``models/dynamic_unet.py`` ports it (forward equal to dna's,
tests/parity/test_nnv2_preset.py), with the arch kwargs v2's ResEnc planners write, built on our plan's
topology. This subclass only adapts what the loop expects of a model (``models/unet.py``'s ``UNet``):

- outputs: logits, or with ``deep_supervision`` and ``train=True`` the tuple ``(main, head_1, .., head_k)``,
  ``head_i`` at decoder level ``i``'s resolution, ``k = deep_supr_num`` (dna returns every head, highest
  resolution first; v2's loss gives the lowest one weight 0, so ``k = levels - 3`` is v2's training);
- ``widths``: the channels per level, recorded in the run's identity.

Parameter names stay dna's, so ``interop.nnunetv2.network.load_weights`` fills this module from a v2
checkpoint of the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from nnunet_jax.models.dynamic_unet import ResidualEncoderUNet
from nnunet_jax.planning.presets import encoder_blocks
from nnunet_jax.planning.topology import Topology

__all__ = ["ResEncUNet", "resenc_from_topology"]

NORMS = ("instance", "batch")  # dna's; the seed's group norm has no ResEnc counterpart
_UNUSED = ("residual", "attention", "drop_block")  # seed options of models/unet.py's blocks


class ResEncUNet(ResidualEncoderUNet):
    """dna's ResidualEncoderUNet with the seed U-Net's output convention (module docstring)."""

    deep_supr_num: int = 2

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(f) for f in self.features_per_stage)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | tuple[jax.Array, ...]:
        if self.deep_supervision and not 1 <= self.deep_supr_num <= self.n_stages - 2:
            raise ValueError(f"deep_supr_num must be in [1, {self.n_stages - 2}] for {self.n_stages} levels, "
                             f"got {self.deep_supr_num}")
        outputs = super().__call__(x, train)
        if not self.deep_supervision:
            return outputs
        return tuple(outputs[: self.deep_supr_num + 1]) if train else outputs[0]


def resenc_from_topology(topology: Topology, n_class: int, config: Mapping[str, Any] | Any,
                         dtype: Any) -> ResEncUNet:
    """The preset network of ``topology`` with the run's options (``filters``, ``norm``,
    ``negative_slope``, deep supervision); ValueError for a seed option it does not have."""
    given = [f"--{k}" for k in _UNUSED if config.get(k, False)]
    if given:
        raise ValueError(f"{', '.join(given)}: options of the seed's U-Net; --preset "
                         f"{config.get('preset')} trains nnU-Net v2's residual encoder U-Net without them")
    norm = str(config.get("norm", "instance"))
    if norm not in NORMS:
        raise ValueError(f"--norm {norm}: --preset {config.get('preset')} supports {', '.join(NORMS)}")
    filters = tuple(config.get("filters") or ()) or topology.filters
    n = topology.depth
    if len(filters) != n:
        raise ValueError(f"{len(filters)} filters given for a {n}-level network")
    return ResEncUNet(
        n_stages=n, features_per_stage=tuple(int(f) for f in filters), kernel_sizes=topology.kernels,
        strides=topology.strides, n_blocks_per_stage=encoder_blocks(n), num_classes=n_class,
        n_conv_per_stage_decoder=(1,) * (n - 1), conv_bias=True, norm=norm,
        negative_slope=float(config.get("negative_slope", 0.01)),
        deep_supervision=bool(config.get("deep_supervision", False)),
        deep_supr_num=int(config.get("deep_supr_num", 2)), dtype=dtype)

"""nnU-Net v2's residual-encoder presets (ResEnc M, L, XL): the network they train and the patch and batch
they plan for a GPU memory target (docs/presets.md).

The presets are one architecture (``ResidualEncoderUNet``: a stem conv, then 1, 3, 4, 6, 6, ... BasicBlockD
per encoder stage, one conv per decoder stage, 32 features doubling up to 320 in 3D / 512 in 2D) planned
for three memory targets: 8, 24 and 40 GB. v2's planners (``residual_encoder_unet_planners.py``) estimate the
memory of a patch as the number of feature-map values the network writes (dna's
``compute_conv_feature_map_size``), and compare it with a budget measured to fit the target at batch 2
(3D) or 12 (2D). We plan the same way, on our topology rule (docs/reference.md §1):

1. start from the patch with the aspect ratio of ``1 / spacing`` and the volume of 256³ (2D: 2048²),
   clipped to the median shape, rounded down to what the topology halves exactly;
2. while the estimate exceeds the budget, shorten the axis that is longest relative to the median shape by
   its downsampling factor and round again;
3. batch = ``round(budget / estimate * reference batch)``, at most the batch whose patches hold as many voxels
   as the dataset (median shape × training cases), at least 2.

Why at training time and not in preprocessing: the preprocessed voxels do not depend on the preset (v2's
ResEnc plans reuse the default plans' data too), only the patch cropped from them, the topology and the
batch. Planning is a pure function of the plan's spacing, median shape and case count, so a run plans once
when it starts and records the result in its config.json, where prediction reads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from nnunet_jax.io import DatasetError
from nnunet_jax.plan import Plan
from nnunet_jax.planning.topology import Topology, fit_patch, get_kernels_strides, plan_topology

__all__ = ["DEFAULT", "PRESETS", "Preset", "PresetPlan", "apply_preset", "encoder_blocks",
           "feature_map_size", "plan_preset", "preset_dataset", "preset_of"]

DEFAULT = "nnunet"  # the seed's U-Net (models/unet.py) with the plan's own patch and batch
_BLOCKS = (1, 3, 4)  # then 6 per stage (v2: UNet_blocks_per_stage_encoder)
_REFERENCE_BATCH = {2: 12, 3: 2}  # the batch each budget was measured at (v2's UNet_reference_val_corresp_bs)
_MIN_BATCH = 2
_INITIAL_VOXELS = {2: 2048**2, 3: 256**3}


@dataclass(frozen=True)
class Preset:
    """One v2 planner: its GPU memory target and its feature-map budget per dimension at that target
    (``UNet_reference_val_2d/3d`` × target / ``UNet_reference_val_corresp_GB``, here target = reference)."""

    name: str
    planner: str  # v2's class, for the docs and the record
    vram_gb: float
    budget_2d: float
    budget_3d: float

    def budget(self, dim: int) -> float:
        return self.budget_3d if dim == 3 else self.budget_2d


PRESETS = {p.name: p for p in (
    Preset("resenc_m", "nnUNetPlannerResEncM", 8, 135e6, 680e6),
    Preset("resenc_l", "nnUNetPlannerResEncL", 24, 380e6, 2100e6),
    Preset("resenc_xl", "nnUNetPlannerResEncXL", 40, 560e6, 3600e6),
)}


def preset_of(config: Any) -> Preset | None:
    """The run's ``--preset`` (None for the seed's U-Net); ValueError for an unknown name."""
    name = str(config.get("preset", DEFAULT) or DEFAULT)
    if name == DEFAULT:
        return None
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {[DEFAULT, *PRESETS]}, got {name!r}")
    return PRESETS[name]


def encoder_blocks(n_stages: int) -> tuple[int, ...]:
    """BasicBlockD per encoder stage: 1, 3, 4, then 6."""
    return tuple(_BLOCKS[s] if s < len(_BLOCKS) else 6 for s in range(n_stages))


def feature_map_size(patch: Sequence[int], strides: Sequence[Sequence[int]], features: Sequence[int],
                     n_classes: int, decoder_convs: int = 1) -> int:
    """Values the ResEnc U-Net writes for one patch, counted as dna's ``compute_conv_feature_map_size``
    counts them (every conv output, the projection skips, the transposed convs, the final head only)."""
    size, total, width = [int(p) for p in patch], features[0] * math.prod(patch), features[0]  # stem
    sizes = []
    for f, stride, n_blocks in zip(features, strides, encoder_blocks(len(strides)), strict=True):
        after = [a // s for a, s in zip(size, stride, strict=True)]
        voxels = math.prod(after)
        projected = width != f or after != size  # the first block's skip: AvgPool + 1x1 conv + norm
        total += 2 * f * voxels * n_blocks + (f * voxels if projected else 0)
        size, width = after, f
        sizes.append(after)
    for level in range(len(strides) - 2, -1, -1):  # decoder, lowest resolution first
        voxels = math.prod(sizes[level])
        total += (decoder_convs + 1) * features[level] * voxels  # its convs and its transposed conv
    return total + n_classes * math.prod(sizes[0])


@dataclass(frozen=True)
class PresetPlan:
    """What a preset plans for one dataset: patch, topology, per-device batch and the estimate behind it."""

    preset: Preset
    patch_size: tuple[int, ...]
    topology: Topology
    batch_size: int
    estimate: int

    def describe(self) -> str:
        return (f"--preset {self.preset.name} ({self.preset.planner}, {self.preset.vram_gb:g} GB): "
                f"{self.estimate:.3g} of {self.preset.budget(len(self.patch_size)):.3g} feature-map values "
                f"per patch, batch {self.batch_size}")


def _estimate(patch: Sequence[int], spacing: Sequence[float], n_classes: int) -> tuple[Topology, int]:
    topo = plan_topology(patch, spacing)
    return topo, feature_map_size(patch, topo.strides, topo.filters, n_classes)


def _factor(patch: Sequence[int], spacing: Sequence[float], axis: int) -> int:
    """The total downsampling of ``axis`` in the topology of ``patch`` (what it must be divisible by)."""
    return math.prod(s[axis] for s in get_kernels_strides(patch, spacing)[1])


def plan_preset(plan: Plan, preset: Preset) -> PresetPlan:
    """The patch, topology and batch ``preset`` plans from ``plan``'s spacing, median shape and training
    cases (module docstring); DatasetError when the plan lacks them (plans written before they were kept)."""
    missing = [k for k in ("spacing", "median_shape") if getattr(plan, k) is None]
    if missing:
        raise DatasetError(f"--preset {preset.name} plans from the plan's {' and '.join(missing)}, which "
                           "this plan.json lacks; preprocess the dataset again")
    dim = plan.dim
    spacing = np.asarray(plan.spacing, np.float64)
    median = np.asarray(plan.median_shape, np.float64)
    inverse = 1.0 / spacing
    initial = inverse * (_INITIAL_VOXELS[dim] / np.prod(inverse)) ** (1.0 / dim)
    patch = fit_patch([max(min(round(float(i)), int(m)), 1) for i, m in zip(initial, median, strict=True)],
                      spacing)
    budget = preset.budget(dim)
    topo, estimate = _estimate(patch, spacing, plan.n_class)
    while estimate > budget:
        # v2's step: the axis longest relative to the median (the last of equals), shortened by its factor
        # in the topology of the patch shortened by the current factor (so no valid length is skipped)
        axis = int(np.argsort(np.asarray(patch) / median, kind="stable")[-1])
        probe = [p - _factor(patch, spacing, axis) if a == axis else p for a, p in enumerate(patch)]
        shorter = [p - _factor(probe, spacing, axis) if a == axis else p for a, p in enumerate(patch)]
        if min(shorter) < 1 or (shorter := fit_patch(shorter, spacing)) == patch:
            break  # nothing left to shorten: the smallest patch the topology allows
        patch = shorter
        topo, estimate = _estimate(patch, spacing, plan.n_class)
    batch = round(budget / estimate * _REFERENCE_BATCH[dim])
    n_cases = len(plan.training_cases or ()) or 1
    dataset_cap = round(float(np.prod(median)) * n_cases / math.prod(patch))
    batch = max(min(batch, dataset_cap), _MIN_BATCH)
    return PresetPlan(preset, tuple(patch), topo, int(batch), int(estimate))


def apply_preset(config: Any, plan: Plan) -> Plan:
    """The plan a ``--preset`` run trains with: the preset's patch and topology, the planning recorded in
    ``source["preset"]``; ``config.batch_size`` 0 becomes the planned per-device batch. The seed's U-Net
    (``--preset nnunet``) keeps the plan and the batch as they are."""
    preset = preset_of(config)
    if preset is None:
        return plan
    planned = plan_preset(plan, preset)
    if int(config.get("batch_size", 0)) == 0:  # a ConfigDict or a dict (a run's config.json)
        config["batch_size"] = planned.batch_size
    return replace(plan, patch_size=planned.patch_size, topology=planned.topology,
                   source={**plan.source, "preset": planned.describe(),
                           "patch_size": f"planned for --preset {preset.name}"})


def preset_dataset(config: Any, dataset: Any) -> Any:
    """A preprocessed dataset (``data.dataset.PreprocessedDataset``) whose plan is :func:`apply_preset`'s,
    so that the loader crops the preset's patch; unchanged without a preset."""
    plan = apply_preset(config, dataset.plan)
    return dataset if plan is dataset.plan else replace(dataset, plan=plan)

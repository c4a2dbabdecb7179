"""What the network's output channels mean: one softmax logit per class, or one sigmoid per region.

Every stage that turns labels into targets or outputs back into labels asks this module (as nnU-Net v2's
``LabelManager``): :class:`LabelSpec` says, for one plan and one run, how many outputs the model has, what
its targets are (:meth:`LabelSpec.targets`), which voxels are annotated (the plan's ignore label), what each
validation score is called and how outputs become a label map (:meth:`LabelSpec.to_labels`).

Regions (nnU-Net v2 ``dataset.json`` labels whose values are lists, with ``regions_class_order``): one sigmoid
output per region in the plan's order; a voxel belongs to a region when its label is one of the region's
values; back to labels, each region in turn paints ``regions_class_order[i]`` where its probability is above
0.5 (later regions win, as v2's ``convert_probabilities_to_segmentation``).

BraTS (``--brats``) is one instance (docs/reference.md §4): WT = labels {1, 2, 3, 4}, TC = {1, 3, 4}, ET =
{3, 4} (label 4 counts as 3, so raw BraTS labels (0, 1, 2, 4) and the MSD task's (0-3) both work), painted
back WT → 2 (oedema), TC → 1 (necrosis), ET → 3, or 4 when the plan's labels use 4.
:func:`brats_regions`, :func:`region_masks` and :func:`regions_to_labels` are the BraTS-only forms kept for
their callers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["BRATS_MAX_LABEL", "BRATS_N_CLASS", "BRATS_REGIONS", "REGIONS", "LabelSpec", "brats_regions",
           "paint_regions", "region_targets", "regions_to_labels", "use_brats"]

REGIONS = ("WT", "TC", "ET")  # the BraTS region outputs, in channel order
BRATS_REGIONS = (("WT", (1, 2, 3, 4)), ("TC", (1, 3, 4)), ("ET", (3, 4)))  # name, label values
BRATS_N_CLASS = (4, 5)  # BraTS label sets: 0-3, or 0, 1, 2, 4
BRATS_MAX_LABEL = 4

Regions = tuple[tuple[str, tuple[int, ...]], ...]


def use_brats(config: Mapping[str, Any] | Any) -> bool:
    """BraTS region mode (``--brats``); configs saved before the flag existed lack it."""
    return bool(config.get("brats", False))


def _regions(labels: Any, xp: Any, axis: int) -> Any:
    """WT, TC, ET masks of BraTS labels (1 NCR, 2 ED, 3 or 4 ET), stacked along ``axis`` (numpy or jax)."""
    et = (labels == 3) | (labels == 4)
    return xp.stack([labels > 0, (labels == 1) | et, et], axis=axis)


def brats_regions(labels: Any) -> Any:
    """Float targets ``(..., 3)`` = (WT, TC, ET) from BraTS labels; jit-able."""
    return _regions(labels, jnp, -1).astype(jnp.float32)


def region_masks(labels: np.ndarray) -> np.ndarray:
    """The regions of a label map as int 0/1 maps ``(3, *spatial)`` (WT, TC, ET), on the host."""
    return _regions(np.asarray(labels), np, 0).astype(np.int32)


def region_targets(labels: Any, values: Sequence[Sequence[int]], xp: Any = jnp, axis: int = -1) -> Any:
    """Boolean region masks of a label map (label in the region's values), one per region stacked along
    ``axis``; numpy (``xp=np``) or jax (jit-able: the values are static)."""
    masks = []
    for region in values:
        inside = labels == region[0]
        for v in region[1:]:
            inside = inside | (labels == v)
        masks.append(inside)
    return xp.stack(masks, axis=axis)


def paint_regions(probs: np.ndarray, class_order: Sequence[int], threshold: float = 0.5) -> np.ndarray:
    """Region probabilities ``(R, *spatial)`` → uint8 labels: region i paints ``class_order[i]`` where it is
    above ``threshold``, in order (nnU-Net v2's rule for ``regions_class_order``)."""
    probs = np.asarray(probs)
    if probs.shape[0] != len(class_order):
        raise ValueError(f"{len(class_order)} regions need as many channels, got shape {probs.shape}")
    out = np.zeros(probs.shape[1:], np.uint8)
    for p, label in zip(probs, class_order, strict=True):
        out[p > threshold] = label
    return out


def regions_to_labels(probs: np.ndarray, threshold: float = 0.5, et_label: int = 3) -> np.ndarray:
    """BraTS region probabilities ``(3, *spatial)`` (WT, TC, ET) → labels: WT 2, TC 1, ET ``et_label``."""
    probs = np.asarray(probs)
    if probs.shape[0] != len(REGIONS):
        raise ValueError(f"BraTS region output needs 3 channels (WT, TC, ET), got shape {probs.shape}")
    return paint_regions(probs, (2, 1, et_label), threshold)


@dataclass(frozen=True)
class LabelSpec:
    """The output channels of one model: ``n_class`` classes (background included), or ``regions`` (name,
    label values) with their ``regions_class_order``; ``ignore_label`` marks unannotated voxels.

    ``brats=True`` fills in the BraTS regions. Hashable, so jitted functions may take it as a static argument.
    """

    n_class: int
    brats: bool = False
    et_label: int = 3  # the label ET is written as: 4 when the dataset uses 4
    regions: Regions | None = None
    regions_class_order: tuple[int, ...] | None = None
    ignore_label: int | None = None

    def __post_init__(self) -> None:
        if self.brats and self.regions is None:
            object.__setattr__(self, "regions", BRATS_REGIONS)
            object.__setattr__(self, "regions_class_order", (2, 1, self.et_label))
        if self.regions is not None and len(self.regions_class_order or ()) != len(self.regions):
            raise ValueError(f"regions {[n for n, _ in self.regions]} need one regions_class_order value "
                             f"each, got {self.regions_class_order}")

    @classmethod
    def of(cls, plan: Any, brats: bool = False) -> LabelSpec:
        """For a :class:`nnunet_jax.plan.Plan`: BraTS with ``brats`` (needs a BraTS label set: ValueError
        otherwise), else the plan's regions when it has them, else its classes; the plan's ignore label."""
        ignore = getattr(plan, "ignore_label", None)
        if brats:
            if plan.n_class not in BRATS_N_CLASS:
                raise ValueError(f"--brats needs BraTS labels (0-3, or 0, 1, 2, 4), but the plan has n_class "
                                 f"{plan.n_class}")
            return cls(plan.n_class, True, 4 if "4" in plan.labels else 3, ignore_label=ignore)
        regions = getattr(plan, "regions", None)
        if regions:
            return cls(plan.n_class, regions=tuple((str(k), tuple(v)) for k, v in regions.items()),
                       regions_class_order=tuple(plan.regions_class_order or ()), ignore_label=ignore)
        return cls(plan.n_class, ignore_label=ignore)

    @property
    def uses_regions(self) -> bool:
        """Sigmoid region outputs (BraTS or a v2 region plan) rather than softmax classes."""
        return self.regions is not None

    @property
    def region_values(self) -> tuple[tuple[int, ...], ...]:
        """The label values of each region, in output order (empty without regions)."""
        return tuple(v for _, v in self.regions or ())

    @property
    def n_outputs(self) -> int:
        """Model output channels: one sigmoid per region, else one logit per class."""
        return len(self.regions) if self.regions is not None else self.n_class

    @property
    def n_scores(self) -> int:
        """Validation Dice values per case: one per region, or one per foreground class."""
        return len(self.regions) if self.regions is not None else self.n_class - 1

    @property
    def score_names(self) -> list[str]:
        """What the validation Dice values are, in order: the regions, or the foreground class numbers."""
        if self.regions is not None:
            return [name for name, _ in self.regions]
        return [str(c) for c in range(1, self.n_class)]

    def targets(self, labels: Any) -> Any:
        """Float region targets ``(..., R)`` of integer labels ``(...)``; jit-able."""
        return region_targets(labels, self.region_values).astype(jnp.float32)

    def to_labels(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities ``(K, *spatial)`` → uint8 label map (regions thresholded at 0.5, else argmax)."""
        if self.regions is not None:
            return paint_regions(probs, self.regions_class_order)
        return np.argmax(probs, axis=0).astype(np.uint8)

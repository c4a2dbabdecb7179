"""What the network's output channels mean: one softmax logit per class, or BraTS's three sigmoid regions.

Every stage that turns labels into targets or outputs back into labels asks this module (as nnU-Net v2's
``LabelManager``): the loss and the validation Dice build the region targets with :func:`brats_regions`,
scoring compares region masks, prediction converts region probabilities back to a label map with
:func:`regions_to_labels`, and :class:`LabelSpec` says, for one plan and one run, how many outputs the model
has and what each validation score is called.

BraTS regions (docs/reference.md §4): WT = label > 0, TC = label in {1, 3}, ET = label == 3; label 4 counts as
3, so raw BraTS labels (0, 1, 2, 4) and the MSD task's (0-3) both work. Back to labels: WT → 2 (oedema),
TC → 1 (necrosis), ET → 3, or 4 when the plan's labels use 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["BRATS_MAX_LABEL", "BRATS_N_CLASS", "REGIONS", "LabelSpec", "brats_regions", "regions_to_labels",
           "use_brats"]

REGIONS = ("WT", "TC", "ET")  # the region outputs, in channel order
BRATS_N_CLASS = (4, 5)  # BraTS label sets: 0-3, or 0, 1, 2, 4
BRATS_MAX_LABEL = 4


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


def regions_to_labels(probs: np.ndarray, threshold: float = 0.5, et_label: int = 3) -> np.ndarray:
    """Region probabilities ``(3, *spatial)`` (WT, TC, ET) → labels: WT 2, TC 1, ET ``et_label``."""
    probs = np.asarray(probs)
    if probs.shape[0] != len(REGIONS):
        raise ValueError(f"BraTS region output needs 3 channels (WT, TC, ET), got shape {probs.shape}")
    out = np.zeros(probs.shape[1:], np.uint8)
    out[probs[0] > threshold] = 2
    out[probs[1] > threshold] = 1
    out[probs[2] > threshold] = et_label
    return out


@dataclass(frozen=True)
class LabelSpec:
    """The output channels of one model: ``n_class`` classes (background included), regions or not."""

    n_class: int
    brats: bool = False
    et_label: int = 3  # the label ET is written as: 4 when the dataset uses 4

    @classmethod
    def of(cls, plan: Any, brats: bool = False) -> LabelSpec:
        """For a :class:`nnunet_jax.plan.Plan`; BraTS mode needs a BraTS label set (ValueError otherwise)."""
        if brats and plan.n_class not in BRATS_N_CLASS:
            raise ValueError(f"--brats needs BraTS labels (0-3, or 0, 1, 2, 4), but the plan has n_class "
                             f"{plan.n_class}")
        return cls(plan.n_class, brats, 4 if "4" in plan.labels else 3)

    @property
    def n_outputs(self) -> int:
        """Model output channels: 3 sigmoid regions, else one logit per class."""
        return len(REGIONS) if self.brats else self.n_class

    @property
    def n_scores(self) -> int:
        """Validation Dice values per case: one per region, or one per foreground class."""
        return len(REGIONS) if self.brats else self.n_class - 1

    @property
    def score_names(self) -> list[str]:
        """What the validation Dice values are, in order: the regions, or the foreground class numbers."""
        return list(REGIONS) if self.brats else [str(c) for c in range(1, self.n_class)]

    def to_labels(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities ``(K, *spatial)`` → uint8 label map (regions thresholded at 0.5, else argmax)."""
        if self.brats:
            return regions_to_labels(probs, 0.5, self.et_label)
        return np.argmax(probs, axis=0).astype(np.uint8)

"""Post-processing decided from cross-validation: keep only the largest connected component, where it helps.

The decision is nnU-Net v2's ``determine_postprocessing`` (tests/parity/test_postprocessing_nnv2.py checks it
against v2 on the same predictions and labels), run on the validation predictions of all folds together:

1. *All foreground as one*: keep the largest component of the union of the foreground labels (everything
   else becomes background). Taken when the mean over targets of the mean Dice rises strictly and no
   target's mean Dice falls.
2. *Per target*, only when there are several, in the order of the dataset's labels (or regions), each tried
   on the result of the steps taken so far: keep the largest component of that label/region; taken when
   that target's mean Dice rises strictly.

Targets are the foreground classes, or for region models the regions (a region is a tuple of labels; its
mask is the union of their voxels in the label map, so removing one region's stray components can change
overlapping regions too, as in v2). Components use full connectivity (26 neighbours in 3D, as scikit-image's
default that v2 uses); when several components tie for the largest, all of them are kept. The Dice is v2's
``2 TP / (2 TP + FP + FN)`` with a case where prediction and label are both empty counted as NaN and left out
of the mean (not as 1, as our training and evaluate.py do), and voxels of the ignore label in the reference
count nowhere.

The decision file (``postprocessing.json``, ours, written atomically by :func:`save`)::

    {"format": "nnunet_jax.postprocessing/1",
     "steps": [{"keep_largest_component": [1, 2]}, {"keep_largest_component": [[1, 2, 3]]}],
     "targets": [1, 2], "foreground_labels": [1, 2], "ignore_label": null,
     "decisions": [{"step": "all foreground", "keep_largest_component": [1, 2], "applied": true,
                    "dice (%) before": 71.3, "dice (%) after": 74.0}, ...],
     "dice (%) before": {"mean": ..., "per_target": {"1": ..., ...}}, "dice (%) after": {...},
     "n_cases": 30, "runs": ["/abs/run_fold0", ...], "predictions": [...], "labels": "/abs/labelsTr"}

``steps`` is what is applied, in order: each keeps the largest component of the union of its entries (an int
is a label, a list of ints a region) and sets the rest of that union to background (0). ``runs`` are the
training runs whose predictions were scored: predict.py applies the file by itself only to an ensemble of
exactly those runs (:func:`find_for_runs`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage.measure import label as connected_components

__all__ = ["FORMAT", "FILE_NAME", "Decision", "apply", "determine", "dice_per_target", "find_for_runs",
           "keep_largest", "load", "run_dir", "save", "targets_of", "apply_to_file"]

FORMAT = "nnunet_jax.postprocessing/1"
FILE_NAME = "postprocessing.json"
DICE = "dice (%)"

Target = int | tuple[int, ...]  # a label, or a region (the union of several labels)
Step = tuple[Target, ...]  # keep the largest component of the union of these targets
CaseLoader = Callable[[str], tuple[np.ndarray, np.ndarray]]  # case -> (predicted labels, reference labels)


def mask_of(seg: np.ndarray, target: Target) -> np.ndarray:
    """Voxels of a label, or of any label of a region."""
    return np.isin(seg, target) if isinstance(target, tuple) else seg == target


def keep_largest(seg: np.ndarray, targets: Step, background: int = 0) -> np.ndarray:
    """A copy of ``seg`` where the union of ``targets`` keeps only its largest component(s) (full
    connectivity); the voxels of the others become ``background``."""
    mask = np.zeros(seg.shape, bool)
    for t in targets:
        mask |= mask_of(seg, t)
    components, n = connected_components(mask, return_num=True)
    out = np.array(seg, copy=True)
    if n > 1:
        sizes = np.bincount(components.ravel())[1:]
        keep = np.flatnonzero(sizes == sizes.max()) + 1
        out[mask & ~np.isin(components, keep)] = background
    return out


def apply(seg: np.ndarray, steps: Iterable[Step]) -> np.ndarray:
    """``seg`` after each step, in order (``seg`` itself is not changed)."""
    for step in steps:
        seg = keep_largest(seg, step)
    return seg


def dice_per_target(pred: np.ndarray, ref: np.ndarray, targets: Sequence[Target],
                    ignore_label: int | None = None) -> list[float]:
    """v2's per-case Dice of each target: ``2 TP / (2 TP + FP + FN)``, NaN when both masks are empty; voxels
    labelled ``ignore_label`` in ``ref`` are left out."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != label shape {ref.shape}")
    use = None if ignore_label is None else ref != ignore_label
    out = []
    for t in targets:
        p, r = mask_of(pred, t), mask_of(ref, t)
        if use is not None:
            p, r = p & use, r & use
        tp = int(np.count_nonzero(p & r))
        fp_fn = int(np.count_nonzero(p ^ r))
        out.append(2 * tp / (2 * tp + fp_fn) if tp + fp_fn else math.nan)
    return out


@dataclass
class Scores:
    """Mean Dice (fraction) per target over the cases (NaN cases left out), and their mean (v2's
    ``foreground_mean``)."""

    per_target: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_target))

    def to_json(self, targets: Sequence[Target]) -> dict[str, Any]:
        per = zip(targets, self.per_target, strict=True)
        return {"mean": percent(self.mean), "per_target": {target_key(t): percent(v) for t, v in per}}


def score_cases(cases: Sequence[str], load_case: CaseLoader, steps: Sequence[Step], targets: Sequence[Target],
                ignore_label: int | None = None) -> Scores:
    """Mean Dice per target of the predictions after ``steps``, over ``cases``."""
    rows = []
    for case in cases:
        pred, ref = load_case(case)
        try:
            rows.append(dice_per_target(apply(pred, steps), ref, targets, ignore_label))
        except ValueError as e:
            raise ValueError(f"case {case}: {e}") from None
    with warnings.catch_warnings():  # a target absent from every case: nanmean warns, NaN is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        return Scores([float(v) for v in np.nanmean(np.array(rows, np.float64).reshape(-1, len(targets)), 0)])


@dataclass
class Decision:
    """What :func:`determine` decided: the steps to apply, and the Dice before/after each try."""

    steps: list[Step]
    targets: list[Target]
    foreground_labels: list[int]
    ignore_label: int | None
    before: Scores
    after: Scores
    decisions: list[dict[str, Any]]
    n_cases: int
    sources: dict[str, Any] = field(default_factory=dict)  # runs, predictions, labels: where it came from

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "steps": [{"keep_largest_component": _jsonable(s)} for s in self.steps],
                "targets": _jsonable(self.targets), "foreground_labels": list(self.foreground_labels),
                "ignore_label": self.ignore_label, "decisions": self.decisions,
                f"{DICE} before": self.before.to_json(self.targets),
                f"{DICE} after": self.after.to_json(self.targets), "n_cases": self.n_cases, **self.sources}

    def describe(self) -> str:
        """One line: what is applied."""
        return describe_steps(self.steps)


def determine(cases: Sequence[str], load_case: CaseLoader, targets: Sequence[Target],
              foreground_labels: Sequence[int], ignore_label: int | None = None,
              log: Callable[[str], None] | None = None) -> Decision:
    """nnU-Net v2's decision (module docstring) on the predictions ``load_case`` gives for ``cases``."""
    if not cases:
        raise ValueError("no cases to decide the post-processing on")
    targets = list(targets)
    say = log or (lambda _: None)
    base = score_cases(cases, load_case, [], targets, ignore_label)
    fg: Step = tuple(int(label) for label in foreground_labels)
    tried = score_cases(cases, load_case, [fg], targets, ignore_label)
    take = tried.mean > base.mean and not any(a < b for a, b in zip(tried.per_target, base.per_target,
                                                                    strict=True))
    decisions = [_record("all foreground", fg, base.mean, tried.mean, take)]
    say(_line(decisions[-1]))
    steps, current = ([fg], tried) if take else ([], base)
    if len(targets) > 1:
        for i, t in enumerate(targets):
            tried = score_cases(cases, load_case, [*steps, (t,)], targets, ignore_label)
            take = tried.per_target[i] > current.per_target[i]
            decisions.append(_record(target_key(t), (t,), current.per_target[i], tried.per_target[i], take))
            say(_line(decisions[-1]))
            if take:
                steps, current = [*steps, (t,)], tried
    return Decision(steps, targets, list(fg), ignore_label, base, current, decisions, len(cases))


def _record(name: str, step: Step, before: float, after: float, applied: bool) -> dict[str, Any]:
    return {"step": name, "keep_largest_component": _jsonable(step), "applied": applied,
            f"{DICE} before": percent(before), f"{DICE} after": percent(after)}


def _line(d: Mapping[str, Any]) -> str:
    verdict = "keep" if d["applied"] else "no gain"
    return (f"largest component of {d['step']}: dice {d[f'{DICE} before']} -> {d[f'{DICE} after']} % "
            f"({verdict})")


def percent(v: float) -> float | None:
    return None if not math.isfinite(v) else round(100.0 * v, 4)


# ------------------------------------------------------------------------------------------ targets, JSON


def target_key(t: Target) -> str:
    """``1`` for a label, ``(1, 2, 3)`` for a region (v2's summary.json keys)."""
    return str(t) if not isinstance(t, tuple) else "(" + ", ".join(map(str, t)) + ")"


def describe_steps(steps: Sequence[Step]) -> str:
    """``post-processing: keep the largest component of 1+2; then of (1, 2, 3)``, or that there is none."""
    if not steps:
        return "post-processing: none (keeping the largest component helped no target)"
    return "post-processing: keep the largest component of " + "; then of ".join(
        "+".join(target_key(t) for t in s) for s in steps)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple | list):
        return [_jsonable(o) for o in obj]
    return int(obj)


def _target(obj: Any) -> Target:
    return tuple(int(v) for v in obj) if isinstance(obj, list) else int(obj)


def targets_of(spec: Any) -> tuple[list[Target], list[int], int | None]:
    """(targets, foreground labels, ignore label) of a :class:`nnunet_jax.labels.LabelSpec`: its regions
    (each a tuple of label values; BraTS too) where it has them, else its foreground classes."""
    regions = [tuple(int(v) for v in values) for values in spec.region_values]
    targets: list[Target] = list(regions) if regions else list(range(1, int(spec.n_class)))
    labels = sorted({v for t in targets for v in (t if isinstance(t, tuple) else (t,))} - {0})
    return targets, labels, None if spec.ignore_label is None else int(spec.ignore_label)


def save(decision: Decision, path: str | os.PathLike) -> Path:
    """Write the decision file (format in the module docstring)."""
    from nnunet_jax.atomic import write_json

    return write_json(decision.to_json(), path)


@dataclass(frozen=True)
class Loaded:
    """A decision file as predict applies it."""

    path: Path
    steps: list[Step]
    runs: list[str]

    def describe(self) -> str:
        return f"{describe_steps(self.steps)} ({self.path})"


def load(path: str | os.PathLike) -> Loaded:
    """Read a decision file; ValueError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such post-processing decision file")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {data.get('format')!r})")
        steps = [tuple(_target(t) for t in s["keep_largest_component"]) for s in data["steps"]]
        runs = [str(r) for r in data.get("runs") or []]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: not a post-processing decision: {e}") from None
    return Loaded(path, steps, runs)


def run_dir(ckpt_path: str | os.PathLike) -> str:
    """The results folder of the run a ``--ckpt_path`` names (absolute), as decision files list runs."""
    from nnunet_jax.checkpoints import resolve_ckpt_path, workdir_of

    return str(workdir_of(resolve_ckpt_path(ckpt_path)[0]).resolve())


def find_for_runs(ckpt_paths: Sequence[str | os.PathLike]) -> Loaded | None:
    """The decision predict.py applies by itself: a ``postprocessing.json`` of ours in a folder holding one
    of the runs, decided for exactly these runs (the same set); None when there is none."""
    runs = [run_dir(p) for p in ckpt_paths]
    for folder in dict.fromkeys(Path(r).parent for r in runs):
        if (folder / FILE_NAME).is_file():
            try:
                found = load(folder / FILE_NAME)
            except ValueError:  # someone else's postprocessing.json (nnU-Net v2 writes one too): not ours
                continue
            if {str(Path(r).resolve()) for r in found.runs} == set(runs):
                return found
    return None


def apply_to_file(path: str | os.PathLike, steps: Sequence[Step]) -> bool:
    """Post-process a written label map in place (NIfTI, or a ``<case>_pred.npy``); True when it changed.
    Components do not depend on the axis order, so the NIfTI array is used as stored."""
    import nibabel as nib

    from nnunet_jax.atomic import atomic_path, save_npy
    from nnunet_jax.io import NIFTI_SUFFIXES

    path = Path(path)
    if path.name.endswith(NIFTI_SUFFIXES):
        img = nib.load(path)
        seg = np.asanyarray(img.dataobj)
        out = apply(seg, steps)
        if np.array_equal(out, seg):
            return False
        with atomic_path(path) as tmp:
            nib.save(nib.Nifti1Image(out.astype(img.get_data_dtype()), img.affine, img.header), tmp)
        return True
    seg = np.load(path, allow_pickle=False)
    out = apply(seg, steps)
    if np.array_equal(out, seg):
        return False
    save_npy(out, path)
    return True

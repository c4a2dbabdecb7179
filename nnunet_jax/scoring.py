"""evaluate.py's library part: pair predictions with labels by case name, score them, write the tables.

Scores come from :mod:`nnunet_jax.metrics` (the one Dice of docs/reference.md §4, HD95 and NSD in mm); this
module only finds the files, loads them in the reference layout (Z, Y, X) with the label's spacing, and
aggregates. A missing, extra, unreadable or mismatched file is reported by name and skipped, never a crash: a
user with 500 cases wants the table for the 499 good ones and a list of what is wrong with the last one.

BraTS region mode (``brats``): prediction and label maps are both turned into the regions WT = label > 0,
TC = label in {1, 3}, ET = label == 3 (label 4 counts as 3, so raw BraTS labels and predict.py's region
labels WT 2 / TC 1 / ET 3 both work), and each region is scored as a binary mask with the same rules.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_jax.atomic import atomic_path
from nnunet_jax.io import NIFTI_SUFFIXES, case_name
from nnunet_jax.labels import BRATS_MAX_LABEL, REGIONS, region_masks, regions_to_labels

# Stripped from .npy stems: <case>_y.npy (preprocessed labels), <case>_pred.npy (predicted label maps).
NPY_TAGS = ("_pred", "_y", "_seg")


def case_of(path: str | os.PathLike) -> str | None:
    """The case name a prediction/label file stands for, or None for a file that is neither NIfTI nor .npy."""
    name = Path(path).name
    if name.endswith(NIFTI_SUFFIXES):
        return case_name(name)
    if name.endswith(".npy"):
        stem = name[:-4]
        if stem.endswith(("_x", "_meta")):  # preprocessed images / metadata are no segmentations
            return None
        for tag in NPY_TAGS:
            if stem.endswith(tag):
                return stem[: -len(tag)]
        return stem
    return None


def index_folder(folder: str | os.PathLike) -> tuple[dict[str, Path], list[str]]:
    """``{case: file}`` of a folder; NIfTI wins over .npy for a case present in both (the source geometry).

    Returns the index and a list of notes about skipped duplicates.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    index: dict[str, Path] = {}
    notes: list[str] = []
    for path in sorted(folder.iterdir()):
        case = case_of(path)
        if case is None or not path.is_file():
            continue
        if case in index:
            keep, drop = (path, index[case]) if path.name.endswith(NIFTI_SUFFIXES) else (index[case], path)
            notes.append(f"{case}: both {keep.name} and {drop.name} in {folder}; using {keep.name}")
            index[case] = keep
        else:
            index[case] = path
    return index, notes


@dataclass
class Segmentation:
    labels: np.ndarray  # (Z, Y, X) integer label map
    spacing: tuple[float, ...] | None  # (Z, Y, X) mm, None when the file carries none (.npy)
    affine: np.ndarray | None = None


def load_segmentation(path: str | os.PathLike, brats: bool = False) -> Segmentation:
    """A label map from NIfTI (transposed to (Z, Y, X)) or .npy: (Z, Y, X) labels, (1, Z, Y, X) labels, or
    (C, Z, Y, X) float probabilities (argmax; with ``brats`` the 3 region sigmoids are thresholded)."""
    path = Path(path)
    if path.name.endswith(NIFTI_SUFFIXES):
        from nnunet_jax.io import load_case

        case = load_case(path)
        if case.image.shape[0] != 1:
            raise ValueError(f"{path}: a label map must be 3D, got {case.image.shape[0]} channels")
        data = case.image[0]
        if not np.array_equal(data, np.round(data)):
            raise ValueError(f"{path}: a label map must hold integers")
        return Segmentation(data.astype(np.int32), case.spacing, case.affine)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated file, pickle, not an array
        raise ValueError(f"{path}: not a readable .npy array ({e})") from e
    if data.ndim == 4:
        if np.issubdtype(data.dtype, np.floating) and data.shape[0] > 1:
            if brats:
                data = regions_to_labels(data)
            else:
                data = np.argmax(data, axis=0)
        elif data.shape[0] == 1:
            data = data[0]
        else:
            raise ValueError(f"{path}: shape {data.shape} is neither (1, Z, Y, X) labels nor (C, Z, Y, X) "
                             "float probabilities")
    if data.ndim not in (2, 3):
        raise ValueError(f"{path}: shape {data.shape} is not a 2D/3D label map")
    if np.issubdtype(data.dtype, np.floating):
        if not np.array_equal(data, np.round(data)):
            raise ValueError(f"{path}: fractional values without a channel axis (not a label map)")
    if data.size and data.min() < 0:
        raise ValueError(f"{path}: negative label values")
    return Segmentation(data.astype(np.int32), None)


@dataclass
class Report:
    """Per-case scores (class 1..K-1 lists) and what could not be scored."""

    n_class: int
    metrics: tuple[str, ...]
    cases: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # labels without a prediction
    extra: list[str] = field(default_factory=list)  # predictions without a label
    errors: dict[str, str] = field(default_factory=dict)  # case → why it was skipped
    notes: list[str] = field(default_factory=list)
    classes: tuple[str, ...] = ()  # column names: default "1".."n_class-1"; BraTS regions: WT, TC, ET

    @property
    def columns(self) -> list[str]:
        return list(self.classes) or [str(c) for c in range(1, self.n_class)]

    def mean(self) -> dict[str, list[float]]:
        """Per metric, per class mean over cases (NaN/inf values are left out, as an empty-vs-empty NSD)."""
        out: dict[str, list[float]] = {}
        k = len(self.columns)
        for m in self.metrics:
            vals = np.array([c[m] for c in self.cases.values()], np.float64).reshape(-1, k)
            with np.errstate(invalid="ignore"):
                out[m] = [_finite_mean(vals[:, i]) for i in range(k)]
        return out

    def summary(self) -> dict[str, float]:
        """Per metric, the mean over classes of the per-class means (``mean dice`` on the 0-1 scale)."""
        return {m: _finite_mean(np.array(v)) for m, v in self.mean().items()}

    def nonfinite(self) -> dict[str, int]:
        """Per metric, how many (case, class) values are inf/NaN (HD95 with one mask empty), left out."""
        cases = self.cases.values()
        return {m: int(sum(not math.isfinite(v) for c in cases for v in c[m])) for m in self.metrics}

    def to_json(self) -> dict:
        return {
            "n_class": self.n_class, "classes": self.columns, "n_cases": len(self.cases),
            "mean": {f"mean {m}": v for m, v in self.summary().items()},
            "per_class": self.mean(), "nonfinite_left_out": self.nonfinite(), "cases": self.cases,
            "missing_predictions": self.missing, "extra_predictions": self.extra, "errors": self.errors,
            "notes": self.notes,
        }


def _finite_mean(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _max_label(paths: Sequence[Path], brats: bool) -> int:
    top = 0
    for p in paths:
        try:
            top = max(top, int(load_segmentation(p, brats).labels.max(initial=0)))
        except (ValueError, OSError):
            continue  # reported when the case is scored
    return top


def score_case(pred: np.ndarray, label: np.ndarray, n_class: int, spacing: Sequence[float] | None,
               metrics: Sequence[str], nsd_tolerance: float, brats: bool = False) -> dict[str, list[float]]:
    """One case's per-class scores (classes 1..n_class-1), via nnunet_jax.metrics; with ``brats`` the scores
    of the regions WT, TC, ET (each a binary map, class 1 of 2)."""
    from nnunet_jax import metrics as M

    if brats:
        per_region = [score_case(p, t, 2, spacing, metrics, nsd_tolerance)
                      for p, t in zip(region_masks(pred), region_masks(label), strict=True)]
        return {m: [r[m][0] for r in per_region] for m in per_region[0]}
    out: dict[str, list[float]] = {}
    out["dice"] = [float(v) for v in np.asarray(M.dice_per_class(pred, label, n_class))]
    if "hd95" in metrics or "nsd" in metrics:
        hd, ns = M.surface_metrics(pred, label, n_class, spacing, nsd_tolerance)
        if "hd95" in metrics:
            out["hd95"] = [float(v) for v in hd]
        if "nsd" in metrics:
            out["nsd"] = [float(v) for v in ns]
    return out


def evaluate_folders(preds: str | os.PathLike, lbls: str | os.PathLike, *, n_class: int | None = None,
                     hd95: bool = False, nsd: bool = False, nsd_tolerance: float = 1.0,
                     spacing: Sequence[float] | None = None, brats: bool = False) -> Report:
    """Score every prediction of ``preds`` against the label of the same case in ``lbls``.

    ``n_class`` (background included) defaults to 1 + the largest label value in either folder. ``spacing``
    (Z, Y, X mm) is used for .npy labels, which carry none (NIfTI labels use their own header). ``brats``
    scores the regions WT, TC, ET instead of the classes (``n_class`` is then unused) and reads float .npy
    predictions as the 3 region sigmoids.
    """
    pred_index, notes_p = index_folder(preds)
    lbl_index, notes_l = index_folder(lbls)
    paired = sorted(set(pred_index) & set(lbl_index))
    metrics = ("dice",) + (("hd95",) if hd95 else ()) + (("nsd",) if nsd else ())
    if brats:
        n_class = len(REGIONS) + 1
    elif n_class is None:
        n_class = 1 + max(_max_label([lbl_index[c] for c in paired], False),
                          _max_label([pred_index[c] for c in paired], brats), 1)
    report = Report(n_class=n_class, metrics=metrics, notes=notes_p + notes_l,
                    classes=REGIONS if brats else ())
    report.missing = sorted(set(lbl_index) - set(pred_index))
    report.extra = sorted(set(pred_index) - set(lbl_index))
    for case in paired:
        try:
            lbl = load_segmentation(lbl_index[case])
            pred = load_segmentation(pred_index[case], brats)
        except (ValueError, OSError) as e:
            report.errors[case] = str(e)
            continue
        if pred.labels.shape != lbl.labels.shape:
            report.errors[case] = (f"prediction {pred_index[case].name} has shape {pred.labels.shape}, label "
                                   f"{lbl_index[case].name} has {lbl.labels.shape} (Z, Y, X)")
            continue
        top = max(int(pred.labels.max(initial=0)), int(lbl.labels.max(initial=0)))
        if brats and top > BRATS_MAX_LABEL:
            report.errors[case] = f"label value {top} is not a BraTS label (0-{BRATS_MAX_LABEL})"
            continue
        if not brats and top >= n_class:
            report.errors[case] = f"label value {top} does not fit n_class={n_class}"
            continue
        if pred.affine is not None and lbl.affine is not None and not np.allclose(pred.affine, lbl.affine,
                                                                                    rtol=1e-4, atol=1e-4):
            report.notes.append(f"{case}: prediction and label affines differ (scored voxel by voxel)")
        sp = next((s for s in (lbl.spacing, pred.spacing, spacing) if s is not None), None)
        report.cases[case] = score_case(pred.labels, lbl.labels, n_class, sp, metrics, nsd_tolerance, brats)
    return report


def format_table(report: Report) -> str:
    """Human-readable table: one row per case, per class columns per metric, then the means."""
    cols = [f"{m}_{c}" for m in report.metrics for c in report.columns]
    width = max([len("mean"), *(len(c) for c in report.cases)], default=4)
    lines = [f"{'case':<{width}}  " + "  ".join(f"{c:>9}" for c in cols)]
    for case, scores in report.cases.items():
        vals = [v for m in report.metrics for v in scores[m]]
        lines.append(f"{case:<{width}}  " + "  ".join(f"{v:9.4f}" for v in vals))
    mean = report.mean()
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{v:9.4f}" for m in report.metrics for v in mean[m]))
    for m, v in report.summary().items():
        lines.append(f"mean {m}: {v:.4f}")
    for m, n in report.nonfinite().items():
        if n:
            lines.append(f"{m}: {n} case/class value(s) are inf (one mask empty) and left out of the means")
    for label, names in (("missing predictions", report.missing), ("extra predictions", report.extra)):
        if names:
            lines.append(f"{label} ({len(names)}): {', '.join(names)}")
    for case, why in report.errors.items():
        lines.append(f"skipped {case}: {why}")
    lines.extend(report.notes)
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


def write_json(report: Report, path: str | os.PathLike) -> None:
    """JSON with the means, per-class means, per-case scores and the file problems (NaN written as null)."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    _atomic_write(Path(path), json.dumps(clean(report.to_json()), indent=2) + "\n")


def write_csv(report: Report, path: str | os.PathLike) -> None:
    """One row per case (``case, dice_1, ..., hd95_1, ..., nsd_1, ...``) and a last ``mean`` row."""
    k = len(report.columns)
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", *(f"{m}_{c}" for m in report.metrics for c in report.columns)])
    for case, scores in report.cases.items():
        w.writerow([case, *(scores[m][i] for m in report.metrics for i in range(k))])
    mean = report.mean()
    w.writerow(["mean", *(mean[m][i] for m in report.metrics for i in range(k))])
    _atomic_write(Path(path), buf.getvalue())

"""evaluate.py's library part: pair predictions with labels by case name, score them, write the tables.

Scores come from :mod:`nnunet_jax.metrics` (the one Dice of docs/reference.md §4, HD95 and NSD in mm); this
module only finds the files, loads them in the reference layout (Z, Y, X) with the label's spacing, and
aggregates. Dice and NSD are reported in percent (0-100), the scale of training's logs.json and curves; HD95
in mm. Every header and JSON key carries its unit (:func:`metric_label`: ``dice (%)``, ``hd95 (mm)``,
``nsd (%)``). Columns are the dataset's class names (plan or dataset.json) where known, else the numbers.

A missing, unreadable or mismatched case is reported by name and skipped, never a crash, and never
silently: :meth:`Report.not_scored` lists every expected case without scores (the CLI exits 1 on any), so a
mean over 499 of 500 cases cannot pass for the whole set. The expected cases are the labelled ones, or a
given list such as one fold's validation cases (:func:`fold_cases`). Hidden files (the atomic writers' temp
files among them) are never cases.

BraTS region mode (``brats``): prediction and label maps are both turned into the regions WT = label > 0,
TC = label in {1, 3}, ET = label == 3 (label 4 counts as 3, so raw BraTS labels and predict.py's region
labels WT 2 / TC 1 / ET 3 both work), and each region is scored as a binary mask with the same rules. Any
other plan's regions (``regions``: name → label values, nnU-Net v2) are scored the same way, and the voxels of
an ``ignore_label`` (sparse annotation) are left out of every score (set to background in both maps).
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_jax.atomic import atomic_path, is_temp
from nnunet_jax.io import NIFTI_SUFFIXES, DatasetError, case_name
from nnunet_jax.labels import BRATS_MAX_LABEL, BRATS_REGIONS, REGIONS, region_targets, regions_to_labels
from nnunet_jax.plan import PLAN_FILE, Plan

# Stripped from .npy stems: <case>_y.npy (preprocessed labels), <case>_pred.npy (predicted label maps).
NPY_TAGS = ("_pred", "_y", "_seg")
# What a user sees per metric: the unit, and the factor from nnunet_jax.metrics' value (a fraction or mm).
UNITS = {"dice": "%", "hd95": "mm", "nsd": "%"}
_SCALE = {"dice": 100.0, "hd95": 1.0, "nsd": 100.0}


def metric_label(metric: str) -> str:
    """``dice (%)``, ``hd95 (mm)``, ``nsd (%)``: the name every header and JSON key uses."""
    return f"{metric} ({UNITS[metric]})"


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
    Hidden files are skipped: a killed writer's ``.<name>.nnunet-tmp.*`` is no prediction.

    Returns the index and a list of notes about skipped duplicates.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    index: dict[str, Path] = {}
    notes: list[str] = []
    for path in sorted(folder.iterdir()):
        # an unfinished atomic write (atomic.is_temp) or any other hidden file is never a case
        if is_temp(path) or path.name.startswith("."):
            continue
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
    """Per-case scores (one value per class column: Dice and NSD in percent, HD95 in mm) and every expected
    case that has none, with why."""

    n_class: int
    metrics: tuple[str, ...]
    cases: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # expected, labelled cases without a prediction
    extra: list[str] = field(default_factory=list)  # predictions without a label (not expected): a warning
    errors: dict[str, str] = field(default_factory=dict)  # expected case → why it was not scored
    notes: list[str] = field(default_factory=list)
    classes: tuple[str, ...] = ()  # column names: class names or "1".."n_class-1"; BraTS regions: WT, TC, ET

    @property
    def columns(self) -> list[str]:
        return list(self.classes) or [str(c) for c in range(1, self.n_class)]

    def not_scored(self) -> dict[str, str]:
        """Every expected case without scores → why (the errors and the missing predictions), by name."""
        return dict(sorted({**{c: "no prediction" for c in self.missing}, **self.errors}.items()))

    def problems(self) -> str | None:
        """One line naming each expected case that was not scored and why; None when all were scored."""
        todo = self.not_scored()
        if not todo:
            return None
        return (f"{len(todo)} case{'s' * (len(todo) != 1)} not scored: "
                + ", ".join(f"{c} ({why})" for c, why in todo.items()))

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
        """Per metric, the mean over classes of the per-class means (``mean dice (%)``, as training logs)."""
        return {m: _finite_mean(np.array(v)) for m, v in self.mean().items()}

    def nonfinite(self) -> dict[str, int]:
        """Per metric, how many (case, class) values are inf/NaN (HD95 with one mask empty), left out."""
        cases = self.cases.values()
        return {m: int(sum(not math.isfinite(v) for c in cases for v in c[m])) for m in self.metrics}

    def to_json(self) -> dict:
        """evaluation.json: score keys carry their unit (``mean dice (%)``, ``hd95 (mm)``), class scores are
        keyed by column name, ``not_scored`` maps each expected case without scores to why."""
        cols = self.columns

        def by_class(values: list[float]) -> dict[str, float]:
            return dict(zip(cols, values, strict=True))

        return {
            "n_class": self.n_class, "classes": cols, "n_cases": len(self.cases),
            "mean": {f"mean {metric_label(m)}": v for m, v in self.summary().items()},
            "per_class": {metric_label(m): by_class(v) for m, v in self.mean().items()},
            "nonfinite_left_out": {metric_label(m): n for m, n in self.nonfinite().items()},
            "cases": {case: {metric_label(m): by_class(v) for m, v in scores.items()}
                      for case, scores in self.cases.items()},
            "not_scored": self.not_scored(), "missing_predictions": self.missing,
            "extra_predictions": self.extra, "errors": self.errors, "notes": self.notes,
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
               metrics: Sequence[str], nsd_tolerance: float, brats: bool = False,
               regions: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[float]]:
    """One case's per-class scores (classes 1..n_class-1; Dice and NSD in percent, HD95 in mm), via
    nnunet_jax.metrics; with ``brats`` the scores of the regions WT, TC, ET (binary maps, class 1 of 2), with
    ``regions`` (name → label values) those regions'."""
    from nnunet_jax import metrics as M

    if brats or regions:
        values = [v for _, v in BRATS_REGIONS] if brats else [tuple(v) for v in regions.values()]
        pairs = zip(*(region_targets(x, values, np, 0).astype(np.int32) for x in (pred, label)), strict=True)
        per_region = [score_case(p, t, 2, spacing, metrics, nsd_tolerance) for p, t in pairs]
        return {m: [r[m][0] for r in per_region] for m in per_region[0]}
    raw = {"dice": M.dice_per_class(pred, label, n_class)}
    if "hd95" in metrics or "nsd" in metrics:
        raw["hd95"], raw["nsd"] = M.surface_metrics(pred, label, n_class, spacing, nsd_tolerance)
    return {m: [_SCALE[m] * float(v) for v in np.asarray(raw[m])] for m in raw if m == "dice" or m in metrics}


def find_class_names(lbls: str | os.PathLike) -> tuple[dict[int, str], str | None]:
    """The dataset's names of the label values: from the plan.json in ``lbls`` (preprocessed ``<case>_y.npy``
    labels) or the dataset.json beside it (``TaskXX/labelsTr`` → ``TaskXX/dataset.json``). Returns the names
    and, when one of those files exists but cannot be read, why (names are a nicety, never a reason to
    stop)."""
    lbls = Path(lbls)
    try:
        if (lbls / PLAN_FILE).is_file():
            return Plan.load(lbls).class_names(), None
        if (lbls.parent / "dataset.json").is_file():
            from nnunet_jax.planning.dataset_json import load_dataset

            labels = load_dataset(lbls.parent, check_files=False).labels
            return {int(k): v for k, v in labels.items() if int(k) > 0}, None
    except DatasetError as e:
        return {}, f"class names not read, numbered instead: {e}"
    return {}, None


def _columns(n_class: int, names: Mapping[int, str]) -> tuple[str, ...]:
    """Column names of classes 1..n_class-1: the dataset's name, else the number; a repeated name gets its
    number too (each column must stay a distinct JSON key)."""
    cols = [names.get(c, str(c)) for c in range(1, n_class)]
    return tuple(n if cols.count(n) == 1 else f"{n} ({c})" for c, n in enumerate(cols, 1))


def fold_cases(fold: int, n_splits: int = 5, *, data: str | os.PathLike | None = None,
               plan: str | os.PathLike | Plan | None = None) -> list[str]:
    """The validation cases of ``fold``, split exactly as training splits them: training/loop.py calls
    ``PreprocessedDataset.open(data).fold(fold, nfolds)`` on the preprocessed folder ``data``. With only
    ``plan`` (plan.json or a Plan) its training-case list is split the same way (``split_cases``); an older
    plan without one needs ``data``, whose labelled cases training splits. ValueError names what is wrong."""
    if data is not None:
        from nnunet_jax.data.dataset import PreprocessedDataset

        return PreprocessedDataset.open(data).fold(fold, n_splits)[1]
    if plan is None:
        raise ValueError("a fold split needs the preprocessed folder (--data) or its plan.json (--plan)")
    from nnunet_jax.data.folds import split_cases

    training = Plan.coerce(plan).training_cases
    if training is None:
        raise ValueError(f"{plan} lists no training cases (an older plan): give --data <preprocessed "
                         "folder>, whose labelled cases training splits")
    return split_cases(training, fold, n_splits)[1]


def evaluate_folders(preds: str | os.PathLike, lbls: str | os.PathLike, *, n_class: int | None = None,
                     hd95: bool = False, nsd: bool = False, nsd_tolerance: float = 1.0,
                     spacing: Sequence[float] | None = None, brats: bool = False,
                     cases: Sequence[str] | None = None,
                     class_names: Mapping[int, str] | None = None,
                     regions: Mapping[str, Sequence[int]] | None = None,
                     ignore_label: int | None = None) -> Report:
    """Score the prediction in ``preds`` of each expected case against its label in ``lbls``.

    ``cases`` are the expected cases (e.g. one fold's validation cases, :func:`fold_cases`), by default every
    labelled case: an expected case without a prediction is ``missing``, one without a label or whose files
    do not fit an error; predictions of other cases are not scored (those without a label are ``extra``).
    ``n_class`` (background included) defaults to 1 + the largest label value in either folder. ``spacing``
    (Z, Y, X mm) is used for .npy labels, which carry none (NIfTI labels use their own header). ``brats``
    scores the regions WT, TC, ET instead of the classes (``n_class`` is then unused) and reads float .npy
    predictions as the 3 region sigmoids. ``class_names`` (label value → name) name the columns; by default
    :func:`find_class_names` of ``lbls``; ``{}`` numbers them. ``regions`` (a plan's: name → label values)
    scores those regions of the label maps; ``ignore_label`` voxels of a label are scored in neither map
    (``n_class`` then defaults to ``ignore_label``, nnU-Net v2's highest class + 1).
    """
    pred_index, notes_p = index_folder(preds)
    lbl_index, notes_l = index_folder(lbls)
    expected = sorted(lbl_index if cases is None else set(cases))
    paired = [c for c in expected if c in pred_index and c in lbl_index]
    metrics = ("dice",) + (("hd95",) if hd95 else ()) + (("nsd",) if nsd else ())
    if brats:
        n_class = len(REGIONS) + 1
    elif regions:
        n_class = len(regions) + 1
    elif n_class is None and ignore_label is not None:
        n_class = ignore_label
    elif n_class is None:
        n_class = 1 + max(_max_label([lbl_index[c] for c in paired], False),
                          _max_label([pred_index[c] for c in paired], brats), 1)
    notes = notes_p + notes_l
    if class_names is None:
        class_names, why = find_class_names(lbls)
        notes += [why] if why else []
    columns = REGIONS if brats else tuple(regions) if regions else _columns(n_class, class_names)
    report = Report(n_class=n_class, metrics=metrics, notes=notes, classes=columns)
    report.missing = [c for c in expected if c in lbl_index and c not in pred_index]
    report.extra = sorted(set(pred_index) - set(lbl_index) - set(expected))
    report.errors = {c: f"no label in {lbls}" for c in expected if c not in lbl_index}
    outside = sorted(set(pred_index) & set(lbl_index) - set(expected))
    if outside:
        report.notes.append(f"{len(outside)} prediction(s) of cases not expected here, not scored: "
                            f"{', '.join(outside)}")
    for case in paired:
        try:
            lbl = load_segmentation(lbl_index[case])
        except (ValueError, OSError) as e:
            report.errors[case] = f"unreadable label: {e}"
            continue
        try:
            pred = load_segmentation(pred_index[case], brats)
        except (ValueError, OSError) as e:
            report.errors[case] = f"unreadable prediction: {e}"
            continue
        if pred.labels.shape != lbl.labels.shape:
            report.errors[case] = f"shape {pred.labels.shape} != label {lbl.labels.shape} (Z, Y, X)"
            continue
        if ignore_label is not None:  # unannotated: background in both maps, so no score counts them
            unannotated = lbl.labels == ignore_label
            lbl.labels[unannotated] = 0
            pred.labels[unannotated] = 0
        top = max(int(pred.labels.max(initial=0)), int(lbl.labels.max(initial=0)))
        if brats and top > BRATS_MAX_LABEL:
            report.errors[case] = f"label value {top} is not a BraTS label (0-{BRATS_MAX_LABEL})"
            continue
        if not brats and not regions and top >= n_class:
            report.errors[case] = f"label value {top} does not fit n_class={n_class}"
            continue
        if pred.affine is not None and lbl.affine is not None and not np.allclose(pred.affine, lbl.affine,
                                                                                    rtol=1e-4, atol=1e-4):
            report.notes.append(f"{case}: prediction and label affines differ (scored voxel by voxel)")
        sp = next((s for s in (lbl.spacing, pred.spacing, spacing) if s is not None), None)
        report.cases[case] = score_case(pred.labels, lbl.labels, n_class, sp, metrics, nsd_tolerance, brats,
                                        regions)
    report.errors = dict(sorted(report.errors.items()))
    return report


def _column(metric: str, column: str) -> str:
    return f"{metric}_{column} ({UNITS[metric]})"


def format_table(report: Report) -> str:
    """Human-readable table: one row per scored case, a column per metric and class (unit in the header), the
    means, then every expected case that was not scored and why."""
    heads = [_column(m, c) for m in report.metrics for c in report.columns]
    widths = [max(9, len(h)) for h in heads]
    first = max([len("mean"), *(len(c) for c in report.cases)])

    def row(name: str, cells: Sequence[str]) -> str:
        return f"{name:<{first}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))

    mean = report.mean()
    lines = [row("case", heads)]
    lines += [row(case, [f"{v:.2f}" for m in report.metrics for v in scores[m]])
              for case, scores in report.cases.items()]
    lines.append(row("mean", [f"{v:.2f}" for m in report.metrics for v in mean[m]]))
    lines += [f"mean {metric_label(m)}: {v:.2f}" for m, v in report.summary().items()]
    lines += [f"{metric_label(m)}: {n} case/class value(s) not finite (one mask empty), left out of the means"
              for m, n in report.nonfinite().items() if n]
    todo = report.not_scored()
    if todo:
        lines.append(f"not scored ({len(todo)}): " + ", ".join(f"{c} ({why})" for c, why in todo.items()))
    if report.extra:
        lines.append(f"predictions without a label ({len(report.extra)}), not scored: "
                     + ", ".join(report.extra))
    lines.extend(report.notes)
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


def write_json(report: Report, path: str | os.PathLike) -> None:
    """:meth:`Report.to_json` (means, per-class means, per-case scores, what was not scored; NaN → null)."""
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
    """One row per expected case (``case, dice_<class> (%), ..., hd95_<class> (mm), ..., nsd_<class> (%),
    ...``), empty cells for a case that was not scored, and a last ``mean`` row (over the scored cases)."""
    n = len(report.metrics) * len(report.columns)
    rows: dict[str, list] = {case: [""] * n for case in report.not_scored()}
    rows |= {case: [v for m in report.metrics for v in s[m]] for case, s in report.cases.items()}
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", *(_column(m, c) for m in report.metrics for c in report.columns)])
    w.writerows([case, *rows[case]] for case in sorted(rows))
    mean = report.mean()
    w.writerow(["mean", *(v for m in report.metrics for v in mean[m])])
    _atomic_write(Path(path), buf.getvalue())

"""Pictures people would rather look at than read: training curves from ``logs.json`` and overlays of label
maps on image slices. Uses matplotlib's Agg backend (no display needed); every PNG is written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from nnunet_jax.atomic import atomic_path

# Fixed colours per class index, so that the same class has the same colour in every picture.
CLASS_COLORS = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.90, 0.10, 0.10],
        [0.10, 0.75, 0.20],
        [0.15, 0.35, 0.95],
        [0.95, 0.80, 0.10],
        [0.85, 0.20, 0.85],
        [0.10, 0.85, 0.85],
        [0.95, 0.50, 0.10],
        [0.55, 0.35, 0.15],
        [0.60, 0.60, 0.60],
    ]
)


def class_color(c: int) -> np.ndarray:
    """RGB in [0, 1] of class ``c`` (cycling past the table; 0 = background)."""
    return CLASS_COLORS[c] if c < len(CLASS_COLORS) else CLASS_COLORS[1 + (c - 1) % (len(CLASS_COLORS) - 1)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | os.PathLike) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    _pyplot().close(fig)
    return Path(out)


def read_logs(path: str | os.PathLike) -> list[dict]:
    """The per-epoch records of a ``logs.json`` (a JSON object a line); lines without an epoch are skipped."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None
            if isinstance(rec, dict) and "epoch" in rec:
                records.append(rec)
    return records


def _per_class_dice(rec: Mapping) -> dict[str, float]:
    named = {k[len("dice_"):]: float(v) for k, v in rec.items() if k.startswith("dice_") and v is not None}
    if named:  # BraTS region runs log dice_WT, dice_TC, dice_ET
        return named
    dice = rec.get("dice", rec.get("per_class_dice", {}))
    if isinstance(dice, Mapping):
        return {str(k): float(v) for k, v in dice.items()}
    if isinstance(dice, Sequence):
        return {str(i + 1): float(v) for i, v in enumerate(dice)}
    return {}


def _named(class_names: Mapping[int | str, str] | None) -> dict[str, str]:
    """Class names by logged key: plan.labels (``{"1": ...}``) and plan.class_names() (``{1: ...}``) alike."""
    return {str(k): str(v) for k, v in (class_names or {}).items()}


def _lr_axis(ax, epochs: Sequence[float], lrs: Sequence[float], marker: str | None) -> None:
    """The learning rate: a constant one as a flat line inside [0, 2 lr] with three plain ticks, one that
    spans a decade or more on a log scale, else a linear axis from 0 with few ticks."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.plot(epochs, lrs, marker=marker, markersize=3)
    title = "learning rate"
    if len(lrs):
        vals = np.asarray(lrs, np.float64)
        lo, hi = float(vals.min()), float(vals.max())
        if hi > 0 and hi - lo <= 1e-6 * hi:  # constant (up to float32 noise: 0.003000000026)
            ax.set_ylim(0, 2 * hi)
            ax.set_yticks([0, hi, 2 * hi])
            title = f"learning rate (constant {hi:.3g})"
        elif lo > 0 and hi / lo >= 10:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=min(0.0, lo))
            ax.yaxis.set_major_locator(MaxNLocator(4))
        if ax.get_yscale() == "linear":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.set(title=title, xlabel="epoch")


def training_curves_figure(records: Sequence[Mapping], class_names: Mapping[int | str, str] | None = None):
    """The matplotlib figure of :func:`plot_training_curves` for the epoch ``records`` of a ``logs.json``."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    names = _named(class_names)
    marker = "o" if len(records) <= 20 else None  # a 1-epoch run still shows its points

    def series(get):
        pts = [(r["epoch"], v) for r in records if (v := get(r)) is not None]
        return tuple(zip(*pts, strict=True)) if pts else ((), ())

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        xs, ys = series(lambda r, k=key: r.get(k))
        if xs:
            axes[0].plot(xs, ys, style, marker=marker, markersize=3, label=key.replace("_", " "))
    axes[0].set(title="loss", xlabel="epoch")
    classes = sorted({c for r in records for c in _per_class_dice(r)}, key=lambda c: (len(c), c))
    for i, c in enumerate(classes):
        name = names.get(c, f"class {c}" if c.isdigit() else c)
        axes[1].plot(*series(lambda r, c=c: _per_class_dice(r).get(c)), color=class_color(i + 1),
                     marker=marker, markersize=3, label=name)
    if len(classes) > 1:  # with one class the mean is that class
        axes[1].plot(*series(lambda r: r.get("mean_dice")), "k-", linewidth=2, marker=marker, markersize=3,
                     label="mean")
    if not classes:
        axes[1].text(0.5, 0.5, "no validation logged yet", ha="center", va="center",
                     transform=axes[1].transAxes)
    axes[1].set(title="validation Dice", xlabel="epoch", ylabel="Dice (%)")
    _lr_axis(axes[2], *series(lambda r: r.get("lr")), marker)
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_training_curves(logs: str | os.PathLike, out: str | os.PathLike,
                         class_names: Mapping[int | str, str] | None = None) -> Path:
    """Loss (train/val), per-class Dice (%) with their mean, and learning rate per epoch, as one PNG;
    ``class_names`` maps the logged class keys (1, 2, ... as int or str: plan.class_names() or plan.labels)
    to the dataset's names."""
    records = read_logs(logs)
    if not records:
        raise ValueError(f"{logs}: no epoch records to plot")
    return _save(training_curves_figure(records, class_names), out)


def pick_slices(label: np.ndarray, n: int, reference: np.ndarray | None = None) -> list[int]:
    """Up to ``n`` axial (first-axis) slices spread over the foreground: the reference's when ``reference``
    has any (the ground truth says where the structure is), else ``label``'s.

    The slices holding the middle 95% of the foreground voxels (so that a few stray voxels do not stretch
    it) are cut into ``n`` equal parts, each giving one slice: the part holding the slice with the most
    foreground gives that slice, the others their middle slice (their fullest one when the middle is empty;
    a part without foreground gives none). Without any foreground: ``n`` evenly spaced slices, the centre one
    for ``n`` = 1.
    """
    depth = label.shape[0]
    n = max(1, min(n, depth))
    fg = (label > 0).reshape(depth, -1).sum(1)
    if reference is not None and reference.any():
        fg = (reference > 0).reshape(depth, -1).sum(1)
    if not fg.any():
        return sorted({int((i + 0.5) * depth / n) for i in range(n)})
    cdf = np.cumsum(fg) / fg.sum()
    lo, hi = int(np.searchsorted(cdf, 0.025)), int(np.searchsorted(cdf, 0.975)) + 1
    n = min(n, hi - lo)
    fullest = lo + np.flatnonzero(fg[lo:hi] == fg[lo:hi].max())  # ties: the one nearest the middle
    best = int(fullest[np.argmin(np.abs(fullest - (lo + hi - 1) / 2))])
    edges = lo + np.round(np.arange(n + 1) * (hi - lo) / n).astype(int)
    picked = []
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        if a <= best < b:
            picked.append(best)
        elif fg[a:b].any():
            mid = (a + b - 1) // 2
            picked.append(mid if fg[mid] else a + int(np.argmax(fg[a:b])))
    return sorted(picked)


def overlay_figure(
    image: np.ndarray,
    label: np.ndarray,
    class_names: Mapping[int, str] | None = None,
    n_slices: int = 3,
    reference: np.ndarray | None = None,
    alpha: float = 0.45,
    title: str | None = None,
):
    """The matplotlib figure of :func:`overlay_png`: one row of slices (:func:`pick_slices`), ``label``
    filled in its class colours, ``reference`` outlined in the same colours, a legend of the class names."""
    from matplotlib import patheffects
    from matplotlib.patches import Patch

    plt = _pyplot()
    img = image[0] if image.ndim == label.ndim + 1 else image
    if img.shape != label.shape:
        raise ValueError(f"image shape {img.shape} and label shape {label.shape} differ")
    if reference is not None and reference.shape != label.shape:
        raise ValueError(f"reference shape {reference.shape} and label shape {label.shape} differ")
    slices = pick_slices(label, n_slices, reference)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    fig, axes = plt.subplots(1, len(slices), figsize=(3.2 * len(slices), 3.9), squeeze=False,
                             layout="constrained")
    halo = [patheffects.withStroke(linewidth=3.2, foreground="black")]
    present = set()
    for ax, z in zip(axes[0], slices, strict=True):
        gray = np.clip((img[z] - lo) / max(hi - lo, 1e-8), 0, 1)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        for c in np.unique(label[z]):
            if c > 0:
                present.add(int(c))
                m = label[z] == c
                rgb[m] = (1 - alpha) * rgb[m] + alpha * class_color(int(c))
        ax.imshow(rgb, origin="lower", interpolation="nearest")
        if reference is not None:
            for c in np.unique(reference[z]):
                m = reference[z] == c
                if c > 0 and not m.all():
                    present.add(int(c))
                    ax.contour(m.astype(np.float32), levels=[0.5], colors=[class_color(int(c))],
                               linewidths=1.6).set_path_effects(halo)
        ax.set_title(f"slice {z} of {label.shape[0]}", fontsize=9)
        ax.axis("off")
    what = "prediction (fill) vs reference (contour)" if reference is not None else "prediction"
    fig.suptitle(f"{title}: {what}" if title else what, fontsize=11)
    names = dict(class_names or {})
    shown = sorted(present | (set(names) - {0} if len(names) <= 12 else set()))
    if shown:
        handles = [Patch(facecolor=class_color(c), label=names.get(c, f"class {c}")) for c in shown]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False)
    return fig


def overlay_png(
    image: np.ndarray,
    label: np.ndarray,
    out: str | os.PathLike,
    class_names: Mapping[int, str] | None = None,
    n_slices: int = 3,
    reference: np.ndarray | None = None,
    alpha: float = 0.45,
    title: str | None = None,
) -> Path:
    """Overlay ``label`` (Z, Y, X) on ``image`` ((Z, Y, X) or (C, Z, Y, X), first channel shown) on a few
    slices spread over the foreground; ``reference`` (the ground truth, same geometry) is drawn as contours
    over the filled ``label``; ``title`` (the case) heads the picture."""
    return _save(overlay_figure(image, label, class_names, n_slices, reference, alpha, title), out)


def overlay_files(
    image: str | os.PathLike,
    pred: str | os.PathLike,
    out: str | os.PathLike,
    label: str | os.PathLike | None = None,
    class_names: Mapping[int, str] | None = None,
    n_slices: int = 3,
) -> Path:
    """:func:`overlay_png` from NIfTI files (image, predicted and optional reference label maps)."""
    from nnunet_jax.io import case_name, load_case

    img = load_case(image).image
    pred_map = load_case(pred).image[0].astype(np.int64)
    ref = load_case(label).image[0].astype(np.int64) if label is not None else None
    return overlay_png(img, pred_map, out, class_names, n_slices, reference=ref, title=case_name(pred))

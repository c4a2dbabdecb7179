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


def plot_training_curves(logs: str | os.PathLike, out: str | os.PathLike,
                         class_names: Mapping[str, str] | None = None) -> Path:
    """Loss (train/val), per-class and mean Dice, and learning rate per epoch, as one PNG; ``class_names``
    maps the logged class keys ("1", "2", ...) to names (dataset.json labels)."""
    records = read_logs(logs)
    if not records:
        raise ValueError(f"{logs}: no epoch records to plot")
    plt = _pyplot()

    def series(get):
        pts = [(r["epoch"], v) for r in records if (v := get(r)) is not None]
        return tuple(zip(*pts, strict=True)) if pts else ((), ())

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        axes[0].plot(*series(lambda r, k=key: r.get(k)), style, label=key.replace("_", " "))
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend()
    classes = sorted({c for r in records for c in _per_class_dice(r)}, key=lambda c: (len(c), c))
    for i, c in enumerate(classes):
        pts = series(lambda r, c=c: _per_class_dice(r).get(c))
        name = (class_names or {}).get(c, c if not c.isdigit() else f"class {c}")
        axes[1].plot(*pts, color=class_color(i + 1), label=name)
    axes[1].plot(*series(lambda r: r.get("mean_dice")), "k-", linewidth=2, label="mean")
    axes[1].set(title="validation Dice", xlabel="epoch")
    axes[1].legend()
    axes[2].plot(*series(lambda r: r.get("lr")))
    axes[2].set(title="learning rate", xlabel="epoch")
    return _save(fig, out)


def pick_slices(label: np.ndarray, n: int) -> list[int]:
    """``n`` axial (first-axis) slices: those with the most foreground, else evenly spaced."""
    depth = label.shape[0]
    n = min(n, depth)
    fg = (label > 0).reshape(depth, -1).sum(1)
    if fg.max() == 0:
        return [int(i) for i in np.linspace(0, depth - 1, n).round()]
    return sorted(int(i) for i in np.argsort(-fg, kind="stable")[:n])


def overlay_png(
    image: np.ndarray,
    label: np.ndarray,
    out: str | os.PathLike,
    class_names: Mapping[int, str] | None = None,
    n_slices: int = 3,
    reference: np.ndarray | None = None,
    alpha: float = 0.45,
) -> Path:
    """Overlay ``label`` (Z, Y, X) on ``image`` ((Z, Y, X) or (C, Z, Y, X), first channel shown) for a few
    slices; with ``reference`` a second row shows the ground truth on the same slices."""
    plt = _pyplot()
    img = image[0] if image.ndim == label.ndim + 1 else image
    if img.shape != label.shape:
        raise ValueError(f"image shape {img.shape} and label shape {label.shape} differ")
    rows = [("prediction", label)] + ([("reference", reference)] if reference is not None else [])
    slices = pick_slices(reference if reference is not None else label, n_slices)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    size = (3.2 * len(slices), 3.2 * len(rows))
    fig, axes = plt.subplots(len(rows), len(slices), figsize=size, squeeze=False)
    present = set()
    for r, (name, lab) in enumerate(rows):
        for j, z in enumerate(slices):
            gray = np.clip((img[z] - lo) / max(hi - lo, 1e-8), 0, 1)
            rgb = np.repeat(gray[..., None], 3, axis=-1)
            for c in np.unique(lab[z]):
                if c == 0:
                    continue
                present.add(int(c))
                m = lab[z] == c
                rgb[m] = (1 - alpha) * rgb[m] + alpha * class_color(int(c))
            axes[r, j].imshow(rgb, origin="lower")
            axes[r, j].set_title(f"{name}, slice {z}", fontsize=9)
            axes[r, j].axis("off")
    if present:
        from matplotlib.patches import Patch

        names = class_names or {}
        handles = [Patch(color=class_color(c), label=names.get(c, f"class {c}")) for c in sorted(present)]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    return _save(fig, out)


def overlay_files(
    image: str | os.PathLike,
    pred: str | os.PathLike,
    out: str | os.PathLike,
    label: str | os.PathLike | None = None,
    class_names: Mapping[int, str] | None = None,
    n_slices: int = 3,
) -> Path:
    """:func:`overlay_png` from NIfTI files (image, predicted and optional reference label maps)."""
    from nnunet_jax.io import load_case

    img = load_case(image).image
    pred_map = load_case(pred).image[0].astype(np.int64)
    ref = load_case(label).image[0].astype(np.int64) if label is not None else None
    return overlay_png(img, pred_map, out, class_names, n_slices, reference=ref)

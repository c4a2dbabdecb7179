"""Task00_Synthetic: a small two-modality "brain tumour" MRI task in MSD layout, generated from a seed.

The embedded default task: it runs the whole flow (preprocess → train → predict → evaluate) in minutes on a
CPU. Each case varies in shape (28–44 mm per axis), head size and position, lesion size/position, intensity
scale, noise and a smooth multiplicative bias field; background outside the head-like ellipsoid is exactly
zero (so crop-to-nonzero matters) and every third case has 1.5 mm slices (so resampling runs). The classes
differ in contrast between the modalities (oedema: dark T1 / bright T2; core: bright T1 / mid T2), so a
model can learn them. Case i depends only on (seed, i), not on how many cases are asked for.

    python -m preprocess.synthetic --out data --cases 12 --test_cases 3 --seed 0
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from absl import app, flags

from nnunet_jax.atomic import make_temp_dir, replace_dir, write_json

TASK_FOLDER = "Task00_Synthetic"
MODALITIES = {"0": "T1", "1": "T2"}
LABELS = {"0": "background", "1": "oedema", "2": "core"}
# Mean intensity per class (background-tissue, oedema, core) for each modality, before scale/bias/noise.
CONTRAST = np.array([[1.0, 0.65, 1.6], [1.0, 1.75, 1.25]], dtype=np.float32)
# Voxel spacing (X, Y, Z) in mm, cycled over cases: isotropic, thick slices, coarser in-plane.
SPACINGS = ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1.0, 1.0, 1.5), (1.2, 1.2, 1.0))


def make_case(seed: int, index: int, test: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: image (X, Y, Z, 2) float32, label (X, Y, Z) uint8, affine (4, 4)."""
    rng = np.random.default_rng([seed, int(test), index])
    spacing = np.array(SPACINGS[index % len(SPACINGS)])
    # Case 0 is the largest, so a 32 mm patch always fits in some training case after cropping.
    extent_mm = np.full(3, 44.0) if index == 0 and not test else rng.uniform(28.0, 44.0, size=3)
    shape = np.maximum(np.round(extent_mm / spacing).astype(int), 8)
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    coords = (x, y, z)
    size_mm = shape * spacing

    head_c = size_mm / 2 + rng.uniform(-1.0, 1.0, size=3)
    head_r = size_mm * rng.uniform(0.38, 0.44, size=3)
    head = sum(((c - m) / r) ** 2 for c, m, r in zip(coords, head_c, head_r, strict=True)) <= 1.0

    oedema_r = rng.uniform(5.0, 9.0) * rng.uniform(0.8, 1.2, size=3)
    offset = rng.normal(size=3)
    offset *= rng.uniform(0.0, 0.35) / max(np.linalg.norm(offset), 1e-6)
    oedema_c = head_c + offset * head_r
    core_r = oedema_r * rng.uniform(0.35, 0.6)
    core_c = oedema_c + rng.uniform(-0.2, 0.2, size=3) * oedema_r

    def inside(centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
        return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii, strict=True)) <= 1.0

    label = np.zeros(shape, dtype=np.uint8)
    label[inside(oedema_c, oedema_r) & head] = 1
    label[inside(core_c, core_r) & head] = 2

    # Smooth multiplicative bias field: exp of a random quadratic in normalised coordinates.
    unit = [2 * c / s - 1 for c, s in zip(coords, size_mm, strict=True)]
    image = np.empty((*shape, 2), dtype=np.float32)
    for ch in range(2):
        lin, quad = rng.uniform(-0.15, 0.15, size=3), rng.uniform(-0.1, 0.1, size=3)
        bias = np.exp(sum(a * u + b * u * u for a, b, u in zip(lin, quad, unit, strict=True)))
        scale = rng.uniform(200.0, 1200.0)
        noise = rng.normal(0.0, rng.uniform(0.03, 0.08), size=tuple(shape))
        tissue = CONTRAST[ch][label] * rng.uniform(0.95, 1.05, size=3)[label]
        vol = scale * bias * (tissue + noise)
        image[..., ch] = np.where(head, np.maximum(vol, 1e-3 * scale), 0.0)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = rng.uniform(-100.0, 100.0, size=3)
    return image, label, affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def generate(out: str | os.PathLike, cases: int = 12, test_cases: int = 3, seed: int = 0) -> Path:
    """Write ``out/Task00_Synthetic`` (replacing an old one only once the new one is complete)."""
    if cases < 1 or test_cases < 0:
        raise ValueError(f"need ≥ 1 training case and ≥ 0 test cases, got {cases}/{test_cases}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / TASK_FOLDER
    tmp = make_temp_dir(final)
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        training, test = [], []
        for i in range(cases):
            image, label, affine = make_case(seed, i)
            name = f"synth_{i:03d}.nii.gz"
            _save(image, affine, tmp / "imagesTr" / name)
            _save(label, affine, tmp / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        for i in range(test_cases):
            image, _, affine = make_case(seed, i, test=True)
            name = f"synth_{cases + i:03d}.nii.gz"
            _save(image, affine, tmp / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
        meta = {
            "name": "Synthetic",
            "description": "Synthetic two-modality brain-lesion-like MRI task (nnunet-jax embedded default)",
            "reference": "generated by nnunet_jax.datasets.synthetic",
            "licence": "CC0",
            "release": f"seed {seed}",
            "tensorImageSize": "4D",
            "modality": MODALITIES,
            "labels": LABELS,
            "numTraining": cases,
            "numTest": test_cases,
            "training": training,
            "test": test,
        }
        write_json(meta, tmp / "dataset.json", indent=4)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def define_flags() -> None:
    """Defined only when run as a program, so importing this module never clashes with other absl flags."""
    flags.DEFINE_string("out", "data", "Folder that receives Task00_Synthetic/.")
    flags.DEFINE_integer("cases", 12, "Number of labelled training cases.")
    flags.DEFINE_integer("test_cases", 3, "Number of unlabelled test cases (imagesTs).")
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same volumes.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fl = flags.FLAGS
    path = generate(fl.out, fl.cases, fl.test_cases, fl.seed)
    print(f"wrote {path} ({fl.cases} training, {fl.test_cases} test cases)")


def run() -> None:
    """Console entry point."""
    from nnunet_jax.cli import run_app

    run_app(main, define_flags, __name__)


if __name__ == "__main__":
    run()

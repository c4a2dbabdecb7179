# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # nnU-Net in JAX: your own dataset
#
# nnU-Net reads any folder laid out like a Medical Segmentation Decathlon (MSD) task:
#
# ```
# MyOrganCT/
#   dataset.json          modalities, labels, the lists of training pairs and test images
#   imagesTr/case.nii.gz  one image per case (3D, or 4D with the modalities on the last axis)
#   labelsTr/case.nii.gz  integer label map, same shape and affine as the image
#   imagesTs/case.nii.gz  unlabelled images to predict (optional)
# ```
#
# This walkthrough builds such a folder from NIfTI files (a small CT-like dataset made with nibabel, with
# thick slices of varying thickness), looks at what nnU-Net **plans** for it (target spacing, CT intensity
# statistics, patch size, network topology), preprocesses it with the `--task PATH` semantics of
# `python -m preprocess`, then trains and uses a small model. Replace the synthetic volumes by your own files
# and the rest stays the same.
#
# Run it: `python examples/custom_dataset.py`; as a notebook: `jupytext --to ipynb examples/custom_dataset.py`
# (see `examples/README.md`).

# %% [markdown]
# ## Settings (environment variables `NNUNET_EXAMPLE_<NAME>` override them)

# %%
import os
import sys
from pathlib import Path


def setting(name: str, default: str) -> str:
    """``NNUNET_EXAMPLE_<NAME>`` from the environment, else the default."""
    return os.environ.get(f"NNUNET_EXAMPLE_{name}", default)


WORK = Path(setting("WORK", "nnunet_custom")).absolute()
CASES = int(setting("CASES", "16"))  # labelled cases to make (5 at least: one per fold)
TEST_CASES = int(setting("TEST_CASES", "2"))
EPOCHS = int(setting("EPOCHS", "25"))
FILTERS = tuple(int(f) for f in setting("FILTERS", "8,16,32,64").split(","))  # one per U-Net level
LEARNING_RATE = float(setting("LEARNING_RATE", "3e-3"))
FOLD = int(setting("FOLD", "0"))

DATASET = WORK / "raw" / "MyOrganCT"  # the dataset folder we build; its name becomes the task name
RESULTS = WORK / "results"
RUN = RESULTS / f"MyOrganCT_3d_fold{FOLD}"

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
if (HERE.parent / "nnunet_jax").is_dir() and str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # a clone of the repository, not pip-installed

from nnunet_jax.platform import configure_xla_flags  # noqa: E402

configure_xla_flags()  # before JAX starts: fast oneDNN convolutions on CPU

import json  # noqa: E402
import shutil  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every save (INFO) and read-only restore (WARNING)
print(f"work folder: {WORK}")

# %% [markdown]
# ## 1. A folder of NIfTI images and labels
#
# Each case is a CT-like volume in Hounsfield units: air (−1000) around a soft-tissue body (~40 HU) holding an
# organ (~100 HU, label 1) with a brighter lesion (~170 HU, label 2). In-plane spacing is 0.8 mm; slices are
# 2.5–5 mm thick and differ between cases, as in clinical CT — this is what makes planning interesting.
# The x and y axes of the affine are flipped (LPS-style), which predictions must keep. Preprocessing crops
# each case to the box of its voxels > 0 (the seed's rule: for CT in HU that drops the air around the body);
# here the body fills the field of view in-plane, as in most abdominal scans.

# %%
SLICE_MM = (3.0, 2.5, 3.0, 4.0, 5.0, 3.0, 2.5, 3.5)  # slice thickness, cycled over the cases
INPLANE_MM = 0.8


def make_ct_case(index: int, test: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (X, Y, Z) float32 HU, label (X, Y, Z) uint8, affine: one reproducible synthetic case."""
    rng = np.random.default_rng([7, int(test), index])
    spacing = np.array([INPLANE_MM, INPLANE_MM, SLICE_MM[index % len(SLICE_MM)]])
    shape = np.round(np.array([rng.uniform(36, 42), rng.uniform(36, 42), 36.0]) / spacing).astype(int)
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)],
                        indexing="ij", sparse=True)
    size = shape * spacing

    def ellipsoid(centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
        return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1.0

    body = ellipsoid(size / 2, size * np.array([0.56, 0.52, 0.8]))
    organ_c = size / 2 + rng.uniform(-3, 3, 3)
    organ_r = np.array([rng.uniform(9, 12), rng.uniform(8, 11), rng.uniform(10, 14)])
    organ = ellipsoid(organ_c, organ_r) & body
    lesion_c = organ_c + rng.uniform(-0.3, 0.3, 3) * organ_r
    lesion = ellipsoid(lesion_c, organ_r * rng.uniform(0.4, 0.55)) & organ
    label = np.zeros(shape, np.uint8)
    label[organ] = 1
    label[lesion] = 2
    hu = np.where(body, 40.0, -1000.0)
    hu = np.where(organ, 100.0, hu)
    hu = np.where(lesion, 170.0, hu)
    image = (hu + rng.normal(0, 12, shape)).astype(np.float32)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    return image, label, affine


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> str:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return "./" + path.relative_to(DATASET).as_posix()  # dataset.json paths are relative to the folder


shutil.rmtree(DATASET, ignore_errors=True)
training, test = [], []
for i in range(CASES):
    image, label, affine = make_ct_case(i)
    name = f"organ_{i:03d}.nii.gz"
    training.append({"image": save_nifti(image, affine, DATASET / "imagesTr" / name),
                     "label": save_nifti(label, affine, DATASET / "labelsTr" / name)})
for i in range(TEST_CASES):
    image, _, affine = make_ct_case(i, test=True)
    test.append(save_nifti(image, affine, DATASET / "imagesTs" / f"organ_{CASES + i:03d}.nii.gz"))
print(f"{len(training)} training pairs, {len(test)} test images in {DATASET}")

# %% [markdown]
# ## 2. dataset.json
#
# The MSD format: `modality` names the input channels (a first channel called `"CT"` switches on CT
# normalisation: clip to the foreground's 0.5–99.5 percentiles, then z-score with its mean and std; anything
# else is z-scored per image), `labels` lists every class from 0 (background) on, paths are relative to the
# folder.

# %%
dataset_json = {
    "name": "MyOrganCT",
    "description": "Synthetic CT-like organ and lesion segmentation (nnunet-jax custom dataset example)",
    "tensorImageSize": "3D",
    "modality": {"0": "CT"},
    "labels": {"0": "background", "1": "organ", "2": "lesion"},
    "numTraining": len(training),
    "numTest": len(test),
    "training": training,
    "test": test,
}
(DATASET / "dataset.json").write_text(json.dumps(dataset_json, indent=2))

from nnunet_jax.planning.dataset_json import load_dataset  # noqa: E402

dataset = load_dataset(DATASET)  # checks keys, label/modality tables and that every listed file exists
print(f"{dataset.name}: {dataset.in_channels} channel(s) {dataset.modalities}, {dataset.n_class} classes "
      f"{dataset.labels}, CT: {dataset.is_ct}")

# %% [markdown]
# ## 3. Planning
#
# What `python -m preprocess` decides for a dataset that is not in the MSD task table (the step functions of
# `nnunet_jax.planning.planner`, then the whole plan):
#
# - **target spacing**: the per-axis median of the training spacings; when that is anisotropic (largest/
#   smallest ≥ 3) the **coarsest** axis is set to the 10th percentile of its spacings, so thin-slice cases are
#   not thrown away by downsampling them to the median;
# - **CT statistics**: 0.5/99.5 percentiles, mean and std of the voxels under the labels;
# - **patch size**: the median shape of the training cases cropped to their nonzero box and resampled
#   (shrunk to ≤ 128³ voxels when larger), rounded down to a multiple of the network's downsampling along each
#   axis, and never larger than the largest case;
# - **topology**: per level, stride 2 along an axis while it is at most twice as coarse as the finest and at
#   least 8 voxels long; 1×3×3 kernels on axes that are still too coarse.

# %%
from nnunet_jax.planning import planner as planning  # noqa: E402
from nnunet_jax.planning.topology import plan_topology  # noqa: E402

# One pass over the training images: each case's nonzero box (what preprocessing crops to) and spacing.
survey = planning.survey_cases(dataset.training, dataset.label_values, dataset.in_channels, progress=False)
spacings = np.array([case.spacing for case in survey])
target, anisotropic = planning.median_target_spacing(spacings)
print("slice spacings (Z):", spacings[:, 0].tolist())
print(f"median spacing {np.median(spacings, axis=0).round(3).tolist()} -> "
      f"target {np.round(target, 3).tolist()} (anisotropic: {anisotropic})")

shapes = np.array([planning.resampled_shape(case.cropped_shape, case.spacing, target) for case in survey])
median_shape = np.median(shapes, axis=0)
patch = planning.plan_patch_size(median_shape, target, dim=3, largest=shapes.max(axis=0))
print(f"median cropped+resampled shape {median_shape.tolist()} -> patch {patch}")
topology = plan_topology(patch, target)
print("kernels:", topology.kernels)
print("strides:", topology.strides)

ct_stats = planning.ct_statistics(dataset.training, dataset.label_values, dataset.in_channels, progress=False)
print("CT statistics (p0.5, p99.5, mean, std):", [round(v, 2) for v in ct_stats])

# %% [markdown]
# The same in one call — a `Plan`, whose `to_dict()` is what `plan.json` holds:

# %%
plan = planning.make_plan(dataset, DATASET.name, None, dim=3, progress=False)
for key, value in plan.to_dict().items():
    if key not in ("cases", "source"):
        print(f"{key:>14}: {json.dumps(value)}")

# %% [markdown]
# ## 4. Preprocess with `--task PATH`
#
# A custom dataset is named by its folder path instead of an MSD number, as on the command line:
#
# ```
# python -m preprocess --task /path/to/MyOrganCT --dim 3 --results results --exec_mode training
# ```
#
# The output folder is named after the dataset folder: `results/MyOrganCT_3d/` (add `patch_size=[...]` to
# choose the patch yourself).

# %%
from nnunet_jax.plan import Plan  # noqa: E402
from nnunet_jax.preprocessing.driver import preprocess_dataset  # noqa: E402

prep = preprocess_dataset(WORK, str(DATASET), dim=3, results=RESULTS, exec_mode="training", progress=False)
written_plan = Plan.load(prep)
print(prep, "patch", list(written_plan.patch_size), "spacing", list(written_plan.spacing))
x = np.load(prep / "organ_000_x.npy")
print(f"organ_000 preprocessed: {x.shape} (C, Z, Y, X), mean {x.mean():.2f}, std {x.std():.2f}")

# %% [markdown]
# ## 5. Train a small model
#
# The task name of a custom dataset is its folder name. The plan's topology decides the number of levels (4
# here); `filters` gives each level's width (the full-size network would use the plan's 32, 64, 128, 256).

# %%
from nnunet_jax.configs.default import get_config  # noqa: E402
from nnunet_jax.training.loop import train_and_evaluate  # noqa: E402

config = get_config()
config.task = DATASET.name
config.dim = 3
config.data = str(prep)
config.results = str(RUN)
config.fold = FOLD
levels = written_plan.topology.depth  # FILTERS must match the depth, else: doubled per level
config.filters = FILTERS if len(FILTERS) == levels else tuple(FILTERS[0] * 2**i for i in range(levels))
config.learning_rate = LEARNING_RATE
config.min_epochs = config.max_epochs = EPOCHS

shutil.rmtree(RUN, ignore_errors=True)
summary = train_and_evaluate(config)
print(f"best validation mean Dice (%): {summary['TOP_mean']:.2f} (epoch {summary['best_epoch']})")

# %% [markdown]
# ## 6. Predict and score
#
# NIfTI files in, NIfTI masks out, in each image's own geometry (shape, spacing, affine — the thick slices
# and the flipped axes are kept). First the fold's validation cases, scored against their labels, then the
# test images.

# %%
from nnunet_jax import plots, scoring  # noqa: E402
from nnunet_jax.data.folds import split_cases  # noqa: E402
from nnunet_jax.inference.predictor import Predictor, predict_inputs, save_prediction  # noqa: E402

predictor = Predictor.from_checkpoints(RUN)
_, val_cases = split_cases(written_plan.training_cases, FOLD)
preds_val = RUN / "preds_val"
predict_inputs(predictor, [DATASET / "imagesTr" / f"{c}.nii.gz" for c in val_cases], preds_val)
# labelsTr also holds the training cases: only the fold's validation cases are expected
report = scoring.evaluate_folders(preds_val, DATASET / "labelsTr", n_class=dataset.n_class, cases=val_cases)
print(scoring.format_table(report))
print(f"fold {FOLD} validation mean dice (%): {report.summary()['dice']:.2f}")  # percent, as training logs

preds_test = RUN / "preds_test"
for path in sorted((DATASET / "imagesTs").glob("*.nii.gz")):
    prediction = predictor.predict(path)
    out = save_prediction(prediction, preds_test)[0]
    source, predicted = nib.load(str(path)), nib.load(str(out))
    zooms = [round(float(z), 3) for z in predicted.header.get_zooms()]
    print(f"{out.name}: shape {predicted.shape} (source {source.shape}), spacing {zooms}, "
          f"same affine as the source: {np.allclose(predicted.affine, source.affine)}")
    plots.overlay_files(path, out, RUN / "pictures" / f"{prediction.case}_overlay.png",
                            class_names={int(k): v for k, v in dataset.labels.items()})
print("training curves:", RUN / "curves.png")

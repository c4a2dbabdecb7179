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
# # nnU-Net in JAX: quickstart
#
# From a dataset folder to a trained model, predictions, scores and pictures, with the Python API:
#
# 1. **generate** the embedded synthetic MSD task (`Task00_Synthetic`: two MRI-like modalities, two lesion
#    classes),
# 2. **preprocess** it (crop, resample to the target spacing, normalise; writes `plan.json`),
# 3. **train** fold 0 of the reference 5-fold split,
# 4. **predict** NIfTI masks in the source geometry (the fold's validation cases, the unlabelled test images),
# 5. **evaluate** them against the labels (Dice, HD95, NSD),
# 6. draw **pictures**: training curves and mask overlays.
#
# Each step is one library call; the same steps exist as commands (`python -m preprocess`, `train.py`,
# `predict.py`, `evaluate.py`, see `scripts/demo.sh`). With the defaults below it takes a few minutes on a
# laptop CPU; on a GPU it is much faster. For your own data, see `custom_dataset.py`.
#
# Open it as a notebook: `jupytext --to ipynb examples/quickstart.py` (or open the `.py` file directly in
# VS Code / Jupyter with the jupytext extension). Run it as a script: `python examples/quickstart.py`.

# %% [markdown]
# ## Settings
#
# Every setting can be overridden by an environment variable of the same name with the prefix
# `NNUNET_EXAMPLE_` (the test suite runs this file with 1 epoch, 5 cases and a tiny network).

# %%
import os
import sys
from pathlib import Path


def setting(name: str, default: str) -> str:
    """``NNUNET_EXAMPLE_<NAME>`` from the environment, else the default."""
    return os.environ.get(f"NNUNET_EXAMPLE_{name}", default)


WORK = Path(setting("WORK", "nnunet_quickstart")).absolute()  # everything is written below this folder
CASES = int(setting("CASES", "20"))  # labelled training cases to generate
TEST_CASES = int(setting("TEST_CASES", "2"))  # unlabelled test images to generate
EPOCHS = int(setting("EPOCHS", "20"))
FILTERS = tuple(int(f) for f in setting("FILTERS", "8,16,32,64").split(","))  # one per U-Net level
LEARNING_RATE = float(setting("LEARNING_RATE", "3e-3"))
FOLD = int(setting("FOLD", "0"))

DATA = WORK / "data"  # raw MSD-style task folders
RESULTS = WORK / "results"  # preprocessed data, runs, predictions
RUN = RESULTS / f"00_3d_fold{FOLD}"  # this training run
print(f"work folder: {WORK}")

# %% [markdown]
# ## Imports
#
# `configure_xla_flags()` must run before JAX starts: on CPU it turns on XLA's oneDNN convolutions (several
# times faster). When you run this from a clone of the repository without `pip install -e .`, the repository
# root is put on the path.

# %%
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
if (HERE.parent / "nnunet_jax").is_dir() and str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from nnunet_jax.platform import configure_xla_flags  # noqa: E402

configure_xla_flags()

import json  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from nnunet_jax import plots, scoring  # noqa: E402
from nnunet_jax.configs.default import get_config  # noqa: E402
from nnunet_jax.data.folds import split_cases  # noqa: E402
from nnunet_jax.datasets.synthetic import generate  # noqa: E402
from nnunet_jax.inference.predictor import Predictor, predict_inputs, save_prediction  # noqa: E402
from nnunet_jax.plan import Plan  # noqa: E402
from nnunet_jax.preprocessing.driver import preprocess_dataset  # noqa: E402
from nnunet_jax.training.loop import train_and_evaluate  # noqa: E402

absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every save (INFO) and read-only restore (WARNING)
print("JAX devices:", jax.devices())

# %% [markdown]
# ## 1. The dataset folder
#
# An MSD task folder: `dataset.json` (modalities, labels, the training and test lists), `imagesTr/`,
# `labelsTr/`, `imagesTs/`. Here we generate the synthetic one; a downloaded MSD task
# (`python -m preprocess.download --task 04`) or your own folder works the same way.

# %%
task_dir = generate(DATA, cases=CASES, test_cases=TEST_CASES, seed=0)
dataset_json = json.loads((task_dir / "dataset.json").read_text())
print(task_dir)
print("modalities:", dataset_json["modality"], " labels:", dataset_json["labels"])
print(f"{dataset_json['numTraining']} training cases, {dataset_json['numTest']} test images")

# %% [markdown]
# ## 2. Preprocess
#
# `exec_mode="training"` writes the labelled cases padded to the patch size plus `plan.json` (patch size,
# target spacing, normalisation, U-Net topology) to `RESULTS/00_3d`; `"val"` writes the same cases unpadded to
# `00_3d/val` (for predicting them back into the source geometry). Task `00` takes its patch size and spacing
# from the task table, as the MSD tasks do. On a real dataset pass `n_jobs=8` to preprocess cases in parallel
# processes; they are *spawned*, so in a script (not a notebook) keep that call under
# `if __name__ == "__main__":` or every worker re-runs the script.

# %%
prep = preprocess_dataset(DATA, "00", dim=3, results=RESULTS, exec_mode="training")
val_dir = preprocess_dataset(DATA, "00", dim=3, results=RESULTS, exec_mode="val")
plan = Plan.load(prep)  # prep / "plan.json", read and checked
shown = plan.to_dict()
for key in ("patch_size", "spacing", "normalization", "n_class", "in_channels"):
    print(f"{key:>14}: {shown[key]}")
print(f"{'strides':>14}: {shown['topology']['strides']}")

# %% [markdown]
# ## 3. Train
#
# The config holds every flag of the seed's `main.py` with its default (`configs/default.py`); `train.py` is
# only a command line over `train_and_evaluate`. We use a small network (`filters`) and a higher learning rate
# than the seed's 1e-3 so that a few minutes of CPU give a usable model. The run folder gets `logs.json` (one
# line per epoch), `config.json`, `curves.png` and Orbax checkpoints (`checkpoints/last`, `checkpoints/best`).

# %%
config = get_config()
config.task = "00"
config.dim = 3
config.data = str(prep)
config.results = str(RUN)
config.fold = FOLD
config.filters = FILTERS
config.learning_rate = LEARNING_RATE
config.min_epochs = config.max_epochs = EPOCHS

shutil.rmtree(RUN, ignore_errors=True)  # a fresh run (resume_training=True would continue the old one)
summary = train_and_evaluate(config)
print(f"best mean Dice (%) during training: {summary['TOP_mean']:.2f} (epoch {summary['best_epoch']})")

# %% [markdown]
# ## 4. Predict
#
# `Predictor.from_checkpoints` rebuilds the model from the run's `config.json` and restores its best
# checkpoint (pass several run folders for a fold ensemble; `tta=True` adds flip test-time augmentation).
# `predict_inputs` runs the sliding window over preprocessed cases and maps the result back to the source
# image (undo padding, resample, paste into the crop box): `<case>.nii.gz` has the source image's shape and
# affine. We predict the validation cases of our fold, which the model has not been trained on.

# %%
predictor = Predictor.from_checkpoints(RUN)  # the run folder: its best checkpoint
_, val_cases = split_cases(plan.training_cases, FOLD)
preds_val = RUN / "preds_val"
predict_inputs(predictor, [val_dir], preds_val, cases=val_cases)

# %% [markdown]
# The same predictor takes raw NIfTI files too (here the unlabelled test images), preprocessing them with the
# plan on the fly:

# %%
preds_test = RUN / "preds_test"
for image in sorted((task_dir / "imagesTs").glob("*.nii.gz")):
    prediction = predictor.predict(image)
    save_prediction(prediction, preds_test)
    print(f"{prediction.case}: labels {prediction.labels.shape}, classes present "
          f"{sorted(set(prediction.labels.ravel().tolist()))}")

# %% [markdown]
# ## 5. Evaluate
#
# Predictions and labels are paired by case name; Dice follows the seed's rule (a class absent from both
# counts 100 %) and is in percent, as training logs it; HD95 is in millimetres from the NIfTI spacing, NSD in
# percent. `labelsTr` holds every training case, but we predicted only the fold's validation cases: `cases`
# says which ones are expected (any of those without a prediction would be listed as not scored).

# %%
report = scoring.evaluate_folders(preds_val, task_dir / "labelsTr", hd95=True, nsd=True, cases=val_cases)
print(scoring.format_table(report))
scoring.write_json(report, preds_val / "evaluation.json")
mean_dice = report.summary()["dice"]  # percent (0-100), mean over classes of the per-class means
print(f"fold {FOLD} validation mean dice (%): {mean_dice:.2f}")

# %% [markdown]
# ## 6. Pictures
#
# Training curves (loss, per-class validation Dice in percent, learning rate) from `logs.json`, the classes
# named after the plan's labels, and for each validation case the prediction filled and the reference
# outlined, on slices spread over the foreground.

# %%
pictures = RUN / "pictures"
names = plan.class_names()  # {1: "oedema", 2: "core"}: label value -> the dataset's name
curves = plots.plot_training_curves(RUN / "logs.json", pictures / "curves.png", names)
overlays = [
    plots.overlay_files(task_dir / "imagesTr" / f"{case}.nii.gz", preds_val / f"{case}.nii.gz",
                            pictures / f"{case}_overlay.png", label=task_dir / "labelsTr" / f"{case}.nii.gz",
                            class_names=names)
    for case in val_cases
]
print("pictures:", curves, *overlays, sep="\n  ")

# %%
try:  # show them inline in a notebook
    from IPython import get_ipython
    from IPython.display import Image, display

    if get_ipython() is not None:
        for png in (curves, *overlays):
            display(Image(filename=str(png)))
except ImportError:
    pass

# %% [markdown]
# ## Next
#
# - More epochs (`NNUNET_EXAMPLE_EPOCHS=100`), the full-size network (`FILTERS` = the plan's
#   `topology.filters`), another fold, or all five folds and `Predictor.from_checkpoints([...5 runs...])`.
# - The same flow on an MSD task: `python -m preprocess.download --task 04 --results data`, then task `"04"`.
# - Your own data: `examples/custom_dataset.py`.

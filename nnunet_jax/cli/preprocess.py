"""Preprocess an MSD task, an nnU-Net v2 raw dataset or a custom dataset for training and prediction (the
seed's preprocess.py flags).

    python -m preprocess --task 01 --dim 3 --data /data --results /data --exec_mode training --n_jobs 8
    python -m preprocess --task 001 --dim 3 --data /nnUNet_raw --results /data     # Dataset001_Name
    python -m preprocess --task /path/to/MyDataset --dim 3 --data . --results out --patch_size 96,96,96

Reads DATA/TaskXX_Name/ (MSD: dataset.json, imagesTr/, labelsTr/, imagesTs/) or DATA/DatasetXXX_Name/ (nnU-Net
v2 raw: imagesTr/<case>_<XXXX><file_ending> per channel, labelsTr/<case><file_ending>, optional imagesTs/)
and writes OUT = RESULTS/XX_<dim>d/ (any other dataset folder: RESULTS/<its name>_<dim>d/), by --exec_mode:
  training  the labelled cases, cropped, resampled, normalised and padded to the patch, and plan.json
  val       the same labelled cases without padding, in OUT/val (to predict a fold's validation cases)
  test      the unlabelled test images, in OUT/test
Per case: <case>_x.npy (image), <case>_y.npy (label; not in test), <case>_meta.npy (what maps a prediction
back to the source image).
--task: two digits (01) are the MSD task as before, even when a Dataset001_* exists too; three digits (001)
are nnU-Net v2's Dataset001_*; one digit (1) whichever of the two exists; or a folder name or path
(nnunet_jax.planning.dataset_json.find_task_dir).
Installed without the checkout, the same command is nnunet-preprocess.
"""

from __future__ import annotations

import sys

from absl import app, flags

from nnunet_jax.planning.dataset_json import DatasetError
from nnunet_jax.preprocessing.driver import EXEC_MODES, preprocess_dataset


def define_flags() -> None:
    """Defined only when run as a program, so importing the package never clashes with other absl flags."""
    flags.DEFINE_string("task", None, "MSD task number (01..10, 00 = synthetic), nnU-Net v2 dataset number "
                        "(001 = Dataset001_*) or name, or a dataset folder path.")
    flags.DEFINE_enum("dim", "3", ["2", "3"], "2D or 3D data.")
    flags.DEFINE_string("data", "/data",
                        "Folder holding the TaskXX_Name (MSD) or DatasetXXX_Name (nnU-Net v2) folders.")
    flags.DEFINE_string("results", "/data", "Folder that receives <task>_<dim>d/.")
    flags.DEFINE_enum("exec_mode", "training", list(EXEC_MODES),
                      "training: labelled cases padded to the patch; val: labelled, no padding (<dir>/val); "
                      "test: unlabelled test images (<dir>/test).")
    flags.DEFINE_integer("n_jobs", 1, "Cases processed in parallel (processes).", lower_bound=1)
    flags.DEFINE_list("patch_size", None, "Patch size Z,Y,X (2D: Y,X); default: task table or planned.")
    flags.mark_flag_as_required("task")


def main(argv: list[str]) -> None:
    fl = flags.FLAGS
    try:
        patch = [int(p) for p in fl.patch_size] if fl.patch_size else None
    except ValueError:
        raise app.UsageError(f"--patch_size must be integers, got {fl.patch_size}") from None
    try:
        out = preprocess_dataset(fl.data, fl.task, int(fl.dim), fl.results, fl.exec_mode, fl.n_jobs, patch)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out}")


def run() -> None:
    """Console entry point."""
    from nnunet_jax.cli import run_app

    run_app(main, define_flags, __name__)


if __name__ == "__main__":
    run()

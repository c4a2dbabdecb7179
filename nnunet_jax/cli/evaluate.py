"""Score predicted segmentations against labels: per-class Dice (docs/reference.md §4), optionally HD95, NSD
(mm).

    python evaluate.py --preds results/preds --lbls data/Task01_BrainTumour/labelsTr [--hd95] [--nsd]

Predictions and labels are paired by case name (``<case>.nii.gz``, ``<case>.npy``, ``<case>_y.npy``); NIfTI or
.npy (label maps, or (C, Z, Y, X) probabilities that are argmaxed). Prints a table and ``mean dice`` (0-1),
writes JSON and CSV (default: ``evaluation.json`` / ``evaluation.csv`` in ``--preds``). Missing, extra and
mismatched files are listed by name. ``--brats`` scores the BraTS regions WT, TC, ET instead of the classes.
"""

from nnunet_jax.platform import configure_xla_flags

configure_xla_flags()  # before JAX starts (the Dice runs in JAX)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import flags  # noqa: E402

from nnunet_jax.cli import run_app  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined when it runs, so importing the module defines none)."""
    flags.DEFINE_string("preds", None, "Folder of predictions (NIfTI label maps or .npy).", required=True)
    flags.DEFINE_string("lbls", None, "Folder of labels (NIfTI, or preprocessed <case>_y.npy).",
                        required=True)
    flags.DEFINE_integer("n_class", None, "Classes including background (default: 1 + largest label "
                         "value).")
    flags.DEFINE_boolean("hd95", False, "Also compute the 95th-percentile Hausdorff distance (mm).")
    flags.DEFINE_boolean("nsd", False, "Also compute the normalised surface Dice.")
    flags.DEFINE_float("nsd_tolerance", 1.0, "NSD tolerance in mm.")
    flags.DEFINE_list("spacing", None, "Z,Y,X spacing (mm) for .npy labels, which carry none "
                      "(default 1,1,1).")
    flags.DEFINE_boolean("brats", False, "BraTS region Dice: score WT (label > 0), TC (1, 3) and ET (3; 4 "
                         "counts as 3) of label maps (NIfTI or .npy); float .npy predictions are the region "
                         "sigmoids.")
    flags.DEFINE_string("out_json", None, "JSON output (default <preds>/evaluation.json).")
    flags.DEFINE_string("out_csv", None, "CSV output (default <preds>/evaluation.csv).")


def main(argv: list[str]) -> int:
    del argv
    from nnunet_jax import scoring

    spacing = [float(s) for s in FLAGS.spacing] if FLAGS.spacing else None
    try:
        report = scoring.evaluate_folders(
            FLAGS.preds, FLAGS.lbls, n_class=FLAGS.n_class, hd95=FLAGS.hd95, nsd=FLAGS.nsd,
            nsd_tolerance=FLAGS.nsd_tolerance, spacing=spacing, brats=FLAGS.brats)
    except FileNotFoundError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    print(scoring.format_table(report))
    out_json = Path(FLAGS.out_json or Path(FLAGS.preds) / "evaluation.json")
    out_csv = Path(FLAGS.out_csv or Path(FLAGS.preds) / "evaluation.csv")
    scoring.write_json(report, out_json)
    scoring.write_csv(report, out_csv)
    print(f"wrote {out_json} and {out_csv}")
    return 0 if report.cases else 1


def run() -> None:
    """Console entry point."""
    run_app(main, define_flags, __name__)


if __name__ == "__main__":
    run()

"""Score predicted segmentations against labels: per-class Dice (docs/reference.md §4) in percent, as training
logs it, optionally HD95 (mm) and NSD (%).

    python evaluate.py --preds results/preds --lbls data/Task01_BrainTumour/labelsTr [--hd95] [--nsd]
    python evaluate.py --preds results/preds_fold0 --lbls data/Task01_BrainTumour/labelsTr \\
        --fold 0 --data results/01_3d

Predictions and labels are paired by case name (``<case>.nii.gz``, ``<case>.npy``, ``<case>_y.npy``;
hidden files such as unfinished writes are ignored); NIfTI or .npy (label maps, or (C, Z, Y, X) probabilities
that are argmaxed). Prints a table and ``mean dice (%)``, writes JSON and CSV (default: ``evaluation.json`` /
``evaluation.csv`` in ``--preds``); columns are the dataset's class names (plan, or dataset.json beside
``--lbls``). ``--brats`` scores the BraTS regions WT, TC, ET instead of the classes; a ``--plan``/``--data``
plan with nnU-Net v2 regions scores its regions, and one with an ignore label leaves those voxels out.

Every labelled case is expected, or with ``--fold`` only that fold's validation cases (training's split of the
plan's cases). Exit codes: 0 all expected cases scored (predictions without a label only warn); 1 an expected
case was missing, unreadable or mismatched (named on the last line; ``--allow_missing`` makes that a warning)
or nothing was scored; 2 bad folders or plan.
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
    flags.DEFINE_boolean("nsd", False, "Also compute the normalised surface Dice (%).")
    flags.DEFINE_float("nsd_tolerance", 1.0, "NSD tolerance in mm.")
    flags.DEFINE_list("spacing", None, "Z,Y,X spacing (mm) for .npy labels, which carry none "
                      "(default 1,1,1).")
    flags.DEFINE_boolean("brats", False, "BraTS region Dice: score WT (label > 0), TC (1, 3) and ET (3; 4 "
                         "counts as 3) of label maps (NIfTI or .npy); float .npy predictions are the region "
                         "sigmoids.")
    flags.DEFINE_integer("fold", None, "Score only this fold's validation cases, split as training splits "
                         "them (needs --data or --plan); other labelled cases are not expected.")
    flags.DEFINE_integer("nfolds", 5, "Number of folds of the --fold split (as training's --nfolds).")
    flags.DEFINE_string("data", None, "Preprocessed folder (holding plan.json) whose training cases --fold "
                        "splits; also names the classes.")
    flags.DEFINE_string("plan", None, "plan.json whose training cases --fold splits (instead of --data); "
                        "also names the classes.")
    flags.DEFINE_boolean("allow_missing", False, "Exit 0 even when expected cases were missing, unreadable "
                         "or mismatched (still listed, as a warning): partial scores on purpose.")
    flags.DEFINE_string("out_json", None, "JSON output (default <preds>/evaluation.json).")
    flags.DEFINE_string("out_csv", None, "CSV output (default <preds>/evaluation.csv).")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def main(argv: list[str]) -> int:
    del argv
    from nnunet_jax import scoring
    from nnunet_jax.plan import Plan

    spacing = [float(s) for s in FLAGS.spacing] if FLAGS.spacing else None
    try:
        if FLAGS.fold is not None and not (FLAGS.data or FLAGS.plan):
            raise ValueError(f"--fold {FLAGS.fold} needs the split's case list: add --data <preprocessed "
                             "folder> or --plan <plan.json>")
        source = FLAGS.plan or FLAGS.data
        plan = Plan.load(source) if source else None
        names = plan.class_names() if plan else None
        cases = None if FLAGS.fold is None else scoring.fold_cases(
            FLAGS.fold, FLAGS.nfolds, data=FLAGS.data, plan=FLAGS.plan)
        report = scoring.evaluate_folders(
            FLAGS.preds, FLAGS.lbls, n_class=FLAGS.n_class, hd95=FLAGS.hd95, nsd=FLAGS.nsd,
            nsd_tolerance=FLAGS.nsd_tolerance, spacing=spacing, brats=FLAGS.brats, cases=cases,
            class_names=names, regions=None if FLAGS.brats or plan is None else plan.regions,
            ignore_label=None if plan is None else plan.ignore_label)
    except (FileNotFoundError, ValueError) as e:  # DatasetError is a ValueError
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if FLAGS.fold is not None:
        report.notes.append(f"fold {FLAGS.fold} of {FLAGS.nfolds}: {_plural(len(cases), 'validation case')} "
                            "expected")
    print(scoring.format_table(report))
    out_json = Path(FLAGS.out_json or Path(FLAGS.preds) / "evaluation.json")
    out_csv = Path(FLAGS.out_csv or Path(FLAGS.preds) / "evaluation.csv")
    scoring.write_json(report, out_json)
    scoring.write_csv(report, out_csv)
    print(f"wrote {out_json} and {out_csv}")
    if report.extra:
        print(f"warning: {_plural(len(report.extra), 'prediction')} without a label, not scored: "
              f"{', '.join(report.extra)}", file=sys.stderr)
    problems = report.problems()
    if problems:
        print(f"{'warning' if FLAGS.allow_missing else 'error'}: {problems}", file=sys.stderr)
    if not report.cases:
        print("error: no case scored", file=sys.stderr)
        return 1
    return 1 if problems and not FLAGS.allow_missing else 0


def run() -> None:
    """Console entry point."""
    run_app(main, define_flags, __name__)


if __name__ == "__main__":
    run()

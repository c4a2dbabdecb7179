"""Pictures on demand: training curves from a run's ``logs.json``, overlays of label maps on their image.

    python visualize.py --logs results/fold0/logs.json --out results/fold0/curves.png
    python visualize.py --image imagesTs/case.nii.gz --pred preds/case.nii.gz [--label labelsTr/case.nii.gz] \
        --out case.png [--plan results/01_3d/plan.json]

Class colours are fixed per label value and named after the plan's (dataset.json's) labels.
"""

import sys

from absl import app, flags

from nnunet_jax.cli import run_app  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined when it runs, so importing the module defines none)."""
    flags.DEFINE_string("logs", None, "A run's logs.json: draw loss, per-class Dice and learning "
                        "rate per epoch.")
    flags.DEFINE_string("image", None, "Source image (NIfTI) for an overlay.")
    flags.DEFINE_string("pred", None, "Label map (NIfTI) drawn over the image.")
    flags.DEFINE_string("label", None, "Optional reference label map (NIfTI), drawn in a second row.")
    flags.DEFINE_string("plan", None, "plan.json whose class names label the legends.")
    flags.DEFINE_integer("slices", 3, "Slices per overlay.")
    flags.DEFINE_string("out", None, "Output PNG.", required=True)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from nnunet_jax import plots
    from nnunet_jax.plan import Plan

    try:
        if FLAGS.logs:
            names = Plan.load(FLAGS.plan).labels if FLAGS.plan else None
            out = plots.plot_training_curves(FLAGS.logs, FLAGS.out, names)
        elif FLAGS.image and FLAGS.pred:
            names = {int(k): v for k, v in Plan.load(FLAGS.plan).labels.items()} if FLAGS.plan else None
            out = plots.overlay_files(FLAGS.image, FLAGS.pred, FLAGS.out, FLAGS.label, names,
                                          FLAGS.slices)
        else:
            raise app.UsageError("give --logs, or --image and --pred")
    except (OSError, ValueError) as e:
        print(f"visualize: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def run() -> None:
    """Console entry point."""
    run_app(main, define_flags, __name__)


if __name__ == "__main__":
    run()

"""Pictures on demand: training curves from a run's ``logs.json``, overlays of label maps on their image.

    python visualize.py --logs results/fold0/logs.json --out results/fold0/curves.png
    python visualize.py --image imagesTr/case.nii.gz --pred preds/case.nii.gz --out case.png
    (add --label labelsTr/case.nii.gz to outline the reference, --plan results/01_3d/plan.json for names)

Class colours are fixed per label value and named after the plan's (dataset.json's) labels: those of --plan,
else for --logs the plan in the run's config.json beside the logs.json. An overlay shows slices spread over
the foreground, the prediction filled and the reference (--label) outlined in the class colours.
"""

import sys
from pathlib import Path

from absl import app, flags

from nnunet_jax.cli import run_app  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined when it runs, so importing the module defines none)."""
    flags.DEFINE_string("logs", None, "A run's logs.json: draw loss, per-class Dice and learning "
                        "rate per epoch.")
    flags.DEFINE_string("image", None, "Source image (NIfTI) for an overlay.")
    flags.DEFINE_string("pred", None, "Label map (NIfTI) drawn over the image.")
    flags.DEFINE_string("label", None, "Optional reference label map (NIfTI), outlined over the prediction.")
    flags.DEFINE_string("plan", None, "plan.json whose class names label the legends.")
    flags.DEFINE_integer("slices", 3, "Slices per overlay.")
    flags.DEFINE_string("out", None, "Output PNG.", required=True)


def run_class_names(logs: str) -> dict[int, str] | None:
    """The class names of the run that wrote ``logs``: the plan in its folder's ``config.json``, or None."""
    from nnunet_jax.checkpoints import CONFIG_FILE
    from nnunet_jax.inference.predictor import read_run_settings

    run = Path(logs).parent
    if not (run / CONFIG_FILE).is_file():
        return None
    try:
        _, plan = read_run_settings(run)
    except FileNotFoundError:  # config.json without checkpoints (removed, or none saved yet): read it alone
        import json

        from nnunet_jax.plan import Plan

        settings = json.loads((run / CONFIG_FILE).read_text())
        plan = Plan.from_dict(settings["plan"], run / CONFIG_FILE) if settings.get("plan") else None
    return None if plan is None else plan.class_names()


def main(argv: list[str]) -> int:
    from nnunet_jax import plots
    from nnunet_jax.plan import Plan

    try:
        names = Plan.load(FLAGS.plan).class_names() if FLAGS.plan else None
        if FLAGS.logs:
            if names is None:
                try:
                    names = run_class_names(FLAGS.logs)
                except (OSError, ValueError) as e:  # a broken config.json: the curves, classes unnamed
                    print(f"visualize: class names not read: {e}", file=sys.stderr)
            out = plots.plot_training_curves(FLAGS.logs, FLAGS.out, names)
        elif FLAGS.image and FLAGS.pred:
            out = plots.overlay_files(FLAGS.image, FLAGS.pred, FLAGS.out, FLAGS.label, names, FLAGS.slices)
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

"""Which configuration to predict with: cross-validation Dice of each configuration and of each pair's
ensemble, the best, its post-processing, and the commands to predict new images with it (nnU-Net v2's
``nnUNetv2_find_best_configuration``).

    python find_best_configuration.py --lbls data/Task04_Hippocampus/labelsTr \\
        --config '3d=/results/3d/preds{fold}:/results/3d/fold{fold}' \\
        --config '2d=/results/2d/preds{fold}:/results/2d/fold{fold}'
    python find_best_configuration.py --ensemble OUT_3d,OUT_2d --ckpt_path /results/3d/fold0 \\
        --results OUT --postprocess /results/postprocessing_3d+2d.json     # apply an ensemble winner

Each ``--config NAME=PREDICTIONS:RUNS`` names a configuration's fold prediction folders (``predict.py --fold
k --save_preds`` output; ``{fold}`` is replaced by each of ``--folds``) and the training runs that made them.
Scores are nnU-Net v2's (Dice of the validation cases of all folds together, a case with both masks empty
left out; the mean over classes or regions); ensembles average the two configurations' ``<case>.npy``
probabilities. The winner's post-processing (keep the largest connected component, decided as v2 does) is
written to ``postprocessing.json`` beside its runs, where ``predict.py`` applies it by itself to an ensemble
of exactly those runs; an ensemble winner's goes to ``--results``. The whole report goes to
``<results>/best_configuration.json``. With a single ``--config`` this is that configuration's
cross-validation Dice and post-processing decision.

``--ensemble A,B``: the last step of an ensemble winner's commands: average the probabilities that
``predict.py --save_preds`` wrote into A and B, post-process with ``--postprocess``, write NIfTI masks.
"""

from nnunet_jax.platform import configure_xla_flags

configure_xla_flags()  # before JAX starts

import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags  # noqa: E402

from nnunet_jax.cli import run_app  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined when it runs, so importing the module defines none)."""
    flags.DEFINE_multi_string("config", None, "A configuration: NAME=PREDICTIONS:RUNS, {fold} in both paths "
                              "(its fold prediction folders with <case>.npy probabilities, and the runs that "
                              "made them). Repeat for each configuration.")
    flags.DEFINE_list("folds", ["0", "1", "2", "3", "4"], "Folds that {fold} stands for.")
    flags.DEFINE_string("lbls", None, "Folder of the reference labels (labelsTr NIfTI).")
    flags.DEFINE_boolean("ensembles", True, "Also score the ensemble of each pair of configurations.")
    flags.DEFINE_string("results", None, "Output folder: best_configuration.json, an ensemble winner's "
                        "post-processing (default: the folder holding every run); with --ensemble the masks.")
    flags.DEFINE_list("ensemble", None, "Instead: folders of predict.py --save_preds outputs to average into "
                      "--results.")
    flags.DEFINE_string("ckpt_path", None, "With --ensemble: a run of the ensemble (how its outputs become "
                        "labels).")
    flags.DEFINE_string("postprocess", None, "With --ensemble: post-processing decision file to apply.")


def _spec(run: str):
    from nnunet_jax.inference.predictor import read_run_settings
    from nnunet_jax.labels import LabelSpec, use_brats

    config, plan = read_run_settings(run)
    if plan is None:
        raise FileNotFoundError(f"{run}: no config.json with the run's plan")
    return LabelSpec.of(plan, use_brats(config))


def _ensemble() -> int:
    from nnunet_jax import postprocessing as pp
    from nnunet_jax.model_selection import ensemble_folders

    if not (FLAGS.ckpt_path and FLAGS.results):
        raise app.UsageError("--ensemble needs --ckpt_path (a run of the ensemble) and --results")
    steps = pp.load(FLAGS.postprocess).steps if FLAGS.postprocess else []
    written = ensemble_folders(FLAGS.ensemble, FLAGS.results, _spec(FLAGS.ckpt_path), steps)
    print(pp.describe_steps(steps))
    print(f"wrote {len(written)} file(s) to {FLAGS.results}")
    return 0


def _choose() -> int:
    from nnunet_jax import model_selection as ms
    from nnunet_jax import postprocessing as pp
    from nnunet_jax.atomic import write_json

    if not (FLAGS.config and FLAGS.lbls):
        raise app.UsageError("give --lbls and one --config per configuration (or --ensemble)")
    folds = [int(f) for f in FLAGS.folds]
    configs = [ms.parse_configuration(c, folds) for c in FLAGS.config]
    for c in configs:
        for run in c.runs:
            pp.run_dir(run)  # a missing run: FileNotFoundError naming it, before any scoring
    selection = ms.Selection(configs, FLAGS.lbls, _spec(str(configs[0].runs[0])))
    candidates = selection.candidates(FLAGS.ensembles)
    keys = [pp.target_key(t) for t in selection.targets]
    print(f"cross-validation dice (%), {len(selection.cases)} cases of folds {','.join(FLAGS.folds)} "
          "(nnU-Net v2's foreground mean; per target: " + ", ".join(keys) + "):")
    width = max(len(c.name) for c in candidates)
    for c in candidates:
        per = ", ".join(_pct(v) for v in c.scores.per_target)
        print(f"  {c.name:<{width}}  {_pct(c.dice)}  ({per})")
    best = ms.best_of(candidates)
    print(f"best: {best.name} ({_pct(best.dice)})")
    decision = selection.decide(best, log=lambda line: print(f"  {line}"))
    results = Path(FLAGS.results or os.path.commonpath([Path(r).parent for c in candidates for r in c.runs]))
    decision_file = pp.save(decision, ms.decision_path(best, results))
    print(f"{decision.describe()}; dice {_pct(decision.before.mean)} -> {_pct(decision.after.mean)} %")
    print(f"wrote {decision_file}")
    lines = ms.commands(best, decision_file)
    print("predict new images (INPUT_FOLDER) like this:")
    print("\n".join(f"  {line}" for line in lines))
    report = {"folds": folds, "n_cases": len(selection.cases), "targets": keys,
              "dice (%)": {c.name: pp.percent(c.dice) for c in candidates},
              "per_target dice (%)": {c.name: c.scores.to_json(selection.targets)["per_target"]
                                      for c in candidates},
              "best": best.name, "postprocessing": str(decision_file),
              "dice (%) after postprocessing": pp.percent(decision.after.mean), "commands": lines}
    print(f"wrote {write_json(report, results / 'best_configuration.json')}")
    return 0


def _pct(v: float) -> str:
    return "nan" if v != v else f"{100 * v:.2f}"


def main(argv: list[str]) -> int:
    del argv  # run_app refuses extra arguments
    try:
        return _ensemble() if FLAGS.ensemble else _choose()
    except (FileNotFoundError, ValueError) as e:
        print(f"find_best_configuration: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """Console entry point."""
    run_app(main, define_flags, __name__)


if __name__ == "__main__":
    run()

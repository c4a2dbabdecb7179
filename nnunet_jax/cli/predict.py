"""Predict segmentations: NIfTI label maps in the source image's geometry (and optionally probabilities).

    python predict.py --data /data/01_3d/test --ckpt_path /results/fold0 --results /results/preds --tta
    python predict.py --data imagesTs/ --ckpt_path /results/fold0,/results/fold1 --results preds   # ensemble
    python predict.py --data case.nii.gz --torch_ckpt dynunet.pt --plan /data/01_3d/plan.json --results preds
    python predict.py --nnunetv2_model $nnUNet_results/Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres \
        --folds 0,1,2,3,4 --data imagesTs/ --results preds        # an nnU-Net v2 trained model

``--data``: preprocessed folders (``<case>_x.npy`` + ``_meta.npy``, as ``python -m preprocess --exec_mode
test|val`` writes them), NIfTI files, or folders of NIfTI files (preprocessed here with the run's plan).
Several ``--ckpt_path`` = fold ensemble (mean of the softmax). ``--save_preds`` also writes float
probabilities ``<case>.npy`` (C, Z, Y, X) in the source geometry, as the reference.

``--nnunetv2_model``: an nnU-Net v2 results folder (``<Trainer>__<Plans>__<configuration>``), run with v2's
own preprocessing, sliding window (fp16 sums, mirroring on unless ``--notta``) and export; ``--data`` are
v2-named images (``<case>_0000.nii.gz``, ...) or folders of them; ``--save_preds`` writes v2's
``<case>.npz``/``.pkl`` probabilities. No torch needed.
"""

from nnunet_jax.platform import configure_xla_flags

configure_xla_flags()  # before JAX starts (oneDNN convolutions on CPU)

import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from nnunet_jax.cli import run_app  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined when it runs, so importing the module defines none)."""
    flags.DEFINE_list("data", None, "Preprocessed folder(s), NIfTI file(s) or folder(s) of NIfTI files.",
                      required=True)
    flags.DEFINE_string("results", "predictions", "Output folder.")
    flags.DEFINE_list("ckpt_path", None, "Checkpoint(s): results dir, checkpoints/{best,last} or a step dir; "
                      "several = fold ensemble.")
    flags.DEFINE_string("torch_ckpt", None, "PyTorch nnU-Net / MONAI DynUNet state dict (.pt/.ckpt) instead.")
    flags.DEFINE_string("nnunetv2_model", None, "An nnU-Net v2 trained model folder "
                        "(<Trainer>__<Plans>__<configuration>) instead.")
    flags.DEFINE_list("folds", None, "Folds of --nnunetv2_model to average (default: every fold_* holding "
                      "--checkpoint; 'all' = fold_all).")
    flags.DEFINE_string("checkpoint", "checkpoint_final.pth", "Checkpoint file name in each fold of "
                        "--nnunetv2_model.")
    flags.DEFINE_enum("accumulate", "float16", ["float16", "float32"], "Sliding-window sums of "
                      "--nnunetv2_model: float16 as nnU-Net v2 (its exact output) or float32.")
    flags.DEFINE_string("plan", None, "plan.json (default: the preprocessed folder's, else the run's).")
    flags.DEFINE_string("raw", None, "Folder of the source images (headers for preprocessed inputs; default: "
                        "the dataset named in plan.json).")
    flags.DEFINE_boolean("tta", False, "Flip test-time augmentation (mean of the logits over all flips); "
                         "--nnunetv2_model: on unless --notta (v2's mirroring).")
    flags.DEFINE_boolean("amp", False, "Mixed-precision inference.")
    flags.DEFINE_enum("amp_dtype", "bf16", ["bf16", "fp16"], "Compute dtype under --amp.")
    flags.DEFINE_float("overlap", None, "Sliding-window overlap (default: the training run's --overlap, "
                       "else 0.5).")
    flags.DEFINE_enum("blend", None, ["gaussian", "constant"], "Sliding-window blending (default: the "
                      "training run's --blend, else gaussian).")
    flags.DEFINE_integer("val_batch_size", None, "Windows per forward pass (default: the training run's "
                         "--val_batch_size, else 4).")
    flags.DEFINE_boolean("save_preds", False, "Also save float probabilities <case>.npy (C, Z, Y, X).")
    flags.DEFINE_boolean("save_nifti", True, "Save NIfTI label maps in the source geometry.")
    flags.DEFINE_integer("fold", None, "Predict only this fold's validation cases of the preprocessed folder "
                         "(training's split of the plan's training cases, with the run's --nfolds).")
    flags.DEFINE_boolean("overlays", False, "Also draw <case>_overlay.png: the mask over slices of "
                         "its image.")
    flags.DEFINE_string("postprocess", "auto", "Post-processing decision file (find_best_configuration.py) "
                        "applied to the label maps; 'auto': the postprocessing.json in the folder holding "
                        "the --ckpt_path runs, when it was decided for exactly those runs; 'none': never.")
    flags.DEFINE_boolean("brats", False, "The model has BraTS region outputs (WT, TC, ET sigmoids); Orbax "
                         "checkpoints of --brats runs say so themselves.")
    # Model options for --torch_ckpt (Orbax checkpoints carry their own).
    flags.DEFINE_list("filters", None, "Per-level filters of the PyTorch model (default: the plan's).")
    flags.DEFINE_enum("norm", "instance", ["instance", "batch", "group"],
                      "Normalisation of the PyTorch model.")
    flags.DEFINE_boolean("residual", False, "The PyTorch model uses residual blocks.")
    flags.DEFINE_boolean("deep_supervision", False, "The PyTorch model has deep-supervision heads.")
    flags.DEFINE_integer("deep_supr_num", 2, "Deep-supervision heads of the PyTorch model.")
    flags.DEFINE_boolean("attention", False, "The PyTorch model has attention-gated skips.")


def _plan_path() -> str | None:
    from pathlib import Path

    from nnunet_jax.plan import PLAN_FILE

    if FLAGS.plan:
        return FLAGS.plan
    for d in FLAGS.data:
        if (Path(d) / PLAN_FILE).is_file():
            return str(Path(d) / PLAN_FILE)
    return None


def _predict(plan: str | None) -> list:
    """Build the predictor the flags name and predict ``--data`` into ``--results``; returns the files."""
    from nnunet_jax.inference.predictor import Predictor, predict_inputs

    # Sliding-window settings not given are the training run's own (None: from its config.json).
    options = dict(tta=FLAGS.tta, overlap=FLAGS.overlap, blend=FLAGS.blend, batch_size=FLAGS.val_batch_size)
    # Orbax runs record whether they are region models: --brats only has to agree when it is given.
    brats = FLAGS.brats if FLAGS.torch_ckpt or FLAGS["brats"].present else None
    if FLAGS.torch_ckpt:
        if plan is None:
            raise FileNotFoundError("--torch_ckpt needs --plan (or a preprocessed --data folder)")
        model_options = dict(norm=FLAGS.norm, residual=FLAGS.residual, attention=FLAGS.attention,
                             deep_supervision=FLAGS.deep_supervision, deep_supr_num=FLAGS.deep_supr_num,
                             filters=tuple(int(f) for f in FLAGS.filters) if FLAGS.filters else None)
        predictor = Predictor.from_torch(FLAGS.torch_ckpt, plan, amp=FLAGS.amp, amp_dtype=FLAGS.amp_dtype,
                                         model_options=model_options, brats=brats, **options)
    else:
        predictor = Predictor.from_checkpoints(FLAGS.ckpt_path, plan, amp=FLAGS.amp,
                                               amp_dtype=FLAGS.amp_dtype, brats=brats, **options)
    cases = None
    if FLAGS.fold is not None:
        from nnunet_jax.checkpoints import read_run_settings
        from nnunet_jax.data.folds import split_cases

        training = predictor.plan.training_cases
        if training is None:
            raise ValueError("--fold needs a plan that lists its training cases (preprocess again)")
        settings = read_run_settings(FLAGS.ckpt_path[0]) if FLAGS.ckpt_path else None
        nfolds = int(((settings or {}).get("config") or {}).get("nfolds", 5))  # the split training used
        cases = split_cases(training, FLAGS.fold, nfolds)[1]
    return predict_inputs(predictor, FLAGS.data, FLAGS.results, save_nifti=FLAGS.save_nifti,
                          save_preds=FLAGS.save_preds, raw=FLAGS.raw, cases=cases, overlays=FLAGS.overlays)


def _predict_nnunetv2() -> list:
    """``--nnunetv2_model``: v2's pipeline in JAX over ``--data`` into ``--results``; returns the files."""
    from nnunet_jax.inference.predictor import Predictor

    folds = None
    if FLAGS.folds:
        folds = [f if f == "all" else int(f) for f in FLAGS.folds]
    predictor = Predictor.from_nnunetv2(
        FLAGS.nnunetv2_model, folds, FLAGS.checkpoint, amp=FLAGS.amp,
        mirror=FLAGS.tta if FLAGS["tta"].present else True,
        step_size=1.0 - (0.5 if FLAGS.overlap is None else FLAGS.overlap),
        gaussian=FLAGS.blend != "constant", accumulate=FLAGS.accumulate,
        **({} if FLAGS.val_batch_size is None else {"batch_size": FLAGS.val_batch_size}))
    print(predictor.describe(), flush=True)
    return predictor.predict_files(FLAGS.data, FLAGS.results, save_probabilities=FLAGS.save_preds,
                                   log=lambda line: print(line, flush=True))


def _postprocessing():
    """The decision ``--postprocess`` names (``auto``: the one found beside the ``--ckpt_path`` runs)."""
    from nnunet_jax import postprocessing as pp

    if FLAGS.postprocess == "none":
        return None
    if FLAGS.postprocess == "auto":
        return pp.find_for_runs(FLAGS.ckpt_path or [])
    return pp.load(FLAGS.postprocess)


def _postprocess(decision, written: list) -> None:
    """Apply the decision to the label maps just written (NIfTI, ``<case>_pred.npy``)."""
    from nnunet_jax import postprocessing as pp
    from nnunet_jax.io import NIFTI_SUFFIXES

    maps = [p for p in written if str(p).endswith(NIFTI_SUFFIXES) or str(p).endswith("_pred.npy")]
    changed = sum(pp.apply_to_file(p, decision.steps) for p in maps)
    print(f"{decision.describe()}: changed {changed} of {len(maps)} label map(s)")


def main(argv: list[str]) -> int:
    del argv  # run_app refuses extra arguments
    from nnunet_jax.locks import FolderBusyError, folder_lock

    if sum(map(bool, (FLAGS.ckpt_path, FLAGS.torch_ckpt, FLAGS.nnunetv2_model))) != 1:
        raise app.UsageError("give one of --ckpt_path (one or more), --torch_ckpt or --nnunetv2_model")
    if FLAGS.nnunetv2_model and FLAGS.fold is not None:
        raise app.UsageError("--fold selects validation cases of our preprocessed folders; for "
                             "--nnunetv2_model pass the images with --data (the model's folds: --folds)")
    try:
        with folder_lock(FLAGS.results, "predict.py"):  # one predict.py per output folder, from the start
            decision = _postprocessing()
            written = _predict_nnunetv2() if FLAGS.nnunetv2_model else _predict(_plan_path())
            if decision is not None:
                _postprocess(decision, written)
    except (FileNotFoundError, ValueError, FolderBusyError) as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} file(s) to {FLAGS.results}")
    return 0


def run() -> None:
    """Console entry point."""
    run_app(main, define_flags, __name__)


if __name__ == "__main__":
    run()

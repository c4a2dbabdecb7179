"""Convergence on CPU: train a small 3D U-Net on the synthetic task and print the validation Dice reached.

    python -m benchmarks.bench_convergence [--epochs 20] [--cases 20] [--workdir /tmp/bench_conv]
    python -m benchmarks.bench_convergence --ignore_fraction 0.9      # sparse annotation (ignore label)

Generates the synthetic MSD task (``python -m preprocess.synthetic``), preprocesses it (``python -m
preprocess``), trains through the real stack (DALI loader, loop, sliding-window validation) and prints: best
validation mean Dice (0-100) and its epoch, the untrained (epoch-1) Dice, wall time, and train-step images/s.

``--ignore_fraction f``: the training cases of the fold keep only a random ``1 - f`` of their label voxels,
the rest set to an nnU-Net v2 ignore label (:func:`nnunet_jax.datasets.sparse.sparsify`, on a copy of the
preprocessed folder); the validation cases stay fully labelled, so the Dice printed is the real one.
"""

from nnunet_jax.platform import configure_xla_flags

configure_xla_flags()

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("epochs", 20, "epochs to train")
flags.DEFINE_integer("cases", 20, "synthetic training cases")
flags.DEFINE_float("learning_rate", 3e-3, "learning rate (radam)")
flags.DEFINE_string("filters", "8,16,32,64", "filters per level of the 4-level synthetic topology")
flags.DEFINE_string("workdir", "", "where data, preprocessed volumes and results go (default: a temp dir)")
flags.DEFINE_float("ignore_fraction", 0.0, "fraction of the training cases' label voxels set to the ignore "
                   "label (0: fully labelled)")
flags.DEFINE_integer("fold", 0, "validation fold (of 5)")
FLAGS = flags.FLAGS


def _sh(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, capture_output=True)


def _sparse_copy(pre: Path, fraction: float, fold: int) -> Path:
    """A copy of the preprocessed folder whose training cases of ``fold`` are sparsified (made once)."""
    import shutil

    from nnunet_jax.data.dataset import PreprocessedDataset
    from nnunet_jax.datasets.sparse import sparsify

    out = pre.parent / f"preprocessed_ignore{fraction:g}_fold{fold}"
    if not (out / "00_3d" / "plan.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pre / "00_3d", out / "00_3d")
        train, _ = PreprocessedDataset.open(out / "00_3d").fold(fold, 5)
        sparsify(out / "00_3d", train, fraction)
    return out


def main(argv: list[str]) -> None:
    del argv
    from absl import logging

    from nnunet_jax.configs.default import get_config
    from nnunet_jax.training import loop

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    work = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="bench_conv_")).absolute()
    raw, pre, results = work / "raw", work / "preprocessed", work / "results"
    if not (pre / "00_3d" / "plan.json").exists():
        _sh("-m", "preprocess.synthetic", "--out", str(raw), "--cases", str(FLAGS.cases), "--test_cases", "0",
            "--seed", "0")
        _sh("-m", "preprocess", "--task", "00", "--dim", "3", "--data", str(raw), "--results", str(pre),
            "--exec_mode", "training", "--n_jobs", "2")
    data = _sparse_copy(pre, FLAGS.ignore_fraction, FLAGS.fold) if FLAGS.ignore_fraction else pre
    c = get_config()
    c.update(task="00", dim=3, data=str(data), results=str(results), fold=FLAGS.fold,
             filters=tuple(map(int, FLAGS.filters.split(","))), learning_rate=FLAGS.learning_rate,
             batch_size=2, min_epochs=FLAGS.epochs, max_epochs=FLAGS.epochs, num_workers=2, progress=False)
    if results.exists():
        import shutil

        shutil.rmtree(results)
    t0 = time.perf_counter()
    summary = loop.train_and_evaluate(c)
    wall = time.perf_counter() - t0
    logs = [json.loads(line) for line in (results / "logs.json").read_text().splitlines()]
    best = max(logs, key=lambda r: r["mean_dice"])
    speeds = [r["img_per_s"] for r in logs[1:]] or [logs[0]["img_per_s"]]  # epoch 1 includes compilation
    print(json.dumps({
        "ignore_fraction": FLAGS.ignore_fraction,
        "epochs": len(logs), "first_epoch_dice": round(logs[0]["mean_dice"], 2),
        "best_dice": round(best["mean_dice"], 2), "best_epoch": best["epoch"],
        "best_per_class": [round(d, 2) for d in best["dice"]], "wall_s": round(wall, 1),
        "train_img_per_s": round(sum(speeds) / len(speeds), 2), "stopped": summary["stopped"],
        "workdir": str(work)}))


if __name__ == "__main__":
    app.run(main)

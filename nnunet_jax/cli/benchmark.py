"""Throughput and latency of training steps or predict forwards (docs/reference.md §9), the seed's benchmark
mode.

    python benchmark.py --mode train --dim 3 --batch_size 2 --amp [--train_batches 150] [--warmup 5]
    python benchmark.py --mode predict --dim 3 --batch_size 1,2,4 --amp --baseline monai

Synthetic device-resident batches of the task's patch (default task 01: 128³, 4 channels, 4 classes), or
random patches of real preprocessed data with ``--data``. Prints the table (img/s, latency mean/p90/p95/p99)
and writes ``<results>/<logname>`` (perf.json). ``--baseline monai`` also measures MONAI's DynUNet (PyTorch)
with the same topology, batch and precision, and prints the ratio. Runs with only jax/flax/optax/absl.
"""

from nnunet_jax.platform import configure_xla_flags

configure_xla_flags()  # before JAX starts (oneDNN convolutions on CPU)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import flags  # noqa: E402

from nnunet_jax.cli import run_app  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined when it runs, so importing the module defines none)."""
    flags.DEFINE_enum("mode", "train", ["train", "predict"], "Time training steps or predict forwards.")
    flags.DEFINE_integer("dim", 3, "2 or 3.")
    flags.DEFINE_list("batch_size", ["2"], "Per-device batch size(s); a list gives one row each.")
    flags.DEFINE_boolean("amp", False, "Mixed precision (bf16 compute, or fp16 with --amp_dtype fp16).")
    flags.DEFINE_enum("amp_dtype", "bf16", ["bf16", "fp16"], "Compute dtype under --amp.")
    flags.DEFINE_integer("train_batches", 150, "Timed training steps (0: 150).")
    flags.DEFINE_integer("test_batches", 150, "Timed predict steps (0: 150).")
    flags.DEFINE_integer("warmup", 5, "Untimed steps before timing (after compilation).")
    flags.DEFINE_string("task", "01", "MSD task number whose patch size and spacing are used.")
    flags.DEFINE_list("patch", None, "Override the patch size (Z,Y,X or Y,X).")
    flags.DEFINE_integer("in_channels", 4, "Input channels of the synthetic batches.")
    flags.DEFINE_integer("n_class", 4, "Output classes (background included).")
    flags.DEFINE_list("filters", None, "Override the per-level filters (tiny nets for CI).")
    flags.DEFINE_string("data", None, "Preprocessed folder (plan.json + <case>_x.npy): real patches instead.")
    flags.DEFINE_string("results", ".", "Where perf.json is written.")
    flags.DEFINE_string("logname", "perf.json", "File name of the JSON results.")
    flags.DEFINE_enum("baseline", "none", ["none", "monai"], "Also time MONAI DynUNet in PyTorch.")
    flags.DEFINE_integer("gpus", 1, "Devices to use (0: all); the batch is per device.")
    flags.DEFINE_integer("seed", 0, "Seed of the weights and synthetic data.")


def _spec(batch_size: int):
    from nnunet_jax.benchmarking import BenchSpec
    from nnunet_jax.configs.tasks import get_task
    from nnunet_jax.planning.topology import plan_topology

    dim = FLAGS.dim
    in_channels, n_class, topo = FLAGS.in_channels, FLAGS.n_class, None
    if FLAGS.data:
        from nnunet_jax.plan import Plan  # only here: it imports nibabel (nnunet_jax.io)

        plan = Plan.load(FLAGS.data)
        if plan.dim != dim:
            raise ValueError(f"--data {FLAGS.data} was preprocessed for {plan.dim}D, not --dim {dim}")
        patch, spacing = plan.patch_size, plan.spacing
        in_channels, n_class, topo = plan.in_channels, plan.n_class, plan.topology
    else:
        task = get_task(FLAGS.task)
        if task is None:
            raise ValueError(f"--task {FLAGS.task} is not an MSD task number; use --data for a custom one")
        patch, spacing = task.patch(dim), task.spacing(dim)
    if FLAGS.patch:
        patch = [int(p) for p in FLAGS.patch]
        topo = None
    if len(patch) != dim:
        raise ValueError(f"patch {patch} is not {dim}D")
    filters = [int(f) for f in FLAGS.filters] if FLAGS.filters else None
    if topo is None or filters is not None:
        levels = plan_topology(patch, spacing)  # the network this patch and spacing give, default widths
        if filters is not None and len(filters) != levels.depth:
            raise ValueError(
                f"--filters {','.join(map(str, filters))} gives {len(filters)} widths, but patch "
                f"{','.join(map(str, patch))} gives a {levels.depth}-level U-Net (default filters "
                f"{','.join(map(str, levels.filters))}); give {levels.depth} values or leave --filters out")
        topo = plan_topology(patch, spacing, filters=filters)
    return BenchSpec(mode=FLAGS.mode, dim=dim, batch_size=batch_size, patch=tuple(int(p) for p in patch),
                     in_channels=in_channels, n_class=n_class, kernels=topo.kernels, strides=topo.strides,
                     filters=topo.filters, amp=FLAGS.amp, amp_dtype=FLAGS.amp_dtype,
                     train_batches=FLAGS.train_batches or 150, test_batches=FLAGS.test_batches or 150,
                     warmup=FLAGS.warmup, gpus=FLAGS.gpus, seed=FLAGS.seed)


def main(argv: list[str]) -> int:
    del argv
    from nnunet_jax import benchmarking

    try:  # every row's settings checked before the first (long) measurement
        specs = [_spec(int(b)) for b in FLAGS.batch_size]
    except ValueError as e:  # a bad --filters, --patch, --task or --data: one line, no traceback
        print(f"benchmark: {e}", file=sys.stderr)
        return 2
    results, lines = [], []
    print(benchmarking.HEADER, flush=True)  # then each row once, as soon as it is measured
    for spec in specs:
        ours = benchmarking.run_jax(spec, FLAGS.data)
        results.append(ours)
        print(benchmarking.format_rows([ours]).splitlines()[-1], flush=True)
        if FLAGS.baseline == "monai":
            try:
                base = benchmarking.run_monai(spec)
            except ImportError as e:
                print(f"benchmark: MONAI baseline skipped (torch/monai not installed: {e})", file=sys.stderr)
                continue
            results.append(base)
            print(benchmarking.format_rows([base]).splitlines()[-1], flush=True)
            lines.append(benchmarking.ratio_line(ours, base))
    for line in lines:
        print(line)
    path = benchmarking.write_perf_json(results, Path(FLAGS.results) / FLAGS.logname,
                                        extra={"argv": sys.argv[1:]})
    print(f"wrote {path}")
    return 0


def run() -> None:
    """Console entry point."""
    run_app(main, define_flags, __name__)


if __name__ == "__main__":
    run()

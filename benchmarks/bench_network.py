"""Our U-Net vs MONAI DynUNet on this CPU, in one run: forward+backward (a train step) and sliding-window
inference of a 3D net (default 64³ patch, 4 levels, 4 channels in, 4 classes), with the ratio.

``--dim 2`` benchmarks the 2D net instead (patch² images, filters capped at 512 as nnU-Net's 2D plans),
``--bf16`` adds a train-step row per framework in bf16 mixed precision (our ``--amp``; torch autocast), and
``--breakdown`` prints where our train step's time goes per op family (:mod:`op_breakdown`), with both the
custom CPU convolution gradients (``nnunet_jax/models/conv.py``) and XLA's own, side by side.

Each framework runs in its own interpreter (ours in .venv — Python >= 3.12, jax with oneDNN convolutions;
MONAI/PyTorch in .venv-oracle), one after the other, so they never compete for the cores:

    .venv/bin/python benchmarks/bench_network.py                      # full size, a few minutes
    .venv/bin/python benchmarks/bench_network.py --patch 32 --volume 48 --steps 2   # smoke run
    .venv/bin/python benchmarks/bench_network.py --levels 5 --bf16 --breakdown       # the issue-14 run

With ``--also_jax_py311`` ours is measured under the oracle's jax 0.10.2 as well (no oneDNN path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _spec(args: argparse.Namespace, amp: bool = False):
    from nnunet_jax.benchmarking import BenchSpec

    levels, d = args.levels, args.dim
    return BenchSpec(
        mode="train", dim=d, batch_size=args.batch_size, patch=(args.patch,) * d, in_channels=4, n_class=4,
        kernels=((3,) * d,) * levels, strides=((1,) * d,) + ((2,) * d,) * (levels - 1),
        filters=tuple(min(32 * 2**i, 320 if d == 3 else 512) for i in range(levels)),
        train_batches=args.steps, test_batches=args.steps, warmup=1, amp=amp,
    )


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def worker_jax(args: argparse.Namespace) -> dict:
    from nnunet_jax.platform import configure_xla_flags

    configure_xla_flags()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nnunet_jax.benchmarking import run_jax
    from nnunet_jax.inference import sliding_window_inference
    from nnunet_jax.models.unet import UNet

    spec = _spec(args)
    train = run_jax(spec)
    bf16 = _median(run_jax(_spec(args, amp=True)).step_times_s) if args.bf16 else None
    model = UNet(n_class=spec.n_class, kernels=spec.kernels, strides=spec.strides, filters=spec.filters)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *spec.patch, spec.in_channels)))
    apply_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    volume = np.random.default_rng(0).standard_normal((args.volume,) * spec.dim + (spec.in_channels,),
                                                      np.float32)
    times = []
    for _ in range(args.sw_repeats + 1):  # the first call compiles
        t0 = time.perf_counter()
        out = sliding_window_inference(volume, apply_fn, variables, spec.patch, overlap=0.5,
                                       blend="gaussian", batch_size=args.sw_batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    row = {"framework": f"jax {jax.__version__} (py{sys.version_info.major}.{sys.version_info.minor})",
           "train_step_s": _median(train.step_times_s), "bf16_train_step_s": bf16,
           "sliding_window_s": _median(times[1:]), "first_sliding_window_s": times[0]}
    if args.breakdown:
        from op_breakdown import breakdown, format_breakdown

        for dtype, step_s in ((jnp.float32, row["train_step_s"]), (jnp.bfloat16, bf16)):
            if dtype == jnp.bfloat16 and bf16 is None:
                continue
            rows = breakdown(spec.patch, spec.batch_size, spec.in_channels, spec.n_class, spec.kernels,
                             spec.strides, spec.filters, dtype)
            title = f"per-op breakdown of our train step, {jnp.dtype(dtype).name} ({row['framework']})"
            row.setdefault("breakdown", []).append(format_breakdown(rows, step_s, title))
    return row


def worker_monai(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import DynUNet

    from nnunet_jax.benchmarking import run_monai

    spec = _spec(args)
    train = run_monai(spec)
    bf16 = _median(run_monai(_spec(args, amp=True)).step_times_s) if args.bf16 else None
    net = DynUNet(spec.dim, spec.in_channels, spec.n_class, [list(k) for k in spec.kernels],
                  [list(s) for s in spec.strides], [list(s) for s in spec.strides[1:]],
                  filters=list(spec.filters), norm_name=("INSTANCE", {"affine": True}),
                  act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01})).eval()
    vol = np.random.default_rng(0).standard_normal((1, spec.in_channels) + (args.volume,) * spec.dim,
                                                   np.float32)
    x = torch.from_numpy(vol)
    times = []
    with torch.inference_mode():
        for _ in range(args.sw_repeats + 1):
            t0 = time.perf_counter()
            sliding_window_inference(x, spec.patch, args.sw_batch, net, overlap=0.5, mode="gaussian",
                                     sigma_scale=0.125)
            times.append(time.perf_counter() - t0)
    return {"framework": f"monai {__import__('monai').__version__} / torch {torch.__version__}",
            "train_step_s": _median(train.step_times_s), "bf16_train_step_s": bf16,
            "sliding_window_s": _median(times[1:]), "first_sliding_window_s": times[0]}


def _run(python: Path, worker: str, argv: list[str]) -> dict:
    cmd = [str(python), __file__, "--worker", worker, *argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{worker} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--dim", type=int, choices=[2, 3], default=3, help="3D net (patch³) or 2D net (patch²)")
    p.add_argument("--bf16", action="store_true", help="also time the train step in bf16 mixed precision")
    p.add_argument("--breakdown", action="store_true", help="per-op breakdown of our train step")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--volume", type=int, default=96, help="cube side of the sliding-window volume")
    p.add_argument("--sw_batch", type=int, default=4, help="windows per forward (val_batch_size)")
    p.add_argument("--steps", type=int, default=3, help="timed train steps")
    p.add_argument("--sw_repeats", type=int, default=2, help="timed sliding-window runs")
    p.add_argument("--python", default=str(ROOT / ".venv/bin/python"))
    p.add_argument("--oracle_python", default=str(ROOT / ".venv-oracle/bin/python"))
    p.add_argument("--also_jax_py311", action="store_true")
    p.add_argument("--worker", choices=["jax", "monai"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker_jax(args) if args.worker == "jax" else worker_monai(args)))
        return
    argv = [a for a in sys.argv[1:] if not a.startswith("--also_jax")]
    rows = [_run(Path(args.python), "jax", argv)]
    if args.also_jax_py311:
        rows.append(_run(Path(args.oracle_python), "jax", argv))
    ref = _run(Path(args.oracle_python), "monai", argv)
    rows.append(ref)
    cube = "³" if args.dim == 3 else "²"
    print(f"{args.dim}D U-Net, {args.levels} levels, patch {args.patch}{cube}, batch {args.batch_size}, 4→4 "
          f"channels; sliding window over {args.volume}{cube}, overlap 0.5, gaussian, {args.sw_batch} "
          f"windows/forward (median seconds, {os.cpu_count()} CPU cores)")
    bf = args.bf16
    bf_head = f"{'bf16 s':>8} {'vs MONAI':>9} " if bf else ""
    print(f"{'framework':<40} {'fwd+bwd s':>10} {'vs MONAI':>9} {bf_head}{'sliding s':>10} {'vs MONAI':>9}")
    for r in rows:
        fb, sw = r["train_step_s"], r["sliding_window_s"]
        line = f"{r['framework']:<40} {fb:>10.3f} {ref['train_step_s'] / fb:>8.2f}x "
        if bf:
            b = r["bf16_train_step_s"]
            line += f"{b:>8.3f} {ref['bf16_train_step_s'] / b:>8.2f}x "
        print(line + f"{sw:>10.3f} {ref['sliding_window_s'] / sw:>8.2f}x")
    print("(vs MONAI > 1: ours is faster)")
    for r in rows:
        for table in r.get("breakdown", []):
            print("\n" + table)


if __name__ == "__main__":
    main()

"""Training-loader throughput (images/s) on synthetic preprocessed 3D data, beside the train step's img/s.

Runs the real training iterator (DALI pipeline with every docs/reference.md §6 augmentation at the reference
probabilities, then ``device_put`` onto a one-device mesh) over a temporary dataset and times it after a
warm-up. ``--no-aug`` times the crop alone. The last column times the real jitted train step
(nnunet_jax.benchmarking.run_jax) of the U-Net planned for the same patch with ``--step_filters`` widths (the
small nets one trains on a CPU), so it shows whether input is the bottleneck (loader img/s < step img/s).
Example::

    .venv/bin/python benchmarks/bench_loader.py                   # 32³×2 (task 00), 64³×4, 128³×4
    .venv/bin/python benchmarks/bench_loader.py --patch 128 --channels 4 --batch 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def write_synthetic(root: Path, patch: int, channels: int, n_cases: int, seed: int = 0) -> None:
    """Volumes 1.25× the patch with a few spherical foreground blobs of two classes."""
    rng = np.random.default_rng(seed)
    size = int(patch * 1.25)
    grid = np.stack(np.meshgrid(*(np.arange(size),) * 3, indexing="ij"), -1)
    names = []
    for i in range(n_cases):
        lab = np.zeros((size,) * 3, np.uint8)
        for cls in (1, 2):
            centre = rng.uniform(0.2, 0.8, 3) * size
            lab[np.linalg.norm(grid - centre, axis=-1) < size / 8] = cls
        img = rng.normal(size=(channels, *lab.shape)).astype(np.float32) + lab
        np.save(root / f"case{i:03d}_x.npy", img)
        np.save(root / f"case{i:03d}_y.npy", lab[None])
        names.append(f"case{i:03d}")
    plan = {
        "task": "bench",
        "dim": 3,
        "patch_size": [patch] * 3,
        "n_class": 3,
        "in_channels": channels,
        "cases": {"training": names, "test": []},
    }
    (root / "plan.json").write_text(json.dumps(plan))


def bench(patch: int, channels: int, batch: int, steps: int, warmup: int, aug: bool, threads: int) -> float:
    import jax
    from jax.sharding import Mesh

    from nnunet_jax.data.dataset import PreprocessedDataset
    from nnunet_jax.data.loader import make_train_iterator
    from nnunet_jax.data.pipelines import AugmentConfig

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp), patch, channels, n_cases=max(4, batch * 2))
        ds = PreprocessedDataset.open(tmp)
        cfg = AugmentConfig() if aug else AugmentConfig.none(oversampling=0.33)
        done, epoch, t0 = 0, 0, None
        while done < warmup + steps:
            for b in make_train_iterator(
                ds, ds.training, mesh, batch_size=batch, seed=0, epoch=epoch, aug=cfg, num_threads=threads
            ):
                jax.block_until_ready(b)
                done += 1
                if done == warmup:
                    t0 = time.perf_counter()
                if done == warmup + steps:
                    break
            epoch += 1
        return steps * batch / (time.perf_counter() - t0)


def step_throughput(patch: int, channels: int, batch: int, base_filters: int, steps: int = 3) -> float:
    """img/s of the real train step for the topology planned from the patch (1 mm spacing)."""
    from nnunet_jax.benchmarking import BenchSpec, run_jax
    from nnunet_jax.planning.topology import plan_topology

    top = plan_topology((patch,) * 3, (1.0, 1.0, 1.0))
    filters = tuple(min(base_filters * 2**i, 320) for i in range(len(top.strides)))
    spec = BenchSpec(mode="train", dim=3, batch_size=batch, patch=(patch,) * 3, in_channels=channels,
                     n_class=3, kernels=top.kernels, strides=top.strides, filters=filters,
                     train_batches=steps, warmup=1)
    return run_jax(spec).throughput


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, nargs="*", help="cubic patch sizes (default 32 64 128)")
    ap.add_argument("--channels", type=int, nargs="*", help="channels per patch (default 2 4 4)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default: by patch size)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-aug", action="store_true")
    ap.add_argument("--step_filters", type=int, default=8, help="first-level width of the timed U-Net")
    ap.add_argument("--no-step", action="store_true", help="skip timing the train step")
    a = ap.parse_args()
    from nnunet_jax.platform import configure_xla_flags

    configure_xla_flags()
    patches = a.patch or [32, 64, 128]
    channels = a.channels or ([2, 4, 4] if not a.patch else [4] * len(patches))
    print(f"{'patch':>8} {'C':>2} {'batch':>5} {'aug':>4} {'loader img/s':>13} {'step img/s':>11}")
    for p, c in zip(patches, channels, strict=True):
        steps = a.steps or {32: 100, 64: 30}.get(p, 10)
        ips = bench(p, c, a.batch, steps, a.warmup, not a.no_aug, a.threads)
        step = float("nan") if a.no_step else step_throughput(p, c, a.batch, a.step_filters)
        print(f"{p:>6}³ {c:>2} {a.batch:>5} {'on' if not a.no_aug else 'off':>4} {ips:13.1f} {step:11.2f}",
              flush=True)


if __name__ == "__main__":
    main()

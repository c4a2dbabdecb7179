"""benchmark.py's library (docs/reference.md §9): timed train / predict steps, the table, perf.json, MONAI
baseline.

Why it looks the way it does:
- The timed train step is the real one (:func:`nnunet_jax.training.step.make_train_step`) on device-resident
  batches, so the number is what training gets minus input loading. Predict = one forward of a patch-sized
  batch (no sliding window), as the reference.
- The step is compiled ahead of time (``lower().compile()``, reported apart as ``compile_s``), the warm-up
  steps run untimed (the newer reference's ``--warmup`` is ignored; ours is not), and every timed step ends
  with ``block_until_ready``, so a step's time is the device's, not the dispatch's.
- Only jax, flax, optax and numpy are imported here (no nibabel, ml_collections or DALI), so the synthetic
  benchmark runs on a bare GPU machine; real data (``data_dir``) and the MONAI baseline import what they need
  lazily.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_jax.atomic import write_json
from nnunet_jax.attrdict import AttrDict

PERCENTILES = (90, 95, 99)


@dataclass
class BenchSpec:
    """What to measure: one row of the table."""

    mode: str  # train | predict
    dim: int
    batch_size: int  # per device, as the seed's --batch_size
    patch: tuple[int, ...]
    in_channels: int
    n_class: int
    kernels: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    filters: tuple[int, ...]
    amp: bool = False
    amp_dtype: str = "bf16"  # bf16 | fp16
    train_batches: int = 150
    test_batches: int = 150
    warmup: int = 5
    gpus: int = 1  # devices used (0: all)
    seed: int = 0


@dataclass
class BenchResult:
    framework: str  # jax | monai
    mode: str
    dim: int
    batch_size: int  # global batch (per device × devices)
    precision: str  # amp-bf16 | amp-fp16 | tf32 | fp32
    device: str
    n_devices: int
    steps: int
    warmup: int
    compile_s: float
    step_times_s: list[float] = field(repr=False, default_factory=list)

    @property
    def throughput(self) -> float:
        """Images (patches) per second: global batch / mean step time."""
        return self.batch_size / float(np.mean(self.step_times_s))

    def latency_ms(self) -> dict[str, float]:
        t = np.asarray(self.step_times_s) * 1e3
        out = {"mean": float(t.mean())}
        out.update({f"p{p}": float(np.percentile(t, p)) for p in PERCENTILES})
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput_img_s"] = self.throughput
        d["latency_ms"] = self.latency_ms()
        return d


def time_steps(step: Callable[[], Any], n_steps: int, warmup: int, sync: Callable[[Any], Any]) -> list[float]:
    """Run ``warmup`` untimed steps, then time ``n_steps``, each until ``sync(output)`` returns."""
    if n_steps < 1:
        raise ValueError(f"need at least one timed step, got {n_steps}")
    for _ in range(max(0, warmup)):
        sync(step())
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
    return times


def _precision(amp: bool, amp_dtype: str, device_kind: str) -> str:
    if amp:
        return f"amp-{amp_dtype}"
    return "tf32" if "gpu" in device_kind.lower() or "nvidia" in device_kind.lower() else "fp32"


def _synthetic_batch(spec: BenchSpec, global_batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    image = rng.standard_normal((global_batch, *spec.patch, spec.in_channels), dtype=np.float32)
    label = rng.integers(0, spec.n_class, (global_batch, *spec.patch, 1), dtype=np.int32).astype(np.uint8)
    return {"image": image, "label": label}


def real_batches(data_dir: str | os.PathLike, spec: BenchSpec, global_batch: int, n_batches: int = 4
                 ) -> list[dict[str, np.ndarray]]:
    """Random patch-sized crops (zero-padded where a volume is smaller) of preprocessed cases, channels
    last (2D: one random slice per sample)."""
    from nnunet_jax.plan import IMAGE_SUFFIX, case_of, label_file  # lazily: it imports nibabel

    data_dir = Path(data_dir)
    xs = sorted(data_dir.glob(f"*{IMAGE_SUFFIX}"))
    if not xs:
        raise FileNotFoundError(f"--data {data_dir}: no preprocessed <case>_x.npy files")
    rng = np.random.default_rng(spec.seed)
    batches = []
    for _ in range(n_batches):
        imgs, lbls = [], []
        for _ in range(global_batch):
            x_path = xs[int(rng.integers(len(xs)))]
            x = np.load(x_path, mmap_mode="r")
            y_path = x_path.with_name(label_file(case_of(x_path)))
            y = np.load(y_path, mmap_mode="r") if y_path.exists() else np.zeros((1, *x.shape[1:]), np.uint8)
            if spec.dim == 2:  # one random slice: (C, Y, X)
                z = int(rng.integers(x.shape[1]))
                x, y = x[:, z], y[:, z]
            img, lbl = np.zeros((x.shape[0], *spec.patch), np.float32), np.zeros((1, *spec.patch), np.uint8)
            src, dst = [], []
            for n, p in zip(x.shape[1:], spec.patch, strict=True):
                start = int(rng.integers(0, n - p + 1)) if n > p else 0
                ln = min(n, p)
                src.append(slice(start, start + ln))
                dst.append(slice((p - ln) // 2, (p - ln) // 2 + ln))
            img[(slice(None), *dst)] = x[(slice(None), *src)]
            lbl[(slice(None), *dst)] = y[(slice(None), *src)]
            imgs.append(np.moveaxis(img, 0, -1))
            lbls.append(np.moveaxis(lbl, 0, -1))
        batches.append({"image": np.stack(imgs), "label": np.stack(lbls)})
    return batches


def run_jax(spec: BenchSpec, data_dir: str | os.PathLike | None = None) -> BenchResult:
    """Time the real jitted train step (or the eval forward) of our U-Net on device-resident batches."""
    import jax

    from nnunet_jax import parallel
    from nnunet_jax.inference.forward import make_forward
    from nnunet_jax.losses import make_loss
    from nnunet_jax.models.build import compute_dtype, uses_fp16
    from nnunet_jax.models.unet import UNet
    from nnunet_jax.training import step as step_lib
    from nnunet_jax.training.optim import make_optimizer

    devices = jax.local_devices()
    devices = devices[: spec.gpus] if spec.gpus else devices
    mesh = parallel.make_mesh(devices)
    global_batch = spec.batch_size * len(devices)
    precision = {"amp": spec.amp, "amp_dtype": spec.amp_dtype}
    fp16 = uses_fp16(precision)
    model = UNet(n_class=spec.n_class, kernels=spec.kernels, strides=spec.strides, filters=spec.filters,
                 dtype=compute_dtype(precision))
    tx = make_optimizer(AttrDict(optimizer="radam", learning_rate=1e-3, weight_decay=1e-4, momentum=0.99,
                             gradient_clip_val=0.0, lr_warmup_epochs=0))
    state = step_lib.init_state(model, tx, (*spec.patch, spec.in_channels), spec.seed, mesh, fp16=fp16)
    host = real_batches(data_dir, spec, global_batch) if data_dir else [_synthetic_batch(spec, global_batch)]
    sharding = parallel.batch_sharding(mesh)
    batches = [{k: jax.device_put(v, sharding) for k, v in b.items()} for b in host]
    sync = jax.block_until_ready

    t0 = time.perf_counter()
    if spec.mode == "train":
        train_step = step_lib.make_train_step(model, make_loss(), tx, mesh, fp16=fp16)
        compiled = train_step.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        counter = [0]
        holder = [state]

        def one() -> Any:
            batch = batches[counter[0] % len(batches)]
            counter[0] += 1
            holder[0], metrics = compiled(holder[0], batch)
            return metrics["loss"], holder[0].step

        n_steps = spec.train_batches
    elif spec.mode == "predict":
        forward = jax.jit(make_forward(model))
        variables = step_lib.eval_variables(state)
        images = [b["image"] for b in batches]
        compiled = forward.lower(variables, images[0]).compile()
        compile_s = time.perf_counter() - t0
        counter = [0]

        def one() -> Any:
            x = images[counter[0] % len(images)]
            counter[0] += 1
            return compiled(variables, x)

        n_steps = spec.test_batches
    else:
        raise ValueError(f"mode must be train or predict, got {spec.mode!r}")
    times = time_steps(one, n_steps, spec.warmup, sync)
    kind = devices[0].device_kind
    return BenchResult("jax", spec.mode, spec.dim, global_batch,
                       _precision(spec.amp, spec.amp_dtype, f"{devices[0].platform} {kind}"), kind,
                       len(devices), n_steps, spec.warmup, compile_s, times)


def run_monai(spec: BenchSpec) -> BenchResult:
    """The same network as MONAI DynUNet in PyTorch, same batch and patch, on the GPU when there is one.

    Train: DiceCE loss (``include_background=False, softmax, to_onehot_y, batch``) + Adam, autocast under AMP
    (GradScaler for fp16). Raises ImportError when torch/monai are not installed.
    """
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import DynUNet

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(spec.seed)
    net = DynUNet(spec.dim, spec.in_channels, spec.n_class, [list(k) for k in spec.kernels],
                  [list(s) for s in spec.strides], [list(s) for s in spec.strides[1:]],
                  filters=list(spec.filters), norm_name=("INSTANCE", {"affine": True}),
                  act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}), res_block=False).to(dev)
    x = torch.randn(spec.batch_size, spec.in_channels, *spec.patch, device=dev)
    y = torch.randint(0, spec.n_class, (spec.batch_size, 1, *spec.patch), device=dev)
    amp_dtype = torch.float16 if spec.amp_dtype == "fp16" else torch.bfloat16
    autocast = lambda: torch.autocast(dev.type, dtype=amp_dtype, enabled=spec.amp)  # noqa: E731

    def sync(_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    if spec.mode == "train":
        net.train()
        loss_fn = DiceCELoss(include_background=False, softmax=True, to_onehot_y=True, batch=True)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(dev.type, enabled=spec.amp and spec.amp_dtype == "fp16")

        def one() -> Any:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss

        n_steps = spec.train_batches
    else:
        net.eval()

        def one() -> Any:
            with torch.inference_mode(), autocast():
                return net(x)

        n_steps = spec.test_batches
    sync(one())  # first call: cuDNN autotuning, allocator warm-up (the counterpart of our compile)
    compile_s = time.perf_counter() - t0
    times = time_steps(one, n_steps, spec.warmup, sync)
    name = torch.cuda.get_device_name(dev) if cuda else (platform.processor() or "cpu")
    return BenchResult("monai", spec.mode, spec.dim, spec.batch_size,
                       _precision(spec.amp, spec.amp_dtype, "gpu" if cuda else "cpu"), name, 1, n_steps,
                       spec.warmup, compile_s, times)


HEADER = (f"{'framework':<9} {'mode':<7} {'dim':>3} {'batch':>5} {'precision':<9} {'img/s':>10} "
          f"{'mean ms':>9} {'p90 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'compile s':>9}  device")


def format_rows(results: Sequence[BenchResult | dict]) -> str:
    """The throughput / latency table (one line per result; dicts as written to perf.json are accepted)."""
    lines = [HEADER]
    for r in results:
        d = r.to_dict() if isinstance(r, BenchResult) else r
        lat = d["latency_ms"]
        lines.append(f"{d['framework']:<9} {d['mode']:<7} {d['dim']:>3} {d['batch_size']:>5} "
                     f"{d['precision']:<9} {d['throughput_img_s']:>10.2f} {lat['mean']:>9.2f} "
                     f"{lat['p90']:>9.2f} {lat['p95']:>9.2f} {lat['p99']:>9.2f} {d['compile_s']:>9.1f}  "
                     f"{d['device']}")
    return "\n".join(lines)


def ratio_line(ours: BenchResult, baseline: BenchResult) -> str:
    return (f"jax / monai throughput ratio ({ours.mode}, batch {ours.batch_size}, {ours.precision}): "
            f"{ours.throughput / baseline.throughput:.2f}x")


def write_perf_json(results: Sequence[BenchResult], path: str | os.PathLike,
                    extra: dict | None = None) -> Path:
    """Write the results (per-step times included) as JSON, atomically."""
    import jax

    doc = {"jax_version": jax.__version__, "backend": jax.default_backend(), **(extra or {}),
           "results": [r.to_dict() for r in results]}
    return write_json(doc, path, indent=1)


def read_perf_json(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """The result dicts of one or more perf.json files (for a combined table)."""
    rows: list[dict] = []
    for p in paths:
        rows.extend(json.loads(Path(p).read_text())["results"])
    return rows

"""Per-case preprocessing speed and peak memory: nnunet_jax.preprocessing vs a plain scikit-image version of
the same steps (the reference's code path: MONAI-style box, skimage ``resize`` per channel / slice / class,
masked z-score, ``np.pad``). Not a test.

Cases (synthetic, training mode):
  brats   4 x 155 x 240 x 240 at 1 mm, target 1 mm (crop + normalise + pad only), MRI, patch 128^3
  task05  2 x 20 x 320 x 320 at (Z, Y, X) = (4.0, 0.6, 0.6) mm -> Task05 target (3.6, 0.62, 0.62): anisotropic
          resampling to 22 x 309 x 309 (a source at exactly the target spacing would not be resampled at all)

Timing: all variants in one subprocess, interleaved (the CPU may be shared), best of --repeats runs.
Memory: one subprocess per variant; peak = tracemalloc peak of one run (numpy buffers are traced, the
input is not counted); max RSS = the child's high-water mark (input and data generation included).
"ours" is the default (one thread), "ours-mt" threads over channels on all cores (no gain on a loaded
2-core machine; up to C x on idle cores).

  python benchmarks/bench_preprocess.py            # full size (a few minutes on a slow shared CPU)
  python benchmarks/bench_preprocess.py --small    # smoke run for CI
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from rss import peak_rss_mb  # benchmarks/rss.py (this folder is on sys.path when run)
from skimage.transform import resize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nnunet_jax.preprocessing.case import preprocess_case  # noqa: E402

CASES = {
    "brats": dict(channels=4, shape=(155, 240, 240), small=(40, 60, 60), spacing=(1.0, 1.0, 1.0),
                  target=(1.0, 1.0, 1.0), patch=(128, 128, 128), norm="MRI", n_class=3),
    "task05": dict(channels=2, shape=(20, 320, 320), small=(6, 80, 80), spacing=(4.0, 0.6, 0.6),
                   target=(3.6, 0.62, 0.62), patch=(20, 320, 256), norm="MRI", n_class=2),
}


def make_case(name: str, small: bool):
    """An ellipsoidal 'body' of positive intensities in zeros, with nested label blobs."""
    cfg = CASES[name]
    shape = cfg["small"] if small else cfg["shape"]
    rng = np.random.default_rng(0)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    r2 = sum(((g - s / 2 + 0.5) / (0.4 * s)) ** 2 for g, s in zip(grids, shape, strict=True))
    body = r2 < 1
    image = np.zeros((cfg["channels"], *shape), np.float32)
    for c in range(cfg["channels"]):
        image[c][body] = rng.gamma(4.0, 100.0, size=int(body.sum())).astype(np.float32)
    label = np.zeros((1, *shape), np.uint8)
    for k in range(1, cfg["n_class"] + 1):
        label[0][r2 < 0.5 / k] = k
    return image, label, cfg


# ---------------------------------------------------------------------------------- plain scikit-image


def _sk(x, shape, order, mode):
    return resize(x, shape, order=order, mode=mode, cval=0, clip=True, anti_aliasing=False)


def skimage_case(image, label, spacing, target, patch, norm):
    """The same steps written plainly, as the reference does them."""
    mask = (image > 0).any(0)
    box = []
    for ax in ((1, 2), (0, 2), (0, 1)):
        nz = np.argwhere(mask.any(ax))
        box.append((int(nz[0, 0]), int(nz[-1, 0]) + 1) if len(nz) else (0, mask.shape[len(box)]))
    sl = (slice(None),) + tuple(slice(a, b) for a, b in box)
    image, label = image[sl], label[sl]
    if list(spacing) != list(target):
        shape = (np.array(spacing) / np.array(target) * np.array(image.shape[1:])).astype(int).tolist()
        aniso = max(spacing) / min(spacing) >= 3 or max(target) / min(target) >= 3
        chans = []
        for ch in image:
            if aniso:
                r = np.stack([_sk(s, shape[1:], 3, "edge") for s in ch])
                chans.append(_sk(r, shape, 0, "constant"))
            else:
                chans.append(_sk(ch, shape, 3, "edge"))
        image = np.stack(chans).astype(np.float32)
        out = np.zeros(shape, np.uint8)
        n_class = int(label.max())
        if aniso:
            r2 = np.zeros((label.shape[1], *shape[1:]), np.uint8)
            for c in range(1, n_class + 1):
                for d in range(label.shape[1]):
                    r2[d][_sk((label[0, d] == c).astype(float), shape[1:], 1, "edge") >= 0.5] = c
            for c in range(1, n_class + 1):
                out[_sk((r2 == c).astype(float), shape, 0, "constant") >= 0.5] = c
        else:
            for c in range(1, n_class + 1):
                out[_sk((label[0] == c).astype(float), shape, 1, "edge") >= 0.5] = c
        label = out[None]
    image = image.copy()
    for c in range(image.shape[0]):
        m = image[c] != 0
        v = image[c][m]
        image[c][m] = (v - v.mean()) / v.std()
    pads = [max(p - s, 0) / 2 for p, s in zip(patch, image.shape[1:], strict=True)]
    width = [(0, 0)] + [(math.floor(p), math.ceil(p)) for p in pads]
    return np.pad(image, width), np.pad(label, width)


def ours_case(image, label, spacing, target, patch, norm, workers=1):
    x, y, _ = preprocess_case(image, label, spacing, target_spacing=target, patch_size=patch,
                              normalization=norm, workers=workers)
    return x, y


VARIANTS = {
    "skimage": skimage_case,
    "ours": ours_case,  # the default: one thread
    "ours-mt": lambda *a: ours_case(*a, workers=None),  # threads over channels, all cores
}


# ------------------------------------------------------------------------------------------------ driver


def child_time(name: str, small: bool, repeats: int) -> None:
    """All variants in one process, interleaved, so a busy shared CPU hits them alike; best of repeats."""
    image, label, cfg = make_case(name, small)
    args = (image, label, cfg["spacing"], cfg["target"], cfg["patch"], cfg["norm"])
    best = {v: math.inf for v in VARIANTS}
    outs = {}
    for _ in range(repeats):
        for v, fn in VARIANTS.items():
            t0 = time.perf_counter()
            outs[v] = fn(*args)
            best[v] = min(best[v], time.perf_counter() - t0)
    (xs, ys), (xo, yo) = outs["skimage"], outs["ours"]
    print(json.dumps(dict(seconds=best, shape=list(xo.shape), max_dx=float(np.abs(xs - xo).max()),
                          label_diff=int((ys != yo).sum()), input_mb=image.nbytes / 2**20)))


def child_mem(name: str, variant: str, small: bool) -> None:
    """Peak of one run: tracemalloc (numpy buffers are traced) and the process's max RSS."""
    image, label, cfg = make_case(name, small)
    args = (image, label, cfg["spacing"], cfg["target"], cfg["patch"], cfg["norm"])
    rss0 = peak_rss_mb()
    tracemalloc.start()
    VARIANTS[variant](*args)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = peak_rss_mb()
    print(json.dumps(dict(peak_mb=peak / 2**20, rss_mb=rss, rss_before_mb=rss0)))


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"{args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny volumes (CI smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5, small 2)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    repeats = a.repeats or (2 if a.small else 5)
    if a.child:
        if a.child[0] == "time":
            child_time(a.child[1], a.small, repeats)
        else:
            child_mem(a.child[1], a.child[2], a.small)
        return
    small = ["--small"] if a.small else []
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; best of {repeats} interleaved runs")
    print(f"{'case':8} {'variant':8} {'s/case':>8} {'x skimage':>9} {'peak MB':>8} {'max RSS':>8}")
    for name in a.cases:
        t = _run(["--child", "time", name, "--repeats", str(repeats), *small])
        for v in VARIANTS:
            m = _run(["--child", "mem", name, v, *small])
            sec = t["seconds"][v]
            print(f"{name:8} {v:8} {sec:8.3f} {t['seconds']['skimage'] / sec:8.2f}x {m['peak_mb']:8.1f} "
                  f"{m['rss_mb']:8.1f}")
        print(f"{name:8} output {tuple(t['shape'])} from {t['input_mb']:.0f} MB input; ours vs skimage: "
              f"max |dx| {t['max_dx']:.2e}, label voxels differing {t['label_diff']}")


if __name__ == "__main__":
    main()

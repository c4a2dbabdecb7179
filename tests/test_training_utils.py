"""Shared pieces of the training tests: a tiny synthetic data source, a tiny config, subprocess helpers.

The data source stands in for the DALI loader (same contract as ``loop.DataSource``): bright spheres in
noise, label 1 inside the sphere; batches are a pure function of (seed, epoch, step), each process
contributing its rows of the global batch. Used in-process and by the subprocess scripts of the
multi-process and kill tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PATCH = (16, 16, 16)
TOPOLOGY = {"kernels": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "filters": [4, 8, 16]}


def sphere_case(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(image (*shape, 1) float32, label (*shape) int32): a sphere brighter than the noise around it."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    centre = np.array([rng.uniform(5, s - 5) for s in shape])
    radius = rng.uniform(3, 5)
    label = (np.linalg.norm(grid - centre, axis=-1) < radius).astype(np.int32)
    image = rng.normal(0.0, 1.0, shape) + 2.0 * label
    return image[..., None].astype(np.float32), label


class FakeData:
    """In-memory stand-in for the DALI-fed dataset (see module docstring)."""

    def __init__(self, mesh, *, global_batch: int = 2, steps_per_epoch: int = 2, n_train: int = 6,
                 n_val: int = 2, seed: int = 0, val_shape: tuple[int, ...] = (20, 20, 20), task: str = "00"):
        import jax

        self.mesh, self.global_batch, self.seed = mesh, global_batch, seed
        self.steps_per_epoch = steps_per_epoch
        from nnunet_jax.plan import Plan

        self.plan = Plan.from_dict({"task": task, "dim": 3, "patch_size": list(PATCH), "n_class": 2,
                                    "in_channels": 1, "topology": TOPOLOGY})
        rng = np.random.default_rng(1234)
        self.train = [sphere_case(rng, PATCH) for _ in range(n_train)]
        self.val = {f"val_{i}": sphere_case(rng, val_shape) for i in range(n_val)}
        self.train_cases = [f"train_{i}" for i in range(n_train)]
        self.val_cases = sorted(self.val)
        self._pid, self._nproc = jax.process_index(), jax.process_count()

    def local_batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, step])
        idx = rng.integers(0, len(self.train), self.global_batch)
        flips = rng.random((self.global_batch, 3)) < 0.5
        images, labels = [], []
        for i, f in zip(idx, flips, strict=True):
            img, lbl = self.train[i]
            axes = tuple(int(a) for a in np.nonzero(f)[0])
            images.append(np.flip(img, axes))
            labels.append(np.flip(lbl, axes)[..., None])
        per = self.global_batch // self._nproc
        rows = slice(self._pid * per, (self._pid + 1) * per)
        return {"image": np.stack(images)[rows].copy(), "label": np.stack(labels)[rows].astype(np.uint8)}

    def train_batches(self, epoch: int, start_step: int) -> Iterator[dict]:
        from nnunet_jax import parallel

        for step in range(start_step, self.steps_per_epoch):
            yield parallel.global_batch(self.local_batch(epoch, step), self.mesh)

    def load_case(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.val[name]


def tiny_config(results: str | Path, **overrides):
    """The default config shrunk to a seconds-long CPU run."""
    from nnunet_jax.configs.default import get_config

    c = get_config()
    c.task, c.results, c.data = "00", str(results), "/nonexistent"
    c.batch_size, c.val_batch_size, c.min_epochs, c.max_epochs = 1, 4, 1, 2
    c.progress = False
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def run_python(code: str, devices: int = 1, env: dict | None = None, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with its own simulated device count."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform" not in f)
    full_env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}",
                "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc

"""Iterators that hand the train step batches as global ``jax.Array``s sharded over the ``"data"`` mesh axis.

Epochs and exact resume. An epoch visits every training case once in an order drawn from
``(seed, epoch)`` (the same on every process); it has ``ceil(n_cases / volumes_per_step)`` steps, the last
step being filled up with the first cases of the epoch's order (as a wrapping DALI reader does). Each
process reads only its slice of every step's cases (process ``p`` of ``P`` takes the ``p``-th of ``P``
equal parts: the ``shard_id``/``num_shards`` split, done here so that every process has the same number of
steps), and a fresh pipeline is built per epoch, seeded from ``(seed, epoch, process_index)``. A run resumed
at ``(epoch, step)`` therefore rebuilds that epoch's pipeline and fast-forwards it by ``step`` batches: the
batches that follow are exactly those of the uninterrupted run. Cost of a resume: at most one epoch of
pipeline work (``step`` batches are produced and dropped, nothing is sent to the devices), i.e. the loader
time of the steps already done in that epoch; a pipeline build per epoch costs tens of milliseconds.

Batches: 3D ``image`` ``(B, Z, Y, X, C)`` float32, ``label`` ``(B, Z, Y, X, 1)`` uint8; 2D ``(B, Y, X, C)`` /
``(B, Y, X, 1)`` where the B = ``batch_size`` slices are ``nvol`` blocks of ``batch_size // nvol``
contiguous slices. ``batch_size`` and ``nvol`` are *global* (all devices, all processes together).

Each process builds its local part and :func:`nnunet_jax.parallel.global_batch` assembles the global array
(``jax.make_array_from_process_local_data``, split on the mesh's ``data`` axis). The pipeline runs
on the process's first local GPU when there is one (DALI GPU operators), else on the CPU; its output goes
through host memory on the way to the devices (the DALI JAX plugin's sharded iterator would avoid that on
GPUs, but it needs one GPU pipeline per device; a later optimisation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from nnunet_jax import parallel
from nnunet_jax.data.dataset import DatasetError, PreprocessedDataset
from nnunet_jax.data.pipelines import AugmentConfig, train_pipeline


def volumes_per_step(dim: int, batch_size: int, nvol: int = 1) -> int:
    """Volumes read per global step: the batch in 3D, ``nvol`` slice blocks in 2D."""
    return batch_size if dim == 3 else nvol


def steps_per_epoch(n_cases: int, dim: int, batch_size: int, nvol: int = 1) -> int:
    """Steps of one epoch: every case once, the last step filled up (``ceil``)."""
    if n_cases < 1:
        raise ValueError("an epoch needs at least one training case")
    return math.ceil(n_cases / volumes_per_step(dim, batch_size, nvol))


def epoch_order(n_cases: int, per_step: int, seed: int, epoch: int) -> np.ndarray:
    """Case indices of every step of ``epoch``, shape ``(steps, per_step)``: a permutation from
    ``(seed, epoch)``, wrapped around to fill the last step. Identical on every process."""
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(n_cases)
    steps = math.ceil(n_cases / per_step)
    return np.resize(perm, steps * per_step).reshape(steps, per_step)


def process_slice(order: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """The part of each step's cases that process ``process_index`` reads, flattened in step order."""
    per_step = order.shape[1]
    if per_step % process_count:
        raise ValueError(f"{per_step} volumes per step cannot be split over {process_count} processes")
    local = per_step // process_count
    return order[:, process_index * local : (process_index + 1) * local].reshape(-1)


def pipeline_seed(seed: int, epoch: int, process_index: int) -> int:
    """Seed of one process's pipeline for one epoch (independent streams per epoch and process)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(process_index)]).generate_state(1)[0] >> 1)


def default_device_id() -> int | None:
    """DALI device of this process: its first local GPU, or None (CPU operators)."""
    dev = jax.local_devices()[0]
    return int(dev.local_hardware_id) if dev.platform == "gpu" else None


def _host(tl: Any) -> np.ndarray:
    from nvidia.dali.backend import TensorListGPU

    return (tl.as_cpu() if isinstance(tl, TensorListGPU) else tl).as_array()


def _check_batch(dim: int, batch_size: int, nvol: int, mesh: Mesh) -> None:
    n_data = mesh.shape[parallel.DATA_AXIS]
    if batch_size < 1 or batch_size % n_data:
        raise ValueError(f"global batch {batch_size} is not a positive multiple of the {n_data} data devices")
    per_step = volumes_per_step(dim, batch_size, nvol)
    if dim == 2 and (nvol < 1 or batch_size % nvol):
        raise ValueError(f"2D batch {batch_size} is not a multiple of nvol {nvol}")
    if per_step % jax.process_count():
        raise ValueError(f"{per_step} volumes per step cannot be split over {jax.process_count()} processes")


def _files(dataset: PreprocessedDataset, cases: Sequence[str]) -> tuple[list[str], list[str]]:
    missing = [c for c in cases if not dataset.label_path(c).is_file()]
    if missing:
        raise DatasetError(f"{dataset.root}: training cases without a label file: {', '.join(missing[:5])}")
    return [str(dataset.image_path(c)) for c in cases], [str(dataset.label_path(c)) for c in cases]


class ShardedBatches:
    """``n_steps - start_step`` batches ``{"image", "label"}`` of global arrays from a DALI pipeline."""

    def __init__(
        self, pipe: Any, mesh: Mesh, n_steps: int, start_step: int = 0, slices_2d: bool = False
    ) -> None:
        self._pipe, self._mesh, self._n_steps, self._slices = pipe, mesh, n_steps, slices_2d
        self.step = 0
        for _ in range(start_step):  # fast-forward: run the pipeline, drop the batches
            self._pipe.run()
            self.step += 1

    def __len__(self) -> int:
        return self._n_steps - self.step

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def next_local(self) -> dict[str, np.ndarray]:
        """The next process-local batch as numpy (what ``__next__`` shards)."""
        if self.step >= self._n_steps:
            self._pipe = None  # free the pipeline's threads and buffers
            raise StopIteration
        image, label = (_host(t) for t in self._pipe.run())
        if self._slices:  # (nvol, block, Y, X, C) -> (nvol * block, Y, X, C)
            image = image.reshape(-1, *image.shape[2:])
            label = label.reshape(-1, *label.shape[2:])
        self.step += 1
        return {"image": image, "label": label}

    def __next__(self) -> dict[str, jax.Array]:
        return parallel.global_batch(self.next_local(), self._mesh)


def make_train_iterator(
    dataset: PreprocessedDataset,
    cases: Sequence[str],
    mesh: Mesh,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    aug: AugmentConfig | None = None,
    nvol: int = 1,
    device_id: int | None | str = "auto",
    num_threads: int = 2,
    prefetch: int = 2,
    ignore_label: int | None = None,
) -> ShardedBatches:
    """The batches of steps ``start_step ..`` of ``epoch`` (see the module docstring for the contract);
    ``ignore_label``: the plan's; crops then hold annotated voxels (:func:`.pipelines.train_pipeline`)."""
    dim = dataset.dim
    _check_batch(dim, batch_size, nvol, mesh)
    cases = sorted(cases)
    per_step = volumes_per_step(dim, batch_size, nvol)
    order = epoch_order(len(cases), per_step, seed, epoch)
    if not 0 <= start_step <= len(order):
        raise ValueError(f"start_step {start_step} is outside the epoch's {len(order)} steps")
    mine = process_slice(order, jax.process_index(), jax.process_count())
    images, labels = _files(dataset, [cases[i] for i in mine])
    local = per_step // jax.process_count()
    pipe = train_pipeline(
        images,
        labels,
        dataset.patch_size,
        batch_size=local,
        seed=pipeline_seed(seed, epoch, jax.process_index()),
        aug=aug,
        block=batch_size // nvol if dim == 2 else None,
        device_id=default_device_id() if device_id == "auto" else device_id,
        num_threads=num_threads,
        prefetch=prefetch,
        ignore_label=ignore_label,
    )
    return ShardedBatches(pipe, mesh, len(order), start_step, slices_2d=dim == 2)

"""nnU-Net v2 trained models run in JAX: a results folder in, what ``nnUNetv2_predict`` writes out.

    predictor = V2Predictor.from_model_folder("results/Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres",
                                              folds=(0, 1, 2, 3, 4))
    written = predictor.predict_files(["imagesTs/"], "preds")        # preds/<case>.nii.gz, as v2 names them

Per case, as v2 (docs/nnunetv2.md): read the channels with the plans' reader → v2's preprocessing
(:mod:`.preprocessing`) → per fold, the network (:mod:`.network`, weights from the fold's ``.pth`` read
without torch by :mod:`.checkpoint`) over v2's sliding window (``grid="nnunetv2"`` of our jitted window,
mirroring per tile over the checkpoint's axes) → fold logits summed and divided in fp16 → v2's export
(:mod:`.export`) → the label map written with the source geometry (and ``<case>.npz``/``.pkl`` with
``save_probabilities``, as v2's ``--save_probabilities``).

``accumulate="float16"`` (the default) reproduces v2's half-precision sliding-window buffers bit for bit;
``"float32"`` sums in fp32 instead (about 0.1 % of voxels change label on small cases, where v2's own
rounding decides near-ties). Nothing here imports torch or nnunetv2.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnunet_jax import parallel
from nnunet_jax.atomic import atomic_path
from nnunet_jax.inference.forward import make_forward, window_batch
from nnunet_jax.inference.sliding_window import ACCUMULATE, mirrored, sliding_window_inference
from nnunet_jax.interop.nnunetv2 import imageio
from nnunet_jax.interop.nnunetv2.checkpoint import model_folds, parse_model_dir_name, read_checkpoint
from nnunet_jax.interop.nnunetv2.export import logits_to_segmentation
from nnunet_jax.interop.nnunetv2.network import load_weights, network_from_plans
from nnunet_jax.interop.nnunetv2.plans import V2Labels, V2Plans
from nnunet_jax.interop.nnunetv2.preprocessing import CaseProps, preprocess_case
from nnunet_jax.io import DatasetError

__all__ = ["V2Predictor", "V2Result", "find_v2_cases"]


@dataclass
class V2Result:
    """One predicted case: the label map in reader order, the probabilities on request, the case's
    properties and where it came from."""

    case: str
    seg: np.ndarray
    probabilities: np.ndarray | None
    props: CaseProps
    geometry: imageio.Geometry


def find_v2_cases(data: Sequence[str | os.PathLike], file_ending: str,
                  n_channels: int) -> dict[str, list[Path]]:
    """``case -> channel files`` for v2-named inputs ``<case>_<XXXX><ending>``: folders (every such file in
    them) or single files (a case's channel files given one by one). Every case must have channels
    0000..n-1; a folder without any such file is an error naming it."""
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    found: dict[str, dict[int, Path]] = {}

    def add(p: Path) -> bool:
        m = pattern.match(p.name)
        if m is None:
            return False
        found.setdefault(m.group(1), {})[int(m.group(2))] = p
        return True

    for d in data:
        d = Path(d)
        if d.is_dir():
            if not sum(add(p) for p in sorted(d.iterdir()) if p.is_file()):
                raise DatasetError(f"{d}: no input files named <case>_<XXXX>{file_ending} (the model's "
                                   f"dataset.json file_ending) in this folder")
        elif d.is_file():
            if not add(d):
                raise DatasetError(f"{d}: an nnU-Net v2 input must be named <case>_<XXXX>{file_ending}")
        else:
            raise DatasetError(f"{d}: no such file or folder")
    cases = {}
    for case, chans in sorted(found.items()):
        missing = [c for c in range(n_channels) if c not in chans]
        extra = sorted(c for c in chans if c >= n_channels)
        if missing or extra:
            where = next(iter(chans.values())).parent
            what = (f"channel file(s) {', '.join(f'{case}_{c:04d}{file_ending}' for c in missing)} missing"
                    if missing else f"channel(s) {extra} beyond the model's {n_channels}")
            raise DatasetError(f"{where}: case {case!r}: {what} (the model takes {n_channels} channel(s))")
        cases[case] = [chans[c] for c in range(n_channels)]
    return cases


class V2Predictor:
    """A v2 model folder's folds in JAX, with v2's inference settings (step 0.5, Gaussian, mirroring over the
    checkpoint's ``inference_allowed_mirroring_axes``)."""

    def __init__(self, model_dir: str | os.PathLike, plans: V2Plans, labels: V2Labels, configuration: str,
                 fold_variables: Sequence[Any], network: Any, mirror_axes: tuple[int, ...] | None, *,
                 fold_names: Sequence[str] = (), step_size: float = 0.5, mirror: bool = True,
                 gaussian: bool = True, accumulate: str = "float16", batch_size: int = 2):
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {tuple(ACCUMULATE)}, got {accumulate!r}")
        if not 0.0 < step_size <= 1.0:
            raise ValueError(f"step_size must be in (0, 1], got {step_size}")
        self.model_dir = Path(model_dir)
        self.plans, self.labels, self.configuration = plans, labels, configuration
        self.cfg = plans.configuration(configuration)
        self.fold_names = tuple(fold_names)
        self.step_size, self.gaussian, self.accumulate = float(step_size), bool(gaussian), accumulate
        self.batch_size = int(batch_size)
        self.mirror_axes = tuple(mirror_axes) if (mirror and mirror_axes) else None
        mesh = None
        if jax.default_backend() != "cpu" and jax.local_device_count() > 1:  # CPU devices share the cores
            mesh = parallel.local_mesh()
            self.batch_size = window_batch(self.batch_size, mesh)
        forward = make_forward(network, mesh)
        if self.mirror_axes:
            forward = mirrored(forward, self.mirror_axes)
        self.forward: Callable = forward
        self.variables = [jax.device_put(v) for v in fold_variables]

    @classmethod
    def from_model_folder(cls, model_dir: str | os.PathLike, folds: Sequence[int | str] | None = None,
                          checkpoint_name: str = "checkpoint_final.pth", *, amp: bool = False,
                          **options: Any) -> V2Predictor:
        """Load ``<Trainer>__<Plans>__<configuration>/`` and the checkpoints of ``folds`` (None: every
        ``fold_*`` holding ``checkpoint_name``, as v2's Python API). ``amp``: bf16 convolutions (GPUs;
        CPUs with AVX512-BF16 run them ~2x faster too), labels then no longer exactly v2's."""
        model_dir = Path(model_dir)
        fold_paths = model_folds(model_dir, folds, checkpoint_name)
        plans = V2Plans.load(model_dir / "plans.json")
        labels = V2Labels.load(model_dir / "dataset.json")
        checkpoints = [read_checkpoint(p) for _, p in fold_paths]
        first = checkpoints[0]
        configuration = first.configuration or parse_model_dir_name(model_dir)[2]
        cfg = plans.configuration(configuration)
        network = network_from_plans(cfg, labels.num_channels, labels.num_heads,
                                     dtype=jnp.bfloat16 if amp else jnp.float32,
                                     source=str(model_dir / "plans.json"))
        variables = [load_weights(network, ck.network_weights, str(ck.path), cfg.ndim) for ck in checkpoints]
        return cls(model_dir, plans, labels, configuration, variables, network, first.mirror_axes,
                   fold_names=[name for name, _ in fold_paths], **options)

    # -- the network part

    def _tiles(self, data: np.ndarray, variables: Any) -> np.ndarray:
        """One fold's sliding-window logits (K, *shape) in the accumulation dtype; 2D runs per a0 slice."""
        run = dict(apply_fn=self.forward, params=variables, roi_size=tuple(self.cfg.patch_size),
                   overlap=1.0 - self.step_size, blend="gaussian" if self.gaussian else "constant",
                   batch_size=self.batch_size, grid="nnunetv2", accumulate=self.accumulate)
        x = np.moveaxis(data, 0, -1)  # channels last
        if self.cfg.ndim == 2:
            out = np.stack([np.asarray(sliding_window_inference(x[z], **run)) for z in range(x.shape[0])])
        else:
            out = np.asarray(sliding_window_inference(x, **run))
        return np.moveaxis(out, -1, 0)

    def predict_logits(self, data: np.ndarray) -> np.ndarray:
        """A preprocessed case (C, *shape) → the fold-averaged logits (K, *shape), fp16 by default: the folds
        are summed in the accumulation dtype and divided by their number, as v2."""
        dtype = np.dtype(ACCUMULATE[self.accumulate])
        total = None
        for v in self.variables:
            logits = self._tiles(data, v)
            total = logits if total is None else (total.astype(np.float32) + logits).astype(dtype)
        if len(self.variables) > 1:
            total = (total.astype(np.float32) / len(self.variables)).astype(dtype)
        if not np.isfinite(total).all():
            raise FloatingPointError("the sliding window produced inf/NaN logits (fp16 overflow: try "
                                     "accumulate='float32')")
        return total

    # -- whole cases

    @property
    def reader(self) -> str:
        return self.labels.overwrite_image_reader_writer or self.plans.image_reader_writer

    def predict_case(self, files: Sequence[str | os.PathLike], save_probabilities: bool = False,
                     case: str | None = None) -> V2Result:
        """A case's channel files → :class:`V2Result` (label map in reader order, as v2 writes it)."""
        img = imageio.read_images(files, self.reader)
        data, props = preprocess_case(img.data, img.spacing, self.plans, self.configuration, img.geometry)
        logits = self.predict_logits(data)
        seg, probs = logits_to_segmentation(logits, props, self.plans, self.configuration, self.labels,
                                            save_probabilities)
        name = case or re.sub(r"_\d{4}" + re.escape(self.labels.file_ending) + r"$", "", Path(files[0]).name)
        return V2Result(name, seg, probs, props, img.geometry)

    def save(self, result: V2Result, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``<case><file_ending>`` (with probabilities also ``<case>.npz`` + ``.pkl``), atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [imageio.write_seg(result.seg, out_dir / f"{result.case}{self.labels.file_ending}",
                                     result.geometry)]
        if result.probabilities is not None:
            with atomic_path(out_dir / f"{result.case}.npz") as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, probabilities=result.probabilities)
            written.append(out_dir / f"{result.case}.npz")
            with atomic_path(out_dir / f"{result.case}.pkl") as tmp, open(tmp, "wb") as f:
                pickle.dump(result.props.to_v2(), f)
            written.append(out_dir / f"{result.case}.pkl")
        return written

    def predict_files(self, data: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                      save_probabilities: bool = False,
                      log: Callable[[str], None] | None = print) -> list[Path]:
        """Every case under ``data`` (folders of ``<case>_<XXXX><ending>`` files, or such files) into
        ``out_dir``, with the model's ``dataset.json`` and ``plans.json`` beside them (as v2 writes them)."""
        cases = find_v2_cases(data, self.labels.file_ending, self.labels.num_channels)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("dataset.json", "plans.json"):
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(self.model_dir / name, tmp)
        written: list[Path] = []
        for i, (case, files) in enumerate(cases.items(), 1):
            t0 = time.perf_counter()
            written += self.save(self.predict_case(files, save_probabilities, case), out_dir)
            if log is not None:
                log(f"[{i}/{len(cases)}] {case}: {time.perf_counter() - t0:.1f} s")
        return written

    def describe(self) -> str:
        """One line on what runs: configuration, folds, mirroring, accumulation."""
        return (f"nnU-Net v2 model {self.model_dir.name} ({self.cfg.architecture.class_name}, "
                f"{self.configuration}, patch {tuple(self.cfg.patch_size)}), folds {list(self.fold_names)}, "
                f"mirroring {list(self.mirror_axes) if self.mirror_axes else 'off'}, step {self.step_size}, "
                f"{self.accumulate} accumulation")


"""``train_and_evaluate(config, workdir)``: the whole training run, or ``exec_mode=evaluate`` validation only.

Read top to bottom (big_vision style): checks before any compute → mesh → data → model and optimizer →
validation → state (fresh or restored) → epochs of jitted steps → validation / early stopping / logs /
checkpoints. :class:`_Run` holds what one training run shares between its epochs.

Resume is exact: the device state (weights, optimizer, RNG, loss scale) and the host's bookkeeping (epoch,
loader position, early-stopping and plateau counters, see ``state.py``) are saved together, and the batch
stream is a pure function of (seed, epoch, step), so a run killed anywhere and resumed with
``resume_training`` reaches the same state as one that never stopped. ``logs.json`` lines past the restored
epoch are dropped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from nnunet_jax import checkpoints as ckpt_lib
from nnunet_jax import parallel
from nnunet_jax.atomic import write_json
from nnunet_jax.checkpoints import CONFIG_FILE
from nnunet_jax.inference.forward import make_forward
from nnunet_jax.labels import BRATS_N_CLASS, LabelSpec, use_brats
from nnunet_jax.locks import FolderBusyError, folder_lock
from nnunet_jax.models.build import build_model, uses_fp16
from nnunet_jax.plan import PLAN_FILE, Plan, folder_name
from nnunet_jax.training import optim
from nnunet_jax.training import step as step_lib
from nnunet_jax.training.state import Progress, TrainState
from nnunet_jax.training.validation import Validator

__all__ = ["EVAL_FILE", "NonFiniteLossError", "TrainingError", "train_and_evaluate"]

log = logging.getLogger(__name__)
EVAL_FILE = "evaluation.json"
# Identity fields added after checkpoints were first written: an older checkpoint's missing field means this.
IDENTITY_DEFAULTS = {"brats": False, "regions": None, "preset": "nnunet"}
FP16_NONFINITE_TOLERANCE = 20  # fp16: consecutive skipped (overflowing) steps before we call it divergence


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """The train loss became NaN/inf; the last good checkpoint is kept."""


class DataSource(Protocol):
    """What the loop needs from the data side (the real one is built by :func:`open_data`)."""

    plan: Plan
    train_cases: list[str]
    val_cases: list[str]
    steps_per_epoch: int
    global_batch: int

    def train_batches(self, epoch: int, start_step: int) -> Iterator[dict[str, jax.Array]]:
        """Batches ``start_step..steps_per_epoch-1`` of ``epoch`` as global arrays split on ``data``:
        ``{"image": (N, *patch, C) float32, "label": (N, *patch[, 1]) int}``, a pure function of the
        seed, epoch and step."""
        ...

    def load_case(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One validation volume: image ``(*spatial, C)`` float32, label ``(*spatial)`` int."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Checks before any compute


DEFAULT_TASK = "01"  # the seed's --task: what an empty task (train.py without --task) means for --data /data


def normalize_task(task: Any) -> str:
    t = str(task).strip()
    return f"{int(t):02d}" if t.isdigit() else t


def task_matches(given: Any, plan: Plan) -> bool:
    """Whether ``--task`` names the plan's task: its number (``50`` for ``Task50_Sphere``, ``001`` for nnU-Net
    v2's ``Dataset001_Name``), folder name, or dataset.json name; an empty ``given`` (no --task) lets the plan
    decide."""
    given = normalize_task(given) if str(given).strip() else ""
    if not given or not plan.task:
        return True
    names = {normalize_task(plan.task), plan.task_name}
    number = re.match(r"(?:Task|Dataset)0*(\d+)_", plan.task)
    if number:
        names.add(normalize_task(number.group(1)))
    return given in names


def find_data_dir(config: Any) -> Path:
    """``--data`` is the preprocessed folder itself or its parent holding ``<task>_<dim>d`` (seed layout)."""
    data = Path(config.data).expanduser().absolute()
    task = normalize_task(config.task) if str(config.task).strip() else DEFAULT_TASK
    candidates = [data, data / folder_name(task, int(config.dim))]
    if task.isdigit():  # nnU-Net v2 datasets are preprocessed into DatasetXXX_Name_<dim>d
        candidates += sorted(data.glob(folder_name(f"Dataset{int(task):03d}_*", int(config.dim))))
    for c in candidates:
        if (c / PLAN_FILE).is_file():
            return c
    raise TrainingError(f"no preprocessed dataset at {data} (looked for {PLAN_FILE} in "
                        f"{', '.join(str(c) for c in candidates)}); run `python -m preprocess --task "
                        f"{task} --dim {config.dim} ...` first or point --data at its output")


def check_plan(config: Any, plan: Plan, where: Path | str) -> None:
    """The plan (written by preprocessing) must describe the run the flags ask for."""
    problems = []
    if plan.dim != int(config.dim):
        problems.append(f"plan dim {plan.dim} but --dim {config.dim}")
    if not task_matches(config.task, plan):
        problems.append(f"plan task {plan.task} but --task {config.task} (leave --task out to take the "
                        "plan's)")
    if plan.topology is None:
        problems.append("plan has no topology")
    elif config.filters and len(config.filters) != plan.topology.depth:
        topo = plan.topology
        problems.append(f"--filters {','.join(str(f) for f in config.filters)} gives {len(config.filters)} "
                        f"widths, but the plan's U-Net has {topo.depth} levels (default filters "
                        f"{','.join(str(f) for f in topo.filters)}); give {topo.depth} values or leave "
                        "--filters out")
    if use_brats(config) and plan.n_class not in BRATS_N_CLASS:
        problems.append(f"--brats needs BraTS labels (0-3, or 0, 1, 2, 4), but the plan has n_class "
                        f"{plan.n_class}")
    if plan.regions and not use_brats(config) and plan.regions_class_order is None:
        problems.append(f"the plan's regions {list(plan.regions)} have no regions_class_order (the label "
                        "each region predicts; preprocess the nnU-Net v2 dataset again)")
    if problems:
        raise TrainingError(f"{where}: the preprocessed plan does not match the flags: {'; '.join(problems)}")


def run_identity(config: Any, plan: Plan, filters: tuple[int, ...]) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed/evaluated by this run."""
    topo = plan.topology
    return {"task": normalize_task(plan.task or config.task), "dim": int(config.dim),
            "n_class": plan.n_class, "in_channels": plan.in_channels,
            "kernels": [list(k) for k in topo.kernels] if topo else [],
            "strides": [list(s) for s in topo.strides] if topo else [], "filters": list(filters),
            "fold": int(config.fold), "norm": str(config.norm), "residual": bool(config.residual),
            "attention": bool(config.attention), "deep_supervision": bool(config.deep_supervision),
            "brats": use_brats(config), "preset": str(config.get("preset", "nnunet")),
            "regions": None if use_brats(config) or not plan.regions else list(plan.regions)}


def identity_diff(theirs: dict[str, Any], ours: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Identity fields on which a checkpoint (``theirs``) and this run differ."""
    return sorted(k for k in ours if k not in ignore and theirs.get(k, IDENTITY_DEFAULTS.get(k)) != ours[k])


def check_results_dir(workdir: Path, identity: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Refuse a results dir holding another run's checkpoint; return the checkpoint meta if there is one."""
    meta = ckpt_lib.read_meta(workdir, "last") or ckpt_lib.read_meta(workdir, "best")
    if meta is None:
        return None
    theirs = meta.get("identity", {})
    if theirs.get("task") != identity["task"] or theirs.get("dim") != identity["dim"]:
        raise TrainingError(f"{workdir} already holds a checkpoint of task {theirs.get('task')} "
                            f"({theirs.get('dim')}D), not task {identity['task']} ({identity['dim']}D); "
                            "use another --results directory")
    diff = identity_diff(theirs, identity)
    if diff:
        theirs_diff = {k: theirs.get(k) for k in diff}
        ours_diff = {k: identity[k] for k in diff}
        raise TrainingError(f"{workdir} holds a checkpoint of a different model/fold ({', '.join(diff)} "
                            f"differ: {theirs_diff} vs {ours_diff}); use another --results directory")
    if not resume:
        raise TrainingError(f"{workdir} already holds a checkpoint of this run (epoch {meta.get('epoch')}); "
                            "pass --resume_training to continue it, or use another --results directory")
    return meta


def check_checkpoint_model(path: str | Path, identity: dict[str, Any]) -> None:
    """``exec_mode evaluate``: the checkpoint must be this task and model (any fold); checked before the
    restore, whose shape-mismatch error would not say which flag is wrong."""
    theirs = (ckpt_lib.read_meta_path(path) or {}).get("identity", {})
    if theirs.get("task") not in (None, identity["task"]):
        raise TrainingError(f"{path} is a checkpoint of task {theirs['task']}, not {identity['task']}")
    diff = identity_diff(theirs, identity, ignore=("fold",)) if theirs else []
    if diff:
        raise TrainingError(f"{path} holds a different model ({', '.join(diff)} differ: "
                            f"{ {k: theirs.get(k, IDENTITY_DEFAULTS.get(k)) for k in diff} } vs "
                            f"{ {k: identity[k] for k in diff} }); pass the flags it was trained with")


# ---------------------------------------------------------------------------------------------------------
# The real data side


@dataclass
class _Data:
    """The preprocessed dataset of ``config.data`` through the DALI loader (nnunet_jax.data.loader)."""

    dataset: Any
    config: Any
    mesh: Any
    train_cases: list[str]
    val_cases: list[str]
    steps_per_epoch: int
    global_batch: int
    plan: Plan

    def train_batches(self, epoch: int, start_step: int) -> Iterator[dict[str, jax.Array]]:
        from nnunet_jax.data import loader
        from nnunet_jax.data.pipelines import AugmentConfig

        c = self.config
        return loader.make_train_iterator(
            self.dataset, self.train_cases, self.mesh, batch_size=self.global_batch, seed=int(c.seed),
            epoch=epoch, start_step=start_step, aug=AugmentConfig(oversampling=float(c.oversampling)),
            nvol=int(c.nvol), num_threads=max(1, int(c.num_workers)), ignore_label=self.plan.ignore_label)

    def load_case(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        from nnunet_jax.data.layout import to_channels_last

        image = np.load(self.dataset.image_path(name))
        label = np.load(self.dataset.label_path(name))
        return to_channels_last(image, 3).astype(np.float32), label[0].astype(np.int32)


def open_data(config: Any, mesh: Any) -> _Data:
    """Open ``config.data`` (clear errors for a missing/incomplete dataset) and split ``config.fold``."""
    from nnunet_jax.data import loader
    from nnunet_jax.data.dataset import DatasetError, PreprocessedDataset
    from nnunet_jax.planning.presets import preset_dataset

    root = find_data_dir(config)
    try:
        ds = PreprocessedDataset.open(root)
        ds = preset_dataset(config, ds)  # --preset: its patch, topology and batch (planning/presets.py)
        train, val = ds.fold(int(config.fold), int(config.nfolds))
    except DatasetError as e:
        raise TrainingError(str(e)) from e
    if config.val_cases:
        val = val[: int(config.val_cases)]
    global_batch = int(config.batch_size) * mesh.devices.size
    if ds.dim == 2 and (int(config.nvol) < 1 or global_batch % int(config.nvol)):
        raise TrainingError(f"2D: the global batch of {global_batch} slices ({config.batch_size} per device "
                            f"× {mesh.devices.size} devices) is not a multiple of nvol {config.nvol} (the "
                            "volumes each step draws its slice blocks from)")
    steps = loader.steps_per_epoch(len(train), ds.dim, global_batch, int(config.nvol))
    if config.train_batches:
        steps = min(steps, int(config.train_batches))
    return _Data(ds, config, mesh, train, val, steps, global_batch, ds.plan)


# ---------------------------------------------------------------------------------------------------------
# Files


def _plot_curves(logs: Path, workdir: Path, plan: Plan) -> None:
    """``curves.png`` beside ``logs.json``; a picture that cannot be drawn never fails a finished run."""
    try:
        from nnunet_jax.plots import plot_training_curves

        plot_training_curves(logs, workdir / "curves.png", dict(plan.labels))
    except Exception as e:  # noqa: BLE001 - matplotlib missing, no epoch logged yet, ...
        log.warning("training curves not drawn: %s", e)


def _truncate_logs(path: Path, epochs_done: int) -> None:
    """Keep the log lines of the epochs the restored state has completed (drop those of a killed run, or of
    an epoch whose save failed). The lines are in epoch order, so this cuts the file in place: it needs no
    free space (the disk may be full)."""
    if not path.exists():
        return
    size = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip() and (not line.endswith(b"\n") or json.loads(line).get("epoch", 0) > epochs_done):
                break
            size += len(line)
    os.truncate(path, size)


def _append_log(path: Path, record: dict[str, Any]) -> None:
    try:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # ENOSPC from write() names no file
        raise OSError(e.errno, e.strerror, str(path)) from e


@contextmanager
def _own_results(workdir: Path) -> Iterator[None]:
    """Hold ``workdir``'s lock for the run (another live run there fails at once, naming its PID) and
    remove the temp files killed runs left; a folder this run created and never used is removed again."""
    try:
        with folder_lock(workdir, "train.py"):
            yield
    except FolderBusyError as e:
        raise TrainingError(str(e)) from None


def state_bytes(target: Any) -> int:
    """Bytes of one checkpoint's arrays (the train state's leaves, uncompressed)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(target))


def check_free_space(workdir: Path, target: Any) -> None:
    """Refuse to start when the results folder's disk cannot hold one checkpoint (a run would train its
    first epoch and lose it); warn when it cannot hold the four a save of ``last`` and ``best`` may need."""
    need, free = state_bytes(target), shutil.disk_usage(workdir).free
    mib = 2**20
    if free < need:
        raise TrainingError(f"{workdir}: {free / mib:.1f} MiB free, but one checkpoint of this model takes "
                            f"about {need / mib:.1f} MiB; free space or use another --results directory")
    if free < 4 * need:
        print(f"warning: {workdir}: {free / mib:.1f} MiB free; saving checkpoints/last and best may need up "
              f"to {4 * need / mib:.1f} MiB (4 x {need / mib:.1f} MiB)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# The run


def _training_mesh(config: Any) -> Any:
    if config.gpus and jax.process_count() == 1:
        devices = jax.devices()
        if config.gpus > len(devices):
            raise TrainingError(f"--gpus {config.gpus} but only {len(devices)} devices are visible")
        return parallel.make_mesh(devices[: int(config.gpus)])
    return parallel.make_mesh()


def train_and_evaluate(config: Any, workdir: str | Path | None = None, *, data: DataSource | None = None,
                       ) -> dict[str, Any]:
    """Train (or, with ``exec_mode="evaluate"``, validate a checkpoint); returns a summary dict.

    ``data`` replaces the preprocessed dataset (tests); by default it comes from ``config.data``.
    """
    # -- checks before any compute
    if config.exec_mode not in ("train", "evaluate"):
        raise TrainingError(f"exec_mode {config.exec_mode!r} is not handled here (train | evaluate)")
    evaluating = config.exec_mode == "evaluate"
    workdir = Path(workdir or config.results).expanduser().absolute()
    parallel.initialize_distributed(config.coordinator_address, int(config.num_processes),
                                    int(config.process_id))
    if evaluating or jax.process_index() != 0:  # only process 0 writes the results folder
        return _train_and_evaluate(config, workdir, data, evaluating)
    with _own_results(workdir):
        return _train_and_evaluate(config, workdir, data, evaluating)


def _train_and_evaluate(config: Any, workdir: Path, data: DataSource | None, evaluating: bool,
                        ) -> dict[str, Any]:
    from nnunet_jax.losses import make_loss

    # -- mesh and data
    mesh = _training_mesh(config)
    data = data or open_data(config, mesh)
    where = data.dataset.root if hasattr(data, "dataset") else "plan"
    plan = Plan.coerce(data.plan, where)
    check_plan(config, plan, where)

    # -- model and optimizer
    model = build_model(config, plan)
    identity = run_identity(config, plan, model.widths)
    meta = None if evaluating else check_results_dir(workdir, identity, bool(config.resume_training))
    if meta is None and not evaluating and config.resume_training and jax.process_index() == 0:
        print(f"note: --resume_training: {workdir} holds no checkpoint yet; training starts from scratch",
              file=sys.stderr)
    workdir.mkdir(parents=True, exist_ok=True)
    fp16 = uses_fp16(config)
    tx = optim.make_optimizer(config, data.steps_per_epoch)
    target = step_lib.abstract_state(model, tx, plan.input_shape, mesh, fp16)
    if not evaluating and jax.process_index() == 0:
        check_free_space(workdir, target)

    # -- validation: the predictor's windowed forward on this process's devices
    labels = LabelSpec.of(plan, use_brats(config))
    val_mesh = parallel.local_mesh(int(config.gpus) if jax.process_count() == 1 else 0)
    validator = Validator(
        make_forward(model, val_mesh), labels, plan.patch_size,
        make_loss(focal=bool(config.focal), labels=labels), val_mesh, overlap=float(config.overlap),
        blend=str(config.blend), batch_size=int(config.val_batch_size),
        tta=bool(config.tta) and evaluating)

    def validate(state: TrainState) -> dict[str, Any]:
        return validator(step_lib.eval_variables(state), data.val_cases, data.load_case)

    # -- evaluate a checkpoint
    if evaluating:
        path = config.ckpt_path or str(workdir)
        try:
            check_checkpoint_model(path, identity)
            state, cmeta = ckpt_lib.restore_path(path, target)
        except FileNotFoundError as e:
            raise TrainingError(f"exec_mode evaluate: {e}") from e
        result = validate(state)
        result.update(epoch=cmeta.get("epoch"), checkpoint=str(path))
        if jax.process_index() == 0:
            write_json(result, workdir / EVAL_FILE, indent=1)
            print(json.dumps(result))
        return result

    # -- train
    loss_fn = make_loss(focal=bool(config.focal), deep_supervision=bool(config.deep_supervision),
                        labels=labels)
    run = _Run(config, workdir, data, plan, identity, ckpt_lib.Checkpoints(workdir, state_bytes(target)),
               step_lib.make_train_step(model, loss_fn, tx, mesh, fp16), validate, fp16)
    try:
        try:
            if meta is not None:
                state, progress = run.resume(target)
            else:
                state = step_lib.init_state(model, tx, plan.input_shape, int(config.seed), mesh, fp16)
                progress = Progress()
                if run.main and run.logs.exists():
                    run.logs.unlink()  # a previous run here reached no checkpoint: its lines mean nothing
            return run.train(state, progress)
        finally:
            run.ckpts.close()  # may be where a failed save is first reported
    except ckpt_lib.SaveError as e:
        if run.main:  # no logged epoch without a checkpoint behind it
            _truncate_logs(run.logs, (ckpt_lib.read_meta(workdir, "last") or {}).get("epoch", 0))
        raise TrainingError(str(e)) from None


@dataclass
class _Run:
    """What the epochs of one training run share."""

    config: Any
    workdir: Path
    data: DataSource
    plan: Plan
    identity: dict[str, Any]
    ckpts: ckpt_lib.Checkpoints
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    validate: Callable[[TrainState], dict[str, Any]]
    fp16: bool
    compiled: set[str] = field(default_factory=set)  # what has been compiled (and said so) in this process

    def once(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()``; the first time for ``what``, say that it compiles and how long it took (a tiny run's
        first step is otherwise 40 s of silence)."""
        if what in self.compiled:
            return call()
        self.compiled.add(what)
        self.note(f"compiling the {what}…")
        t0 = time.perf_counter()
        out = jax.block_until_ready(call())
        self.note(f"compiling the {what}: done in {time.perf_counter() - t0:.1f} s (with its first run)")
        return out

    def note(self, text: str) -> None:
        """A line for the user on process 0, above the progress bar when there is one."""
        if self.main:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)

    @property
    def main(self) -> bool:
        return jax.process_index() == 0

    @property
    def logs(self) -> Path:
        return self.workdir / str(self.config.logname)

    def resume(self, target: Any) -> tuple[TrainState, Progress]:
        state, meta = self.ckpts.restore("last", target)
        if "progress" not in meta:
            raise TrainingError(f"{self.ckpts.root / 'last'} was written by an older version of nnunet-jax "
                                "and cannot be resumed; use another --results directory")
        log.info("resumed from %s at step %d", self.ckpts.root / "last", int(state.step))
        return state, Progress.from_meta(meta["progress"])

    def save(self, kind: str, state: TrainState, progress: Progress) -> None:
        step = int(jax.device_get(state.step))
        self.ckpts.save(kind, step, state, {"identity": self.identity, "epoch": progress.epoch, "step": step,
                                            "progress": progress.to_meta()})

    def write_settings(self) -> None:
        settings = {"config": json.loads(self.config.to_json()), "identity": self.identity,
                    "plan": self.plan.to_dict(), "devices": jax.device_count(),
                    "processes": jax.process_count(), "global_batch": self.data.global_batch,
                    "steps_per_epoch": self.data.steps_per_epoch}
        write_json(settings, self.workdir / CONFIG_FILE, indent=1, default=str)

    def train(self, state: TrainState, p: Progress) -> dict[str, Any]:
        """Epochs from ``p.epoch`` until ``max_epochs`` or early stopping; returns the last epoch's record."""
        config, steps = self.config, self.data.steps_per_epoch
        if self.main:
            _truncate_logs(self.logs, p.epoch)
            self.write_settings()
        summary: dict[str, Any] = {"stopped": "max_epochs"}
        while p.epoch < int(config.max_epochs):
            epoch = p.epoch
            if config.scheduler != "plateau":  # stateless schedules: the epoch decides (idempotent on resume)
                state = state.replace(opt_state=optim.set_learning_rate(
                    state.opt_state, optim.epoch_learning_rate(config, epoch)))
            lr = optim.get_learning_rate(state.opt_state)
            start = p.loader_step
            state, seconds = self.run_epoch(state, p)
            record: dict[str, Any] = {"epoch": epoch + 1, "step": int(jax.device_get(state.step)),
                                      "train_loss": p.loss_sum / steps, "lr": lr}
            improved, next_lr = False, lr
            if epoch >= int(config.skip_first_n_eval):
                v = self.once("sliding window (validation)", partial(self.validate, state))
                improved = v["mean_dice"] > p.best_score
                if improved:
                    p.best_score, p.best_epoch, p.patience = v["mean_dice"], epoch + 1, 0
                else:
                    p.patience += 1
                if config.scheduler == "plateau":
                    next_lr, p.plateau_best, p.plateau_bad = optim.plateau_step(
                        lr, p.plateau_best, p.plateau_bad, v["val_loss"], float(config.factor),
                        int(config.lr_patience))
                record.update(val_loss=v["val_loss"], dice=v["dice"], mean_dice=v["mean_dice"],
                              **{k: x for k, x in v.items() if k.startswith("dice_")})
            record.update(TOP_mean=p.best_score if p.best_score >= 0 else None,
                          best_epoch=p.best_epoch if p.best_epoch > 0 else None, seconds=round(seconds, 3),
                          img_per_s=round(self.data.global_batch * (steps - start) / seconds, 3))
            p.end_epoch()
            if next_lr != lr:
                state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, next_lr))
            if self.main:  # logged first: a kill before the save leaves a line that resume drops
                _append_log(self.logs, record)
                if config.progress:
                    from tqdm import tqdm

                    tqdm.write(json.dumps(record))
            if improved:
                self.save("best", state, p)
            self.save("last", state, p)
            self.ckpts.wait()  # a failed save stops the run here (SaveError; its log line is dropped)
            summary = {**record, "stopped": "max_epochs"}
            if p.epoch >= int(config.min_epochs) and p.patience >= int(config.patience):
                summary["stopped"] = "early_stopping"
                break
        self.ckpts.wait()
        if self.main:
            _plot_curves(self.logs, self.workdir, self.plan)
        return summary

    def run_epoch(self, state: TrainState, p: Progress) -> tuple[TrainState, float]:
        """Steps ``p.loader_step..steps-1`` of epoch ``p.epoch``, each loss read one step late (keeps the
        dispatch asynchronous) into ``p``; raises :class:`NonFiniteLossError` on divergence."""
        from tqdm import tqdm

        config, data, epoch, steps = self.config, self.data, p.epoch, self.data.steps_per_epoch
        start = p.loader_step
        bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                   disable=not (config.progress and self.main))
        bad_run = 0
        every = int(config.ckpt_every_steps)
        t0 = time.perf_counter()
        pending: tuple[int, Any, Any] | None = None  # (step index, loss, finite) of the step not read yet

        def settle() -> float:
            """Read the pending step's loss on the host: count it, check it."""
            nonlocal bad_run, pending
            assert pending is not None
            i, loss, finite = pending
            pending = None
            value = float(loss)
            p.add_loss(loss)
            bad_run = 0 if math.isfinite(value) and bool(finite) else bad_run + 1
            if bad_run >= (FP16_NONFINITE_TOLERANCE if self.fp16 else 1):
                raise NonFiniteLossError(
                    f"training stopped: the train loss is {value} (gradients finite: {bool(finite)}) at "
                    f"epoch {epoch + 1}, step {i + 1} of {steps}; the last good checkpoint "
                    "(checkpoints/last) is kept. Lower --learning_rate, set --gradient_clip_val, or disable "
                    "--amp")
            return value

        done = start
        for i, batch in enumerate(data.train_batches(epoch, start), start):
            if i >= steps:
                break
            state, metrics = self.once("train step", partial(self.train_step, state, batch))
            if pending is not None:
                j = pending[0]
                value = settle()
                speed = data.global_batch * (j + 1 - start) / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{speed:.1f}")
            pending = (i, metrics["loss"], metrics["finite"])
            bar.update(1)
            done = i + 1
            if every and done % every == 0 and done < steps:
                settle()
                self.save("last", state, p)
        if pending is not None:
            settle()
        jax.block_until_ready(state.params)
        bar.close()
        if done != steps:
            raise TrainingError(f"the training iterator of epoch {epoch + 1} ended after {done} of {steps} "
                                "steps")
        return state, time.perf_counter() - t0

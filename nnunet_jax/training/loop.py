"""``train_and_evaluate(config, workdir)``: the whole training run, or ``exec_mode=evaluate`` validation only.

Sections in order (big_vision style): checks before any compute → mesh → data → model and optimizer → state
(fresh or restored) → epochs of jitted steps → validation / early stopping / logs / checkpoints.

Resume is exact: the state holds the loader position and every counter (see ``state.py``), the batch stream
is a pure function of (seed, epoch, step), so a run killed anywhere and resumed with ``resume_training``
reaches the same state as one that never stopped. ``logs.json`` lines past the restored epoch are dropped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from nnunet_jax import parallel
from nnunet_jax.atomic import atomic_path
from nnunet_jax.training import checkpoint as ckpt_lib
from nnunet_jax.training import optim, validation
from nnunet_jax.training import state as state_lib
from nnunet_jax.training import step as step_lib

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
EVAL_FILE = "evaluation.json"
REGIONS = ("WT", "TC", "ET")  # BraTS region mode: the model's 3 sigmoid outputs, in this order
# Identity fields added after checkpoints were first written: an older checkpoint's missing field means this.
IDENTITY_DEFAULTS = {"brats": False}
FP16_NONFINITE_TOLERANCE = 20  # fp16: consecutive skipped (overflowing) steps before we call it divergence


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """The train loss became NaN/inf; the last good checkpoint is kept."""


class DataSource(Protocol):
    """What the loop needs from the data side (the real one is built by :func:`open_data`)."""

    plan: dict[str, Any]
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


def normalize_task(task: Any) -> str:
    t = str(task).strip()
    return f"{int(t):02d}" if t.isdigit() else t


def find_data_dir(config: Any) -> Path:
    """``--data`` is the preprocessed folder itself or its parent holding ``<task>_<dim>d`` (seed layout)."""
    data = Path(config.data).expanduser().absolute()
    candidates = [data, data / f"{normalize_task(config.task)}_{int(config.dim)}d"]
    for c in candidates:
        if (c / "plan.json").is_file():
            return c
    raise TrainingError(f"no preprocessed dataset at {data} (looked for plan.json in "
                        f"{', '.join(str(c) for c in candidates)}); run `python -m preprocess --task "
                        f"{config.task} --dim {config.dim} ...` first or point --data at its output")


def check_plan(config: Any, plan: dict[str, Any], where: Path | str) -> None:
    """The plan (written by preprocessing) must describe the run the flags ask for."""
    problems = []
    if int(plan.get("dim", config.dim)) != int(config.dim):
        problems.append(f"plan dim {plan.get('dim')} but --dim {config.dim}")
    if "task" in plan and normalize_task(plan["task"]) != normalize_task(config.task):
        problems.append(f"plan task {plan['task']} but --task {config.task}")
    if "topology" not in plan:
        problems.append("plan has no topology")
    if config.filters and "topology" in plan and len(config.filters) != len(plan["topology"]["strides"]):
        problems.append(f"{len(config.filters)} filters given for a {len(plan['topology']['strides'])}-level "
                        "topology")
    if use_brats(config) and int(plan.get("n_class", 0)) not in (4, 5):
        problems.append(f"--brats needs BraTS labels (0-3, or 0, 1, 2, 4), but the plan has n_class "
                        f"{plan.get('n_class')}")
    if problems:
        raise TrainingError(f"{where}: the preprocessed plan does not match the flags: {'; '.join(problems)}")


def use_brats(config: Any) -> bool:
    """BraTS region mode (``--brats``); configs saved before the flag existed lack it."""
    return bool(config.get("brats", False))


def n_outputs(config: Any, plan: dict[str, Any]) -> int:
    """Model output channels: 3 sigmoid regions (WT, TC, ET) in BraTS mode, else one logit per class."""
    return len(REGIONS) if use_brats(config) else int(plan["n_class"])


def score_names(config: Any, plan: dict[str, Any]) -> list[str]:
    """What the validation Dice values are, in order: the regions, or the foreground class numbers."""
    return list(REGIONS) if use_brats(config) else [str(c) for c in range(1, int(plan["n_class"]))]


def run_identity(config: Any, plan: dict[str, Any], filters: tuple[int, ...]) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed/evaluated by this run."""
    topo = plan.get("topology", {})
    return {"task": normalize_task(plan.get("task", config.task)), "dim": int(config.dim),
            "n_class": int(plan["n_class"]), "in_channels": int(plan["in_channels"]),
            "kernels": [list(map(int, k)) for k in topo.get("kernels", [])],
            "strides": [list(map(int, s)) for s in topo.get("strides", [])], "filters": list(filters),
            "fold": int(config.fold), "norm": str(config.norm), "residual": bool(config.residual),
            "attention": bool(config.attention), "deep_supervision": bool(config.deep_supervision),
            "brats": use_brats(config)}


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
    plan: dict[str, Any] = field(default_factory=dict)

    def train_batches(self, epoch: int, start_step: int) -> Iterator[dict[str, jax.Array]]:
        from nnunet_jax.data import loader
        from nnunet_jax.data.pipelines import AugmentConfig

        c = self.config
        return loader.make_train_iterator(
            self.dataset, self.train_cases, self.mesh, batch_size=self.global_batch, seed=int(c.seed),
            epoch=epoch, start_step=start_step, aug=AugmentConfig(oversampling=float(c.oversampling)),
            nvol=int(c.nvol), num_threads=max(1, int(c.num_workers)))

    def load_case(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        from nnunet_jax.data.layout import to_channels_last

        image = np.load(self.dataset.image_path(name))
        label = np.load(self.dataset.label_path(name))
        return to_channels_last(image, 3).astype(np.float32), label[0].astype(np.int32)


def open_data(config: Any, mesh: Any) -> _Data:
    """Open ``config.data`` (clear errors for a missing/incomplete dataset) and split ``config.fold``."""
    from nnunet_jax.data import loader
    from nnunet_jax.data.dataset import DatasetError, PreprocessedDataset

    root = find_data_dir(config)
    try:
        ds = PreprocessedDataset.open(root)
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
    return _Data(ds, config, mesh, train, val, steps, global_batch, dict(ds.plan))


# ---------------------------------------------------------------------------------------------------------
# Files


def _write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _plot_curves(logs: Path, workdir: Path, plan: dict[str, Any]) -> None:
    """``curves.png`` beside ``logs.json``; a picture that cannot be drawn never fails a finished run."""
    try:
        from nnunet_jax.plots import plot_training_curves

        names = {str(k): str(v) for k, v in (plan.get("labels") or {}).items()}
        plot_training_curves(logs, workdir / "curves.png", names)
    except Exception as e:  # noqa: BLE001 - matplotlib missing, no epoch logged yet, ...
        log.warning("training curves not drawn: %s", e)


def _truncate_logs(path: Path, epochs_done: int) -> None:
    """Keep the log lines of the epochs the restored state has completed (drop those of a killed run)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("epoch", 0)
            <= epochs_done]
    _write_atomic(path, "".join(ln + "\n" for ln in kept))


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------
# The run


def build_model(config: Any, plan: dict[str, Any]) -> Any:
    from nnunet_jax.models.unet import UNet

    dtype = jnp.float32
    if config.amp:
        dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16}[str(config.amp_dtype)]
    return UNet.from_topology(
        plan["topology"], n_outputs(config, plan), filters=tuple(config.filters) or None,
        norm=str(config.norm), negative_slope=float(config.negative_slope), residual=bool(config.residual),
        deep_supervision=bool(config.deep_supervision), deep_supr_num=int(config.deep_supr_num),
        attention=bool(config.attention), drop_block=bool(config.drop_block), dtype=dtype)


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
    from nnunet_jax.losses import make_loss

    if config.exec_mode not in ("train", "evaluate"):
        raise TrainingError(f"exec_mode {config.exec_mode!r} is not handled here (train | evaluate)")
    workdir = Path(workdir or config.results).expanduser().absolute()
    parallel.initialize_distributed(config.coordinator_address, int(config.num_processes),
                                    int(config.process_id))
    mesh = _training_mesh(config)
    data = data or open_data(config, mesh)
    plan = data.plan
    check_plan(config, plan, data.dataset.root if hasattr(data, "dataset") else "plan")
    model = build_model(config, plan)
    identity = run_identity(config, plan, model.widths)
    evaluating = config.exec_mode == "evaluate"
    meta = None if evaluating else check_results_dir(workdir, identity, bool(config.resume_training))
    workdir.mkdir(parents=True, exist_ok=True)

    fp16 = bool(config.amp) and config.amp_dtype == "fp16"
    input_shape = (*map(int, plan["patch_size"]), int(plan["in_channels"]))
    tx = optim.make_optimizer(config, data.steps_per_epoch)
    target = step_lib.abstract_state(model, tx, input_shape, mesh, fp16)
    val_mesh = parallel.local_mesh(int(config.gpus) if jax.process_count() == 1 else 0)
    apply_fn = validation.make_apply_fn(model, val_mesh)  # one object per run: one sliding-window compile
    brats = use_brats(config)
    val_loss_fn = make_loss(focal=bool(config.focal), brats=brats)
    names = score_names(config, plan)

    def run_validation(state: state_lib.TrainState) -> dict[str, Any]:
        result = validation.validate(
            step_lib.eval_variables(state), apply_fn, data.val_cases, data.load_case, int(plan["n_class"]),
            plan["patch_size"], loss_fn=val_loss_fn, mesh=val_mesh, overlap=float(config.overlap),
            blend=str(config.blend), batch_size=int(config.val_batch_size),
            tta=bool(config.tta) and evaluating, brats=brats)
        if brats:  # name the regions in the logs: dice_WT, dice_TC, dice_ET
            result.update({f"dice_{n}": d for n, d in zip(names, result["dice"], strict=True)})
        return result

    if evaluating:
        path = config.ckpt_path or str(workdir)
        try:
            check_checkpoint_model(path, identity)
            state, cmeta = ckpt_lib.restore_path(path, target)
        except FileNotFoundError as e:
            raise TrainingError(f"exec_mode evaluate: {e}") from e
        result = run_validation(state)
        result.update(epoch=cmeta.get("epoch"), checkpoint=str(path))
        if jax.process_index() == 0:
            _write_atomic(workdir / EVAL_FILE, json.dumps(result, indent=1) + "\n")
            print(json.dumps(result))
        return result

    ckpts = ckpt_lib.Checkpoints(workdir)
    try:
        return _train(config, workdir, data, model, tx, target, fp16, input_shape, identity, meta, ckpts,
                      make_loss(focal=bool(config.focal), brats=brats,
                                deep_supervision=bool(config.deep_supervision)),
                      run_validation, mesh)
    finally:
        ckpts.close()


def _train(config: Any, workdir: Path, data: DataSource, model: Any, tx: Any, target: Any, fp16: bool,
           input_shape: tuple[int, ...], identity: dict[str, Any], meta: dict[str, Any] | None,
           ckpts: ckpt_lib.Checkpoints, loss_fn: Any, run_validation: Any, mesh: Any) -> dict[str, Any]:
    main = jax.process_index() == 0
    repl = parallel.replicated(mesh)
    logs = workdir / str(config.logname)
    if meta is not None:
        state, _ = ckpts.restore("last", target)
        log.info("resumed from %s at step %d", ckpts.root / "last", int(state.step))
    else:
        state = step_lib.init_state(model, tx, input_shape, int(config.seed), mesh, fp16)
        if main and logs.exists():
            logs.unlink()  # a previous run here never reached a checkpoint: its log lines mean nothing
    sc = state_lib.host_scalars(state)
    if main:
        _truncate_logs(logs, sc["epoch"])
        settings = {"config": json.loads(config.to_json()), "identity": identity, "plan": data.plan,
                    "devices": jax.device_count(), "processes": jax.process_count(),
                    "global_batch": data.global_batch, "steps_per_epoch": data.steps_per_epoch}
        _write_atomic(workdir / CONFIG_FILE, json.dumps(settings, indent=1, default=str) + "\n")
    train_step = step_lib.make_train_step(model, loss_fn, tx, mesh, fp16)
    steps = data.steps_per_epoch

    def save(kind: str, st: state_lib.TrainState, epoch: int) -> None:
        ckpts.save(kind, int(jax.device_get(st.step)), st,
                   {"identity": identity, "epoch": epoch, "step": int(jax.device_get(st.step))})

    summary: dict[str, Any] = {"stopped": "max_epochs"}
    epoch = sc["epoch"]
    while epoch < int(config.max_epochs):
        if config.scheduler != "plateau":  # stateless schedules: the epoch decides (idempotent on resume)
            state = state.replace(opt_state=optim.set_learning_rate(state.opt_state,
                                                                    optim.epoch_learning_rate(config, epoch)))
        lr = optim.get_learning_rate(state.opt_state)
        start = state_lib.host_scalars(state)["loader_step"]
        state, seconds = _run_epoch(config, state, train_step, data, epoch, start, steps, save, fp16)
        sc = state_lib.host_scalars(state)
        record: dict[str, Any] = {"epoch": epoch + 1, "step": sc["step"],
                                  "train_loss": sc["loss_sum"] / steps, "lr": lr}
        improved = False
        best, best_epoch, patience = sc["best_score"], sc["best_epoch"], sc["patience"]
        pbest, pbad, next_lr = sc["plateau_best"], sc["plateau_bad"], lr
        if epoch >= int(config.skip_first_n_eval):
            v = run_validation(state)
            improved = v["mean_dice"] > best
            best, best_epoch, patience = ((v["mean_dice"], epoch + 1, 0) if improved
                                          else (best, best_epoch, patience + 1))
            if config.scheduler == "plateau":
                next_lr, pbest, pbad = optim.plateau_step(lr, pbest, pbad, v["val_loss"],
                                                          float(config.factor), int(config.lr_patience))
            record.update(val_loss=v["val_loss"], dice=v["dice"], mean_dice=v["mean_dice"],
                          **{k: x for k, x in v.items() if k.startswith("dice_")})
        record.update(TOP_mean=best if best >= 0 else None, best_epoch=best_epoch if best_epoch > 0 else None,
                      seconds=round(seconds, 3),
                      img_per_s=round(data.global_batch * (steps - start) / seconds, 3))
        state = state_lib.replace_scalars(state, repl, epoch=epoch + 1, loader_step=0, loss_sum=0.0,
                                          best_score=best, best_epoch=best_epoch, patience=patience,
                                          plateau_best=pbest, plateau_bad=pbad)
        if next_lr != lr:
            state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, next_lr))
        if main:
            _append_log(logs, record)
            if config.progress:
                from tqdm import tqdm

                tqdm.write(json.dumps(record))
        if improved:
            save("best", state, epoch + 1)
        save("last", state, epoch + 1)
        epoch += 1
        summary = {**record, "stopped": "max_epochs"}
        if epoch >= int(config.min_epochs) and patience >= int(config.patience):
            summary["stopped"] = "early_stopping"
            break
    ckpts.wait()
    if main:
        _plot_curves(logs, workdir, data.plan)
    return summary


def _run_epoch(config: Any, state: state_lib.TrainState, train_step: Any, data: DataSource, epoch: int,
               start: int, steps: int, save: Any, fp16: bool) -> tuple[state_lib.TrainState, float]:
    """Steps ``start..steps-1`` of one epoch; raises :class:`NonFiniteLossError` on divergence."""
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
               disable=not (config.progress and jax.process_index() == 0))
    bad_run = 0
    every = int(config.ckpt_every_steps)
    t0 = time.perf_counter()
    done = start
    pending: tuple[int, Any, Any] | None = None  # (step index, loss) read one step late: keeps dispatch async

    def check(i: int, loss: Any, finite: Any) -> float:
        nonlocal bad_run
        value = float(loss)
        bad_run = 0 if math.isfinite(value) and bool(finite) else bad_run + 1
        if bad_run >= (FP16_NONFINITE_TOLERANCE if fp16 else 1):
            raise NonFiniteLossError(
                f"training stopped: the train loss is {value} (gradients finite: {bool(finite)}) at epoch "
                f"{epoch + 1}, step {i + 1} of {steps}; the last good checkpoint (checkpoints/last) is kept. "
                "Lower --learning_rate, set --gradient_clip_val, or disable --amp")
        return value

    for i, batch in enumerate(data.train_batches(epoch, start), start):
        if i >= steps:
            break
        state, metrics = train_step(state, batch)
        if pending is not None:
            value = check(*pending)
            elapsed = time.perf_counter() - t0
            speed = data.global_batch * (pending[0] + 1 - start) / elapsed
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{speed:.1f}")
        pending = (i, metrics["loss"], metrics["finite"])
        bar.update(1)
        done = i + 1
        if every and done % every == 0 and done < steps:
            check(*pending)
            save("last", state, epoch)
    if pending is not None:
        check(*pending)
    jax.block_until_ready(state.params)
    bar.close()
    if done != steps:
        raise TrainingError(f"the training iterator of epoch {epoch + 1} ended after {done} of {steps} steps")
    return state, time.perf_counter() - t0

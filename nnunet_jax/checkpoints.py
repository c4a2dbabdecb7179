"""A results folder's checkpoints: Orbax ``last`` and ``best`` under ``<results>/checkpoints``, and its
``config.json``.

Training writes and resumes them (:class:`Checkpoints`); prediction only reads the model variables back
(:func:`restore_variables`) and the run's settings (:func:`read_run_settings`), without rebuilding the
optimizer. Each checkpoint is a ``CheckpointManager`` keeping one step: Orbax writes a step into a temporary
directory and renames it when complete, and drops the older step only after that, so a crash while saving
leaves the previous checkpoint usable (tests/test_training_checkpoint.py kills a process mid-save). Every
save stores the device train state (``nnunet_jax.training.state.TrainState``) plus a small JSON ``meta``: the
run's identity (task, dim, fold, topology), its epoch and the host-side bookkeeping (``progress``: early
stopping, plateau scheduler, loader position), so a run can refuse another task's checkpoint and resume
exactly. Training restores pass a target (shapes, dtypes, shardings), so optimizer namedtuples come back as
namedtuples. ``close()`` waits for pending saves: the process never exits mid-write or hangs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

KINDS = ("last", "best")
CONFIG_FILE = "config.json"  # the run's settings (config, identity, plan), beside checkpoints/


def _manager(path: Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    return ocp.CheckpointManager(path.absolute(), options=options, item_names=("state", "meta"))


class Checkpoints:
    """The ``last`` and ``best`` checkpoints of one results directory."""

    def __init__(self, workdir: str | Path):
        self.root = Path(workdir).absolute() / "checkpoints"
        self.managers = {k: _manager(self.root / k) for k in KINDS}

    def save(self, kind: str, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start an (asynchronous) save; a step already present in ``kind`` is left as it is."""
        mngr = self.managers[kind]
        if step in mngr.all_steps():
            return
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(meta)))

    def latest_step(self, kind: str = "last") -> int | None:
        return self.managers[kind].latest_step()

    def restore(self, kind: str, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        return restore_from(self.managers[kind], target, step)

    def wait(self) -> None:
        for m in self.managers.values():
            m.wait_until_finished()

    def close(self) -> None:
        for m in self.managers.values():
            m.wait_until_finished()
            m.close()


def restore_from(mngr: ocp.CheckpointManager, target: Any, step: int | None = None) -> tuple[Any, dict]:
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {mngr.directory}")
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])


def read_meta(workdir: str | Path, kind: str = "last") -> dict[str, Any] | None:
    """The ``meta`` JSON of the newest finished checkpoint, read without JAX (pre-flight checks)."""
    return _meta_in(Path(workdir).absolute() / "checkpoints" / kind)


def _meta_in(manager_dir: Path, step: int | None = None) -> dict[str, Any] | None:
    steps = sorted((int(p.name), p) for p in manager_dir.glob("*") if p.is_dir() and p.name.isdigit())
    if step is not None:
        steps = [s for s in steps if s[0] == step]
    if not steps:
        return None
    meta = steps[-1][1] / "meta" / "metadata"
    if not meta.exists():
        return None
    return json.loads(meta.read_text())


def read_meta_path(path: str | Path) -> dict[str, Any] | None:
    """The ``meta`` JSON of the checkpoint that ``--ckpt_path`` names (see :func:`resolve_ckpt_path`)."""
    return _meta_in(*resolve_ckpt_path(path))


def resolve_ckpt_path(path: str | Path) -> tuple[Path, int | None]:
    """``--ckpt_path`` may name a results dir, its ``checkpoints`` dir, a ``last``/``best`` manager dir or one
    step dir; returns (manager dir, step or None for the latest)."""
    p = Path(path).absolute()
    if not p.exists():
        raise FileNotFoundError(f"--ckpt_path {p} does not exist")
    if re.fullmatch(r"\d+", p.name):
        return p.parent, int(p.name)
    for base in (p / "checkpoints", p):
        for kind in ("best", "last"):
            d = base / kind
            if d.is_dir() and any(c.name.isdigit() for c in d.iterdir()):
                return d, None
    if any(c.name.isdigit() for c in p.iterdir()):
        return p, None
    raise FileNotFoundError(f"--ckpt_path {p} holds no finished checkpoint")


def restore_path(path: str | Path, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restore the state (and meta) from whatever ``--ckpt_path`` names."""
    mdir, step = resolve_ckpt_path(path)
    mngr = ocp.CheckpointManager(mdir, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_names=("state", "meta"))
    try:
        return restore_from(mngr, target, step)
    finally:
        mngr.close()


def workdir_of(manager_dir: Path) -> Path:
    """``<results>/checkpoints/<kind>`` → ``<results>``."""
    return manager_dir.parent.parent if manager_dir.parent.name == "checkpoints" else manager_dir.parent


def read_run_settings(path: str | Path) -> dict[str, Any] | None:
    """``config.json`` of the run that wrote the checkpoint ``path`` names (``{"config", "identity", "plan",
    ...}``), or None when the results folder has none."""
    mdir, _ = resolve_ckpt_path(path)
    settings = workdir_of(mdir) / CONFIG_FILE
    if not settings.is_file():
        return None
    try:
        return json.loads(settings.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{settings} is not valid JSON: {e}") from e


def restore_variables(path: str | Path, template: Any) -> tuple[Any, dict[str, Any]]:
    """Only the model variables (``params``, ``batch_stats``) of the checkpoint ``path`` names, restored into
    ``template`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings, as ``{"params": ..., "batch_stats":
    ...}``); the optimizer state and counters stay on disk. Returns (variables, meta)."""
    mdir, step = resolve_ckpt_path(path)
    mngr = ocp.CheckpointManager(mdir, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_names=("state", "meta"))
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {mdir}")
        restore_args = ocp.checkpoint_utils.construct_restore_args(template)
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(template, restore_args=restore_args, partial_restore=True),
            meta=ocp.args.JsonRestore()))
        return dict(out["state"]), dict(out["meta"])
    finally:
        mngr.close()

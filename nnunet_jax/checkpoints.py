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

A save that fails (a full disk, a folder turned read-only) raises :class:`SaveError` from the call where
Orbax reports it (the next ``save`` or ``wait``), with one message naming the checkpoint, its step, the
reason and the step of the previous checkpoint, which is intact; the failed save's temp folders are removed
so they do not keep the disk full. Orbax's own tracebacks of it stay hidden.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

KINDS = ("last", "best")
CONFIG_FILE = "config.json"  # the run's settings (config, identity, plan), beside checkpoints/
ORBAX_TMP = "*.orbax-checkpoint-tmp*"  # Orbax writes a step here and renames it when complete


class SaveError(RuntimeError):
    """A checkpoint could not be written; the message names it, the reason, and the checkpoint kept."""


def _manager(path: Path) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: the steps a killed run left half-written (the caller holds the folder's lock)
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(path.absolute(), options=options, item_names=("state", "meta"))


class _HideOrbaxErrors(logging.Filter):
    """Drops Orbax's log records: a failed save is reported once, by :class:`SaveError`, not by the ~100
    tracebacks its background threads log (unless asked for: absl verbosity INFO or more)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from absl import logging as absl_logging

        return "orbax" not in record.pathname or absl_logging.get_verbosity() >= absl_logging.INFO


def _hide_orbax_noise() -> None:
    """Once per process, for as long as it runs (Orbax's threads outlive a failed save): the log filter
    above, and an excepthook that drops the ``Event loop is closed`` errors TensorStore's callbacks print
    after a failed asynchronous save (through ``sys.excepthook``)."""
    global _NOISE_HIDDEN
    if _NOISE_HIDDEN:
        return
    _NOISE_HIDDEN = True
    logging.getLogger("absl").addFilter(_HideOrbaxErrors())
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        from absl import logging as absl_logging

        if (kind is RuntimeError and str(value) == "Event loop is closed"
                and absl_logging.get_verbosity() < absl_logging.INFO):
            return
        previous(kind, value, tb)

    sys.excepthook = hook


_NOISE_HIDDEN = False


def finished_steps(manager_dir: Path) -> list[int]:
    """Steps with a complete checkpoint in a ``last``/``best`` folder, read from disk."""
    return sorted(int(p.name) for p in Path(manager_dir).glob("*") if p.is_dir() and p.name.isdigit())


def no_space(error: BaseException) -> bool:
    """Whether ``error`` (an OSError, or Orbax/TensorStore's ValueError wrapping one) means a full disk."""
    text = str(error)
    return (getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in text
            or "os_error_code='28'" in text)


class Checkpoints:
    """The ``last`` and ``best`` checkpoints of one results directory."""

    def __init__(self, workdir: str | Path, need_bytes: int = 0):
        """``need_bytes``: about one checkpoint's size; a save is refused (:class:`SaveError`) before Orbax
        starts when the disk has less free, since a save Orbax cannot finish fails in its threads."""
        self.root = Path(workdir).absolute() / "checkpoints"
        self.need_bytes = need_bytes
        _hide_orbax_noise()
        self.managers = {k: _manager(self.root / k) for k in KINDS}
        self.pending: dict[str, int] = {}  # kind -> step of a save not known to be finished
        self.failed = False  # a SaveError was raised: close() does not raise it again

    def save(self, kind: str, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start an (asynchronous) save; a step already present in ``kind`` is left as it is. Raises
        :class:`SaveError` if the previous save of ``kind`` failed."""
        mngr = self.managers[kind]
        if step in finished_steps(self.root / kind) or self.pending.get(kind) == step:
            return
        free = shutil.disk_usage(self.root).free
        if free < self.need_bytes:
            self.failed = True
            raise SaveError(self._failure(kind, step, OSError(errno.ENOSPC, f"{free / 2**20:.1f} MiB free, "
                                                              f"{self.need_bytes / 2**20:.1f} MiB needed")))
        self._guarded(kind, lambda: mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))), step)
        self.pending[kind] = step

    def latest_step(self, kind: str = "last") -> int | None:
        return self.managers[kind].latest_step()

    def restore(self, kind: str, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        return restore_from(self.managers[kind], target, step)

    def wait(self) -> None:
        """Block until every started save is on disk; raises :class:`SaveError` for one that failed."""
        for kind, m in self.managers.items():
            self._guarded(kind, m.wait_until_finished)
            self.pending.pop(kind, None)

    def close(self) -> None:
        """Wait for pending saves and release the managers; a failure already reported is not raised again."""
        try:
            if not self.failed:
                self.wait()
        finally:
            for m in self.managers.values():
                try:
                    if self.failed:  # let the failed save's threads end before removing what they wrote
                        m.wait_until_finished()
                    m.close()
                except Exception:  # noqa: BLE001 - a manager whose save failed; that error was raised
                    pass
            if self.failed:
                self._remove_temps()

    def _remove_temps(self) -> None:
        for d in self.root.glob(f"*/{ORBAX_TMP}"):
            shutil.rmtree(d, ignore_errors=True)

    def _guarded(self, kind: str, call: Any, step: int | None = None) -> None:
        """Run an Orbax call of ``kind``; a failure (of the pending save of ``kind``, reported late, or else
        of this call's ``step``) becomes :class:`SaveError` with the failed save's temp folders removed."""
        try:
            call()
        except Exception as e:  # noqa: BLE001 - Orbax reports write errors as ValueError/OSError/...
            step = self.pending.pop(kind, step)
            self.failed = True
            self._remove_temps()
            raise SaveError(self._failure(kind, step, e)) from None

    def _failure(self, kind: str, step: int | None, error: BaseException) -> str:
        kept = finished_steps(self.root / "last")  # what --resume_training continues from
        where = f"checkpoints/{kind}" + (f" (step {step})" if step is not None else "")
        previous = (f"the previous checkpoint at step {kept[-1]} (checkpoints/last) is intact" if kept
                    else "no checkpoint was finished before")
        if no_space(error):
            free = shutil.disk_usage(self.root).free / 2**20
            need = f", about {self.need_bytes / 2**20:.1f} MiB needed" if self.need_bytes else ""
            return (f"no space left on {self.root.parent} ({free:.1f} MiB free{need}) while saving {where}; "
                    f"{previous}; free space and run again with --resume_training")
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return (f"could not save {where} in {self.root.parent}: {reason}; {previous}; fix this and run "
                "again with --resume_training")


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
    steps = [s for s in finished_steps(manager_dir) if step is None or s == step]
    if not steps:
        return None
    meta = manager_dir / str(steps[-1]) / "meta" / "metadata"
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

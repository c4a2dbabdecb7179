"""One run per output folder: an exclusive ``fcntl.flock`` held for the whole run.

Two ``train.py`` on one ``--results`` logged every epoch twice and fought over Orbax's step folders; two
``predict.py`` into one folder, or two preprocessings of one ``<task>_<dim>d``, race the same way. Each of
them takes :func:`folder_lock` first. The lock is held by an open file descriptor, so the OS releases it
when the process dies, however it dies: a lock left by a killed run never blocks the next one. The lock
file records the holder's PID and command so the refusal can name them. Holding the lock also makes it safe
to remove the temp files that killed writers left (:func:`nnunet_jax.atomic.remove_stale`), which the
holder does at start. The holder removes the lock file when it is done (a killed one leaves it, harmless).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nnunet_jax.atomic import remove_stale

LOCK_NAME = ".nnunet.lock"


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's lock."""


def lock_file(folder: str | os.PathLike, beside: bool = False) -> Path:
    """The lock of ``folder``: inside it, or (``beside``: for folders replaced as a whole) next to it."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}{LOCK_NAME}" if beside else folder / LOCK_NAME


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    pid, _, what = text.partition(" ")
    return f"PID {pid} ({what})" if pid.isdigit() and what else f"PID {pid}" if pid.isdigit() else "a process"


def _acquire(path: Path, folder: Path) -> int:
    """Open and flock ``path`` without waiting; retried when the file was removed or replaced between our
    open and our flock (its previous holder unlinks it on release), so a lock always guards the live file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderBusyError(f"{folder} is in use by another run ({holder}); wait for it to finish or "
                                  "use another folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str, beside: bool = False) -> Iterator[Path]:
    """Hold ``folder``'s lock for the ``with`` block (creating the folder), or raise :class:`FolderBusyError`
    at once naming the folder and the holder. ``what`` (e.g. ``"train.py"``) is recorded for that message.
    It first removes the temp files that killed writers left in the folder (``beside``: and the folder's
    own temp copies next to it). On release the lock file is removed, and so are the folders this
    call created that stayed empty (a run that failed before writing anything leaves nothing behind)."""
    folder = Path(folder).absolute()
    path = lock_file(folder, beside)
    created = [d for d in (folder, path.parent) if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, folder)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise OSError(e.errno, e.strerror, str(folder)) from e
            # a full disk: the lock holds without its note (a refusal then names no PID); the run's own
            # checks say how much space it needs
        remove_stale(folder)
        if beside:  # the folder is built as a temp beside it, then renamed into place
            remove_stale(folder.parent, folder.name)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiting opener sees the inode change
        os.close(fd)
        for d in created:  # the folder first, then (beside) its parent
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()

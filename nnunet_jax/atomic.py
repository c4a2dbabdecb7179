"""Atomic writes: nothing half-written is ever visible under a final name.

Every file the project writes goes through :func:`atomic_path` (a temp name in the same folder, renamed over
the target only once complete); whole output folders through :func:`replace_dir`. Every temp name has one
recognisable form, ``.<final name>.nnunet-tmp.<random>[suffix]`` (:func:`is_temp`), so a process killed
mid-write leaves nothing a later run cannot recognise: a run that holds its folder's lock removes them
(:func:`remove_stale`) and readers such as ``evaluate.py`` skip them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

TEMP_MARK = ".nnunet-tmp."


def is_temp(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of our temp files or folders (a write that never finished)."""
    name = Path(path).name
    return name.startswith(".") and TEMP_MARK in name


def remove_stale(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temp files and folders left in ``folder`` (not below it) by killed writers (only those of
    the final name ``name``, when given); call it only while holding the lock that covers them
    (:mod:`nnunet_jax.locks`), so no live writer's temp is touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if is_temp(entry) and (name is None or entry.name.startswith(f".{name}{TEMP_MARK}")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask_mode(mode: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (same suffix, so writers that look at it behave); on success it is
    renamed onto ``path`` with the usual permissions, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=suffix, dir=path.parent)
    except OSError as e:  # read-only or full folder: name the file asked for, not the temp
        raise OSError(e.errno, e.strerror, str(path)) from e
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode(0o666))  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is not None and e.filename in (None, tmp):  # ENOSPC from write() names no file: name ours
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_npy(array: np.ndarray, path: str | os.PathLike) -> Path:
    """``np.save`` without pickle, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Replace ``path``'s contents atomically: readers see the old file or the new one, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(obj: object, path: str | os.PathLike, indent: int | None = 2, default: Any = None) -> Path:
    """:func:`write_text` of ``obj`` as JSON (``default`` as in :func:`json.dumps`)."""
    return write_text(json.dumps(obj, indent=indent, default=default) + "\n", path)


def make_temp_dir(final: str | os.PathLike, tag: str = "tmp") -> Path:
    """A hidden temp folder beside ``final`` to build a whole output in before :func:`replace_dir`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_MARK}{tag}.", dir=final.parent))
    os.chmod(tmp, _umask_mode(0o777))
    return tmp


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``final``; an old ``final`` is removed only after the new one is in
    place (moved aside first, so a crash leaves either the old or the new folder complete)."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}{TEMP_MARK}old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final

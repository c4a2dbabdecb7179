"""Download and unpack a Medical Segmentation Decathlon task.

    python -m preprocess.download --task 04 --results /data      # → /data/Task04_Hippocampus/

The archive goes to ``<results>/<TaskXX_Name>.tar.part`` first; an interrupted download continues from
where it stopped on the next run (HTTP Range), and the file gets its final name only once complete. It is
then unpacked into a temporary folder (refusing absolute paths, ``..``, links and devices; macOS ``._``
resource files are skipped), checked for ``dataset.json`` and renamed into place; the archive is deleted
unless ``--keep_archive``. ``--url`` replaces the task table's address (a mirror, or a local file server).
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from absl import app, flags
from tqdm import tqdm

from nnunet_jax.atomic import make_temp_dir, replace_dir
from nnunet_jax.configs.tasks import get_task

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The download or the archive failed; the message says what to do."""


def _total_from(response, offset: int) -> int | None:
    """Full size of the file from Content-Range (206) or Content-Length (200)."""
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) + offset if length and length.isdigit() else None


def fetch(url: str, dest: str | os.PathLike, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if present; returns ``dest``."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the part file may be complete already
            total = _total_from(e, 0)
            if total == offset:
                os.replace(part, dest)
                return dest
            part.unlink()  # inconsistent partial file: start again
            return fetch(url, dest, progress, timeout)
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: {e}") from e
    with response:
        if offset and response.status != 206:  # the server ignored the Range header: start over
            offset = 0
        total = _total_from(response, offset)
        mode = "ab" if offset else "wb"
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          desc=dest.name, disable=not progress) as bar:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{url}: connection lost after {f.tell()} bytes ({e}); "
                                    f"run again to resume from {part}") from e
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{url}: got {size} of {total} bytes; run again to resume from {part}")
    os.replace(part, dest)
    return dest


def _safe_members(tar: tarfile.TarFile, archive: Path):
    for member in tar:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise DownloadError(f"{archive}: refusing member {member.name!r} (outside the target folder)")
        if member.issym() or member.islnk() or member.isdev():
            raise DownloadError(f"{archive}: refusing member {member.name!r} (links and devices not allowed)")
        if path.name.startswith("._"):  # macOS resource forks shipped inside the MSD archives
            continue
        yield member


def extract(archive: str | os.PathLike, results: str | os.PathLike, folder: str) -> Path:
    """Unpack ``archive`` safely into ``results/folder``; it must contain ``folder/dataset.json``."""
    archive, results = Path(archive), Path(results)
    results.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(results / folder, "extract")
    try:
        try:
            with tarfile.open(archive) as tar:
                for member in _safe_members(tar, archive):
                    tar.extract(member, tmp, set_attrs=False, **_filter_kwargs())
        except tarfile.TarError as e:
            raise DownloadError(f"{archive}: not a readable tar archive ({e}); delete it") from e
        root = tmp / folder
        if not (root / "dataset.json").is_file():
            tops = [p for p in tmp.iterdir() if (p / "dataset.json").is_file()]
            if len(tops) != 1:
                raise DownloadError(f"{archive}: no {folder}/dataset.json inside the archive")
            root = tops[0]
        final = replace_dir(root, results / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _filter_kwargs() -> dict:
    """Python ≥ 3.12 (and 3.11.4+) take a tar extraction filter; 'data' is the safe one."""
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def download_task(task: str, results: str | os.PathLike, url: str | None = None, keep_archive: bool = False,
                  progress: bool = True) -> Path:
    """Fetch, unpack and check one MSD task; returns ``results/<TaskXX_Name>``."""
    info = get_task(task)
    if info is None:
        raise DownloadError(f"unknown MSD task {task!r} (01..10)")
    url = url or info.url
    if url is None:
        raise DownloadError(f"task {info.number} ({info.folder}) has no download; "
                            "generate it with python -m preprocess.synthetic")
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    archive = fetch(url, results / f"{info.folder}.tar", progress)
    final = extract(archive, results, info.folder)
    if not keep_archive:
        archive.unlink()
    return final


def define_flags() -> None:
    """Defined only when run as a program, so importing this module never clashes with other absl flags."""
    flags.DEFINE_string("task", None, "MSD task number, 01..10.")
    flags.DEFINE_string("results", "/data", "Folder that receives TaskXX_Name/.")
    flags.DEFINE_string("url", None, "Download from this address instead of the task table's.")
    flags.DEFINE_bool("keep_archive", False, "Keep the .tar after unpacking.")
    flags.mark_flag_as_required("task")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fl = flags.FLAGS
    try:
        path = download_task(fl.task, fl.results, fl.url, fl.keep_archive)
    except DownloadError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}")


def run() -> None:
    """Console entry point."""
    from nnunet_jax.cli import run_app

    run_app(main, define_flags, __name__)


if __name__ == "__main__":
    run()

"""MSD download against a local HTTP server (never the internet): resume, atomic rename, safe extraction."""

from __future__ import annotations

import io
import os
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nnunet_jax.datasets.download import DownloadError, download_task, extract, fetch


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.payload`` with Range support; ``server.cut_after`` drops the connection mid-way."""

    def do_GET(self):  # noqa: N802 (http.server naming)
        payload: bytes = self.server.payload
        self.server.ranges.append(self.headers.get("Range"))
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and self.server.ranges_ok:
            start = int(match.group(1))
            if start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        body = payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.cut_after
        if cut is not None:
            self.server.cut_after = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.payload, httpd.ranges, httpd.cut_after, httpd.ranges_ok = b"", [], None, True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _tar(members: dict[str, bytes], folder: str = "Task04_Hippocampus") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _task_tar(folder="Task04_Hippocampus") -> bytes:
    return _tar({
        f"{folder}/dataset.json": b'{"name": "x"}',
        f"{folder}/imagesTr/hippocampus_001.nii.gz": os.urandom(300_000),
        f"{folder}/imagesTr/._hippocampus_001.nii.gz": b"resource fork",
    })


def test_download_extract_and_clean_up(server, tmp_path):
    server.payload = _task_tar()
    url = f"http://127.0.0.1:{server.server_port}/Task04_Hippocampus.tar"
    root = download_task("04", tmp_path, url=url, progress=False)
    assert root == tmp_path / "Task04_Hippocampus"
    assert (root / "dataset.json").read_bytes() == b'{"name": "x"}'
    assert len((root / "imagesTr" / "hippocampus_001.nii.gz").read_bytes()) == 300_000
    assert not (root / "imagesTr" / "._hippocampus_001.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task04_Hippocampus"]  # archive, temp dirs gone
    assert server.ranges == [None]


def test_resume_after_a_dropped_connection(server, tmp_path):
    server.payload = _task_tar()
    url = f"http://127.0.0.1:{server.server_port}/t.tar"
    dest = tmp_path / "Task04_Hippocampus.tar"
    server.cut_after = 120_000
    with pytest.raises(DownloadError, match="resume"):
        fetch(url, dest, progress=False)
    part = tmp_path / "Task04_Hippocampus.tar.part"
    assert not dest.exists() and part.stat().st_size == 120_000
    fetch(url, dest, progress=False)
    assert server.ranges == [None, "bytes=120000-"]
    assert dest.read_bytes() == server.payload and not part.exists()


def test_resume_from_an_existing_part_file_and_server_without_ranges(server, tmp_path):
    server.payload = _task_tar()
    url = f"http://127.0.0.1:{server.server_port}/t.tar"
    dest = tmp_path / "a.tar"
    Path(str(dest) + ".part").write_bytes(server.payload[:5000])
    fetch(url, dest, progress=False)
    assert server.ranges == ["bytes=5000-"] and dest.read_bytes() == server.payload
    # A complete .part (server answers 416) is accepted as is.
    dest.rename(str(dest) + ".part")
    fetch(url, dest, progress=False)
    assert dest.read_bytes() == server.payload
    # A server that ignores Range sends everything again: the part file restarts instead of growing.
    server.ranges_ok = False
    dest2 = tmp_path / "b.tar"
    Path(str(dest2) + ".part").write_bytes(b"junk" * 10)
    fetch(url, dest2, progress=False)
    assert dest2.read_bytes() == server.payload


def test_unsafe_or_incomplete_archives(tmp_path):
    for name in ("../evil.txt", "/abs/evil.txt", "Task04_Hippocampus/../../evil.txt"):
        archive = tmp_path / "bad.tar"
        archive.write_bytes(_tar({name: b"x", "Task04_Hippocampus/dataset.json": b"{}"}))
        with pytest.raises(DownloadError, match="outside the target"):
            extract(archive, tmp_path / "out", "Task04_Hippocampus")
    assert not (tmp_path / "evil.txt").exists()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("Task04_Hippocampus/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    archive.write_bytes(buf.getvalue())
    (tmp_path / "out").mkdir(exist_ok=True)
    with pytest.raises(DownloadError, match="links"):
        extract(archive, tmp_path / "out", "Task04_Hippocampus")
    archive.write_bytes(_tar({"Task04_Hippocampus/imagesTr/a.nii.gz": b"x"}))
    with pytest.raises(DownloadError, match="dataset.json"):
        extract(archive, tmp_path / "out", "Task04_Hippocampus")
    archive.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DownloadError, match="not a readable tar"):
        extract(archive, tmp_path / "out", "Task04_Hippocampus")
    assert list((tmp_path / "out").iterdir()) == []  # no partial task folder, no temp folder


def test_unknown_task_and_synthetic_task():
    with pytest.raises(DownloadError, match="unknown MSD task"):
        download_task("42", "/nonexistent")
    with pytest.raises(DownloadError, match="synthetic"):
        download_task("00", "/tmp")

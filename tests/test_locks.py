"""One run per folder: a second train/predict/preprocess on a folder in use is refused at once, naming the
folder and the PID holding it; a lock left by a killed process blocks nothing; the temp files killed
writers left are removed by the next run that holds the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunet_jax.atomic import TEMP_MARK
from nnunet_jax.locks import LOCK_NAME, FolderBusyError, folder_lock, lock_file
from tests.test_training_utils import ROOT

HOLD = """
import sys, time
from nnunet_jax.locks import folder_lock
with folder_lock(sys.argv[1], "holder.py", beside=sys.argv[2] == "1"):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(folder: Path, beside: bool = False) -> subprocess.Popen:
    """A live process holding ``folder``'s lock (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), "1" if beside else "0"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(folder: Path, beside: bool = False) -> subprocess.Popen:
        procs.append(_hold(folder, beside))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_second_lock_refused_naming_folder_and_pid(tmp_path, holder):
    proc = holder(tmp_path / "run")
    t0 = time.perf_counter()
    with pytest.raises(FolderBusyError) as e, folder_lock(tmp_path / "run", "test"):
        pass
    assert time.perf_counter() - t0 < 2  # at once, no waiting
    assert str(tmp_path / "run") in str(e.value) and f"PID {proc.pid}" in str(e.value)
    assert "holder.py" in str(e.value)


def test_lock_of_killed_process_does_not_block(tmp_path, holder):
    proc = holder(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / LOCK_NAME).exists()  # the file stays, the lock is gone with the process
    with folder_lock(tmp_path / "run", "test") as path:
        assert path.read_text().split()[0] == str(os.getpid())


def test_stale_temps_removed_when_the_lock_is_taken(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale_file = run / f".case_1.nii.gz{TEMP_MARK}abc.nii.gz"
    stale_file.write_bytes(b"")
    stale_dir = tmp_path / f".00_3d{TEMP_MARK}training.xyz"  # a killed preprocessing's folder beside it
    stale_dir.mkdir()
    other = tmp_path / f".01_3d{TEMP_MARK}training.xyz"  # another task's: not ours to remove
    other.mkdir()
    keep = run / "case_2.nii.gz"
    keep.write_bytes(b"x")
    with folder_lock(run, "test"):
        pass
    assert not stale_file.exists() and keep.exists()
    with folder_lock(tmp_path / "00_3d", "test", beside=True):
        assert lock_file(tmp_path / "00_3d", beside=True).exists()
    assert not stale_dir.exists() and other.exists()


def test_unused_new_folder_is_not_left_behind(tmp_path):
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "new", "test"):
        raise RuntimeError("failed before writing anything")
    assert not (tmp_path / "new").exists()
    with folder_lock(tmp_path / "used", "test"):
        (tmp_path / "used" / "out.txt").write_text("x")
    assert (tmp_path / "used" / "out.txt").exists()


def test_train_refused_while_its_results_folder_is_in_use(tmp_path, holder):
    from nnunet_jax import parallel
    from nnunet_jax.training import loop
    from tests.test_training_utils import FakeData, tiny_config

    proc = holder(tmp_path / "run")
    with pytest.raises(loop.TrainingError, match=f"in use by another run.*PID {proc.pid}"):
        loop.train_and_evaluate(tiny_config(tmp_path / "run"), data=FakeData(parallel.make_mesh()))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_preprocess_refused_while_the_task_folder_is_in_use(tmp_path, holder):
    from nnunet_jax.datasets.synthetic import generate
    from nnunet_jax.io import DatasetError
    from nnunet_jax.preprocessing.driver import preprocess_dataset

    generate(tmp_path / "data", cases=2, test_cases=0, seed=0)
    proc = holder(tmp_path / "results" / "00_3d", beside=True)
    with pytest.raises(DatasetError, match=f"00_3d is in use by another run.*PID {proc.pid}"):
        preprocess_dataset(tmp_path / "data", "00", 3, tmp_path / "results", progress=False)
    assert not (tmp_path / "results" / "00_3d").exists()


def test_predict_refused_while_its_output_folder_is_in_use(tmp_path, holder):
    proc = holder(tmp_path / "preds")
    out = subprocess.run([sys.executable, "predict.py", "--data", str(tmp_path), "--ckpt_path",
                          str(tmp_path / "none"), "--results", str(tmp_path / "preds")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"PID {proc.pid}" in out.stderr and "Traceback" not in out.stderr


def test_lock_holds_on_a_full_disk(tmp_path, monkeypatch):
    """The holder's note cannot be written on a full disk: the lock still holds, so the run's own checks can
    say how much space it needs."""
    import errno

    import nnunet_jax.locks as locks

    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks.os, "pwrite", no_space)
    with folder_lock(tmp_path / "run", "test"):
        with pytest.raises(FolderBusyError, match="a process"), folder_lock(tmp_path / "run", "other"):
            pass
    assert not (tmp_path / "run").exists()

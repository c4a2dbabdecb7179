"""Fault stress test of the command lines on the synthetic task with a tiny U-Net; prints what held.

    .venv/bin/python benchmarks/stress.py                 # 20 random SIGKILLs, concurrency, full disks
    .venv/bin/python benchmarks/stress.py --kills 3       # the short version (tests/test_stress.py)

1. **Kills**: ``train.py --resume_training`` is started again and again and SIGKILLed at a random point
   (during start-up, inside steps, inside checkpoint saves), then run to the end; its logs and final
   checkpoint must equal an uninterrupted run's, and no temp file may be left.
2. **Two runs on one folder**: a second ``train.py`` on a results folder in use must fail at once (exit 2,
   naming the first run's PID) and the first must finish unharmed (every epoch logged once).
3. **Full disks** (a small tmpfs; needs root to mount, else reported as not tried): a disk filled by another
   process while training runs (the next save is refused with one line and exit 2, no Orbax temp folder
   left, the last checkpoint and ``logs.json`` consistent, resume after freeing space finishes), and
   ``train.py`` / ``predict.py`` / ``python -m preprocess`` into a folder that is full from the start (one
   line, exit 2 or 1, nothing left).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
TIMING = ("seconds", "img_per_s")


def sh(*args: str, check: bool = False, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout,
                          check=check)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([PY, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


class Setup:
    """The synthetic task preprocessed once; the train/predict command lines of a tiny run."""

    def __init__(self, work: Path, epochs: int):
        from nnunet_jax.plan import Plan

        self.work, self.epochs = work, epochs
        sh("-m", "preprocess.synthetic", "--out", str(work / "data"), "--cases", "6", "--seed", "0",
           check=True)
        for mode in ("training", "test"):
            sh("-m", "preprocess", "--task", "00", "--dim", "3", "--data", str(work / "data"), "--results",
               str(work / "pre"), "--exec_mode", mode, "--n_jobs", "1", check=True)
        self.data = work / "pre" / "00_3d"
        depth = Plan.load(self.data / "plan.json").topology.depth
        self.filters = ",".join(str(4 * 2**i) for i in range(depth))

    def train_args(self, results: Path, resume: bool = False, every: int = 1, epochs: int = 0) -> list[str]:
        epochs = epochs or self.epochs
        args = ["train.py", "--data", str(self.data), "--results", str(results), "--filters", self.filters,
                "--nfolds", "3", "--max_epochs", str(epochs), "--min_epochs", str(epochs),
                "--train_batches", "3", "--batch_size", "1", "--val_cases", "1", "--ckpt_every_steps",
                str(every), "--noprogress"]
        return args + (["--resume_training"] if resume else [])

    def predict_args(self, ckpt: Path, out: Path) -> list[str]:
        return ["predict.py", "--data", str(self.data / "test"), "--ckpt_path", str(ckpt), "--results",
                str(out)]


def logs(results: Path) -> list[dict]:
    path = results / "logs.json"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in lines]


def final_state(results: Path) -> list:
    import numpy as np
    import orbax.checkpoint as ocp

    last = results / "checkpoints" / "last"
    step = max(int(p.name) for p in last.iterdir() if p.name.isdigit())
    tree = ocp.StandardCheckpointer().restore(last / str(step) / "state")
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in leaves]


def leftovers(folder: Path) -> list[str]:
    """Temp files and folders of ours or Orbax's anywhere below ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".nnunet-tmp." in p.name or "orbax-checkpoint-tmp" in p.name)


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not our progress notes or progress bars."""
    notes = ("compiling the", "note:", "warning:", "predicting ")
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(notes) and "%|" not in ln]


def steps_of(results: Path) -> list[int]:
    last = results / "checkpoints" / "last"
    return sorted(int(p.name) for p in last.glob("*") if p.name.isdigit()) if last.is_dir() else []


# --------------------------------------------------------------------------------------------- scenarios


def kills(s: Setup, n: int, seed: int) -> list[tuple[str, bool, str]]:
    """``n`` runs each SIGKILLed at a random point: during start-up and compiling (some), else 1-2 steps
    (each step saves ``checkpoints/last``) after the run has caught up, plus a random fraction of a step, so
    kills land in steps, in saves and between them; then a last run to the end."""
    epochs = max(s.epochs, n // 2 + 3)  # 3 steps an epoch: enough steps for every kill to move on
    total = epochs * 3
    ref = s.work / "ref"
    t0 = time.perf_counter()
    sh(*s.train_args(ref, epochs=epochs), check=True)
    duration = time.perf_counter() - t0
    run = s.work / "killed"
    rng = random.Random(seed)
    killed, at_start, finished_early = 0, 0, 0
    for _ in range(n):
        done = (steps_of(run) or [0])[-1]
        if done >= total:
            break
        proc = start(*s.train_args(run, resume=True, epochs=epochs))
        if rng.random() < 0.2:  # in start-up / compiling
            time.sleep(rng.uniform(1.0, 12.0))
            at_start += 1
        else:
            target = done + rng.randint(1, 2)
            while (steps_of(run) or [0])[-1] < target and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            finished_early += 1
            if proc.returncode != 0:
                return [(f"{n} SIGKILLs + resume", False, f"a run failed: {proc.stderr.read()[-800:]}")]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += 1
    final = sh(*s.train_args(run, resume=True, epochs=epochs))
    ok_logs = logs(run) == logs(ref)
    a, b = final_state(ref), final_state(run)
    ok_state = len(a) == len(b) and all(ka == kb and (va == vb).all()
                                        for (ka, va), (kb, vb) in zip(a, b, strict=False))
    left = leftovers(run)
    detail = (f"{killed} runs killed ({at_start} during start-up, the others 1-2 steps in, among {total} "
              f"steps of a {duration:.0f} s run), {finished_early} finished before its kill; final run exit "
              f"{final.returncode}; logs equal: {ok_logs}; final state equal: {ok_state} ({len(a)} arrays); "
              f"leftovers: {left or 'none'}")
    return [(f"{n} SIGKILLs at random points + resume", final.returncode == 0 and ok_logs and ok_state
             and not left and killed >= n - 1, detail)]


def concurrent(s: Setup) -> list[tuple[str, bool, str]]:
    run = s.work / "shared"
    first = start(*s.train_args(run))
    lock = run / ".nnunet.lock"
    deadline = time.time() + 300
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    t0 = time.perf_counter()
    second = sh(*s.train_args(run))
    refused_in = time.perf_counter() - t0
    out, err = first.communicate(timeout=900)
    epochs = [r["epoch"] for r in logs(run)]
    refused = second.returncode == 2 and f"PID {first.pid}" in second.stderr and len(error_lines(
        second.stderr)) == 1
    unharmed = first.returncode == 0 and epochs == list(range(1, s.epochs + 1))
    return [("two train.py on one folder", refused and unharmed,
             f"second: exit {second.returncode} after {refused_in:.1f} s: "
             f"{error_lines(second.stderr)[-1:] or second.stderr[-300:]}; first: exit {first.returncode}, "
             f"epochs logged {epochs}")]


@contextmanager
def tmpfs(size_mib: int):
    """A fresh tmpfs of ``size_mib`` (None when it cannot be mounted: not root, no mount permission)."""
    mnt = Path(tempfile.mkdtemp(prefix="nnunet-stress-tmpfs-"))
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs",
                                               str(mnt)], capture_output=True).returncode == 0
    try:
        yield mnt if ok else None
    finally:
        if ok:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


def fill(folder: Path) -> Path:
    """Fill ``folder``'s filesystem with one file until a write fails."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    chunk = b"\0" * 2**16
    try:
        while True:
            os.write(fd, chunk)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def full_disk(s: Setup) -> list[tuple[str, bool, str]]:
    rows = []
    with tmpfs(64) as mnt:
        if mnt is None:
            return [("full disks (tmpfs)", True, "not tried: mounting a tmpfs needs root")]
        # a disk that fills during training, between two saves (epoch-end checkpoints only): another
        # process fills it while epoch 2 trains
        run = mnt / "run"
        proc = start(*s.train_args(run, every=0))
        deadline = time.time() + 600
        best = run / "checkpoints" / "best"
        while not (steps_of(run) and any(p.name.isdigit() for p in best.glob("*"))) and proc.poll() is None \
                and time.time() < deadline:  # epoch 1's last and best are on disk: between two saves
            time.sleep(0.1)
        time.sleep(0.5)
        filler = fill(mnt)
        out, err = proc.communicate(timeout=900)
        (s.work / "disk-fills.stderr").write_text(err)
        errs = error_lines(err)
        kept = steps_of(run)
        from nnunet_jax.checkpoints import read_meta

        meta = read_meta(run) or {}
        logged = [r["epoch"] for r in logs(run)]
        consistent = bool(kept) and (logged[-1] if logged else 0) <= meta.get("epoch", -1)
        stopped = proc.returncode == 2 and len(errs) == 1 and "no space left" in errs[0]
        left = leftovers(run)
        filler.unlink()
        resumed = sh(*s.train_args(run, resume=True, every=0))
        rows.append(("disk fills during training", stopped and consistent and not left
                     and resumed.returncode == 0,
                     f"exit {proc.returncode}, {len(err.splitlines())} stderr line(s): {errs[-1:]}; "
                     f"checkpoint step {kept}, epoch {meta.get('epoch')}, logged epochs {logged}; leftovers "
                     f"{left or 'none'}; resume after freeing: exit {resumed.returncode}"))
        # folders full from the start
        filler = fill(mnt)
        cases = [
            ("train.py into a full disk", s.train_args(mnt / "run2")),
            ("predict.py into a full disk", s.predict_args(run, mnt / "preds")),
            ("preprocess into a full disk", ["-m", "preprocess", "--task", "00", "--dim", "3", "--data",
                                             str(s.work / "data"), "--results", str(mnt / "pre"),
                                             "--n_jobs", "1"]),
        ]
        for name, args in cases:
            before = set(mnt.rglob("*"))
            proc = sh(*args)
            errs = error_lines(proc.stderr)
            new = sorted(str(p.relative_to(mnt)) for p in set(mnt.rglob("*")) - before)
            ok = proc.returncode in (1, 2) and len(errs) == 1 and "Traceback" not in proc.stderr and not new
            rows.append((name, ok, f"exit {proc.returncode}: {errs[-1:] or proc.stderr[-300:]}; new files "
                                   f"{new or 'none'}"))
        filler.unlink()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nnunet-stress-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = Setup(work, args.epochs)
    rows = []
    for scenario in (lambda: kills(s, args.kills, args.seed), lambda: concurrent(s), lambda: full_disk(s)):
        rows += scenario()
        print(*(f"{'held' if ok else 'FAILED'}: {name}: {detail}" for name, ok, detail in rows[-1:]),
              flush=True)
    print("\n| what was tried | held | detail |\n| --- | --- | --- |")
    for name, ok, detail in rows:
        print(f"| {name} | {'yes' if ok else 'NO'} | {detail} |")
    held = sum(ok for _, ok, _ in rows)
    print(f"\n{held}/{len(rows)} held ({time.perf_counter() - t0:.0f} s, work {work})")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

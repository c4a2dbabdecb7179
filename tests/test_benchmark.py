"""benchmark.py: the timing loop really skips warm-up, the statistics, and tiny CPU runs of the CLI.

Throughput numbers are printed, never asserted (they depend on the machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nnunet_jax import benchmarking

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--filters", "4,8,16", "--in_channels", "2", "--n_class", "3", "--warmup", "1"]


def test_warmup_steps_are_not_timed():
    calls = []

    def step():
        calls.append(time.perf_counter())
        if len(calls) <= 3:  # the warm-up steps are slow (think: autotuning)
            time.sleep(0.2)
        return len(calls)

    synced = []
    times = benchmarking.time_steps(step, n_steps=4, warmup=3, sync=synced.append)
    assert len(calls) == 7 and synced == list(range(1, 8))  # every step, warm-up included, is waited for
    assert len(times) == 4 and max(times) < 0.1


def test_sync_is_inside_the_timed_region():
    """A step whose work finishes only at sync (asynchronous dispatch) is timed with that work."""
    times = benchmarking.time_steps(lambda: None, n_steps=3, warmup=0, sync=lambda _: time.sleep(0.05))
    assert min(times) >= 0.05


def test_statistics_and_table():
    r = benchmarking.BenchResult("jax", "train", 3, 2, "fp32", "cpu", 1, 100, 5, 1.0,
                                 list(np.arange(1, 101) / 1000.0))
    lat = r.latency_ms()
    # 1..100 ms: mean 50.5; linear percentiles at positions 0.9·99, 0.95·99, 0.99·99
    assert lat == pytest.approx({"mean": 50.5, "p90": 90.1, "p95": 95.05, "p99": 99.01})
    assert r.throughput == pytest.approx(2 / 0.0505)
    table = benchmarking.format_rows([r, r.to_dict()])
    assert len(table.splitlines()) == 3 and "39.60" in table and "99.01" in table


def _run(args, tmp_path, python=sys.executable, timeout=600, env=None):
    proc = subprocess.run([python, str(ROOT / "benchmark.py"), *args, "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((tmp_path / "perf.json").read_text())


def test_cli_train_2d(tmp_path):
    proc, doc = _run(["--mode", "train", "--dim", "2", "--patch", "16,16", "--batch_size", "1,2",
                      "--train_batches", "2", *TINY], tmp_path)
    rows = doc["results"]
    assert [r["batch_size"] for r in rows] == [1, 2] and all(r["mode"] == "train" for r in rows)
    for r in rows:
        assert r["steps"] == 2 and len(r["step_times_s"]) == 2 and r["throughput_img_s"] > 0
        assert set(r["latency_ms"]) == {"mean", "p90", "p95", "p99"}
    assert "img/s" in proc.stdout


def test_cli_predict_3d_needs_no_nibabel_or_ml_collections(tmp_path):
    """The synthetic path imports neither nibabel, ml_collections nor DALI (bare GPU machines)."""
    code = (
        "import sys, runpy; sys.argv = ['benchmark.py'] + sys.argv[1:]\n"
        "try:\n    runpy.run_path('benchmark.py', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = [m for m in ('nibabel', 'ml_collections', 'nvidia.dali', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n")
    args = ["--mode", "predict", "--dim", "3", "--patch", "16,16,16", "--batch_size", "2",
            "--test_batches", "3", *TINY, "--amp", "--results", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-c", code, *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = json.loads((tmp_path / "perf.json").read_text())["results"]
    assert row["mode"] == "predict" and row["precision"] == "amp-bf16" and row["steps"] == 3


def _python_with_monai() -> str | None:
    if importlib.util.find_spec("monai") and importlib.util.find_spec("torch"):
        return sys.executable
    oracle = ROOT / ".venv-oracle" / "bin" / "python"
    return str(oracle) if oracle.exists() else None


@pytest.mark.slow
def test_monai_baseline_same_run(tmp_path):
    python = _python_with_monai()
    if python is None:
        pytest.skip("no Python with torch + monai")
    proc, doc = _run(["--mode", "train", "--dim", "2", "--patch", "16,16", "--batch_size", "2",
                      "--train_batches", "2", "--baseline", "monai", *TINY], tmp_path, python=python,
                     env={**os.environ, "OMP_NUM_THREADS": "1"})  # torch's spinning threads crawl here
    assert [r["framework"] for r in doc["results"]] == ["jax", "monai"]
    assert "jax / monai throughput ratio" in proc.stdout


def test_cli_real_preprocessed_data(tmp_path):
    """--data: patches of preprocessed cases (smaller than the patch in one axis: zero-padded), plan's net."""
    data = tmp_path / "pre"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(5, 20, 12), (3, 14, 30)]):
        np.save(data / f"c{i}_x.npy", rng.normal(size=(2, *shape)).astype(np.float32))
        np.save(data / f"c{i}_y.npy", rng.integers(0, 3, (1, *shape)).astype(np.uint8))
    plan = {"dim": 2, "patch_size": [16, 16], "spacing": [1.0, 1.0], "n_class": 3, "in_channels": 2,
            "topology": {"kernels": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]], "filters": [4, 8, 16]}}
    (data / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    _, doc = _run(["--mode", "predict", "--dim", "2", "--data", str(data), "--batch_size", "3",
                   "--test_batches", "2", "--warmup", "0"], out)
    [row] = doc["results"]
    assert row["batch_size"] == 3 and row["steps"] == 2
    batches = benchmarking.real_batches(data, benchmarking.BenchSpec(
        "predict", 2, 3, (16, 16), 2, 3, (), (), ()), global_batch=3, n_batches=2)
    assert batches[0]["image"].shape == (3, 16, 16, 2) and batches[0]["label"].shape == (3, 16, 16, 1)


def test_cli_filters_not_matching_the_levels_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--mode", "train", "--dim", "2",
                           "--patch", "32,32", "--filters", "4,8,16,32,64,128,256,512", "--results",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "default filters" in proc.stderr

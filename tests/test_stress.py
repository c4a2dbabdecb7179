"""The short version of benchmarks/stress.py: random SIGKILLs + resume equal an uninterrupted run, a second
run on a folder in use is refused, full disks (where a tmpfs can be mounted) end in one line."""

import subprocess
import sys

import pytest

from tests.test_training_utils import ROOT


@pytest.mark.slow
def test_stress_short(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/stress.py", "--kills", "2", "--epochs", "2", "--work",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert len(table) >= 3 and all("| yes |" in row for row in table), "\n".join(table)

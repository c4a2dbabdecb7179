"""What every command line shares through ``nnunet_jax.cli.run_app``: ``--help`` exits 0, the libraries'
log lines stay off the console unless ``--verbosity`` is given, OS errors are one line, extra arguments a
usage error.

The commands run as subprocesses the way a user runs them: without conftest's ``JAX_PLATFORMS=cpu`` (so JAX
probes its platforms and would log "Unable to initialize backend") and without its 8 simulated devices.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nnunet_jax.cli import describe_os_error
from tests.test_predict import _plan, _write_case, _write_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {  # how to start it: a flag its --help must list
    "train.py": "--fold", "predict.py": "--ckpt_path", "evaluate.py": "--preds",
    "benchmark.py": "--train_batches", "visualize.py": "--logs", "-m preprocess": "--exec_mode",
    "find_best_configuration.py": "--config",
}
# absl's log format (I1204 01:13:52.117568 ... file.py:861]), also XLA's C++ logs; absl's Python-logging
# default format; Orbax; JAX's platform probing.
LIBRARY_LINE = re.compile(r"^[IWEF]\d{4} |WARNING:absl|INFO:absl|orbax|Unable to initialize backend"
                          r"|xla_bridge|NVIDIA GPU may be present", re.MULTILINE)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform" not in f)
    return env


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _library_lines(proc: subprocess.CompletedProcess) -> list[str]:
    text = proc.stdout + proc.stderr
    return [line for line in text.splitlines() if LIBRARY_LINE.search(line)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A trained run (random weights), a raw NIfTI case, and prediction / label folders to score."""
    root = tmp_path_factory.mktemp("cli")
    _write_run(root / "run", _plan((1.0, 1.0, 1.0)))
    _, label, _, _ = _write_case(root / "raw", "c", (18, 17, 6), (1.0, 1.0, 3.0), 0)
    for folder in ("preds", "lbls"):
        (root / folder).mkdir()
        (root / folder / "c.nii.gz").write_bytes(label.read_bytes())
    return root


# ------------------------------------------------------------------------------------------------ --help


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_exits_zero_and_lists_the_scripts_flags(script):
    proc = _run(*script.split(), "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert SCRIPTS[script] in proc.stdout and "Try --helpfull" in proc.stdout
    assert "--verbosity" not in proc.stdout  # only the script's own flags; absl's are in --helpfull


@pytest.mark.parametrize("flag", ["-h", "-?", "--helpshort", "--helpfull"])
def test_other_help_flags_exit_zero(flag):
    proc = _run("visualize.py", flag)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--logs" in proc.stdout
    assert ("--verbosity" in proc.stdout) == (flag == "--helpfull")


def test_usage_errors_still_exit_nonzero():
    unknown = _run("visualize.py", "--no_such_flag")
    assert unknown.returncode == 1 and "Unknown command line flag" in unknown.stderr
    extra = _run("evaluate.py", "--preds", "a", "--lbls", "b", "surplus")
    assert extra.returncode == 1 and "unexpected arguments: ['surplus']" in extra.stderr


# ------------------------------------------------------------------------------------------------ quiet


def test_commands_are_quiet_unless_asked(tiny):
    pred = _run("predict.py", "--data", str(tiny / "raw" / "c.nii.gz"), "--ckpt_path", str(tiny / "run"),
                "--results", str(tiny / "out"))
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert _library_lines(pred) == []
    assert pred.stdout.strip().splitlines()[-1].startswith("wrote 1 file(s)")

    score = _run("evaluate.py", "--preds", str(tiny / "preds"), "--lbls", str(tiny / "lbls"))
    assert score.returncode == 0, score.stderr[-3000:]
    assert _library_lines(score) == [] and "mean dice" in score.stdout

    loud = _run("predict.py", "--data", str(tiny / "raw" / "c.nii.gz"), "--ckpt_path", str(tiny / "run"),
                "--results", str(tiny / "out_loud"), "-v", "0")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert any("orbax" in line or "checkpoint" in line for line in _library_lines(loud)), loud.stderr[-3000:]


def test_python_api_restores_quietly(tiny):
    """Importing nnunet_jax silences Orbax's WARNING:absl lines; quiet_libraries(True) brings them back."""
    code = textwrap.dedent(f"""
        import sys
        from nnunet_jax.inference.predictor import Predictor
        Predictor.from_checkpoints({str(tiny / "run")!r})
        print("--- verbose", file=sys.stderr, flush=True)
        from nnunet_jax.quiet import quiet_libraries
        quiet_libraries(verbose=True)
        Predictor.from_checkpoints({str(tiny / "run")!r})
    """)
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    quiet, verbose = proc.stderr.split("--- verbose")
    assert not LIBRARY_LINE.search(quiet), quiet
    assert "WARNING:absl" in verbose  # Orbax's "read only" warnings: the filter was what hid them


def test_our_own_warnings_stay_visible():
    """The project's loggers are not libraries: their warnings pass under a quiet command."""
    code = textwrap.dedent("""
        import logging, sys
        from nnunet_jax.cli import run_app
        def main(argv):
            from absl import logging as absl_logging
            logging.getLogger("nnunet_jax.training.loop").warning("ours: curves not drawn")
            logging.getLogger("jax._src.xla_bridge").warning("theirs")
            absl_logging.warning("absl from the script itself")
        sys.argv = ["tool"]
        run_app(main, lambda: None, "__main__")
    """)
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "ours: curves not drawn" in proc.stderr and "absl from the script itself" in proc.stderr
    assert "theirs" not in proc.stderr


# ------------------------------------------------------------------------------------------------ OSError


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/full/x.npy"),
     "no space left on device: /data/full/x.npy"),
    (OSError(errno.ENOSPC, None), "no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/a", None), "permission denied: /ro/a"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/a", None, "/ro/b"),
     "read-only file system: /ro/a -> /ro/b"),
    (FileNotFoundError("no checkpoint at /x"), "no checkpoint at /x"),
])
def test_describe_os_error(error, line):
    assert describe_os_error(error) == line


def test_os_error_escaping_main_is_one_line_exit_2():
    code = textwrap.dedent("""
        import errno, sys
        from nnunet_jax.cli import run_app
        def main(argv):
            if sys.argv[1:] == ["value"]:
                raise ValueError("not ours to shorten")
            raise OSError(errno.ENOSPC, "No space left on device", "/data/full/case_x.npy")
        run_app(main, lambda: None, "__main__")
    """)
    proc = _run("-c", code)
    assert proc.returncode == 2
    assert proc.stderr == "error: no space left on device: /data/full/case_x.npy\n"
    other = subprocess.run([sys.executable, "-c", code.replace('sys.argv[1:] == ["value"]', "True")],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and "Traceback" in other.stderr and "ValueError" in other.stderr


@pytest.mark.parametrize("where, expected", [
    ("/sys/forbidden.json", "permission denied: /sys/forbidden.json"),  # sysfs refuses new files, even root
    ("{lbls}/c.nii.gz/evaluation.json", "{lbls}/c.nii.gz"),  # the parent is a regular file
])
def test_real_write_failures_are_one_line(tiny, where, expected):
    lbls = tiny / "lbls"
    proc = _run("evaluate.py", "--preds", str(tiny / "preds"), "--lbls", str(lbls),
                "--out_json", where.format(lbls=lbls))
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.splitlines()  # no traceback
    assert line.startswith("error: ") and expected.format(lbls=lbls) in line, line

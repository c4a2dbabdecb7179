"""The XLA flags reach every way in: the scripts set them, and so does ``import nnunet_jax`` for the Python
API (a V2Predictor or Predictor built from a notebook must get the oneDNN convolutions too)."""

import os
import subprocess
import sys

from nnunet_jax.platform import ONEDNN_FLAG, _jax_version

PROBE = "import os, nnunet_jax; print(os.environ.get('XLA_FLAGS', ''))"


def _flags(code: str, xla_flags: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_sets_the_onednn_flag_where_jax_has_it():
    flags = _flags(PROBE).split()
    assert (ONEDNN_FLAG in flags) == (_jax_version() >= (0, 11))


def test_user_flags_are_kept():
    flags = _flags(PROBE, "--xla_dump_to=/tmp/x").split()
    assert "--xla_dump_to=/tmp/x" in flags
    assert _flags(PROBE, "--xla_cpu_experimental_onednn_custom_call=false").split() == [
        "--xla_cpu_experimental_onednn_custom_call=false"]


def test_no_change_once_jax_has_started():
    """Flags set after JAX started would be a lie: they are read when its backend starts."""
    assert _flags("import jax, os, nnunet_jax; print(os.environ.get('XLA_FLAGS', ''))") == ""

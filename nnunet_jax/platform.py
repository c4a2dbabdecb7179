"""XLA settings that must be in the environment before JAX starts its backends.

Entry points call :func:`configure_xla_flags` before their first ``import jax``. On jax >= 0.11 the oneDNN
convolution custom call makes XLA:CPU convolutions several times faster (DESIGN.md, traps); older jax ignores
the flag, so we only add it where it helps.
"""

from __future__ import annotations

import os
from importlib import metadata

ONEDNN_FLAG = "--xla_cpu_experimental_onednn_custom_call=true"


def _jax_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in metadata.version("jax").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def configure_xla_flags(cpu_devices: int | None = None) -> str:
    """Add our XLA flags to ``XLA_FLAGS`` (keeping the user's) and return the result.

    ``cpu_devices`` simulates that many host devices (tests of data parallelism on a CPU).
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    if _jax_version() >= (0, 11) and not any("onednn_custom_call" in f for f in flags):
        flags.append(ONEDNN_FLAG)
    if cpu_devices and not any("force_host_platform_device_count" in f for f in flags):
        flags.append(f"--xla_force_host_platform_device_count={cpu_devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return os.environ["XLA_FLAGS"]

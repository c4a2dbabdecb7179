"""Test set-up: 8 simulated CPU devices and the fast CPU convolution path, set before JAX is imported."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nnunet_jax.platform import configure_xla_flags  # noqa: E402

configure_xla_flags(cpu_devices=8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

"""nnunet-jax: NVIDIA's nnU-Net recipe for 2D/3D medical image segmentation in JAX/Flax."""

import sys

from nnunet_jax.platform import configure_xla_flags
from nnunet_jax.quiet import quiet_libraries

__version__ = "0.1.0"

if "jax" not in sys.modules:  # the Python API gets the fast CPU convolutions too (read when JAX starts)
    configure_xla_flags()
quiet_libraries()  # the API restores checkpoints with Orbax, which logs WARNING:absl lines on every restore

"""nnunet-jax: NVIDIA's nnU-Net recipe for 2D/3D medical image segmentation in JAX/Flax."""

from nnunet_jax.quiet import quiet_libraries

__version__ = "0.1.0"

quiet_libraries()  # the API restores checkpoints with Orbax, which logs WARNING:absl lines on every restore

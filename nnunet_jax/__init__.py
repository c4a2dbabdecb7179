"""nnunet-jax: NVIDIA's nnU-Net recipe for 2D/3D medical image segmentation in JAX/Flax."""

__version__ = "0.1.0"

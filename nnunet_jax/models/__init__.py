"""Flax networks of nnunet-jax."""

from nnunet_jax.models.unet import UNet, count_params

__all__ = ["UNet", "count_params"]

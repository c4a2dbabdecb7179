"""``python train.py`` in a checkout (installed: ``nnunet-train``): nnunet_jax/cli/train.py."""

from nnunet_jax.cli.train import run

if __name__ == "__main__":
    run()

"""``python -m preprocess`` in a checkout (installed: ``nnunet-preprocess``): nnunet_jax.cli.preprocess."""

from nnunet_jax.cli.preprocess import run

if __name__ == "__main__":  # workers are spawned and re-import this module
    run()

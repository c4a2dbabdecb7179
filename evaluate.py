"""``python evaluate.py`` in a checkout (installed: ``nnunet-evaluate``): nnunet_jax/cli/evaluate.py."""

from nnunet_jax.cli.evaluate import run

if __name__ == "__main__":
    run()

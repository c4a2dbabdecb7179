"""``python visualize.py`` in a checkout (installed: ``nnunet-visualize``): nnunet_jax/cli/visualize.py."""

from nnunet_jax.cli.visualize import run

if __name__ == "__main__":
    run()

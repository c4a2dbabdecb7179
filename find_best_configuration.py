"""``python find_best_configuration.py`` in a checkout (installed: ``nnunet-find-best-configuration``):
nnunet_jax/cli/best_configuration.py."""

from nnunet_jax.cli.best_configuration import run

if __name__ == "__main__":
    run()

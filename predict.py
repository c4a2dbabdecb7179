"""``python predict.py`` in a checkout (installed: ``nnunet-predict``): nnunet_jax/cli/predict.py."""

from nnunet_jax.cli.predict import run

if __name__ == "__main__":
    run()

"""``python -m preprocess.download`` (installed: ``nnunet-download``): see nnunet_jax.datasets.download."""

from nnunet_jax.datasets.download import run

if __name__ == "__main__":
    run()

"""``python -m preprocess.synthetic`` (installed: ``nnunet-synthetic``): see nnunet_jax.datasets.synthetic."""

from nnunet_jax.datasets.synthetic import run

if __name__ == "__main__":
    run()

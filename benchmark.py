"""``python benchmark.py`` in a checkout (installed: ``nnunet-benchmark``): nnunet_jax/cli/benchmark.py."""

from nnunet_jax.cli.benchmark import run

if __name__ == "__main__":
    run()

"""The seed's ``python -m preprocess`` command lines, kept for a checkout; the code is in ``nnunet_jax``.

This folder is not installed (a package named ``preprocess`` in site-packages would clash with others):
installed users run ``nnunet-preprocess``, ``nnunet-synthetic`` and ``nnunet-download``.
"""

"""The 5-fold split of the reference: scikit-learn ``KFold(5, shuffle=True, random_state=12345)``.

Re-implemented on numpy's ``RandomState`` (scikit-learn is not a runtime dependency) so that fold numbers
mean the same cases as in published nnU-Net results; tests/parity checks it against scikit-learn itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def kfold_indices(n: int, n_splits: int = 5, seed: int = 12345) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, val) index arrays per fold, equal to ``KFold(n_splits, shuffle=True, random_state=seed)``."""
    if n < n_splits:
        raise ValueError(f"cannot split {n} cases into {n_splits} folds")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, n // n_splits, dtype=int)
    sizes[: n % n_splits] += 1
    folds = []
    start = 0
    for size in sizes:
        val = order[start : start + size]
        train = np.setdiff1d(np.arange(n), val)  # sorted, as scikit-learn returns it
        folds.append((train, np.sort(val)))
        start += size
    return folds


def split_cases(
    cases: Sequence[str], fold: int, n_splits: int = 5, seed: int = 12345
) -> tuple[list[str], list[str]]:
    """Training and validation case names of ``fold`` over the sorted case list."""
    if not 0 <= fold < n_splits:
        raise ValueError(f"fold {fold} is not in 0..{n_splits - 1}")
    ordered = sorted(cases)
    train, val = kfold_indices(len(ordered), n_splits, seed)[fold]
    return [ordered[i] for i in train], [ordered[i] for i in val]

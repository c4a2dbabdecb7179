"""Fold split vs scikit-learn's KFold itself."""

import numpy as np
import pytest
from sklearn.model_selection import KFold

from nnunet_jax.data.folds import kfold_indices, split_cases


@pytest.mark.parametrize("n", [5, 7, 10, 13, 32, 484])
def test_kfold_matches_sklearn(n):
    ours = kfold_indices(n)
    ref = list(KFold(5, shuffle=True, random_state=12345).split(np.arange(n)))
    assert len(ours) == len(ref)
    for (tr, va), (rtr, rva) in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(tr, rtr)
        np.testing.assert_array_equal(va, np.sort(rva))


def test_split_cases_sorted_and_disjoint():
    cases = [f"case_{i:03d}" for i in range(23)][::-1]
    vals = []
    for fold in range(5):
        train, val = split_cases(cases, fold)
        assert not set(train) & set(val)
        assert sorted(train + val) == sorted(cases)
        vals += val
    assert sorted(vals) == sorted(cases)
    ref = list(KFold(5, shuffle=True, random_state=12345).split(np.arange(23)))
    assert split_cases(cases, 2)[1] == [sorted(cases)[i] for i in sorted(ref[2][1])]


def test_bad_fold():
    with pytest.raises(ValueError, match="fold 5"):
        split_cases(["a", "b", "c", "d", "e"], 5)

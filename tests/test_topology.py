"""The topology rows of docs/reference.md §1."""

import pytest

from nnunet_jax.configs.tasks import TASKS
from nnunet_jax.planning.topology import default_filters, plan_topology


def _plan(task: str, dim: int = 3):
    t = TASKS[task]
    return plan_topology(t.patch(dim), t.spacing(dim))


@pytest.mark.parametrize("task", ["01", "03"])
def test_isotropic_128(task):
    top = _plan(task)
    assert top.kernels == ((3, 3, 3),) * 6
    assert top.strides == ((1, 1, 1),) + ((2, 2, 2),) * 5
    assert top.filters == (32, 64, 128, 256, 320, 320)


def test_task04_3d():
    top = _plan("04")
    assert top.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert top.kernels == ((3, 3, 3),) * 4


def test_task05_prostate_anisotropic():
    top = _plan("05")
    assert top.kernels == ((1, 3, 3), (1, 3, 3)) + ((3, 3, 3),) * 4
    assert top.strides == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))


def test_task09_spleen():
    top = _plan("09")
    assert top.kernels == ((1, 3, 3),) + ((3, 3, 3),) * 5
    assert top.strides == ((1, 1, 1), (1, 2, 2)) + ((2, 2, 2),) * 4


def test_task07_pancreas():
    top = _plan("07")
    assert top.kernels == ((1, 3, 3),) + ((3, 3, 3),) * 5
    assert top.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))


@pytest.mark.parametrize("task", ["01", "02", "03", "05", "06", "07", "08", "09", "10"])
def test_2d_six_levels(task):
    top = _plan(task, dim=2)
    assert top.kernels == ((3, 3),) * 6
    assert top.strides == ((1, 1),) + ((2, 2),) * 5
    assert top.filters == (32, 64, 128, 256, 512, 512)


def test_task04_2d_four_levels():
    top = _plan("04", dim=2)
    assert top.strides == ((1, 1), (2, 2), (2, 2), (2, 2))


def test_filters_cap():
    assert default_filters(6, 3) == [32, 64, 128, 256, 320, 320]
    assert default_filters(6, 2) == [32, 64, 128, 256, 512, 512]


def test_filter_override_length_checked():
    with pytest.raises(ValueError, match="filters"):
        plan_topology((64, 64, 64), (1, 1, 1), filters=(8, 16))


def test_roundtrip_dict():
    top = _plan("05")
    assert type(top).from_dict(top.to_dict()) == top

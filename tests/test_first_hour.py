"""What a new user meets first: a preprocessed ``--data`` folder decides the task, a wrong ``--filters``
says what the plan wants, and the long first step says that it is compiling."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nnunet_jax import parallel
from nnunet_jax.plan import Plan
from nnunet_jax.training import loop
from tests.test_training_utils import ROOT, TOPOLOGY, FakeData, tiny_config


def _plan(task: str, task_name: str = "") -> Plan:
    return Plan.from_dict({"task": task, "task_name": task_name, "dim": 3, "patch_size": [16, 16, 16],
                           "n_class": 2, "in_channels": 1, "topology": TOPOLOGY})


@pytest.mark.parametrize(("given", "ok"), [("", True), ("50", True), ("050", True), ("Task50_Sphere", True),
                                           ("Sphere", True), ("01", False), ("51", False)])
def test_task_names_the_plan_accepts(given, ok):
    assert loop.task_matches(given, _plan("Task50_Sphere", "Sphere")) is ok


def test_contradicting_task_and_wrong_filters_say_what_the_plan_has(tmp_path):
    config = tiny_config(tmp_path, task="01", filters=(4, 8))
    with pytest.raises(loop.TrainingError) as e:
        loop.check_plan(config, _plan("Task50_Sphere"), "here")
    message = str(e.value)
    assert "plan task Task50_Sphere but --task 01" in message
    assert "the plan's U-Net has 3 levels (default filters 4,8,16)" in message


def test_train_py_without_task_takes_the_plans(tmp_path):
    """``--data`` at a preprocessed Task00 folder and no ``--task`` (default 01): the plan decides; the run
    gets as far as the (deliberately wrong) --filters check."""
    from nnunet_jax.datasets.synthetic import generate
    from nnunet_jax.preprocessing.driver import preprocess_dataset

    generate(tmp_path / "data", cases=2, test_cases=0, seed=1)
    out = preprocess_dataset(tmp_path / "data", "00", 3, tmp_path / "pre", progress=False)
    cmd = [sys.executable, "train.py", "--data", str(out), "--results", str(tmp_path / "run"),
           "--filters", "4,8", "--nfolds", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "--task" not in proc.stderr and "levels (default filters" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_first_step_and_first_validation_say_they_compile(tmp_path, capsys):
    config = tiny_config(tmp_path / "run", filters=(4, 8, 16), max_epochs=2)
    loop.train_and_evaluate(config, data=FakeData(parallel.make_mesh(), global_batch=8, steps_per_epoch=2))
    err = capsys.readouterr().err
    assert err.count("compiling the train step…") == 1 and err.count("compiling the train step: done in") == 1
    assert err.count("compiling the sliding window (validation): done in") == 1

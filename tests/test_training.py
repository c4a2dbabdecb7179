"""Data parallelism and the loop: 8 devices = 1 device = 2 processes; convergence, NaN stop, clear errors.

Nets are tiny (3 levels, 4-16 filters, 16³ patches); the 1-device and 2-process runs are subprocesses with
their own XLA_FLAGS (this process has the 8 simulated devices of conftest).
"""

import dataclasses
import json
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from nnunet_jax import checkpoints as checkpoint
from nnunet_jax import parallel
from nnunet_jax.training import loop
from tests.test_training_utils import ROOT, FakeData, run_python, tiny_config

# Three steps of the tiny U-Net on a fixed global batch of 8, then a validation; writes params + numbers.
STEPS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from nnunet_jax import parallel
    from nnunet_jax.losses import make_loss
    from nnunet_jax.inference.forward import make_forward
    from nnunet_jax.labels import LabelSpec
    from nnunet_jax.models.build import build_model
    from nnunet_jax.training import validation, optim, step as step_lib
    from tests.test_training_utils import FakeData, tiny_config

    def run(out):
        c = tiny_config("/unused", filters=(4, 8, 16), learning_rate=1e-2)
        mesh = parallel.make_mesh()
        data = FakeData(mesh, global_batch=8)
        model = build_model(c, data.plan)
        tx = optim.make_optimizer(c)
        state = step_lib.init_state(model, tx, (16, 16, 16, 1), 0, mesh)
        train = step_lib.make_train_step(model, make_loss(), tx, mesh)
        losses = []
        for i, batch in enumerate(data.train_batches(0, 0)):
            state, m = train(state, batch)
            losses.append(float(m["loss"]))
        state, m = train(state, next(data.train_batches(1, 0)))
        losses.append(float(m["loss"]))
        lmesh = parallel.local_mesh()
        validator = validation.Validator(make_forward(model, lmesh), LabelSpec(2), (16, 16, 16), make_loss(),
                                         lmesh)
        v = validator(step_lib.eval_variables(state), data.val_cases, data.load_case)
        if jax.process_index() == 0:
            flat = {jax.tree_util.keystr(k): np.asarray(a.addressable_data(0))
                    for k, a in jax.tree_util.tree_leaves_with_path(state.params)}
            np.savez(out + ".npz", **flat)
            json.dump({"losses": losses, "val": v, "devices": jax.device_count()}, open(out + ".json", "w"))
""")


def _load(prefix):
    return dict(np.load(str(prefix) + ".npz")), json.load(open(str(prefix) + ".json"))


def _assert_same(a, b, rtol=1e-5):
    pa, ja = a
    pb, jb = b
    np.testing.assert_allclose(ja["losses"], jb["losses"], rtol=rtol)
    assert pa.keys() == pb.keys()
    # atol on the scale of all parameters: a cross-process all-reduce sums gradients in another order, and
    # Adam's normalisation turns that float32 rounding into ~1e-7 absolute differences even in near-zero
    # parameters (a norm bias of 1e-4); a data-parallel bug moves parameters by ~lr = 1e-2
    scale = max(float(np.abs(v).max()) for v in pa.values())
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=rtol, atol=rtol * scale, err_msg=k)
    np.testing.assert_allclose(ja["val"]["mean_dice"], jb["val"]["mean_dice"], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "eight"
    ns = {}
    exec(STEPS_SCRIPT, ns)
    ns["run"](str(out))
    return _load(out)


def test_eight_devices_match_one_device(eight_device_run, tmp_path):
    assert eight_device_run[1]["devices"] == 8
    run_python(STEPS_SCRIPT + f"\nrun({str(tmp_path / 'one')!r})\n", devices=1)
    one = _load(tmp_path / "one")
    assert one[1]["devices"] == 1
    _assert_same(eight_device_run, one)
    losses = eight_device_run[1]["losses"]
    assert losses[-1] < losses[0]  # the steps did something


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(eight_device_run, tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        code = (f"from nnunet_jax import parallel\n"
                f"parallel.initialize_distributed('127.0.0.1:{port}', 2, {pid})\n"
                + STEPS_SCRIPT + f"\nrun({str(tmp_path / 'two')!r})\n")
        env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    two = _load(tmp_path / "two")
    assert two[1]["devices"] == 8  # 2 processes x 4 devices in one mesh
    _assert_same(eight_device_run, two)


# ------------------------------------------------------------------------------------------------ the loop


def _mesh():
    return parallel.make_mesh()


@pytest.mark.slow
def test_convergence_on_a_tiny_synthetic_task(tmp_path):
    c = tiny_config(tmp_path, filters=(4, 8, 16), learning_rate=1e-2, min_epochs=10, max_epochs=10)
    summary = loop.train_and_evaluate(c, data=FakeData(_mesh(), global_batch=8, steps_per_epoch=4))
    logs = [json.loads(line) for line in (tmp_path / "logs.json").read_text().splitlines()]
    assert [r["epoch"] for r in logs] == list(range(1, 11))
    first, best = logs[0]["mean_dice"], max(r["mean_dice"] for r in logs)
    assert first < 20 and best > 40 and best > 3 * first, [r["mean_dice"] for r in logs]
    assert summary["TOP_mean"] == pytest.approx(best)
    assert logs[-1]["train_loss"] < logs[0]["train_loss"]
    for key in ("train_loss", "val_loss", "dice", "mean_dice", "TOP_mean", "best_epoch", "lr", "seconds"):
        assert key in logs[-1]
    settings = json.loads((tmp_path / "config.json").read_text())
    assert settings["config"]["learning_rate"] == 1e-2 and settings["identity"]["task"] == "00"

    # exec_mode evaluate: the best checkpoint reproduces the Dice logged at its epoch
    best_rec = max(logs, key=lambda r: r["mean_dice"])
    ev = loop.train_and_evaluate(tiny_config(tmp_path, filters=(4, 8, 16), exec_mode="evaluate"),
                                 data=FakeData(_mesh(), global_batch=8))
    assert ev["epoch"] == best_rec["epoch"]
    assert ev["mean_dice"] == pytest.approx(best_rec["mean_dice"], abs=1e-3)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["mean_dice"] == pytest.approx(ev["mean_dice"])


def test_early_stopping_respects_patience_and_min_epochs(tmp_path):
    # learning rate 0: the Dice never improves after epoch 1, so patience 1 stops at max(min_epochs, 2).
    c = tiny_config(tmp_path, filters=(4, 8, 16), learning_rate=0.0, patience=1, min_epochs=3, max_epochs=10)
    summary = loop.train_and_evaluate(c, data=FakeData(_mesh(), global_batch=8, steps_per_epoch=1))
    assert summary["stopped"] == "early_stopping" and summary["epoch"] == 3
    assert summary["best_epoch"] == 1


class NaNData(FakeData):
    def local_batch(self, epoch, step):
        b = super().local_batch(epoch, step)
        if epoch == 1 and step == 1:
            b["image"][:] = np.nan
        return b


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = tiny_config(tmp_path, filters=(4, 8, 16), max_epochs=3)
    with pytest.raises(loop.NonFiniteLossError, match=r"epoch 2, step 2 .*last good checkpoint"):
        loop.train_and_evaluate(c, data=NaNData(_mesh(), global_batch=8, steps_per_epoch=2))
    meta = checkpoint.read_meta(tmp_path)
    assert meta["epoch"] == 1 and meta["step"] == 2
    # it restores and is finite
    ev = loop.train_and_evaluate(tiny_config(tmp_path, filters=(4, 8, 16), exec_mode="evaluate",
                                             ckpt_path=str(tmp_path / "checkpoints" / "last")),
                                 data=FakeData(_mesh(), global_batch=8))
    assert np.isfinite(ev["val_loss"]) and ev["epoch"] == 1


def test_clear_errors_before_compute(tmp_path):
    # missing preprocessed data
    with pytest.raises(loop.TrainingError, match="no preprocessed dataset.*python -m preprocess"):
        loop.train_and_evaluate(tiny_config(tmp_path / "r", data=str(tmp_path / "nothing")))
    # plan that does not match the flags
    bad = FakeData(_mesh(), global_batch=8)
    bad.plan = dataclasses.replace(bad.plan, dim=2)
    with pytest.raises(loop.TrainingError, match="plan does not match the flags: plan dim 2 but --dim 3"):
        loop.train_and_evaluate(tiny_config(tmp_path / "r"), data=bad)
    # results dir holding another task's checkpoint
    res = tmp_path / "res"
    loop.train_and_evaluate(tiny_config(res, filters=(4, 8, 16), max_epochs=1),
                            data=FakeData(_mesh(), global_batch=8, steps_per_epoch=1))
    other = FakeData(_mesh(), global_batch=8, task="04")
    with pytest.raises(loop.TrainingError, match="checkpoint of task 00 .*not task 04"):
        loop.train_and_evaluate(tiny_config(res, task="04", filters=(4, 8, 16)), data=other)
    # same task, not resuming: refuse to overwrite
    with pytest.raises(loop.TrainingError, match="--resume_training"):
        loop.train_and_evaluate(tiny_config(res, filters=(4, 8, 16)), data=FakeData(_mesh(), global_batch=8))
    # a different model in the same results dir
    with pytest.raises(loop.TrainingError, match="filters"):
        loop.train_and_evaluate(tiny_config(res, filters=(8, 8, 16), resume_training=True),
                                data=FakeData(_mesh(), global_batch=8))


def test_train_py_flags_map_onto_the_config(tmp_path):
    overlay = tmp_path / "overlay.py"
    overlay.write_text("from nnunet_jax.configs.default import get_config as base\n"
                       "def get_config():\n    c = base()\n    c.fold = 3\n    c.momentum = 0.5\n"
                       "    return c\n")
    code = textwrap.dedent(f"""
        import sys, json
        sys.argv = ["train.py", "--learning_rate", "0.02", "--steps", "10,20", "--amp",
                    "--scheduler", "plateau", "--config", {str(overlay)!r}, "--config.patience", "7",
                    "--momentum", "0.9"]
        from nnunet_jax.cli import train
        train.define_flags()
        train.FLAGS(sys.argv)
        c = train.build_config()
        print(json.dumps({{k: c[k] for k in ("learning_rate", "steps", "amp", "scheduler", "fold", "patience",
                                             "momentum", "batch_size", "optimizer", "weight_decay")}}))
    """)
    out = run_python(code).stdout.strip().splitlines()[-1]
    got = json.loads(out)
    assert got == {"learning_rate": 0.02, "steps": [10, 20], "amp": True, "scheduler": "plateau",
                   "fold": 3, "patience": 7, "momentum": 0.9, "batch_size": 2, "optimizer": "radam",
                   "weight_decay": 1e-4}
    proc = run_python("import sys; sys.argv = ['train.py', '--data', '/nonexistent/x', '--results', "
                      f"{str(tmp_path / 'r')!r}, '--task', '04']\nimport runpy; runpy.run_path('train.py', "
                      "run_name='__main__')", check=False)
    assert proc.returncode == 2 and "no preprocessed dataset at /nonexistent/x" in proc.stderr


def test_jax_devices_match_conftest():
    assert jax.device_count() == 8

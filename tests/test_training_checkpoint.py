"""Checkpoints: SIGKILL mid-epoch then --resume_training = the uninterrupted run; a kill mid-save keeps the
previous checkpoint usable; restores come back with the target's structure."""

import json
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nnunet_jax import checkpoints as checkpoint
from nnunet_jax import parallel
from nnunet_jax.models.build import build_model
from nnunet_jax.training import loop
from tests.test_training_utils import FakeData, run_python, tiny_config

RUN = textwrap.dedent("""
    import os, signal
    from nnunet_jax import parallel
    from nnunet_jax.training import loop
    from tests.test_training_utils import FakeData, tiny_config

    class Data(FakeData):
        def local_batch(self, epoch, step):
            if KILL_AT is not None and (epoch, step) == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: as a crash or an OOM kill
            return super().local_batch(epoch, step)

    def run(results, kill_at=None, resume=False):
        global KILL_AT
        KILL_AT = kill_at
        c = tiny_config(results, filters=(4, 8, 16), max_epochs=3, ckpt_every_steps=1, resume_training=resume,
                        scheduler="multistep", steps=(2,), learning_rate=3e-3)
        return loop.train_and_evaluate(c, data=Data(parallel.make_mesh(), global_batch=8, steps_per_epoch=3))
""")


def _final_state(results: Path) -> dict:
    ckpt = results / "checkpoints" / "last"
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    tree = ocp.StandardCheckpointer().restore(ckpt / str(step) / "state")
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _logs(results: Path) -> list[dict]:
    drop = ("seconds", "img_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (results / "logs.json").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    ns: dict = {}
    exec(RUN, ns)
    ns["run"](str(tmp_path / "ref"))  # uninterrupted, in this process (8 devices)

    killed = tmp_path / "killed"
    proc = run_python(RUN + f"\nrun({str(killed)!r}, kill_at=(1, 2))\n", devices=8, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    meta = checkpoint.read_meta(killed)
    assert meta["epoch"] == 1 and meta["step"] in (4, 5)  # mid-epoch 2 (the save of step 5 may be cut)
    assert len(_logs(killed)) == 1
    run_python(RUN + f"\nrun({str(killed)!r}, resume=True)\n", devices=8)

    assert _logs(killed) == _logs(tmp_path / "ref")
    # the host bookkeeping (early stopping, loader position, running loss) is saved beside the arrays
    assert checkpoint.read_meta(killed)["progress"] == checkpoint.read_meta(tmp_path / "ref")["progress"]
    ref, got = _final_state(tmp_path / "ref"), _final_state(killed)
    assert [k for k, _ in ref] == [k for k, _ in got]
    for (path, a), (_, b) in zip(ref, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


ATOMIC = textwrap.dedent("""
    import os, signal
    import jax.numpy as jnp
    from nnunet_jax import checkpoints as checkpoint
    ck = checkpoint.Checkpoints(RESULTS)
    ck.save("last", 1, {"w": jnp.arange(10.0), "n": jnp.int32(1)}, {"epoch": 1})
    ck.wait()
    ck.save("last", 2, {"w": jnp.ones(40_000_000), "n": jnp.int32(2)}, {"epoch": 2})  # ~160 MB, async
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    proc = run_python(f"RESULTS = {str(tmp_path)!r}\n" + ATOMIC, check=False)
    assert proc.returncode == -9
    last = tmp_path / "checkpoints" / "last"
    assert not (last / "2").exists(), "the save finished before the kill: nothing was tested"
    assert checkpoint.read_meta(tmp_path) == {"epoch": 1}
    mesh = parallel.make_mesh()
    sharding = parallel.replicated(mesh)
    target = {"w": jax.ShapeDtypeStruct((10,), jnp.float32, sharding=sharding),
              "n": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)}
    ck = checkpoint.Checkpoints(tmp_path)
    try:
        assert ck.latest_step("last") == 1
        state, meta = ck.restore("last", target)
        np.testing.assert_array_equal(state["w"], np.arange(10.0))
        assert meta == {"epoch": 1} and state["w"].sharding == sharding
        # the directory stays usable: the next save of step 2 succeeds and replaces step 1
        ck.save("last", 2, {"w": jnp.zeros(10), "n": jnp.int32(2)}, {"epoch": 2})
        ck.wait()
        assert ck.latest_step("last") == 2 and int(ck.restore("last", target)[0]["n"]) == 2
    finally:
        ck.close()
    assert not (last / "1").exists()  # one kept


def test_restore_with_target_keeps_namedtuples(tmp_path):
    from nnunet_jax.training import optim
    from nnunet_jax.training import step as step_lib

    c = tiny_config(tmp_path, filters=(4, 8, 16))
    data = FakeData(parallel.make_mesh(), global_batch=8)
    model = build_model(c, data.plan)
    tx = optim.make_optimizer(c)
    mesh = parallel.make_mesh()
    state = step_lib.init_state(model, tx, (16, 16, 16, 1), 3, mesh)
    ck = checkpoint.Checkpoints(tmp_path)
    ck.save("best", 7, state, {"epoch": 1})
    ck.close()
    restored, _ = checkpoint.restore_path(tmp_path, step_lib.abstract_state(model, tx, (16, 16, 16, 1), mesh))
    assert type(restored.opt_state) is type(state.opt_state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    with pytest.raises(FileNotFoundError, match="holds no finished checkpoint"):
        checkpoint.resolve_ckpt_path(tmp_path / "checkpoints" / "last")


def test_progress_meta_round_trip():
    import math

    from nnunet_jax.training.state import Progress

    p = Progress(epoch=3, loader_step=2, best_score=81.5, best_epoch=2, patience=1, plateau_bad=1)
    for loss in (0.7, 0.30000001, 1e-8):
        p.add_loss(np.float32(loss))
    assert p.loader_step == 5 and p.loss_sum == float(np.float32(np.float32(0.7) + np.float32(0.30000001))
                                                      + np.float32(1e-8))
    meta = json.loads(json.dumps(p.to_meta()))  # what the checkpoint's JSON meta holds
    assert meta["plateau_best"] is None and math.isinf(Progress.from_meta(meta).plateau_best)
    assert Progress.from_meta(meta) == p
    p.end_epoch()
    assert (p.epoch, p.loader_step, p.loss_sum) == (4, 0, 0.0)


def test_checkpoint_without_progress_is_refused(tmp_path):
    """A checkpoint of the older layout (bookkeeping inside the arrays) cannot be resumed; say so."""
    from nnunet_jax.training import optim
    from nnunet_jax.training import step as step_lib

    c = tiny_config(tmp_path, filters=(4, 8, 16), resume_training=True)
    data = FakeData(parallel.make_mesh(), global_batch=8)
    model = build_model(c, data.plan)
    mesh = parallel.make_mesh()
    target = step_lib.abstract_state(model, optim.make_optimizer(c, data.steps_per_epoch), (16, 16, 16, 1),
                                     mesh)
    state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), target)
    ck = checkpoint.Checkpoints(tmp_path)
    identity = loop.run_identity(c, data.plan, model.widths)
    ck.save("last", 2, state, {"identity": identity, "epoch": 1, "step": 2})
    ck.close()
    with pytest.raises(loop.TrainingError, match="older version of nnunet-jax.*cannot be resumed"):
        loop.train_and_evaluate(c, data=data)

"""Faults a user meets: a disk that fills up (a failed checkpoint save stops the run at once with one line,
its temp folders removed, ``logs.json`` consistent with the checkpoint kept), a disk too small to start,
files that cannot be written named by path, and the silent surprises (resume with nothing to resume,
blank images, more folds than cases, the channel count of a model's plan)."""

from __future__ import annotations

import errno
import json
import shutil
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nnunet_jax import checkpoints as ckpt_lib
from nnunet_jax import parallel
from nnunet_jax.atomic import write_text
from nnunet_jax.training import loop
from tests.test_training_utils import FakeData, tiny_config

ENOSPC_TEXT = ('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database: Failed to write 507515 bytes to '
               "file 7: No space left on device [os_error_code='28']")


def _fake_data() -> FakeData:
    return FakeData(parallel.make_mesh(), global_batch=8, steps_per_epoch=3)


def _logged_epochs(workdir: Path) -> list[int]:
    return [json.loads(ln)["epoch"] for ln in (workdir / "logs.json").read_text().splitlines()]


def test_failed_save_stops_at_once_with_one_line_and_consistent_files(tmp_path, monkeypatch):
    """The disk fills during epoch 2's save: the run stops there (no epoch 3), epoch 2 is not logged, the
    half-written step is removed, epoch 1's checkpoint is intact, and the resume after freeing space works."""
    real_save = ocp.CheckpointManager.save

    def full_disk_save(self, step, *args, **kwargs):
        if step >= 6:  # epoch 2's checkpoint: Orbax has begun a temp folder when the write fails
            (Path(self.directory) / f"{step}.orbax-checkpoint-tmp-1234").mkdir()
            raise ValueError(ENOSPC_TEXT)
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk_save)
    work = tmp_path / "run"
    config = tiny_config(work, filters=(4, 8, 16), max_epochs=3, min_epochs=3, learning_rate=3e-3)
    with pytest.raises(loop.TrainingError) as e:
        loop.train_and_evaluate(config, data=_fake_data())
    message = str(e.value)
    assert "\n" not in message
    assert f"no space left on {work}" in message
    assert "while saving checkpoints/" in message and "(step 6)" in message
    assert "the previous checkpoint at step 3 (checkpoints/last) is intact" in message
    assert "--resume_training" in message
    assert _logged_epochs(work) == [1]  # no logged epoch without a checkpoint behind it
    assert ckpt_lib.read_meta(work)["epoch"] == 1
    assert not list((work / "checkpoints").glob(f"*/{ckpt_lib.ORBAX_TMP}"))

    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)  # space freed
    config.resume_training = True
    summary = loop.train_and_evaluate(config, data=_fake_data())
    assert summary["epoch"] == 3 and _logged_epochs(work) == [1, 2, 3]


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(loop.TrainingError, match=r"MiB free, but one checkpoint of this model takes about"):
        loop.train_and_evaluate(tiny_config(tmp_path / "run", filters=(4, 8, 16)), data=_fake_data())
    assert not (tmp_path / "run").exists()  # nothing half-made left


def test_write_errors_name_the_file(tmp_path, monkeypatch):
    """A full disk fails write()/rename() with no file name: the error must carry the target's path."""
    import nnunet_jax.atomic as atomic

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", no_space)
    target = tmp_path / "config.json"
    with pytest.raises(OSError) as e:
        write_text("{}", target)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []  # the temp is gone too


def test_log_append_error_names_the_file(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop.os, "fsync", no_space)
    with pytest.raises(OSError) as e:
        loop._append_log(tmp_path / "logs.json", {"epoch": 1})
    assert e.value.filename == str(tmp_path / "logs.json")


def test_resume_without_checkpoint_says_it_starts_from_scratch(tmp_path, capsys):
    config = tiny_config(tmp_path / "run", filters=(4, 8, 16), max_epochs=1, resume_training=True)
    loop.train_and_evaluate(config, data=_fake_data())
    err = capsys.readouterr().err
    assert "--resume_training" in err and "training starts from scratch" in err and str(tmp_path) in err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from nnunet_jax.datasets.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, cases=4, test_cases=0, seed=5)
    return root


def test_fewer_cases_than_folds_is_one_clear_error(synthetic, tmp_path):
    from nnunet_jax.data.dataset import DatasetError, PreprocessedDataset
    from nnunet_jax.preprocessing.driver import preprocess_dataset

    out = preprocess_dataset(synthetic, "00", 3, tmp_path, progress=False)
    ds = PreprocessedDataset.open(out)
    with pytest.raises(DatasetError, match=r"4 training cases cannot be split into 5 folds; pass --nfolds 4"):
        ds.fold(0, 5)
    assert len(ds.fold(0, 4)[1]) == 1
    config = tiny_config(tmp_path / "run", data=str(out), dim=3)
    with pytest.raises(loop.TrainingError, match="cannot be split into 5 folds"):
        loop.train_and_evaluate(config)


def test_blank_image_is_warned_naming_the_case(synthetic, tmp_path, capsys):
    from nnunet_jax.preprocessing.driver import preprocess_dataset

    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    image = sorted((data / "Task00_Synthetic" / "imagesTr").glob("*.nii.gz"))[1]
    nii = nib.load(str(image))
    nib.save(nib.Nifti1Image(np.zeros(nii.shape, np.float32), nii.affine), str(image))
    preprocess_dataset(data, "00", 3, tmp_path / "results", progress=False)
    err = capsys.readouterr().err
    case = image.name.removesuffix(".nii.gz")
    assert f"warning: case '{case}'" in err and "image channel 0 is constant (every voxel 0)" in err
    assert "foreground voxels the network cannot see" in err
    assert err.count("warning:") == nii.shape[3] if len(nii.shape) == 4 else 1


def test_predict_channel_mismatch_blames_the_models_plan(tmp_path):
    import jax.numpy as jnp

    from nnunet_jax.inference.predictor import Predictor
    from nnunet_jax.io import DatasetError
    from tests.test_predict import _one_hot_of_input, _plan, _write_case

    img, *_ = _write_case(tmp_path, "c", (20, 18, 16), (1.0, 1.0, 1.0))
    predictor = Predictor(_plan((1.0, 1.0, 1.0), in_channels=2), _one_hot_of_input,
                          [{"scale": jnp.float32(1.0)}])
    with pytest.raises(DatasetError) as e:
        predictor.predict(img)
    assert "the model's plan" in str(e.value) and "dataset.json" not in str(e.value)

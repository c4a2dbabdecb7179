"""nnU-Net v2 checkpoints and model folders without torch (nnunet_jax.interop.nnunetv2.checkpoint): the
errors a user meets, globals outside the allow-list staying inert, and v2's fold rules. The zips are built
by hand here, in torch's layout (``<archive>/data.pkl`` + ``<archive>/data/<key>``); tests/parity/ checks
files torch itself writes."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nnunet_jax.interop.nnunetv2.checkpoint import (
    Placeholder,
    load_pth,
    model_folds,
    parse_model_dir_name,
    read_checkpoint,
)
from nnunet_jax.io import DatasetError


def _zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None, prefix: str = "archive/",
         byteorder: bytes | None = b"little") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}data.pkl", data_pkl)
        if byteorder is not None:
            z.writestr(f"{prefix}byteorder", byteorder)
        for key, raw in (records or {}).items():
            z.writestr(f"{prefix}data/{key}", raw)
    return path


def _tensor_op(key: str, storage: str, numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    """The opcodes torch writes for one tensor (``_rebuild_tensor_v2`` over a persistent storage id), in
    pickle's text forms so that no torch is needed to produce them."""
    ints = lambda xs: b"(" + b"".join(b"I%d\n" % x for x in xs) + b"t"  # noqa: E731
    return (b"ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(Vstorage\nctorch\n" + storage.encode() + b"\nV" + key.encode() + b"\nVcpu\nI%d\ntQ" % numel
            + b"I%d\n" % offset + ints(size) + ints(stride) + b"I00\nccollections\nOrderedDict\n)Rt" + b"R")


def _dict_pkl(entries: dict[str, bytes]) -> bytes:
    """A pickled dict whose values are given as opcodes."""
    body = b"".join(b"V" + k.encode() + b"\n" + v + b"s" for k, v in entries.items())
    return b"\x80\x02}" + body + b"."


def _checkpoint_pkl(weights: dict[str, bytes], **extra: object) -> bytes:
    """v2's checkpoint dict with hand-written tensor opcodes as ``network_weights``; the other values are
    pickled one by one (each fragment only refers to its own memo entries)."""
    inner = b"ccollections\nOrderedDict\n)R" + b"".join(
        b"V" + k.encode() + b"\n" + v + b"s" for k, v in weights.items())
    rest = {k: pickle.dumps(v, protocol=2)[2:-1] for k, v in extra.items()}
    return _dict_pkl({"network_weights": inner, **rest})


# -- what goes wrong with a file


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found") as e:
        read_checkpoint(tmp_path / "fold_0" / "checkpoint_final.pth")
    assert "checkpoint_final.pth" in str(e.value)


def test_not_a_zip(tmp_path):
    p = tmp_path / "checkpoint_final.pth"
    p.write_bytes(b"<html>404</html>")
    with pytest.raises(DatasetError, match="not a zip archive.*truncated") as e:
        read_checkpoint(p)
    assert str(p) in str(e.value)


def test_truncated_zip(tmp_path):
    good = _zip(tmp_path / "good.pth", pickle.dumps({"network_weights": {}}, protocol=2))
    p = tmp_path / "checkpoint_final.pth"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DatasetError, match="not a zip archive"):
        read_checkpoint(p)


def test_legacy_torch_format(tmp_path):
    p = tmp_path / "checkpoint_final.pth"
    p.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
    with pytest.raises(DatasetError, match=r"legacy format.*torch\.save\(torch\.load"):
        read_checkpoint(p)


def test_zip_without_data_pkl(tmp_path):
    p = tmp_path / "checkpoint_final.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/constants.pkl", b"")
    with pytest.raises(DatasetError, match="without data.pkl") as e:
        read_checkpoint(p)
    assert str(p) in str(e.value)


def test_missing_network_weights(tmp_path):
    p = _zip(tmp_path / "c.pth", pickle.dumps({"trainer_name": "nnUNetTrainer"}, protocol=2))
    with pytest.raises(DatasetError, match="no 'network_weights'.*trainer_name"):
        read_checkpoint(p)


def test_weight_that_is_not_a_tensor(tmp_path):
    p = _zip(tmp_path / "c.pth", pickle.dumps({"network_weights": {"conv.weight": "oops"}}, protocol=2))
    with pytest.raises(DatasetError, match=r"network_weights\['conv.weight'\].*not a tensor") as e:
        read_checkpoint(p)
    assert str(p) in str(e.value)


def test_missing_storage_record_and_truncated_storage(tmp_path):
    op = _tensor_op("0", "FloatStorage", 4, 0, (2, 2), (2, 1))
    p = _zip(tmp_path / "missing.pth", _checkpoint_pkl({"w": op}))
    with pytest.raises(DatasetError, match="data/0 is missing"):
        read_checkpoint(p)
    p = _zip(tmp_path / "short.pth", _checkpoint_pkl({"w": op}), {"0": b"\0" * 12})
    with pytest.raises(DatasetError, match="holds 12 bytes"):
        read_checkpoint(p)


def test_layout_past_the_storage_is_refused(tmp_path):
    """A size/stride reaching past the storage must not read memory beyond it."""
    op = _tensor_op("0", "FloatStorage", 4, 1, (2, 2), (2, 1))  # last element index 1 + 2 + 1 = 4 ≥ 4
    p = _zip(tmp_path / "c.pth", _checkpoint_pkl({"w": op}), {"0": np.arange(4, dtype="<f4").tobytes()})
    with pytest.raises(DatasetError, match="runs past its 4 elements"):
        read_checkpoint(p)


# -- what is read


def test_hand_written_checkpoint(tmp_path):
    """Tensors by storage, offset, size and stride (views share storage 0), and v2's other fields."""
    data = np.arange(12, dtype="<f4")
    ops = {"a": _tensor_op("0", "FloatStorage", 12, 0, (3, 4), (4, 1)),
           "a.T": _tensor_op("0", "FloatStorage", 12, 0, (4, 3), (1, 4)),
           "a.tail": _tensor_op("0", "FloatStorage", 12, 5, (2, 3), (1, 2)),
           "n": _tensor_op("1", "LongStorage", 2, 0, (2,), (1,))}
    pkl = _checkpoint_pkl(ops, trainer_name="nnUNetTrainer_5epochs", inference_allowed_mirroring_axes=(0, 1),
                          init_args={"configuration": "2d", "fold": "all", "plans": {}, "dataset_json": {}})
    p = _zip(tmp_path / "c.pth", pkl, {"0": data.tobytes(), "1": np.array([-1, 7], "<i8").tobytes()})
    ck = read_checkpoint(p)
    a = data.reshape(3, 4)
    np.testing.assert_array_equal(ck.network_weights["a"], a)
    np.testing.assert_array_equal(ck.network_weights["a.T"], a.T)
    np.testing.assert_array_equal(ck.network_weights["a.tail"],
                                  np.lib.stride_tricks.as_strided(data[5:], (2, 3), (4, 8)))
    assert ck.network_weights["n"].dtype == np.int64 and ck.network_weights["n"].tolist() == [-1, 7]
    assert (ck.trainer_name, ck.configuration, ck.fold, ck.mirror_axes) == ("nnUNetTrainer_5epochs", "2d",
                                                                           "all", (0, 1))
    assert ck.path == p


def test_big_endian_and_bf16(tmp_path):
    ops = {"f": _tensor_op("0", "FloatStorage", 3, 0, (3,), (1,)),
           "b": _tensor_op("1", "BFloat16Storage", 2, 0, (2,), (1,))}
    f = np.array([1.5, -2.0, 3.25], ">f4")
    b = (np.array([1.0, -0.5], "<f4").view("<u4") >> 16).astype(">u2")  # bf16 = the high half of fp32
    p = _zip(tmp_path / "c.pth", _checkpoint_pkl(ops), {"0": f.tobytes(), "1": b.tobytes()}, byteorder=b"big")
    w = read_checkpoint(p).network_weights
    assert w["f"].dtype == np.float32 and w["f"].tolist() == [1.5, -2.0, 3.25]
    assert w["b"].dtype == np.float32 and w["b"].tolist() == [1.0, -0.5]


def test_mirror_axes_absent_is_none(tmp_path):
    p = _zip(tmp_path / "c.pth", _checkpoint_pkl({}, trainer_name="T"))
    ck = read_checkpoint(p)
    assert ck.mirror_axes is None and ck.configuration is None and ck.network_weights == {}


# -- nothing from the file runs


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvilEval:
    def __reduce__(self):
        return eval, ("__import__('os').getpid()",)


def test_forbidden_globals_become_inert_placeholders(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"network_weights": {}, "x": _Evil(marker), "y": _EvilEval(), "trainer_name": "nnUNetTrainer"}
    p = _zip(tmp_path / "c.pth", pickle.dumps(payload, protocol=2))
    got = load_pth(p)
    assert not marker.exists()
    assert isinstance(got["x"], Placeholder) and got["x"].module == os.system.__module__
    assert got["x"].name == "system" and got["x"].args == (f"touch {marker}",)
    assert isinstance(got["y"], Placeholder) and got["y"].name == "eval"
    assert read_checkpoint(p).trainer_name == "nnUNetTrainer"  # the rest of the file still reads
    assert not marker.exists()


def test_forbidden_global_as_a_weight_is_an_error(tmp_path):
    marker = tmp_path / "pwned"
    p = _zip(tmp_path / "c.pth", pickle.dumps({"network_weights": {"w": _Evil(marker)}}, protocol=2))
    with pytest.raises(DatasetError, match=r"network_weights\['w'\].*placeholder.*not a tensor"):
        read_checkpoint(p)
    assert not marker.exists()


def test_bytes_only_through_latin1(tmp_path):
    """Protocol 2 writes bytes as ``_codecs.encode(str, 'latin1')``; another codec is refused."""
    p = _zip(tmp_path / "ok.pth", pickle.dumps({"network_weights": {}, "b": b"\x00\xff"}, protocol=2))
    assert load_pth(p)["b"] == b"\x00\xff"
    bad = b"\x80\x02}Vb\nc_codecs\nencode\n(Vx\nVrot13\ntRs."
    with pytest.raises(DatasetError, match="latin1"):
        load_pth(_zip(tmp_path / "bad.pth", bad))


# -- model folders


def _model_dir(root: Path, name: str = "nnUNetTrainer__nnUNetPlans__3d_fullres") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "dataset.json").write_text(json.dumps({"labels": {"background": 0}}))
    (d / "plans.json").write_text(json.dumps({"configurations": {}}))
    for fold, ck in (("fold_0", True), ("fold_1", True), ("fold_2", False), ("fold_10", True),
                     ("fold_all", True), ("fold_x", True)):
        (d / fold).mkdir()
        if ck:
            (d / fold / "checkpoint_final.pth").write_bytes(b"")
    (d / "fold_1" / "checkpoint_best.pth").write_bytes(b"")
    (d / "fold_3").write_text("a file, not a fold folder")
    return d


def test_model_folds_default_all_and_explicit(tmp_path):
    d = _model_dir(tmp_path)
    assert model_folds(d) == [(f, d / f"fold_{f}" / "checkpoint_final.pth") for f in ("0", "1", "10")]
    assert model_folds(d, "all") == [("all", d / "fold_all" / "checkpoint_final.pth")]
    assert model_folds(d, ["all"]) == model_folds(d, "all")
    assert [f for f, _ in model_folds(d, (1, "0"))] == ["1", "0"]  # v2's -f gives strings
    assert model_folds(d, 10) == [("10", d / "fold_10" / "checkpoint_final.pth")]
    assert model_folds(d, None, "checkpoint_best.pth") == [("1", d / "fold_1" / "checkpoint_best.pth")]


def test_model_folds_errors(tmp_path):
    d = _model_dir(tmp_path)
    with pytest.raises(DatasetError, match="fold_2/checkpoint_final.pth: not found.*'0', '1', '10', 'all'"):
        model_folds(d, [0, 2])
    with pytest.raises(DatasetError, match=r"fold_5.*fold folders: \['fold_0', 'fold_1', 'fold_2'"):
        model_folds(d, [5])
    with pytest.raises(DatasetError, match="neither a fold number nor 'all'"):
        model_folds(d, ["x"])
    with pytest.raises(DatasetError, match="no fold_<k>/checkpoint_latest.pth"):
        model_folds(d, None, "checkpoint_latest.pth")
    (d / "plans.json").unlink()
    with pytest.raises(DatasetError, match="no plans.json") as e:
        model_folds(d)
    assert str(d / "plans.json") in str(e.value)
    (d / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="no dataset.json"):
        model_folds(d)
    with pytest.raises(DatasetError, match="model folder not found"):
        model_folds(tmp_path / "nope")


def test_parse_model_dir_name(tmp_path):
    assert parse_model_dir_name(tmp_path / "nnUNetTrainer__nnUNetResEncUNetMPlans__3d_lowres") == (
        "nnUNetTrainer", "nnUNetResEncUNetMPlans", "3d_lowres")
    assert parse_model_dir_name("results/D/nnUNetTrainer_5epochs__nnUNetPlans__2d/") == (
        "nnUNetTrainer_5epochs", "nnUNetPlans", "2d")
    for bad in ("nnUNetTrainer__nnUNetPlans", "a__b__c__d", "__nnUNetPlans__2d", "fold_0"):
        with pytest.raises(DatasetError, match="<Trainer>__<Plans>__<configuration>"):
            parse_model_dir_name(bad)

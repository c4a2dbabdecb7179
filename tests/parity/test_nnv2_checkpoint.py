"""Our torch-free ``.pth`` reader (nnunet_jax.interop.nnunetv2.checkpoint) against files torch 2.x writes.

The main file is shaped as ``nnUNetTrainer.save_checkpoint`` (nnunetv2 2.8.1) writes it: a real
dynamic_network_architectures ``PlainConvUNet`` state dict, v2's SGD (momentum 0.99, nesterov) after one step,
a ``GradScaler`` state, v2's logger lists with numpy floats, ``init_args`` with a ``torch.device``. A second
file holds the layouts and dtypes a state dict may have (fp16, bf16, int64, bool, transposed, storage-sharing
views, stride-0 expands, uint16 through ``_rebuild_tensor_v3``, ``nn.Parameter``/``nn.Buffer``). Every array
must be bit-equal to ``tensor.numpy()``; one read runs in a subprocess where ``import torch`` fails.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")

from nnunet_jax.interop.nnunetv2.checkpoint import load_pth, read_checkpoint  # noqa: E402
from nnunet_jax.io import DatasetError  # noqa: E402

pytestmark = pytest.mark.parity

ROOT = Path(__file__).resolve().parents[2]


def _v2_checkpoint() -> dict:
    """A checkpoint dict with the keys and value types of nnUNetTrainer.save_checkpoint."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d,
                        kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                        n_conv_per_stage=[2, 2, 2], num_classes=3, n_conv_per_stage_decoder=[1, 1],
                        conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}, deep_supervision=False)
    opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cpu")
    loss = net(torch.randn(2, 1, 4, 8, 8)).square().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    t0 = time.time()
    logging = {"mean_fg_dice": [np.float64(0.5), np.float64(0.625)], "ema_fg_dice": [np.float64(0.5), 0.5125],
               "dice_per_class_or_region": [[0.25, np.float64(0.75)], [0.5, 0.75]],
               "train_losses": [np.float32(-0.25), np.float64(-0.5)], "val_losses": [0.1, -0.2],
               "lrs": [0.01, 0.00999], "epoch_start_timestamps": [t0, t0 + 10],
               "epoch_end_timestamps": [t0 + 9.5, t0 + 19.25]}
    plans = {"dataset_name": "Dataset901_TinyCT", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "configurations": {"3d_fullres": {"patch_size": [4, 8, 8], "spacing": [3.0, 1.0, 1.0]}}}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
                    "numTraining": 4, "file_ending": ".nii.gz"}
    return {
        "network_weights": net.state_dict(),
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": scaler.state_dict(),
        "logging": logging,
        "_best_ema": np.float64(0.5125),
        "current_epoch": 2,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json,
                      "device": torch.device("cuda")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def _layouts() -> dict:
    """Dtypes and layouts beyond fp32: views of one storage, non-contiguous, odd dtypes, odd classes."""
    torch.manual_seed(1)
    base = torch.randn(4, 6)
    base[0, 0], base[0, 1], base[0, 2] = float("nan"), float("-inf"), -0.0
    return {
        "f16": torch.randn(3, 5).half(), "bf16": torch.randn(2, 7).bfloat16(), "f64": torch.randn(3).double(),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(6, dtype=torch.int32), "u8": torch.arange(250, 256, dtype=torch.uint8),
        "i8": torch.tensor([-128, 5], dtype=torch.int8), "bool": torch.tensor([[True, False, True]]),
        "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),  # _rebuild_tensor_v3 + UntypedStorage
        "base": base, "row": base[1], "col": base[:, 2], "T": base.t(), "strided": base[1:3, ::2],
        "tail": base.view(-1)[5:], "conv_T": torch.randn(2, 3, 2, 2, 2).permute(1, 0, 4, 3, 2),
        "expand": torch.arange(3.0).reshape(3, 1).expand(3, 4), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(torch.randn(2, 2)),
        "buffer": torch.nn.Buffer(torch.randn(3)), "bf16_view": torch.randn(4, 4).bfloat16()[1:, 2],
        "device": torch.device("cuda", 1), "size": torch.Size([2, 3]),
        "when": datetime.datetime(2024, 5, 1, 12),
        "set": {1, 2}, "np": np.arange(4, dtype=np.int16), "bytes": b"\x00\xff",
    }


def _same(ours, theirs, where="") -> None:
    """Recursive equality; tensors bit for bit (dtype, shape, bytes), bf16 via .float()."""
    if isinstance(theirs, torch.Tensor):
        ref = (theirs.detach().float() if theirs.dtype == torch.bfloat16 else theirs.detach()).numpy()
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, (where, ours.dtype, ref.dtype, ours.shape)
        assert ours.tobytes() == np.ascontiguousarray(ref).tobytes(), where
    elif isinstance(theirs, torch.device):
        assert ours == str(theirs), where
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        for k in theirs:
            _same(ours[k], theirs[k], f"{where}[{k!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is (tuple if isinstance(theirs, torch.Size) else type(theirs)), where
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, (np.generic, np.ndarray)):
        assert type(ours) is type(theirs) and ours.dtype == theirs.dtype, where
        assert np.asarray(ours).tobytes() == np.asarray(theirs).tobytes(), where
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnv2_ckpt")
    ck, lay = _v2_checkpoint(), _layouts()
    torch.save(ck, root / "checkpoint_final.pth")
    torch.save(lay, root / "layouts.pth")
    return root, ck, lay


def test_v2_checkpoint_reads_as_torch_wrote_it(files):
    root, ck, _ = files
    _same(load_pth(root / "checkpoint_final.pth"), ck)
    got = read_checkpoint(root / "checkpoint_final.pth")
    assert got.trainer_name == "nnUNetTrainer" and got.configuration == "3d_fullres" and got.fold == 0
    assert got.mirror_axes == (0, 1, 2) and got.path == root / "checkpoint_final.pth"
    assert list(got.network_weights) == list(ck["network_weights"])
    for k, t in ck["network_weights"].items():
        _same(got.network_weights[k], t, k)


def test_dtypes_layouts_and_shared_storages(files):
    root, _, lay = files
    with zipfile.ZipFile(root / "layouts.pth") as z:
        records = [n for n in z.namelist() if "/data/" in n]
    assert len(records) < len([v for v in lay.values() if isinstance(v, torch.Tensor)])  # views share
    ours = load_pth(root / "layouts.pth")
    _same(ours, lay)
    assert ours["bf16"].dtype == np.float32 and ours["T"].flags.c_contiguous
    assert ours["row"] is not ours["base"] and not np.shares_memory(ours["row"], ours["base"])


def test_big_endian_byteorder_record(files, tmp_path):
    """A file from a big-endian machine: byteorder 'big' and every element byte-swapped."""
    small = {"f": torch.randn(2, 3), "h": torch.randn(4).half(), "b": torch.randn(3).bfloat16(),
             "l": torch.arange(5) - 2, "flag": torch.tensor([True, False])}
    src, dst = tmp_path / "little.pth", tmp_path / "big.pth"
    torch.save(small, src)
    sizes = {str(i): t.element_size() for i, t in enumerate(small.values())}  # keys: order of appearance
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                size = sizes[info.filename.rsplit("/", 1)[1]]
                data = np.frombuffer(data, f"<u{size}").astype(f">u{size}").tobytes() if size > 1 else data
            zout.writestr(info, data)
    _same(load_pth(dst), small)


def test_read_without_torch(files):
    """The reader in a fresh interpreter in which ``import torch`` fails: same digests as torch's tensors."""
    root, ck, _ = files
    code = (
        "import sys, json, hashlib; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from nnunet_jax.interop.nnunetv2.checkpoint import read_checkpoint, load_pth\n"
        f"ck = read_checkpoint({str(root / 'checkpoint_final.pth')!r})\n"
        f"lay = load_pth({str(root / 'layouts.pth')!r})\n"
        "w = {k: [str(v.dtype), list(v.shape), hashlib.sha256(v.tobytes()).hexdigest()]\n"
        "     for k, v in {**ck.network_weights,\n"
        "                  **{'lay.' + k: v for k, v in lay.items() if isinstance(v, np.ndarray)}}.items()}\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "print(json.dumps({'w': w, 'meta': [ck.trainer_name, ck.configuration, ck.fold, ck.mirror_axes]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["meta"] == ["nnUNetTrainer", "3d_fullres", 0, [0, 1, 2]]
    tensors = {**ck["network_weights"],
               **{"lay." + k: v for k, v in files[2].items() if isinstance(v, torch.Tensor)}}
    tensors["lay.np"] = files[2]["np"]
    assert set(got["w"]) == set(tensors)
    for k, t in tensors.items():
        ref = t if isinstance(t, np.ndarray) else (t.detach().float() if t.dtype == torch.bfloat16
                                                   else t.detach()).numpy()
        ref = np.array(ref, order="C")
        assert got["w"][k] == [str(ref.dtype), list(ref.shape), hashlib.sha256(ref.tobytes()).hexdigest()], k


def test_legacy_format_says_how_to_convert(tmp_path):
    p = tmp_path / "old.pth"
    torch.save({"network_weights": {"w": torch.ones(2)}}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(DatasetError, match=r"legacy.*torch\.save\(torch\.load") as e:
        read_checkpoint(p)
    assert str(p) in str(e.value)

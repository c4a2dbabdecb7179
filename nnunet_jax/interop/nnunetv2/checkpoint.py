"""nnU-Net v2 checkpoints (``fold_k/checkpoint_final.pth``) and model folders, read without torch.

    model = "results/Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres"
    ck = read_checkpoint(f"{model}/fold_0/checkpoint_final.pth")
    ck.network_weights["encoder.stages.0.0.convs.0.conv.weight"]      # a numpy array, as tensor.numpy()
    model_folds(model)                                 # [("0", <model>/fold_0/checkpoint_final.pth), ...]

v2 writes its checkpoints with ``torch.save`` (docs/nnunetv2.md §1), in torch's zip format (the default since
torch 1.6): ``<archive>/data.pkl`` is a pickle whose tensors refer, by persistent id
``('storage', storage_type, key, location, numel)``, to raw little-endian bytes in ``<archive>/data/<key>``
(``<archive>/byteorder`` says otherwise). :func:`load_pth` unpickles it with an allow-list: only the few
globals a checkpoint needs (tensor rebuilding, storage and dtype names, ``OrderedDict``, ``torch.device``,
numpy scalars and arrays, ``datetime``, a few builtins) are honoured, by our own reimplementations or by
harmless constructors; every other global becomes an inert :class:`Placeholder` that records its arguments.
**No module is imported and nothing outside that list is called**, so loading a checkpoint cannot run code
from it (unlike ``torch.load(weights_only=False)``, which v2 itself uses). Tensors become numpy arrays with
torch's size, stride and storage offset (views of one storage each get their own copy); bf16 → float32.
"""

from __future__ import annotations

import datetime
import io
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_jax.io import DatasetError

__all__ = ["Placeholder", "TorchDtype", "V2Checkpoint", "load_pth", "model_folds", "parse_model_dir_name",
           "read_checkpoint"]


# -- the inert stand-in for every global the allow-list does not name


class Placeholder:
    """What a global outside the allow-list becomes: its class (one per ``module.name``) and instances only
    record the arguments and state pickle hands them. The named object is never imported or called."""

    module: str = "?"
    name: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the arguments were kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # a placeholder standing for a list or dict subclass receives its items through these
    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Iterable[Any]) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def __repr__(self) -> str:
        return f"<placeholder for {self.module}.{self.name}, not loaded>"


def _placeholder_class(module: str, name: str) -> type[Placeholder]:
    """A fresh Placeholder subclass naming ``module.name`` (a class, so pickle's NEWOBJ/REDUCE/BUILD work)."""
    return type("Placeholder", (Placeholder,), {"module": module, "name": name})


# -- storages, dtypes and tensor rebuilding (our stand-ins for torch's)


@dataclass(frozen=True)
class _StorageType:
    """A torch storage class named in the pickle, e.g. ``torch.FloatStorage``; ``dtype`` None: unsupported."""

    name: str
    dtype: str | None  # a numpy dtype string, "bfloat16", or None (quantized storages)


@dataclass(frozen=True)
class TorchDtype:
    """A ``torch.<dtype>`` global (``_rebuild_tensor_v3`` names the dtype of an untyped storage this way)."""

    name: str
    np_dtype: str | None  # None: no numpy equivalent (float8 ...)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_STORAGE_DTYPES: dict[str, str | None] = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?", "ComplexDoubleStorage": "c16", "ComplexFloatStorage": "c8",
    "UntypedStorage": "u1", "TypedStorage": "u1",
    "QInt8Storage": None, "QUInt8Storage": None, "QInt32Storage": None, "QUInt4x2Storage": None,
    "QUInt2x4Storage": None,
}

_TORCH_DTYPES: dict[str, str | None] = {
    "float64": "f8", "double": "f8", "float32": "f4", "float": "f4", "float16": "f2", "half": "f2",
    "bfloat16": "bfloat16", "int64": "i8", "long": "i8", "int32": "i4", "int": "i4", "int16": "i2",
    "short": "i2", "int8": "i1", "uint8": "u1", "uint16": "u2", "uint32": "u4", "uint64": "u8", "bool": "?",
    "complex128": "c16", "cdouble": "c16", "complex64": "c8", "cfloat": "c8",
    "float8_e4m3fn": None, "float8_e5m2": None, "float8_e4m3fnuz": None, "float8_e5m2fnuz": None,
}


class _Storage:
    """One ``data/<key>`` record: its raw bytes (read-only) and the element type it was saved with."""

    def __init__(self, raw: np.ndarray, dtype: str | None, key: str, big_endian: bool):
        self.raw, self.dtype, self.key, self.big_endian = raw, dtype, key, big_endian


def _stored_dtype(dtype: str, big_endian: bool) -> np.dtype:
    """The on-disk element dtype (bf16 read as uint16 bits) in the file's byte order."""
    dt = np.dtype("u2" if dtype == "bfloat16" else dtype)
    return dt.newbyteorder(">" if big_endian else "<") if dt.itemsize > 1 else dt


def _to_array(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> Any:
    """``storage`` viewed as torch would (elements of ``dtype`` from ``offset``, ``size``, ``stride``) and
    copied into a native-order numpy array; bf16 → float32. Bounds are checked before any view is made."""
    if not isinstance(storage, _Storage) or dtype is None:
        return _placeholder_class("torch._utils", "_rebuild_tensor (unsupported storage or dtype)")(
            storage, offset, size, stride, dtype)
    size, stride = tuple(size), tuple(stride)
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, *size, *stride))
    if not ints or len(size) != len(stride):
        raise pickle.UnpicklingError(f"storage {storage.key}: bad tensor layout offset={offset!r} "
                                     f"size={size!r} stride={stride!r}")
    stored = _stored_dtype(dtype, storage.big_endian)
    n = storage.raw.size // stored.itemsize
    elems = storage.raw[: n * stored.itemsize].view(stored)
    if 0 in size:
        out = np.empty(size, stored)
    else:
        last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
        if last >= n:
            raise pickle.UnpicklingError(f"storage {storage.key}: a tensor of size {size}, stride {stride} "
                                         f"at offset {offset} runs past its {n} elements (truncated?)")
        view = np.lib.stride_tricks.as_strided(elems[offset:], shape=size,
                                               strides=tuple(st * stored.itemsize for st in stride),
                                               writeable=False)
        out = np.array(view, order="C")  # an own, C-ordered copy, whatever the layout in the file
    out = out.astype(out.dtype.newbyteorder("="), copy=False)
    if dtype == "bfloat16":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Any:
    return _to_array(storage, storage_offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> Any:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> Any:
    """torch ≥ 2.3 writes dtypes without a typed storage class (uint16/32/64, float8) this way: an untyped
    byte storage plus the dtype; the offset counts elements of that dtype."""
    np_dtype = dtype.np_dtype if isinstance(dtype, TorchDtype) else None
    if isinstance(storage, _Storage) and storage.dtype != "u1":
        raise pickle.UnpicklingError(f"storage {storage.key}: _rebuild_tensor_v3 expects an untyped storage")
    return _to_array(storage, storage_offset, size, stride, np_dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> Any:
    return data  # an nn.Parameter is its tensor for us


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """A tensor subclass (e.g. ``nn.Buffer``): rebuild the plain tensor with our own rebuild function only."""
    if func in _REBUILDERS:
        return func(*args)
    return _placeholder_class("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _torch_device(kind: Any, index: Any = None) -> str:
    """``torch.device('cuda', 0)`` → ``'cuda:0'``: the string torch itself accepts."""
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise pickle.UnpicklingError(f"bad torch.device arguments {kind!r}, {index!r}")
    return kind if index is None else f"{kind}:{index}"


def _torch_size(dims: Any = ()) -> tuple:
    return tuple(int(d) for d in dims)


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode``: how pickle protocol 2 (torch's default) stores every ``bytes`` object, always as
    ``encode(str, 'latin1')``; only that form is honoured."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1",):
        raise pickle.UnpicklingError(f"only _codecs.encode(str, 'latin1') is allowed, not {encoding!r}")
    return text.encode("latin1", errors)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """numpy's own reconstructors, found from numpy's pickles (so it works with numpy 1 and 2 without
    importing the deprecated ``numpy.core``), under both module names a pickle may use."""
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    found = {"_reconstruct": np.zeros(1).__reduce__()[0], "scalar": np.float32(0).__reduce__()[0],
             "_frombuffer": np.zeros(1).__reduce_ex__(5)[0]}
    for name, fn in found.items():
        sub = "numeric" if name == "_frombuffer" else "multiarray"
        for pkg in ("numpy.core", "numpy._core"):
            out[(f"{pkg}.{sub}", name)] = fn
    return out


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) → what it becomes. Only these are ever honoured."""
    out: dict[tuple[str, str], Any] = {}
    for name, fn in (("_rebuild_tensor", _rebuild_tensor), ("_rebuild_tensor_v2", _rebuild_tensor_v2),
                     ("_rebuild_tensor_v3", _rebuild_tensor_v3), ("_rebuild_parameter", _rebuild_parameter),
                     ("_rebuild_parameter_with_state", _rebuild_parameter)):
        out[("torch._utils", name)] = fn
    out[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2
    for name, dtype in _STORAGE_DTYPES.items():
        for mod in ("torch", "torch.storage", "torch.cuda"):
            out[(mod, name)] = _StorageType(name, dtype)
    for name, dtype in _TORCH_DTYPES.items():
        out[("torch", name)] = TorchDtype(name, dtype)
    out[("torch", "device")] = _torch_device
    out[("torch", "Size")] = _torch_size
    out[("collections", "OrderedDict")] = OrderedDict
    for name in ("datetime", "date", "time", "timedelta", "timezone"):
        out[("datetime", name)] = getattr(datetime, name)
    for mod in ("builtins", "__builtin__"):  # protocol 2 writes Python 2's module name
        for name, obj in (("set", set), ("frozenset", frozenset), ("slice", slice), ("complex", complex),
                          ("bytearray", bytearray), ("range", range)):
            out[(mod, name)] = obj
    out[("_codecs", "encode")] = _latin1_encode
    out.update(_numpy_globals())
    return out


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """torch's ``data.pkl`` reader: the allow-list for globals, the zip records for storages."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._big_endian = archive, prefix, big_endian
        self._storages: dict[str, _Storage] = {}
        self._placeholders: dict[tuple[str, str], type[Placeholder]] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            key = (str(module), str(name))
            if key not in self._placeholders:
                self._placeholders[key] = _placeholder_class(*key)
            return self._placeholders[key]

    def persistent_load(self, pid: Any) -> _Storage | Placeholder:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(storage_type, _StorageType) or storage_type.dtype is None:
            what = getattr(storage_type, "name", storage_type)
            return _placeholder_class("torch", f"storage {what!r:.80}")(key, numel)
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"bad storage id {pid!r:.200}")
        if key not in self._storages:
            record = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(record)
            except KeyError:
                raise pickle.UnpicklingError(f"the record {record} is missing (truncated file?)") from None
            itemsize = _stored_dtype(storage_type.dtype, False).itemsize
            if len(raw) < numel * itemsize:
                raise pickle.UnpicklingError(f"the record {record} holds {len(raw)} bytes, the pickle says "
                                             f"{numel} × {itemsize} (truncated file?)")
            self._storages[key] = _Storage(np.frombuffer(raw, np.uint8, numel * itemsize),
                                           storage_type.dtype, key, self._big_endian)
        return self._storages[key]


_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled torch magic number


def _open_archive(path: Path) -> tuple[zipfile.ZipFile, str]:
    """The zip and the prefix (``<archive>/``) under which ``data.pkl`` lies, or a DatasetError why not."""
    if not path.is_file():
        raise DatasetError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise DatasetError(
                f"{path}: written in torch's legacy format (torch < 1.6, or "
                "_use_new_zipfile_serialization=False), which this reader does not support; convert it once "
                "with a recent torch: "
                "torch.save(torch.load(p, weights_only=False), p)")
        raise DatasetError(f"{path}: not a zip archive, so not a torch checkpoint of torch ≥ 1.6 "
                           "(a truncated or failed download?)")
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DatasetError(f"{path}: damaged zip archive ({e})") from None
    prefixes = [n[: -len("data.pkl")] for n in names if re.fullmatch(r"[^/]*/?data\.pkl", n)]
    if not prefixes:
        archive.close()
        raise DatasetError(f"{path}: a zip archive without data.pkl, so not a torch.save file "
                           f"(it holds {names[:5]}{' ...' if len(names) > 5 else ''})")
    first = names[0].split("/", 1)[0] + "/" if names else ""
    return archive, (first if first in prefixes else prefixes[0])


def load_pth(path: str | Path) -> Any:
    """Everything a ``torch.save`` zip file holds, with tensors as numpy arrays and unknown globals as
    :class:`Placeholder`s. Executes nothing from the file (module docstring). DatasetError when unreadable."""
    path = Path(path)
    archive, prefix = _open_archive(path)
    with archive:
        try:
            big_endian = False  # torch's default when no byteorder record is present
            if f"{prefix}byteorder" in archive.namelist():
                order = archive.read(f"{prefix}byteorder").strip()
                if order not in (b"little", b"big"):
                    raise DatasetError(f"{path}: unknown byte order {order!r:.40} in {prefix}byteorder")
                big_endian = order == b"big"
            data = archive.read(f"{prefix}data.pkl")
            return _RestrictedUnpickler(data, archive, prefix, big_endian).load()
        except DatasetError:
            raise
        except Exception as e:  # the file is data, whatever goes wrong with it is a problem of the file
            raise DatasetError(f"{path}: cannot read the torch checkpoint: {type(e).__name__}: {e}") from None


# -- nnU-Net v2's checkpoint dict


@dataclass(frozen=True)
class V2Checkpoint:
    """What inference needs from one v2 ``checkpoint_*.pth`` (docs/nnunetv2.md §1)."""

    network_weights: dict[str, np.ndarray]
    trainer_name: str
    configuration: str | None  # init_args['configuration']
    fold: int | str | None  # init_args['fold']: an int or 'all'
    mirror_axes: tuple[int, ...] | None  # inference_allowed_mirroring_axes; None (or absent): no mirroring
    path: Path


def read_checkpoint(path: str | Path) -> V2Checkpoint:
    """One v2 checkpoint, read without torch and without running code from it (:func:`load_pth`).
    DatasetError naming the file when it cannot be read or has no usable ``network_weights``."""
    path = Path(path)
    ck = load_pth(path)
    if not isinstance(ck, dict):
        raise DatasetError(f"{path}: holds a {type(ck).__name__}, not nnU-Net v2's checkpoint dict")
    weights = ck.get("network_weights")
    if weights is None:
        raise DatasetError(f"{path}: no 'network_weights' (keys: {sorted(map(str, ck))}); "
                           "not an nnU-Net v2 training checkpoint")
    if not isinstance(weights, dict):
        raise DatasetError(f"{path}: 'network_weights' is a {type(weights).__name__}, not a state dict")
    for name, value in weights.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise DatasetError(f"{path}: network_weights[{name!r}] is {value!r:.120}, not a tensor")
    init = ck.get("init_args") if isinstance(ck.get("init_args"), dict) else {}
    configuration = init.get("configuration")
    axes = ck.get("inference_allowed_mirroring_axes")
    try:
        mirror_axes = None if axes is None else tuple(int(a) for a in axes)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: inference_allowed_mirroring_axes is {axes!r:.80}, "
                           "not a tuple of axes") from None
    trainer = ck.get("trainer_name")
    return V2Checkpoint(network_weights=dict(weights),
                        trainer_name=trainer if isinstance(trainer, str) else "",
                        configuration=configuration if isinstance(configuration, str) else None,
                        fold=init.get("fold"), mirror_axes=mirror_axes, path=path)


# -- the model folder


def parse_model_dir_name(model_dir: str | Path) -> tuple[str, str, str]:
    """``<Trainer>__<Plans>__<configuration>`` → (trainer, plans name, configuration), as v2 names its
    result folders; a DatasetError for any other name."""
    name = Path(model_dir).name
    parts = name.split("__")
    if len(parts) != 3 or not all(parts):
        raise DatasetError(f"{model_dir}: an nnU-Net v2 model folder is named "
                           "<Trainer>__<Plans>__<configuration> (e.g. "
                           f"nnUNetTrainer__nnUNetPlans__3d_fullres), not {name!r}")
    trainer, plans, configuration = parts
    return trainer, plans, configuration


def _fold_number(dirname: str) -> int | None:
    m = re.fullmatch(r"fold_(\d+)", dirname)
    return int(m.group(1)) if m else None


def model_folds(model_dir: str | Path, folds: Iterable[int | str] | int | str | None = None,
                checkpoint_name: str = "checkpoint_final.pth") -> list[tuple[str, Path]]:
    """(fold, checkpoint path) per fold to use, by v2's rules (``predict_from_raw_data``): ``folds=None``
    → every ``fold_<k>`` holding ``checkpoint_name``, by fold number, never ``fold_all``; ``'all'`` →
    ``fold_all``; explicit folds (ints or their strings, as v2's ``-f``) → ``fold_<k>``, each must hold the
    checkpoint. The folder must hold ``dataset.json`` and ``plans.json``. The fold names are ``'0'``,
    ``'1'``, ... or ``'all'``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DatasetError(f"{model_dir}: nnU-Net v2 model folder not found")
    for needed in ("dataset.json", "plans.json"):
        if not (model_dir / needed).is_file():
            raise DatasetError(f"{model_dir}: no {needed} in this nnU-Net v2 model folder "
                               f"(expected {model_dir / needed})")
    present = sorted((d.name for d in model_dir.iterdir()
                      if d.is_dir() and (_fold_number(d.name) is not None or d.name == "fold_all")),
                     key=lambda n: (n == "fold_all", _fold_number(n) or 0))
    with_ck = [n for n in present if (model_dir / n / checkpoint_name).is_file()]
    if folds is None:
        chosen = [n[len("fold_"):] for n in with_ck if n != "fold_all"]
        if not chosen:
            raise DatasetError(f"{model_dir}: no fold_<k>/{checkpoint_name} found (fold folders present: "
                               f"{present or 'none'}; pass folds='all' for fold_all)")
    else:
        items = [folds] if isinstance(folds, int | str) else list(folds)
        if not items:
            raise DatasetError(f"{model_dir}: an empty list of folds")
        chosen = []
        for f in items:
            if isinstance(f, str) and f.strip() == "all":
                chosen.append("all")
            elif isinstance(f, int | np.integer) and not isinstance(f, bool) and f >= 0:
                chosen.append(str(f))
            elif isinstance(f, str) and f.strip().isdigit():
                chosen.append(str(int(f)))
            else:
                raise DatasetError(f"{model_dir}: fold {f!r} is neither a fold number nor 'all'")
    out = []
    for f in chosen:
        ck = model_dir / f"fold_{f}" / checkpoint_name
        if not ck.is_file():
            raise DatasetError(f"{ck}: not found; folds holding {checkpoint_name} in {model_dir}: "
                               f"{[n[len('fold_'):] for n in with_ck] or 'none'} "
                               f"(fold folders: {present or 'none'})")
        out.append((f, ck))
    return out


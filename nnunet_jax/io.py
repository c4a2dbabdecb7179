"""NIfTI reading and writing in the reference layout, with the input checks users need.

NIfTI stores volumes as (X, Y, Z[, C]); on disk and in preprocessing we keep (C, Z, Y, X) like the reference
(docs/reference.md §5.1). Every problem with an input file is reported once, as a :class:`DatasetError` that
names the case, the file and what is wrong, so a bad case in a 500-case dataset is found without a debugger.

A case of an nnU-Net v2 raw dataset (one file per channel, :class:`ChannelFiles`) is read by the same
:func:`load_case`, through v2's readers (``nnunet_jax.interop.nnunetv2.imageio``, docs/nnunetv2.md §3.1):
their (C, a0, a1, a2) arrays are our (C, Z, Y, X) (NIfTI: the same transpose of the same float32 voxels), so
such a case gives exactly the arrays the same images stored as one 4D MSD file give, with the same checks.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np

from nnunet_jax.atomic import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class DatasetError(ValueError):
    """A dataset or one of its files cannot be used as it is; the message says which and why."""


class Case(NamedTuple):
    """One loaded case: ``image`` (C, Z, Y, X) float32, ``label`` (1, Z, Y, X) uint8 or None."""

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]  # (Z, Y, X) in mm
    affine: np.ndarray
    header: nib.Nifti1Header | None  # None for a v2 case not read from NIfTI (or reoriented)


@dataclass(frozen=True)
class ChannelFiles(os.PathLike):
    """The channel files of one nnU-Net v2 case (``<case>_0000<ending>``, ``_0001``, ...) in channel order,
    and the v2 reader (``SimpleITKIO``, ``NaturalImage2DIO``, ...) that reads them.

    It stands where an MSD case has its one image path (``CaseFiles.image``) and is path-like as its first
    file, so code that only wants a file to name or a header to read (planning, the predictor's source
    headers) keeps working, while :func:`load_case` reads every channel.
    """

    case: str
    paths: tuple[Path, ...]
    reader: str = "SimpleITKIO"

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(Path(p) for p in self.paths))
        if not self.paths:
            raise ValueError(f"case {self.case!r}: no channel files")

    def __fspath__(self) -> str:
        return str(self.paths[0])

    def __str__(self) -> str:
        return str(self.paths[0])


def case_name(path: str | os.PathLike) -> str:
    """File name without the NIfTI suffix: ``imagesTr/BRATS_001.nii.gz`` → ``BRATS_001``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _where(case: str | None, path: str | os.PathLike) -> str:
    return f"case {case!r} ({path})" if case else str(path)


def _open(path: str | os.PathLike, case: str | None, what: str) -> nib.Nifti1Image:
    path = Path(path)
    where = _where(case, path)
    if not path.is_file():
        raise DatasetError(f"{where}: {what} file is missing")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise DatasetError(f"{where}: {what} file is not NIfTI (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise DatasetError(f"{where}: {what} file is not NIfTI but {type(img).__name__}")
        img.get_data_dtype()  # touches the header
    except DatasetError:
        raise
    except Exception as e:  # nibabel raises several types for truncated / foreign files
        raise DatasetError(f"{where}: {what} file is not a readable NIfTI file ({e})") from e
    return img


def _read(img: nib.Nifti1Image, where: str, what: str, as_float32: bool = False) -> np.ndarray:
    """Voxels in the stored type (labels) or straight to float32 (images: no float64 copy of a big CT)."""
    try:
        return img.get_fdata(dtype=np.float32) if as_float32 else np.asarray(img.dataobj)
    except Exception as e:  # truncated gzip, short file
        raise DatasetError(f"{where}: cannot read the {what} voxels ({e})") from e


def nifti_spacing(header: nib.Nifti1Header) -> tuple[float, float, float]:
    """(Z, Y, X) spacing = pixdim[1:4] reversed."""
    return tuple(float(s) for s in header["pixdim"][1:4][::-1])


def load_case(
    image_path: str | os.PathLike | ChannelFiles,
    label_path: str | os.PathLike | None = None,
    *,
    labels: Iterable[int] | None = None,
    n_channels: int | None = None,
    case: str | None = None,
    channels_from: str = "dataset.json",
) -> Case:
    """Load and check one case; ``labels`` are the values dataset.json declares (None: not checked);
    ``channels_from`` says who declares ``n_channels`` (the dataset, or a model's plan at predict time).

    Raises :class:`DatasetError` for a missing or non-NIfTI file, a wrong number of dimensions or channels,
    NaN/inf voxels, non-positive spacing, image/label shape or affine mismatch, and undeclared label values.
    ``image_path`` may be the :class:`ChannelFiles` of an nnU-Net v2 case (read with v2's readers; the
    label with the same reader; also spacing checked), which gives the same arrays and checks.
    """
    if isinstance(image_path, ChannelFiles):
        return _load_channels(image_path, label_path, labels, n_channels,
                              case if case is not None else image_path.case, channels_from)
    case = case if case is not None else case_name(image_path)
    img = _open(image_path, case, "image")
    where = _where(case, image_path)
    data = _read(img, where, "image", as_float32=True)
    if data.ndim == 3:
        image = data.transpose(2, 1, 0)[None]
    elif data.ndim == 4:
        image = data.transpose(3, 2, 1, 0)
    else:
        raise DatasetError(f"{where}: image has shape {data.shape}; expected 3D (X,Y,Z) or 4D (X,Y,Z,C)")
    image = np.ascontiguousarray(image, dtype=np.float32)
    if n_channels is not None and image.shape[0] != n_channels:
        raise DatasetError(
            f"{where}: image has {image.shape[0]} channel(s) but {channels_from} declares "
            f"{n_channels} modalities"
        )
    if not np.isfinite(image).all():
        raise DatasetError(f"{where}: image has {int((~np.isfinite(image)).sum())} NaN/inf voxels")
    spacing = nifti_spacing(img.header)
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DatasetError(f"{where}: image spacing (pixdim[1:4]) {spacing[::-1]} is not positive")

    label = None
    if label_path is not None:
        lbl = _open(label_path, case, "label")
        lwhere = _where(case, label_path)
        ldata = _read(lbl, lwhere, "label")
        if ldata.ndim != 3:
            raise DatasetError(
                f"{lwhere}: label has shape {ldata.shape}; it must be 3D (X,Y,Z) without a channel axis"
            )
        if ldata.shape != data.shape[:3]:
            raise DatasetError(
                f"{lwhere}: label shape {ldata.shape} differs from image shape {data.shape[:3]} (X,Y,Z)"
            )
        if not np.allclose(lbl.affine, img.affine, rtol=1e-4, atol=1e-4):
            raise DatasetError(
                f"{lwhere}: label affine differs from the image affine\n"
                f"image:\n{np.round(img.affine, 4)}\nlabel:\n{np.round(lbl.affine, 4)}"
            )
        _check_label_values(ldata, lwhere, labels)
        label = np.ascontiguousarray(ldata.transpose(2, 1, 0)[None], dtype=np.uint8)
    return Case(image, label, spacing, np.asarray(img.affine), img.header)


def _check_label_values(ldata: np.ndarray, lwhere: str, labels: Iterable[int] | None) -> None:
    """Finite, integer, declared (when ``labels`` is given) and within uint8: one message naming the file."""
    if not np.isfinite(ldata).all():
        raise DatasetError(f"{lwhere}: label has NaN/inf voxels")
    values = np.unique(ldata)
    if not np.array_equal(values, np.round(values)):
        bad = values[values != np.round(values)][:5]
        raise DatasetError(f"{lwhere}: label has non-integer values {bad}")
    if labels is not None:
        undeclared = sorted(set(values.astype(np.int64).tolist()) - {int(v) for v in labels})
        if undeclared:
            raise DatasetError(
                f"{lwhere}: label values {undeclared} are not declared in dataset.json "
                f"(declared: {sorted(int(v) for v in labels)})"
            )
    if values.min() < 0 or values.max() > 255:
        raise DatasetError(f"{lwhere}: label values must lie in 0..255, "
                           f"found {values.min()}..{values.max()}")


# ------------------------------------------------------------------------------ nnU-Net v2 channel files


def require_reader(reader: str, path: str | os.PathLike) -> None:
    """A clear error naming ``path`` when reading it needs SimpleITK (optional) and it is not installed."""
    from nnunet_jax.interop.nnunetv2.imageio import reader_kind  # interop imports this module: import late

    if reader_kind(reader, path) == "sitk" and importlib.util.find_spec("SimpleITK") is None:
        raise DatasetError(f"{path}: reading {Path(path).name} needs SimpleITK, which is not installed "
                           "(pip install SimpleITK)")


def _geometry_affine(geometry: Any, spacing: Sequence[float]) -> np.ndarray:
    """A NIfTI-style affine (voxel (X, Y, Z) → RAS mm) for the meta record of a v2 case: the file's own for
    NIfTI (the RAS one after reorientation), SimpleITK's LPS geometry flipped to RAS, spacing only else."""
    if geometry.kind == "nifti":
        affine = geometry.reoriented_affine if geometry.reoriented_affine is not None else geometry.affine
        return np.asarray(affine, np.float64)
    if geometry.kind == "sitk" and geometry.sitk:
        sp = np.asarray(geometry.sitk["spacing"], np.float64)
        d = len(sp)
        direction = np.eye(3)
        direction[:d, :d] = np.asarray(geometry.sitk["direction"], np.float64).reshape(d, d)
        zooms = np.ones(3)
        zooms[:d] = np.abs(sp)
        if d == 2:
            zooms[2] = float(spacing[0])
        origin = np.zeros(3)
        origin[:d] = geometry.sitk["origin"]
        affine = np.eye(4)
        affine[:3, :3] = direction * zooms
        affine[:3, 3] = origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK is LPS, NIfTI RAS
    return np.diag([*(float(s) for s in spacing[::-1]), 1.0])


def _load_channels(
    files: ChannelFiles, label_path: str | os.PathLike | None, labels: Iterable[int] | None,
    n_channels: int | None, case: str, channels_from: str,
) -> Case:
    """:func:`load_case` for a v2 case: every channel file through v2's reader, the same checks."""
    from nnunet_jax.interop.nnunetv2.imageio import read_images, read_seg

    where = _where(case, files.paths[0])
    for p in files.paths:
        require_reader(files.reader, p)
    img = read_images(files.paths, files.reader)
    image = np.ascontiguousarray(img.data, dtype=np.float32)
    if n_channels is not None and image.shape[0] != n_channels:
        names = ", ".join(p.name for p in files.paths)
        raise DatasetError(f"{where}: image has {image.shape[0]} channel(s) (files {names}) but "
                           f"{channels_from} declares {n_channels} channels")
    spacing = tuple(float(s) for s in img.spacing)
    label = None
    if label_path is not None:
        lwhere = _where(case, label_path)
        require_reader(files.reader, label_path)
        seg = read_seg(label_path, files.reader)
        if seg.data.shape[0] != 1:
            raise DatasetError(f"{lwhere}: label has {seg.data.shape[0]} channels; it must have one")
        if seg.data.shape[1:] != image.shape[1:]:
            raise DatasetError(f"{lwhere}: label shape {seg.data.shape[1:]} differs from image shape "
                               f"{image.shape[1:]} ({files.paths[0].name})")
        if not np.allclose(seg.spacing, img.spacing, rtol=1e-4, atol=1e-4):
            raise DatasetError(f"{lwhere}: label spacing {seg.spacing} differs from the image spacing "
                               f"{img.spacing} ({files.paths[0].name})")
        image_affine = _geometry_affine(img.geometry, img.spacing)
        label_affine = _geometry_affine(seg.geometry, seg.spacing)
        if not np.allclose(label_affine, image_affine, rtol=1e-4, atol=1e-4):
            raise DatasetError(
                f"{lwhere}: label affine differs from the image affine ({files.paths[0].name})\n"
                f"image:\n{np.round(image_affine, 4)}\nlabel:\n{np.round(label_affine, 4)}"
            )
        _check_label_values(seg.data, lwhere, labels)
        label = np.ascontiguousarray(seg.data, dtype=np.uint8)
    header = img.geometry.header if img.geometry.kind == "nifti" else None
    return Case(image, label, spacing, _geometry_affine(img.geometry, img.spacing), header)


def save_label_nifti(
    labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None, path: str | os.PathLike
) -> Path:
    """Write a (Z, Y, X) label map as uint8 NIfTI in the source geometry (X, Y, Z), atomically.

    ``header`` is the source image's (it may describe a 4D multi-modal image: the shape and data type are
    reset for the 3D label map; spacing, orientation codes and units are kept).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (Z, Y, X), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must lie in 0..255 to be stored as uint8")
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI file name must end with .nii or .nii.gz")
    data = np.ascontiguousarray(labels.transpose(2, 1, 0), dtype=np.uint8)
    hdr = header.copy() if header is not None else None
    if hdr is not None:
        zooms = hdr.get_zooms()
        hdr.set_data_shape(data.shape)
        hdr.set_zooms(zooms[:3])
    out = nib.Nifti1Image(data, affine, hdr)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    with atomic_path(path) as tmp:
        nib.save(out, tmp)
    return path

"""Reading a case's channel files and writing a segmentation the way nnU-Net v2's readers do
(docs/nnunetv2.md §3).

v2's arrays are in "reader order": SimpleITK's (z, y, x) array, spacing reversed to match. For NIfTI its
two readers agree on that array and spacing (``SimpleITKIO``: ``GetArrayFromImage``; ``NibabelIO``:
``get_fdata().transpose(2, 1, 0)``, zooms reversed), so NIfTI is read with nibabel (a runtime dependency)
whichever of the two the plans name, and the segmentation is written back with the source's affine and
header. ``NibabelIOWithReorient`` first reorients to RAS, as v2 does, and writes back in the source
orientation. ``.nrrd``/``.mha``/``.gipl`` go through SimpleITK when it is installed (it is optional).
2D natural images (``.png``/``.bmp``/``.tif``, v2's NaturalImage2DIO) give (C, 1, y, x) with spacing
(999, 1, 1); a 2D SimpleITK/NIfTI image gives (1, 1, y, x) with spacing (999·max, sy, sx).

Every problem is one :class:`DatasetError` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from nnunet_jax.atomic import atomic_path
from nnunet_jax.io import DatasetError

NIFTI_READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")
SITK_ENDINGS = (".nrrd", ".mha", ".gipl", ".nii.gz", ".nii")
NATURAL_ENDINGS = (".png", ".bmp", ".tif")


@dataclass
class Geometry:
    """What is needed to write a result in the source's space: ``kind`` ('nifti', 'sitk' or 'natural'),
    the NIfTI affine + header (and the RAS affine when reoriented), or SimpleITK's spacing, origin and
    direction."""

    kind: str
    affine: np.ndarray | None = None
    header: Any = None
    reoriented_affine: np.ndarray | None = None
    sitk: dict = field(default_factory=dict)
    ndim: int = 3  # 2 for a 2D source file (written back as 2D)


@dataclass
class V2Image:
    """A case's channels in reader order: ``data`` (C, a0, a1, a2) float32, ``spacing`` (a0, a1, a2)."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry


def reader_kind(reader: str, path: str | os.PathLike) -> str:
    """'nifti', 'nifti_reorient', 'sitk' or 'natural' for the plans' ``image_reader_writer`` and a file."""
    name = Path(path).name.lower()
    if reader == "NaturalImage2DIO" and name.endswith(NATURAL_ENDINGS):
        return "natural"
    if name.endswith((".nii.gz", ".nii")) and reader in NIFTI_READERS:
        return "nifti_reorient" if reader == "NibabelIOWithReorient" else "nifti"
    if reader == "SimpleITKIO" and name.endswith(SITK_ENDINGS):
        return "sitk"
    raise DatasetError(f"{path}: cannot read this file with nnU-Net v2's {reader!r} here (supported: NIfTI "
                       f"with {', '.join(NIFTI_READERS)}; {', '.join(SITK_ENDINGS[:3])} with SimpleITKIO; "
                       f"{', '.join(NATURAL_ENDINGS)} with NaturalImage2DIO)")


def read_images(paths, reader: str = "SimpleITKIO") -> V2Image:
    """The channel files of one case (in channel order), stacked as v2's reader stacks them."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise DatasetError("read_images: no image files given")
    parts = [_read_one(p, reader) for p in paths]
    first = parts[0]
    for p, part in zip(paths[1:], parts[1:], strict=True):
        if part.data.shape[1:] != first.data.shape[1:]:
            raise DatasetError(f"{p}: shape {part.data.shape[1:]} differs from {paths[0]}'s "
                               f"{first.data.shape[1:]} (all channels of a case must match)")
        if not np.allclose(part.spacing, first.spacing, rtol=1e-5, atol=0):
            raise DatasetError(f"{p}: spacing {part.spacing} differs from {paths[0]}'s {first.spacing}")
    data = parts[0].data if len(parts) == 1 else np.concatenate([q.data for q in parts], axis=0)
    return V2Image(data, first.spacing, first.geometry)


def read_seg(path, reader: str = "SimpleITKIO") -> V2Image:
    """A label map as (1, a0, a1, a2) float32 (v2 reads segmentations with the image reader)."""
    return read_images([path], reader)


def _read_one(path: Path, reader: str) -> V2Image:
    if not path.is_file():
        raise DatasetError(f"{path}: image file is missing")
    kind = reader_kind(reader, path)
    try:
        if kind.startswith("nifti"):
            img = _read_nifti(path, kind == "nifti_reorient")
        elif kind == "sitk":
            img = _read_sitk(path)
        else:
            img = _read_natural(path)
    except DatasetError:
        raise
    except Exception as e:  # the readers raise many types for truncated or foreign files
        raise DatasetError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if not np.isfinite(img.data).all():
        raise DatasetError(f"{path}: image has {int((~np.isfinite(img.data)).sum())} NaN/inf voxels")
    if not all(np.isfinite(s) and s > 0 for s in img.spacing):
        raise DatasetError(f"{path}: spacing {img.spacing} is not positive")
    return img


def _read_nifti(path: Path, reorient: bool) -> V2Image:
    nii = nib.load(str(path))
    if not isinstance(nii, nib.Nifti1Image | nib.Nifti2Image):
        raise DatasetError(f"{path}: not a NIfTI file but {type(nii).__name__}")
    original = np.asarray(nii.affine)
    re_aff = None
    if reorient:
        if nii.ndim != 3:
            raise DatasetError(f"{path}: NibabelIOWithReorient reads 3D images only, got shape {nii.shape}")
        nii = nii.as_reoriented(io_orientation(original))
        re_aff = np.asarray(nii.affine)
    zooms = [abs(float(z)) for z in nii.header.get_zooms()]
    arr = np.asarray(nii.get_fdata(dtype=np.float32))
    if arr.ndim == 2:  # (x, y) → (1, 1, y, x)
        data, spacing, nd = arr.T[None, None], (999.0 * max(zooms[:2]), zooms[1], zooms[0]), 2
    elif arr.ndim == 3:
        data, spacing, nd = arr.transpose(2, 1, 0)[None], tuple(zooms[:3][::-1]), 3
    elif arr.ndim == 4:  # several channels in one file
        data, spacing, nd = arr.transpose(3, 2, 1, 0), tuple(zooms[:3][::-1]), 3
    else:
        raise DatasetError(f"{path}: NIfTI image has shape {arr.shape}; expected 2D, 3D or 4D")
    geo = Geometry("nifti", original, nii.header.copy() if not reorient else None, re_aff, ndim=nd)
    return V2Image(np.ascontiguousarray(data, dtype=np.float32), spacing, geo)


def _sitk():
    try:
        import SimpleITK as sitk  # optional: only for .nrrd/.mha/.gipl
    except ImportError as e:
        raise DatasetError(".nrrd/.mha/.gipl files need SimpleITK (pip install SimpleITK)") from e
    return sitk


def _read_sitk(path: Path) -> V2Image:
    sitk = _sitk()
    im = sitk.ReadImage(str(path))
    sp = tuple(float(s) for s in im.GetSpacing())
    arr = sitk.GetArrayFromImage(im)
    if arr.ndim == 2:
        data, spacing = arr[None, None], (999.0 * max(sp), *sp[::-1])
    elif arr.ndim == 3:
        data, spacing = arr[None], sp[::-1]
    elif arr.ndim == 4:
        data, spacing = arr, sp[::-1][1:]
    else:
        raise DatasetError(f"{path}: image has {arr.ndim} dimensions; expected 2, 3 or 4")
    geo = Geometry("sitk", sitk={"spacing": im.GetSpacing(), "origin": im.GetOrigin(),
                                 "direction": im.GetDirection()}, ndim=min(arr.ndim, 3))
    return V2Image(np.ascontiguousarray(data, dtype=np.float32), tuple(abs(s) for s in spacing), geo)


def _read_natural(path: Path) -> V2Image:
    from PIL import Image  # pillow: a dependency of matplotlib

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        if arr.shape[-1] not in (3, 4):
            raise DatasetError(f"{path}: a colour image needs 3 or 4 channels last, got shape {arr.shape}")
        data = arr.transpose(2, 0, 1)[:, None]
    elif arr.ndim == 2:
        data = arr[None, None]
    else:
        raise DatasetError(f"{path}: expected a 2D image, got shape {arr.shape}")
    return V2Image(np.ascontiguousarray(data, dtype=np.float32), (999.0, 1.0, 1.0),
                   Geometry("natural", ndim=2))


def write_seg(seg: np.ndarray, path: str | os.PathLike, geometry: Geometry) -> Path:
    """Write a (a0, a1, a2) label map (reader order) in the source's geometry, atomically; uint8 when the
    largest label is below 255, else uint16, as v2 writes it."""
    path = Path(path)
    seg = np.asarray(seg)
    if seg.ndim != 3:
        raise ValueError(f"{path}: a segmentation must be (a0, a1, a2) in reader order, got {seg.shape}")
    dtype = np.uint8 if seg.size == 0 or seg.max() < 255 else np.uint16
    seg = seg.astype(dtype, copy=False)
    if geometry.kind == "nifti":
        arr = seg[0].T if geometry.ndim == 2 else seg.transpose(2, 1, 0)
        if geometry.reoriented_affine is not None:
            img = nib.Nifti1Image(np.ascontiguousarray(arr), geometry.reoriented_affine)
            back = ornt_transform(axcodes2ornt("RAS"), io_orientation(geometry.affine))
            img = img.as_reoriented(back)
        else:
            hdr = geometry.header.copy() if geometry.header is not None else None
            if hdr is not None:
                zooms = hdr.get_zooms()
                hdr.set_data_shape(arr.shape)
                hdr.set_zooms(zooms[:arr.ndim])
            img = nib.Nifti1Image(np.ascontiguousarray(arr), geometry.affine, hdr)
        img.set_data_dtype(dtype)
        img.header.set_slope_inter(1, 0)
        with atomic_path(path) as tmp:
            nib.save(img, tmp)
    elif geometry.kind == "sitk":
        sitk = _sitk()
        im = sitk.GetImageFromArray(seg[0] if geometry.ndim == 2 else seg)
        im.SetSpacing(geometry.sitk["spacing"])
        im.SetOrigin(geometry.sitk["origin"])
        im.SetDirection(geometry.sitk["direction"])
        with atomic_path(path) as tmp:
            sitk.WriteImage(im, str(tmp), True)
    else:
        from PIL import Image

        with atomic_path(path) as tmp:
            Image.fromarray(seg[0]).save(tmp, format=Image.registered_extensions().get(path.suffix.lower()))
    return path

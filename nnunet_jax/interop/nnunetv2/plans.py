"""nnU-Net v2's ``plans.json`` and ``dataset.json``, read into typed, checked objects (docs/nnunetv2.md §1).

Interface (shared with the predictor and checkpoint modules; extend with keyword arguments only):
``V2Plans.load(path)`` / ``V2Plans.from_dict(d, source)``; ``plans.configuration(name) -> V2Configuration``
(``inherits_from`` resolved as v2 does: the child's keys update the parent's); ``plans.transpose_forward``,
``plans.transpose_backward``, ``plans.foreground_intensity_properties`` ({channel: {mean, std, ...}}),
``plans.image_reader_writer``. ``V2Labels.from_dataset_json(d, source)`` applies v2's LabelManager rules.

Why typed: the rest of the interop reads fields (``cfg.spacing``, ``labels.num_heads``) instead of indexing
dicts in many places, and every malformed field is reported once, here, as a :class:`DatasetError` naming
the file and the field, before any image is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_jax.io import DatasetError

# v2's anisotropy threshold for resampling a separate low-resolution axis (max/min spacing ratio).
ANISO_THRESHOLD = 3.0
NORMALIZATION_SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization",
                         "RescaleTo01Normalization", "RGBTo01Normalization")
RESAMPLING_FUNCTIONS = ("resample_data_or_seg_to_shape",)


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from ``path``; a missing or unparsable file is one DatasetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: {what} file is missing")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: {what} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: {what} must hold a JSON object, not {type(obj).__name__}")
    return obj


class _Fields:
    """Typed access to one JSON object; errors name the file and the dotted field path."""

    def __init__(self, d: Any, source: str, prefix: str = ""):
        if not isinstance(d, dict):
            raise DatasetError(f"{source}: field {prefix.rstrip('.') or '(top level)'!r} must be an object, "
                               f"got {type(d).__name__}")
        self.d, self.source, self.prefix = d, source, prefix

    def fail(self, key: str, what: str) -> DatasetError:
        return DatasetError(f"{self.source}: field {self.prefix + key!r} {what}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., none_ok: bool = False) -> Any:
        if key not in self.d:
            if default is ...:
                raise self.fail(key, "is missing")
            return default
        v = self.d[key]
        if v is None and none_ok:
            return None
        if isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"must be {_kind_name(kind)}, got {v!r}")
        if not isinstance(v, kind):
            raise self.fail(key, f"must be {_kind_name(kind)}, got {type(v).__name__} {v!r}")
        return v

    def sub(self, key: str) -> _Fields:
        return _Fields(self.get(key, dict), self.source, f"{self.prefix}{key}.")

    def ints(self, key: str, n: int | None = None, minimum: int | None = None) -> tuple[int, ...]:
        return tuple(self._seq(key, int, n, minimum))

    def floats(self, key: str, n: int | None = None, positive: bool = False) -> tuple[float, ...]:
        return tuple(float(v) for v in self._seq(key, (int, float), n, 0 if positive else None, strict=True))

    def _seq(self, key, kind, n, minimum, strict: bool = False) -> list:
        v = self.get(key, list)
        if n is not None and len(v) != n:
            raise self.fail(key, f"must have {n} entries, got {len(v)} ({v!r})")
        for x in v:
            if isinstance(x, bool) or not isinstance(x, kind):
                raise self.fail(key, f"must be a list of {_kind_name(kind)}, got {v!r}")
            if minimum is not None and (x <= minimum if strict else x < minimum):
                raise self.fail(key, f"entries must be {'>' if strict else '>='} {minimum}, got {v!r}")
        return v


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
             dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


@dataclass(frozen=True)
class V2Resampling:
    """One ``resampling_fn_*`` with its kwargs: spline ``order`` in-plane (or everywhere), ``order_z``
    along a separate low-resolution axis, ``force_separate_z`` (None: decided from the spacings)."""

    order: int
    order_z: int
    force_separate_z: bool | None
    is_seg: bool = False
    threshold: float = ANISO_THRESHOLD


@dataclass(frozen=True)
class V2Architecture:
    """The network the plans describe: dotted class name, its constructor kwargs, and the kwargs that name
    classes (``conv_op``, ``norm_op``, ...) which v2 resolves with ``pydoc.locate``."""

    network_class_name: str
    arch_kwargs: dict
    kw_requires_import: tuple[str, ...]

    @property
    def class_name(self) -> str:
        """``PlainConvUNet`` for ``dynamic_network_architectures.architectures.unet.PlainConvUNet``."""
        return self.network_class_name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class V2Configuration:
    """One resolved configuration of the plans (``3d_fullres``, ``2d``, ...). ``spacing`` is already in the
    transposed axis order; 2D configurations have 2 entries (the first axis keeps its spacing)."""

    name: str
    data_identifier: str
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    resampling_data: V2Resampling
    resampling_seg: V2Resampling
    resampling_probabilities: V2Resampling
    architecture: V2Architecture
    batch_size: int | None
    previous_stage: str | None
    raw: dict

    @property
    def ndim(self) -> int:
        return len(self.patch_size)


@dataclass(frozen=True)
class V2Plans:
    """``plans.json``: the top-level fields and the (unresolved) configurations."""

    source: str
    dataset_name: str
    plans_name: str
    image_reader_writer: str
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    foreground_intensity_properties: dict[int, dict[str, float]]
    configurations: dict[str, dict]
    raw: dict

    @classmethod
    def load(cls, path: str | os.PathLike) -> V2Plans:
        return cls.from_dict(read_json(path, "nnU-Net v2 plans"), str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "plans.json") -> V2Plans:
        f = _Fields(d, source)
        tf = f.ints("transpose_forward", minimum=0)
        tb = f.ints("transpose_backward", minimum=0)
        if sorted(tf) != list(range(len(tf))) or len(tf) != 3:
            raise f.fail("transpose_forward", f"must be a permutation of [0, 1, 2], got {list(tf)}")
        if tuple(tf[i] for i in tb) != (0, 1, 2):
            raise f.fail("transpose_backward", f"{list(tb)} does not undo transpose_forward {list(tf)}")
        key = "foreground_intensity_properties_per_channel"
        if key not in d and "foreground_intensity_properties_by_modality" in d:
            key = "foreground_intensity_properties_by_modality"  # older plans
        props: dict[int, dict[str, float]] = {}
        fip = f.sub(key) if key in d else _Fields({}, source, key + ".")
        for ch in fip.d:
            if not str(ch).isdigit():
                raise fip.fail(str(ch), "must be keyed by a channel index (\"0\", \"1\", ...)")
            s = fip.sub(str(ch))
            props[int(ch)] = {k: float(s.get(k, (int, float))) for k in s.d
                              if isinstance(s.d[k], (int, float)) and not isinstance(s.d[k], bool)}
        confs = f.sub("configurations")
        for name in confs.d:
            confs.sub(name)  # each configuration is an object
        if not confs.d:
            raise f.fail("configurations", "is empty")
        return cls(source, f.get("dataset_name", str, ""), f.get("plans_name", str, ""),
                   f.get("image_reader_writer", str, "SimpleITKIO"), tf, tb, props, dict(confs.d), d)

    def configuration(self, name: str) -> V2Configuration:
        """The named configuration with ``inherits_from`` resolved, checked field by field."""
        if name not in self.configurations:
            raise DatasetError(f"{self.source}: configuration {name!r} does not exist "
                               f"(the plans have {sorted(self.configurations)})")
        merged = self._resolve(name, ())
        f = _Fields(merged, self.source, f"configurations.{name}.")
        patch = f.ints("patch_size", minimum=1)
        if len(patch) not in (2, 3):
            raise f.fail("patch_size", f"must have 2 or 3 entries, got {list(patch)}")
        spacing = f.floats("spacing", len(patch), positive=True)
        schemes = tuple(f.get("normalization_schemes", list))
        for s in schemes:
            if s not in NORMALIZATION_SCHEMES:
                raise f.fail("normalization_schemes", f"has unknown scheme {s!r} (known: "
                              f"{', '.join(NORMALIZATION_SCHEMES)})")
        masks = f.get("use_mask_for_norm", list)
        if len(masks) != len(schemes) or not all(isinstance(m, bool) for m in masks):
            raise f.fail("use_mask_for_norm", f"must be one true/false per normalization scheme, "
                                              f"got {masks!r}")
        for c, s in enumerate(schemes):
            if s == "CTNormalization":
                stats = self.foreground_intensity_properties.get(c, {})
                missing = [k for k in ("mean", "std", "percentile_00_5", "percentile_99_5") if k not in stats]
                if missing:
                    raise DatasetError(f"{self.source}: field 'foreground_intensity_properties_per_channel."
                                       f"{c}' lacks {missing} (needed by CTNormalization)")
        arch = f.sub("architecture")
        architecture = V2Architecture(arch.get("network_class_name", str),
                                      dict(arch.get("arch_kwargs", dict)),
                                      tuple(arch.get("_kw_requires_import", list, [])))
        return V2Configuration(
            name=name, data_identifier=f.get("data_identifier", str, name), patch_size=patch, spacing=spacing,
            normalization_schemes=schemes, use_mask_for_norm=tuple(masks),
            resampling_data=self._resampling(f, "data"), resampling_seg=self._resampling(f, "seg"),
            resampling_probabilities=self._resampling(f, "probabilities"), architecture=architecture,
            batch_size=f.get("batch_size", int, None), previous_stage=f.get("previous_stage", str, None),
            raw=merged)

    def _resolve(self, name: str, visited: tuple[str, ...]) -> dict:
        conf = dict(self.configurations[name])
        parent = conf.get("inherits_from")
        if parent is None:
            return conf
        where = f"configurations.{name}.inherits_from"
        if not isinstance(parent, str) or parent not in self.configurations:
            raise DatasetError(f"{self.source}: field {where!r} names {parent!r}, which is not a "
                               f"configuration (the plans have {sorted(self.configurations)})")
        if parent in visited + (name,):
            raise DatasetError(f"{self.source}: field {where!r} makes a cycle: "
                               f"{' -> '.join(visited + (name, parent))}")
        base = self._resolve(parent, visited + (name,))
        base.update(conf)
        return base

    @staticmethod
    def _resampling(f: _Fields, what: str) -> V2Resampling:
        fn = f.get(f"resampling_fn_{what}", str)
        if fn not in RESAMPLING_FUNCTIONS:
            raise f.fail(f"resampling_fn_{what}",
                         f"names {fn!r}; supported: {', '.join(RESAMPLING_FUNCTIONS)}")
        kw = f.sub(f"resampling_fn_{what}_kwargs")
        orders = (0, 1, 3)
        order, order_z = kw.get("order", int, 3), kw.get("order_z", int, 0)
        for key, v in (("order", order), ("order_z", order_z)):
            if v not in orders:
                raise kw.fail(key, f"must be one of {orders}, got {v}")
        known = {"is_seg", "order", "order_z", "force_separate_z", "separate_z_anisotropy_threshold"}
        extra = sorted(set(kw.d) - known)
        if extra:
            raise kw.fail(extra[0], f"is not a parameter of {fn} (known: {sorted(known)})")
        return V2Resampling(order=order, order_z=order_z,
                            force_separate_z=kw.get("force_separate_z", bool, None, none_ok=True),
                            is_seg=kw.get("is_seg", bool, False),
                            threshold=float(kw.get("separate_z_anisotropy_threshold", (int, float),
                                                   ANISO_THRESHOLD)))


@dataclass(frozen=True)
class V2Labels:
    """``dataset.json`` under v2's LabelManager rules.

    ``labels``: name → int, or name → tuple of ints (a region). Regions are active when some value lists
    more than one label; then the heads are the non-background, non-``ignore`` entries in file order and
    ``regions_class_order`` (one label per head) is required. Otherwise the heads are the sorted label
    values, background included. ``ignore`` (if any) is an int equal to the largest label + 1 and has no head.
    """

    source: str
    labels: dict[str, int | tuple[int, ...]]
    channel_names: dict[int, str]
    file_ending: str
    num_training: int | None
    has_regions: bool
    regions: tuple[tuple[int, ...], ...] | None
    regions_class_order: tuple[int, ...] | None
    ignore_label: int | None
    all_labels: tuple[int, ...]
    overwrite_image_reader_writer: str | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> V2Labels:
        return cls.from_dataset_json(read_json(path, "dataset.json"), str(path))

    @classmethod
    def from_dataset_json(cls, d: dict, source: str = "dataset.json") -> V2Labels:
        f = _Fields(d, source)
        key = "channel_names" if "channel_names" in d or "modality" not in d else "modality"
        ch = f.sub(key)
        if not ch.d:
            raise f.fail(key, "is empty (one entry per input channel: {\"0\": \"CT\"})")
        if sorted(ch.d, key=str) != sorted((str(i) for i in range(len(ch.d))), key=str):
            raise f.fail(key, f"must be keyed \"0\"..\"{len(ch.d) - 1}\", got {sorted(ch.d)}")
        channels = {int(k): ch.get(k, str) for k in sorted(ch.d, key=int)}
        lab = f.sub("labels")
        labels: dict[str, int | tuple[int, ...]] = {}
        for name, v in lab.d.items():
            if isinstance(v, int) and not isinstance(v, bool):
                if v < 0:
                    raise lab.fail(name, f"must be a non-negative label value, got {v}")
                labels[name] = v
            elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                   for x in v):
                labels[name] = tuple(v)
            else:
                raise lab.fail(name, f"must be a label value (int) or a region (non-empty list of ints), "
                                     f"got {v!r}")
        if "background" not in labels:
            raise f.fail("labels", "has no 'background' entry (it must be label 0)")
        if labels["background"] != 0:
            raise lab.fail("background", f"must be the integer 0, got {lab.d['background']!r}")
        ignore = labels.pop("ignore", None) if "ignore" in labels else None
        if isinstance(ignore, tuple):
            raise lab.fail("ignore", f"must be an integer, not a region {list(ignore)}")
        all_labels = tuple(sorted({x for v in labels.values() for x in ((v,) if isinstance(v, int) else v)}))
        if ignore is not None and ignore != max(all_labels) + 1:
            raise lab.fail("ignore", f"must be the largest label + 1 = {max(all_labels) + 1}, got {ignore}")
        has_regions = any(isinstance(v, tuple) and len(v) > 1 for v in labels.values())
        regions = order = None
        if has_regions:
            regions = tuple(v if isinstance(v, tuple) else (v,) for v in labels.values()
                            if set(v if isinstance(v, tuple) else (v,)) != {0})
            order = f.ints("regions_class_order", minimum=0)
            if len(order) != len(regions):
                raise f.fail("regions_class_order", f"must have one entry per region ({len(regions)}), "
                                                    f"got {list(order)}")
        elif "regions_class_order" in d and d["regions_class_order"] is not None:
            f.ints("regions_class_order", minimum=0)  # checked, unused without regions (as v2)
        ending = f.get("file_ending", str)
        if not ending.startswith(".") or len(ending) < 2:
            raise f.fail("file_ending", f"must start with '.', like \".nii.gz\", got {ending!r}")
        n_train = f.get("numTraining", int, None)
        if n_train is not None and n_train < 0:
            raise f.fail("numTraining", f"must be >= 0, got {n_train}")
        rw = f.get("overwrite_image_reader_writer", str, None, none_ok=True)
        if ignore is not None:
            labels["ignore"] = ignore
        return cls(source, labels, channels, ending, n_train, has_regions, regions, order, ignore, all_labels,
                   None if rw in (None, "None") else rw)

    @property
    def foreground_labels(self) -> tuple[int, ...]:
        return tuple(v for v in self.all_labels if v != 0)

    @property
    def num_heads(self) -> int:
        """Output channels of the network: one per region, or one per label (background included)."""
        return len(self.regions) if self.has_regions else len(self.all_labels)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

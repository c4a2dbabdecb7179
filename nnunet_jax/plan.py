"""The plan: what preprocessing decided for one dataset and dimension, read by every later stage.

``plan.json`` (docs/CONTRACTS.md) is written once by ``python -m preprocess`` and read by training,
prediction, the benchmark and the plots. :class:`Plan` is its one typed reader and writer: it validates a file
once (one error naming the file and the field), keeps keys it does not know so that round trips lose nothing,
and owns what follows from the plan (input shape, class names, the ``<task>_<dim>d`` folder, the case file
names), so no stage re-derives them from a raw dictionary. Plans written by older versions load unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from numbers import Real
from pathlib import Path
from typing import Any

from nnunet_jax.atomic import write_json
from nnunet_jax.io import DatasetError
from nnunet_jax.planning.topology import Topology

__all__ = ["ANISOTROPY_RATIO", "IMAGE_SUFFIX", "PLAN_FILE", "Plan", "case_of", "folder_name", "image_file",
           "label_file", "meta_file"]

PLAN_FILE = "plan.json"
# Coarsest over finest spacing at which a dataset counts as anisotropic (docs/reference.md §5).
ANISOTROPY_RATIO = 3.0

# Keys written in this order; unknown keys (exec_mode, preprocessed, older ones) follow, kept verbatim.
_KNOWN = ("task", "task_name", "dim", "patch_size", "spacing", "labels", "n_class", "regions",
          "regions_class_order", "ignore_label", "modalities", "in_channels", "normalization", "ct_stats",
          "topology", "cases", "median_shape", "source")
_DERIVED = ("anisotropic",)  # older plans stored it; it follows from the spacing


def folder_name(task: str, dim: int) -> str:
    """``<task>_<dim>d``: the preprocessed folder of one task and dimension (``01_3d``)."""
    return f"{task}_{int(dim)}d"


IMAGE_SUFFIX = "_x.npy"


def image_file(case: str) -> str:
    """The preprocessed image of a case: float32 (C, Z, Y, X)."""
    return f"{case}{IMAGE_SUFFIX}"


def case_of(image_path: str | os.PathLike) -> str:
    """The case an image file (``<case>_x.npy``) belongs to."""
    name = Path(image_path).name
    if not name.endswith(IMAGE_SUFFIX):
        raise ValueError(f"{image_path} is not a preprocessed image (<case>{IMAGE_SUFFIX})")
    return name[: -len(IMAGE_SUFFIX)]


def label_file(case: str) -> str:
    """The preprocessed label of a case: uint8 (1, Z, Y, X)."""
    return f"{case}_y.npy"


def meta_file(case: str) -> str:
    """The preprocessing record of a case (:class:`nnunet_jax.preprocessing.CaseMeta`)."""
    return f"{case}_meta.npy"


@dataclass(frozen=True, eq=True)
class Plan:
    """One ``plan.json``; lists are tuples, mappings are plain dicts with string keys (as in the file).

    ``regions`` (name → label values, in head order), ``regions_class_order`` and ``ignore_label`` record an
    nnU-Net v2 dataset's label definition for later stages; None (and absent from the file) otherwise, so
    MSD plans and older files are unchanged.
    """

    dim: int
    patch_size: tuple[int, ...]
    n_class: int
    in_channels: int
    task: str = ""
    task_name: str = ""
    spacing: tuple[float, ...] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    regions: dict[str, tuple[int, ...]] | None = None
    regions_class_order: tuple[int, ...] | None = None
    ignore_label: int | None = None
    modalities: dict[str, str] = field(default_factory=dict)
    normalization: str = "MRI"
    ct_stats: tuple[float, ...] | None = None
    topology: Topology | None = None
    cases: dict[str, list[str]] | None = None
    median_shape: tuple[float, ...] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not interpret

    # ------------------------------------------------------------------------------------ reading, writing
    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """``plan.json``, or a folder holding one; :class:`DatasetError` names the file and what is wrong."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / PLAN_FILE
        if not path.is_file():
            raise DatasetError(f"{path} is missing: no plan (preprocess the training data first)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw, where=path)

    @classmethod
    def coerce(cls, plan: Plan | Mapping[str, Any] | str | os.PathLike, where: str | os.PathLike = "plan"
               ) -> Plan:
        """A Plan from a Plan, a plan dictionary, or a path (file or folder)."""
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, Mapping):
            return cls.from_dict(plan, where=where)
        return cls.load(plan)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str | os.PathLike = "plan") -> Plan:
        """Validate a plan dictionary; the one error names ``where`` and the field."""
        if not isinstance(d, Mapping):
            raise DatasetError(f"{where}: a plan is a JSON object, got {type(d).__name__}")

        def fail(key: str, why: str) -> DatasetError:
            return DatasetError(f"{where}: field '{key}' {why}")

        def integer(key: str, low: int) -> int:
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, Real) or int(v) != v or v < low:
                raise fail(key, f"must be an integer >= {low}, got {v!r}")
            return int(v)

        def numbers(key: str, kind: type, n: int | None = None) -> tuple | None:
            v = d.get(key)
            if v is None:
                return None
            ok = isinstance(v, Sequence) and not isinstance(v, str) and all(
                isinstance(x, Real) and not isinstance(x, bool) for x in v)
            if not ok or (n is not None and len(v) != n):
                raise fail(key, f"must be a list of {n if n is not None else 'some'} numbers, got {v!r}")
            if kind is int and any(int(x) != x or x < 1 for x in v):
                raise fail(key, f"must hold positive integers, got {v!r}")
            return tuple(kind(x) for x in v)

        def mapping(key: str) -> dict:
            v = d.get(key)
            if v is None:
                return {}
            if not isinstance(v, Mapping):
                raise fail(key, f"must be an object, got {v!r}")
            return dict(v)

        missing = [k for k in ("dim", "patch_size", "n_class", "in_channels") if k not in d]
        if missing:
            raise DatasetError(f"{where} lacks the keys {missing}")
        dim = integer("dim", 2)
        if dim not in (2, 3):
            raise fail("dim", f"must be 2 or 3, got {dim}")
        patch = numbers("patch_size", int)
        if patch is None or len(patch) != dim:
            raise fail("patch_size", f"must have {dim} values for dim {dim}, got {d['patch_size']!r}")
        spacing = numbers("spacing", float, dim)
        if spacing is not None and min(spacing) <= 0:
            raise fail("spacing", f"must be positive, got {list(spacing)}")
        normalization = d.get("normalization", "MRI")
        if normalization not in ("CT", "MRI"):
            raise fail("normalization", f"must be 'CT' or 'MRI', got {normalization!r}")
        ct_stats = numbers("ct_stats", float, 4)
        if normalization == "CT" and ct_stats is None and "ct_stats" in d:
            raise fail("ct_stats", "is needed for CT normalisation: [min, max, mean, std]")
        topology = None
        if d.get("topology") is not None:
            try:
                topology = Topology.from_dict(d["topology"])
            except (KeyError, TypeError, ValueError) as e:
                raise fail("topology", f"needs 'kernels', 'strides' and 'filters' lists of integers ({e})"
                           ) from e
            if len(topology.strides) != len(topology.kernels) or any(
                    len(s) != dim for s in (*topology.strides, *topology.kernels)):
                raise fail("topology", f"kernels and strides must be {dim}-d lists of one length per level")
        cases = d.get("cases")
        if cases is not None:
            if not isinstance(cases, Mapping) or any(not isinstance(v, list) or not all(
                    isinstance(c, str) for c in v) for v in cases.values()):
                raise fail("cases", f"must map 'training'/'test' to lists of case names, got {cases!r}")
            cases = {str(k): list(v) for k, v in cases.items()}
        labels = {str(k): str(v) for k, v in mapping("labels").items()}
        regions = None
        if d.get("regions") is not None:
            regions = mapping("regions")
            if not regions or any(not isinstance(v, Sequence) or isinstance(v, str) or not v or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
                    for v in regions.values()):
                raise fail("regions", f"must map region names to non-empty lists of label values, "
                                      f"got {d['regions']!r}")
            regions = {str(k): tuple(int(x) for x in v) for k, v in regions.items()}
        order = d.get("regions_class_order")
        if order is not None:
            if regions is None:
                raise fail("regions_class_order", "needs 'regions'")
            if (not isinstance(order, Sequence) or isinstance(order, str) or len(order) != len(regions)
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in order)):
                raise fail("regions_class_order", f"must be one label value per region ({len(regions)}), "
                                                  f"got {order!r}")
            order = tuple(int(x) for x in order)
        ignore = d.get("ignore_label")
        if ignore is not None:
            if isinstance(ignore, bool) or not isinstance(ignore, int) or ignore < 1 or str(ignore) in labels:
                raise fail("ignore_label", f"must be a label value > 0 that is not a class in 'labels', "
                                           f"got {ignore!r}")
        return cls(
            dim=dim, patch_size=patch, n_class=integer("n_class", 1), in_channels=integer("in_channels", 1),
            task=str(d.get("task", "")), task_name=str(d.get("task_name", "")), spacing=spacing,
            labels=labels, regions=regions, regions_class_order=order, ignore_label=ignore,
            modalities={str(k): str(v) for k, v in mapping("modalities").items()},
            normalization=normalization, ct_stats=ct_stats, topology=topology, cases=cases,
            median_shape=numbers("median_shape", float, dim), source=mapping("source"),
            extra={k: v for k, v in d.items() if k not in _KNOWN and k not in _DERIVED},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written as ``plan.json`` (lists, string keys); ``None`` fields are left out
        except ``ct_stats``, which the file always carries."""
        out: dict[str, Any] = {
            "task": self.task, "task_name": self.task_name, "dim": self.dim,
            "patch_size": list(self.patch_size),
            "spacing": None if self.spacing is None else list(self.spacing), "labels": dict(self.labels),
            "n_class": self.n_class,
            "regions": None if self.regions is None else {k: list(v) for k, v in self.regions.items()},
            "regions_class_order": (None if self.regions_class_order is None
                                    else list(self.regions_class_order)),
            "ignore_label": self.ignore_label,
            "modalities": dict(self.modalities), "in_channels": self.in_channels,
            "normalization": self.normalization,
            "ct_stats": None if self.ct_stats is None else list(self.ct_stats),
            "topology": None if self.topology is None else self.topology.to_dict(),
            "cases": None if self.cases is None else {k: list(v) for k, v in self.cases.items()},
            "median_shape": None if self.median_shape is None else list(self.median_shape),
            "source": dict(self.source),
        }
        out = {k: v for k, v in out.items() if v is not None or k == "ct_stats"}
        return {**out, **self.extra}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``plan.json`` (into ``path`` if it is a folder) atomically; returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        write_json(self.to_dict(), path)
        return path

    def with_extra(self, **extra: Any) -> Plan:
        """A copy with uninterpreted keys set (e.g. ``exec_mode``, ``preprocessed``)."""
        return replace(self, extra={**self.extra, **extra})

    # -------------------------------------------------------------------------------------- derived values
    @property
    def input_shape(self) -> tuple[int, ...]:
        """One network input without the batch axis, channels last: ``(*patch_size, in_channels)``."""
        return (*self.patch_size, self.in_channels)

    @property
    def folder_name(self) -> str:
        """``<task>_<dim>d``: the preprocessed folder this plan belongs in."""
        return folder_name(self.task, self.dim)

    @property
    def anisotropic(self) -> bool:
        """Coarsest over finest target spacing at least :data:`ANISOTROPY_RATIO`."""
        if self.spacing is None:
            raise DatasetError("the plan has no spacing")
        return max(self.spacing) / min(self.spacing) >= ANISOTROPY_RATIO

    @property
    def label_values(self) -> tuple[int, ...]:
        """The label values the dataset declares (``labels`` keys), sorted; ``0..n_class-1`` if none."""
        if not self.labels:
            return tuple(range(self.n_class))
        return tuple(sorted(int(k) for k in self.labels))

    def class_names(self) -> dict[int, str]:
        """Foreground class index → the dataset's name for it (``"class <i>"`` where it gives none)."""
        return {c: self.labels.get(str(c), f"class {c}") for c in range(1, self.n_class)}

    @property
    def training_cases(self) -> list[str] | None:
        """The training cases the plan lists, or None for older plans without a case list."""
        return None if self.cases is None else list(self.cases.get("training", []))

    @property
    def source_data(self) -> str | None:
        """The raw dataset folder the plan was made from, if recorded."""
        value = self.source.get("data")
        return str(value) if value else None

"""Index over a preprocessed dataset directory (docs/CONTRACTS.md): ``plan.json`` plus per-case
``<case>_x.npy`` (float32 (C, Z, Y, X)), ``<case>_y.npy`` (uint8 (1, Z, Y, X)) and ``<case>_meta.npy``.

The index only checks that files exist and reads array headers (cheap, no data), so a bad directory fails
here with the file named instead of deep inside a DALI pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_jax.data.folds import split_cases
from nnunet_jax.io import DatasetError

__all__ = ["DatasetError", "PreprocessedDataset"]

PLAN_FILE = "plan.json"
_REQUIRED_PLAN_KEYS = ("dim", "patch_size", "n_class", "in_channels")




@dataclass(frozen=True)
class PreprocessedDataset:
    """Cases and plan of one preprocessed directory; paths are absolute."""

    root: Path
    plan: dict[str, Any]
    training: tuple[str, ...]
    test: tuple[str, ...]

    @classmethod
    def open(cls, root: str | Path) -> PreprocessedDataset:
        """Read ``plan.json`` and list the cases; raises :class:`DatasetError` naming what is wrong."""
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise DatasetError(
                f"preprocessed data directory {root} does not exist (run `python -m preprocess`)"
            )
        plan_path = root / PLAN_FILE
        if not plan_path.is_file():
            raise DatasetError(f"{plan_path} is missing: {root} is not a preprocessed dataset")
        try:
            plan = json.loads(plan_path.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{plan_path} is not valid JSON: {e}") from e
        missing = [k for k in _REQUIRED_PLAN_KEYS if k not in plan]
        if missing:
            raise DatasetError(f"{plan_path} lacks the keys {missing}")
        if plan["dim"] not in (2, 3) or len(plan["patch_size"]) != plan["dim"]:
            raise DatasetError(f"{plan_path}: dim {plan['dim']} and patch_size {plan['patch_size']} disagree")
        listed = plan.get("cases") or {}
        on_disk = sorted(p.name[: -len("_x.npy")] for p in root.glob("*_x.npy"))
        if "training" in listed or "test" in listed:
            training, test = list(listed.get("training", [])), list(listed.get("test", []))
        else:  # an older plan without a case list: every case with a label is a training case
            training = [c for c in on_disk if (root / f"{c}_y.npy").is_file()]
            test = [c for c in on_disk if c not in training]
        # Test cases are preprocessed separately into <root>/test (exec_mode test); only training cases must
        # be here. The plan's test list names the cases a later `--exec_mode test` run will write.
        absent = [c for c in training if not (root / f"{c}_x.npy").is_file()]
        if absent:
            raise DatasetError(
                f"{root}: plan.json lists cases without an image file: "
                f"{', '.join(f'{c}_x.npy' for c in absent[:5])}" + (" ..." if len(absent) > 5 else "")
            )
        return cls(root, plan, tuple(sorted(training)), tuple(sorted(test)))

    @property
    def dim(self) -> int:
        return int(self.plan["dim"])

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.plan["patch_size"])

    @property
    def n_class(self) -> int:
        return int(self.plan["n_class"])

    @property
    def in_channels(self) -> int:
        return int(self.plan["in_channels"])

    def image_path(self, case: str) -> Path:
        return self.root / f"{case}_x.npy"

    def label_path(self, case: str) -> Path:
        return self.root / f"{case}_y.npy"

    def meta_path(self, case: str) -> Path:
        return self.root / f"{case}_meta.npy"

    def check_labels(self, cases: list[str] | tuple[str, ...]) -> None:
        """Raise :class:`DatasetError` naming the cases whose label file is missing or mismatched."""
        missing = [c for c in cases if not self.label_path(c).is_file()]
        if missing:
            raise DatasetError(
                f"{self.root}: cases without a label file (<case>_y.npy): {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )
        for c in cases:
            x = np.load(self.image_path(c), mmap_mode="r")
            y = np.load(self.label_path(c), mmap_mode="r")
            if x.ndim != 4 or y.shape != (1, *x.shape[1:]):
                raise DatasetError(
                    f"{self.label_path(c)}: label shape {y.shape} does not match image "
                    f"{self.image_path(c).name} shape {x.shape} (want (1, Z, Y, X))"
                )

    def fold(self, fold: int, n_splits: int = 5) -> tuple[list[str], list[str]]:
        """(train, validation) case names of ``fold`` (the reference's KFold split); checks their labels."""
        train, val = split_cases(self.training, fold, n_splits)
        self.check_labels(train + val)
        return train, val

    def shape(self, case: str) -> tuple[int, ...]:
        """On-disk image shape (C, Z, Y, X) from the .npy header."""
        return tuple(np.load(self.image_path(case), mmap_mode="r").shape)

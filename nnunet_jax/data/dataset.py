"""Index over a preprocessed dataset directory (docs/CONTRACTS.md): ``plan.json`` plus per-case
``<case>_x.npy`` (float32 (C, Z, Y, X)), ``<case>_y.npy`` (uint8 (1, Z, Y, X)) and ``<case>_meta.npy``.

The index only checks that files exist and reads array headers (cheap, no data), so a bad directory fails
here with the file named instead of deep inside a DALI pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_jax.data.folds import split_cases
from nnunet_jax.io import DatasetError
from nnunet_jax.plan import IMAGE_SUFFIX, PLAN_FILE, Plan, case_of, image_file, label_file, meta_file

__all__ = ["DatasetError", "PreprocessedDataset"]


@dataclass(frozen=True)
class PreprocessedDataset:
    """Cases and plan of one preprocessed directory; paths are absolute."""

    root: Path
    plan: Plan
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
        plan = Plan.load(plan_path)
        on_disk = sorted(case_of(p) for p in root.glob(f"*{IMAGE_SUFFIX}"))
        if plan.cases is not None and ("training" in plan.cases or "test" in plan.cases):
            training, test = list(plan.cases.get("training", [])), list(plan.cases.get("test", []))
        else:  # an older plan without a case list: every case with a label is a training case
            training = [c for c in on_disk if (root / label_file(c)).is_file()]
            test = [c for c in on_disk if c not in training]
        # Test cases are preprocessed separately into <root>/test (exec_mode test); only training cases must
        # be here. The plan's test list names the cases a later `--exec_mode test` run will write.
        absent = [c for c in training if not (root / image_file(c)).is_file()]
        if absent:
            raise DatasetError(
                f"{root}: plan.json lists cases without an image file: "
                f"{', '.join(image_file(c) for c in absent[:5])}" + (" ..." if len(absent) > 5 else "")
            )
        return cls(root, plan, tuple(sorted(training)), tuple(sorted(test)))

    @property
    def dim(self) -> int:
        return self.plan.dim

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.plan.patch_size

    @property
    def n_class(self) -> int:
        return self.plan.n_class

    @property
    def in_channels(self) -> int:
        return self.plan.in_channels

    def image_path(self, case: str) -> Path:
        return self.root / image_file(case)

    def label_path(self, case: str) -> Path:
        return self.root / label_file(case)

    def meta_path(self, case: str) -> Path:
        return self.root / meta_file(case)

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
        n = len(self.training)
        if n < n_splits:
            raise DatasetError(f"{self.root}: {n} training case{'s' * (n != 1)} cannot be split into "
                               f"{n_splits} folds; pass --nfolds {n} or fewer (at least 2), or add cases")
        if not 0 <= fold < n_splits:
            raise DatasetError(f"--fold {fold} is not one of the {n_splits} folds 0..{n_splits - 1} "
                               f"(--nfolds {n_splits})")
        train, val = split_cases(self.training, fold, n_splits)
        self.check_labels(train + val)
        return train, val

    def shape(self, case: str) -> tuple[int, ...]:
        """On-disk image shape (C, Z, Y, X) from the .npy header."""
        return tuple(np.load(self.image_path(case), mmap_mode="r").shape)

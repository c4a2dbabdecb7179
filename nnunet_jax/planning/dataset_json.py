"""dataset.json (Medical Segmentation Decathlon format): finding, loading and checking it before any work.

Everything a run needs from the raw dataset is checked here up front (keys, label and modality tables, that
every listed file exists and is NIfTI), so a typo is reported in one line before processes are started.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_jax.configs.tasks import TaskInfo, get_task
from nnunet_jax.io import NIFTI_SUFFIXES, DatasetError, case_name


@dataclass(frozen=True)
class CaseFiles:
    name: str
    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    """The parsed dataset.json of one task folder; paths are absolute."""

    root: Path
    name: str
    modalities: dict[str, str]
    labels: dict[str, str]
    training: list[CaseFiles]
    test: list[CaseFiles]
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def n_class(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    @property
    def label_values(self) -> list[int]:
        return sorted(int(k) for k in self.labels)

    @property
    def is_ct(self) -> bool:
        """The reference normalises as CT when the first modality is called CT."""
        return self.modalities.get("0", "").strip().upper() == "CT"

    def cases(self, exec_mode: str) -> list[CaseFiles]:
        """training/val: the labelled training list; test: the test images."""
        return self.test if exec_mode == "test" else self.training


def find_task_dir(data: str | os.PathLike, task: str) -> tuple[Path, TaskInfo | None]:
    """Resolve ``--task``: an MSD number ('01', '4') under ``data`` or a path to a custom dataset folder."""
    info = get_task(task)
    if info is not None:
        path = Path(data) / info.folder
        if not path.is_dir():
            raise DatasetError(f"task {task}: folder {path} does not exist (download or generate it first)")
        return path, info
    candidates = [Path(task), Path(data) / task]
    if task.isdigit():
        candidates += sorted(Path(data).glob(f"Task{int(task):02d}_*"))
    for path in candidates:
        if path.is_dir():
            return path, None
    raise DatasetError(f"task {task!r}: not an MSD task number and no folder {task!r} or {Path(data) / task}")


def _resolve(root: Path, entry: object, where: str) -> Path:
    if not isinstance(entry, str) or not entry:
        raise DatasetError(f"{where}: expected a file path, got {entry!r}")
    path = (root / entry).resolve()
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise DatasetError(f"{where}: {entry} is not a NIfTI file name (.nii or .nii.gz)")
    if not path.is_file():
        raise DatasetError(f"{where}: listed file {path} is missing")
    return path


def _int_keyed(table: object, key: str, path: Path) -> dict[str, str]:
    if not isinstance(table, dict) or not table:
        raise DatasetError(f"{path}: '{key}' must be a non-empty object like {{\"0\": \"...\"}}")
    try:
        by_int = {int(k): v for k, v in table.items()}
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: '{key}' keys must be integers, got {list(table)}") from None
    if sorted(by_int) != list(range(len(table))):
        raise DatasetError(f"{path}: '{key}' keys must be 0..{len(table) - 1}, got {list(table)}")
    return {str(k): str(by_int[k]) for k in sorted(by_int)}


def load_dataset(root: str | os.PathLike, check_files: bool = True) -> Dataset:
    """Read and check ``root/dataset.json``; every problem is a :class:`DatasetError` naming file and key."""
    root = Path(root).resolve()
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path} is missing: a task folder needs an MSD-style dataset.json")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} cannot be read: {e}") from e
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level")
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise DatasetError(f"{path}: required key '{key}' is missing")
    modalities = _int_keyed(meta["modality"], "modality", path)
    labels = _int_keyed(meta["labels"], "labels", path)
    if len(labels) < 2:
        raise DatasetError(f"{path}: 'labels' must declare background (0) and at least one class")

    training: list[CaseFiles] = []
    if not isinstance(meta["training"], list):
        raise DatasetError(f"{path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}}")
    for i, entry in enumerate(meta["training"]):
        where = f"{path}: training[{i}]"
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f"{where}: expected {{\"image\": ..., \"label\": ...}}, got {entry!r}")
        if check_files:
            image, label = _resolve(root, entry["image"], where), _resolve(root, entry["label"], where)
        else:
            image, label = (root / entry["image"]).resolve(), (root / entry["label"]).resolve()
        training.append(CaseFiles(case_name(image), image, label))
    test: list[CaseFiles] = []
    test_list = meta.get("test", [])
    if not isinstance(test_list, list):
        raise DatasetError(f"{path}: 'test' must be a list of image paths")
    for i, entry in enumerate(test_list):
        where = f"{path}: test[{i}]"
        entry = entry.get("image") if isinstance(entry, dict) else entry
        image = _resolve(root, entry, where) if check_files else (root / str(entry)).resolve()
        test.append(CaseFiles(case_name(image), image))
    for kind, cases in (("training", training), ("test", test)):
        names = [c.name for c in cases]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise DatasetError(f"{path}: '{kind}' lists case names more than once: {dups}")
    if not training:
        raise DatasetError(f"{path}: 'training' is empty")
    return Dataset(root, str(meta.get("name", root.name)), modalities, labels, training, test, meta)

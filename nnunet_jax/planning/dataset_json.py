"""A raw dataset folder: finding it (``--task``), loading and checking its dataset.json before any work.

Two layouts are read into one :class:`Dataset`:

- **MSD** (Medical Segmentation Decathlon): dataset.json with ``modality``, ``labels`` {"0": "background"},
  ``training`` [{image, label}] and ``test``; 3D or 4D NIfTI files.
- **nnU-Net v2 raw** (docs/nnunetv2.md §1): dataset.json with ``channel_names``, ``labels`` name → value (or
  → list of values: a region), ``file_ending`` and ``numTraining``; ``imagesTr/<case>_<XXXX><ending>`` per
  channel, ``labelsTr/<case><ending>``, optional ``imagesTs/``. Its fields are parsed by v2's own rules
  (:class:`~nnunet_jax.interop.nnunetv2.plans.V2Labels`); the cases are the label files present.

A dataset.json with a ``training`` list is MSD (exactly as before); one without it but with v2's keys is v2.
Everything a run needs from the raw dataset is checked here up front (keys, label and channel tables, that
every case's files exist and can be read), so a typo is reported in one line before processes are started.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_jax.configs.tasks import TASKS, TaskInfo, get_task
from nnunet_jax.interop.nnunetv2.imageio import NATURAL_ENDINGS, reader_kind
from nnunet_jax.interop.nnunetv2.plans import V2Labels
from nnunet_jax.io import NIFTI_SUFFIXES, ChannelFiles, DatasetError, case_name, require_reader

MSD, V2 = "msd", "nnunetv2"  # Dataset.layout


@dataclass(frozen=True)
class CaseFiles:
    """One case's files; ``image`` is a NIfTI path (MSD) or the :class:`ChannelFiles` of a v2 case."""

    name: str
    image: Path | ChannelFiles
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    """The parsed dataset.json of one task folder; paths are absolute.

    ``labels`` is {"<value>": name} in both layouts (the classes: a v2 ``ignore`` value is not one); ``v2``
    keeps a v2 dataset's full label definition (regions, ``ignore``) for the plan; ``notes`` are warnings
    for the user (e.g. v2 images without a label, which are not used).
    """

    root: Path
    name: str
    modalities: dict[str, str]
    labels: dict[str, str]
    training: list[CaseFiles]
    test: list[CaseFiles]
    raw: dict = field(repr=False, default_factory=dict)
    layout: str = MSD
    v2: V2Labels | None = field(default=None, repr=False)
    notes: tuple[str, ...] = ()

    @property
    def n_class(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    @property
    def ignore_label(self) -> int | None:
        """The v2 ``ignore`` value (kept in the label maps as is), or None."""
        return self.v2.ignore_label if self.v2 is not None else None

    @property
    def label_values(self) -> list[int]:
        """The values a label file may hold: the classes, and a v2 ``ignore`` value."""
        values = sorted(int(k) for k in self.labels)
        return values if self.ignore_label is None else [*values, self.ignore_label]

    @property
    def is_ct(self) -> bool:
        """The reference normalises as CT when the first modality is called CT."""
        return self.modalities.get("0", "").strip().upper() == "CT"

    def cases(self, exec_mode: str) -> list[CaseFiles]:
        """training/val: the labelled training list; test: the test images."""
        return self.test if exec_mode == "test" else self.training


def find_task_dir(data: str | os.PathLike, task: str) -> tuple[Path, TaskInfo | None]:
    """Resolve ``--task`` to a dataset folder (and the MSD table entry, if it is an MSD task).

    - a number with two digits (``01``, ``42``): the MSD folder, exactly as before (the table's
      ``Task01_BrainTumour`` under ``data``, else a ``Task42_*`` folder), even when a ``Dataset001_*`` exists;
      only when there is no such MSD folder (and the number is not in the MSD table), ``Dataset042_*``;
    - three or more digits (``001``): nnU-Net v2's ``Dataset001_*`` under ``data``; without one, the MSD
      task of that number (what ``001`` meant before);
    - one digit (``1``): whichever of MSD ``Task01`` and v2 ``Dataset001_*`` exists; both is an error;
    - a name (``Task01_BrainTumour``, ``Dataset001_Name``, ``MyDataset``) or a path: that folder (a path as
      given, else under ``data``).
    Missing or ambiguous: one :class:`DatasetError` listing the dataset folders found in ``data``.
    """
    key = task.strip()
    data = Path(data)
    if key.isdigit():
        return _numbered_task(data, key)
    info = get_task(key)
    if info is not None:
        path = data / info.folder
        if not path.is_dir():
            raise DatasetError(f"task {task}: folder {path} does not exist (download or generate it first)")
        return path, info
    for path in (Path(key), data / key):
        if path.is_dir():
            return path, None
    raise DatasetError(f"task {task!r}: not an MSD task number and no folder {task!r} or {data / key}; "
                       f"{_found(data)}")


def _found(data: Path) -> str:
    """What ``data`` holds that ``--task`` could name, for error messages."""
    try:
        names = sorted(p.name for p in data.iterdir()
                       if p.is_dir() and re.match(r"(Task\d+|Dataset\d+)_", p.name))
    except OSError:
        return f"{data} cannot be listed"
    return f"found in {data}: {', '.join(names)}" if names else f"no TaskXX_*/DatasetXXX_* folders in {data}"


def _numbered_task(data: Path, key: str) -> tuple[Path, TaskInfo | None]:
    """``find_task_dir`` for a task number (rules in its docstring)."""
    n = int(key)
    info = TASKS.get(f"{n:02d}")
    if info is not None:
        msd = [(data / info.folder, info)] if (data / info.folder).is_dir() else []
    else:  # a custom MSD-layout task: as before, a folder named by the number, else TaskNN_*
        msd = [(p, None) for p in (Path(key), data / key) if p.is_dir()]
        msd += [(p, None) for p in sorted(data.glob(f"Task{n:02d}_*")) if p.is_dir()]
    v2 = sorted(p for p in data.glob(f"Dataset{n:03d}_*") if p.is_dir())
    if len(v2) > 1:
        raise DatasetError(f"task {key}: several nnU-Net v2 folders have the number {n:03d}: "
                           f"{', '.join(p.name for p in v2)} (give the folder name or path as --task)")
    if len(key) == 2:  # the MSD meaning first, as before
        if msd:
            return msd[0]
        if info is not None:
            hint = f" (for the nnU-Net v2 dataset {v2[0].name} use --task {n:03d})" if v2 else ""
            raise DatasetError(f"task {key}: folder {data / info.folder} does not exist (download or "
                               f"generate it first){hint}; {_found(data)}")
    elif len(key) == 1 and msd and v2:
        raise DatasetError(f"task {key} is ambiguous: MSD {msd[0][0].name} (--task {n:02d}) and nnU-Net v2 "
                           f"{v2[0].name} (--task {n:03d}); give one of those")
    if v2:
        return v2[0], None
    if msd:
        return msd[0]
    msd_where = data / info.folder if info is not None else f"{data}/Task{n:02d}_*"
    raise DatasetError(f"task {key}: neither an nnU-Net v2 folder {data}/Dataset{n:03d}_* nor the MSD folder "
                       f"{msd_where} exists (download or generate it first); {_found(data)}")


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
    """Read and check ``root/dataset.json`` (MSD or nnU-Net v2 raw layout, see the module docstring); every
    problem is a :class:`DatasetError` naming file and key. ``check_files=False``: only what the file says
    (MSD) or the files there are (v2), without checking that each case is complete."""
    root = Path(root).resolve()
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path} is missing: a task folder needs a dataset.json (MSD or nnU-Net v2)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} cannot be read: {e}") from e
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level")
    if is_v2_dataset_json(meta):
        return _load_v2(root, path, meta, check_files)
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


# ------------------------------------------------------------------------------------ nnU-Net v2 raw layout


def is_v2_dataset_json(meta: dict) -> bool:
    """nnU-Net v2 layout: no MSD ``training`` list, and v2's keys (``file_ending``, ``channel_names``) or its
    labels (name → value) — so a broken v2 file gets v2's error for the field, not "'training' is missing"."""
    if "training" in meta:
        return False
    labels = meta.get("labels")
    v2_labels = isinstance(labels, dict) and "background" in labels
    return "file_ending" in meta or "channel_names" in meta or v2_labels


def _v2_reader(labels: V2Labels, path: Path) -> str:
    """The v2 reader for the dataset's files, chosen as v2 does (``overwrite_image_reader_writer``, else by
    ``file_ending``: 2D natural images, else SimpleITKIO, which this port reads NIfTI with nibabel)."""
    ending = labels.file_ending
    if labels.overwrite_image_reader_writer is not None:
        reader, key = labels.overwrite_image_reader_writer, "overwrite_image_reader_writer"
    else:
        reader = "NaturalImage2DIO" if ending.lower() in NATURAL_ENDINGS else "SimpleITKIO"
        key = "file_ending"
    try:
        reader_kind(reader, f"case_0000{ending}")
    except DatasetError as e:
        raise DatasetError(f"{path}: field {key!r} ({reader} for {ending!r} files) is not supported: "
                           f"{str(e).split(': ', 1)[1]}") from None
    return reader


def _v2_label_names(labels: V2Labels) -> dict[str, str]:
    """{"<value>": name} for every label value: a value's own name, or a one-value region's (regions), or
    ``label <v>``; ``ignore`` is no class."""
    names: dict[str, str] = {}
    for name, v in labels.labels.items():
        if name == "ignore":
            continue
        values = (v,) if isinstance(v, int) else v
        if len(values) == 1:
            names.setdefault(str(values[0]), name)
    return {str(v): names.get(str(v), f"label {v}") for v in labels.all_labels}


def _channel_files(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    """``{case: {channel: file}}`` of the ``<case>_<XXXX><ending>`` files in ``folder`` (v2's rule)."""
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    found: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        m = pattern.fullmatch(p.name)
        if m and p.is_file():
            found.setdefault(m.group(1), {})[int(m.group(2))] = p
    return found


def _v2_case(folder: Path, case: str, channels: dict[int, Path] | None, n: int, labels: V2Labels,
             reader: str, check: bool) -> ChannelFiles | None:
    """The channel files of one case, all of ``_0000`` .. ``_<n-1>`` present (a 2D colour image may hold
    every channel in ``_0000``); else one error naming the case and the first missing file."""
    ending = labels.file_ending
    channels = channels or {}
    extra = sorted(i for i in channels if i >= n)
    missing = [i for i in range(n) if i not in channels]
    colour = ending.lower() in NATURAL_ENDINGS and sorted(channels) == [0]  # RGB(A) in one file, as v2
    declared = f"{labels.source} declares {n} channel(s): {', '.join(labels.channel_names.values())}"
    if check and missing and not colour:
        raise DatasetError(f"case {case!r}: channel file {folder / f'{case}_{missing[0]:04d}{ending}'} is "
                           f"missing ({declared})")
    if check and extra:
        raise DatasetError(f"case {case!r}: {channels[extra[0]]} is channel {extra[0]}, but {declared}")
    paths = tuple(channels[i] for i in sorted(channels) if i < n)
    return ChannelFiles(case, paths, reader) if paths else None


def _load_v2(root: Path, path: Path, meta: dict, check_files: bool) -> Dataset:
    """The v2 raw layout (module docstring): v2's field rules, its file names, its checks of the case list."""
    labels = V2Labels.from_dataset_json(meta, str(path))
    if "dataset" in meta:
        raise DatasetError(f"{path}: field 'dataset' (explicit file lists) is not supported: put the files "
                           "in imagesTr/ and labelsTr/ as <case>_<XXXX><file_ending> and <case><file_ending>")
    expected = [*labels.all_labels, *([labels.ignore_label] if labels.ignore_label is not None else [])]
    if expected != list(range(len(expected))):
        raise DatasetError(f"{path}: field 'labels' must use consecutive values 0, 1, 2, ... (nnU-Net v2's "
                           f"rule), got {expected}")
    if len(labels.all_labels) < 2:
        raise DatasetError(f"{path}: field 'labels' must declare background (0) and at least one class")
    reader = _v2_reader(labels, path)
    ending, n = labels.file_ending, labels.num_channels
    images_tr, labels_tr, images_ts = root / "imagesTr", root / "labelsTr", root / "imagesTs"
    for folder in (images_tr, labels_tr):
        if not folder.is_dir():
            raise DatasetError(f"{folder} is missing: an nnU-Net v2 dataset ({path}) keeps its training "
                               f"{'images' if folder is images_tr else 'labels'} there")
    label_files = {p.name[: -len(ending)]: p for p in sorted(labels_tr.iterdir())
                   if p.is_file() and p.name.endswith(ending) and len(p.name) > len(ending)
                   and not p.name.startswith(".")}
    if check_files and labels.num_training is not None and labels.num_training != len(label_files):
        raise DatasetError(f"{path}: field 'numTraining' is {labels.num_training}, but {labels_tr} holds "
                           f"{len(label_files)} label files ending in {ending!r} (nnU-Net v2 refuses it too)")
    if check_files and not label_files:
        raise DatasetError(f"{labels_tr}: no label files ending in {ending!r} ('file_ending' of {path})")
    tr_channels = _channel_files(images_tr, ending)
    training: list[CaseFiles] = []
    for c, label_file in label_files.items():
        files = _v2_case(images_tr, c, tr_channels.get(c), n, labels, reader, check_files)
        if files is not None:
            training.append(CaseFiles(c, files, label_file.resolve()))
    test: list[CaseFiles] = []
    if images_ts.is_dir():
        ts_channels = _channel_files(images_ts, ending)
        for c in sorted(ts_channels):
            files = _v2_case(images_ts, c, ts_channels[c], n, labels, reader, check_files)
            if files is not None:
                test.append(CaseFiles(c, files))
    if check_files and training:  # one reader for all: SimpleITK, if needed, is missing for every file
        require_reader(reader, training[0].image.paths[0])
    unlabelled = sorted(set(tr_channels) - set(label_files))
    notes = ()
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
        notes = (f"{images_tr}: {len(unlabelled)} case(s) have images but no label in {labels_tr} and are "
                 f"not used: {shown}",)
    modalities = {str(k): v for k, v in labels.channel_names.items()}
    return Dataset(root, str(meta.get("name", root.name)), modalities, _v2_label_names(labels), training,
                   test, meta, layout=V2, v2=labels, notes=notes)

"""The Medical Segmentation Decathlon task table (docs/reference.md §5), the one place every stage reads it
from.

Axis order of patch sizes and spacings is the on-disk order (Z, Y, X).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    """Static facts about one MSD task as the reference nnU-Net ships them."""

    number: str
    folder: str
    patch_3d: tuple[int, int, int]
    spacing_3d: tuple[float, float, float]
    patch_2d: tuple[int, int]
    ct_stats: tuple[float, float, float, float] | None = None  # (min, max, mean, std) after clipping
    url: str | None = None

    @property
    def spacing_2d(self) -> tuple[float, float]:
        """The 2D spacing is the in-plane part of the 3D spacing."""
        return self.spacing_3d[1:]

    def patch(self, dim: int) -> tuple[int, ...]:
        return self.patch_3d if dim == 3 else self.patch_2d

    def spacing(self, dim: int) -> tuple[float, ...]:
        return self.spacing_3d if dim == 3 else self.spacing_2d


_MSD = "https://msd-for-monai.s3-us-west-2.amazonaws.com/{}.tar"

TASKS: dict[str, TaskInfo] = {
    t.number: t
    for t in [
        # The embedded default: a small synthetic multi-modal MRI task (nnunet_jax.datasets.synthetic).
        TaskInfo("00", "Task00_Synthetic", (32, 32, 32), (1.0, 1.0, 1.0), (32, 32)),
        TaskInfo("01", "Task01_BrainTumour", (128, 128, 128), (1.0, 1.0, 1.0), (192, 160)),
        TaskInfo("02", "Task02_Heart", (80, 192, 160), (1.37, 1.25, 1.25), (320, 256)),
        TaskInfo("03", "Task03_Liver", (128, 128, 128), (1.0, 0.7676, 0.7676), (512, 512),
                 (-17.0, 201.0, 99.4, 39.36)),
        TaskInfo("04", "Task04_Hippocampus", (40, 56, 40), (1.0, 1.0, 1.0), (56, 40)),
        TaskInfo("05", "Task05_Prostate", (20, 320, 256), (3.6, 0.62, 0.62), (320, 320)),
        TaskInfo("06", "Task06_Lung", (80, 192, 160), (1.24, 0.79, 0.79), (512, 512),
                 (-1024.0, 325.0, -158.58, 324.7)),
        TaskInfo("07", "Task07_Pancreas", (40, 224, 224), (2.5, 0.8, 0.8), (512, 512),
                 (-96.0, 215.0, 77.9, 75.4)),
        TaskInfo("08", "Task08_HepaticVessel", (64, 192, 192), (1.5, 0.8, 0.8), (512, 512),
                 (-3.0, 243.0, 104.37, 52.62)),
        TaskInfo("09", "Task09_Spleen", (64, 192, 160), (1.6, 0.79, 0.79), (512, 512),
                 (-41.0, 176.0, 99.29, 39.47)),
        TaskInfo("10", "Task10_Colon", (56, 192, 160), (3.0, 0.78, 0.78), (512, 512),
                 (-30.0, 165.82, 62.18, 32.65)),
    ]
}

for _t in TASKS.values():
    if _t.number != "00":
        object.__setattr__(_t, "url", _MSD.format(_t.folder))


def get_task(task: str) -> TaskInfo | None:
    """Look a task up by number ('1', '01') or folder name; None for a custom dataset."""
    key = task.strip()
    if key.isdigit():
        return TASKS.get(f"{int(key):02d}")
    for t in TASKS.values():
        if t.folder == key:
            return t
    return None

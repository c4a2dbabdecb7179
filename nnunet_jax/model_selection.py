"""find_best_configuration.py's library: which configuration (or pair of configurations) to predict with.

As nnU-Net v2's ``find_best_configuration``: every configuration's cross-validation Dice is scored on the
validation predictions of all its folds together; every pair's ensemble (mean of the two configurations'
probabilities, then argmax or the region thresholds) is scored on the same cases; the best score wins (a tie
goes to the first: single configurations come before ensembles); the post-processing is decided for the
winner only (:mod:`nnunet_jax.postprocessing`). Scores are v2's ``foreground_mean`` Dice (the mean over
classes/regions of the mean over cases, a case with both masks empty left out), so they can differ from
evaluate.py's, which counts such a case as 1.

A configuration is named on the command line as ``NAME=PREDICTIONS:RUNS``, both paths with ``{fold}``
standing for the fold number (:func:`parse_configuration`): the folders ``predict.py --fold k --save_preds``
wrote, and the training runs (``train.py --fold k --results ...``) that wrote them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_jax import postprocessing as pp
from nnunet_jax.scoring import index_folder, load_segmentation

FOLD = "{fold}"


@dataclass(frozen=True)
class Configuration:
    """One configuration's cross-validation: each fold's validation predictions and the run that made
    them."""

    name: str
    predictions: tuple[Path, ...]
    runs: tuple[Path, ...]


def parse_configuration(text: str, folds: Sequence[int]) -> Configuration:
    """``NAME=PREDICTIONS:RUNS`` (``{fold}`` in both paths) → the folders of each fold; ValueError says why
    not."""
    name, eq, rest = text.partition("=")
    preds, colon, runs = rest.partition(":")
    if not (eq and colon and name and preds and runs) or FOLD not in preds or FOLD not in runs:
        raise ValueError(f"--config {text!r}: expected NAME=PREDICTIONS:RUNS with {FOLD} in both paths, e.g. "
                         f"3d=/results/3d/preds_{FOLD}:/results/3d/fold{FOLD}")
    return Configuration(name, tuple(Path(preds.replace(FOLD, str(f))) for f in folds),
                         tuple(Path(runs.replace(FOLD, str(f))) for f in folds))


def prediction_index(config: Configuration) -> dict[str, Path]:
    """``{case: prediction}`` of all folds; a missing or empty fold folder or a case predicted by two folds is
    an error naming the files."""
    index: dict[str, Path] = {}
    for folder in config.predictions:
        if not folder.is_dir():
            raise FileNotFoundError(f"configuration {config.name}: no prediction folder {folder}")
        found, _ = index_folder(folder)
        if not found:
            raise ValueError(f"configuration {config.name}: {folder} holds no predictions")
        for case, path in found.items():
            if case in index:
                raise ValueError(f"configuration {config.name}: case {case} is in two folds: {index[case]} "
                                 f"and {path}")
            index[case] = path
    return index


@dataclass
class Candidate:
    """A configuration, or an ensemble of two, and its cross-validation scores."""

    name: str
    members: tuple[Configuration, ...]
    scores: pp.Scores | None = None

    @property
    def dice(self) -> float:
        return self.scores.mean if self.scores is not None else math.nan

    @property
    def runs(self) -> list[str]:
        return [pp.run_dir(r) for m in self.members for r in m.runs]


class Selection:
    """The cases, labels and label meaning shared by every configuration; how to load their predictions."""

    def __init__(self, configs: Sequence[Configuration], labels: str | os.PathLike, spec: Any):
        if not configs:
            raise ValueError("give at least one configuration (--config)")
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"configuration names must differ: {', '.join(names)}")
        self.configs, self.labels, self.spec = list(configs), Path(labels), spec
        self.targets, self.foreground, self.ignore = pp.targets_of(spec)
        self.indexes = {c.name: prediction_index(c) for c in configs}
        label_index, _ = index_folder(self.labels)
        first = configs[0]
        self.cases = sorted(self.indexes[first.name])
        for c in configs:
            index = self.indexes[c.name]
            for case, path in index.items():
                if case not in label_index:
                    raise ValueError(f"{path}: no label for case {case} in {self.labels}")
            differ = sorted(set(index) ^ set(self.cases))
            if differ:
                raise ValueError(f"configurations {first.name} and {c.name} predicted different cases (e.g. "
                                 f"{differ[0]}): every configuration needs the same folds")
        self.label_index = label_index

    def _label(self, case: str) -> np.ndarray:
        return load_segmentation(self.label_index[case]).labels

    def loader(self, members: Sequence[Configuration]) -> pp.CaseLoader:
        """case → (predicted labels, reference labels): one configuration's masks, or the argmax/regions of
        the mean of several configurations' probabilities (``<case>.npy`` beside the masks)."""
        if len(members) == 1:
            index, brats = self.indexes[members[0].name], getattr(self.spec, "brats", False)
            return lambda case: (load_segmentation(index[case], brats).labels, self._label(case))

        def ensemble(case: str) -> tuple[np.ndarray, np.ndarray]:
            probs = [np.load(_probabilities(m.name, self.indexes[m.name][case].parent, case),
                             allow_pickle=False) for m in members]
            if len({p.shape for p in probs}) != 1:
                raise ValueError(f"case {case}: probability shapes differ between "
                                 f"{', '.join(m.name for m in members)}: {[p.shape for p in probs]}")
            return self.spec.to_labels(np.mean(probs, axis=0)), self._label(case)

        return ensemble

    def score(self, candidate: Candidate) -> Candidate:
        candidate.scores = pp.score_cases(self.cases, self.loader(candidate.members), [], self.targets,
                                          self.ignore)
        return candidate

    def candidates(self, ensembles: bool = True) -> list[Candidate]:
        """Every configuration, then (with ``ensembles``) every pair, scored."""
        out = [Candidate(c.name, (c,)) for c in self.configs]
        if ensembles:
            out += [Candidate(f"{a.name}+{b.name}", (a, b)) for a, b in combinations(self.configs, 2)]
        return [self.score(c) for c in out]

    def decide(self, best: Candidate, log: Callable[[str], None] | None = None) -> pp.Decision:
        """The post-processing of ``best``, with where it came from (runs, predictions, labels)."""
        decision = pp.determine(self.cases, self.loader(best.members), self.targets, self.foreground,
                                self.ignore, log)
        decision.sources = {"configuration": best.name, "runs": best.runs,
                            "predictions": [str(p.resolve()) for m in best.members for p in m.predictions],
                            "labels": str(self.labels.resolve())}
        return decision


def _probabilities(name: str, folder: Path, case: str) -> Path:
    path = folder / f"{case}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} is missing: ensembles need the probabilities (predict.py "
                                "--save_preds)")
    return path


def best_of(candidates: Sequence[Candidate]) -> Candidate:
    """The highest Dice; the first of a tie (v2: the simpler one); NaN never wins."""
    return max(candidates, key=lambda c: -math.inf if math.isnan(c.dice) else c.dice)


def decision_path(best: Candidate, results: Path) -> Path:
    """Where the decision goes: ``postprocessing.json`` beside one configuration's runs (predict.py finds it
    there), or for an ensemble ``postprocessing_<a>+<b>.json`` in ``results``."""
    if len(best.members) == 1:
        return Path(best.runs[0]).parent / pp.FILE_NAME
    return results / f"postprocessing_{best.name}.json"


def commands(best: Candidate, decision_file: Path) -> list[str]:
    """The commands that predict new images as the winner did in cross-validation, post-processed."""
    def predict(m: Configuration, out: str, extra: str) -> str:
        runs = ",".join(pp.run_dir(r) for r in m.runs)
        return f"python predict.py --data INPUT_FOLDER --ckpt_path {runs} --results {out}{extra}"

    if len(best.members) == 1:
        return [predict(best.members[0], "OUTPUT_FOLDER", f" --postprocess {decision_file}")]
    outs = [f"OUTPUT_FOLDER_{m.name}" for m in best.members]
    lines = [predict(m, o, " --save_preds --postprocess none")
             for m, o in zip(best.members, outs, strict=True)]
    lines.append(f"python find_best_configuration.py --ensemble {','.join(outs)} --ckpt_path "
                 f"{pp.run_dir(best.members[0].runs[0])} --results OUTPUT_FOLDER "
                 f"--postprocess {decision_file}")
    return lines


def ensemble_folders(folders: Sequence[str | os.PathLike], out: str | os.PathLike, spec: Any,
                     steps: Sequence[pp.Step] = ()) -> list[Path]:
    """Ensemble predictions of new images: the mean of each case's ``<case>.npy`` probabilities in every
    folder → labels (``spec.to_labels``) → ``steps`` → ``<out>/<case>.nii.gz`` in the geometry of the first
    folder's ``<case>.nii.gz``. Returns the files written."""
    import nibabel as nib

    from nnunet_jax.io import save_label_nifti

    folders = [Path(f) for f in folders]
    cases = sorted(p.name[:-4] for p in folders[0].glob("*.npy") if not p.name.startswith("."))
    if not cases:
        raise FileNotFoundError(f"{folders[0]}: no <case>.npy probabilities (predict.py --save_preds)")
    written = []
    for case in cases:
        probs = [np.load(_probabilities(str(f), f, case), allow_pickle=False) for f in folders]
        if len({p.shape for p in probs}) != 1:
            raise ValueError(f"case {case}: probability shapes differ: {[p.shape for p in probs]}")
        geometry = folders[0] / f"{case}.nii.gz"
        if not geometry.is_file():
            raise FileNotFoundError(f"{geometry} is missing: the ensemble takes its geometry from it")
        ref = nib.load(geometry)
        labels = pp.apply(spec.to_labels(np.mean(probs, axis=0)), steps)
        written.append(save_label_nifti(labels, ref.affine, ref.header, Path(out) / f"{case}.nii.gz"))
    return written

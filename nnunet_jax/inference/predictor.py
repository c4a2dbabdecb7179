"""The predictor API: a volume or NIfTI file in, a label map in the source image's geometry out.

    predictor = Predictor.from_checkpoints(["results/fold0", "results/fold1"], tta=True)
    pred = predictor.predict("imagesTs/case_001.nii.gz")       # Prediction(labels (Z, Y, X), affine, header)
    save_prediction(pred, "preds")                              # preds/case_001.nii.gz

Pipeline (docs/reference.md §8): preprocess with the training run's plan (test mode) → sliding window
(optionally flip TTA) per model → ensemble = mean of the softmax (one model: its logits) → back to the source
geometry with :mod:`nnunet_jax.preprocessing` (per channel: undo padding, cubic resize, paste at the crop
box), where the label map is an argmax streamed channel by channel, so a 512×512×400 CT never holds all its
class maps at full resolution at once. Region models (one sigmoid per region: BraTS, or a plan with nnU-Net
v2 regions) become labels by thresholding at 0.5, each region in turn painting its ``regions_class_order``
value (BraTS: WT → 2 (edema), TC → 1 (necrosis), ET → 3 (enhancing; 4 when the plan's labels use 4)).

The windowed forward (:mod:`nnunet_jax.inference.forward`, the one training's validation runs too), the
checkpoint reader (:mod:`nnunet_jax.checkpoints`), the model builder (:mod:`nnunet_jax.models.build`), the
label/region rules (:mod:`nnunet_jax.labels`), the PyTorch converter and the preprocessing are the ones of the
other modules; this file only composes them. Sliding-window settings not given (``overlap``, ``blend``,
``batch_size``) are the training run's own (its ``config.json``), as it validated with them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import expit, softmax

from nnunet_jax.atomic import save_npy
from nnunet_jax.inference.forward import ApplyFn, WindowedForward, host_copy, make_forward, window_batch
from nnunet_jax.io import NIFTI_SUFFIXES
from nnunet_jax.labels import LabelSpec, paint_regions, use_brats
from nnunet_jax.plan import IMAGE_SUFFIX, Plan, case_of, meta_file
from nnunet_jax.planning.presets import apply_preset

# Sliding-window settings a training run records and prediction takes as defaults (predictor option: config).
RUN_WINDOW_SETTINGS = {"overlap": "overlap", "blend": "blend", "batch_size": "val_batch_size"}


# --------------------------------------------------------------------------------------------- outputs


@dataclass
class Prediction:
    """One predicted case. ``labels`` (Z, Y, X) uint8 in the source geometry when ``affine`` is known (a
    NIfTI input or a preprocessed case with its meta), else in the preprocessed geometry."""

    case: str
    labels: np.ndarray
    affine: np.ndarray | None = None
    header: Any = None  # nibabel header of the source image, when known
    probabilities: np.ndarray | None = None  # (K, Z, Y, X) float32, same geometry as labels, on request


def _overlay(pred: Prediction, image: Path | None, out_dir: str | os.PathLike, plan: Plan,
             log: Callable[[str], None]) -> list[Path]:
    """``<case>_overlay.png``: the label map over a few slices of its source image (when that is known), with
    the case's reference outlined when the MSD layout has one (``labelsTr/<name>`` beside ``imagesTr/<name>``;
    the same source geometry as the prediction, checked by :func:`nnunet_jax.io.load_case`)."""
    if image is None or pred.affine is None:
        log(f"{pred.case}: no source image known, no overlay drawn")
        return []
    from nnunet_jax.io import DatasetError, load_case
    from nnunet_jax.plots import overlay_png

    image = Path(image)
    label = image.parent.parent / "labelsTr" / image.name if image.parent.name == "imagesTr" else None
    try:
        source = load_case(image, label if label is not None and label.is_file() else None)
    except DatasetError as e:  # a reference that does not fit its image: the overlay without it
        log(f"{pred.case}: reference not drawn ({e})")
        source = load_case(image)
    reference = None if source.label is None else source.label[0]
    out = Path(out_dir) / f"{pred.case}_overlay.png"
    return [overlay_png(source.image, pred.labels, out, plan.class_names(), reference=reference,
                        title=pred.case)]


def save_prediction(
    pred: Prediction, out_dir: str | os.PathLike, *, nifti: bool = True, npy_labels: bool = False
) -> list[Path]:
    """Write ``<case>.nii.gz`` (label map; needs an affine), ``<case>.npy`` (probabilities, when present) and
    with ``npy_labels`` ``<case>_pred.npy`` (label map). Returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    if nifti:
        if pred.affine is None:
            raise ValueError(f"case {pred.case!r}: no source geometry (affine) known; cannot write NIfTI")
        from nnunet_jax.io import save_label_nifti

        path = out_dir / f"{pred.case}.nii.gz"
        written.append(save_label_nifti(pred.labels, pred.affine, pred.header, path))
    if pred.probabilities is not None:
        path = out_dir / f"{pred.case}.npy"
        save_npy(np.asarray(pred.probabilities, np.float32), path)
        written.append(path)
    if npy_labels:
        path = out_dir / f"{pred.case}_pred.npy"
        save_npy(pred.labels, path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------- source geometry


def to_source_labels(
    pred: np.ndarray, meta: Any, kind: str, brats: bool = False, et_label: int = 3,
    class_order: Sequence[int] | None = None,
) -> np.ndarray:
    """(K, z, y, x) network output at the preprocessed geometry → uint8 labels (Z, Y, X) at the source.

    ``kind``: "logits" (one model), "probs" (softmax ensemble), or region probabilities with ``class_order``
    (the label each region paints, in order) or ``brats`` (WT 2, TC 1, ET ``et_label``).
    Streams per channel (:func:`nnunet_jax.preprocessing.restore_label_map`); a region c is restored as the
    two-class map [1 - p_c, p_c] so its outside-the-crop fill is "absent".
    """
    from nnunet_jax.preprocessing.case import restore_label_map

    if brats and class_order is None:
        class_order = (2, 1, et_label)
    if class_order is None:
        return restore_label_map(pred, meta, kind)
    masks = []
    for c in range(pred.shape[0]):
        p = pred[c]
        masks.append(restore_label_map(np.stack([1.0 - p, p]), meta, "probs") == 1)
    return paint_regions(np.stack(masks).astype(np.float32), class_order)


def to_source_probabilities(pred: np.ndarray, meta: Any, kind: str, regions: bool = False) -> np.ndarray:
    """(K, Z, Y, X) float32 probabilities at the source geometry (softmax after resizing for logits, as the
    reference; region probabilities are 0 outside the crop box)."""
    from nnunet_jax.preprocessing.case import restore_to_source

    if regions:
        padded = np.concatenate([np.zeros_like(pred[:1]), pred])
        return restore_to_source(padded, meta, "probs")[1:]
    return restore_to_source(pred, meta, kind, softmax=kind == "logits")


# ------------------------------------------------------------------------------------------ the model


def _default_config() -> dict[str, Any]:
    from nnunet_jax.configs.default import get_config

    return get_config().to_dict()


def read_run_settings(ckpt_path: str | os.PathLike) -> tuple[dict[str, Any], Plan | None]:
    """(config, plan) of the training run that wrote a checkpoint: its results dir's config.json, else the
    defaults overlaid with the checkpoint's identity (plan None)."""
    from nnunet_jax import checkpoints

    settings = checkpoints.read_run_settings(ckpt_path)
    if settings is not None:
        plan = settings.get("plan")
        where = f"{ckpt_path} (config.json's plan)"
        return dict(settings["config"]), None if plan is None else Plan.from_dict(plan, where)
    config = _default_config()
    ident = (checkpoints.read_meta_path(ckpt_path) or {}).get("identity", {})
    config.update({k: ident[k] for k in ("norm", "residual", "attention", "deep_supervision", "dim", "fold",
                                         "brats", "preset") if k in ident})
    if ident.get("filters"):
        config["filters"] = list(ident["filters"])
    return config, None


def restore_variables(ckpt_path: str | os.PathLike, model: Any, plan: Plan, mesh: Any) -> dict[str, Any]:
    """The model variables (params, batch_stats) of an Orbax checkpoint as host numpy trees; only they are
    read (the optimizer state stays on disk), shaped by ``model``'s own initialisation."""
    from nnunet_jax import checkpoints, parallel

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *plan.input_shape)),
                                               train=False))
    sharding = parallel.replicated(mesh)
    template = {k: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), v)
                for k, v in shapes.items() if k in ("params", "batch_stats") and v}
    variables, _ = checkpoints.restore_variables(ckpt_path, template)
    return host_copy(variables)


# --------------------------------------------------------------------------------------- the predictor


class Predictor:
    """Sliding-window prediction with one model or a fold ensemble, plus the export to the source geometry.

    ``apply_fn(variables, windows)`` maps ``(B, *patch, C)`` to ``(B, *patch, K)`` logits; ``variables`` is a
    list (one entry per ensemble member). Use :meth:`from_checkpoints`, :meth:`from_torch` or
    :meth:`from_model` rather than this constructor unless you bring your own forward.
    """

    def __init__(
        self,
        plan: Plan | str | os.PathLike | Mapping[str, Any],
        apply_fn: ApplyFn,
        variables: Sequence[Any],
        *,
        tta: bool = False,
        overlap: float = 0.5,
        blend: str = "gaussian",
        batch_size: int = 4,
        brats: bool = False,
        mesh: Any = None,
    ):
        if not variables:
            raise ValueError("Predictor needs at least one set of model variables")
        self.plan = Plan.coerce(plan)
        self.dim, self.patch, self.n_class = self.plan.dim, self.plan.patch_size, self.plan.n_class
        self.apply_fn = apply_fn
        self.tta, self.overlap, self.blend = tta, overlap, blend
        self.batch_size, self.brats = batch_size, brats
        self.labels = LabelSpec.of(self.plan, brats)  # regions: BraTS, or the plan's
        self.et_label = self.labels.et_label
        self.window = WindowedForward(apply_fn, self.patch, overlap, blend, batch_size, tta)
        if mesh is None:
            self.variables = [jax.device_put(v) for v in variables]
        else:
            from nnunet_jax import parallel

            self.variables = [jax.device_put(v, parallel.replicated(mesh)) for v in variables]

    # -- constructors

    @classmethod
    def from_model(
        cls, plan: Any, model: Any, variables: Sequence[Any], *, batch_size: int = 4, **options: Any
    ) -> Predictor:
        """Our UNet and its variables; windows are split over the local devices."""
        from nnunet_jax import parallel

        mesh = parallel.local_mesh()
        return cls(
            plan,
            make_forward(model, mesh),
            variables,
            batch_size=window_batch(batch_size, mesh),
            mesh=mesh,
            **options,
        )

    @classmethod
    def from_checkpoints(
        cls,
        paths: Sequence[str | os.PathLike] | str | os.PathLike,
        plan: Any = None,
        *,
        amp: bool = False,
        amp_dtype: str = "bf16",
        brats: bool | None = None,
        **options: Any,
    ) -> Predictor:
        """Orbax checkpoints of training runs (results dirs, ``checkpoints/best``, or one step dir); several
        = a fold ensemble (mean of softmax). The model options come from each run's config.json, BraTS region
        mode too (``brats`` None: as the runs were trained; True/False must agree with them), and so do the
        sliding-window settings not given in ``options`` (``overlap``, ``blend``, ``batch_size``)."""
        from nnunet_jax import parallel
        from nnunet_jax.models.build import build_model

        paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        if not paths:
            raise ValueError("no checkpoint given")
        mesh = parallel.local_mesh()
        variables, configs = [], []
        for p in paths:
            config, run_plan = read_run_settings(p)
            the_plan = Plan.coerce(plan) if plan is not None else run_plan
            if the_plan is None:
                raise FileNotFoundError(f"{p}: the run's config.json is missing; pass the plan (plan.json)")
            the_plan = apply_preset(config, the_plan)  # a given plan.json has the seed's topology
            run_brats = use_brats(config)
            if brats is not None and bool(brats) != run_brats:
                raise ValueError(f"{p}: the checkpoint is {'a' if run_brats else 'not a'} BraTS region model "
                                 f"(trained {'with' if run_brats else 'without'} --brats); leave --brats out")
            if configs and run_brats != use_brats(configs[0][0]):
                raise ValueError(f"{p}: cannot ensemble BraTS region and per-class models "
                                 f"(see {paths[0]})")
            variables.append(restore_variables(p, build_model(dict(config, amp=False), the_plan), the_plan,
                                               mesh))
            configs.append((config, the_plan))
        config, the_plan = configs[0]
        for option, key in RUN_WINDOW_SETTINGS.items():
            if options.get(option) is None and key in config:
                options[option] = config[key]
        options = {k: v for k, v in options.items() if v is not None}
        model = build_model(dict(config, amp=amp, amp_dtype=amp_dtype), the_plan)
        return cls.from_model(the_plan, model, variables, brats=use_brats(config), **options)

    @classmethod
    def from_torch(
        cls,
        path: str | os.PathLike,
        plan: Any,
        *,
        amp: bool = False,
        amp_dtype: str = "bf16",
        model_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Predictor:
        """A PyTorch nnU-Net / MONAI DynUNet state dict (``.pt``/``.ckpt``), via ``nnunet_jax.interop.monai``.
        ``model_options`` are UNet options (filters, norm, residual, deep_supervision, ...)."""
        from nnunet_jax.interop.monai import load_torch_checkpoint
        from nnunet_jax.models.build import build_model

        the_plan = Plan.coerce(plan)
        opts = dict(model_options or {}, brats=bool(options.get("brats")))
        variables = load_torch_checkpoint(path, build_model(opts, the_plan), the_plan.in_channels)
        model = build_model(dict(opts, amp=amp, amp_dtype=amp_dtype), the_plan)
        options = {k: v for k, v in options.items() if v is not None}
        return cls.from_model(the_plan, model, [variables], **options)

    @staticmethod
    def from_nnunetv2(
        model_dir: str | os.PathLike,
        folds: Sequence[int | str] | None = None,
        checkpoint_name: str = "checkpoint_final.pth",
        **options: Any,
    ) -> Any:
        """An nnU-Net v2 trained model folder, run with v2's own pipeline (its preprocessing, sliding window,
        fold averaging and export; :class:`nnunet_jax.interop.nnunetv2.predictor.V2Predictor`, which this
        returns). ``folds`` None: every ``fold_*`` holding ``checkpoint_name``. Needs no torch."""
        from nnunet_jax.interop.nnunetv2.predictor import V2Predictor

        return V2Predictor.from_model_folder(model_dir, folds, checkpoint_name, **options)

    # -- the network part

    @property
    def output_kind(self) -> str:
        """What :meth:`predict_preprocessed` returns: logits (one model), probs (ensemble), region probs."""
        if self.labels.uses_regions:
            return "regions"
        return "logits" if len(self.variables) == 1 else "probs"

    def _window_logits(self, volume: np.ndarray, variables: Any) -> np.ndarray:
        """(C, Z, Y, X) → (K, Z, Y, X) float32 logits; 2D plans run slice by slice along Z."""
        from nnunet_jax.data.layout import to_channels_first, to_channels_last

        return np.asarray(to_channels_first(self.window(variables, to_channels_last(volume, 3)), 3))

    def predict_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """A preprocessed case (C, Z, Y, X) → (K, Z, Y, X) float32 of :attr:`output_kind`."""
        x = np.asarray(x, np.float32)
        in_ch = self.plan.in_channels
        if x.ndim != 4 or x.shape[0] != in_ch:
            raise ValueError(f"expected a preprocessed (C={in_ch}, Z, Y, X) volume, got shape {x.shape}")
        regions = self.labels.uses_regions
        if len(self.variables) == 1 and not regions:
            return self._window_logits(x, self.variables[0])
        total = None
        for v in self.variables:
            logits = self._window_logits(x, v)
            p = expit(logits) if regions else softmax(logits, axis=0)
            total = p if total is None else total + p
        return (total / len(self.variables)).astype(np.float32)

    # -- whole cases

    def labels_from_output(self, out: np.ndarray, meta: Any = None) -> np.ndarray:
        """Labels of :meth:`predict_preprocessed`'s output; in the source geometry when ``meta`` is given."""
        kind = "probs" if self.output_kind == "regions" else self.output_kind
        if meta is not None:
            return to_source_labels(out, meta, kind, class_order=self.labels.regions_class_order)
        return self.labels.to_labels(out)

    def probabilities_from_output(self, out: np.ndarray, meta: Any = None) -> np.ndarray:
        kind = "probs" if self.output_kind == "regions" else self.output_kind
        if meta is not None:
            return to_source_probabilities(out, meta, kind, self.labels.uses_regions)
        return softmax(out, axis=0).astype(np.float32) if kind == "logits" else out

    def preprocess(
        self, image: np.ndarray, spacing: Sequence[float], affine: np.ndarray | None = None, case: str = "?"
    ) -> tuple[np.ndarray, Any]:
        """Test-mode preprocessing with the plan (crop, resample, normalise) → (x, meta)."""
        from nnunet_jax.preprocessing.case import preprocess_case

        x, _, meta = preprocess_case(
            image,
            None,
            spacing,
            target_spacing=self._plan_spacing(),
            patch_size=self.patch,
            dim=self.dim,
            normalization=self.plan.normalization,
            ct_stats=self.plan.ct_stats,
            mode="test",
            affine=affine,
            case=case,
        )
        return x, meta

    def predict(
        self,
        source: str | os.PathLike | np.ndarray,
        *,
        spacing: Sequence[float] | None = None,
        affine: np.ndarray | None = None,
        meta: Any = None,
        preprocessed: bool = False,
        probabilities: bool = False,
        case: str | None = None,
    ) -> Prediction:
        """Predict one case.

        ``source`` is a NIfTI path (a 3D or 4D MSD image), or an array: a raw image (C, Z, Y, X) or (Z, Y, X)
        with its ``spacing`` (Z, Y, X; default: the plan's, i.e. no resampling) that is preprocessed here, or
        with ``preprocessed=True`` an already preprocessed (C, Z, Y, X) volume (then ``meta``, if given, maps
        the result back to the source). ``probabilities`` also returns the (K, Z, Y, X) probabilities.
        """
        header = None
        if isinstance(source, str | os.PathLike):
            from nnunet_jax.io import case_name, load_case

            loaded = load_case(source, n_channels=self.plan.in_channels,
                               channels_from=f"the model's plan (task {self.plan.task})")
            case = case or case_name(source)
            x, meta = self.preprocess(loaded.image, loaded.spacing, loaded.affine, case)
            affine, header = loaded.affine, loaded.header
        else:
            case = case or "case"
            image = np.asarray(source, np.float32)
            if image.ndim == 3:
                image = image[None]
            if preprocessed:
                x = image
                if meta is not None and affine is None:
                    affine = meta.affine  # the source image's, recorded by preprocessing
            else:
                sp = spacing if spacing is not None else self._default_spacing()
                x, meta = self.preprocess(image, sp, affine, case)
        out = self.predict_preprocessed(x)
        labels = self.labels_from_output(out, meta)
        probs = self.probabilities_from_output(out, meta) if probabilities else None
        return Prediction(case, labels, affine, header, probs)

    def _plan_spacing(self) -> tuple[float, ...]:
        if self.plan.spacing is None:
            raise ValueError("the plan has no target spacing: cannot preprocess raw images with it")
        return self.plan.spacing

    def _default_spacing(self) -> tuple[float, float, float]:
        sp = self._plan_spacing()
        return tuple(sp) if len(sp) == 3 else (1.0, *sp)


# ------------------------------------------------------------------------------------------- folders


def source_images(plan: Plan, raw: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{case: source NIfTI}`` from ``raw`` (a folder of images) or the plan's dataset (``source.data``), so
    predictions of preprocessed cases get the source header; empty when neither can be read."""
    from nnunet_jax.io import case_name

    if raw is not None:
        return {case_name(p): p for p in sorted(Path(raw).iterdir()) if p.name.endswith(NIFTI_SUFFIXES)}
    root = plan.source_data
    if not root or not (Path(root) / "dataset.json").is_file():
        return {}
    try:
        from nnunet_jax.planning.dataset_json import load_dataset

        ds = load_dataset(root, check_files=False)
    except Exception:  # a moved or edited dataset: predictions still get the affine from the meta
        return {}
    return {c.name: c.image for c in (*ds.training, *ds.test)}


def _header(path: Path | None) -> Any:
    if path is None or not Path(path).is_file():
        return None
    import nibabel as nib

    return nib.load(str(path)).header


def find_inputs(data: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """Split ``--data`` into preprocessed cases (``<case>_x.npy`` of folders holding them) and NIfTI files
    (given directly or as the NIfTI files of a folder)."""
    npy, nifti = [], []
    for item in data:
        if not str(item).strip():  # "a,b," on the command line
            continue
        p = Path(item)
        if p.is_dir():
            xs = sorted(p.glob(f"*{IMAGE_SUFFIX}"))
            if xs:
                npy.extend(xs)
            else:
                found = sorted(q for q in p.iterdir() if q.name.endswith(NIFTI_SUFFIXES))
                if not found:
                    raise FileNotFoundError(f"{p}: neither preprocessed <case>_x.npy nor NIfTI files")
                nifti.extend(found)
        elif p.name.endswith(NIFTI_SUFFIXES) and p.is_file():
            nifti.append(p)
        elif p.name.endswith(IMAGE_SUFFIX) and p.is_file():
            npy.append(p)
        else:
            raise FileNotFoundError(f"{p}: not a folder, a NIfTI file or a preprocessed <case>_x.npy")
    return npy, nifti


def predict_inputs(
    predictor: Predictor,
    data: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    save_nifti: bool = True,
    save_preds: bool = False,
    raw: str | os.PathLike | None = None,
    cases: Collection[str] | None = None,
    overlays: bool = False,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Predict every case of ``data`` into ``out_dir``: ``<case>.nii.gz`` label maps in the source geometry,
    with ``save_preds`` ``<case>.npy`` probabilities (K, Z, Y, X); preprocessed cases without ``save_nifti``
    get ``<case>_pred.npy`` label maps; ``cases`` restricts the preprocessed cases (e.g. one fold's validation
    cases of a ``val`` folder); ``overlays`` adds ``<case>_overlay.png`` pictures. Returns the files
    written."""
    from nnunet_jax.preprocessing.case import CaseMeta

    npy, nifti = find_inputs(data)
    if cases is not None:
        wanted = set(cases)
        npy = [p for p in npy if case_of(p) in wanted]
        if not npy and not nifti:
            raise ValueError(f"none of the requested cases ({', '.join(sorted(wanted)[:5])}) is in {data}")
    headers = source_images(predictor.plan, raw) if npy else {}
    written: list[Path] = []
    if npy or nifti:
        log(f"predicting {len(npy) + len(nifti)} case(s) into {out_dir} (the first one compiles the sliding "
            "window)")
    t0 = time.perf_counter()
    for x_path in npy:
        case = case_of(x_path)
        meta_path = x_path.with_name(meta_file(case))
        meta = CaseMeta.load(meta_path) if meta_path.is_file() else None
        if meta is None and save_nifti:
            raise FileNotFoundError(f"{meta_path} is missing: cannot map case {case!r} back to its source")
        pred = predictor.predict(
            np.load(x_path), preprocessed=True, meta=meta, probabilities=save_preds, case=case
        )
        pred.header = _header(headers.get(case))
        files = save_prediction(pred, out_dir, nifti=save_nifti, npy_labels=not save_nifti)
        if overlays:
            files += _overlay(pred, headers.get(case), out_dir, predictor.plan, log)
        written += files
        log(f"{case}: {', '.join(p.name for p in files)} ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
    for path in nifti:
        pred = predictor.predict(path, probabilities=save_preds)
        files = save_prediction(pred, out_dir, nifti=True)
        if overlays:
            files += _overlay(pred, path, out_dir, predictor.plan, log)
        written += files
        log(f"{pred.case}: {', '.join(p.name for p in files)} ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
    return written

"""Training data: study discovery, deterministic k-fold splits, network-ready cases, MONAI transforms.

A *case* is a dict ``{"image": float32 (C, x, y, z), "label": uint8 (1, x, y, z), "classes": float32
(n_classes,), "name": str}`` on the working grid (:mod:`legcomp.preprocessing.inputs`). Stage 1 gives one case per study
(the whole field of view); stage 2 gives one case per leg (a crop around that leg's stage-1
whole muscle, left legs mirrored along x to look like right legs), as at inference.
Label voxels :data:`legcomp.anatomy.IGNORE` (255) carry no label and stay 255, and stage-2 voxels
:data:`legcomp.anatomy.UNNAMED_MUSCLE` (254, one of the unlabelled muscles) stay 254; ``classes`` is 1 for the
classes the study labels and 0 for those its label record (:data:`legcomp.anatomy.LABEL_RECORD`) lists
as unlabelled (background always 1), for :class:`legcomp.training.losses.PartialLabelLoss`.

Training data come from one or more *sources* (:class:`Source`: a folder and a sampling weight);
:func:`load_studies` builds each study's cases once, through the preprocessing cache
(:mod:`legcomp.training.cache`) when one is given, and skips (logs) a study that cannot be read;
:func:`source_sampler` draws cases so that each source gets its weight's share of the draws.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.io import find_studies, read_study
from legcomp.io.study import DixonStudy
from legcomp.preprocessing import inputs as prep
from legcomp.preprocessing.legs import hip_slices, split_legs

log = logging.getLogger(__name__)


def kfold_split(names: Sequence[str], folds: int, fold: int, seed: int = 0,
                allow_fewer: bool = False) -> tuple[list[int], list[int]]:
    """Deterministic k-fold split: (train indices, validation indices) into ``names``.

    Names are sorted, shuffled with ``seed`` and dealt into ``folds`` near-equal folds; fold ``fold``
    is the validation set. ``folds <= 1`` trains on everything with no validation set. Fewer names
    than folds raise, unless ``allow_fewer`` (some folds are then empty).
    """
    n = len(names)
    if folds <= 1:
        return list(range(n)), []
    if not 0 <= fold < folds:
        raise LegcompInputError(f"fold {fold} is outside 0..{folds - 1}")
    if n < folds and not allow_fewer:
        raise LegcompInputError(f"{n} studies cannot be split into {folds} folds")
    order = sorted(range(n), key=lambda i: str(names[i]))
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = [order[i] for i in perm]
    parts = np.array_split(np.arange(n), folds)
    val = sorted(shuffled[i] for i in parts[fold])
    train = sorted(set(range(n)) - set(val))
    return train, val


def discover(data_dir: str | Path, region: str, max_cases: int | None = None) -> list[Path]:
    """Study folders under ``data_dir`` for ``region`` (by path; region-less paths are kept), sorted by name."""
    from legcomp.io import region_from_path

    paths = find_studies(data_dir)
    if not paths:
        raise LegcompInputError("no studies found", data_dir)
    keep = [p for p in paths if region_from_path(p) in (region, "unknown")]
    if not keep:
        raise LegcompInputError(f"no {region} studies found", data_dir)
    keep = sorted(keep, key=lambda p: p.name)
    return keep[:max_cases] if max_cases else keep


def _leg_map(study: DixonStudy) -> np.ndarray:
    if "legs" in study.labels:
        return study.labels["legs"]
    from legcomp.preprocessing.legs import leg_map

    s1 = study.labels["stage1"]
    return leg_map(np.isin(s1, (anatomy.SAT.id, anatomy.WHOLE_MUSCLE.id)), study.affine)


def class_vector(study: DixonStudy, stage: int, region: str) -> np.ndarray:
    """float32 (n_classes,): 1 for the classes of ``stage`` that ``study`` labels, 0 for those its
    label record lists as unlabelled; index 0 (background) is always 1."""
    out = np.ones(anatomy.n_classes(stage, region), np.float32)
    for name in (study.label_record or {}).get(f"stage{stage}", {}).get("unlabelled", []):
        out[anatomy.label_by_name(name, region).id] = 0.0
    return out


def study_cases(study: DixonStudy, stage: int, region: str, *, spacing=None, with_stage1: bool = False,
                margin_mm: float = prep.LEG_MARGIN_MM, normalisation: str = prep.NORMALISATIONS[0]) -> list[dict]:
    """Network-ready cases of one labelled study (see module doc); ``normalisation``: a method of
    :data:`legcomp.preprocessing.inputs.NORMALISATIONS`."""
    need = ["stage1"] + (["stage2"] if stage == 2 else [])
    for key in need:
        if key not in study.labels:
            raise LegcompInputError(f"study has no {key} label map", study.source or study.name)
    n_cls = anatomy.n_classes(stage, region)
    key = "stage1" if stage == 1 else "stage2"
    lab_ids = study.labels[key][~np.isin(study.labels[key], (anatomy.IGNORE, anatomy.UNNAMED_MUSCLE))]
    top = int(lab_ids.max()) if lab_ids.size else 0
    if top >= n_cls:
        raise LegcompInputError(f"{key} labels go up to {top} but {region} stage {stage} has {n_cls - 1} structures "
                                f"(and {anatomy.IGNORE} = no label, {anatomy.UNNAMED_MUSCLE} = an unlabelled muscle)",
                                study.source or study.name)
    classes = class_vector(study, stage, region)
    work = prep.to_working(study, spacing)
    if stage == 1:
        return [{"image": prep.stage1_input(work, method=normalisation), "label": work.labels["stage1"][None].astype(np.uint8),
                 "classes": classes, "name": study.name}]
    s1 = work.labels["stage1"]
    legs = _leg_map(work)
    image = prep.stage2_input(work, s1 if with_stage1 else None, method=normalisation)
    # as at inference, hip/pelvis slices (legs joined above the thighs) do not set the crop boxes' width
    body = np.isin(s1, (anatomy.SAT.id, anatomy.WHOLE_MUSCLE.id))
    hip = hip_slices(split_legs(body, work.affine).coverage, region)
    cases = []
    for leg_id in sorted(anatomy.LEGS):
        box = prep.leg_crop_box(s1, legs, leg_id, work.spacing, margin_mm, skip_slices=hip)
        if box is None:
            continue
        img = prep.crop(image, box)
        lab = prep.crop(work.labels["stage2"], box)
        # outside the stage-1 whole muscle the muscles' label is background, except where either map
        # carries no label (IGNORE stays IGNORE; a stage-2 id where stage 1 is IGNORE is kept)
        s1c = prep.crop(s1, box)
        keep = (s1c == anatomy.WHOLE_MUSCLE.id) | (s1c == anatomy.IGNORE) | (lab == anatomy.IGNORE)
        lab = np.where(keep, lab, 0).astype(np.uint8)
        if prep.is_left(leg_id):
            img, lab = prep.mirror_x(img), prep.mirror_x(lab)
        cases.append({"image": np.ascontiguousarray(img, np.float32), "label": np.ascontiguousarray(lab)[None],
                      "classes": classes.copy(), "name": f"{study.name}_{anatomy.LEGS[leg_id]}"})
    return cases


def load_cases(paths: Sequence[Path], stage: int, region: str, *, spacing=None, with_stage1: bool = False,
               progress: bool = False, normalisation: str = prep.NORMALISATIONS[0], cache=None) -> list[dict]:
    """Read studies and turn them into cases (stage 2: one per leg); the first unreadable study raises.

    ``cache``: a :class:`legcomp.training.cache.CaseCache` (or None) to reuse cases built before.
    """
    got = load_studies(paths, stage, region, spacing=spacing, with_stage1=with_stage1, progress=progress,
                       normalisation=normalisation, cache=cache, skip_unreadable=False)
    return [c for st in got.studies for c in st.cases]


# --------------------------------------------------------------------------- sources, studies, cache


@dataclass
class Source:
    """A folder of labelled studies and its sampling weight (relative; see :func:`source_sampler`)."""

    path: Path
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}" + ("" if self.weight == 1.0 else f":{self.weight:g}")


def parse_source(spec) -> Source:
    """``PATH`` or ``PATH:WEIGHT`` (a string), a path, a ``(path, weight)`` pair or a :class:`Source`.

    The weight must be a finite number > 0 (default 1). A string whose part after the last ``:``
    is not a number is a path as a whole.
    """
    if isinstance(spec, Source):
        src = Source(Path(spec.path), float(spec.weight))
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        try:
            src = Source(Path(spec[0]), float(spec[1]))
        except (TypeError, ValueError):
            raise LegcompInputError(f"bad data source {spec!r}; expected (path, weight)") from None
    else:
        text = str(spec)
        src = Source(Path(text))
        if ":" in text:
            head, tail = text.rsplit(":", 1)
            try:
                weight = float(tail)
            except ValueError:
                weight = None
            if weight is not None and head:
                src = Source(Path(head), weight)
    if not math.isfinite(src.weight) or src.weight <= 0:
        raise LegcompInputError(f"data source weight must be a number > 0, got {src.weight:g}", src.path)
    return src


def parse_sources(data) -> list[Source]:
    """One source (a path or ``PATH:WEIGHT`` string, a :class:`Source`) or a list of them."""
    if isinstance(data, (str, Path, Source)) or (isinstance(data, tuple) and len(data) == 2
                                                 and not isinstance(data[1], (str, Path, Source, tuple, list))):
        data = [data]
    out = [parse_source(d) for d in data]
    if not out:
        raise LegcompInputError("no data source given")
    return out


@dataclass
class StudyCases:
    """One study's cases and what is known of it."""

    path: Path
    cases: list[dict]
    label_record: dict
    content: str
    """SHA-256 of the study's input files (:func:`legcomp.training.cache.content_hash`)."""
    cached: bool
    """True when the cases came from the cache (no study file was read)."""


@dataclass
class LoadedStudies:
    """Result of :func:`load_studies`."""

    studies: list[StudyCases] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    """``{"study": path, "reason": one line}`` per study that could not be used."""
    seconds: float = 0.0
    hits: int = 0
    built: int = 0

    @property
    def cases(self) -> list[dict]:
        return [c for st in self.studies for c in st.cases]

    def extend(self, other: "LoadedStudies") -> None:
        self.studies += other.studies
        self.skipped += other.skipped
        self.seconds += other.seconds
        self.hits += other.hits
        self.built += other.built


def _one_line(exc: BaseException, path: Path) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (LegcompInputError, OSError)):
        text = f"{type(exc).__name__}: {text}"
    return text if str(path) in text else f"{path}: {text}"


def load_studies(paths: Sequence[Path], stage: int, region: str, *, spacing=None, with_stage1: bool = False,
                 progress: bool = False, normalisation: str = prep.NORMALISATIONS[0],
                 margin_mm: float = prep.LEG_MARGIN_MM, cache=None, skip_unreadable: bool = True) -> LoadedStudies:
    """Each study's cases, from ``cache`` (a :class:`legcomp.training.cache.CaseCache`) when it holds them,
    else read (:func:`read_study`), built (:func:`study_cases`) and stored there.

    A study that cannot be read or used is skipped with one logged line naming it and the reason
    (``skip_unreadable``; otherwise the error is raised). Cached arrays are memory-mapped, read-only.
    """
    import time

    from tqdm.auto import tqdm

    from legcomp.training import cache as C

    t0 = time.perf_counter()
    target = prep.working_spacing(spacing)
    out = LoadedStudies()
    for p in tqdm(list(paths), desc="reading studies", disable=not progress, leave=False):
        p = Path(p)
        try:
            try:
                content = C.content_hash(p)
            except OSError as exc:
                raise LegcompInputError(f"cannot read ({exc.strerror or exc})", exc.filename or p) from None
            fields = C.key_fields(content, name=_study_name(p), stage=stage, region=region, spacing=target,
                                  normalisation=normalisation, with_stage1=with_stage1, margin_mm=margin_mm)
            key = C.make_key(fields)
            entry = cache.load(key) if cache is not None else None
            if entry is not None:
                out.studies.append(StudyCases(p, entry["cases"], entry["label_record"], content, True))
                out.hits += 1
                continue
            study = read_study(p, region=region)
            cases = study_cases(study, stage, region, spacing=spacing, with_stage1=with_stage1,
                                margin_mm=margin_mm, normalisation=normalisation)
            record = dict(study.label_record or {})
            if cache is not None:
                cases = cache.store(key, fields, cases, record)["cases"]
            out.studies.append(StudyCases(p, cases, record, content, False))
            out.built += 1
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:
            if not skip_unreadable:
                raise
            reason = _one_line(exc, p)
            log.warning("skipped study %s", reason)
            out.skipped.append({"study": str(p), "reason": reason})
    out.seconds = time.perf_counter() - t0
    return out


def _study_name(path: Path) -> str:
    from legcomp.io.nifti import _subject_name

    folder = path if path.is_dir() else path.parent
    return _subject_name(folder)


def source_sampler(case_sources: Sequence[int], weights: Sequence[float], num_samples: int, generator):
    """A sampler of ``num_samples`` case indices (with replacement) such that source ``s`` is drawn with
    probability ``weights[s] / sum(weights)`` whatever its number of cases: per-case weight = source
    weight / cases of that source (:class:`torch.utils.data.WeightedRandomSampler`). With a single source,
    a uniform :class:`torch.utils.data.RandomSampler`. Sources without cases get no draws (their weight is
    dropped). The returned sampler counts its draws per source in ``.counts``.
    """
    import torch

    case_sources = [int(s) for s in case_sources]
    n_src = len(weights)
    per = np.bincount(np.asarray(case_sources, np.int64), minlength=n_src) if case_sources else np.zeros(n_src)
    if len(set(case_sources)) <= 1:
        inner = torch.utils.data.RandomSampler(range(len(case_sources)), replacement=True, num_samples=num_samples,
                                               generator=generator)
    else:
        w = [float(weights[s]) / per[s] for s in case_sources]
        inner = torch.utils.data.WeightedRandomSampler(w, num_samples=num_samples, replacement=True,
                                                       generator=generator)
    return _CountingSampler(inner, case_sources, n_src)


class _CountingSampler:
    """Wraps a sampler; counts the indices it yields per source (``counts``, a list)."""

    def __init__(self, inner, groups: Sequence[int], n_groups: int):
        self.inner = inner
        self.groups = list(groups)
        self.counts = [0] * n_groups

    def __iter__(self):
        for i in self.inner:
            self.counts[self.groups[i]] += 1
            yield i

    def __len__(self) -> int:
        return len(self.inner)


def fit_patch(patch: Sequence[int], shapes: Sequence[Sequence[int]], divisor: Sequence[int]) -> tuple[int, int, int]:
    """Clamp a patch size to the data: no larger than the largest case (rounded up to the divisor).

    Returns multiples of ``divisor``.
    """
    out = []
    for ax, (p, d) in enumerate(zip(patch, divisor)):
        biggest = max(int(s[ax]) for s in shapes) if shapes else int(p)
        size = min(int(p), biggest)
        out.append(max(d, size + (-size) % d))
    return tuple(out)  # type: ignore[return-value]


def build_transforms(stage: int, n_classes: int, patch: Sequence[int], *, device=None, augment: bool = True,
                     elastic_prob: float = 0.1):
    """MONAI transforms: (deterministic part, random part) for training cases.

    The deterministic part (cached by CacheDataset) converts to tensors on ``device``, pads each case
    to at least the patch size and precomputes per-class voxel indices; the random part samples a
    patch centred on a class chosen uniformly (so small muscles are seen as often as large ones),
    then augments: in-plane rotation/scaling, light elastic deformation, bias field, gamma,
    global and per-channel intensity scaling (domain transfer to real scans), Gaussian noise and smoothing,
    then clipping back to the inference range (a stage-1 mask channel is left out of the intensity
    part), and (stage 1 only) left-right flips. Label voxels :data:`legcomp.anatomy.IGNORE` are never
    a class (never a patch centre) and survive the nearest-neighbour spatial transforms; padding is 0.
    A case's ``"classes"`` is passed through unchanged.
    """
    import torch
    from monai import transforms as T

    TorchGaussianNoised = _noise_transform()

    keys = ["image", "label"]
    # per-class voxel indices are computed once on the CPU (numpy) and cached; the volumes themselves
    # are cached on ``device`` (the GPU when training there), where all random transforms then run.
    det = T.Compose([
        T.SpatialPadd(keys=keys, spatial_size=list(patch), mode="constant"),
        T.ClassesToIndicesd(keys="label", num_classes=n_classes),
        T.EnsureTyped(keys="image", dtype=torch.float32, device=device, track_meta=False),
        T.EnsureTyped(keys="label", dtype=torch.uint8, device=device, track_meta=False),
    ])
    rnd: list = [T.RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=list(patch),
                                           ratios=[1.0] * n_classes, num_classes=n_classes, num_samples=1,
                                           indices_key="label_cls_indices", warn=False),
                 # the crop is a view of the cached volume: copy it so no later transform can alter the cache
                 T.Lambdad(keys=keys, func=_clone)]
    if augment:
        rnd += [
            T.RandAffined(keys=keys, prob=0.3, rotate_range=(0.0, 0.0, 0.26), scale_range=(0.1, 0.1, 0.0),
                          mode=("bilinear", "nearest"), padding_mode="zeros", device=device),
            T.Rand3DElasticd(keys=keys, prob=elastic_prob, sigma_range=(6.0, 8.0), magnitude_range=(40.0, 80.0),
                             mode=("bilinear", "nearest"), padding_mode="zeros", device=device),
            # intensity augmentation works on a copy; _back_in_range then clips the two signal
            # channels to the inference range and restores a stage-1 mask channel untouched
            T.CopyItemsd(keys="image", times=1, names="image_spatial"),
            T.RandBiasFieldd(keys="image", prob=0.15, coeff_range=(0.0, 0.2), degree=3),
            T.RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
            # one factor for all channels (x0.55-1.6, the water/fat ratio kept): real scans' normalised
            # signal differs from the phantom's (the dystrophic real thigh sits at about x0.6)
            T.RandScaleIntensityd(keys="image", prob=0.5, factors=(-0.45, 0.6), channel_wise=False),
            T.RandScaleIntensityd(keys="image", prob=0.5, factors=0.15, channel_wise=True),
            TorchGaussianNoised(keys="image", prob=0.2, std=0.03),
            T.RandGaussianSmoothd(keys="image", prob=0.15, sigma_x=(0.4, 1.0), sigma_y=(0.4, 1.0),
                                  sigma_z=(0.0, 0.3)),
            T.Lambda(func=_back_in_range),
        ]
        if stage == 1:
            rnd.append(T.RandFlipd(keys=keys, prob=0.5, spatial_axis=0))
    # a case's "classes" (labelled classes, for the partial-label loss) rides along untouched
    rnd.append(T.SelectItemsd(keys=keys + ["classes"], allow_missing_keys=True))
    return det, T.Compose(rnd)


def _back_in_range(d: dict) -> dict:
    """After intensity augmentation: signal channels (the first two) clipped to
    :data:`legcomp.preprocessing.inputs.CLIP`, as at inference; a stage-1 mask channel (the third)
    taken from before the intensity augmentation and binarised (spatial transforms interpolate it)."""
    import torch

    d = dict(d)
    img = torch.as_tensor(d["image"])
    before = torch.as_tensor(d.pop("image_spatial"))
    out = img.clamp(*prep.CLIP)
    if img.shape[0] > 2:
        out[2:] = (before[2:] > 0.5).to(img.dtype)
    d["image"] = out
    return d


def _clone(x):
    """Copy a tensor or array (module-level so that DataLoader workers can pickle it)."""
    return x.clone() if hasattr(x, "clone") else x.copy()


def _noise_transform():
    from monai.transforms import MapTransform, RandomizableTransform

    class TorchGaussianNoised(RandomizableTransform, MapTransform):
        """Additive Gaussian noise drawn with torch on the data's device (MONAI's RandGaussianNoised draws
        the whole patch with numpy on the CPU, which dominates the cost of a GPU-resident pipeline)."""

        def __init__(self, keys, prob: float = 0.1, std: float = 0.1):
            MapTransform.__init__(self, keys)
            RandomizableTransform.__init__(self, prob)
            self.std = float(std)

        def __call__(self, data):
            import torch

            d = dict(data)
            self.randomize(None)
            if not self._do_transform:
                return d
            seed = int(self.R.randint(0, 2**31 - 1))
            sigma = float(self.R.uniform(0, self.std))
            for key in self.key_iterator(d):
                img = torch.as_tensor(d[key])
                gen = torch.Generator(device=img.device).manual_seed(seed)
                d[key] = img + sigma * torch.randn(img.shape, generator=gen, device=img.device, dtype=img.dtype)
            return d

    return TorchGaussianNoised


def __getattr__(name):  # lazy: keep MONAI out of the import of this module
    if name == "TorchGaussianNoised":
        return _noise_transform()
    raise AttributeError(name)

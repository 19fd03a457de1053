"""Network inputs: the single definition shared by training and inference.

* Intensity normalisation: every Dixon contrast of a study is divided by one robust scale and
  clipped to [0, 2]: by default a multiple of the median fat signal of the body's pure-fat voxels
  (``fat_reference``), or the 99th percentile of the in-phase signal W+F inside the body
  (``in_phase_percentile``, weights before 0.2). One scale for all channels keeps the water/fat
  ratio (the fat fraction) intact; weights record which normalisation they were trained with.
* Stage 1 input: ``[water, fat]``; stage 2 input: ``[opposed_phase, water]`` (+ optionally the
  stage-1 whole-muscle mask as a third channel).
* Working grid: networks see a fixed in-plane voxel size (``WORKING_SPACING``, mm; the slice
  axis keeps its native spacing) so that scanners with different resolutions look alike.
  Images are resampled linearly, label maps by nearest neighbour; predictions go back to the
  input grid with :func:`from_working` (label maps) or :func:`labels_from_probabilities` (class
  probabilities, linearly). The spacing used is stored in the weights' metadata (``working_spacing``).
* Leg crops: a box around one leg's stage-1 whole muscle (plus an in-plane margin in mm, full
  z extent); a left leg is mirrored along x so every crop looks like a right leg.

Arrays are (x, y, z) or (channel, x, y, z), canonical RAS+ as in :class:`legcomp.io.DixonStudy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
from scipy import ndimage

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.io.study import DixonStudy

WORKING_SPACING: tuple[float | None, float | None, float | None] = (1.5, 1.5, None)
"""Default working voxel size (mm) along (x, y, z); ``None`` keeps the native spacing."""

SPACING_TOLERANCE = 0.1
"""Relative spacing difference under which an axis is not resampled."""

NORM_PERCENTILE = 99.0
BODY_FRACTION = 0.1
CLIP = (0.0, 2.0)
FAT_REFERENCE_FF = 0.75
"""Fat fraction F/(W+F) above which a body voxel counts as (nearly) pure fat for ``fat_reference``."""
FAT_REFERENCE_FACTOR = 1.4
"""``fat_reference`` scale = this x the median fat signal of pure-fat voxels (on the training phantoms
the 99th percentile of W+F sits at 1.18-1.90 x, median 1.37 x, that median)."""

NORMALISATIONS: tuple[str, ...] = ("fat_reference", "in_phase_percentile")
"""Intensity normalisations; the first is the default for new weights. Weights record theirs
(metadata ``normalisation.method``); weights without one used ``in_phase_percentile``."""


def check_normalisation(method: str) -> str:
    """``method`` if it is a known normalisation, else a one-line input error."""
    if method not in NORMALISATIONS:
        raise LegcompInputError(f"unknown normalisation {method!r}; expected one of {', '.join(NORMALISATIONS)}")
    return method


def normalisation_spec(method: str = NORMALISATIONS[0]) -> dict:
    """Description of a normalisation (JSON-able), stored in weights metadata."""
    method = check_normalisation(method)
    spec = {"method": method, "body_fraction": BODY_FRACTION, "clip": list(CLIP)}
    if method == "in_phase_percentile":
        spec["percentile"] = NORM_PERCENTILE
    else:
        spec.update(fat_fraction_above=FAT_REFERENCE_FF, factor=FAT_REFERENCE_FACTOR)
    return spec


NORMALISATION: dict = normalisation_spec()
"""The default normalisation's description."""


def normalisation_of(meta: Mapping) -> dict:
    """The normalisation recorded in weights metadata, with its parameters (weights without one
    used ``in_phase_percentile``); pass it as ``method`` to :func:`intensity_scale`."""
    spec = dict(meta.get("normalisation") or {})
    method = check_normalisation(str(spec.get("method", "in_phase_percentile")))
    return {**normalisation_spec(method), **spec, "method": method}


LEG_MARGIN_MM = 15.0
"""Default in-plane margin (mm) around a leg's whole muscle for stage-2 crops."""


# --------------------------------------------------------------------------- normalisation

def body_mask(study: DixonStudy) -> np.ndarray:
    """Bool (x, y, z): voxels whose W+F exceeds ``BODY_FRACTION`` of its 99.9th percentile."""
    ip = study.water + study.fat
    return ip > BODY_FRACTION * float(np.percentile(ip, 99.9))


def intensity_scale(study: DixonStudy, method: str | Mapping = NORMALISATIONS[0]) -> float:
    """Robust signal scale (> 0) that every contrast of the study is divided by.

    ``method``: a name of :data:`NORMALISATIONS` (with this module's constants) or a recorded spec
    (:func:`normalisation_of`, whose parameters are used):

    * ``fat_reference`` (default): ``factor`` (:data:`FAT_REFERENCE_FACTOR`) x the median fat signal
      of the body's pure-fat voxels (F/(W+F) > ``fat_fraction_above``: subcutaneous fat, marrow,
      fat-replaced muscle). Adipose tissue is an internal reference that coil hot spots and bright
      vessels do not move, as in fat-referenced Dixon quantification. Falls back to
      ``in_phase_percentile`` when the body holds fewer than 100 such voxels. In a study whose
      water and fat are swapped the reference is muscle water instead (about the same level).
    * ``in_phase_percentile``: the ``percentile`` (:data:`NORM_PERCENTILE`) percentile of W+F inside the body.
    """
    spec = normalisation_spec(method) if isinstance(method, str) else normalisation_of({"normalisation": method})
    ip = study.water + study.fat
    body = body_mask(study)
    scale = 0.0
    if spec["method"] == "fat_reference":
        pure_fat = body & (study.fat > float(spec["fat_fraction_above"]) * ip)
        if pure_fat.sum() >= 100:
            scale = float(spec["factor"]) * float(np.median(study.fat[pure_fat]))
    if not np.isfinite(scale) or scale <= 0:
        vals = ip[body] if body.any() else ip.ravel()
        scale = float(np.percentile(vals, float(spec.get("percentile", NORM_PERCENTILE))))
    if not np.isfinite(scale) or scale <= 0:
        scale = float(np.abs(ip).max())
    if scale <= 0:
        raise LegcompInputError("water + fat is zero everywhere", study.source or None)
    return scale


def _norm(a: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.asarray(a, np.float32) / np.float32(scale), *CLIP).astype(np.float32, copy=False)


def stage1_input(study: DixonStudy, scale: float | None = None,
                 method: str | Mapping = NORMALISATIONS[0]) -> np.ndarray:
    """Stage-1 network input: float32 (2, x, y, z) = [water, fat] / scale, clipped to [0, 2].

    ``scale`` defaults to :func:`intensity_scale` by ``method``.
    """
    s = intensity_scale(study, method) if scale is None else float(scale)
    return np.stack([_norm(study.water, s), _norm(study.fat, s)])


def stage2_input(study: DixonStudy, stage1_mask: np.ndarray | None = None, scale: float | None = None,
                 method: str | Mapping = NORMALISATIONS[0]) -> np.ndarray:
    """Stage-2 network input: float32 (C, x, y, z) = [opposed_phase, water] / scale.

    With ``stage1_mask`` (a stage-1 label map on the same grid) a third channel holds the
    whole-muscle mask (1.0 inside, 0.0 outside). ``scale`` defaults to :func:`intensity_scale` by
    ``method``.
    """
    s = intensity_scale(study, method) if scale is None else float(scale)
    chans = [_norm(study.opposed_phase, s), _norm(study.water, s)]
    if stage1_mask is not None:
        m = np.asarray(stage1_mask)
        if m.shape != study.shape:
            raise LegcompInputError(f"stage-1 mask shape {m.shape} differs from the image shape {study.shape}",
                                    study.source or None)
        chans.append((m == anatomy.WHOLE_MUSCLE.id).astype(np.float32))
    return np.stack(chans)


def network_input(study: DixonStudy, stage: int, stage1_mask: np.ndarray | None = None,
                  method: str | Mapping = NORMALISATIONS[0]) -> np.ndarray:
    """:func:`stage1_input` or :func:`stage2_input` by stage number."""
    if int(stage) == 1:
        return stage1_input(study, method=method)
    if int(stage) == 2:
        return stage2_input(study, stage1_mask, method=method)
    raise LegcompInputError(f"unknown stage {stage!r}; expected 1 or 2")


# --------------------------------------------------------------------------- working grid

def working_spacing(spec: Mapping | Sequence | None = None) -> tuple[float | None, float | None, float | None]:
    """Working spacing (mm, None = native) from weights metadata, a 3-sequence, or the default."""
    if isinstance(spec, Mapping):
        spec = spec.get("working_spacing", None)
        if spec is None:
            return (None, None, None)
    if spec is None:
        return WORKING_SPACING
    vals = list(spec)
    if len(vals) != 3:
        raise LegcompInputError(f"working spacing needs 3 values (x, y, z), got {vals}")
    return tuple(None if v is None else float(v) for v in vals)  # type: ignore[return-value]


def working_shape(shape: Sequence[int], spacing: Sequence[float],
                  target: Sequence[float | None]) -> tuple[int, int, int]:
    """Grid size (x, y, z) covering the same extent at the target spacing (axes within tolerance kept)."""
    out = []
    for n, s, t in zip(shape, spacing, target):
        if t is None or abs(s - t) <= SPACING_TOLERANCE * t:
            out.append(int(n))
        else:
            out.append(max(1, int(round(n * s / t))))
    return tuple(out)  # type: ignore[return-value]


def resample(array: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
    """Resample a (x, y, z) or (C, x, y, z) array to spatial ``shape`` (same extent, voxel centres aligned).

    ``order`` 1 = linear (images, probabilities), 0 = nearest (label maps). The grid convention is
    that of :func:`scipy.ndimage.zoom` with ``grid_mode=True``.
    """
    a = np.asarray(array)
    if a.ndim == 4:
        return np.stack([resample(c, shape, order) for c in a])
    shape = tuple(int(s) for s in shape)
    if a.shape == shape:
        return a
    zoom = [o / i for o, i in zip(shape, a.shape)]
    out = ndimage.zoom(a, zoom, order=order, mode="nearest", grid_mode=True, prefilter=False)
    if out.shape != shape:  # guard against rounding: crop / edge-pad
        out = out[tuple(slice(0, s) for s in shape)]
        out = np.pad(out, [(0, s - n) for s, n in zip(shape, out.shape)], mode="edge")
    return out


def _working_affine(affine: np.ndarray, shape_in: Sequence[int], shape_out: Sequence[int]) -> np.ndarray:
    f = np.array([i / o for i, o in zip(shape_in, shape_out)], float)
    m = np.eye(4)
    m[:3, :3] = np.diag(f)
    m[:3, 3] = 0.5 * f - 0.5
    return np.asarray(affine, float) @ m


def to_working(study: DixonStudy, spec: Mapping | Sequence | None = None) -> DixonStudy:
    """The study resampled to the working grid (images linear, label maps nearest).

    Args:
        study: canonical study.
        spec: weights metadata (its ``working_spacing``), a 3-sequence of mm (None = native), or
            None for :data:`WORKING_SPACING`.
    Returns:
        A new :class:`DixonStudy` (the same object when no axis needs resampling).
    """
    target = working_spacing(spec)
    shape = working_shape(study.shape, study.spacing, target)
    if shape == study.shape:
        return study
    return replace(study,
                   water=resample(study.water, shape, 1).astype(np.float32),
                   fat=resample(study.fat, shape, 1).astype(np.float32),
                   in_phase=resample(study.in_phase, shape, 1).astype(np.float32),
                   opposed_phase=resample(study.opposed_phase, shape, 1).astype(np.float32),
                   affine=_working_affine(study.affine, study.shape, shape),
                   labels={k: resample(v, shape, 0) for k, v in study.labels.items()})


def labels_to_working(labels: np.ndarray, study: DixonStudy, work: DixonStudy) -> np.ndarray:
    """A label map on the study's grid resampled (nearest) onto the working grid."""
    return resample(np.asarray(labels), work.shape, 0)


def from_working(array: np.ndarray, work: DixonStudy, study: DixonStudy, order: int = 0) -> np.ndarray:
    """An array on the working grid ((x, y, z) or (C, x, y, z)) back onto the study's grid.

    ``order=0`` (default) for label maps (dtype kept), ``order=1`` for probabilities / images.
    """
    a = np.asarray(array)
    if tuple(a.shape[-3:]) != tuple(work.shape):
        raise LegcompInputError(f"array shape {a.shape} does not match the working grid {work.shape}")
    return resample(a, study.shape, order).astype(a.dtype, copy=False)


def labels_from_probabilities(prob: np.ndarray, work: DixonStudy, study: DixonStudy) -> np.ndarray:
    """Label map (uint8, the study's grid) from class probabilities (C, x, y, z) on the working grid.

    Each class's probability is resampled linearly onto the study's grid and the most probable
    class wins, which gives smoother borders than resampling labels by nearest neighbour when the
    study's voxels are finer than the working grid. One class at a time: memory stays at two
    study-sized arrays besides ``prob``.
    """
    return labels_and_confidence(prob, work, study)[0]


def labels_and_confidence(prob: np.ndarray, work: DixonStudy, study: DixonStudy) -> tuple[np.ndarray, np.ndarray]:
    """(labels, confidence) on the study's grid from class probabilities (C, x, y, z) on the working grid.

    ``labels`` (uint8) as :func:`labels_from_probabilities`; ``confidence`` (float32, 0-1) is the
    winning class's (resampled) probability in each voxel, the network's own certainty.
    """
    p = np.asarray(prob)
    if p.ndim != 4 or tuple(p.shape[1:]) != tuple(work.shape):
        raise LegcompInputError(f"probabilities of shape {p.shape} do not match the working grid {work.shape}")
    if tuple(work.shape) == tuple(study.shape):
        labels = p.argmax(0).astype(np.uint8)
        conf = np.zeros(p.shape[1:], np.float32)  # the argmax class's probability: the maximum, class by class
        for c in range(p.shape[0]):  # (faster than p.max(0) on float16 and no float16 temporary)
            np.maximum(conf, p[c], out=conf)
        return labels, conf
    best = np.full(study.shape, -np.inf, np.float32)
    labels = np.zeros(study.shape, np.uint8)
    for c in range(p.shape[0]):
        pc = resample(np.asarray(p[c], np.float32), study.shape, 1)
        better = pc > best
        best[better] = pc[better]
        labels[better] = c
    return labels, best


# --------------------------------------------------------------------------- leg crops

def leg_crop_box(stage1: np.ndarray, legs: np.ndarray, leg_id: int, spacing: Sequence[float],
                 margin_mm: float = LEG_MARGIN_MM, skip_slices: np.ndarray | None = None
                 ) -> tuple[slice, slice, slice] | None:
    """Box around one leg's stage-1 whole muscle, grown in-plane by ``margin_mm``; full z extent.

    ``skip_slices``: optional bool per z slice; those slices do not widen the box in-plane (the
    hip/pelvis slices, where each leg's half of the joined cross-section holds pelvic contents that
    would pull the box towards the midline), unless the leg has whole muscle on no other slice.
    Returns None when the leg has no whole-muscle voxel.
    """
    sel = (np.asarray(legs) == leg_id) & (np.asarray(stage1) == anatomy.WHOLE_MUSCLE.id)
    if not sel.any():
        return None
    if skip_slices is not None:
        kept = sel & ~np.asarray(skip_slices, bool)[None, None, :]
        sel = kept if kept.any() else sel
    box = []
    for ax in range(2):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(sel.any(axis=other))
        m = int(np.ceil(margin_mm / float(spacing[ax])))
        box.append(slice(max(int(idx[0]) - m, 0), min(int(idx[-1]) + m + 1, sel.shape[ax])))
    box.append(slice(0, sel.shape[2]))
    return tuple(box)  # type: ignore[return-value]


def crop(array: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Cut a (x, y, z) box out of a (..., x, y, z) array (a view)."""
    a = np.asarray(array)
    return a[(Ellipsis, *box)]


def paste(full: np.ndarray, part: np.ndarray, box: tuple[slice, slice, slice],
          where: np.ndarray | None = None) -> np.ndarray:
    """Write ``part`` into ``full[..., box]`` in place (only where the (x, y, z) mask ``where`` is true,
    for every leading channel); returns ``full``."""
    region = full[(Ellipsis, *box)]
    if where is None:
        region[...] = part
    else:
        region[Ellipsis, where] = np.asarray(part)[Ellipsis, where]
    return full


def mirror_x(array: np.ndarray) -> np.ndarray:
    """Flip a (x, y, z) or (C, x, y, z) array along x (a left leg then looks like a right leg; self-inverse)."""
    a = np.asarray(array)
    return np.ascontiguousarray(np.flip(a, axis=a.ndim - 3))


def is_left(leg_id: int) -> bool:
    """True for the left leg's id in :data:`legcomp.anatomy.LEGS` (crops of it are mirrored)."""
    return anatomy.LEGS.get(int(leg_id)) == "left"


def pad_to_multiple(array: np.ndarray, divisor: Sequence[int], minimum: Sequence[int] | None = None,
                    mode: str = "edge") -> np.ndarray:
    """Pad the last three axes at their end to a multiple of ``divisor`` (and at least ``minimum``)."""
    a = np.asarray(array)
    spatial = a.shape[-3:]
    mins = minimum or (0, 0, 0)
    target = [max(int(n), int(m)) for n, m in zip(spatial, mins)]
    target = [t + (-t) % int(d) for t, d in zip(target, divisor)]
    pads = [(0, 0)] * (a.ndim - 3) + [(0, t - n) for t, n in zip(target, spatial)]
    if not any(p[1] for p in pads):
        return a
    return np.pad(a, pads, mode=mode) if mode != "constant" else np.pad(a, pads, mode="constant")

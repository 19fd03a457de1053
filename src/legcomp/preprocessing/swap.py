"""Fat-water swap detection and repair, from the images alone (no network: networks fail on swapped input).

Two-point Dixon reconstruction chooses, per connected region, which of two solutions is water; it
often chooses wrong, for a whole series or part of it (a slab of slices, one leg, a region at the
edge of the field of view). Swapped input then segments and quantifies to nonsense.

Arrays are (x, y, z) in canonical RAS+ (see :mod:`legcomp.io.study`); depths and lengths in mm,
areas in cm^2, fat fractions F/(W+F) in 0-1.

How it works
------------
Anatomy fixes which tissue is fat: subcutaneous adipose tissue (SAT) just under the skin and the
marrow of the long bones are fat-dominant, and muscle is never fatter than SAT. A swap exchanges
F/(W+F) with 1 - F/(W+F), so each piece of evidence below flips sign under a swap.

1. **Work grid.** Water and fat are block-averaged in-plane to at most :data:`WORK_MM` mm. The body
   (W+F, which a swap leaves unchanged) and its split into left and right leg
   (:func:`legcomp.preprocessing.legs.leg_map`) do not depend on the swap. Studies with in-plane
   voxels coarser than :data:`MAX_INPLANE_MM` are not judged (SAT is then thinner than a voxel).
2. **Units.** Each leg in each slice (a *unit*) is judged on its own. Depth = distance to the leg's
   outline (mm), in one-voxel layers; R = the leg's equivalent radius sqrt(area / pi).
3. **Surface tissue** (SAT): the median fat fraction of each layer from below the skin
   (:data:`SKIN_MM`) inwards; the first layer whose median lies :data:`DECISIVE` or more from 0.5 is
   the surface tissue, ``ff_surface``. Thin SAT (2-3 mm) is still found; in a swapped leg the first
   decisive layer is water-dominant.
4. **Inner bulk** (muscle, bone): the median fat fraction deeper than :data:`INNER_DEPTH` x R,
   ``ff_inner``. Muscle may be fat-replaced (dystrophy), so it is compared with SAT, not with 0.5.
5. **Marrow**: bones found as signal voids enclosing bright marrow (as in region detection,
   :func:`legcomp.preprocessing.body.find_bones`); ``ff_marrow`` = median fat fraction of their bright voxels.
6. **Score** = (ff_surface - 0.5) + (ff_surface - ff_inner) + (ff_marrow - 0.5) (terms that cannot be
   measured are left out). Positive means fat outside, as it should be; a swap negates the score.
7. **Sectors**: in each of :data:`N_SECTORS` angular sectors around the leg's centre, the surface
   tissue and the tissue beneath it (from the first layer differing by :data:`CONTRAST`, down to
   :data:`BENEATH_DEPTH` x R) say *fat over water* (+1), *water over fat* (-1) or nothing (0: water
   over water at a subcutaneous tibia, fat over fat on fat-replaced muscle).
8. **Unit verdict**: ``partial`` when :data:`MIN_SECTORS_PARTIAL` adjacent sectors say water over fat
   and as many others fat over water; else ``swapped`` (score <= -:data:`THRESHOLD`) or ``ok`` (score
   >= +THRESHOLD) unless more sectors contradict than agree; else ``undecided``. A partly swapped
   unit must belong to a run of :data:`MIN_PARTIAL_SLICES` consecutive ones whose swapped arcs
   overlap (a swapped region is continuous along z; odd anatomy such as the groin is not), and an
   undecided unit between swapped ones of the same leg is swapped.
9. **Study verdict**: ``none`` (no unit swapped), ``whole`` (every judged unit swapped), ``partial``
   (some slices, one leg or a region), ``undecided`` (nothing could be judged) or ``not_dixon``.

Measured with ``bench/bench_swap.py`` on template and domain-randomised phantoms and both real
studies, each unswapped and with whole, one-leg, slab and region swaps (table in the README): no
false alarm, every whole, leg and slab swap found; regions (the phantom's swap blob) in most studies.
A region swap over fully fat-replaced muscle is missed (SAT then lies water over water, like skin
over a subcutaneous tibia).

:func:`not_dixon_reason` says when the images cannot be a water/fat pair at all (a label map, water and
fat the same or proportional images, one of them empty, a signed phase image).

:func:`fix_swap` exchanges water and fat where units (or the swapped sectors of partly swapped units)
were judged swapped, everywhere for a whole-series swap; in-phase and opposed-phase images (W+F and
|W-F|) do not change under a swap, whether read or derived. :func:`screen_study` is the pipeline's
call: judge, fix if asked, one line on stderr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import nibabel as nib
import numpy as np
from scipy import ndimage

from legcomp.anatomy import LEGS
from legcomp.io.study import DixonStudy
from legcomp.preprocessing.body import block_mean, body_mask, find_bones
from legcomp.preprocessing.legs import leg_map

MAX_INPLANE_MM = 4.0
"""Studies with coarser in-plane voxels (mm) are not judged (verdict ``undecided``)."""
WORK_MM = 2.0
"""Largest in-plane voxel size (mm) of the analysis (integer block averaging)."""
MIN_UNIT_CM2 = 15.0
"""A leg cross-section smaller than this (cm^2) is not judged."""
SURFACE_MM = 20.0
"""Deepest layer (mm) searched for the surface tissue (also at most :data:`SURFACE_FRACTION` x R)."""
SURFACE_FRACTION = 0.35
"""The surface tissue is looked for down to at most this fraction of the leg's equivalent radius."""
SKIN_MM = 2.0
"""Skin (and partial volume with air) is taken to be this thick: the surface tissue is looked for below it."""
DECISIVE = 0.2
"""A layer is decisive when its median fat fraction lies this far or more from 0.5."""
INNER_DEPTH = 0.4
"""Inner bulk: deeper than this fraction of the leg's equivalent radius."""
MIN_LAYER_VOXELS = 5
"""A layer (or zone) with fewer voxels is not measured."""
THRESHOLD = 0.15
"""|score| at or above which a unit is judged swapped or fine."""
N_SECTORS = 12
"""Angular sectors of the surface layer per unit."""
MIN_SECTORS_PARTIAL = 2
"""A unit is partly swapped when at least this many adjacent sectors are swapped and as many others fine."""
MIN_PARTIAL_SLICES = 3
"""A partly swapped region must span at least this many consecutive slices."""
CONTRAST = 0.3
"""A sector's surface tissue and the tissue beneath must differ by this much in fat fraction."""
BENEATH_DEPTH = 0.5
"""The tissue beneath a sector's surface is looked at down to this fraction of the leg's radius."""
MARROW_MIN_CM2 = 0.5
"""Less bright marrow than this (cm^2) is not measured."""
LABEL_MAP_LEVELS = 64
"""An integer-valued image with at most this many distinct values is taken for a label map."""


@dataclass
class SwapUnit:
    """The judgement of one leg in one slice.

    Attributes:
        z: slice index (canonical RAS+ axis 2).
        leg: ``"left"`` or ``"right"``.
        area_cm2: the leg's cross-section.
        ff_surface, ff_inner, ff_marrow: median fat fractions (NaN when not measured).
        score: > 0 fat outside (as it should be), < 0 swapped; NaN when nothing was measured.
        sectors: per angular sector of the surface, +1 fat over water (fine), -1 water over fat
            (swapped), 0 neither.
        verdict: ``ok``, ``swapped``, ``partial`` or ``undecided``.
        centre: the leg's centroid on the work grid (pixels), the sectors' centre.
    """

    z: int
    leg: str
    area_cm2: float
    ff_surface: float
    ff_inner: float
    ff_marrow: float
    score: float
    sectors: tuple[int, ...]
    verdict: str
    centre: tuple[float, float] = (0.0, 0.0)


@dataclass
class SwapReport:
    """Fat-water swap verdict of a study.

    Attributes:
        verdict: ``none``, ``whole``, ``partial``, ``undecided`` or ``not_dixon``.
        swapped: leg name -> slice indices (canonical z) where that leg is swapped.
        partial: leg name -> slice indices where part of that leg (some sectors) is swapped.
        not_dixon: why the images are not a water/fat pair (empty if they are).
        not_judged: why the study was not judged at all (empty if it was).
        n_units: units (leg slices) judged ok, swapped, partial and undecided.
        fixed: whether :func:`fix_swap` exchanged water and fat; exchanged: in how many voxels.
        units: every unit's measurements.
        work_factor: in-plane block size of the work grid (voxels).
        legs: the work grid's leg map (uint8, 1 left / 2 right), to place a fix.
        spacing: the work grid's in-plane voxel size (mm).
        slice_index: canonical slice z -> the input file's slice number (set by :func:`check_study`);
            ``swapped``, ``partial`` and ``units`` hold canonical z, the note and JSON the input's numbers.
    """

    verdict: str
    swapped: dict[str, list[int]] = field(default_factory=dict)
    partial: dict[str, list[int]] = field(default_factory=dict)
    not_dixon: str = ""
    not_judged: str = ""
    n_units: dict[str, int] = field(default_factory=dict)
    fixed: bool = False
    exchanged: int = 0
    units: list[SwapUnit] = field(default_factory=list)
    work_factor: int = 1
    legs: np.ndarray | None = field(default=None, repr=False)
    spacing: tuple[float, float] = (1.0, 1.0)
    slice_index: np.ndarray | None = field(default=None, repr=False)

    def input_slices(self, zs: list[int]) -> list[int]:
        """Canonical slice indices as the input file numbers them (:func:`input_slice_index`), sorted."""
        if self.slice_index is None:
            return sorted(zs)
        return sorted(int(self.slice_index[z]) for z in zs)

    @property
    def any_swap(self) -> bool:
        """True when some unit is swapped or partly swapped."""
        return self.verdict in ("whole", "partial")

    def note(self) -> str:
        """One line for stderr and run.json (empty when nothing is wrong)."""
        if self.verdict == "not_dixon":
            return f"not a Dixon water/fat pair: {self.not_dixon}"
        if not self.any_swap:
            return ""
        judged = {leg: sum(u.leg == leg for u in self.units) for leg in LEGS.values()}
        what = _describe(self._input(self.swapped), self._input(self.partial), judged)
        if self.verdict == "whole":
            head = "water and fat are swapped in the whole series"
        else:
            head = f"water and fat are swapped in part of the series ({what})"
        tail = (f"; exchanged back in {self.exchanged} voxels before segmenting (--fix-swap)" if self.fixed else
                "; results are unreliable: check the images, or rerun with --fix-swap")
        return f"fat-water swap: {head}{tail}"

    def _input(self, per_leg: dict[str, list[int]]) -> dict[str, list[int]]:
        return {leg: self.input_slices(zs) for leg, zs in per_leg.items()}

    def to_json(self) -> dict:
        """The run.json record: verdict, swapped slices per leg, partly swapped slices, counts, fixed."""
        return {"verdict": self.verdict, "swapped_slices": self._input(self.swapped),
                "partly_swapped_slices": self._input(self.partial), "not_dixon": self.not_dixon or None,
                "not_judged": self.not_judged or None, "units": self.n_units, "fixed": self.fixed,
                "exchanged_voxels": self.exchanged, "note": self.note() or None}


def _ranges(zs: list[int]) -> str:
    """'3-7, 10' from [3, 4, 5, 6, 7, 10]."""
    out, start = [], None
    for i, z in enumerate(zs):
        if start is None:
            start = z
        if i + 1 == len(zs) or zs[i + 1] != z + 1:
            out.append(f"{start}" if start == z else f"{start}-{z}")
            start = None
    return ", ".join(out)


def _describe(swapped: dict[str, list[int]], partial: dict[str, list[int]], judged: dict[str, int]) -> str:
    """'the whole left leg; part of the right leg, slices 3-7' (``judged``: leg slices judged per leg)."""
    parts = [f"the whole {leg} leg" if len(zs) == judged.get(leg) else f"{leg} leg, slices {_ranges(zs)}"
             for leg, zs in swapped.items() if zs]
    parts += [f"part of the {leg} leg, slices {_ranges(zs)}" for leg, zs in partial.items() if zs]
    return "; ".join(parts)


# --------------------------------------------------------------------------- not a Dixon image
def integer_levels(a: np.ndarray) -> int:
    """How many distinct values ``a`` holds when they are all integers (0 when some is not), counted on
    at most about 2 million evenly spaced voxels."""
    sample = np.asarray(a).ravel()[:: max(1, a.size // 2_000_000)]
    if not np.array_equal(sample, np.round(sample)):
        return 0
    return int(np.unique(sample).size)


def not_dixon_reason(water: np.ndarray, fat: np.ndarray) -> str:
    """Why (water, fat) cannot be a two-point Dixon water/fat pair, or ``""``.

    Checks: an integer image of at most :data:`LABEL_MAP_LEVELS` levels (a label map), water and fat
    identical or proportional, one of them (nearly) empty where the other has signal, many negative
    values (a phase image).
    """
    for name, a in (("water", water), ("fat", fat)):
        n = integer_levels(a)
        if 0 < n <= LABEL_MAP_LEVELS:
            return f"the {name} image holds {n} integer levels only (a label map?)"
    for name, a in (("water", water), ("fat", fat)):
        if (a < 0).mean() > 0.05 and a.min() < -0.05 * max(float(a.max()), 1e-9):
            return f"the {name} image holds many negative values (a phase image?)"
    ip = water + fat
    body = ip > 0.1 * float(np.percentile(ip, 99.5))
    if body.sum() < 100:
        return ""
    w, f = water[body].astype(np.float64), fat[body].astype(np.float64)
    if np.allclose(w, f, rtol=1e-3, atol=1e-6 * float(np.abs(w).max())):
        return "water and fat are the same image"
    if w.std() > 0 and f.std() > 0 and np.corrcoef(w, f)[0, 1] > 0.995:
        return "water and fat are proportional (the same image scaled)"
    w99, f99 = float(np.percentile(w, 99)), float(np.percentile(f, 99))
    for name, lo, hi in (("fat", f99, w99), ("water", w99, f99)):
        if lo < 0.02 * hi:
            return f"the {name} image holds almost no signal in the body"
    return ""


# --------------------------------------------------------------------------- per unit
def work_grid(water: np.ndarray, fat: np.ndarray, affine: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[float, float], int]:
    """(water, fat, body, legs, in-plane spacing mm, block factor) on the work grid (x', y', z)."""

    sx, sy = (float(v) for v in np.sqrt((np.asarray(affine, float)[:3, :2] ** 2).sum(axis=0)))
    k = max(1, int(np.floor(WORK_MM / max(min(sx, sy), 1e-6) + 1e-6)))
    w, f = block_mean(water, k), block_mean(fat, k)
    body = body_mask(w + f)
    aff = np.array(affine, float)
    aff[:3, 0] *= k
    aff[:3, 1] *= k
    legs = leg_map(body, aff) if body.any() else np.zeros(body.shape, np.uint8)
    return w, f, body, legs, (sx * k, sy * k), k


def _box(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """Bounding box of a 2D mask, widened by ``pad`` pixels and clipped to the array."""
    ii, jj = np.nonzero(mask)
    return (slice(max(0, ii.min() - pad), ii.max() + pad + 1), slice(max(0, jj.min() - pad), jj.max() + pad + 1))


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    return lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1


def layer_index(depth: np.ndarray, layer_mm: float) -> np.ndarray:
    """One-voxel layers of depth: 1 for the outline's voxels, 2 for the next, ... (int array)."""
    return np.rint(depth / layer_mm).astype(int)


def first_layer(layer_mm: float) -> int:
    """The first layer below the skin: the first whose centre lies :data:`SKIN_MM` or deeper (layer i spans
    about (i - 1) to i voxels of depth): 2 for voxels up to 2.7 mm, 1 for coarser ones."""
    return max(1, int(np.ceil(SKIN_MM / layer_mm + 0.5 - 1e-9)))


def surface_ff(ff: np.ndarray, layers: np.ndarray, mask: np.ndarray, first: int, last: int) -> tuple[float, int]:
    """(median fat fraction, layer) of the first decisive layer (``|median - 0.5| >= DECISIVE``) from layer
    ``first`` (:func:`first_layer`) to ``last``; (NaN, 0) when none is decisive.

    ``ff``, ``layers`` (:func:`layer_index`) and ``mask`` are 2D arrays of one leg slice."""
    for i in range(first, max(first, last) + 1):
        sel = mask & (layers == i)
        if sel.sum() < MIN_LAYER_VOXELS:
            continue
        m = float(np.median(ff[sel]))
        if abs(m - 0.5) >= DECISIVE:
            return m, i
    return float("nan"), 0


def beneath_ff(ff: np.ndarray, layers: np.ndarray, mask: np.ndarray, surface: float, first: int,
               last: int) -> float:
    """Median fat fraction beneath the surface tissue: from the first layer after ``first`` whose median
    differs from ``surface`` by :data:`CONTRAST` or more, down to layer ``last``; NaN when none does."""
    if not np.isfinite(surface):
        return float("nan")
    for i in range(first + 1, last + 1):
        sel = mask & (layers == i)
        if sel.sum() >= MIN_LAYER_VOXELS and abs(float(np.median(ff[sel])) - surface) >= CONTRAST:
            deep = mask & (layers >= i) & (layers <= last)
            return float(np.median(ff[deep]))
    return float("nan")


def sector_state(ff_surface: float, ff_beneath: float) -> int:
    """+1 fat over water (as it should be), -1 water over fat (swapped), 0 neither, for one sector.

    The two must differ by :data:`CONTRAST`: water over water (a subcutaneous tibia) or fat over fat
    (fat-replaced muscle) says nothing."""
    if not (np.isfinite(ff_surface) and np.isfinite(ff_beneath)) or abs(ff_surface - ff_beneath) < CONTRAST:
        return 0
    if ff_surface >= 0.5 + DECISIVE and ff_beneath < ff_surface:
        return 1
    if ff_surface <= 0.5 - DECISIVE and ff_beneath > ff_surface:
        return -1
    return 0


def _marrow_ff(w: np.ndarray, f: np.ndarray, leg: np.ndarray, depth: np.ndarray,
               spacing: tuple[float, float]) -> float:
    """Median fat fraction of the bright voxels inside the leg's bones (NaN without a bone)."""

    bones, areas = find_bones(w, f, leg, depth, spacing)
    if not len(areas):
        return float("nan")
    ip = w + f
    marrow = (bones > 0) & (ip > 0.5 * float(np.median(ip[leg])))
    if marrow.sum() * spacing[0] * spacing[1] / 100.0 < MARROW_MIN_CM2:
        return float("nan")
    return float(np.median((f / np.maximum(ip, 1e-9))[marrow]))


def score_terms(ff_surface: float, ff_inner: float, ff_marrow: float) -> float:
    """(ff_surface - 0.5) + (ff_surface - ff_inner) + (ff_marrow - 0.5), NaN terms left out (NaN if all are)."""
    terms = []
    if np.isfinite(ff_surface):
        terms.append(ff_surface - 0.5)
        if np.isfinite(ff_inner):
            terms.append(ff_surface - ff_inner)
    if np.isfinite(ff_marrow):
        terms.append(ff_marrow - 0.5)
    return float(sum(terms)) if terms else float("nan")


def sector_map(shape: tuple[int, int], centre: tuple[float, float],
               spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Angular sector (0 .. N_SECTORS-1) of every pixel of a 2D grid around ``centre`` (pixel
    coordinates); ``spacing`` (mm) makes the angles true on anisotropic pixels (int array)."""
    ci, cj = centre
    ii, jj = np.indices(shape)
    angle = np.arctan2((jj - cj) * spacing[1], (ii - ci) * spacing[0]) + np.pi
    return (np.floor(angle / (2 * np.pi) * N_SECTORS).astype(int)) % N_SECTORS


def _max_circular_run(flags: np.ndarray) -> int:
    """Longest run of True in a circular sequence."""
    if flags.all():
        return int(flags.size)
    best = run = 0
    for v in np.concatenate([flags, flags]):
        run = run + 1 if v else 0
        best = max(best, run)
    return best


def unit_verdict(score: float, sectors: tuple[int, ...], partial: bool = True) -> str:
    """A unit's verdict from its score and its sectors' states.

    ``partial`` (if allowed) when :data:`MIN_SECTORS_PARTIAL` adjacent sectors are water over fat and as
    many adjacent ones fat over water; else ``swapped`` (score <= -THRESHOLD) or ``ok`` (score >= THRESHOLD)
    unless more sectors say the opposite than agree (SAT thinner than a voxel can fool the whole-leg
    median), else ``undecided``."""
    s = np.asarray(sectors, int)
    n_pos, n_neg = int((s > 0).sum()), int((s < 0).sum())
    runs = min(_max_circular_run(s < 0), _max_circular_run(s > 0))
    if partial and runs >= MIN_SECTORS_PARTIAL:
        return "partial"
    if np.isfinite(score) and score <= -THRESHOLD and n_pos <= n_neg:
        return "swapped"
    if np.isfinite(score) and score >= THRESHOLD and n_neg <= n_pos:
        return "ok"
    return "undecided"


def judge_unit(w: np.ndarray, f: np.ndarray, leg: np.ndarray, spacing: tuple[float, float],
               z: int = 0, leg_name: str = "") -> SwapUnit:
    """Judge one leg slice: 2D water, fat and leg mask (bool) on the work grid, ``spacing`` in mm."""
    dx, dy = spacing
    area = float(leg.sum()) * dx * dy / 100.0
    ip = w + f
    ff = f / np.maximum(ip, 1e-9)
    depth = ndimage.distance_transform_edt(leg, sampling=(dx, dy))
    radius = float(np.sqrt(area * 100.0 / np.pi))
    layer_mm = max(dx, dy)
    layers = layer_index(depth, layer_mm)
    first, max_layer = first_layer(layer_mm), int(min(SURFACE_MM, SURFACE_FRACTION * radius) / layer_mm)
    ff_s, _ = surface_ff(ff, layers, leg, first, max_layer)
    inner = leg & (depth > INNER_DEPTH * radius)
    ff_i = float(np.median(ff[inner])) if inner.sum() >= MIN_LAYER_VOXELS else float("nan")
    ff_m = _marrow_ff(w, f, leg, depth, spacing)
    score = score_terms(ff_s, ff_i, ff_m)
    centre = tuple(float(c) for c in ndimage.center_of_mass(leg))
    sector = sector_map(leg.shape, centre, spacing)
    last = int(BENEATH_DEPTH * radius / layer_mm)
    states = []
    for k in range(N_SECTORS):
        m = leg & (sector == k)
        fs, i = surface_ff(ff, layers, m, first, max_layer)
        states.append(sector_state(fs, beneath_ff(ff, layers, m, fs, i, last)))
    return SwapUnit(int(z), leg_name, round(area, 1), round(ff_s, 3), round(ff_i, 3), round(ff_m, 3),
                    round(score, 3), tuple(states), unit_verdict(score, tuple(states)), centre)


# --------------------------------------------------------------------------- study
def detect_swap(water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> SwapReport:
    """Judge every leg slice of a study for a fat-water swap (see the module doc).

    Args:
        water, fat: (x, y, z) arrays, canonical RAS+.
        affine: 4x4 voxel-to-world matrix (mm).
    """
    water, fat = np.asarray(water), np.asarray(fat)
    reason = not_dixon_reason(water, fat)
    if reason:
        return SwapReport("not_dixon", not_dixon=reason)
    inplane = float(np.sqrt((np.asarray(affine, float)[:3, :2] ** 2).sum(axis=0)).max())
    if inplane > MAX_INPLANE_MM:
        return SwapReport("undecided", not_judged=f"in-plane voxels of {inplane:.3g} mm, coarser than "
                                                  f"{MAX_INPLANE_MM:g} mm: SAT cannot be told from muscle")
    w, f, body, legs, spacing, k = work_grid(water, fat, affine)
    units = []
    for z in range(w.shape[2]):
        for lid, name in LEGS.items():
            m = body[:, :, z] & (legs[:, :, z] == lid)
            if not m.any():
                continue
            m = _largest(m)
            if m.sum() * spacing[0] * spacing[1] / 100.0 < MIN_UNIT_CM2:
                continue
            box = _box(m, pad=2)
            u = judge_unit(w[box + (z,)], f[box + (z,)], m[box], spacing, z, name)
            units.append(replace(u, centre=(u.centre[0] + box[0].start, u.centre[1] + box[1].start)))
    return summarise(units, legs, k, spacing)


def swapped_arc(sectors: tuple[int, ...]) -> set[int]:
    """Sectors in circular runs of at least :data:`MIN_SECTORS_PARTIAL` adjacent swapped (-1) sectors."""
    n = len(sectors)
    neg = [v < 0 for v in sectors]
    if all(neg):
        return set(range(n))
    out: set[int] = set()
    start = next((i for i in range(n) if not neg[i]), 0)
    run: list[int] = []
    for step in range(1, n + 1):
        i = (start + step) % n
        if neg[i]:
            run.append(i)
        if not neg[i] or step == n:
            if len(run) >= MIN_SECTORS_PARTIAL:
                out.update(run)
            run = []
    return out


def _confirm_partial(units: list[SwapUnit]) -> list[SwapUnit]:
    """Keep a partly swapped unit only in a chain of at least :data:`MIN_PARTIAL_SLICES` partly swapped
    units of the same leg in consecutive slices whose swapped arcs overlap (within one sector): a swapped
    region is continuous across slices, whereas odd anatomy (the groin, a subcutaneous bone) seldom lines
    up so. The others are judged as whole units (:func:`unit_verdict` with ``partial=False``)."""
    arcs = {(u.z, u.leg): swapped_arc(u.sectors) for u in units if u.verdict == "partial"}

    def linked(a: tuple[int, str], b: tuple[int, str]) -> bool:
        near = {(k + d) % N_SECTORS for k in arcs[a] for d in (-1, 0, 1)}
        return bool(near & arcs.get(b, set()))

    chain: dict[tuple[int, str], int] = {}
    for key in sorted(arcs, key=lambda k: (k[1], k[0])):
        prev = (key[0] - 1, key[1])
        chain[key] = chain[prev] + 1 if prev in arcs and linked(key, prev) else 1
    # propagate each chain's full length back to its members
    length = dict(chain)
    for key in sorted(arcs, key=lambda k: (k[1], -k[0])):
        nxt = (key[0] + 1, key[1])
        if nxt in length and chain.get(nxt, 0) == chain[key] + 1:
            length[key] = length[nxt]
    out = []
    for u in units:
        if u.verdict == "partial" and length[(u.z, u.leg)] < MIN_PARTIAL_SLICES:
            u = replace(u, verdict=unit_verdict(u.score, u.sectors, partial=False))
        out.append(u)
    return out


def _fill_undecided(units: list[SwapUnit]) -> list[SwapUnit]:
    """An undecided unit between swapped ones is swapped: if the nearest judged units of the same leg above
    and below (or the only one, at the end of the stack) are swapped, so is it (a swap is contiguous)."""
    judged = {(u.z, u.leg): u.verdict for u in units if u.verdict in ("ok", "swapped", "partial")}
    out = []
    for u in units:
        if u.verdict == "undecided":
            zs = sorted(z for z, leg in judged if leg == u.leg)
            below = [judged[(z, u.leg)] for z in zs if z < u.z][-1:]
            above = [judged[(z, u.leg)] for z in zs if z > u.z][:1]
            if below + above and all(v == "swapped" for v in below + above):
                u = replace(u, verdict="swapped")
        out.append(u)
    return out


def summarise(units: list[SwapUnit], legs: np.ndarray | None = None, work_factor: int = 1,
              spacing: tuple[float, float] = (1.0, 1.0)) -> SwapReport:
    """The study verdict from unit verdicts (see the module doc)."""
    units = _fill_undecided(_confirm_partial(units))
    counts = {v: sum(u.verdict == v for u in units) for v in ("ok", "swapped", "partial", "undecided")}
    swapped = {name: [u.z for u in units if u.leg == name and u.verdict == "swapped"] for name in LEGS.values()}
    partial = {name: [u.z for u in units if u.leg == name and u.verdict == "partial"] for name in LEGS.values()}
    swapped = {k: v for k, v in swapped.items() if v}
    partial = {k: v for k, v in partial.items() if v}
    if counts["swapped"] + counts["partial"] == 0:
        verdict = "none" if counts["ok"] else "undecided"
    elif counts["ok"] == 0 and counts["partial"] == 0:
        verdict = "whole"
    else:
        verdict = "partial"
    return SwapReport(verdict, swapped, partial, n_units=counts, units=units, work_factor=work_factor, legs=legs,
                      spacing=spacing)


def swap_region(report: SwapReport, shape: tuple[int, int, int]) -> np.ndarray:
    """Bool (x, y, z) on the input grid: where ``report`` judged water and fat swapped: everywhere for a
    whole-series swap, else each swapped leg slice (its side of the split between the legs) and the
    swapped sectors (wedges from the leg's centre) of partly swapped ones."""
    out = np.zeros(shape, bool)
    if report.verdict == "whole":
        out[:] = True
        return out
    if report.legs is None or not report.any_swap:
        return out
    k = report.work_factor
    ids = {name: lid for lid, name in LEGS.items()}

    def up(a2d: np.ndarray) -> np.ndarray:  # work grid -> input grid (edge rows/columns repeated)
        big = np.repeat(np.repeat(a2d, k, axis=0), k, axis=1)
        pad = ((0, max(0, shape[0] - big.shape[0])), (0, max(0, shape[1] - big.shape[1])))
        return np.pad(big, pad, mode="edge")[: shape[0], : shape[1]]

    for u in report.units:
        if u.verdict not in ("swapped", "partial"):
            continue
        half = report.legs[:, :, u.z] == ids[u.leg]
        if u.verdict == "partial":
            sector = sector_map(half.shape, u.centre, report.spacing)
            half = half & np.isin(sector, sorted(swapped_arc(u.sectors)))
        out[:, :, u.z] |= up(half)
    return out


def fix_swap(study: DixonStudy, report: SwapReport) -> DixonStudy:
    """A copy of ``study`` with water and fat exchanged where ``report`` judged them swapped.

    In-phase (W+F) and opposed-phase (|W-F|) are the same under a swap, read or derived, and are kept.
    Sets ``report.fixed`` (and ``report.exchanged``) when something was exchanged."""
    region = swap_region(report, study.shape)
    if not region.any():
        return study
    water = np.where(region, study.fat, study.water).astype(study.water.dtype, copy=False)
    fat = np.where(region, study.water, study.fat).astype(study.fat.dtype, copy=False)
    report.fixed = True
    report.exchanged = int(region.sum())
    return replace(study, water=water, fat=fat)


def input_slice_index(study: DixonStudy) -> np.ndarray:
    """For each canonical slice z, its index along the input file's slice axis (flipped where that axis
    runs superior to inferior); z itself without an input affine."""
    z = np.arange(study.shape[2])
    if study.input_affine is None:
        return z
    ornt = nib.io_orientation(np.asarray(study.input_affine, float))
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return study.shape[2] - 1 - z if ornt[axis, 1] < 0 else z


def check_study(study: DixonStudy) -> SwapReport:
    """:func:`detect_swap` on a study's canonical water and fat; slices reported as the input file numbers them."""
    report = detect_swap(study.water, study.fat, study.affine)
    report.slice_index = input_slice_index(study)
    return report


def screen_study(study: DixonStudy, fix: bool = False) -> tuple[DixonStudy, SwapReport]:
    """The check before segmentation: judge ``study``, exchange water and fat where swapped when ``fix``
    (:func:`fix_swap`), and print the report's note (if any) on stderr as one line.

    Returns the study to segment (``study`` itself unless fixed) and the report (``report.to_json()`` is
    run.json's ``fat_water_swap``)."""
    report = check_study(study)
    if fix and report.any_swap:
        study = fix_swap(study, report)
    note = report.note()
    if note:
        print(f"legcomp: {study.name}: {note}", file=sys.stderr)
    return study, report


__all__ = ["SwapUnit", "SwapReport", "not_dixon_reason", "integer_levels", "detect_swap", "judge_unit",
           "unit_verdict", "summarise", "swap_region", "fix_swap", "check_study", "screen_study", "work_grid",
           "surface_ff", "beneath_ff", "sector_state", "score_terms"]

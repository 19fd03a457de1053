"""Split a two-leg image into the subject's left and right leg.

Arrays have axis order (x, y, z) in canonical RAS+ orientation (see
:mod:`legcomp.io.study`): axis 0 runs from the subject's left to right. Leg ids follow
:data:`legcomp.anatomy.LEGS` (1 = left, 2 = right, 0 = background).

Method: the foreground's profile along x (the y-extent of the foreground, first to last
voxel, summed over z, so holes such as bone do not count; smoothed
with a 1-D Gaussian of ``smooth_mm``) is searched for the deepest valley between two
humps. A valley lower than ``valley_ratio`` times the smaller hump means two legs; the
split is then refined slice by slice (the lowest point of that slice's own x-profile
within ``search_mm`` of the global split, ties broken towards the global split), and
the per-slice splits are median-filtered along z. Slices without foreground keep the
global split; a slice with one leg only (no valley of its own) keeps that leg whole, on
the side of the global split where its centroid lies. Legs touching at a few voxels,
legs converging towards the hips and slices where one leg ends early are handled.

Which side is which is decided in world coordinates: the leg whose centroid has the
larger world x (RAS+ millimetres from the affine) is the subject's right leg, so an
array with a flipped x axis is still named correctly. A single-leg image is named from
its anatomy when a stage-2 map is given (lateral muscles lie towards +x in a right leg,
see :func:`side_from_muscles`), else by the sign of its centroid's world x relative to
the scanner isocentre (x = 0): x > 0 is the right leg, otherwise the left. The isocentre
rule is a guess: single-leg scans are often centred on the leg.

Legs joined at the hip. Near the hips one cross-section holds both legs, the pelvis and the
genitals, with no valley between the legs. Such a slice is never given to one leg: it is split
at the body's midline, followed from the slices where the legs are apart (the centre of the gap
between them, or the valley where they touch; a robust Theil-Sen line along z, its extrapolation
held within ``max_drift_mm`` of the nearest measured slice). When no slice shows the legs apart
but the cross-sections are much wider than deep (``joined_aspect``), the legs are joined on every
slice and each is split at the centre of its x-extent. Each slice gets a coverage
(:data:`COVERAGE`) and a level (:func:`slice_levels`): joined slices above every slice with the legs
apart are the hip/pelvis (:data:`HIP_LEVEL`), which quantification leaves out of the volumes by
default. :func:`split_legs` returns the leg map with the coverage and midline; :func:`leg_map`
the map alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from legcomp import anatomy
from legcomp.anatomy import LEGS
from legcomp.errors import LegcompInputError

LEFT: int = next(k for k, v in LEGS.items() if v == "left")
RIGHT: int = next(k for k, v in LEGS.items() if v == "right")

COVERAGE: dict[str, str] = {
    "empty": "no foreground in the slice",
    "one_leg": "one leg only",
    "apart": "both legs, a gap between them",
    "touching": "both legs touching, split at the valley between them",
    "joined": "legs joined in one cross-section (hip, pelvis, genitals), split at the body midline",
}
"""Per-slice coverage kinds of :class:`LegSplit` and their meaning."""

HIP_LEVEL: str = "hip/pelvis"
"""Level of a joined slice above every slice with the legs apart (see :func:`slice_levels`)."""


def _axis_spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def _world_x(affine: np.ndarray, ijk: np.ndarray) -> float:
    return float((np.asarray(affine, float) @ np.append(ijk, 1.0))[0])


def find_leg_split(profile: np.ndarray, smooth_vox: float, valley_ratio: float = 0.5,
                   min_fraction: float = 0.1) -> int | None:
    """Index ``s`` splitting a 1-D foreground profile into two humps (``[:s]`` and ``[s:]``).

    Returns None when the profile has no valley deeper than ``valley_ratio`` times the
    smaller hump, or when either side holds less than ``min_fraction`` of the mass.
    """
    p = ndimage.gaussian_filter1d(profile.astype(float), max(smooth_vox, 0.0)) if smooth_vox > 0 else profile.astype(float)
    n = p.size
    total = p.sum()
    if n < 3 or total <= 0:
        return None
    left_max = np.maximum.accumulate(p)
    right_max = np.maximum.accumulate(p[::-1])[::-1]
    cum = np.cumsum(p)
    best, best_ratio = None, valley_ratio
    for s in range(1, n - 1):
        hump = min(left_max[s - 1], right_max[s + 1])
        if hump <= 0:
            continue
        ratio = p[s] / hump
        frac_left = cum[s - 1] / total
        if ratio < best_ratio and min_fraction <= frac_left <= 1 - min_fraction:
            best, best_ratio = s, ratio
    return best


LATERAL_MUSCLES: dict[str, tuple[str, ...]] = {
    "thigh": ("vastus_lateralis", "biceps_femoris"),
    "calf": ("gastrocnemius_lateralis", "peroneus_longus_brevis"),
}
MEDIAL_MUSCLES: dict[str, tuple[str, ...]] = {
    "thigh": ("vastus_medialis", "gracilis", "sartorius", "semimembranosus"),
    "calf": ("gastrocnemius_medialis", "flexor_digitorum_longus"),
}


def side_from_muscles(muscles: np.ndarray, region: str, affine: np.ndarray, min_mm: float = 5.0) -> int | None:
    """Which leg a single-leg stage-2 map shows, from anatomy: the lateral muscles (e.g. vastus
    lateralis, biceps femoris) lie towards the subject's right (+x) in a right leg.

    Returns the leg id, or None when the lateral and medial groups are missing or their
    centroids are less than ``min_mm`` apart along world x.
    """
    region = anatomy.check_region(region)
    lab = np.asarray(muscles)
    ids = {n: anatomy.label_by_name(n, region).id for n in (*LATERAL_MUSCLES[region], *MEDIAL_MUSCLES[region])}
    xs = []
    for group in (LATERAL_MUSCLES[region], MEDIAL_MUSCLES[region]):
        m = np.isin(lab, [ids[n] for n in group])
        if not m.any():
            return None
        xs.append(_world_x(affine, np.array(ndimage.center_of_mass(m))))
    diff = xs[0] - xs[1]
    if abs(diff) < min_mm:
        return None
    return RIGHT if diff > 0 else LEFT


@dataclass(frozen=True)
class LegSplit:
    """Result of :func:`split_legs`; arrays (x, y, z) canonical RAS+, per-slice values along z.

    Attributes:
        legs: uint8 leg map (1 left, 2 right; 0 only where there is no foreground at all).
        coverage: per slice, a key of :data:`COVERAGE`.
        midline_x: per slice, the body midline as a voxel x index (float; NaN when the legs
            were never found apart, e.g. a single-leg image).
    """

    legs: np.ndarray
    coverage: tuple[str, ...]
    midline_x: np.ndarray


def _gap_centre(col: np.ndarray, s: int) -> float:
    """Voxel x of the middle of the gap around split ``s`` of a y-extent profile (x,):
    the centre of the empty run holding column ``s``, else the boundary ``s - 0.5`` (legs touching)."""
    if col[s] > 0:
        return s - 0.5
    a, b = s, s
    while a > 0 and col[a - 1] == 0:
        a -= 1
    while b < col.size - 1 and col[b + 1] == 0:
        b += 1
    return (a + b) / 2.0


def fit_midline(z: np.ndarray, x: np.ndarray, nz: int, max_drift_vox: float) -> np.ndarray:
    """The body midline's voxel x on every slice ``0..nz-1`` from measured (z, x) pairs.

    A Theil-Sen line (median of pairwise slopes; robust to a slice whose gap is skewed by
    stray tissue); one point gives a constant. Beyond the measured slices the line is
    extrapolated but held within ``max_drift_vox`` voxels of its value at the nearest measured slice.
    """
    z = np.asarray(z, float)
    x = np.asarray(x, float)
    if z.size == 0:
        return np.full(nz, np.nan)
    if z.size == 1 or np.ptp(z) == 0:
        return np.full(nz, float(np.median(x)))
    i, j = np.triu_indices(z.size, k=1)
    dz = z[j] - z[i]
    ok = dz != 0
    slope = float(np.median((x[j] - x[i])[ok] / dz[ok]))
    icpt = float(np.median(x - slope * z))
    zz = np.arange(nz, dtype=float)
    line = icpt + slope * zz
    end = icpt + slope * np.clip(zz, z.min(), z.max())
    return np.clip(line, end - max_drift_vox, end + max_drift_vox)


def split_legs(foreground: np.ndarray, affine: np.ndarray, *, muscles: np.ndarray | None = None,
               region: str | None = None, smooth_mm: float = 3.0, valley_ratio: float = 0.75,
               search_mm: float = 60.0, joined_fraction: float = 0.2, max_drift_mm: float = 20.0,
               joined_aspect: float = 1.6) -> LegSplit:
    """Assign every voxel to the left (1) or right (2) leg, and classify each slice's coverage.

    Args:
        foreground: bool array (x, y, z), canonical RAS+ (e.g. ``stage1 > 0``).
        affine: 4x4 voxel-to-world matrix (mm) of that array.
        muscles, region: optional stage-2 map and its region; a single leg is then named
            by :func:`side_from_muscles` (anatomy) before falling back to the isocentre rule.
        smooth_mm: Gaussian sigma (mm) of the x-profile smoothing.
        valley_ratio: a valley below this fraction of the smaller hump separates two legs.
        search_mm: how far (mm) a slice's split may move from the global split.
        joined_fraction: a slice without a valley whose foreground lies at least this fraction on
            each side of the midline is "joined" (split at the midline), else "one_leg" (kept whole).
        max_drift_mm: how far (mm, along x) the extrapolated midline may leave its value at the
            nearest slice with the legs apart.
        joined_aspect: when no slice shows two legs, a median cross-section this much wider (x) than
            deep (y) is both legs joined on every slice (split at each slice's x-extent centre), a
            rounder one a single leg (kept whole).
    Returns:
        :class:`LegSplit` (leg map, per-slice coverage, midline).
    """
    fg = np.asarray(foreground).astype(bool, copy=False)
    if fg.ndim != 3:
        raise LegcompInputError(f"leg map needs a 3D foreground, got shape {fg.shape}")
    nx, _, nz = fg.shape
    out = np.zeros(fg.shape, np.uint8)
    has = fg.any(axis=(0, 1))
    nan_mid = np.full(nz, np.nan)
    if not has.any():
        return LegSplit(out, ("empty",) * nz, nan_mid)
    sx = float(_axis_spacing(affine)[0])
    # per (x, z): the y-extent of the foreground (first to last voxel), so holes such as bone,
    # which stage 1 leaves as background, do not dent a leg's x-profile
    anyy = fg.any(axis=1)
    first = np.argmax(fg, axis=1)
    last = fg.shape[1] - 1 - np.argmax(fg[:, ::-1, :], axis=1)
    per_slice = np.where(anyy, last - first + 1, 0)  # (x, z)
    split = find_leg_split(per_slice.sum(axis=1), smooth_mm / sx, valley_ratio)
    if split is None:
        joined = _joined_everywhere(fg, affine, joined_aspect, max_drift_mm)
        if joined is not None:
            splits, midline = joined
            return LegSplit(_name_sides(fg, splits, affine), tuple("joined" if h else "empty" for h in has), midline)
        side = side_from_muscles(muscles, region, affine) if muscles is not None and region else None
        if side is None:
            centroid = np.array(ndimage.center_of_mass(fg))
            side = RIGHT if _world_x(affine, centroid) > 0 else LEFT
        out[:] = side
        return LegSplit(out, tuple("one_leg" if h else "empty" for h in has), nan_mid)
    # refine per slice
    win = max(1, int(round(search_mm / sx)))
    lo, hi = max(1, split - win), min(nx - 1, split + win)
    smooth = ndimage.gaussian_filter1d(per_slice.astype(float), smooth_mm / sx / 2, axis=0)
    splits = np.full(nz, split, dtype=int)
    valid = np.zeros(nz, bool)
    coverage = ["empty" if not h else "one_leg" for h in has]
    centres: dict[int, float] = {}
    no_valley: list[int] = []
    for z in range(nz):
        col = per_slice[:, z]
        if not col.any():
            continue  # empty slice: keep the global split
        if find_leg_split(col, smooth_mm / sx, valley_ratio, min_fraction=0.02) is None:
            no_valley.append(z)  # one leg, or both legs joined: decided once the midline is known
            continue
        # search between the two humps of this slice (and within the window)
        s = smooth[:, z]
        a = max(lo, int(np.argmax(s[:split])))
        b = min(hi, split + int(np.argmax(s[split:])))
        if b <= a:
            continue
        prof = s[a:b + 1]
        cand = np.arange(a, b + 1)
        # lowest point, ties (within 1 %) broken towards the global split
        tol = prof.min() + 0.01 * max(prof.max(), 1e-9)
        ok = cand[prof <= tol]
        splits[z] = int(ok[np.argmin(np.abs(ok - split))])
        valid[z] = True
        coverage[z] = "apart" if col[splits[z]] == 0 else "touching"
        centres[z] = _gap_centre(col, splits[z])
    if valid.sum() >= 3:
        vz = np.flatnonzero(valid)
        filt = ndimage.median_filter(splits[vz], size=min(5, len(vz)), mode="nearest")
        splits[vz] = filt
    if centres:
        midline = fit_midline(np.array(list(centres)), np.array(list(centres.values())), nz, max_drift_mm / sx)
    else:
        midline = np.full(nz, split - 0.5)
    for z in no_valley:
        col = per_slice[:, z]
        xs = np.flatnonzero(col)
        m = float(midline[z])
        low = float(col[np.arange(nx) < m].sum()) / float(col.sum())
        if min(low, 1.0 - low) >= joined_fraction:
            coverage[z] = "joined"
            splits[z] = int(np.clip(np.ceil(m), 1, nx - 1))
            continue
        # one leg only: keep it whole, on the side of the global split its centroid lies on
        c = float((xs * col[xs]).sum() / col[xs].sum())
        splits[z] = max(split, int(xs[-1]) + 1) if c < split else min(split, int(xs[0]))
    return LegSplit(_name_sides(fg, splits, affine), tuple(coverage), midline)


def _name_sides(fg: np.ndarray, splits: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Leg map (x, y, z) of per-slice splits (voxels x < splits[z] on the low side), the sides named
    in world coordinates: the side whose foreground centroid has the larger world x is the right leg."""
    nx = fg.shape[0]
    low3d = np.broadcast_to((np.arange(nx)[:, None] < splits[None, :])[:, None, :], fg.shape)
    c_low = np.array(ndimage.center_of_mass(fg & low3d))
    c_high = np.array(ndimage.center_of_mass(fg & ~low3d))
    low_is_right = _world_x(affine, c_low) > _world_x(affine, c_high)
    low_id, high_id = (RIGHT, LEFT) if low_is_right else (LEFT, RIGHT)
    return np.where(low3d, low_id, high_id).astype(np.uint8)


def _joined_everywhere(fg: np.ndarray, affine: np.ndarray, joined_aspect: float,
                       max_drift_mm: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(splits, midline) when no slice shows two legs yet the cross-sections are wide, not round
    (median x-extent / y-extent in mm of each slice's largest connected component >= ``joined_aspect``):
    both legs joined on every slice (hips, or thighs pressed together), split at the centre of that x-extent, fitted
    along z by :func:`fit_midline`. None for a single leg (a roundish cross-section)."""
    sx, sy = (float(v) for v in _axis_spacing(affine)[:2])
    zs, centres, aspects = [], [], []
    for z in np.flatnonzero(fg.any(axis=(0, 1))):
        lab, n = ndimage.label(fg[:, :, z])
        big = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:])) if n > 1 else lab > 0  # strays do not widen it
        xs = np.flatnonzero(big.any(axis=1))
        ys = np.flatnonzero(big.any(axis=0))
        zs.append(z)
        centres.append((xs[0] + xs[-1]) / 2.0)
        aspects.append((xs[-1] - xs[0] + 1) * sx / ((ys[-1] - ys[0] + 1) * sy))
    if not zs or float(np.median(aspects)) < joined_aspect:
        return None
    midline = fit_midline(np.array(zs), np.array(centres), fg.shape[2], max_drift_mm / sx)
    splits = np.clip(np.ceil(midline), 1, fg.shape[0] - 1).astype(int)
    return splits, midline


def leg_map(foreground: np.ndarray, affine: np.ndarray, *, muscles: np.ndarray | None = None,
            region: str | None = None, smooth_mm: float = 3.0,
            valley_ratio: float = 0.75, search_mm: float = 60.0) -> np.ndarray:
    """Assign every voxel to the left (1) or right (2) leg: :func:`split_legs`' map alone.

    Args:
        foreground: bool array (x, y, z), canonical RAS+ (e.g. ``stage1 > 0``).
        affine: 4x4 voxel-to-world matrix (mm) of that array.
        muscles, region, smooth_mm, valley_ratio, search_mm: as :func:`split_legs`.
    Returns:
        uint8 array, same shape: 1 or 2 everywhere, all 0 only if there is no foreground.
    """
    return split_legs(foreground, affine, muscles=muscles, region=region, smooth_mm=smooth_mm,
                      valley_ratio=valley_ratio, search_mm=search_mm).legs


def slice_levels(coverage: tuple[str, ...] | list[str], region: str | None) -> tuple[str | None, ...]:
    """Anatomical level of each slice (z, inferior to superior): :data:`HIP_LEVEL` for a joined
    slice above every slice with the legs apart or touching (never in a calf study: joined knees
    stay calf level), None for an empty slice, else the region (``thigh``/``calf``; ``leg`` when unknown).
    """
    leg_level = region if region in anatomy.REGIONS else "leg"
    two = [z for z, c in enumerate(coverage) if c in ("apart", "touching")]
    top = max(two) if two else -1
    out: list[str | None] = []
    for z, c in enumerate(coverage):
        if c == "empty":
            out.append(None)
        elif c == "joined" and z > top and region != "calf":
            out.append(HIP_LEVEL)
        else:
            out.append(leg_level)
    return tuple(out)


def hip_slices(coverage: tuple[str, ...] | list[str], region: str | None) -> np.ndarray:
    """bool per slice (z): the :data:`HIP_LEVEL` slices of :func:`slice_levels`."""
    return np.array([lv == HIP_LEVEL for lv in slice_levels(coverage, region)], bool)


def input_slice_index(input_affine: np.ndarray | None, nz: int) -> tuple[int | None, np.ndarray]:
    """(input axis, index along it) of each canonical slice z (inferior to superior): which axis of
    the input file runs along z and, for every canonical z, the input's slice index (flipped
    where that axis runs superior to inferior). Without an input affine: (None, z itself).
    """
    z = np.arange(nz)
    if input_affine is None:
        return None, z
    import nibabel as nib

    ornt = nib.io_orientation(np.asarray(input_affine, float))
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return axis, (nz - 1 - z if ornt[axis, 1] < 0 else z)


def coverage_report(split: LegSplit, affine: np.ndarray, region: str | None, *,
                    input_affine: np.ndarray | None = None, in_volumes: np.ndarray | None = None) -> list[dict]:
    """Per-slice coverage for run.json, inferior to superior: ``slice`` (index along the input's
    slice axis), ``z_mm`` (world z of the slice centre), ``coverage`` (:data:`COVERAGE`), ``level``
    (:func:`slice_levels`), ``midline_x_mm`` (world x of the midline used to split a joined slice, else
    the fitted midline; None when unknown) and ``in_volumes`` (whether the slice counts in the volumes).
    """
    nx, ny, nz = split.legs.shape
    levels = slice_levels(split.coverage, region)
    _, idx = input_slice_index(input_affine, nz)
    aff = np.asarray(affine, float)
    rows = []
    for z in range(nz):
        centre = aff @ np.array([(nx - 1) / 2, (ny - 1) / 2, z, 1.0])
        m = split.midline_x[z]
        mid = None if not np.isfinite(m) else round(_world_x(aff, np.array([m, (ny - 1) / 2, z])), 1)
        rows.append({"slice": int(idx[z]), "z_mm": round(float(centre[2]), 1), "coverage": split.coverage[z],
                     "level": levels[z], "midline_x_mm": mid,
                     "in_volumes": bool(in_volumes[z]) if in_volumes is not None else levels[z] is not None})
    return rows


def leg_bounding_boxes(legs: np.ndarray, foreground: np.ndarray, margin_mm: float,
                       spacing: tuple[float, float, float] | np.ndarray) -> dict[int, tuple[slice, slice, slice]]:
    """Bounding box of each leg's foreground, widened by ``margin_mm`` and clipped to the array.

    Args:
        legs: leg map from :func:`leg_map` (x, y, z).
        foreground: bool array, same shape.
        margin_mm: margin added on every side, in mm.
        spacing: voxel size (mm) along (x, y, z).
    Returns:
        leg id -> (slice_x, slice_y, slice_z); legs without foreground are left out.
    """
    legs = np.asarray(legs)
    fg = np.asarray(foreground).astype(bool, copy=False)
    if legs.shape != fg.shape:
        raise LegcompInputError(f"leg map shape {legs.shape} differs from foreground shape {fg.shape}")
    margin = np.ceil(float(margin_mm) / np.asarray(spacing, float)).astype(int)
    out: dict[int, tuple[slice, slice, slice]] = {}
    for leg_id in sorted(LEGS):
        m = fg & (legs == leg_id)
        if not m.any():
            continue
        sl = []
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            idx = np.flatnonzero(m.any(axis=other))
            sl.append(slice(max(0, int(idx[0]) - margin[ax]), min(m.shape[ax], int(idx[-1]) + 1 + margin[ax])))
        out[leg_id] = tuple(sl)  # type: ignore[assignment]
    return out


MIDLINE_ISLAND_MM = 20.0
"""Half-width (mm) of the band about the body midline where a stage-1 muscle island is no leg's muscle."""


def midline_islands(muscle: np.ndarray, split: LegSplit, spacing_x: float, region: str | None,
                    band_mm: float = MIDLINE_ISLAND_MM) -> np.ndarray:
    """Muscle-labelled islands between the legs: the genitals between the upper thighs, which look like
    muscle in water and fat. bool (x, y, z), canonical RAS+.

    On each slice with two legs apart or touching, below the hip (:func:`hip_slices`): every in-plane
    connected component of ``muscle`` that is not the largest of its leg (:attr:`LegSplit.legs` by
    majority) and whose centroid lies within ``band_mm`` (mm) of the slice's midline. No leg muscle lies
    there: a leg's muscles sit inside its deep fascia, one region per slice around the bone.

    Args:
        muscle: bool (x, y, z) stage-1 whole muscle.
        split: :func:`split_legs` of the stage-1 foreground.
        spacing_x: voxel size along x (mm).
        region: ``thigh``/``calf`` (for the hip slices); None: no slice is taken as hip.
    """
    m = np.asarray(muscle, bool)
    out = np.zeros(m.shape, bool)
    hip = hip_slices(split.coverage, region) if region else np.zeros(m.shape[2], bool)
    for z in range(m.shape[2]):
        mid = split.midline_x[z]
        if hip[z] or split.coverage[z] not in ("apart", "touching") or not np.isfinite(mid) or not m[:, :, z].any():
            continue
        lab, n = ndimage.label(m[:, :, z])
        if n < 2:
            continue
        idx = np.arange(1, n + 1)
        size = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        cx = ndimage.sum_labels(np.arange(lab.shape[0])[:, None], lab, idx) / size
        legs_z = split.legs[:, :, z]
        # each component's leg: the majority of its voxels' leg ids
        votes = np.stack([ndimage.sum_labels(legs_z == leg, lab, idx) for leg in LEGS])
        leg_of = np.array(list(LEGS))[votes.argmax(0)]
        keep = np.zeros(n, bool)
        for leg in LEGS:
            mine = np.flatnonzero(leg_of == leg)
            if len(mine):
                keep[mine[np.argmax(size[mine])]] = True
        drop = ~keep & (np.abs(cx - mid) * float(spacing_x) < band_mm)
        if drop.any():
            out[:, :, z] = np.isin(lab, idx[drop])
    return out

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
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from legcomp import anatomy
from legcomp.anatomy import LEGS
from legcomp.errors import LegcompInputError

LEFT: int = next(k for k, v in LEGS.items() if v == "left")
RIGHT: int = next(k for k, v in LEGS.items() if v == "right")


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


def leg_map(foreground: np.ndarray, affine: np.ndarray, *, muscles: np.ndarray | None = None,
            region: str | None = None, smooth_mm: float = 3.0,
            valley_ratio: float = 0.75, search_mm: float = 60.0) -> np.ndarray:
    """Assign every voxel to the left (1) or right (2) leg.

    Args:
        foreground: bool array (x, y, z), canonical RAS+ (e.g. ``stage1 > 0``).
        affine: 4x4 voxel-to-world matrix (mm) of that array.
        muscles, region: optional stage-2 map and its region; a single leg is then named
            by :func:`side_from_muscles` (anatomy) before falling back to the isocentre rule.
        smooth_mm: Gaussian sigma (mm) of the x-profile smoothing.
        valley_ratio: a valley below this fraction of the smaller hump separates two legs.
        search_mm: how far (mm) a slice's split may move from the global split.
    Returns:
        uint8 array, same shape: 1 or 2 everywhere, all 0 only if there is no foreground.
    """
    fg = np.asarray(foreground).astype(bool, copy=False)
    if fg.ndim != 3:
        raise LegcompInputError(f"leg_map needs a 3D foreground, got shape {fg.shape}")
    out = np.zeros(fg.shape, np.uint8)
    if not fg.any():
        return out
    sx = float(_axis_spacing(affine)[0])
    nx, _, nz = fg.shape
    # per (x, z): the y-extent of the foreground (first to last voxel), so holes such as bone,
    # which stage 1 leaves as background, do not dent a leg's x-profile
    anyy = fg.any(axis=1)
    first = np.argmax(fg, axis=1)
    last = fg.shape[1] - 1 - np.argmax(fg[:, ::-1, :], axis=1)
    per_slice = np.where(anyy, last - first + 1, 0)  # (x, z)
    split = find_leg_split(per_slice.sum(axis=1), smooth_mm / sx, valley_ratio)
    if split is None:
        side = side_from_muscles(muscles, region, affine) if muscles is not None and region else None
        if side is None:
            centroid = np.array(ndimage.center_of_mass(fg))
            side = RIGHT if _world_x(affine, centroid) > 0 else LEFT
        out[:] = side
        return out
    # refine per slice
    win = max(1, int(round(search_mm / sx)))
    lo, hi = max(1, split - win), min(nx - 1, split + win)
    smooth = ndimage.gaussian_filter1d(per_slice.astype(float), smooth_mm / sx / 2, axis=0)
    splits = np.full(nz, split, dtype=int)
    valid = np.zeros(nz, bool)
    one_leg: dict[int, int] = {}
    for z in range(nz):
        col = per_slice[:, z]
        if not col.any():
            continue  # empty slice: keep the global split
        if find_leg_split(col, smooth_mm / sx, valley_ratio, min_fraction=0.02) is None:
            # one leg only: keep it whole, on the side of the global split its centroid lies on
            xs = np.flatnonzero(col)
            c = float((xs * col[xs]).sum() / col[xs].sum())
            one_leg[z] = max(split, int(xs[-1]) + 1) if c < split else min(split, int(xs[0]))
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
    if valid.sum() >= 3:
        vz = np.flatnonzero(valid)
        filt = ndimage.median_filter(splits[vz], size=min(5, len(vz)), mode="nearest")
        splits[vz] = filt
    for z, sz in one_leg.items():
        splits[z] = sz
    low_side = np.arange(nx)[:, None] < splits[None, :]  # (x, z)
    # name the sides in world coordinates
    low3d = np.broadcast_to(low_side[:, None, :], fg.shape)
    c_low = np.array(ndimage.center_of_mass(fg & low3d))
    c_high = np.array(ndimage.center_of_mass(fg & ~low3d))
    low_is_right = _world_x(affine, c_low) > _world_x(affine, c_high)
    low_id, high_id = (RIGHT, LEFT) if low_is_right else (LEFT, RIGHT)
    out[:] = np.where(low3d, low_id, high_id)
    return out


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

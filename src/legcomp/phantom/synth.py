"""Dixon legs synthesised from real muscle label maps (SynthSeg-style, Billot et al. 2023).

A real label map gives the muscles' shapes and layout; the tissues it lacks are built from it
(deep fascia as the muscles' outer envelope, bone in the holes the muscles leave, intermuscular fat
in the gaps and septa, deep vessels, subcutaneous fat of random thickness, skin), the geometry is
randomised (rotation, per-axis scaling, smooth elastic warp, single muscles' atrophy/hypertrophy,
resolution, slice thickness and gaps, coverage), and the result is rendered with the phantom's one
Dixon signal model (:func:`legcomp.phantom.generator.render`, :mod:`legcomp.phantom.signal`):
per-tissue PD and fat fraction, per-muscle infiltration from none to marbled end stage, partial
volume, bias field, Rician noise. The output is a :class:`~legcomp.phantom.generator.Phantom` with
exact labels, plus a label record naming the structures the source map does not label.

Arrays are (x, y, z) RAS+ like the phantom's; mm throughout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.phantom import shapes
from legcomp.phantom import signal as sig
from legcomp.phantom.generator import Phantom, _truth, render_study
from legcomp.phantom.shapes import (BG, CORTEX, FASCIA, IMAT, LEG_STRIDE, MARROW, MUSCLE0, ORGAN, SAT, SAT_VESSEL,
                                    SKIN, UNNAMED, VESSEL)

OTHER_MUSCLE = LEG_STRIDE - 1
"""Tissue code of muscle that is none of the region's muscles (hip muscles; a source label the mapping
does not name): muscle signal, whole muscle in stage 1, background in stage 2. Thick unlabelled gaps
of a map that lacks some of the region's muscles are :data:`legcomp.phantom.shapes.UNNAMED` instead."""

_BONE_WORDS = re.compile(r"femur|tibia|fibula|ilium|sacrum|patella|bone|pelvis|ischium|pubis", re.IGNORECASE)


@dataclass
class SourceMap:
    """A real label map mapped to legcomp's tissue codes (one leg's codes, no leg offset).

    Attributes:
        codes: uint8 (x, y, z) RAS+: ``MUSCLE0 + id`` for the region's muscles, :data:`OTHER_MUSCLE`,
            :data:`~legcomp.phantom.shapes.MARROW` where the map labels bone, 0 elsewhere.
        affine: 4x4 voxel-to-world (mm) of ``codes``.
        region: ``thigh`` or ``calf``.
        name: source stem (for study names).
        unlabelled: region muscles the map does not label (names).
        has_bone: the map labels bone.
    """

    codes: np.ndarray
    affine: np.ndarray
    region: str
    name: str
    unlabelled: list = field(default_factory=list)
    has_bone: bool = False

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (mm) along x, y, z."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def load_mapping(path: str | Path) -> dict:
    """Read a mapping JSON (``{"region": ..., "map": {foreign id: legcomp name or null}, "foreign_names": ...}``)
    as the ``labels.json`` files of ``shared/realdata`` hold it; a flat ``{id: name}`` dict works too."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LegcompInputError(f"cannot read the label mapping: {exc}", path) from None
    if not isinstance(d, dict):
        raise LegcompInputError("label mapping must be a JSON object", path)
    if "map" not in d:
        d = {"map": d}
    return d


def load_source(label_map: str | Path, mapping: str | Path | dict, region: str | None = None,
                z_range: tuple[int, int] | None = None) -> SourceMap:
    """Read a label map and translate its ids to tissue codes.

    Args:
        label_map: NIfTI label map (any orientation; read in RAS+).
        mapping: mapping JSON path or dict (see :func:`load_mapping`). Ids mapped to null are bone
            when their foreign name says so (femur, tibia, ...), other muscle otherwise.
        region: ``thigh``/``calf``; default the mapping's ``region``.
        z_range: (first, last) slice (inclusive, in the file's own slice order) to keep.
    """
    label_map = Path(label_map)
    mp = load_mapping(mapping) if not isinstance(mapping, dict) else mapping
    region = anatomy.check_region(region or mp.get("region") or "")
    try:
        img = nib.load(str(label_map))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several kinds
        raise LegcompInputError(f"cannot read the label map: {exc}", label_map) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or not np.isfinite(data).all():
        raise LegcompInputError(f"label map must be a finite 3D array, got shape {data.shape}", label_map)
    data = np.rint(data).astype(np.int64)
    if z_range is not None:
        data = data[:, :, int(z_range[0]):int(z_range[1]) + 1]
        aff = img.affine.copy()
        aff[:3, 3] = img.affine[:3, :3] @ [0, 0, int(z_range[0])] + img.affine[:3, 3]
    else:
        aff = img.affine
    ornt = nib.io_orientation(aff)
    data = nib.orientations.apply_orientation(data, ornt)
    aff = aff @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    names = {lab.name: lab.id for lab in anatomy.MUSCLES[region]}
    foreign = mp.get("foreign_names", {})
    lut: dict[int, int] = {}
    for k, v in mp["map"].items():
        fid = int(k)
        if v is None:
            lut[fid] = MARROW if _BONE_WORDS.search(str(foreign.get(k, ""))) else OTHER_MUSCLE
        elif v in names:
            lut[fid] = MUSCLE0 + names[v]
        else:
            raise LegcompInputError(f"mapping names {v!r}, which is no {region} muscle", label_map)
    ids = np.unique(data)
    unknown = [int(i) for i in ids if i and int(i) not in lut]
    if unknown:
        raise LegcompInputError(f"label ids {unknown[:8]} are not in the mapping", label_map)
    table = np.zeros(int(ids.max()) + 1 if ids.size else 1, np.uint8)
    for fid, code in lut.items():
        if fid < table.size:
            table[fid] = code
    codes = table[np.clip(data, 0, None)]
    lo, hi = _labelled_slab(codes)
    codes = codes[:, :, lo:hi + 1]
    aff = aff.copy()
    aff[:3, 3] = aff[:3, :3] @ [0, 0, lo] + aff[:3, 3]
    present = {int(c) - MUSCLE0 for c in np.unique(codes) if MUSCLE0 < c < OTHER_MUSCLE}
    unlabelled = [lab.name for lab in anatomy.MUSCLES[region] if lab.id not in present]
    if not present:
        raise LegcompInputError(f"no {region} muscle in the label map after mapping", label_map)
    stem = re.sub(r"\.nii(\.gz)?$", "", label_map.name)
    return SourceMap(codes=codes.astype(np.uint8), affine=aff, region=region, name=stem, unlabelled=unlabelled,
                     has_bone=bool((codes == MARROW).any()))


def _labelled_slab(codes: np.ndarray, min_share: float = 0.5) -> tuple[int, int]:
    """(first, last) slice of the contiguous run of slices around the best-labelled one whose muscle area is at least
    ``min_share`` of the median labelled slice's: maps whose labels fade out (unlabelled or partly
    labelled end slices) would otherwise teach muscle as background there."""
    area = ((codes > MUSCLE0) & (codes < OTHER_MUSCLE)).sum(axis=(0, 1))
    if not area.any():
        return 0, codes.shape[2] - 1
    ok = area >= min_share * np.median(area[area > 0])
    best = int(np.argmax(area))
    lo = best
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    hi = best
    while hi < len(ok) - 1 and ok[hi + 1]:
        hi += 1
    return lo, hi


# --------------------------------------------------------------------------- geometry helpers

def _disk(radius_mm: float, sx: float, sy: float) -> np.ndarray:
    """2D disk footprint (x, y, 1) of ``radius_mm`` on an (sx, sy) mm grid."""
    rx, ry = max(1, int(radius_mm / sx)), max(1, int(radius_mm / sy))
    gx, gy = np.mgrid[-rx:rx + 1, -ry:ry + 1]
    return ((gx * sx) ** 2 + (gy * sy) ** 2 <= radius_mm ** 2)[:, :, None]


def _edt2d(mask: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """In-plane Euclidean distance (mm) of every voxel of ``mask`` to the nearest voxel outside it
    (computed on the mask's bounding box plus one voxel, which gives the same distances)."""
    out = np.zeros(mask.shape, np.float32)
    if not mask.any():
        return out
    box = _bbox(mask, (1, 1, 0))
    out[box] = ndimage.distance_transform_edt(np.pad(mask[box], ((1, 1), (1, 1), (0, 0))),
                                              sampling=(sx, sy, 1e6))[1:-1, 1:-1]
    return out


def _dist_outside(mask: np.ndarray, sx: float, sy: float, limit_mm: float) -> np.ndarray:
    """In-plane distance (mm) from voxels outside ``mask`` to it, exact up to ``limit_mm`` (inf beyond)."""
    out = np.full(mask.shape, np.inf, np.float32)
    if not mask.any():
        return out
    m = (int(np.ceil(limit_mm / sx)) + 1, int(np.ceil(limit_mm / sy)) + 1, 0)
    box = _bbox(mask, m)
    out[box] = ndimage.distance_transform_edt(~mask[box], sampling=(sx, sy, 1e6))
    return out


def _bbox(mask: np.ndarray, margin: tuple) -> tuple:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels per axis (clipped)."""
    sl = []
    for ax in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        sl.append(slice(max(0, idx[0] - margin[ax]), min(mask.shape[ax], idx[-1] + 1 + margin[ax])))
    return tuple(sl)


def _split_legs(fg: np.ndarray) -> np.ndarray:
    """Leg ids (1 left = low x, 2 right = high x, RAS+) of foreground voxels: per slice, two clusters in x."""
    legs = np.zeros(fg.shape, np.uint8)
    xs_all = np.nonzero(fg.any(axis=(1, 2)))[0]
    if xs_all.size == 0:
        return legs
    global_split = 0.5 * (xs_all.min() + xs_all.max())
    for k in range(fg.shape[2]):
        x = np.nonzero(fg[:, :, k])[0]
        split = global_split
        if x.size > 50:
            a, b = np.percentile(x, 25), np.percentile(x, 75)
            for _ in range(10):  # 2-means in x
                split = 0.5 * (a + b)
                lo, hi = x[x <= split], x[x > split]
                if lo.size == 0 or hi.size == 0:
                    split = global_split
                    break
                a, b = lo.mean(), hi.mean()
            if abs(split - global_split) > 0.25 * (xs_all.max() - xs_all.min()):
                split = global_split  # one leg only on this slice
        col = np.where(np.arange(fg.shape[0]) <= split, 1, 2).astype(np.uint8)
        legs[:, :, k] = np.where(fg[:, :, k], col[:, None], 0)
    return legs


def _resize_muscles(codes: np.ndarray, sx: float, sy: float, rng: np.random.Generator, max_mm: float) -> np.ndarray:
    """Single muscles' atrophy / hypertrophy: each muscle eroded or dilated (into background) by up to ``max_mm``."""
    out = codes.copy()
    for c in [int(c) for c in np.unique(codes) if MUSCLE0 < c < OTHER_MUSCLE]:
        if rng.random() < 0.4:
            continue
        r = float(rng.uniform(-max_mm, max_mm))
        m = codes == c
        if r < 0:
            out[m & (_edt2d(m, sx, sy) <= -r)] = BG
        elif r > 0:
            grow = (_dist_outside(m, sx, sy, r) <= r) & (out == BG)
            out[grow] = c
    return out


def _pick_bones(gaps: np.ndarray, sx: float, sy: float, region: str) -> np.ndarray:
    """Bone (bool, (x, y) slice) among the compact, thick gaps that the muscles of one leg leave:
    the femur (thigh), the tibia and fibula (calf)."""
    core = ndimage.binary_opening(gaps, structure=_disk(2.5, sx, sy)[:, :, 0])
    lab, n = ndimage.label(core)
    if n == 0:
        return np.zeros_like(gaps)
    idx = np.arange(1, n + 1)
    inner = _edt2d(core[:, :, None], sx, sy)[:, :, 0]
    rmax = np.asarray(ndimage.maximum(inner, lab, idx))  # radius of the largest inscribed disk, mm
    lab, area, compact = _round_cores(lab, inner, idx, rmax, sx, sy)
    min_area, n_bones = (150.0, 1) if region == "thigh" else (25.0, 2)
    ok = (area >= min_area) & (compact >= 0.3)
    chosen = idx[ok][np.argsort(-(area[ok] * compact[ok]))][:n_bones]
    bone = np.isin(lab, chosen)
    return ndimage.binary_dilation(bone, structure=_disk(2.5, sx, sy)[:, :, 0]) & gaps


def _convex_hull_2d(mask: np.ndarray) -> np.ndarray:
    """Per axial slice, the convex hull (bool, same (x, y, z) shape) of ``mask``'s voxels."""
    from scipy.spatial import ConvexHull, Delaunay, QhullError

    out = np.zeros_like(mask, dtype=bool)
    for k in range(mask.shape[2]):
        pts = np.argwhere(mask[:, :, k])
        if len(pts) < 3:
            out[pts[:, 0], pts[:, 1], k] = True
            continue
        try:
            hull = Delaunay(pts[ConvexHull(pts).vertices])
        except QhullError:  # collinear voxels: the mask itself
            out[pts[:, 0], pts[:, 1], k] = True
            continue
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0) + 1
        gx, gy = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1), indexing="ij")
        inside = hull.find_simplex(np.stack([gx.ravel(), gy.ravel()], 1)) >= 0
        out[x0:x1, y0:y1, k] = inside.reshape(gx.shape)
    return out | mask


def _round_cores(lab: np.ndarray, inner: np.ndarray, idx: np.ndarray, rmax: np.ndarray, sx: float, sy: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each gap cut back to the round core around its thickest point (the voxels at least half its
    largest inscribed radius ``rmax`` deep, grown back by that half radius), so that a bone's void
    merged with an unlabelled region beside it (the calf's tibia with the deep posterior gap) loses
    that region. Returns the cut labels, each core's area (mm^2) and compactness (pi rmax^2 / area:
    1 for a disk, small for slivers)."""
    lab = lab.copy()
    area = np.zeros(len(idx))
    for n, (i, r) in enumerate(zip(idx, rmax)):
        comp = lab == i
        deep, _ = ndimage.label(comp & (inner >= 0.5 * r))
        top = deep[np.unravel_index(np.argmax(np.where(comp, inner, -1.0)), inner.shape)]
        blob = ndimage.binary_dilation(deep == top, structure=_disk(0.5 * r, sx, sy)[:, :, 0]) & comp
        lab[comp & ~blob] = 0
        area[n] = blob.sum() * sx * sy
    compact = np.pi * rmax ** 2 / np.maximum(area, 1e-6)
    return lab, area, compact


def _at_least(src: SourceMap, mm: float) -> SourceMap:
    """The source resampled (nearest) in-plane to voxels of at least ``mm`` (bounds the cost)."""
    sp = src.spacing
    f = [min(1.0, float(sp[a]) / mm) for a in (0, 1)]
    if min(f) >= 1.0:
        return src
    codes = ndimage.zoom(src.codes, (f[0], f[1], 1.0), order=0, grid_mode=True, mode="grid-constant")
    aff = src.affine.copy()
    scale = np.array([src.codes.shape[0] / codes.shape[0], src.codes.shape[1] / codes.shape[1], 1.0])
    aff[:3, :3] = src.affine[:3, :3] * scale
    aff[:3, 3] = src.affine[:3, :3] @ ((scale - 1) / 2) + src.affine[:3, 3]  # same field of view
    return SourceMap(codes=codes, affine=aff, region=src.region, name=src.name, unlabelled=src.unlabelled,
                     has_bone=src.has_bone)


def _refine(src: SourceMap, mm: float) -> SourceMap:
    """A source coarser than twice ``mm`` in-plane upsampled by whole factors to voxels of at most ``mm``,
    each code's mask smoothed (Gaussian, half the factor) before the per-voxel arg-max, so that outlines
    are not stair-cased. Tissues drawn from it (fascia, septa, skin, cortex) can then be as thin as on a
    fine map: a 3 mm map would otherwise give 3 mm fascia and septa."""
    sp = src.spacing
    f = [int(np.ceil(float(sp[a]) / mm - 1e-6)) if float(sp[a]) > 2.0 * mm else 1 for a in (0, 1)]
    if max(f) <= 1:
        return src
    nx, ny, nz = src.codes.shape
    codes = np.zeros((nx * f[0], ny * f[1], nz), np.uint8)
    for k in range(nz):
        sl = src.codes[:, :, k]
        best = np.full(codes.shape[:2], -1.0, np.float32)
        lab = np.zeros(codes.shape[:2], np.uint8)
        for v in np.unique(sl):
            up = np.repeat(np.repeat((sl == v).astype(np.float32), f[0], 0), f[1], 1)
            sm = ndimage.gaussian_filter(up, sigma=(f[0] / 2.0, f[1] / 2.0), mode="nearest")
            better = sm > best
            best[better], lab[better] = sm[better], v
        codes[:, :, k] = lab
    aff = src.affine.copy()
    aff[:3, :3] = src.affine[:3, :3] @ np.diag([1.0 / f[0], 1.0 / f[1], 1.0])
    aff[:3, 3] = src.affine[:3, :3] @ [-(f[0] - 1) / (2.0 * f[0]), -(f[1] - 1) / (2.0 * f[1]), 0.0] + src.affine[:3, 3]
    return SourceMap(codes=codes, affine=aff, region=src.region, name=src.name, unlabelled=src.unlabelled,
                     has_bone=src.has_bone)


def _thin_z(src: SourceMap, dz_out: float, rng: np.random.Generator | None, min_mm: float = 90.0) -> SourceMap:
    """A source of thin slices thinned to about half the output slice spacing, and (with ``rng``, half the
    time) cut to a random window of at least ``min_mm``: the cost follows the output, not the source."""
    step = max(1, int(dz_out / (2.0 * float(src.spacing[2]))))
    codes, first = src.codes, 0
    nz = codes.shape[2]
    if rng is not None and rng.random() < 0.5:
        keep = min(nz, max(int(np.ceil(min_mm / float(src.spacing[2]))), int(rng.uniform(0.4, 1.0) * nz)))
        first = int(rng.integers(0, nz - keep + 1))
        codes = codes[:, :, first:first + keep]
    if step == 1 and first == 0 and codes.shape[2] == nz:
        return src
    codes = codes[:, :, ::step]
    aff = src.affine.copy()
    aff[:3, 2] = src.affine[:3, 2] * step
    aff[:3, 3] = src.affine[:3, :3] @ [0, 0, first] + src.affine[:3, 3]
    return SourceMap(codes=np.ascontiguousarray(codes), affine=aff, region=src.region, name=src.name,
                     unlabelled=src.unlabelled, has_bone=src.has_bone)


def _fill_gaps(codes2d: np.ndarray, free: np.ndarray, sx: float, sy: float, mm: float) -> None:
    """Grow muscles (nearest muscle) into ``free`` voxels of one slice within ``mm`` of a muscle (in place):
    closes the 1-2 voxel gaps that label maps leave between touching muscles."""
    mus = codes2d > MUSCLE0
    if mm <= 0 or not mus.any() or not free.any():
        return
    d, (ii, jj) = ndimage.distance_transform_edt(~mus, sampling=(sx, sy), return_indices=True)
    sel = free & (d <= mm)
    codes2d[sel] = codes2d[ii[sel], jj[sel]]


def _add_midline_organ(out: np.ndarray, sx: float, sy: float, rng: np.random.Generator) -> None:
    """Genitals between the upper thighs, in place on fine codes (x, y, z), +z superior: a blob of
    :data:`ORGAN` in the gap between the two legs' outlines on the most proximal 15-45 % of slices,
    where the thighs part in front, widest at the top. It fills background only, so it abuts both
    legs' skin where they are close; stage 1 learns it is neither SAT nor muscle."""
    nz = out.shape[2]
    k0 = nz - max(1, int(round(nz * rng.uniform(0.15, 0.45))))
    ry0, extra, fy = rng.uniform(15.0, 35.0), rng.uniform(2.0, 10.0), rng.uniform(0.4, 0.8)
    xs = np.arange(out.shape[0]) * sx
    ys = np.arange(out.shape[1]) * sy
    for k in range(k0, nz):
        o = out[:, :, k]
        a, b = (o > 0) & (o < LEG_STRIDE), o > LEG_STRIDE
        if not a.any() or not b.any():
            continue
        rows = np.nonzero(a.any(0) & b.any(0))[0]  # y rows holding both legs
        if rows.size == 0:
            continue
        # where the thighs part in front: the row of the widest gap in the anterior part of their overlap
        front = rows[rows >= rows.min() + fy * (rows.max() - rows.min())]
        xa = np.array([np.nonzero(a[:, j])[0].max() for j in front]) * sx
        xb = np.array([np.nonzero(b[:, j])[0].min() for j in front]) * sx
        i = int(np.argmax(xb - xa))
        t = 0.5 + 0.5 * (k - k0 + 1) / (nz - k0)  # tapers towards the thighs
        cx, cy = 0.5 * (xa[i] + xb[i]), front[i] * sy
        rx = min(max(0.5 * (xb[i] - xa[i]), 0.0) + extra * t, 45.0)
        ry = ry0 * t
        blob = ((xs[:, None] - cx) / rx) ** 2 + ((ys[None, :] - cy) / ry) ** 2 <= 1.0
        o[blob & (o == BG)] = ORGAN


def build_tissues(src: SourceMap, rng: np.random.Generator, *, adiposity: float, resize_mm: float = 3.0,
                  septa: float = 0.5, vessels: bool = True, tissue_mm: float = 0.9, fine_mm: float = 1.0,
                  fill_gaps_mm: float | None = None, organ_rng: np.random.Generator | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Complete the anatomy of a source map: every tissue the phantom knows, per leg.

    The source is first brought to in-plane voxels of at least ``tissue_mm`` (a source coarser than
    twice ``fine_mm``: upsampled to at most ``fine_mm``, :func:`_refine`); gaps between muscles up
    to ``fill_gaps_mm`` wide (default: drawn, about two source voxels) are closed by the nearest muscle
    before septa and intermuscular fat are drawn. With ``organ_rng``, half the thighs get genitals between
    the upper thighs (:func:`_add_midline_organ`). The deep fascia is the muscles' closed outline per leg
    (a calf's: also their convex hull per slice, so that the tibia, whose medial face no muscle covers,
    lies inside it and becomes bone instead of a notch of subcutaneous fat).

    Returns:
        (codes, gap, affine): fine codes with leg offset (uint8, ``code + LEG_STRIDE * (leg - 1)``) on the
        source grid padded in-plane, mm from each voxel to the nearest muscle border (float32), and the
        padded grid's affine.
    """
    src = _at_least(src, tissue_mm)
    src_vox = float(max(src.spacing[0], src.spacing[1]))  # the label map's own voxel (its gaps' unit)
    src = _refine(src, fine_mm)
    sx, sy, _ = (float(s) for s in src.spacing)
    sat_mm = float(np.exp(rng.uniform(np.log(2.0), np.log(45.0)))) * (0.4 + 1.2 * adiposity)
    pad = int(np.ceil((sat_mm * 1.6 + 15.0) / min(sx, sy)))
    codes = np.pad(src.codes, ((pad, pad), (pad, pad), (0, 0)))
    affine = src.affine.copy()
    affine[:3, 3] = src.affine[:3, :3] @ [-pad, -pad, 0] + src.affine[:3, 3]
    codes = _resize_muscles(codes, sx, sy, rng, resize_mm)
    muscle = (codes > MUSCLE0) | (codes == MARROW)
    legs = _split_legs(muscle)
    out = np.zeros(codes.shape, np.uint8)
    inside = np.zeros(codes.shape, np.uint8)  # leg id of the deep-fascia interior
    unl_muscles = bool(src.unlabelled)
    fill_mm = float(rng.uniform(0.5, 2.5) * src_vox) if fill_gaps_mm is None else float(fill_gaps_mm)
    for leg in (1, 2):
        m = legs == leg
        if not m.any():
            continue
        env = ndimage.binary_closing(m, structure=_disk(float(rng.uniform(4.0, 7.0)), sx, sy), iterations=1)
        if src.region == "calf":  # the tibia's medial face lies under the skin: no muscle covers it
            env = env | _convex_hull_2d(m)
        env = ndimage.binary_fill_holes(env | m, structure=np.array([[[0], [1], [0]], [[1], [1], [1]], [[0], [1], [0]]],
                                                                     bool))
        inside[env & (inside == 0)] = leg
    for leg in (1, 2):
        env = inside == leg
        if not env.any():
            continue
        gaps = env & (codes == BG)
        bone = np.zeros_like(gaps)
        if src.has_bone:
            bone = env & (codes == MARROW)
        else:
            for k in range(codes.shape[2]):
                if gaps[:, :, k].any():
                    bone[:, :, k] = _pick_bones(gaps[:, :, k], sx, sy, src.region)
        leg_codes = np.where(env, codes, BG)
        for k in range(codes.shape[2]):
            _fill_gaps(leg_codes[:, :, k], gaps[:, :, k] & ~bone[:, :, k], sx, sy, fill_mm)
        rest = env & (leg_codes == BG) & ~bone
        leg_codes[leg_codes == MARROW] = BG
        leg_codes[rest] = IMAT
        if unl_muscles:  # thick gaps of a map that lacks muscles: most likely those muscles
            thick = ndimage.binary_opening(rest, structure=_disk(3.0, sx, sy)) & (_edt2d(rest, sx, sy) > 1.5)
            leg_codes[thick] = UNNAMED
        if bone.any():
            cort = float(rng.uniform(1.5, 5.0))
            leg_codes[bone] = MARROW
            leg_codes[bone & (_edt2d(bone, sx, sy) <= cort)] = CORTEX
        if vessels:
            fat_gap = leg_codes == IMAT
            d = _edt2d(fat_gap, sx, sy)
            for _ in range(int(rng.integers(1, 4))):
                cand = np.argwhere(d > 2.0)
                if not len(cand):
                    break
                i, j, _k = cand[rng.integers(len(cand))]
                r = float(rng.uniform(2.0, 4.5))
                gx = (np.arange(codes.shape[0]) - i) * sx
                gy = (np.arange(codes.shape[1]) - j) * sy
                disk2 = (gx[:, None] ** 2 + gy[None, :] ** 2) <= r * r
                leg_codes[disk2[:, :, None] & fat_gap] = VESSEL
        out[env] = leg_codes[env] + np.uint8(LEG_STRIDE * (leg - 1)) * (leg_codes[env] > 0)
    if septa > 0:  # intermuscular septa where two muscles touch: fat lines on some of the borders
        foot = np.ones((3, 3, 1), bool)
        is_m = (out % LEG_STRIDE) > MUSCLE0
        mx = ndimage.maximum_filter(out, footprint=foot)
        touch = (mx != ndimage.minimum_filter(out, footprint=foot)) & is_m & (out == mx) & \
            ndimage.minimum_filter(is_m, footprint=foot)
        sel = touch & (rng.random(out.shape) < septa)
        out[sel] = IMAT + (out[sel] // LEG_STRIDE) * LEG_STRIDE
    # deep fascia, SAT and skin outside the envelope; each voxel belongs to the nearest leg
    body = inside > 0
    fascia_mm = max(float(rng.uniform(0.6, 1.5)), min(sx, sy))  # at least one voxel of the tissue grid
    skin_mm = float(rng.uniform(1.2, 2.5))
    thick_field = sig.NoiseField(rng, ((0, codes.shape[0] * sx), (0, codes.shape[1] * sy), (0, codes.shape[2] * 50.0)),
                                 step=(25.0, 25.0, 80.0), sigma_vox=(1.5, 1.5, 1.0))
    xs_mm = np.arange(codes.shape[0]) * sx
    ys_mm = np.arange(codes.shape[1]) * sy
    post = float(rng.uniform(0.0, 0.6))  # extra SAT posteriorly (buttock / calf)
    ygrad = (1.0 - ys_mm / max(ys_mm[-1], 1.0))[None, :]
    for k in range(codes.shape[2]):
        b = body[:, :, k]
        if not b.any():
            continue
        d, (ii, jj) = ndimage.distance_transform_edt(~b, sampling=(sx, sy), return_indices=True)
        near_leg = inside[ii, jj, k]
        t = sat_mm * np.exp(0.35 * thick_field.slice(xs_mm, ys_mm, k * 50.0)) * (1.0 + post * ygrad)
        ring = ~b
        o = out[:, :, k]
        off = (near_leg.astype(np.int64) - 1) * LEG_STRIDE
        sel_f = ring & (d <= fascia_mm)
        sel_s = ring & (d > fascia_mm) & (d <= fascia_mm + t)
        sel_k = ring & (d > fascia_mm + t) & (d <= fascia_mm + t + skin_mm)
        o[sel_f] = (FASCIA + off[sel_f]).astype(np.uint8)
        o[sel_s] = (SAT + off[sel_s]).astype(np.uint8)
        o[sel_k] = (SKIN + off[sel_k]).astype(np.uint8)
        if rng.random() < 0.7:  # superficial veins in the SAT
            for _ in range(int(rng.integers(1, 4))):
                cand = np.argwhere(sel_s)
                if not len(cand):
                    break
                i, j = cand[rng.integers(len(cand))]
                r = float(rng.uniform(1.0, 2.5))
                disk2 = ((xs_mm - xs_mm[i])[:, None] ** 2 + (ys_mm - ys_mm[j])[None, :] ** 2) <= r * r
                v = disk2 & sel_s
                o[v] = (SAT_VESSEL + off[v]).astype(np.uint8)
        out[:, :, k] = o
    if organ_rng is not None and src.region == "thigh" and organ_rng.random() < 0.5:
        _add_midline_organ(out, sx, sy, organ_rng)
    # distance to the nearest muscle border (where infiltration starts), for the signal model
    tissue = out % LEG_STRIDE
    border = ndimage.maximum_filter(out, footprint=np.ones((3, 3, 1), bool)) != \
        ndimage.minimum_filter(out, footprint=np.ones((3, 3, 1), bool))
    gap = _edt2d(~(border | (tissue <= MUSCLE0)), sx, sy)
    return out, gap, affine


# --------------------------------------------------------------------------- synthesis

def _rotation_z(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def synthesize(source: SourceMap, seed: int, *, spacing: tuple | None = None, slice_thickness: float | None = None,
               supersample: int = 2, geometry: bool = True, max_voxels: float = 4e7) -> Phantom:
    """One two-leg Dixon study synthesised from a real label map.

    Args:
        source: the mapped label map (:func:`load_source`).
        seed: identical seed and source give identical arrays.
        spacing: output voxel size (mm); None draws in-plane 0.7-2 mm and slices 3-25 mm (never
            thinner than the source's slices).
        slice_thickness: slice thickness (mm) when thinner than the spacing (gaps); None draws it.
        supersample: sub-voxels per in-plane axis (partial volume).
        geometry: randomise pose, size, elastic warp, muscle sizes and coverage (False: source pose).
        max_voxels: bound on the sub-voxels of one study (cost), met by lowering ``supersample``.
    Returns:
        :class:`~legcomp.phantom.generator.Phantom`; its ``label_record`` names the structures the
        source does not label; ``truth`` holds exact volumes as for the template phantom.
    """
    region = source.region
    ss = np.random.SeedSequence([int(seed), 7, sum(map(ord, source.name))])
    rng_opt, rng_geo, rng_fat, rng_tis, rng_noise, rng_field, rng_org = [np.random.default_rng(s) for s in ss.spawn(7)]
    src_sp = source.spacing
    opts: dict = {"source": source.name, "seed": int(seed)}
    infiltration = float(rng_opt.choice([0.0, rng_opt.uniform(0, 0.3), rng_opt.uniform(0.2, 0.7),
                                         rng_opt.uniform(0.6, 1.0)], p=[0.1, 0.25, 0.3, 0.35]))
    adiposity = float(rng_opt.beta(1.6, 1.6))
    selective = float(rng_opt.uniform(0.1, 0.5)) if rng_opt.random() < 0.5 else 0.0
    opts.update(infiltration=infiltration, adiposity=adiposity, selective=selective,
                snr=float(np.exp(rng_opt.uniform(np.log(8), np.log(80)))), bias=float(rng_opt.uniform(0.0, 0.7)),
                blur=float(rng_opt.uniform(0.0, 0.8)), swap=bool(rng_opt.random() < 0.05),
                mask_background=bool(rng_opt.random() < 0.3),
                ghost=float(rng_opt.uniform(0.01, 0.05)) if rng_opt.random() < 0.2 else 0.0,
                ringing=float(rng_opt.uniform(0.55, 0.9)) if rng_opt.random() < 0.25 else 0.0)
    if spacing is None:
        inplane = float(rng_opt.uniform(0.7, 2.0))
        lo = max(3.0, 0.8 * float(src_sp[2]))
        hi = max(25.0, lo)
        dz = float(np.exp(rng_opt.uniform(np.log(lo), np.log(hi))))
        spacing = (inplane, inplane, dz)
    spacing = tuple(float(s) for s in spacing)
    if slice_thickness is None and spacing[2] > 8.0 and rng_opt.random() < 0.5:
        slice_thickness = float(rng_opt.uniform(3.0, min(10.0, spacing[2])))
    thick = spacing[2] if slice_thickness is None else min(float(slice_thickness), spacing[2])
    opts.update(spacing=list(spacing), slice_thickness=slice_thickness)

    source = _thin_z(source, spacing[2], rng_geo if geometry else None)
    codes, gap, src_aff = build_tissues(source, rng_geo, adiposity=adiposity,
                                        resize_mm=3.0 if geometry else 0.0,
                                        septa=float(rng_geo.uniform(0.0, 0.8)), organ_rng=rng_org)
    opts["genitals"] = bool((codes == ORGAN).any())
    inv = np.linalg.inv(src_aff)
    # pose: output mm -> source world mm (rotation about the slice axis, per-axis scaling, elastic warp)
    theta = float(rng_geo.uniform(-0.25, 0.25)) if geometry else 0.0
    scale = rng_geo.uniform([0.85, 0.85, 0.9], [1.15, 1.15, 1.1]) if geometry else np.ones(3)
    lin = _rotation_z(theta) @ np.diag(1.0 / scale)
    fg = np.argwhere(codes > 0)
    lo_v, hi_v = fg.min(0), fg.max(0)
    centre = (src_aff @ np.r_[(lo_v + hi_v) / 2.0, 1.0])[:3]
    corners = np.array([[a, b, c] for a in (lo_v[0], hi_v[0]) for b in (lo_v[1], hi_v[1]) for c in (lo_v[2], hi_v[2])])
    world = (src_aff[:3, :3] @ corners.T).T + src_aff[:3, 3]
    out_pts = (np.linalg.inv(lin) @ (world - centre).T).T  # extent of the anatomy in the output frame
    half = np.abs(out_pts).max(0)
    margin = rng_geo.uniform(3.0, 30.0, 2) if geometry else np.array([10.0, 10.0])
    fov_xy = 2 * (half[:2] + margin)
    zext = 2 * half[2]
    if geometry and rng_geo.random() < 0.5:  # coverage: part of the labelled length only
        zlen = float(rng_geo.uniform(min(90.0, zext), zext))
        zoff = float(rng_geo.uniform(-(zext - zlen) / 2, (zext - zlen) / 2))
    else:
        zlen, zoff = zext, 0.0
    matrix = (max(8, int(round(fov_xy[0] / spacing[0]))), max(8, int(round(fov_xy[1] / spacing[1]))),
              max(1, int(np.floor(zlen / spacing[2])) + 1))
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-(matrix[0] - 1) / 2 * spacing[0], -(matrix[1] - 1) / 2 * spacing[1],
                  zoff - (matrix[2] - 1) / 2 * spacing[2]]
    s_xy = int(supersample)
    s_z = max(1, min(4, int(np.ceil(thick / max(float(src_sp[2]), 2.5)))))
    while s_xy > 1 and matrix[0] * matrix[1] * matrix[2] * s_xy * s_xy * s_z > max_voxels:
        s_xy -= 1
    opts.update(matrix=list(matrix), supersample_xyz=[s_xy, s_xy, s_z], rotation_deg=round(np.degrees(theta), 2),
                scale=[round(float(v), 3) for v in scale])
    amp = float(rng_geo.uniform(0.0, 4.0)) if geometry else 0.0
    ext = ((aff[0, 3] - 50, aff[0, 3] + matrix[0] * spacing[0] + 50), (aff[1, 3] - 50, aff[1, 3] + matrix[1] * spacing[1] + 50),
           (aff[2, 3] - 50, aff[2, 3] + matrix[2] * spacing[2] + 50))
    warp = [sig.NoiseField(rng_geo, ext, step=(20.0, 20.0, 60.0), sigma_vox=(1.5, 1.5, 1.0)) for _ in range(2)]
    shape = np.array(codes.shape)

    def anatomy_slice(xs: np.ndarray, ys: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
        px = np.broadcast_to(xs[:, None], (xs.size, ys.size))
        py = np.broadcast_to(ys[None, :], (xs.size, ys.size))
        if amp > 0:
            px = px + amp * warp[0].slice(xs, ys, z)
            py = py + amp * warp[1].slice(xs, ys, z)
        q = centre[:, None, None] + np.tensordot(lin, np.stack([px, py, np.full(px.shape, z)]), axes=1)
        v = np.tensordot(inv[:3, :3], q, axes=1) + inv[:3, 3][:, None, None]
        idx = np.rint(v).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < shape[:, None, None]), axis=0)
        i, j, k = (np.where(ok, idx[a], 0) for a in range(3))
        return np.where(ok, codes[i, j, k], 0).astype(np.uint8), np.where(ok, gap[i, j, k], 1e3).astype(np.float32)

    spec = shapes.REGION_SPECS[region]
    mfat = sig.sample_muscle_fat(region, rng_fat, infiltration, spec.susceptibility, True, selective)
    other = OTHER_MUSCLE
    for leg in (0, 1):  # muscle the region's list does not hold or the map does not name: its own fat
        c = LEG_STRIDE * leg + other
        mfat.base[c] = rng_fat.uniform(0.02, 0.08)
        mfat.diffuse[c] = rng_fat.uniform(0.0, 0.3) * infiltration
        mfat.frac[c] = float(np.clip(rng_fat.uniform(0, 1) * infiltration, 0, 1))
        mfat.alpha[c] = rng_fat.uniform(0, 2 * np.pi)
        mfat.target[c] = mfat.base[c] + mfat.diffuse[c]
        for table in (mfat.base, mfat.diffuse, mfat.frac, mfat.alpha, mfat.target):
            table[LEG_STRIDE * leg + UNNAMED] = table[c]  # the other muscle's fat (drawn before UNNAMED existed)
    tp = sig.random_tissue_params(rng_tis)
    tp.pd[ORGAN], tp.ff[ORGAN] = float(rng_org.uniform(0.4, 1.8)), float(rng_org.uniform(0.0, 0.08))
    muscle_codes = np.r_[MUSCLE0 + np.arange(1, len(anatomy.MUSCLES[region]) + 1), other]
    if source.unlabelled:  # build_tissues draws unnamed muscle only for a map that lacks muscles
        muscle_codes = np.r_[muscle_codes, UNNAMED]
    water, fat, stage1, stage2, legmap, counts, ffsum = render_study(
        anatomy_slice, region, aff, matrix, thick, s_xy, s_z, tp, mfat, muscle_codes, rng_field, opts, rng_noise)
    sub_ml = float(np.prod(spacing)) / (s_xy * s_xy * s_z) / 1000.0
    truth = _truth(region, counts, ffsum, sub_ml, stage1, stage2, legmap, float(np.prod(spacing)) / 1000.0, mfat,
                   inter_codes=(FASCIA, IMAT, VESSEL, other, UNNAMED))
    truth = {"region": region, "seed": int(seed), "options": opts, **truth}
    record = {"source": source.name, "stage1": {"unlabelled": []},
              "stage2": {"unlabelled": list(source.unlabelled)}}
    truth["label_record"] = record
    return Phantom(water=water, fat=fat, in_phase=(water + fat).astype(np.float32),
                   opposed_phase=np.abs(water - fat).astype(np.float32), stage1=stage1, stage2=stage2, legs=legmap,
                   affine=aff, region=region, seed=int(seed), options=opts, truth=truth, label_record=record,
                   name_override=study_name(source, seed))


def study_name(source: SourceMap, seed: int) -> str:
    """Folder name of a synthesised study: ``<region>_synth_<source stem>_<seed:05d>`` (path-safe)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", source.name).strip("-")[:60] or "map"
    return f"{source.region}_synth_{stem}_{int(seed):05d}"


def synth_cohort(label_map: str | Path, mapping: str | Path | dict, n: int, seed: int, out: str | Path, *,
                 region: str | None = None, z_range: tuple[int, int] | None = None, progress: bool = True,
                 **options) -> list[Path]:
    """Synthesise ``n`` studies (seeds ``seed`` .. ``seed + n - 1``) from one label map and write them
    into ``out/<region>_synth_<source>_<seed>`` (study folders as :func:`legcomp.phantom.write_phantom`
    writes them, plus ``label_record.json``)."""
    from tqdm.auto import tqdm

    from legcomp.phantom.generator import write_phantom

    if int(n) < 1:
        raise LegcompInputError(f"n must be >= 1, got {n!r}")
    src = load_source(label_map, mapping, region, z_range)
    out = Path(out)
    paths = []
    for i in tqdm(range(int(n)), desc=f"synth {src.name}", disable=not progress):
        ph = synthesize(src, int(seed) + i, **options)
        out.mkdir(parents=True, exist_ok=True)
        paths.append(write_phantom(ph, out / ph.name))
    return paths

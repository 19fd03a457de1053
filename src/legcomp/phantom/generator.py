"""Generate synthetic two-point Dixon thigh/calf phantoms with exact ground truth.

Arrays are float32 (labels uint8) with axes (x, y, z) in RAS+: x from the subject's left to right,
y posterior to anterior, z inferior to superior; the affine maps voxels to mm. Signal and labels are
computed on a grid supersampled in every axis and block-averaged (signal) or majority-voted (labels)
to the output grid, so the output has true partial volume and the truth is exact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.phantom import shapes
from legcomp.phantom import signal as sig
from legcomp.phantom.shapes import (CORTEX, FASCIA, IMAT, LEG_STRIDE, MARROW, MUSCLE0, N_CODES, SAT, SAT_VESSEL, SKIN,
                                    ORGAN, UNNAMED, VESSEL)

DEFAULT_FOV_MM = {("thigh", 2): (432.0, 288.0, 200.0), ("calf", 2): (408.0, 264.0, 200.0),
                  ("thigh", 1): (240.0, 240.0, 200.0), ("calf", 1): (216.0, 216.0, 200.0)}
"""Default field of view (x, y, z) in mm per region and number of legs."""

SUBVOXEL_Z_MM = 2.5
"""Thick slices are supersampled along z at least this finely (mm), beyond ``supersample``."""


@dataclass
class Phantom:
    """One synthetic Dixon study with exact ground truth.

    Attributes:
        water, fat, in_phase, opposed_phase: float32 (x, y, z) RAS+ images (IP = W+F, OP = |W-F|).
        stage1: uint8, 0 background, 1 SAT (skin included), 2 whole muscle (inside the deep fascia,
            bone excluded: muscles, septa, intermuscular fat and deep vessels).
        stage2: uint8, the region's muscle ids (anatomy.MUSCLES), 0 elsewhere.
        legs: uint8, anatomy.LEGS ids (1 left, 2 right), 0 outside the legs.
        affine: 4x4 voxel-to-world (mm), RAS+.
        truth: exact volumes (mL) and fat (mL, fraction 0-1) per leg and structure; see :func:`generate`.
    """

    water: np.ndarray
    fat: np.ndarray
    in_phase: np.ndarray
    opposed_phase: np.ndarray
    stage1: np.ndarray
    stage2: np.ndarray
    legs: np.ndarray
    affine: np.ndarray
    region: str
    seed: int
    options: dict = field(default_factory=dict)
    truth: dict = field(default_factory=dict)
    label_record: dict = field(default_factory=dict)
    name_override: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along x, y, z."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (x, y, z) in voxels."""
        return tuple(self.water.shape)  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """Subject name as used for folders: ``{region}_{seed:05d}`` (synthesised studies name their source)."""
        return self.name_override or f"{self.region}_{self.seed:05d}"

    def to_study(self):
        """The phantom as a :class:`legcomp.io.study.DixonStudy` (labels included), without writing files."""
        from legcomp.io.study import make_study

        imgs = {k: (getattr(self, k), self.affine, self.name) for k in ("water", "fat", "in_phase", "opposed_phase")}
        labs = {k: (getattr(self, k), self.affine, self.name) for k in ("stage1", "stage2", "legs")}
        return make_study(imgs, region=self.region, name=self.name, source=self.name, labels=labs)


def _lut(kind: str, region: str) -> np.ndarray:
    """Map fine codes (tissue + LEG_STRIDE * leg) to stage1 / stage2 / legs ids."""
    lut = np.zeros(N_CODES, dtype=np.uint8)
    for leg in (0, 1):
        off = LEG_STRIDE * leg
        for t in range(1, LEG_STRIDE):
            code = off + t
            if kind == "legs":
                lut[code] = 0 if t == ORGAN else leg + 1
            elif kind == "stage1":
                if t in (SKIN, SAT, SAT_VESSEL):
                    lut[code] = anatomy.SAT.id
                elif t in (FASCIA, IMAT, VESSEL) or t > MUSCLE0:
                    lut[code] = anatomy.WHOLE_MUSCLE.id
            elif kind == "stage2" and t > MUSCLE0 and t - MUSCLE0 <= len(anatomy.MUSCLES[region]):
                lut[code] = t - MUSCLE0
            elif kind == "stage2" and t == UNNAMED:
                lut[code] = anatomy.UNNAMED_MUSCLE
    return lut


def _check_options(region: str, spacing, matrix, legs: str, infiltration: float, adiposity: float, snr: float,
                   bias: float, supersample: int) -> tuple:
    region = anatomy.check_region(region)
    try:
        spacing = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise LegcompInputError(f"spacing must be three numbers (mm), got {spacing!r}") from None
    if len(spacing) != 3 or min(spacing) <= 0:
        raise LegcompInputError(f"spacing must be three positive numbers (mm), got {spacing!r}")
    if legs not in ("both", "left", "right"):
        raise LegcompInputError(f"legs must be both, left or right, got {legs!r}")
    if matrix is not None:
        try:
            matrix = tuple(int(m) for m in matrix)
        except (TypeError, ValueError):
            raise LegcompInputError(f"matrix must be three integers, got {matrix!r}") from None
        if len(matrix) != 3 or min(matrix) < 1:
            raise LegcompInputError(f"matrix must be three positive integers, got {matrix!r}")
    for name, val in (("infiltration", infiltration), ("adiposity", adiposity)):
        if not 0.0 <= float(val) <= 1.0:
            raise LegcompInputError(f"{name} must be between 0 and 1, got {val!r}")
    if float(snr) <= 0:
        raise LegcompInputError(f"snr must be positive, got {snr!r}")
    if float(bias) < 0:
        raise LegcompInputError(f"bias must be >= 0, got {bias!r}")
    if int(supersample) < 1:
        raise LegcompInputError(f"supersample must be >= 1, got {supersample!r}")
    return region, spacing, matrix


def _randomize_options(rng: np.random.Generator, region: str, nlegs: int, opts: dict, grid: bool) -> dict:
    """Draw SynthSeg-style random acquisition and subject options (in place of the given ones)."""
    o = dict(opts)
    o["infiltration"] = float(rng.choice([0.0, rng.uniform(0, 0.3), rng.uniform(0.2, 0.7), rng.uniform(0.6, 1.0)],
                                         p=[0.1, 0.3, 0.3, 0.3]))
    o["adiposity"] = float(rng.beta(1.6, 1.6))
    o["snr"] = float(np.exp(rng.uniform(np.log(8), np.log(80))))
    o["bias"] = float(rng.uniform(0.0, 0.7))
    o["blur"] = float(rng.uniform(0.0, 0.8))
    o["separation"] = float(rng.uniform(-5, 90))
    o["swap"] = bool(opts.get("swap")) or bool(rng.random() < 0.08)
    o["mask_background"] = bool(rng.random() < 0.3)
    o["offset"] = (float(rng.normal(0, 12)), float(rng.normal(0, 12)))
    o["ghost"] = float(rng.uniform(0.01, 0.06)) if rng.random() < 0.3 else 0.0
    o["ringing"] = float(rng.uniform(0.55, 0.9)) if rng.random() < 0.3 else 0.0
    if grid:
        inplane = float(rng.uniform(0.7, 2.0))
        dz = float(np.exp(rng.uniform(np.log(3.0), np.log(25.0))))
        fx, fy, _ = DEFAULT_FOV_MM[(region, nlegs)]
        fovx = fx * rng.uniform(0.85, 1.15)
        fovy = fy * rng.uniform(0.85, 1.2)
        fovz = float(rng.uniform(90, 320))
        o["spacing"] = (inplane, inplane, dz)
        o["matrix"] = (int(round(fovx / inplane)), int(round(fovy / inplane)), max(3, int(round(fovz / dz))))
        o["t_shift"] = float(rng.uniform(-0.15, 0.15))
        if dz > 8.0 and rng.random() < 0.5:  # thin slices with gaps
            o["slice_thickness"] = float(rng.uniform(3.0, min(10.0, dz)))
    o["size_sd"] = float(rng.uniform(shapes.MUSCLE_SIZE_SD, 0.35))
    return o


def _grid(spacing: tuple, matrix: tuple) -> np.ndarray:
    """Affine of a FOV centred on the origin, RAS+."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(matrix, spacing)]
    return aff


def generate(region: str, seed: int, *, spacing=(1.5, 1.5, 5.0), matrix=None, legs: str = "both",
             infiltration: float = 0.3, adiposity: float = 0.5, snr: float = 30.0, bias: float = 0.3,
             swap: bool = False, supersample: int = 3, randomize: bool = False,
             randomize_grid: bool = True, slice_thickness: float | None = None) -> Phantom:
    """Generate one synthetic two-point Dixon study of both (or one) thighs or calves.

    Args:
        region: ``"thigh"`` or ``"calf"``.
        seed: integer; identical seed and options give identical arrays.
        spacing: voxel size (x, y, z) in mm.
        matrix: (nx, ny, nz) voxels, or None for the region's default FOV (thigh 432 x 288 x 200 mm,
            calf 408 x 264 x 200 mm for two legs) at ``spacing``.
        legs: ``"both"``, ``"left"`` or ``"right"``.
        infiltration: 0 (healthy) .. 1 (severe dystrophy): intramuscular fat replacement.
        adiposity: 0 (lean) .. 1 (obese): SAT thickness and intermuscular fat.
        snr: signal-to-noise ratio of healthy muscle water (Rician noise).
        bias: strength of the smooth multiplicative coil bias (0 = none; 0.3 = about +-35 %).
        swap: add a fat-water swap artefact in one region (truth and labels unaffected).
        supersample: sub-voxels per axis (>= 3 for true partial volume; z additionally at <= 2.5 mm).
        randomize: domain randomisation for training: random tissue contrast, bias, noise, blur, and
            (with ``randomize_grid``) random spacing / matrix / FOV coverage; subject options
            (infiltration, adiposity, separation, per-muscle size spread) are drawn too, and
            fat-replaced muscle takes a PD between muscle's and adipose tissue's. Labels stay exact.
        randomize_grid: with ``randomize``, also draw spacing and matrix (else keep the given ones).
        slice_thickness: slice thickness (mm) when thinner than the slice spacing (gaps between
            slices, as in many thigh protocols); None = contiguous slices. Truth volumes are then
            Cavalieri estimates (each slab counts for the full slice spacing), like label volumes.
    Returns:
        :class:`Phantom`. ``truth`` holds, per leg (``left``/``right``) and in ``total``:
        ``muscles`` {name: volume_ml, label_volume_ml, fat_volume_ml, fat_fraction}, ``whole_muscle``,
        ``sat``, ``intermuscular`` (whole muscle minus individual muscles), ``bone``, plus
        ``intramat_ml``, ``intermat_ml``, ``sat_fat_ml``.
    """
    region, spacing, matrix = _check_options(region, spacing, matrix, legs, infiltration, adiposity, snr, bias,
                                             supersample)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise LegcompInputError(f"seed must be an integer, got {seed!r}") from None
    if seed < 0:
        raise LegcompInputError(f"seed must be >= 0, got {seed}")
    nlegs = 2 if legs == "both" else 1
    ss = np.random.SeedSequence([seed, 0 if region == "thigh" else 1])
    rng_rand, rng_geo, rng_fat, rng_tis, rng_noise, rng_field = [np.random.default_rng(s) for s in ss.spawn(6)]
    opts = dict(spacing=spacing, matrix=matrix, legs=legs, infiltration=float(infiltration),
                adiposity=float(adiposity), snr=float(snr), bias=float(bias), swap=bool(swap),
                supersample=int(supersample), randomize=bool(randomize), blur=0.0, separation=None,
                mask_background=False, t_shift=0.0, slice_thickness=slice_thickness, offset=(0.0, 0.0),
                ghost=0.0, ringing=0.0, size_sd=shapes.MUSCLE_SIZE_SD)
    if randomize:
        opts = _randomize_options(rng_rand, region, nlegs, opts, randomize_grid)
    spacing = tuple(float(s) for s in opts["spacing"])
    if opts["matrix"] is None:
        fov = DEFAULT_FOV_MM[(region, nlegs)]
        opts["matrix"] = tuple(max(1, int(round(f / s))) for f, s in zip(fov, spacing))
    matrix = tuple(int(m) for m in opts["matrix"])
    s_xy = int(opts["supersample"])
    thick = spacing[2] if opts["slice_thickness"] is None else min(float(opts["slice_thickness"]), spacing[2])
    if thick <= 0:
        raise LegcompInputError(f"slice_thickness must be positive, got {opts['slice_thickness']!r}")
    s_z = max(s_xy, int(np.ceil(thick / SUBVOXEL_Z_MM))) if s_xy >= 3 else s_xy
    if randomize:  # bound the cost of a training sample (~60M sub-voxels)
        while s_xy > 2 and (matrix[0] * matrix[1] * matrix[2] * s_xy * s_xy * s_z) > 6e7:
            s_xy -= 1
    nx, ny, nz = matrix
    affine = _grid(spacing, matrix)

    spec = shapes.REGION_SPECS[region]
    leg_models = shapes.sample_subject(region, rng_geo, legs=legs, adiposity=opts["adiposity"],
                                       infiltration=opts["infiltration"], separation=opts["separation"],
                                       offset=tuple(opts["offset"]),
                                       variability=1.0, size_sd=float(opts["size_sd"]))
    for lm in leg_models:
        lm.t_centre += opts.get("t_shift", 0.0)
    mfat = sig.sample_muscle_fat(region, rng_fat, opts["infiltration"], spec.susceptibility, bool(randomize))
    tp = sig.random_tissue_params(rng_tis) if randomize else sig.TissueParams()
    muscle_codes = MUSCLE0 + np.arange(1, len(anatomy.MUSCLES[region]) + 1)

    def anatomy_slice(xs: np.ndarray, ys: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
        code = np.zeros((xs.size, ys.size), np.uint8)
        rnorm = np.full(code.shape, 2.0, np.float32)
        gap = np.full(code.shape, 1e3, np.float32)
        for lm in leg_models:
            shapes.rasterize_leg(lm, xs, ys, z, code, rnorm, gap)
        return code, gap

    water, fat, stage1, stage2, legmap, counts, ffsum = render_study(
        anatomy_slice, region, affine, matrix, thick, s_xy, s_z, tp, mfat, muscle_codes, rng_field, opts, rng_noise)
    ip = water + fat
    op = np.abs(water - fat)

    sub_ml = float(np.prod(spacing)) / (s_xy * s_xy * s_z) / 1000.0
    truth = _truth(region, counts, ffsum, sub_ml, stage1, stage2, legmap, float(np.prod(spacing)) / 1000.0, mfat)
    opts_out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}
    opts_out["supersample_xyz"] = [s_xy, s_xy, s_z]
    truth = {"region": region, "seed": seed, "options": opts_out, **truth}
    return Phantom(water=water, fat=fat, in_phase=ip.astype(np.float32), opposed_phase=op.astype(np.float32),
                   stage1=stage1, stage2=stage2, legs=legmap, affine=affine, region=region, seed=seed,
                   options=opts_out, truth=truth)


def render(anatomy_slice, affine: np.ndarray, matrix: tuple, thick: float, s_xy: int, s_z: int,
           tp: sig.TissueParams, mfat: sig.MuscleFat, muscle_codes: np.ndarray, rng_field: np.random.Generator):
    """Render voxel water and fat (PD units) of any anatomy source with the one Dixon signal model.

    ``anatomy_slice(xs, ys, z) -> (code, gap)`` gives the fine tissue code (uint8, shape
    (len(xs), len(ys))) and the distance to the nearest septum (mm) of sub-voxels at xs x ys (mm) and
    height z (mm). Each voxel is supersampled ``s_xy`` x ``s_xy`` in-plane and ``s_z`` times over the
    slice thickness ``thick`` (mm); signal is block-averaged (partial volume) and the fine label
    majority-voted.

    Returns:
        (water, fat, fine_lab, counts, ffsum, appearance): float32 and uint8 (x, y, z) arrays, the
        sub-voxel count and summed fat fraction per fine code (for exact truth volumes), and the
        :class:`legcomp.phantom.signal.Appearance` used.
    """
    nx, ny, nz = matrix
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    x0, y0, z0 = affine[:3, 3]
    xs = x0 - spacing[0] / 2 + (np.arange(nx * s_xy) + 0.5) * spacing[0] / s_xy
    ys = y0 - spacing[1] / 2 + (np.arange(ny * s_xy) + 0.5) * spacing[1] / s_xy
    zsub = (np.arange(s_z) + 0.5) * thick / s_z - thick / 2
    ext = ((xs[0], xs[-1]), (ys[0], ys[-1]), (z0 - spacing[2], z0 + nz * spacing[2]))
    app = sig.make_appearance(tp, mfat, muscle_codes, rng_field, ext)
    vox_idx = (np.arange(nx)[:, None] * ny + np.arange(ny)[None, :]).repeat(s_xy, 0).repeat(s_xy, 1).astype(np.int64)

    water = np.zeros(matrix, np.float32)
    fat = np.zeros(matrix, np.float32)
    fine_lab = np.zeros(matrix, np.uint8)
    counts = np.zeros(N_CODES, np.float64)
    ffsum = np.zeros(N_CODES, np.float64)
    for k in range(nz):
        zc = z0 + k * spacing[2]
        votes = np.zeros(nx * ny * N_CODES, np.int32)
        wacc = np.zeros((nx, ny), np.float32)
        facc = np.zeros((nx, ny), np.float32)
        for dz in zsub:
            z = zc + dz
            code, gap = anatomy_slice(xs, ys, z)
            pd, ff = app.pd_ff(code, xs, ys, z, gap)
            counts += np.bincount(code.ravel(), minlength=N_CODES)
            ffsum += np.bincount(code.ravel(), weights=ff.ravel().astype(np.float64), minlength=N_CODES)
            w = pd * (1 - ff)
            f = pd * ff
            wacc += w.reshape(nx, s_xy, ny, s_xy).mean(axis=(1, 3))
            facc += f.reshape(nx, s_xy, ny, s_xy).mean(axis=(1, 3))
            votes += np.bincount((vox_idx * N_CODES + code).ravel(), minlength=nx * ny * N_CODES).astype(np.int32)
        water[:, :, k] = wacc / s_z
        fat[:, :, k] = facc / s_z
        fine_lab[:, :, k] = votes.reshape(nx * ny, N_CODES).argmax(axis=1).reshape(nx, ny)
    return water, fat, fine_lab, counts, ffsum, app


def render_study(anatomy_slice, region: str, affine: np.ndarray, matrix: tuple, thick: float, s_xy: int, s_z: int,
                 tp: sig.TissueParams, mfat: sig.MuscleFat, muscle_codes: np.ndarray, rng_field: np.random.Generator,
                 opts: dict, rng_noise: np.random.Generator):
    """:func:`render`, the label maps from the majority fine codes, then the scanner
    (:func:`legcomp.phantom.signal.acquire` with ``opts``).

    Returns:
        (water, fat, stage1, stage2, legs, counts, ffsum): float32 images and uint8 label maps (x, y, z),
        and the per-code sub-voxel counts and summed fat fraction for exact truth volumes.
    """
    water, fat, fine_lab, counts, ffsum, app = render(anatomy_slice, affine, matrix, thick, s_xy, s_z, tp, mfat,
                                                      muscle_codes, rng_field)
    stage1 = _lut("stage1", region)[fine_lab]
    stage2 = _lut("stage2", region)[fine_lab]
    legmap = _lut("legs", region)[fine_lab]
    spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    water, fat = sig.acquire(water, fat, legmap, spacing, opts, app, rng_noise)
    return water, fat, stage1, stage2, legmap, counts, ffsum


def _stats(vol: float, fat_ml: float, label_ml: float | None = None) -> dict:
    d = {"volume_ml": vol, "fat_volume_ml": fat_ml, "fat_fraction": fat_ml / vol if vol > 0 else 0.0}
    if label_ml is not None:
        d["label_volume_ml"] = label_ml
    return d


def _truth(region: str, counts: np.ndarray, ffsum: np.ndarray, sub_ml: float, stage1: np.ndarray,
           stage2: np.ndarray, legmap: np.ndarray, vox_ml: float, mfat,
           inter_codes: tuple = (FASCIA, IMAT, VESSEL)) -> dict:
    """Exact per-leg volumes (mL) and fat (mL, fraction) from the supersampled model and the label maps;
    ``inter_codes``: tissue codes of whole muscle outside the individual muscles."""
    muscles = anatomy.MUSCLES[region]
    named = np.where(stage2 == anatomy.UNNAMED_MUSCLE, 0, stage2).astype(np.int64)
    lab_counts = np.bincount((legmap.astype(np.int64) * 64 + named).ravel(), minlength=3 * 64).reshape(3, 64)
    s1_counts = np.bincount((legmap.astype(np.int64) * 4 + stage1).ravel(), minlength=12).reshape(3, 4)
    out: dict = {"voxel_volume_ml": vox_ml, "subvoxel_volume_ml": sub_ml, "legs": {}}
    tot: dict = {}
    for leg_id, leg_name in anatomy.LEGS.items():
        off = LEG_STRIDE * (leg_id - 1)
        vol = counts[off:off + LEG_STRIDE] * sub_ml
        fatv = ffsum[off:off + LEG_STRIDE] * sub_ml
        if vol[1:].sum() == 0:
            continue
        d: dict = {"muscles": {}}
        for lab in muscles:
            c = MUSCLE0 + lab.id
            e = _stats(float(vol[c]), float(fatv[c]), float(lab_counts[leg_id, lab.id] * vox_ml))
            e["design_fat_fraction"] = float(mfat.target[off + c])
            d["muscles"][lab.name] = e
        mus_v = sum(v["volume_ml"] for v in d["muscles"].values())
        mus_f = sum(v["fat_volume_ml"] for v in d["muscles"].values())
        inter = list(inter_codes)
        inter_v, inter_f = float(vol[inter].sum()), float(fatv[inter].sum())
        d["whole_muscle"] = _stats(mus_v + inter_v, mus_f + inter_f,
                                   float(s1_counts[leg_id, anatomy.WHOLE_MUSCLE.id] * vox_ml))
        d["intermuscular"] = _stats(inter_v, inter_f, d["whole_muscle"]["label_volume_ml"]
                                    - float(lab_counts[leg_id, 1:].sum() * vox_ml))
        satc = [SKIN, SAT, SAT_VESSEL]
        d["sat"] = _stats(float(vol[satc].sum()), float(fatv[satc].sum()),
                          float(s1_counts[leg_id, anatomy.SAT.id] * vox_ml))
        d["bone"] = _stats(float(vol[[CORTEX, MARROW]].sum()), float(fatv[[CORTEX, MARROW]].sum()))
        d["intramat_ml"] = mus_f
        d["intermat_ml"] = inter_f
        d["sat_fat_ml"] = d["sat"]["fat_volume_ml"]
        d["leg_volume_ml"] = float(vol[1:].sum())
        d["leg_label_volume_ml"] = float(lab_counts[leg_id].sum() * vox_ml)
        out["legs"][leg_name] = d
    # totals over the legs present
    legs = list(out["legs"].values())
    if legs:
        t: dict = {"muscles": {}}
        for lab in muscles:
            v = sum(lg["muscles"][lab.name]["volume_ml"] for lg in legs)
            f = sum(lg["muscles"][lab.name]["fat_volume_ml"] for lg in legs)
            lv = sum(lg["muscles"][lab.name]["label_volume_ml"] for lg in legs)
            t["muscles"][lab.name] = _stats(v, f, lv)
        for key in ("whole_muscle", "intermuscular", "sat", "bone"):
            v = sum(lg[key]["volume_ml"] for lg in legs)
            f = sum(lg[key]["fat_volume_ml"] for lg in legs)
            lv = sum(lg[key].get("label_volume_ml", 0.0) for lg in legs)
            t[key] = _stats(v, f, lv if key != "bone" else None)
        for key in ("intramat_ml", "intermat_ml", "sat_fat_ml", "leg_volume_ml", "leg_label_volume_ml"):
            t[key] = sum(lg[key] for lg in legs)
        tot = t
    out["total"] = tot
    return out


FILES = ("water", "fat", "in_phase", "opposed_phase", "stage1", "stage2", "legs")


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_phantom(ph: Phantom, folder: str | os.PathLike) -> Path:
    """Write a phantom as NIfTI (float32 images, uint8 labels) plus ``truth.json`` into ``folder``.

    Written atomically: into a temporary sibling folder that is renamed at the end (an existing
    ``folder`` is replaced).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name in FILES:
            arr = getattr(ph, name)
            arr = arr.astype(np.uint8 if name in ("stage1", "stage2", "legs") else np.float32)
            _save(arr, ph.affine, tmp / f"{name}.nii.gz")
        (tmp / "truth.json").write_text(json.dumps(ph.truth, indent=1, default=_json_default))
        if ph.label_record:
            (tmp / anatomy.LABEL_RECORD).write_text(json.dumps(ph.label_record, indent=1))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def generate_cohort(region: str, n: int, seed: int, out: str | os.PathLike, *, progress: bool = True,
                    **options) -> list[Path]:
    """Generate and write ``n`` phantoms into ``out``/``{region}_{seed + i:05d}`` (options as :func:`generate`)."""
    from tqdm.auto import tqdm

    region = anatomy.check_region(region)
    if int(n) < 1:
        raise LegcompInputError(f"n must be >= 1, got {n!r}")
    out = Path(out)
    paths = []
    for i in tqdm(range(int(n)), desc=f"phantom {region}", disable=not progress):
        s = int(seed) + i
        ph = generate(region, s, **options)  # bad options fail here, before anything is written
        out.mkdir(parents=True, exist_ok=True)
        paths.append(write_phantom(ph, out / f"{region}_{s:05d}"))
    return paths

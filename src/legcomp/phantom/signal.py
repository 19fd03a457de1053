"""Signal model of the phantom: per-tissue proton density (PD) and fat fraction (FF), intramuscular fat
infiltration, coil bias, Rician noise and fat-water swaps.

Water = PD * (1 - FF) and fat = PD * FF per sub-voxel (PD relative to healthy muscle = 1; adipose PD
> 1 mimics the brighter fat of T1-weighted gradient echoes). FF is the proton-density fat fraction 0-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, special

from legcomp import anatomy
from legcomp.phantom.shapes import (CORTEX, FASCIA, IMAT, LEG_STRIDE, MARROW, MUSCLE0, N_CODES, SAT, SAT_VESSEL, SKIN,
                                    ORGAN, VESSEL)

FF_MAX = 0.92
"""Fat fraction of fully fat-replaced muscle tissue."""


@dataclass
class TissueParams:
    """PD (relative to muscle) and FF (0-1) of every non-muscle tissue, plus the signal scale."""

    pd: dict = field(default_factory=lambda: {SKIN: 0.6, SAT: 1.45, SAT_VESSEL: 1.1, FASCIA: 0.3, IMAT: 1.4,
                                              VESSEL: 1.15, CORTEX: 0.03, MARROW: 1.35, ORGAN: 1.1})
    ff: dict = field(default_factory=lambda: {SKIN: 0.3, SAT: 0.88, SAT_VESSEL: 0.03, FASCIA: 0.3, IMAT: 0.87,
                                              VESSEL: 0.02, CORTEX: 0.05, MARROW: 0.88, ORGAN: 0.03})
    muscle_pd: float = 1.0
    texture: float = 0.04  # relative PD texture of muscle
    sat_septa: float = 0.5  # density 0..1 of fibrous septa in the SAT
    scale: float = 1000.0  # signal of healthy muscle water
    replaced_pd: float | None = None  # PD of fully fat-replaced muscle (None = muscle PD; adipose is ~1.4)


def random_tissue_params(rng: np.random.Generator) -> TissueParams:
    """SynthSeg-style random tissue contrast: plausible ranges, sometimes beyond (for transfer)."""
    p = TissueParams()
    wide = rng.random() < 0.25  # occasionally implausible contrast
    fat_pd = rng.uniform(0.8, 2.0) if not wide else rng.uniform(0.5, 2.8)
    p.pd[SAT] = fat_pd
    p.pd[IMAT] = fat_pd * rng.uniform(0.85, 1.05)
    p.pd[MARROW] = fat_pd * rng.uniform(0.75, 1.1)
    p.pd[SKIN] = rng.uniform(0.4, 1.2)
    p.pd[FASCIA] = rng.uniform(0.1, 0.6)
    p.pd[CORTEX] = rng.uniform(0.0, 0.12)
    p.pd[VESSEL] = rng.uniform(0.1, 1.8)  # flow void .. inflow-bright
    p.pd[SAT_VESSEL] = rng.uniform(0.3, 1.6)
    p.ff[SAT] = rng.uniform(0.85, 0.96)
    p.ff[IMAT] = p.ff[SAT] * rng.uniform(0.92, 1.0)
    p.ff[MARROW] = rng.uniform(0.7, 0.95)
    p.ff[SKIN] = rng.uniform(0.02, 0.35)
    p.ff[FASCIA] = rng.uniform(0.1, 0.5)
    p.ff[VESSEL] = rng.uniform(0.0, 0.1)
    p.ff[SAT_VESSEL] = rng.uniform(0.0, 0.2)
    p.muscle_pd = 1.0
    p.texture = rng.uniform(0.0, 0.1)
    p.sat_septa = rng.uniform(0.0, 1.0)
    p.scale = float(np.exp(rng.uniform(np.log(80), np.log(4000))))
    # fat-replaced muscle is adipose tissue: its PD goes from muscle's towards the adipose PD
    p.replaced_pd = float(rng.uniform(1.0, max(1.0, p.pd[IMAT]))) if rng.random() < 0.7 else None
    return p


@dataclass
class MuscleFat:
    """Per-muscle fat parameters of every leg, as lookup tables over fine codes (length N_CODES)."""

    base: np.ndarray  # healthy FF
    diffuse: np.ndarray  # homogeneous extra FF
    frac: np.ndarray  # fraction of tissue replaced by fat patches
    alpha: np.ndarray  # mixing angle of the two noise fields (distinct pattern per muscle)
    target: np.ndarray  # designed mean FF (without streaks)
    streak: float = 0.3  # strength 0..1 of thin intramuscular fat streaks
    strands: float = 0.0  # 0..1: residual muscle strands left in fat-replaced tissue (marbled end stage)


def sample_muscle_fat(region: str, rng: np.random.Generator, infiltration: float,
                      susceptibility: dict, randomize: bool = False, selective: float = 0.0) -> MuscleFat:
    """Draw per-muscle fat: healthy 2-8 % plus infiltration x susceptibility (patchy/streaky, both legs).

    ``selective`` (probability 0-1 per muscle): muscles picked at random, whatever their susceptibility,
    are fat-replaced to a mean FF of 0.55-0.9 in both legs (mostly patchy, with residual marbling), as
    dystrophies spare some muscles and end-stage others side by side. 0 draws nothing extra.
    """
    names = [lab.name for lab in anatomy.MUSCLES[region]]
    n = len(names)
    base_subj = rng.uniform(0.02, 0.06)
    sus = np.array([susceptibility[nm] for nm in names])
    sus = np.clip(sus * np.exp(rng.normal(0, 0.35 if randomize else 0.2, n)), 0.02, 1.0)
    diffuse_share = rng.uniform(0.25, 0.85) if randomize else rng.uniform(0.45, 0.85)
    end_stage = rng.random(n) < selective if selective > 0 else np.zeros(n, bool)
    end_ff = rng.uniform(0.55, 0.9, n) if selective > 0 else np.zeros(n)
    tabs = {k: np.zeros(N_CODES) for k in ("base", "diffuse", "frac", "alpha", "target")}
    for leg in (0, 1):
        base = np.clip(base_subj + rng.normal(0, 0.01, n), 0.02, 0.08)
        leg_f = np.exp(rng.normal(0, 0.12, n))
        excess = np.clip(infiltration * sus * leg_f * 0.9, 0.0, FF_MAX - base - 0.01)
        if end_stage.any():
            excess = np.where(end_stage, np.clip(end_ff * leg_f - base, 0.0, FF_MAX - base - 0.01), excess)
        diffuse = diffuse_share * excess
        frac = np.clip((excess - diffuse) / np.maximum(FF_MAX - base - diffuse, 1e-3), 0.0, 1.0)
        alpha = rng.uniform(0, 2 * np.pi, n)
        codes = LEG_STRIDE * leg + MUSCLE0 + np.arange(1, n + 1)
        tabs["base"][codes] = base
        tabs["diffuse"][codes] = diffuse
        tabs["frac"][codes] = frac
        tabs["alpha"][codes] = alpha
        tabs["target"][codes] = base + excess
    streak = float(np.clip(0.15 + 0.8 * infiltration * rng.uniform(0.5, 1.2), 0, 1))
    strands = float(rng.uniform(0.3, 0.9)) if randomize and infiltration > 0.4 and rng.random() < 0.6 else 0.0
    if end_stage.any() and strands == 0.0 and rng.random() < 0.6:
        strands = float(rng.uniform(0.3, 0.9))
    return MuscleFat(**tabs, streak=streak, strands=strands)


class NoiseField:
    """Smooth Gaussian random field (unit variance) on a coarse grid, sampled on sub-slices.

    Elongated along z (fibre direction) so that fatty infiltration appears as streaks.
    """

    def __init__(self, rng: np.random.Generator, extent: tuple, step: tuple = (2.5, 2.5, 10.0),
                 sigma_vox: tuple = (1.2, 1.2, 1.0)):
        self.origin = np.array([e[0] for e in extent], dtype=np.float64) - 2 * np.array(step)
        self.step = np.array(step, dtype=np.float64)
        shape = tuple(int(np.ceil((e[1] - e[0]) / st)) + 5 for e, st in zip(extent, step))
        f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
        self.grid = (f / max(float(f.std()), 1e-6)).astype(np.float32)
        self._mats: dict = {}

    def _weights(self, coords: np.ndarray, axis: int) -> tuple:
        key = (axis, coords.size, float(coords[0]), float(coords[-1]))
        if key not in self._mats:
            f = np.clip((coords - self.origin[axis]) / self.step[axis], 0, self.grid.shape[axis] - 1.001)
            i = f.astype(np.int64)
            self._mats[key] = (i, (f - i).astype(np.float32))
        return self._mats[key]

    def slice(self, xs: np.ndarray, ys: np.ndarray, z: float) -> np.ndarray:
        """Field on the grid xs x ys (mm) at height z (mm): (len(xs), len(ys)) float32 (bilinear)."""
        fz = np.clip((z - self.origin[2]) / self.step[2], 0, self.grid.shape[2] - 1.001)
        k = int(fz)
        w = np.float32(fz - k)
        plane = self.grid[:, :, k] * (1 - w) + self.grid[:, :, k + 1] * w
        ix, wx = self._weights(xs, 0)
        iy, wy = self._weights(ys, 1)
        px = plane[ix] * (1 - wx)[:, None] + plane[ix + 1] * wx[:, None]
        return px[:, iy] * (1 - wy)[None, :] + px[:, iy + 1] * wy[None, :]


def muscle_ff(codes: np.ndarray, n1: np.ndarray, n2: np.ndarray, n3: np.ndarray, gap: np.ndarray,
              mf: MuscleFat) -> np.ndarray:
    """Fat fraction (0-1) of muscle sub-voxels with fine ``codes``: healthy base + diffuse + patches.

    Patches come from the muscle's own mix of two smooth fields and favour the muscle's borders
    (``gap``: mm to the nearest septum), as infiltration typically starts along fascia and septa.
    """
    a = mf.alpha[codes].astype(np.float32)
    n = np.cos(a) * n1 + np.sin(a) * n2 + np.float32(0.9) * np.exp(-np.maximum(gap, 0) / np.float32(3.0))
    u = special.ndtr(n / np.float32(1.15)).astype(np.float32)
    frac = mf.frac[codes].astype(np.float32)
    p = np.clip((u - (1 - frac)) / np.float32(0.2) + 0.5, 0, 1)
    p = np.where(frac <= 0, np.float32(0), p)
    base = mf.base[codes].astype(np.float32) + mf.diffuse[codes].astype(np.float32)
    # thin intramuscular fat streaks (perimysial septa) on the zero set of an independent field mix
    streak = np.clip(np.float32(1) - np.abs(n3) / np.float32(0.08 + 0.12 * mf.streak), 0, 1) * np.float32(mf.streak)
    p = np.maximum(p, streak)
    if mf.strands > 0:  # residual muscle fibres along another level set of the same field (marbling)
        strand = np.clip(np.float32(1) - (np.abs(np.abs(n3) - np.float32(0.9))) / np.float32(0.2), 0, 1)
        p = p * (np.float32(1) - np.float32(mf.strands) * strand)
    return base + (np.float32(FF_MAX) - base) * p


def replaced_pd_factor(ff: np.ndarray, base: np.ndarray, params: TissueParams) -> np.ndarray:
    """PD factor (float32, shape of ``ff``) of muscle sub-voxels: 1 for healthy tissue (FF = ``base``),
    ``replaced_pd / muscle_pd`` for fully fat-replaced tissue (FF = :data:`FF_MAX`), linear between.

    Fat-replaced muscle is adipose tissue, whose PD is higher than muscle's; 1 everywhere when
    ``params.replaced_pd`` is None (the default phantom).
    """
    if params.replaced_pd is None:
        return np.ones_like(ff, dtype=np.float32)
    b = np.asarray(base, np.float32)
    rep = np.clip((ff - b) / (np.float32(FF_MAX) - b), 0, 1)
    return (1.0 + np.float32(params.replaced_pd / params.muscle_pd - 1.0) * rep).astype(np.float32)


def septa_lines(n1: np.ndarray, n3: np.ndarray, density: float) -> np.ndarray:
    """Thin curvilinear lines (0..1) on the zero set of a smooth field, gated to a fraction ``density``."""
    if density <= 0:
        return np.zeros_like(n1)
    line = np.clip(np.float32(1) - np.abs(n3) / np.float32(0.1), 0, 1)
    return line * (n1 > np.float32(special.ndtri(1 - min(density, 0.999)))).astype(np.float32)


def bias_field(shape: tuple, spacing: tuple, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative coil bias: exp(strength * f), f a low-order random field scaled to |f| <~ 1."""
    if strength <= 0:
        return np.ones(shape, dtype=np.float32)
    ax = [(np.arange(n) - (n - 1) / 2) * s / 250.0 for n, s in zip(shape, spacing)]  # ~ +-1 over 500 mm
    x, y, z = np.meshgrid(*ax, indexing="ij", sparse=True)
    c = rng.normal(0, 1, 10)
    f = (c[0] * x + c[1] * y + 0.5 * c[2] * z + c[3] * x * x + c[4] * y * y + c[5] * x * y + 0.3 * c[6] * z * z
         + 0.5 * c[7] * x * z + 0.5 * c[8] * y * z)
    # a receive-coil hot spot posteriorly (table coil) of random strength
    f = f + c[9] * np.exp(-((y + 0.3) ** 2) / 0.1)
    f = f - f.mean()
    f = f / max(float(np.abs(f).max()), 1e-6)
    return np.exp(strength * f).astype(np.float32)


def truncate_kspace(img: np.ndarray, keep: float) -> np.ndarray:
    """Keep the central fraction ``keep`` of in-plane k-space (axes 0, 1) per slice: Gibbs ringing."""
    k = np.fft.fftshift(np.fft.fft2(img, axes=(0, 1)), axes=(0, 1))
    for ax in (0, 1):
        n = img.shape[ax]
        m = max(2, int(round(n * keep)))
        lo = (n - m) // 2
        sl = [slice(None)] * 3
        sl[ax] = np.r_[0:lo, lo + m:n]
        k[tuple(sl)] = 0
    out = np.fft.ifft2(np.fft.ifftshift(k, axes=(0, 1)), axes=(0, 1)).real
    return np.maximum(out, 0).astype(np.float32)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise of standard deviation ``sigma`` per channel."""
    if sigma <= 0:
        return signal.astype(np.float32)
    re = signal + rng.normal(0, sigma, signal.shape).astype(np.float32)
    im = rng.normal(0, sigma, signal.shape).astype(np.float32)
    return np.sqrt(re * re + im * im).astype(np.float32)


def swap_mask(legs: np.ndarray, spacing: tuple, rng: np.random.Generator) -> np.ndarray:
    """A fat-water swap region: a smooth blob at the periphery of one leg spanning some slices (bool)."""
    ids = [i for i in np.unique(legs) if i]
    shape = legs.shape
    out = np.zeros(shape, dtype=bool)
    if not ids:
        return out
    leg = ids[int(rng.integers(len(ids)))]
    pts = np.argwhere(legs == leg)
    # a centre on the leg's outer boundary, preferably away from the midline
    centre = pts[rng.integers(len(pts))].astype(np.float64)
    xc = pts[:, 0].mean()
    far = pts[np.abs(pts[:, 0] - xc) > 0.6 * np.abs(pts[:, 0] - xc).max()]
    if len(far):
        centre = far[rng.integers(len(far))].astype(np.float64)
    radius = rng.uniform(30, 70)  # mm
    zc = rng.uniform(0, shape[2] - 1)
    zr = rng.uniform(0.2, 0.6) * shape[2] * spacing[2] + spacing[2]
    gx = (np.arange(shape[0]) - centre[0]) * spacing[0]
    gy = (np.arange(shape[1]) - centre[1]) * spacing[1]
    gz = (np.arange(shape[2]) - zc) * spacing[2]
    d = (gx[:, None, None] / radius) ** 2 + (gy[None, :, None] / radius) ** 2 + (gz[None, None, :] / zr) ** 2
    return d < 1.0


@dataclass
class Appearance:
    """One subject's tissue appearance: lookup tables over fine codes, muscle fat, smooth noise fields.

    Shared by every anatomy source (the template phantom and legs synthesised from real label maps):
    :meth:`pd_ff` turns a map of fine tissue codes into proton density and fat fraction.
    """

    tp: TissueParams
    mfat: MuscleFat
    pd_lut: np.ndarray
    ff_lut: np.ndarray
    is_muscle: np.ndarray
    is_sat: np.ndarray
    fields: tuple  # three NoiseField: patch mix (n1, n2) and streaks / septa (n3)

    def pd_ff(self, code: np.ndarray, xs: np.ndarray, ys: np.ndarray, z: float,
              gap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """PD (relative to muscle) and FF (0-1) of sub-voxels with fine ``code`` on the grid xs x ys (mm)
        at height z (mm); ``gap``: mm from each sub-voxel to the nearest septum (muscle border)."""
        tp, mf = self.tp, self.mfat
        pd = self.pd_lut[code]
        ff = self.ff_lut[code]
        mus = self.is_muscle[code]
        if mus.any():
            n1f, n2f, n3f = self.fields
            n1 = n1f.slice(xs, ys, z)
            n2 = n2f.slice(xs, ys, z)
            n3 = n3f.slice(xs, ys, z)
            cm = code[mus]
            ff[mus] = muscle_ff(cm, n1[mus], n2[mus], n3[mus], gap[mus], mf)
            pd[mus] *= 1.0 + np.float32(tp.texture) * n2[mus]
            pd[mus] *= replaced_pd_factor(ff[mus], mf.base[cm], tp)
            sat = self.is_sat[code]
            if sat.any():  # fibrous septa of the subcutaneous fat: thin lines of low PD / FF
                line = septa_lines(n1[sat], n3[sat], tp.sat_septa)
                pd[sat] *= 1.0 - 0.45 * line
                ff[sat] *= 1.0 - 0.5 * line
        return pd, ff


def make_appearance(tp: TissueParams, mfat: MuscleFat, muscle_codes: np.ndarray, rng_field: np.random.Generator,
                    extent: tuple) -> Appearance:
    """Build an :class:`Appearance`: ``muscle_codes`` (tissue codes 0..LEG_STRIDE-1 that are muscle)
    take the muscle PD and :func:`muscle_ff`; noise fields cover ``extent`` ((x0, x1), (y0, y1), (z0, z1)) mm."""
    pd_lut = np.zeros(N_CODES, np.float32)
    ff_lut = np.zeros(N_CODES, np.float32)
    for leg in (0, 1):
        for t, v in tp.pd.items():
            pd_lut[LEG_STRIDE * leg + t] = v
        for t, v in tp.ff.items():
            ff_lut[LEG_STRIDE * leg + t] = v
    is_muscle = np.zeros(N_CODES, bool)
    for leg in (0, 1):
        is_muscle[LEG_STRIDE * leg + np.asarray(muscle_codes, np.int64)] = True
    pd_lut[is_muscle] = tp.muscle_pd
    is_sat = np.zeros(N_CODES, bool)
    is_sat[[SAT, SAT + LEG_STRIDE]] = True
    n1f = NoiseField(rng_field, extent)
    n2f = NoiseField(rng_field, extent)
    n3f = NoiseField(rng_field, extent, step=(4.0, 4.0, 15.0), sigma_vox=(1.5, 1.5, 1.0))
    return Appearance(tp, mfat, pd_lut, ff_lut, is_muscle, is_sat, (n1f, n2f, n3f))


def acquire(water: np.ndarray, fat: np.ndarray, legmap: np.ndarray, spacing: tuple, opts: dict,
            app: Appearance, rng_noise: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The scanner's part, on voxel water and fat (PD units, (x, y, z)): optional fat-water swap,
    Gibbs ringing, ghost, blur, coil bias, signal scale, Rician noise, background masking.

    ``opts`` keys: swap, ringing, ghost, blur, bias, snr, mask_background. Returns (water, fat) float32.
    """
    if opts.get("swap"):
        m = swap_mask(legmap, spacing, rng_noise)
        water[m], fat[m] = fat[m].copy(), water[m].copy()
    if opts.get("ringing", 0) > 0:  # k-space truncation in-plane (Gibbs ringing, lower true resolution)
        water = truncate_kspace(water, opts["ringing"])
        fat = truncate_kspace(fat, opts["ringing"])
    if opts.get("ghost", 0) > 0:  # phase-encoding ghost (motion / flow) along y
        water = water + np.float32(opts["ghost"]) * np.roll(water, water.shape[1] // 2, axis=1)
        fat = fat + np.float32(opts["ghost"]) * np.roll(fat, fat.shape[1] // 2, axis=1)
    if opts.get("blur", 0) > 0:
        sg = (opts["blur"], opts["blur"], 0.0)
        water = ndimage.gaussian_filter(water, sg)
        fat = ndimage.gaussian_filter(fat, sg)
    b = bias_field(water.shape, spacing, rng_noise, opts["bias"]) * np.float32(app.tp.scale)
    water *= b
    fat *= b
    sigma = app.tp.scale * (1 - float(np.mean(app.mfat.base[app.is_muscle]))) / opts["snr"]
    water = rician(water, sigma, rng_noise)
    fat = rician(fat, sigma, rng_noise)
    if opts.get("mask_background"):
        body = ndimage.binary_dilation(legmap > 0, iterations=2)
        water[~body] = 0
        fat[~body] = 0
    return water, fat

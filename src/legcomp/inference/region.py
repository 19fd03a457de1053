"""Automatic region detection (thigh or calf) from the image alone.

The rule is anatomical and simple to audit: a thigh's cross-section is about twice a calf's.
The body is the largest bright structures of the in-phase image (W+F) slice by slice; the mean
cross-sectional area per leg over the slices is compared with
:data:`AREA_THRESHOLD_CM2` (adult thighs are ~150-350 cm^2, calves ~70-140 cm^2).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from legcomp.io.study import DixonStudy

AREA_THRESHOLD_CM2 = 140.0
"""Mean cross-sectional area per leg (cm^2) above which a study is called a thigh."""


def body_mask(in_phase: np.ndarray, fraction: float = 0.15) -> np.ndarray:
    """Foreground of an in-phase image (x, y, z): voxels above ``fraction`` x its 99th percentile,
    slice-wise hole-filled, small islands removed. Returns a bool array."""
    thr = fraction * float(np.percentile(in_phase, 99))
    fg = in_phase > thr
    fg = ndimage.binary_opening(fg, structure=np.ones((3, 3, 1), bool))
    for z in range(fg.shape[2]):
        fg[:, :, z] = ndimage.binary_fill_holes(fg[:, :, z])
    return fg


def leg_area_cm2(study: DixonStudy) -> float:
    """Median over slices of the mean cross-sectional area per leg (cm^2)."""
    fg = body_mask(study.in_phase)
    px_cm2 = study.spacing[0] * study.spacing[1] / 100.0
    areas = []
    for z in range(fg.shape[2]):
        lab, n = ndimage.label(fg[:, :, z])
        if n == 0:
            continue
        sizes = np.sort(np.bincount(lab.ravel())[1:])[::-1]
        legs = sizes[sizes > 0.2 * sizes[0]][:2]  # one or two legs; ignore small islands
        areas.append(float(legs.mean()) * px_cm2)
    return float(np.median(areas)) if areas else 0.0


def detect_region(study: DixonStudy) -> str:
    """``"thigh"`` or ``"calf"`` from the per-leg cross-sectional area (see module doc)."""
    return "thigh" if leg_area_cm2(study) >= AREA_THRESHOLD_CM2 else "calf"

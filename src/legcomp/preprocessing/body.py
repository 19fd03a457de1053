"""Body and bone masks of a Dixon study, from the image alone (no network).

Shared by region detection (:mod:`legcomp.inference.region`) and fat-water swap detection
(:mod:`legcomp.preprocessing.swap`). Arrays are (x, y, z) (or (x, y) for one slice) in canonical
RAS+; lengths in mm, areas in cm^2.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_FRACTION = 0.15
"""Body = W+F above this fraction of its 99th percentile."""
NOISE_FACTOR = 2.5
"""Body = W+F also above this multiple of the background (FOV border) median."""
VOID_FRACTION = 0.4
"""Bone void: W / W_ref + F / F_ref below this (references: the leg's 95th percentiles of W and F)."""
LOCAL_MM = 15.0
"""Sigma (mm) of the local mean brightness that the void threshold is relative to."""
MIN_BONE_CM2 = 0.8
"""Smallest area (cm^2) of a void component counted as bone (vessels are smaller)."""


def background_level(a: np.ndarray) -> float:
    """Background (noise floor) level of an (x, y, z) image: median of the outermost 5 % of the
    field of view in x and y."""
    bx, by = max(1, a.shape[0] // 20), max(1, a.shape[1] // 20)
    frame = np.concatenate([a[:bx].ravel(), a[-bx:].ravel(), a[:, :by].ravel(), a[:, -by:].ravel()])
    return float(np.median(frame))


def body_mask(in_phase: np.ndarray, fraction: float = BODY_FRACTION) -> np.ndarray:
    """Foreground of an in-phase image (x, y, z), opened and slice-wise hole-filled (bool array).

    Threshold: ``fraction`` x the 99th percentile, raised to :data:`NOISE_FACTOR` x the median of the
    outermost 5 % of the field of view in x and y (the background noise level) when that is higher.
    """
    a = np.asarray(in_phase)
    thr = max(fraction * float(np.percentile(a, 99)), NOISE_FACTOR * background_level(a))
    fg = a > thr
    fg = ndimage.binary_opening(fg, structure=np.ones((3, 3, 1), bool))
    for z in range(fg.shape[2]):
        fg[:, :, z] = ndimage.binary_fill_holes(fg[:, :, z])
    return fg


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over in-plane blocks of k x k voxels (x, y, z) -> (x // k, y // k, z), float32."""
    if k <= 1:
        return np.asarray(a, np.float32)
    nx, ny = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    out = np.zeros((nx // k, ny // k, a.shape[2]), np.float32)
    for i in range(k):
        for j in range(k):
            out += a[i:nx:k, j:ny:k]
    return out / np.float32(k * k)


def find_bones(water: np.ndarray, fat: np.ndarray, leg: np.ndarray, edt: np.ndarray,
           spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(bone label map, areas cm^2 per label) of one leg slice (2D arrays); labels 1.. largest first.

    Brightness = W / W_ref + F / F_ref with the leg's 95th percentiles as references: about 1 for
    muscle of any fat fraction and for fat, about 0 for cortical bone. Void = brightness below
    :data:`VOID_FRACTION` x its local mean (Gaussian of :data:`LOCAL_MM` within the leg, which cancels
    coil bias), 3 mm or more inside the leg; then closed, hole-filled (cortex + marrow) and opened.
    """
    inner = edt > 3.0
    if not inner.any():
        return np.zeros(leg.shape, np.int32), np.zeros(0)
    w95, f95 = float(np.percentile(water[leg], 95)), float(np.percentile(fat[leg], 95))
    w_ref, f_ref = max(w95, 0.3 * f95, 1e-6), max(f95, 0.3 * w95, 1e-6)
    bright = np.where(leg, water / w_ref + fat / f_ref, 0.0)
    sigma = (LOCAL_MM / spacing[0], LOCAL_MM / spacing[1])
    local = (ndimage.gaussian_filter(bright, sigma, truncate=2.5)
             / np.maximum(ndimage.gaussian_filter(leg.astype(float), sigma, truncate=2.5), 1e-3))
    void = (bright < VOID_FRACTION * np.maximum(local, 1e-6)) & inner
    void = ndimage.binary_closing(void, structure=ndimage.generate_binary_structure(2, 1)) & inner
    filled = ndimage.binary_opening(ndimage.binary_fill_holes(void), structure=np.ones((2, 2), bool))
    lab, n = ndimage.label(filled)
    if n == 0:
        return lab, np.zeros(0)
    areas = np.bincount(lab.ravel())[1:] * (spacing[0] * spacing[1] / 100.0)
    order = np.argsort(-areas, kind="stable")
    keep = order[areas[order] >= MIN_BONE_CM2]
    remap = np.zeros(n + 1, np.int32)
    remap[keep + 1] = np.arange(1, len(keep) + 1)
    return remap[lab], areas[keep]

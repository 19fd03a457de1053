"""Tiny synthetic labelled studies for tests and smoke runs (not anatomy: two cylinders with rings).

Each leg is a cylinder along z: an outer ring of subcutaneous fat around a muscle core that is cut
into angular sectors, one per stage-2 label. Water is high in muscle, fat high in SAT.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from legcomp import anatomy


def toy_arrays(shape: tuple[int, int, int] = (48, 32, 8), spacing: tuple[float, float, float] = (3.0, 3.0, 10.0),
               region: str = "thigh", seed: int = 0, n_muscles: int = 4) -> dict[str, np.ndarray]:
    """Arrays (x, y, z) ``water``, ``fat``, ``stage1``, ``stage2``, ``legs`` and the 4x4 ``affine`` (RAS+)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    stage1 = np.zeros((nx, ny), np.uint8)
    stage2 = np.zeros((nx, ny), np.uint8)
    legs = np.zeros((nx, ny), np.uint8)
    ids = [lab.id for lab in anatomy.MUSCLES[anatomy.check_region(region)]][:n_muscles]
    r_out = min(nx / 4, ny / 2) * (0.85 + 0.1 * rng.random())
    for leg_id, cx in ((2, nx * 0.25), (1, nx * 0.75)):  # RAS+: low x = subject's right
        cy = ny / 2 + rng.uniform(-1, 1)
        r = np.hypot(x - cx, y - cy)
        inside = r < r_out
        legs[np.abs(x - cx) < nx / 4] = leg_id
        stage1[inside] = anatomy.SAT.id
        core = r < r_out * (0.65 + 0.1 * rng.random())
        stage1[core] = anatomy.WHOLE_MUSCLE.id
        ang = (np.arctan2(y - cy, x - cx) + np.pi + rng.uniform(0, 0.3)) % (2 * np.pi)
        sector = np.minimum((ang / (2 * np.pi) * len(ids)).astype(int), len(ids) - 1)
        stage2[core] = np.asarray(ids, np.uint8)[sector[core]]
    stage1 = np.repeat(stage1[..., None], nz, 2)
    stage2 = np.repeat(stage2[..., None], nz, 2)
    legs = np.repeat(legs[..., None], nz, 2)
    legs[stage1 == 0] = 0
    water = np.where(stage1 == anatomy.WHOLE_MUSCLE.id, 0.9, np.where(stage1 == anatomy.SAT.id, 0.1, 0.0))
    fat = np.where(stage1 == anatomy.WHOLE_MUSCLE.id, 0.05, np.where(stage1 == anatomy.SAT.id, 0.9, 0.0))
    water = water * (1 + 0.05 * stage2)  # muscles differ slightly
    scale = 500 + 300 * rng.random()
    water = (water * scale + rng.normal(0, 10, shape)).clip(0).astype(np.float32)
    fat = (fat * scale + rng.normal(0, 10, shape)).clip(0).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    return {"water": water, "fat": fat, "stage1": stage1, "stage2": stage2, "legs": legs, "affine": affine}


def write_toy_cohort(out: str | Path, n: int, region: str = "thigh", shape: tuple[int, int, int] = (48, 32, 8),
                     spacing: tuple[float, float, float] = (3.0, 3.0, 10.0), seed: int = 0) -> list[Path]:
    """Write ``n`` toy studies as NIfTI folders ``out/<region>_<seed+i:05d>`` (water, fat, stage1, stage2, legs)."""
    out = Path(out)
    paths = []
    for i in range(n):
        arr = toy_arrays(shape, spacing, region, seed + i)
        folder = out / f"{region}_{seed + i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for key in ("water", "fat", "stage1", "stage2", "legs"):
            data = arr[key] if key in ("water", "fat") else arr[key].astype(np.uint8)
            nib.save(nib.Nifti1Image(data, arr["affine"]), str(folder / f"{key}.nii.gz"))
        paths.append(folder)
    return paths

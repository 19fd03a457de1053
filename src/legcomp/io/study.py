"""The Dixon study: the images of one acquisition, held in one canonical orientation.

Arrays are float32 with axis order (x, y, z) in RAS+ orientation (the closest canonical
orientation of the input, as :func:`nibabel.as_closest_canonical` defines it): axis 0 runs
from the subject's left to right, axis 1 from posterior to anterior, axis 2 from
inferior to superior. The study remembers the input's own orientation so that every
output is written back in the input geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from legcomp.errors import LegcompInputError

CONTRASTS: tuple[str, ...] = ("water", "fat", "in_phase", "opposed_phase")
"""Dixon contrasts in legcomp's order; water and fat are required."""

AFFINE_ATOL_MM = 1e-3
"""Default tolerance (mm) when comparing the affines of the images of one study."""

VOXEL_MM_RANGE = (0.01, 50.0)
"""Voxel sizes (mm) outside this range are taken for a broken header (real slices reach 25 mm)."""

WORKING_INPLANE_MM = 1.5
"""In-plane voxel size (mm) of the networks' working grid (``preprocessing.inputs.WORKING_SPACING``)."""

BYTES_PER_VOXEL = 40
"""Rough memory per voxel of a study in work (contrasts, network inputs, class probabilities)."""

MAX_STUDY_GB = 8.0
"""A study that would need more than this (at its own or the working grid) is refused before any work."""


@dataclass
class DixonStudy:
    """One two-point Dixon study in canonical RAS+ orientation.

    Attributes:
        water, fat, in_phase, opposed_phase: float arrays (float32, or float64 as read from
            scaled NIfTI/DICOM data), axes (x, y, z), RAS+.
        affine: 4x4 voxel-to-world (mm) matrix of the canonical arrays.
        region: ``"thigh"``, ``"calf"`` or ``"unknown"``.
        name: subject / study identifier.
        source: where the study was read from (folder or file).
        derived: contrasts computed rather than read (IP = W+F, OP = |W-F|).
        labels: optional label maps found with the study (``"stage1"``, ``"stage2"``,
            ``"legs"``), uint8, same axes as the images; training maps may hold
            :data:`legcomp.anatomy.IGNORE` (255) where a voxel carries no label.
        label_record: which structures the label maps do not label (training data; the
            :data:`legcomp.anatomy.LABEL_RECORD` file), e.g. ``{"stage2": {"unlabelled": [...]}}``;
            empty = everything labelled.
        input_affine, input_shape: geometry of the input files, for writing back.
    """

    water: np.ndarray
    fat: np.ndarray
    in_phase: np.ndarray
    opposed_phase: np.ndarray
    affine: np.ndarray
    region: str = "unknown"
    name: str = "study"
    source: str = ""
    derived: tuple[str, ...] = ()
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    label_record: dict = field(default_factory=dict)
    input_affine: np.ndarray | None = None
    input_shape: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (x, y, z) in voxels."""
        return tuple(self.water.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along (x, y, z) in mm."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (|det(affine)| mm^3 / 1000)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def orientation(self) -> str:
        """Axis codes of the input files, e.g. ``"LPS"`` (canonical arrays are always RAS)."""
        aff = self.input_affine if self.input_affine is not None else self.affine
        return "".join(nib.aff2axcodes(aff))

    def image(self, contrast: str) -> np.ndarray:
        """One contrast by name (water, fat, in_phase, opposed_phase)."""
        if contrast not in CONTRASTS:
            raise LegcompInputError(f"unknown contrast {contrast!r}")
        return getattr(self, contrast)

    def to_input_orientation(self, array: np.ndarray) -> np.ndarray:
        """Reorient a canonical (x, y, z) array back to the input files' axis order."""
        if self.input_affine is None:
            return array
        src = nib.io_orientation(self.affine)
        dst = nib.io_orientation(self.input_affine)
        return np.asarray(nib.orientations.apply_orientation(array, nib.orientations.ornt_transform(src, dst)))

    def save_like_input(self, array: np.ndarray, path: str | Path, dtype: str | np.dtype = np.uint8) -> Path:
        """Write a canonical array as NIfTI in the input geometry (orientation and affine)."""
        path = Path(path)
        data = self.to_input_orientation(np.asarray(array)).astype(dtype)
        affine = self.input_affine if self.input_affine is not None else self.affine
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(path))
        return path


def check_geometry(affine: np.ndarray, shape: tuple[int, ...], path: object) -> tuple[float, float, float]:
    """Raise :class:`LegcompInputError` (naming ``path``) for geometry no study can have: a non-finite,
    zero or singular affine, voxel sizes outside :data:`VOXEL_MM_RANGE`, or a size that would need more
    than :data:`MAX_STUDY_GB` at the input or the working grid. Cheap: call it before reading the data.
    Returns the voxel size (mm) along the first three axes."""
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise LegcompInputError("the affine (voxel-to-world matrix) holds NaN or inf values"
                                if a.shape == (4, 4) else f"the affine has shape {a.shape}, expected 4x4", path)
    m = a[:3, :3]
    spacing = np.sqrt((m ** 2).sum(axis=0))
    det = abs(float(np.linalg.det(m)))
    if det == 0 or det < 1e-6 * float(np.prod(spacing)):
        raise LegcompInputError(f"the affine is zero or singular (voxel sizes {_mm(spacing)} mm, determinant "
                                f"{det:.3g}): a broken header", path)
    lo, hi = VOXEL_MM_RANGE
    if spacing.min() < lo or spacing.max() > hi:
        raise LegcompInputError(f"voxel size {_mm(spacing)} mm lies outside {lo:g}-{hi:g} mm: a broken header?", path)
    dims = [int(n) for n in tuple(shape)[:3]] + [1] * max(0, 3 - len(shape))
    extra = int(np.prod([int(n) for n in tuple(shape)[3:]], dtype=np.int64)) if len(shape) > 3 else 1
    ornt = nib.io_orientation(a)
    work = [max(1.0, n * s / WORKING_INPLANE_MM) if ornt[i, 0] in (0, 1) else n
            for i, (n, s) in enumerate(zip(dims, spacing))]
    for what, n_vox in (("at its own grid", float(np.prod(dims)) * extra),
                        (f"at the {WORKING_INPLANE_MM} mm working grid", float(np.prod(work)))):
        gb = n_vox * BYTES_PER_VOXEL / 1e9
        if gb > MAX_STUDY_GB:
            raise LegcompInputError(f"{tuple(int(n) for n in shape)} voxels of {_mm(spacing)} mm would need about "
                                    f"{gb:.0f} GB {what} (limit {MAX_STUDY_GB:g} GB): a broken header?", path)
    return tuple(float(s) for s in spacing)  # type: ignore[return-value]


def _mm(values: np.ndarray) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def check_image(data: np.ndarray, path: object) -> np.ndarray:
    """Validate one image array: 3D (a trailing singleton axis is dropped), finite, not all zero.

    Returns float32 data, or float64 when given float64 (scaled integer NIfTI data read with
    nibabel), so that thresholds on the original values stay exact. Raises
    :class:`LegcompInputError` naming ``path``.
    """
    data = np.asarray(data)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise LegcompInputError(f"image is {data.ndim}D with shape {tuple(data.shape)}, expected a 3D volume", path)
    if min(data.shape) < 1 or data.size == 0:
        raise LegcompInputError("image is empty", path)
    data = data.astype(np.float64 if data.dtype == np.float64 else np.float32, copy=False)
    if not np.isfinite(data).all():
        raise LegcompInputError("image contains NaN or inf values", path)
    if not np.any(data):
        raise LegcompInputError("image is all zero", path)
    return data


def check_same_geometry(ref: tuple[np.ndarray, np.ndarray, object],
                        other: tuple[np.ndarray, np.ndarray, object],
                        atol_mm: float = AFFINE_ATOL_MM) -> None:
    """Raise if two (data, affine, path) images differ in shape or affine (beyond ``atol_mm``)."""
    d0, a0, p0 = ref
    d1, a1, p1 = other
    if tuple(d0.shape[:3]) != tuple(d1.shape[:3]):
        raise LegcompInputError(f"shape {tuple(d1.shape[:3])} differs from {Path(str(p0)).name} {tuple(d0.shape[:3])}", p1)
    if not np.allclose(a0, a1, atol=atol_mm, rtol=0):
        dev = float(np.abs(np.asarray(a0) - np.asarray(a1)).max())
        raise LegcompInputError(f"affine differs from {Path(str(p0)).name} by up to {dev:.4g} mm (tolerance {atol_mm} mm)", p1)


def make_study(images: dict[str, tuple[np.ndarray, np.ndarray, object]], *, region: str = "unknown",
               name: str = "study", source: str = "",
               labels: dict[str, tuple[np.ndarray, np.ndarray, object]] | None = None,
               atol_mm: float = AFFINE_ATOL_MM) -> DixonStudy:
    """Build a canonical :class:`DixonStudy` from raw images.

    Args:
        images: contrast name -> (data, affine, path). ``water`` and ``fat`` are required;
            ``in_phase`` / ``opposed_phase`` are derived (IP = W+F, OP = |W-F|) when absent.
        labels: optional label maps, name -> (data, affine, path), checked like the images.
        region: ``thigh``, ``calf`` or ``unknown``.
    Raises:
        LegcompInputError: missing contrast, bad image, shape or affine mismatch.
    """
    for req in ("water", "fat"):
        if req not in images:
            raise LegcompInputError(f"no {req} image found", source or None)
    for d, a, p in images.values():
        check_geometry(a, np.shape(d), p)
    checked = {k: (check_image(d, p), np.asarray(a, dtype=float), p) for k, (d, a, p) in images.items()}
    ref = checked["water"]
    for k, v in checked.items():
        if k != "water":
            check_same_geometry(ref, v, atol_mm)
    lab_checked = {}
    for k, (d, a, p) in (labels or {}).items():
        d = np.asarray(d)
        while d.ndim > 3 and d.shape[-1] == 1:
            d = d[..., 0]
        check_same_geometry(ref, (d, np.asarray(a, dtype=float), p), atol_mm)
        if not np.isfinite(d).all() or (d < 0).any() or (d != np.round(d)).any():
            raise LegcompInputError("label map must hold non-negative integers", p)
        if d.size and d.max() > 255:
            raise LegcompInputError(f"label map holds id {int(d.max())}; label ids must lie in 0-255", p)
        lab_checked[k] = d.astype(np.uint8)
    input_affine = ref[1]
    ornt = nib.io_orientation(input_affine)
    canon_affine = input_affine @ nib.orientations.inv_ornt_aff(ornt, ref[0].shape)

    def canon(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(nib.orientations.apply_orientation(a, ornt))

    arrays = {k: canon(v[0]) for k, v in checked.items()}
    derived = []
    if "in_phase" not in arrays:
        arrays["in_phase"] = arrays["water"] + arrays["fat"]
        derived.append("in_phase")
    if "opposed_phase" not in arrays:
        arrays["opposed_phase"] = np.abs(arrays["water"] - arrays["fat"])
        derived.append("opposed_phase")
    region = region.lower() if region else "unknown"
    if region not in ("thigh", "calf", "unknown"):
        raise LegcompInputError(f"unknown region {region!r}; expected thigh or calf", source or None)
    return DixonStudy(water=arrays["water"], fat=arrays["fat"], in_phase=arrays["in_phase"],
                      opposed_phase=arrays["opposed_phase"], affine=canon_affine, region=region,
                      name=name, source=str(source), derived=tuple(derived),
                      labels={k: canon(v) for k, v in lab_checked.items()},
                      input_affine=input_affine, input_shape=tuple(ref[0].shape))

"""NIfTI readers and writers for Dixon studies: legcomp's own folders and the seed study's layouts.

A study folder holds one NIfTI file per contrast (``.nii`` or ``.nii.gz``, names matched
case-insensitively, an optional ``roi_<N>p_`` prefix as in the seed's training data ignored):

=================  ==========================================================
contrast           accepted names
=================  ==========================================================
water              water, w
fat                fat, f
in_phase           in_phase, inphase, in-phase, ip
opposed_phase      opp_phase, opposed_phase, out_phase, oppphase, outphase, op
=================  ==========================================================

Label maps found beside them are read too: ``stage1``, ``stage2``, ``legs`` (legcomp and its
phantom), ``<subject>_<REGION>_WHOLEMUSCLE_SAT_mask`` (stage 1) and
``<subject>_<REGION>_MUSCLECOMP_mask`` (stage 2) from the seed's training layout, and the
training label record :data:`legcomp.anatomy.LABEL_RECORD` (which structures the maps leave unlabelled).

The region is taken, in this order, from the ``region`` argument, from the seed's mask names,
or from the nearest enclosing folder whose name contains ``thigh`` or ``calf``
(e.g. ``SOURCE/<subject>/Thigh/Water.nii.gz`` or ``thigh_00012/``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from legcomp.errors import LegcompInputError
from legcomp.io.atomic import safe_name
from legcomp.io.study import DixonStudy, check_geometry, make_study

_NII = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$", re.IGNORECASE)
_PREFIX = re.compile(r"^roi_\d+p_", re.IGNORECASE)
CONTRAST_NAMES: dict[str, tuple[str, ...]] = {
    "water": ("water", "w"),
    "fat": ("fat", "f"),
    "in_phase": ("in_phase", "inphase", "in-phase", "ip"),
    "opposed_phase": ("opp_phase", "opposed_phase", "out_phase", "oppphase", "outphase", "op", "opposed-phase"),
}
LABEL_NAMES: dict[str, tuple[str, ...]] = {"stage1": ("stage1",), "stage2": ("stage2",), "legs": ("legs",)}
_SEED_MASKS = {"stage1": re.compile(r"_(thigh|calf)_wholemuscle_sat_mask$", re.IGNORECASE),
               "stage2": re.compile(r"_(thigh|calf)_musclecomp_mask$", re.IGNORECASE)}


def _stem(path: Path) -> str | None:
    m = _NII.match(path.name)
    return m.group("stem") if m else None


def classify_files(folder: str | Path) -> tuple[dict[str, Path], dict[str, Path], str | None]:
    """Find the contrast images and label maps in one folder.

    Returns:
        (images, labels, region_hint): contrast -> path, label kind -> path, and the region
        named by a seed-layout mask file (or None).
    Raises:
        LegcompInputError: two files claim the same contrast.
    """
    folder = Path(folder)
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    region_hint = None
    for path in sorted(folder.iterdir()):
        stem = _stem(path)
        if stem is None or not path.is_file():
            continue
        key = _PREFIX.sub("", stem).lower()
        found = None
        for contrast, names in CONTRAST_NAMES.items():
            if key in names:
                found = ("image", contrast)
        for kind, names in LABEL_NAMES.items():
            if key in names:
                found = ("label", kind)
        for kind, rx in _SEED_MASKS.items():
            m = rx.search(stem)
            if m:
                found = ("label", kind)
                region_hint = m.group(1).lower()
        if found is None:
            continue
        target = images if found[0] == "image" else labels
        if found[1] in target:
            raise LegcompInputError(f"two files for {found[1]}: {target[found[1]].name} and {path.name}", folder)
        target[found[1]] = path
    return images, labels, region_hint


def region_from_path(path: str | Path) -> str:
    """``thigh`` or ``calf`` from the nearest path component that names exactly one of them, else ``unknown``."""
    for part in reversed(Path(path).resolve().parts):
        p = part.lower()
        hits = [r for r in ("thigh", "calf") if r in p]
        if len(hits) == 1:
            return hits[0]
    return "unknown"


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one NIfTI file as (data, 4x4 affine); unreadable files raise LegcompInputError.

    Data are float64 as nibabel scales them (``get_fdata``), float32 when stored as float32.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise LegcompInputError("file not found", path) from None
    except Exception as exc:  # nibabel raises many types for truncated / corrupt files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LegcompInputError(f"cannot read NIfTI ({msg})", path) from None
    check_geometry(img.affine, img.shape, path)  # before the data are read: no MemoryError
    if img.get_data_dtype().kind not in "biuf":
        raise LegcompInputError(f"unsupported voxel type {img.get_data_dtype()} (expected a real-valued "
                                f"scalar image)", path)
    try:
        dtype = np.float32 if img.get_data_dtype() == np.float32 else np.float64
        return img.get_fdata(dtype=dtype), np.asarray(img.affine, dtype=float)
    except Exception as exc:  # nibabel raises many types for truncated / corrupt files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LegcompInputError(f"cannot read NIfTI ({msg})", path) from None


def read_nifti_study(folder: str | Path, *, region: str | None = None, name: str | None = None,
                     with_labels: bool = True) -> DixonStudy:
    """Read a folder of NIfTI contrasts (and label maps) as a canonical :class:`DixonStudy`."""
    folder = Path(folder)
    images, labels, hint = classify_files(folder)
    for req in ("water", "fat"):
        if req not in images:
            found = ", ".join(sorted(images)) or "no recognised Dixon images"
            raise LegcompInputError(f"no {req} image found (found: {found})", folder)
    raw = {k: (*load_nifti(p), p) for k, p in images.items()}
    raw_labels = {k: (*load_nifti(p), p) for k, p in labels.items()} if with_labels else {}
    reg = region or hint or region_from_path(folder)
    study = make_study(raw, region=reg, name=name or _subject_name(folder), source=str(folder), labels=raw_labels)
    from legcomp.anatomy import LABEL_RECORD

    if with_labels and (folder / LABEL_RECORD).is_file():
        study.label_record = read_label_record(folder / LABEL_RECORD, study.region)
    return study


def read_label_record(path: str | Path, region: str = "unknown") -> dict:
    """Read and check a label record (:data:`legcomp.anatomy.LABEL_RECORD`).

    JSON object; optional ``"stage1"`` / ``"stage2"`` objects each with an optional ``"unlabelled"``
    list of structure names of that stage (of ``region``; of either region when it is unknown);
    other keys (e.g. ``"source"``) are kept unchecked. Raises :class:`LegcompInputError` naming the file.
    """
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LegcompInputError(f"cannot read label record ({msg})", path) from None
    check_label_record(rec, region, path)
    return rec


def check_label_record(rec: object, region: str = "unknown", path: object = None) -> None:
    """Raise :class:`LegcompInputError` (naming ``path``) unless ``rec`` is a valid label record."""
    from legcomp import anatomy

    if not isinstance(rec, dict):
        raise LegcompInputError("label record must be a JSON object", path)
    for stage in (1, 2):
        entry = rec.get(f"stage{stage}", {})
        if not isinstance(entry, dict) or not isinstance(entry.get("unlabelled", []), list):
            raise LegcompInputError(f'label record: "stage{stage}" must be an object with an "unlabelled" list', path)
        regions = [region] if region in anatomy.REGIONS else list(anatomy.REGIONS)
        known = {lab.name for r in regions for lab in anatomy.stage_labels(stage, r)}
        bad = [n for n in entry.get("unlabelled", []) if n not in known]
        if bad:
            raise LegcompInputError(f"label record: unknown stage-{stage} structure(s) "
                                    f"{', '.join(map(repr, bad))} for region {region}", path)


def _subject_name(folder: Path) -> str:
    """Subject id: the folder name, or its parent's for the seed's ``<subject>/Thigh`` layout (made safe
    for a file name by :func:`legcomp.io.atomic.safe_name`)."""
    folder = Path(os.path.abspath(folder))
    if folder.name.lower() in ("thigh", "calf") and folder.parent.name:
        return safe_name(f"{folder.parent.name}_{folder.name.lower()}")
    return safe_name(folder.name)


def read_study(path: str | Path, *, region: str | None = None, name: str | None = None,
               with_labels: bool = True, keep_ids: bool = False) -> DixonStudy:
    """Read a Dixon study from a NIfTI folder, a single NIfTI file's folder, or a DICOM folder.

    Args:
        path: study folder (or one of its NIfTI files).
        region: ``thigh`` / ``calf`` to override what the path says.
        keep_ids: a DICOM study is named by its PatientID, over ``name`` (default: by its folder; no
            patient identifier from the headers is kept).
    Raises:
        LegcompInputError: missing or unreadable files, mismatched geometry, bad values.
    """
    path = Path(path)
    if not path.exists():
        raise LegcompInputError("no such file or folder", path)
    if path.is_file():
        if _stem(path) is None:
            raise LegcompInputError("not a NIfTI file or study folder", path)
        path = path.parent
    if region is not None:
        from legcomp.anatomy import check_region
        region = check_region(region)
    images, _, _ = classify_files(path)
    if not images:
        from legcomp.io import dicom
        if dicom.is_dicom_folder(path):
            return dicom.read_dicom_study(path, region=region, name=name, keep_ids=keep_ids)
    return read_nifti_study(path, region=region, name=name, with_labels=with_labels)


def read_label_map(path: str | Path, study: DixonStudy) -> np.ndarray:
    """Read a label map and bring it into the study's canonical orientation (uint8).

    Raises LegcompInputError when its shape or affine differ from the study's input geometry
    or its values are not non-negative integers.
    """
    data, affine = load_nifti(path)
    ref_aff = study.input_affine if study.input_affine is not None else study.affine
    ref_shape = study.input_shape or study.shape
    probe = make_study({"water": (np.ones(ref_shape, np.float32), ref_aff, "study"),
                        "fat": (np.ones(ref_shape, np.float32), ref_aff, "study")},
                       labels={"x": (data, affine, path)})
    return probe.labels["x"]


def find_studies(root: str | Path) -> list[Path]:
    """All study folders under ``root`` (``root`` itself if it is one), sorted.

    A folder is a study when it holds recognised water and fat NIfTI files, or is the top-most folder
    of one DICOM acquisition: it holds DICOM files with both water and fat (a flat export, whatever
    its sub-folders), or it holds no DICOM file itself and its sub-folders are series folders (each
    without water and fat together: ``water/``, ``fat/``, a localiser, ...). A DICOM folder that
    fits neither (e.g. one without any Dixon series) is listed too and fails with its reason when read.
    """
    root = Path(root)
    if not root.is_dir():
        return [root] if root.exists() else []
    out: list[Path] = []
    if _visit(root, out) is not None:  # DICOM series that no sub-folder claims: the root is the study
        out.append(root)
    return sorted(out)


def _visit(folder: Path, out: list[Path]) -> tuple[list[Path], frozenset[str]] | None:
    """Append the studies at or below ``folder`` to ``out``. Returns the DICOM series folders below it
    that no study claimed, with their Dixon contrasts (None when there are none); a folder claims its
    series as one study when they hold water and fat together."""
    from legcomp.io import dicom

    try:
        images, _, _ = classify_files(folder)
    except LegcompInputError:
        out.append(folder)  # reported when read
        return None
    if "water" in images or "fat" in images:
        out.append(folder)
        return None
    own = dicom.folder_contrasts(folder)
    n_before = len(out)
    folders: list[Path] = [folder] if own is not None else []
    contrasts = set(own or ())
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _visit(sub, out)
        if found is not None:
            folders += found[0]
            contrasts |= found[1]
    if not folders:
        return None
    if {"water", "fat"} <= contrasts and len(out) == n_before:
        out.append(folder)  # one acquisition: a flat export, or one sub-folder per series
        return None
    if len(out) > n_before:  # studies below: a stray series folder beside them is its own (failing) study
        out.extend(folders)
        return None
    return [folder], frozenset(contrasts)


def write_study(study: DixonStudy, folder: str | Path, *, with_labels: bool = True) -> Path:
    """Write the four contrasts (and label maps, and a non-empty label record) as NIfTI in the study's
    input geometry."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for c in ("water", "fat", "in_phase", "opposed_phase"):
        study.save_like_input(study.image(c), folder / f"{c}.nii.gz", dtype=np.float32)
    if with_labels:
        for k, v in study.labels.items():
            study.save_like_input(v, folder / f"{k}.nii.gz", dtype=np.uint8)
        if study.label_record:
            from legcomp.anatomy import LABEL_RECORD

            (folder / LABEL_RECORD).write_text(json.dumps(study.label_record, indent=1) + "\n")
    return folder

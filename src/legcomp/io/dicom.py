"""Read one two-point Dixon acquisition from a DICOM folder into a :class:`DixonStudy`.

The folder is searched recursively. Headers are scanned first (without pixel data); every image
(a classic single-frame file, or one frame of an enhanced multi-frame file) is classified as one
Dixon contrast or ignored; images are grouped by (SeriesInstanceUID, contrast, echo); each
group is stacked into a volume with its geometry taken from ImagePositionPatient /
ImageOrientationPatient / PixelSpacing (never from SliceThickness).

Classification of one image (rules in order; tokens compared whole, upper-cased):

=====================  ========================================================================
rule                   tokens
=====================  ========================================================================
1. exclusion           ImageType: LOCALIZER, FF, FAT_FRACTION, PDFF, FP, WP, T2_STAR, R2_STAR,
   (image ignored)     B0, P, PHASE, R, REAL, I, IMAGINARY, MPR, MIP. SeriesDescription words:
                       LOCALIZER, LOCALISER, SCOUT, SURVEY, FF, FRACTION, PDFF, T2STAR, R2STAR,
                       MIP, MPR, SAT, FS.
2. image type values   water W, WATER; fat F, FAT; in_phase IP, IN_PHASE, INPHASE, IN;
                       opposed_phase OP, OPP, OUT_PHASE, OPP_PHASE, OPPOSED_PHASE,
                       OUT_OF_PHASE, OUTPHASE, OUT. Values come from ImageType (enhanced
                       MR: per-frame FrameType and Philips legacy (2005,140F) ImageType instead),
                       plus Philips private (2005,xx11) of "Philips MR Imaging DD 001".
                       E.g. Siemens DERIVED\\PRIMARY\\DIXON\\WATER, Philips DERIVED\\PRIMARY\\W\\W.
3. description words   SeriesDescription split at non-alphanumerics, after joining "in phase",
                       "out (of) phase", "opp(osed) phase" into INPHASE / OUTPHASE.
                       Strong (always accepted): WATER, FAT, INPHASE, OUTPHASE, OPPOSED.
                       Weak (only with a Dixon hint DIXON / IDEAL / FLEX in ImageType,
                       SeriesDescription or ProtocolName): W, F, IN, IP, OPP, OP, OUT.
=====================  ========================================================================

Rules 2 and 3 must name exactly one contrast, else the image is ignored. Covered spellings:
Siemens ``t1_vibe_dixon_tra_W`` / ``_F`` / ``_in`` / ``_opp``; Philips ``mDIXON W``,
``WATER``, ``InPhase``, ``OutPhase``; GE ``WATER: Ax LAVA-Flex``, ``FAT: ...``, ``InPhase``,
``OutPhase``, ``... IDEAL``. Localisers and plain magnitude series are thus ignored.

Geometry: images are sorted by their position projected on the slice normal (row x column
direction cosines); the slice step is the mean IPP difference and must be uniform (within
2 % or 0.01 mm); PixelSpacing is (between rows, between columns). The LPS affine is turned
into RAS (x, y negated); voxel (i, j, k) = (column, row, slice), i.e. ``pixel_array.T``.

Region (``thigh``/``calf``, else ``"unknown"``): the ``region`` argument, else the first of
BodyPartExamined, series/protocol/study descriptions, the folder's last three path parts
that names exactly one region: thigh = THIGH, UPPER LEG, FEMUR, FEMORAL, OBERSCHENKEL;
calf = CALF, CALVES, LOWER LEG, TIBIA, FIBULA, UNTERSCHENKEL. A bare ``LEG`` decides nothing
(the DICOM defined term LEG means the lower leg, but scanners use it for either).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from legcomp.errors import LegcompInputError
from legcomp.io.atomic import safe_name
from legcomp.io.study import DixonStudy, check_geometry, make_study

__all__ = ["read_dicom_study", "is_dicom_folder", "classify_dixon", "folder_contrasts", "file_contrasts"]

_TYPE_TOKENS: dict[str, frozenset[str]] = {
    "water": frozenset({"W", "WATER"}),
    "fat": frozenset({"F", "FAT"}),
    "in_phase": frozenset({"IP", "IN_PHASE", "INPHASE", "IN"}),
    "opposed_phase": frozenset({"OP", "OPP", "OUT_PHASE", "OPP_PHASE", "OPPOSED_PHASE", "OUT_OF_PHASE",
                                "OUTPHASE", "OUT"}),
}
_DESC_STRONG = {"water": {"WATER"}, "fat": {"FAT"}, "in_phase": {"INPHASE"}, "opposed_phase": {"OUTPHASE", "OPPOSED"}}
_DESC_WEAK = {"water": {"W"}, "fat": {"F"}, "in_phase": {"IN", "IP"}, "opposed_phase": {"OPP", "OP", "OUT"}}
_TYPE_EXCLUDE = frozenset({"LOCALIZER", "FF", "FAT_FRACTION", "PDFF", "FP", "WP", "T2_STAR", "R2_STAR", "B0", "P",
                           "PHASE", "R", "REAL", "I", "IMAGINARY", "MPR", "MIP"})
_DESC_EXCLUDE = frozenset({"LOCALIZER", "LOCALISER", "SCOUT", "SURVEY", "FF", "FRACTION", "PDFF", "T2STAR", "R2STAR",
                           "MIP", "MPR", "SAT", "FS"})
_DIXON_HINT = re.compile(r"DIXON|IDEAL|FLEX")
_REGION_WORDS = {
    "thigh": re.compile(r"(?<![A-Z])(THIGHS?|UPPER ?LEGS?|FEMUR|FEMORAL|OBERSCHENKEL)(?![A-Z])"),
    "calf": re.compile(r"(?<![A-Z])(CALF|CALVES|LOWER ?LEGS?|TIBIA|FIBULA|UNTERSCHENKEL)(?![A-Z])"),
}
_PHILIPS_CREATOR = "Philips MR Imaging DD 001"
_PHILIPS_LEGACY_FRAME = (0x2005, 0x140F)


@dataclass
class _Image:
    """One 2D image: a classic file or one frame of a multi-frame file (geometry in LPS mm)."""

    path: Path
    frame: int | None
    series_uid: str
    series: str  # "#<SeriesNumber> '<SeriesDescription>'" for messages
    contrast: str
    echo: str
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    size: tuple[int, int]  # (Rows, Columns)
    slope: float
    intercept: float


def _values(v: object) -> list[str]:
    if v is None:
        return []
    if isinstance(v, bytes):
        v = v.decode("latin-1")
    if isinstance(v, str):
        return [s.strip().upper() for s in v.split("\\") if s.strip()]
    try:
        return [str(s).strip().upper() for s in v if str(s).strip()]  # type: ignore[union-attr]
    except TypeError:
        return [str(v).strip().upper()]


def _words(text: str) -> list[str]:
    t = re.sub(r"IN[\s_\-]*PHASE", " INPHASE ", text.upper())
    t = re.sub(r"(OUT|OPP(OSED)?)[\s_\-]*(OF[\s_\-]*)?PHASE", " OUTPHASE ", t)
    return [w for w in re.split(r"[^A-Z0-9]+", t) if w]


def classify_dixon(image_type: list[str], description: str, protocol: str = "") -> str | None:
    """Dixon contrast of one image from its ImageType tokens and descriptions (see module table), or None."""
    types = {t.strip().upper() for t in image_type}
    words = set(_words(description))
    if types & _TYPE_EXCLUDE or words & _DESC_EXCLUDE:
        return None
    hits = {c for c, toks in _TYPE_TOKENS.items() if types & toks}
    if len(hits) == 1:
        return hits.pop()
    if hits:
        return None
    strong = {c for c, toks in _DESC_STRONG.items() if words & toks}
    weak = {c for c, toks in _DESC_WEAK.items() if words & toks}
    if len(strong | weak) != 1:
        return None
    hint = _DIXON_HINT.search(" ".join([*types, description.upper(), protocol.upper()]))
    return (strong | weak).pop() if strong or hint else None


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _read_header(path: Path) -> Dataset | None:
    """Header of a DICOM file (pixel data deferred); None for a non-DICOM file; error for a broken one.

    pydicom stops silently at the end of a truncated file, so an image whose header lacks the
    SOP class or the pixel data element is reported as truncated.
    """
    preamble = _has_preamble(path)
    try:  # defer_size: walk every element header but skip over the (large) pixel values
        ds = pydicom.dcmread(path, defer_size=1024, force=not preamble)
    except Exception as e:  # noqa: BLE001 - any parse failure
        if not preamble:
            return None
        raise LegcompInputError(f"unreadable DICOM file ({type(e).__name__}: {e})", path) from None
    if not preamble and not ("SOPClassUID" in ds and "Rows" in ds):
        return None  # files without preamble: accept only what looks like an image
    meta_sop = pydicom.uid.UID(str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or ""))
    sop = pydicom.uid.UID(str(ds.get("SOPClassUID", "") or meta_sop))
    if "SOPClassUID" not in ds:  # fine only for a known non-image object (e.g. a directory record)
        if meta_sop.name == str(meta_sop) or "Image" in meta_sop.name:
            raise LegcompInputError("truncated or unreadable DICOM file (no SOP Class UID)", path)
        return ds
    is_image = "Rows" in ds or "Image" in sop.name or "Image" in meta_sop.name  # the file meta says so too
    if is_image and not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise LegcompInputError("truncated DICOM image (no pixel data element)", path)
    return ds


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")


def folder_contrasts(folder: str | Path) -> frozenset[str] | None:
    """Dixon contrasts among the DICOM files directly in ``folder`` (not its sub-folders), from headers only;
    None when it holds no DICOM file. A broken DICOM file counts as DICOM without a contrast (it is
    reported when the study is read)."""
    found: set[str] | None = None
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name == "DICOMDIR":
            continue
        try:
            ds = _read_header(p)
        except LegcompInputError:
            found = found if found is not None else set()
            continue
        if ds is not None:
            found = (found if found is not None else set()) | file_contrasts(ds)
    return frozenset(found) if found is not None else None


def is_dicom_folder(folder: str | Path) -> bool:
    """True if ``folder`` (searched recursively) holds a file with the DICM preamble or readable by pydicom."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = _files(folder)
    if any(_has_preamble(p) for p in files):
        return True
    return any(_read_header(p) is not None for p in files[:50])


def _philips_image_type(ds: Dataset) -> list[str]:
    """Philips private "image type MR" (2005,xx11) of the "Philips MR Imaging DD 001" block: W, F, IP, OP, M, ..."""
    try:
        return _values(ds.private_block(0x2005, _PHILIPS_CREATOR)[0x11].value)
    except (KeyError, ValueError):
        return []


def _item(seq_owner: Dataset | None, seq: str) -> Dataset | None:
    if seq_owner is None or seq not in seq_owner or not len(seq_owner[seq].value):
        return None
    return seq_owner[seq].value[0]


def _frames(ds: Dataset) -> list[tuple[int, Dataset | None, Dataset | None]]:
    """(frame index, per-frame item, shared item) of each image of a file (one for a classic file)."""
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_seq = ds.PerFrameFunctionalGroupsSequence if "PerFrameFunctionalGroupsSequence" in ds else None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    return [(f, per_seq[f] if per_seq is not None else None, shared) for f in range(n_frames)]


def _frame_get(ds: Dataset, per: Dataset | None, shared: Dataset | None, seq: str, attr: str,
               default: object = None) -> object:
    """An attribute of one frame: from its per-frame, then the shared functional group, then the file."""
    for owner in (per, shared):
        it = _item(owner, seq)
        if it is not None and attr in it:
            return it.get(attr)
    return ds.get(attr, default)


def _frame_contrast(ds: Dataset, per: Dataset | None, shared: Dataset | None) -> str | None:
    """Dixon contrast of one frame (see the module table), or None."""
    frame_types = _values(_frame_get(ds, per, shared, "MRImageFrameTypeSequence", "FrameType")
                          if per is not None else None)
    legacy = per.get(_PHILIPS_LEGACY_FRAME) if per is not None else None
    if legacy is not None and legacy.VR == "SQ" and len(legacy.value):
        frame_types += _values(legacy.value[0].get("ImageType"))
    types = (frame_types or _values(ds.get("ImageType"))) + _philips_image_type(ds)
    return classify_dixon(types, str(ds.get("SeriesDescription", "") or ""), str(ds.get("ProtocolName", "") or ""))


def file_contrasts(ds: Dataset) -> set[str]:
    """The Dixon contrasts among one file's images (header only; no geometry checked)."""
    if "Rows" not in ds or "Columns" not in ds:
        return set()
    return {c for _, per, shared in _frames(ds) if (c := _frame_contrast(ds, per, shared)) is not None}


def _images(path: Path, ds: Dataset) -> list[_Image]:
    """The Dixon images of one file (classified, with geometry); other images are left out."""
    if "Rows" not in ds or "Columns" not in ds:
        return []
    uid = str(ds.get("SeriesInstanceUID", "")) or f"nouid:{path.parent}"
    desc = str(ds.get("SeriesDescription", "") or "")
    series = f"#{ds.get('SeriesNumber', '?')} '{desc}'"
    size = (int(ds.Rows), int(ds.Columns))
    frames = _frames(ds)
    n_frames = len(frames)
    out = []
    for f, per, shared in frames:

        def get(seq: str, attr: str, default: object = None) -> object:
            return _frame_get(ds, per, shared, seq, attr, default)

        contrast = _frame_contrast(ds, per, shared)
        if contrast is None:
            continue
        ipp, iop = get("PlanePositionSequence", "ImagePositionPatient"), get("PlaneOrientationSequence",
                                                                            "ImageOrientationPatient")
        ps = get("PixelMeasuresSequence", "PixelSpacing")
        if ipp is None or iop is None or ps is None or len(ipp) != 3 or len(iop) != 6:  # type: ignore[arg-type]
            raise LegcompInputError(f"{contrast} image without valid ImagePositionPatient / "
                                    f"ImageOrientationPatient / PixelSpacing", path)
        echo = get("MREchoSequence", "EffectiveEchoTime", None) if per is not None else ds.get("EchoNumbers")
        slope = get("PixelValueTransformationSequence", "RescaleSlope", 1.0)
        intercept = get("PixelValueTransformationSequence", "RescaleIntercept", 0.0)
        out.append(_Image(
            path=path, frame=f if n_frames > 1 else None, series_uid=uid, series=series,
            contrast=contrast, echo=str(echo if echo is not None else ""),
            ipp=np.asarray(ipp, dtype=float), iop=np.asarray(iop, dtype=float),
            pixel_spacing=(float(ps[0]), float(ps[1])), size=size,  # type: ignore[index]
            slope=float(slope or 1.0), intercept=float(intercept or 0.0)))  # type: ignore[arg-type]
    return out


def _geometry(images: list[_Image], where: str) -> tuple[list[_Image], np.ndarray]:
    """Sort one series' images along the slice normal and return them with the RAS affine.

    The affine maps voxel (i = column, j = row, k = sorted slice) to RAS+ world mm.
    """
    ref = images[0]
    for im in images[1:]:
        if not np.allclose(im.iop, ref.iop, atol=1e-4) or im.size != ref.size or \
                not np.allclose(im.pixel_spacing, ref.pixel_spacing, atol=1e-4):
            raise LegcompInputError(f"series {ref.series} mixes image orientations, sizes or pixel spacings", where)
    row_dir, col_dir = ref.iop[:3], ref.iop[3:]  # along a row (increasing column), along a column (increasing row)
    if not (np.isfinite(ref.iop).all() and np.isfinite(ref.ipp).all() and np.isfinite(ref.pixel_spacing).all()):
        raise LegcompInputError(f"series {ref.series}: non-finite ImagePositionPatient, ImageOrientationPatient "
                                f"or PixelSpacing", where)
    if abs(np.linalg.norm(row_dir) - 1) > 0.01 or abs(np.linalg.norm(col_dir) - 1) > 0.01 or \
            abs(float(row_dir @ col_dir)) > 0.01:
        iop = "\\".join(f"{v:.4g}" for v in ref.iop)
        raise LegcompInputError(f"series {ref.series}: ImageOrientationPatient {iop} is not two orthogonal unit "
                                f"vectors", where)
    if min(ref.pixel_spacing) <= 0:
        raise LegcompInputError(f"series {ref.series}: PixelSpacing {list(ref.pixel_spacing)} is not positive", where)
    normal = np.cross(row_dir, col_dir)
    images = sorted(images, key=lambda im: float(im.ipp @ normal))
    pos = np.array([im.ipp @ normal for im in images])
    if len(images) < 2:
        raise LegcompInputError(f"series {ref.series} has a single slice; a 3D volume is needed", where)
    gaps = np.diff(pos)
    step = (images[-1].ipp - images[0].ipp) / (len(images) - 1)  # mean slice step vector (LPS mm)
    tol = max(0.01, 0.02 * float(np.linalg.norm(step)))
    if gaps.min() < tol:
        raise LegcompInputError(f"series {ref.series}: several images share one slice position "
                                f"(echoes, phases or repeats in one series?)", where)
    drift = max(float(np.linalg.norm(im.ipp - (images[0].ipp + k * step))) for k, im in enumerate(images))
    if drift > tol:
        raise LegcompInputError(f"series {ref.series}: uneven slice positions (gaps {gaps.min():.3g}-"
                                f"{gaps.max():.3g} mm, off a uniform grid by up to {drift:.3g} mm)", where)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ref.pixel_spacing[1]
    lps[:3, 1] = col_dir * ref.pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = images[0].ipp
    return images, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _load(images: list[_Image], cache: dict[Path, np.ndarray]) -> np.ndarray:
    """Pixel data of sorted images, rescaled, as float32 (x = column, y = row, z = slice)."""
    vol = np.empty((images[0].size[1], images[0].size[0], len(images)), dtype=np.float32)
    for k, im in enumerate(images):
        if im.path in cache:
            px = cache[im.path]
        else:
            try:
                px = np.asarray(pydicom.dcmread(im.path, force=True).pixel_array)
            except Exception as e:  # noqa: BLE001 - truncated data, missing codec, ...
                msg = str(e).splitlines()[0] if str(e) else ""
                raise LegcompInputError(f"cannot read pixel data, file truncated or unsupported "
                                        f"({type(e).__name__}: {msg})", im.path) from None
            if im.frame is not None:  # multi-frame files hold several images: keep them
                cache[im.path] = px
        px = px if im.frame is None else px[im.frame]
        if px.shape != im.size:
            raise LegcompInputError(f"pixel data shape {px.shape} differs from Rows x Columns {im.size}", im.path)
        vol[:, :, k] = px.T.astype(np.float32) * im.slope + im.intercept
    return vol


def _guess_region(headers: list[Dataset], folder: Path) -> str:
    sources = [[str(h.get("BodyPartExamined", "") or "") for h in headers],
               [str(h.get(k, "") or "") for h in headers for k in ("SeriesDescription", "ProtocolName",
                                                                  "StudyDescription")],
               list(folder.resolve().parts[-3:])]
    for texts in sources:
        text = re.sub(r"[^A-Z0-9]+", " ", " ".join(texts).upper())
        found = {r for r, pat in _REGION_WORDS.items() if pat.search(text)}
        if len(found) == 1:
            return found.pop()
    return "unknown"


def _check_one_study(headers: list[Dataset], where: Path) -> None:
    """Raise unless the Dixon series come from one study (StudyInstanceUID, where the files record it)."""
    uids = {str(h.get("StudyInstanceUID", "") or "") for h in headers} - {""}
    if len(uids) > 1:
        raise LegcompInputError(f"the Dixon series come from {len(uids)} different studies (StudyInstanceUID); "
                                f"keep one acquisition per folder", where)


def read_dicom_study(folder: str | Path, *, region: str | None = None, name: str | None = None,
                     keep_ids: bool = False) -> DixonStudy:
    """Read the Dixon acquisition in a DICOM folder (searched recursively) as a canonical study.

    Water and fat are required; in-phase and opposed-phase are read when present (else
    derived by :func:`make_study`). Arrays are float32 (x, y, z) RAS+, rescaled with
    RescaleSlope/Intercept; the affine is in mm.

    Args:
        folder: folder holding one Dixon acquisition; other series (localisers, ...) are ignored.
        region: ``thigh``/``calf``; default guessed from the headers and folder name, else ``unknown``.
        name: study name; default the folder name.
        keep_ids: name the study by its PatientID (over ``name``, where the files have one); without it
            no patient name, ID or birth date from the headers reaches the study. Names are made safe
            for a file name (:func:`legcomp.io.atomic.safe_name`).
    Raises:
        LegcompInputError: no DICOM, no Dixon series, two series for one contrast, water or fat
            missing, an unreadable/truncated file, uneven slices or inconsistent geometry.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LegcompInputError("not a folder", folder)
    headers: list[tuple[Path, Dataset]] = []
    for p in _files(folder):
        ds = _read_header(p)
        if ds is not None:
            headers.append((p, ds))
    if not headers:
        raise LegcompInputError("no DICOM files found", folder)
    groups: dict[tuple[str, str, str], list[_Image]] = defaultdict(list)
    first_header: dict[tuple[str, str, str], Dataset] = {}
    for p, ds in headers:
        for im in _images(p, ds):
            key = (str(im.contrast), im.series_uid, im.echo)
            groups[key].append(im)
            first_header.setdefault(key, ds)
    if not groups:
        seen = sorted({f"#{ds.get('SeriesNumber', '?')} '{ds.get('SeriesDescription', '')}'" for _, ds in headers})
        raise LegcompInputError(f"no Dixon water/fat series among {len(seen)} series ({', '.join(seen[:6])})", folder)
    by_contrast: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for key in sorted(groups, key=lambda k: (groups[k][0].series, k)):
        by_contrast[key[0]].append(key)
    for contrast, keys in by_contrast.items():
        if len(keys) > 1:
            desc = ", ".join(f"{groups[k][0].series}" + (f" echo {k[2]}" if k[2] else "") for k in keys)
            raise LegcompInputError(f"{len(keys)} candidate series for {contrast}: {desc}; "
                                    f"keep one Dixon acquisition per folder", folder)
    for req in ("water", "fat"):
        if req not in by_contrast:
            found = ", ".join(f"{c} {groups[k[0]][0].series}" for c, k in by_contrast.items())
            raise LegcompInputError(f"no {req} series found (found {found})", folder)
    dixon_headers = [first_header[k] for keys in by_contrast.values() for k in keys]
    _check_one_study(dixon_headers, folder)
    cache: dict[Path, np.ndarray] = {}
    images = {}
    for contrast, (key,) in by_contrast.items():
        stack, affine = _geometry(groups[key], str(folder))
        check_geometry(affine, (stack[0].size[1], stack[0].size[0], len(stack)),
                       f"{folder} series {stack[0].series}")
        images[contrast] = (_load(stack, cache), affine, f"{folder} series {stack[0].series}")
    if region is None:
        region = _guess_region(dixon_headers, folder)
    patient = str(first_header[by_contrast["water"][0]].get("PatientID", "") or "").strip() if keep_ids else ""
    name = safe_name(patient or name or folder.resolve().name)
    return make_study(images, region=region, name=name, source=str(folder))


PATIENT_IDENTIFIERS_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate")
"""Patient identifiers a DICOM object must hold but may leave empty (Type 2): emptied by :func:`strip_patient_ids`."""
PATIENT_IDENTIFIERS_OTHER = ("OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName",
                             "PatientMotherBirthName", "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers",
                             "IssuerOfPatientID", "MedicalRecordLocator")
"""Further patient identifiers: removed by :func:`strip_patient_ids`."""


def strip_patient_ids(path: str | Path) -> Path:
    """Rewrite a DICOM file that legcomp made without the patient's name, IDs or birth date (emptied where
    the standard requires the attribute, removed elsewhere), e.g. a segmentation copied from its source."""
    path = Path(path)
    ds = pydicom.dcmread(path)
    for key in PATIENT_IDENTIFIERS_TYPE2:
        if key in ds:
            setattr(ds, key, "")
    for key in PATIENT_IDENTIFIERS_OTHER:
        if key in ds:
            delattr(ds, key)
    ds.save_as(path)
    return path

"""``segmentation.dcm``: the segmentation as a DICOM Segmentation object, made with highdicom.

For a study read from DICOM, one BINARY Segmentation instance references the source water series
(one frame per source slice that holds a structure) with one segment per structure: stage 1
(subcutaneous adipose tissue, whole muscle) and stage 2 (the region's muscles), each with its
full name (segment label), machine name (tracking id), colour (from :mod:`legcomp.anatomy`) and
codes. Segments overlap (each muscle lies inside the whole muscle), as BINARY segments may.

Codes (SNOMED CT, from pydicom's DICOM code dictionary): SAT is Tissue / Fat (55603005) in the
Subcutaneous tissue (71966008); whole muscle is Tissue / Skeletal muscle (127954009); each muscle is
Anatomical Structure / Muscle of lower limb (102292000), named by its segment label, since the
DICOM code dictionary holds no codes for single thigh or calf muscles. The anatomic region is
Thigh (68367000) or Lower leg (30021000).

Only classic single-frame source images are referenced; for an enhanced multi-frame source the
object is not written (:class:`DicomSegSkipped` says why).

Arrays are canonical (x, y, z) RAS+; a frame is an input slice (rows, columns) of the source series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from legcomp import __version__, anatomy

SERIES_NUMBER = 9801
"""SeriesNumber of the Segmentation series."""


class DicomSegSkipped(Exception):
    """The study cannot be written as a DICOM Segmentation (not DICOM, unsupported source...); the message says why."""


def available() -> bool:
    """True when highdicom can be imported."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return False
    return True


def water_series(folder: str | Path) -> list[Dataset]:
    """The source water images of a DICOM study folder (searched recursively), sorted along the slice
    normal as :func:`legcomp.io.dicom.read_dicom_study` stacks them (pixel data not loaded).

    Raises:
        DicomSegSkipped: no DICOM water series, several, or an enhanced multi-frame one.
    """
    from legcomp.io.dicom import file_contrasts

    found: dict[str, list[tuple[Path, Dataset]]] = {}
    for p in sorted(q for q in Path(folder).rglob("*") if q.is_file() and not q.name.startswith(".")):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: not a source image
            continue
        if "water" in file_contrasts(ds):
            found.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((p, ds))
    if len(found) != 1:
        raise DicomSegSkipped(f"{len(found)} DICOM water series found in {folder}; one is needed")
    images = next(iter(found.values()))
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in images):
        raise DicomSegSkipped("the water series is an enhanced multi-frame object; only classic single-frame "
                              "source images are referenced")
    iop = np.asarray(images[0][1].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    images.sort(key=lambda item: float(np.asarray(item[1].ImagePositionPatient, float) @ normal))
    return [pydicom.dcmread(p) for p, _ in images]


def segments(stage1: np.ndarray, stage2: np.ndarray | None, region: str) -> list[tuple[anatomy.Label, np.ndarray]]:
    """(label, mask) of every non-empty structure: SAT, whole muscle, then the region's muscles."""
    out = [(lab, np.asarray(stage1) == lab.id) for lab in anatomy.STAGE1]
    if stage2 is not None:
        out += [(lab, np.asarray(stage2) == lab.id) for lab in anatomy.MUSCLES[region]]
    return [(lab, m) for lab, m in out if m.any()]


def segment_description(number: int, label: anatomy.Label, region: str):
    """highdicom SegmentDescription of one structure (codes: see the module docstring)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if label.id == anatomy.SAT.id and label.stage == 1:
        category, kind, structures = codes.SCT.Tissue, codes.SCT.AdiposeTissue, [codes.SCT.SubcutaneousTissue]
    elif label.stage == 1:
        category, kind, structures = codes.SCT.Tissue, codes.SCT.SkeletalMuscle, None
    else:
        category, kind, structures = codes.SCT.AnatomicalStructure, codes.SCT.MuscleOfLowerLimb, None
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label.display[:64], segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="legcomp", version=__version__, family=codes.cid7162.ArtificialIntelligence),
        tracking_uid=hd.UID(), tracking_id=label.name,
        anatomic_regions=[codes.SCT.Thigh if region == "thigh" else codes.SCT.LowerLeg],
        primary_anatomic_structures=structures,
        display_color=hd.color.CIELabColor.from_rgb(*label.color))


def frames(study, mask: np.ndarray) -> np.ndarray:
    """A canonical (x, y, z) mask as source frames (slice, rows, columns) in the input's slice order."""
    m = study.to_input_orientation(np.asarray(mask))
    return np.ascontiguousarray(np.transpose(m, (2, 1, 0)))


def write_dicom_seg(study, stage1: np.ndarray, stage2: np.ndarray | None, region: str, path: str | Path,
                    source: str | Path | None = None) -> Path:
    """Write ``path`` (``segmentation.dcm``) for a study read from a DICOM folder.

    Args:
        study: the :class:`legcomp.io.DixonStudy` (its input geometry maps masks to source frames).
        stage1, stage2: label maps (x, y, z) on the study's grid.
        region: ``thigh`` or ``calf``.
        source: the DICOM folder (default ``study.source``).
    Raises:
        DicomSegSkipped: not a DICOM study, source frames that do not match the study's grid, no structure.
    """
    import highdicom as hd

    images = water_series(source or study.source)
    shape_in = tuple(study.input_shape or study.shape)
    rows, cols = int(images[0].Rows), int(images[0].Columns)
    if (cols, rows, len(images)) != shape_in:
        raise DicomSegSkipped(f"source water series ({cols} x {rows} x {len(images)}) does not match the study's "
                              f"grid {shape_in}")
    segs = segments(stage1, stage2, region)
    if not segs:
        raise DicomSegSkipped("no structure to write")
    pixels = np.stack([frames(study, m) for _, m in segs], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(i, lab, region) for i, (lab, _) in enumerate(segs, start=1)],
        series_instance_uid=hd.UID(), series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="legcomp", manufacturer_model_name=f"legcomp {region} cascade", software_versions=__version__,
        device_serial_number="0", series_description=f"legcomp {region} segmentation",
        content_label="LEGCOMP", content_description=f"legcomp {region} muscle and fat segmentation")
    path = Path(path)
    seg.save_as(path)
    return path


def read_dicom_seg(path: str | Path, study, source: str | Path | None = None) -> dict[str, np.ndarray]:
    """Read a Segmentation written by :func:`write_dicom_seg` back: tracking id (structure name) -> canonical
    boolean mask (x, y, z) on the study's grid."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    uids = [str(ds.SOPInstanceUID) for ds in water_series(source or study.source)]
    numbers = list(seg.get_segment_numbers())
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers,
                                           assert_missing_frames_are_empty=True)
    out = {}
    for k, number in enumerate(numbers):
        arr_in = np.transpose(px[..., k] > 0, (2, 1, 0))  # input (column, row, slice)
        name = str(seg.get_segment_description(number).tracking_id)
        out[name] = _to_canonical(study, arr_in)
    return out


def _to_canonical(study, array_in: np.ndarray) -> np.ndarray:
    """An array in the input's voxel order back to canonical (x, y, z) (inverse of ``to_input_orientation``)."""
    import nibabel as nib

    if study.input_affine is None:
        return array_in
    src, dst = nib.io_orientation(study.input_affine), nib.io_orientation(study.affine)
    return np.asarray(nib.orientations.apply_orientation(array_in, nib.orientations.ornt_transform(src, dst)))

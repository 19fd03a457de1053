"""DICOM Dixon reader: vendor spellings, oblique geometry (LPS -> RAS), shuffled files, bad input."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage,
                         SecondaryCaptureImageStorage, generate_uid)

with warnings.catch_warnings():  # "DICOM readers are highly experimental": used here only for the affine
    warnings.simplefilter("ignore")
    from nibabel.nicom.dicomwrappers import wrapper_from_file

from legcomp.errors import LegcompInputError
from legcomp.io.dicom import classify_dixon, is_dicom_folder, read_dicom_study

NX, NY, NZ = 24, 20, 6  # columns, rows, slices
ROW_SP, COL_SP, SLICE_GAP = 0.8, 0.9, 5.0  # PixelSpacing = [between rows, between columns]


def _rot(ax: float, az: float) -> np.ndarray:
    a, b = np.deg2rad(ax), np.deg2rad(az)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


# oblique: an axial stack tilted 17 deg about x and 25 deg about z; the slice list runs against the normal
ROT = _rot(17.0, 25.0)
IOP = np.concatenate([ROT[:, 0], ROT[:, 1]])
ORIGIN = np.array([-60.0, -45.5, 120.0])
STEP = -SLICE_GAP * ROT[:, 2]


def _positions(n=NZ, gaps=None):
    gaps = [SLICE_GAP] * (n - 1) if gaps is None else gaps
    offs = np.concatenate([[0.0], np.cumsum(gaps)]) / SLICE_GAP
    return [ORIGIN + o * STEP for o in offs]


def _write_series(folder, desc, image_type, data, *, uid=None, number=1, positions=None, iop=IOP,
                  pixel_spacing=(ROW_SP, COL_SP), extra=None, echo=None, no_preamble=False, seed=0):
    """Write data (x=column, y=row, z=slice) as one classic MR series, files in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    positions = _positions(data.shape[2]) if positions is None else positions
    order = list(range(data.shape[2]))
    random.Random(seed).shuffle(order)
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=None if no_preamble else b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "MR", "P042", uid
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = number, desc, k + 1
        ds.ImageType = list(image_type)
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in iop]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = 3.0  # deliberately not the slice spacing
        if echo is not None:
            ds.EchoNumbers = echo
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        for key, value in (extra or {}).items():
            if isinstance(key, tuple):
                ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True).add_new(key[1], "CS", value)
            else:
                setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T.astype(np.uint16)).tobytes()
        ds.save_as(folder / f"IM{number:02d}_{ds.SOPInstanceUID[-10:]}", enforce_file_format=not no_preamble)
    return uid


def _data(seed):
    return np.random.default_rng(seed).integers(1, 4000, size=(NX, NY, NZ)).astype(np.uint16)


def _expected_ras_affine(positions, iop=IOP, ps=(ROW_SP, COL_SP)):
    """Voxel (column, row, slice sorted along the normal) -> RAS mm, from IPP/IOP directly."""
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row, col)
    pos = sorted(positions, key=lambda p: float(np.dot(p, normal)))
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * ps[1], col * ps[0]
    lps[:3, 2], lps[:3, 3] = (pos[-1] - pos[0]) / (len(pos) - 1), pos[0]
    return np.diag([-1, -1, 1, 1]) @ lps


def _add_distractors(folder):
    loc = _data(99)[:, :, :3]
    _write_series(folder / "loc", "localizer", ["ORIGINAL", "PRIMARY", "LOCALIZER"], loc, number=1,
                  iop=[0, 1, 0, 0, 0, -1], positions=[np.array([x, -100.0, 100.0]) for x in (-10, 0, 10)])
    _write_series(folder / "tse", "t1_tse_tra", ["ORIGINAL", "PRIMARY", "M", "ND"], _data(98), number=2)
    (folder / "README.txt").write_text("not dicom\n")
    meta = FileMetaDataset()  # a screen capture without any geometry
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sc = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    sc.SOPClassUID, sc.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    sc.SeriesInstanceUID = generate_uid()
    sc.SeriesDescription, sc.Rows, sc.Columns = "screen save", 4, 4
    sc.SamplesPerPixel, sc.PhotometricInterpretation = 1, "MONOCHROME2"
    sc.BitsAllocated, sc.BitsStored, sc.HighBit, sc.PixelRepresentation = 8, 8, 7, 0
    sc.PixelData = bytes(16)
    sc.save_as(folder / "sc.dcm", enforce_file_format=True)


VENDORS = {
    "siemens": dict(folder="P042_thigh", region="thigh", series=[
        ("water", "t1_vibe_dixon_tra_W", ["DERIVED", "PRIMARY", "DIXON", "WATER"], {}),
        ("fat", "t1_vibe_dixon_tra_F", ["DERIVED", "PRIMARY", "DIXON", "FAT"], {}),
        ("in_phase", "t1_vibe_dixon_tra_in", ["ORIGINAL", "PRIMARY", "DIXON", "IN_PHASE"], {}),
        ("opposed_phase", "t1_vibe_dixon_tra_opp", ["ORIGINAL", "PRIMARY", "DIXON", "OUT_PHASE"], {}),
    ], common={"BodyPartExamined": "THIGH", "Manufacturer": "SIEMENS"}, one_series=False),
    "philips": dict(folder="sub1", region="calf", series=[  # one series, types told apart by ImageType
        ("water", "mDIXON calf", ["DERIVED", "PRIMARY", "W", "W", "DERIVED"],
         {"RescaleSlope": 2.0, "RescaleIntercept": -10}),
        ("fat", "mDIXON calf", ["DERIVED", "PRIMARY", "F", "F", "DERIVED"], {"RescaleSlope": 0.5}),
        ("in_phase", "mDIXON calf", ["DERIVED", "PRIMARY", "IP", "IP", "DERIVED"], {}),
        ("opposed_phase", "mDIXON calf", ["DERIVED", "PRIMARY", "OP", "OP", "DERIVED"], {}),
    ], common={"Manufacturer": "Philips", "BodyPartExamined": "LEG"}, one_series=True),
    "philips_private": dict(folder="s2_upper_leg", region="thigh", series=[  # only the private tag tells
        ("water", "sDIXON 3D", ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"], {(0x2005, 0x11): "W"}),
        ("fat", "sDIXON 3D", ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"], {(0x2005, 0x11): "F"}),
    ], common={"Manufacturer": "Philips"}, one_series=False),
    "ge": dict(folder="exam7", region="unknown", series=[
        ("water", "WATER: Ax LAVA-Flex", ["ORIGINAL", "PRIMARY", "OTHER"], {}),
        ("fat", "FAT: Ax LAVA-Flex", ["ORIGINAL", "PRIMARY", "OTHER"], {}),
        ("in_phase", "InPhase: Ax LAVA-Flex", ["ORIGINAL", "PRIMARY", "OTHER"], {}),
        ("opposed_phase", "OutPhase: Ax LAVA-Flex", ["ORIGINAL", "PRIMARY", "OTHER"], {}),
    ], common={"Manufacturer": "GE MEDICAL SYSTEMS"}, one_series=False),
}


def _write_vendor(folder, vendor):
    """One vendor's Dixon series (series i numbered 10 + i, in sub-folder s<i>) among distractors;
    contrast -> the rescaled values written."""
    spec = VENDORS[vendor]
    _add_distractors(folder)
    shared_uid = generate_uid() if spec["one_series"] else None
    written = {}
    for i, (contrast, desc, itype, extra) in enumerate(spec["series"]):
        data = _data(i)
        _write_series(folder / f"s{i}", desc, itype, data, uid=shared_uid, number=10 + i,
                      extra={**spec["common"], **extra}, seed=i)
        written[contrast] = data * extra.get("RescaleSlope", 1.0) + extra.get("RescaleIntercept", 0.0)
    return written


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_vendor_series_read_back_with_geometry(tmp_path, vendor):
    spec = VENDORS[vendor]
    folder = tmp_path / spec["folder"]
    written = _write_vendor(folder, vendor)
    assert is_dicom_folder(folder)
    s = read_dicom_study(folder, keep_ids=True)
    assert s.region == spec["region"] and s.name == "P042" and s.shape == (NX, NY, NZ)
    assert read_dicom_study(folder).name == spec["folder"]  # the patient ID only with keep_ids
    assert set(s.derived) == {"in_phase", "opposed_phase"} - set(written)

    positions = _positions()
    expected = _expected_ras_affine(positions)
    assert np.allclose(s.input_affine, expected, atol=1e-3)
    assert np.allclose(sorted(s.spacing), sorted((ROW_SP, COL_SP, SLICE_GAP)), atol=1e-4)
    # input orientation: (column, row, slice sorted along the normal); our slices run against it
    normal = np.cross(IOP[:3], IOP[3:])
    order = np.argsort([p @ normal for p in positions])
    for contrast, data in written.items():
        assert np.allclose(s.to_input_orientation(s.image(contrast)), data[:, :, order], atol=1e-3)

    # world coordinates: every written pixel lands where its IPP/IOP put it
    i, j, k = np.meshgrid(np.arange(NX), np.arange(NY), np.arange(NZ), indexing="ij")
    lps = (np.stack(positions)[k] + i[..., None] * COL_SP * IOP[:3] + j[..., None] * ROW_SP * IOP[3:])
    ras = lps * np.array([-1, -1, 1])
    idx = np.linalg.solve(s.affine[:3, :3], (ras - s.affine[:3, 3]).reshape(-1, 3).T)
    assert np.abs(idx - np.round(idx)).max() < 1e-3
    idx = np.round(idx).astype(int)
    assert np.allclose(s.water[idx[0], idx[1], idx[2]], written["water"].reshape(-1), atol=1e-3)
    assert np.allclose(s.fat[idx[0], idx[1], idx[2]], written["fat"].reshape(-1), atol=1e-3)

    # independent oracle: nibabel's DICOM wrapper maps each file's (row, column) pixels to LPS mm
    for i, (contrast, *_rest) in enumerate(spec["series"]):
        for f in (folder / f"s{i}").iterdir():
            _check_against_nibabel(s, contrast, f)


def _check_against_nibabel(study, contrast, path):
    w = wrapper_from_file(str(path), force=True)
    d = w.dcm_data  # nibabel skips RescaleSlope for Philips without its private scale, so rescale here
    px = d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0))  # (rows, columns)
    r, c = np.meshgrid(np.arange(px.shape[0]), np.arange(px.shape[1]), indexing="ij")
    vox = np.stack([r.ravel(), c.ravel(), np.zeros(r.size), np.ones(r.size)])
    ras = np.diag([-1, -1, 1, 1]) @ w.affine @ vox
    idx = np.linalg.solve(study.affine, ras)[:3]
    assert np.abs(idx - np.round(idx)).max() < 1e-3
    idx = np.round(idx).astype(int)
    assert np.allclose(study.image(contrast)[idx[0], idx[1], idx[2]], px.ravel(), atol=1e-3)


def _write_coronal(folder, no_preamble=True):
    """Coronal oblique water (series 0) and fat (series 1), files without the DICM preamble; (iop, positions)."""
    rot = _rot(0.0, 12.0) @ np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # columns: row dir, column dir, normal
    iop = np.concatenate([rot[:, 0], rot[:, 1]])
    normal = np.cross(iop[:3], iop[3:])
    positions = [ORIGIN + 4.0 * k * normal for k in range(NZ)]
    for i, t in enumerate(("WATER", "FAT")):
        _write_series(folder, f"t1_vibe_dixon_{t[0]}", ["DERIVED", "PRIMARY", "DIXON", t], _data(i),
                      iop=iop, positions=positions, no_preamble=no_preamble, number=i + 1, seed=i)
    return iop, positions


def test_coronal_no_preamble_region_and_name_arguments(tmp_path):
    """Coronal oblique stack (slice normal without z component), files without the DICM preamble."""
    iop, positions = _write_coronal(tmp_path / "a")
    assert abs(np.cross(iop[:3], iop[3:])[2]) < 1e-9
    assert is_dicom_folder(tmp_path / "a")
    s = read_dicom_study(tmp_path / "a", region="calf", name="x1")
    assert (s.region, s.name) == ("calf", "x1")
    assert np.allclose(s.input_affine, _expected_ras_affine(positions, iop=iop), atol=1e-3)
    assert np.allclose(s.to_input_orientation(s.water), _data(0))
    for f in (tmp_path / "a").iterdir():
        _check_against_nibabel(s, "water" if f.name.startswith("IM01") else "fat", f)


@pytest.mark.parametrize("image_type,desc,protocol,expected", [
    (["DERIVED", "PRIMARY", "DIXON", "WATER"], "whatever", "", "water"),
    (["DERIVED", "PRIMARY", "W", "NORM", "DIS2D"], "", "", "water"),
    (["ORIGINAL", "PRIMARY", "DIXON", "OUT_PHASE"], "", "", "opposed_phase"),
    (["DERIVED", "PRIMARY", "OP", "OP", "DERIVED"], "", "", "opposed_phase"),
    (["DERIVED", "PRIMARY", "DIXON", "FAT_FRACTION"], "t1_vibe_dixon_FF", "", None),
    (["ORIGINAL", "PRIMARY", "M", "ND"], "t1_vibe_dixon_tra_opp", "", "opposed_phase"),
    (["ORIGINAL", "PRIMARY", "M", "ND"], "t1_vibe_dixon_tra_in", "", "in_phase"),
    (["ORIGINAL", "PRIMARY", "M", "ND"], "t1_vibe_tra_F", "t1_vibe_dixon_tra", "fat"),
    (["ORIGINAL", "PRIMARY", "M", "ND"], "t1_vibe_tra_F", "t1_vibe_tra", None),  # weak word, no Dixon hint
    ([], "mDIXON W", "", "water"),
    ([], "WATER", "", "water"),
    ([], "InPhase", "", "in_phase"),
    ([], "Out of phase", "", "opposed_phase"),
    ([], "OutPhase: Ax LAVA-Flex", "", "opposed_phase"),
    ([], "FAT: Ax T2 IDEAL", "", "fat"),
    ([], "Ax T2 FAT SAT", "", None),
    (["ORIGINAL", "PRIMARY", "LOCALIZER"], "localizer", "", None),
    ([], "t1_tse_tra", "", None),
    ([], "water fat", "", None),
    (["ORIGINAL", "PRIMARY", "M", "SHUFFLE"], "t1_tra_F", "", None),  # no Dixon hint made across two values
])
def test_classification_rules(image_type, desc, protocol, expected):
    assert classify_dixon(image_type, desc, protocol) == expected


def _siemens(folder, contrasts=("water", "fat"), **kw):
    itype = {"water": "WATER", "fat": "FAT", "in_phase": "IN_PHASE"}
    for i, c in enumerate(contrasts):
        _write_series(folder, f"dixon_{c}", ["DERIVED", "PRIMARY", "DIXON", itype[c]], _data(i), number=i, seed=i,
                      **kw.get(c, {}))


def test_error_two_candidates(tmp_path):
    _siemens(tmp_path, ("water", "fat", "water"))
    with pytest.raises(LegcompInputError, match=r"2 candidate series for water.*dixon_water"):
        read_dicom_study(tmp_path)


def test_error_two_echoes_in_one_series(tmp_path):
    uid = generate_uid()
    _write_series(tmp_path, "dixon_W", ["DERIVED", "PRIMARY", "DIXON", "WATER"], _data(0), uid=uid, echo=1)
    _write_series(tmp_path, "dixon_W", ["DERIVED", "PRIMARY", "DIXON", "WATER"], _data(1), uid=uid, echo=2, seed=3)
    _write_series(tmp_path, "dixon_F", ["DERIVED", "PRIMARY", "DIXON", "FAT"], _data(2))
    with pytest.raises(LegcompInputError, match=r"candidate series for water.*echo 1.*echo 2"):
        read_dicom_study(tmp_path)


def test_error_duplicate_positions(tmp_path):
    pos = _positions()
    _siemens(tmp_path, water={"positions": pos[:3] + pos[:3]})
    with pytest.raises(LegcompInputError, match=r"share one slice position"):
        read_dicom_study(tmp_path)


def test_error_no_dixon_and_no_dicom(tmp_path):
    _add_distractors(tmp_path / "a")
    with pytest.raises(LegcompInputError, match=r"a: no Dixon water/fat series.*localizer"):
        read_dicom_study(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("hello")
    assert not is_dicom_folder(tmp_path / "b")
    with pytest.raises(LegcompInputError, match=r"b: no DICOM files found"):
        read_dicom_study(tmp_path / "b")


def test_error_missing_fat(tmp_path):
    _siemens(tmp_path, ("water", "in_phase"))
    with pytest.raises(LegcompInputError, match=r"no fat series found \(found .*water"):
        read_dicom_study(tmp_path)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the cut UID
@pytest.mark.parametrize("keep", [0.97, 0.6, 0.4, 0.1])  # cut in the pixel data / the header / the file meta
def test_error_truncated_file(tmp_path, keep):
    _siemens(tmp_path)
    victim = sorted(tmp_path.iterdir())[NZ - 1]  # a slice of the water series (IM00_...)
    raw = victim.read_bytes()
    victim.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(LegcompInputError) as err:
        read_dicom_study(tmp_path)
    assert str(err.value).startswith(str(victim)) and "\n" not in str(err.value)


def test_error_uneven_slice_gaps(tmp_path):
    _siemens(tmp_path, water={"positions": _positions(gaps=[5, 5, 10, 5, 5])},
             fat={"positions": _positions(gaps=[5, 5, 10, 5, 5])})
    with pytest.raises(LegcompInputError, match=rf"{tmp_path}.*uneven slice positions"):
        read_dicom_study(tmp_path)


def test_error_single_slice(tmp_path):
    _write_series(tmp_path, "dixon_W", ["DERIVED", "PRIMARY", "DIXON", "WATER"], _data(0)[:, :, :1])
    _write_series(tmp_path, "dixon_F", ["DERIVED", "PRIMARY", "DIXON", "FAT"], _data(1)[:, :, :1])
    with pytest.raises(LegcompInputError, match=r"single slice"):
        read_dicom_study(tmp_path)


def test_error_geometry_differs_between_series(tmp_path):
    _siemens(tmp_path, fat={"pixel_spacing": (0.8, 1.0)})
    with pytest.raises(LegcompInputError, match=r"dixon_fat.*affine differs"):
        read_dicom_study(tmp_path)


def _write_enhanced(folder):
    """One Enhanced MR file holding water and fat frames (FrameType WATER / FAT, shuffled), rescale slope 1.5."""
    water, fat = _data(0), _data(1)
    frames = [(c, k) for c in ("WATER", "FAT") for k in range(NZ)]
    random.Random(1).shuffle(frames)
    pos = _positions()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", "E1", generate_uid(), 5
    ds.SeriesDescription, ds.ImageType = "mDIXON_TSE calf", ["DERIVED", "PRIMARY", "MIXED", "NONE"]
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [round(float(v), 8) for v in IOP]
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [ROW_SP, COL_SP]
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 1.5
    shared.PixelValueTransformationSequence[0].RescaleIntercept = 0
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for c, k in frames:
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = [round(float(v), 6) for v in pos[k]]
        item.MRImageFrameTypeSequence = [Dataset()]
        item.MRImageFrameTypeSequence[0].FrameType = ["DERIVED", "PRIMARY", c, c]
        item.FrameContentSequence = [Dataset()]  # as scanners write it: (stack, position in stack, contrast)
        item.FrameContentSequence[0].StackID = "1"
        item.FrameContentSequence[0].InStackPositionNumber = k + 1
        item.FrameContentSequence[0].DimensionIndexValues = [1, k + 1, 1 + ("WATER", "FAT").index(c)]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    dims = []
    for pointer, group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111), (0x00089208, 0x00189226)):
        dims.append(Dataset())
        dims[-1].DimensionIndexPointer, dims[-1].FunctionalGroupPointer = pointer, group
    ds.DimensionIndexSequence = dims
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(frames), NY, NX
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    vols = {"WATER": water, "FAT": fat}
    ds.PixelData = np.stack([vols[c][:, :, k].T for c, k in frames]).astype(np.uint16).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "enhanced.dcm", enforce_file_format=True)


def test_enhanced_multiframe_philips(tmp_path):
    """One Enhanced MR file holding water and fat frames (FrameType WATER / FAT), frames shuffled."""
    water, fat, pos = _data(0), _data(1), _positions()
    _write_enhanced(tmp_path)
    s = read_dicom_study(tmp_path)
    assert s.region == "calf" and s.name == tmp_path.name  # not the PatientID (E1) without keep_ids
    assert read_dicom_study(tmp_path, keep_ids=True).name == "E1"
    assert np.allclose(s.input_affine, _expected_ras_affine(pos), atol=1e-3)
    assert np.allclose(s.to_input_orientation(s.water)[:, :, ::-1], water * 1.5)
    assert np.allclose(s.to_input_orientation(s.fat)[:, :, ::-1], fat * 1.5)


# --------------------------------------------------------------------------- DICOM through read_study / find_studies

def _nifti_study(folder):
    import nibabel as nib

    folder.mkdir(parents=True)
    for i, name in enumerate(("water", "fat")):
        nib.save(nib.Nifti1Image(_data(i).astype(np.float32), np.diag([2.0, 2.0, 5.0, 1.0])),
                 str(folder / f"{name}.nii.gz"))


@pytest.mark.filterwarnings("ignore:Expected implicit VR:UserWarning")  # pydicom probing report.txt
def test_read_study_and_find_studies_flat_dicom(tmp_path):
    """Flat layout: every file of the study's series in one folder."""
    from legcomp.io import find_studies, read_study

    root = tmp_path / "cohort"
    _siemens(root / "P1_thigh")
    _siemens(root / "P2_calf", ("water", "fat", "in_phase"))
    (root / "P2_calf" / "reports").mkdir()  # a sub-folder without DICOM does not hide the study
    (root / "P2_calf" / "reports" / "report.txt").write_text("no DICOM here\n")
    _nifti_study(root / "N3_thigh")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a study\n")
    assert find_studies(root) == [root / "N3_thigh", root / "P1_thigh", root / "P2_calf"]
    assert find_studies(root / "P1_thigh") == [root / "P1_thigh"]  # the folder itself is the study
    for name, region, contrasts in (("P1_thigh", "thigh", 2), ("P2_calf", "calf", 3)):
        folder = root / name
        s = read_study(folder)
        ref = read_dicom_study(folder)
        assert (s.source, s.name, s.region, s.shape) == (str(folder), name, region, (NX, NY, NZ))
        assert read_study(folder, keep_ids=True).name == "P042"
        assert len(s.derived) == 4 - contrasts
        np.testing.assert_array_equal(s.water, ref.water)
        np.testing.assert_array_equal(s.fat, ref.fat)
        np.testing.assert_array_equal(s.affine, ref.affine)
        assert read_study(folder, region="calf", name="x").region == "calf"  # options reach the DICOM reader
    with pytest.raises(LegcompInputError, match="no water image found"):
        read_study(root / "notes")


def _per_series_study(study):
    for i, (t, c) in enumerate((("WATER", "water"), ("FAT", "fat"))):
        _write_series(study / f"series_{i + 1:02d}_{c}", f"dixon_{c}", ["DERIVED", "PRIMARY", "DIXON", t], _data(i),
                      number=i + 1, seed=i)


def test_read_study_dicom_one_folder_per_series(tmp_path):
    """One sub-folder per series: read_study of the study folder reads both series."""
    from legcomp.io import read_study

    study = tmp_path / "cohort" / "P4_thigh"
    _per_series_study(study)
    s = read_study(study)
    assert (s.source, s.region, s.shape) == (str(study), "thigh", (NX, NY, NZ))
    ref = read_dicom_study(study)
    np.testing.assert_array_equal(s.water, ref.water)
    np.testing.assert_array_equal(s.fat, ref.fat)


def test_find_studies_one_folder_per_series_is_one_study(tmp_path):
    """A study with one sub-folder per series is ONE study (it was: each series folder listed as one)."""
    from legcomp.io import find_studies

    root = tmp_path / "cohort"
    _per_series_study(root / "P4_thigh")
    _per_series_study(root / "P5_thigh")
    assert find_studies(root) == [root / "P4_thigh", root / "P5_thigh"]


def test_find_studies_dicom_trees(tmp_path):
    """Per-series studies beside a flat one, a localiser folder, a study lacking its fat series, nesting."""
    from legcomp.io import find_studies

    root = tmp_path / "cohort"
    _per_series_study(root / "P4_thigh")
    _write_series(root / "P4_thigh" / "series_00_loc", "localizer", ["ORIGINAL", "PRIMARY", "LOCALIZER"],
                  _data(9)[:, :, :3], number=9)
    _per_series_study(root / "site_b" / "P6" / "exam_1")  # PATIENT/STUDY/SERIES as PACS exports it
    _siemens(root / "P7_flat")
    _write_series(root / "P8_no_fat" / "water", "dixon_water", ["DERIVED", "PRIMARY", "DIXON", "WATER"], _data(0))
    assert find_studies(root) == [root / "P4_thigh", root / "P7_flat", root / "P8_no_fat",
                                  root / "site_b" / "P6" / "exam_1"]
    assert find_studies(root / "P4_thigh") == [root / "P4_thigh"]  # a per-series study given itself
    with pytest.raises(LegcompInputError, match=r"P8_no_fat: no fat series found"):
        read_dicom_study(root / "P8_no_fat")


def test_series_of_two_studies_are_not_one_acquisition(tmp_path):
    _write_series(tmp_path / "w", "dixon_W", ["DERIVED", "PRIMARY", "DIXON", "WATER"], _data(0),
                  extra={"StudyInstanceUID": generate_uid()})
    _write_series(tmp_path / "f", "dixon_F", ["DERIVED", "PRIMARY", "DIXON", "FAT"], _data(1),
                  extra={"StudyInstanceUID": generate_uid()})
    assert str(_err_dicom(tmp_path)) == (f"{tmp_path}: the Dixon series come from 2 different studies "
                                         f"(StudyInstanceUID); keep one acquisition per folder")


PATIENT = {"PatientName": "DOE^JANE", "PatientBirthDate": "19610203", "PatientID": "../MRN-77321",
           "OtherPatientIDs": "MRN-55120", "PatientSex": "F", "StudyInstanceUID": generate_uid(),
           "FrameOfReferenceUID": generate_uid(), "StudyID": "1", "AccessionNumber": "A1", "StudyDate": "20240101",
           "StudyTime": "120000", "ReferringPhysicianName": "", "Manufacturer": "SIEMENS",
           "BodyPartExamined": "THIGH", "PositionReferenceIndicator": ""}


@pytest.mark.filterwarnings("ignore:Expected implicit VR:UserWarning")
def test_run_on_a_cohort_of_per_series_dicom_studies_keeps_no_patient_ids(tmp_path, stub_cascade):
    """``legcomp run`` on a cohort whose studies hold one sub-folder per series: one output per study, and
    no patient name, ID or birth date in any output unless --keep-ids."""
    from legcomp.cli import main

    root = tmp_path / "cohort"
    for name in ("P4_thigh", "P5_thigh"):
        for i, (t, c) in enumerate((("WATER", "water"), ("FAT", "fat"))):
            _write_series(root / name / f"{i + 1:02d}_{c}", f"dixon_{c}", ["DERIVED", "PRIMARY", "DIXON", t],
                          _data(i), number=i + 1, seed=i, extra=PATIENT)
    out = tmp_path / "out"
    args = ["run", str(root), "--weights", str(stub_cascade.weights), "--quiet", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["P4_thigh", "P5_thigh"]
    assert sorted(stub_cascade.calls) == ["P4_thigh", "P5_thigh"]
    assert (out / "P4_thigh" / "overlay.png").is_file()

    def text_of(folder):
        return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())

    written = text_of(out)  # the DICOM segmentation included, where highdicom made one
    for value in ("DOE", "JANE", "19610203", "MRN-77321", "MRN-55120", "P042"):
        assert value not in written, value
    # asked for: the PatientID names the study (made safe as a name); folders stay named by the input's
    assert main([*args, "--out", str(tmp_path / "ids"), "--keep-ids"]) == 0
    table = (tmp_path / "ids" / "cohort_volumes.csv").read_text()
    assert "_MRN-77321" in table and "../MRN" not in table
    assert sorted(p.name for p in (tmp_path / "ids").iterdir() if p.is_dir()) == ["P4_thigh", "P5_thigh"]


# --------------------------------------------------------------------------- against dcm2niix

def _dcm2niix() -> str:
    try:
        import dcm2niix
        return str(dcm2niix.bin)
    except ImportError:
        import shutil

        found = shutil.which("dcm2niix")
        if not found:
            pytest.skip("dcm2niix is not installed (pip install dcm2niix, or the test extra)")
        return found


def _layout(folder, kind):
    """Write one DICOM layout; returns {series number: contrast} and, for a multi-frame file, the contrast of
    each volume of dcm2niix's 4D output (in dimension-index order)."""
    if kind in VENDORS:
        _write_vendor(folder, kind)
        return {10 + i: c for i, (c, *_rest) in enumerate(VENDORS[kind]["series"])}, None
    if kind == "coronal":
        _write_coronal(folder, no_preamble=False)  # dcm2niix wants the preamble
        return {1: "water", 2: "fat"}, None
    _write_enhanced(folder)
    return {5: None}, ["water", "fat"]


@pytest.mark.parametrize("kind", [*sorted(VENDORS), "coronal", "enhanced"])
def test_reader_matches_dcm2niix(tmp_path, kind):
    """legcomp's array and affine match the field's reference converter within 1e-3 (mm) for every layout these
    tests write: the vendors' spellings (oblique stacks), a coronal oblique stack, an enhanced multi-frame file."""
    import json
    import subprocess

    import nibabel as nib

    exe = _dcm2niix()
    numbers, volumes = _layout(tmp_path / "dicom", kind)
    (tmp_path / "nii").mkdir()
    run = subprocess.run([exe, "-z", "n", "-b", "y", "-f", "%s_%p", "-o", str(tmp_path / "nii"),
                          str(tmp_path / "dicom")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    study = read_dicom_study(tmp_path / "dicom")
    compared = []
    for nii in sorted((tmp_path / "nii").glob("*.nii")):
        number = json.loads(nii.with_suffix(".json").read_text()).get("SeriesNumber")
        if number not in numbers:
            continue  # a localiser or other distractor
        img = nib.as_closest_canonical(nib.load(str(nii)))
        data = img.get_fdata()
        contrasts = volumes if data.ndim == 4 else [numbers[number]]
        stack = data if data.ndim == 4 else data[..., None]
        assert stack.shape[3] == len(contrasts)
        for v, contrast in enumerate(contrasts):
            np.testing.assert_allclose(img.affine, study.affine, atol=1e-3, rtol=0)
            np.testing.assert_allclose(stack[..., v], study.image(contrast), atol=1e-3, rtol=0)
            compared.append(contrast)
    assert sorted(compared) == sorted(c for c in (volumes or numbers.values()))


def test_strip_patient_ids(tmp_path):
    from legcomp.io.dicom import strip_patient_ids

    _write_series(tmp_path, "dixon_W", ["DERIVED", "PRIMARY", "DIXON", "WATER"], _data(0)[:, :, :2], extra=PATIENT)
    f = sorted(tmp_path.iterdir())[0]
    strip_patient_ids(f)
    ds = pydicom.dcmread(f)
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate) == ("", "", "") and "OtherPatientIDs" not in ds
    assert ds.PatientSex == "F" and ds.StudyInstanceUID == PATIENT["StudyInstanceUID"]  # the rest is kept
    raw = f.read_bytes()
    assert b"DOE" not in raw and b"19610203" not in raw and b"MRN-" not in raw


def test_file_contrasts_from_per_frame_shared_and_file_headers():
    """Header-only classification: an image needs Rows and Columns; a multi-frame file's frames are classified by
    their own (per-frame) frame type, else the shared one, else the file's ImageType."""
    from legcomp.io.dicom import file_contrasts

    def frame_type(*types):
        item = Dataset()
        mr = Dataset()
        mr.FrameType = list(types)
        item.MRImageFrameTypeSequence = [mr]
        return item

    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "W"]
    ds.Rows = 4
    assert file_contrasts(ds) == set()  # no Columns: not an image
    ds.Columns = 4
    assert file_contrasts(ds) == {"water"}
    del ds.Rows
    assert file_contrasts(ds) == set()
    multi = Dataset()
    multi.Rows, multi.Columns, multi.NumberOfFrames = 4, 4, 2
    multi.PerFrameFunctionalGroupsSequence = [frame_type("ORIGINAL", "PRIMARY", "M", "W"),
                                              frame_type("ORIGINAL", "PRIMARY", "M", "F")]
    assert file_contrasts(multi) == {"water", "fat"}
    shared = Dataset()
    shared.Rows, shared.Columns, shared.NumberOfFrames = 4, 4, 2
    shared.PerFrameFunctionalGroupsSequence = [Dataset(), Dataset()]
    shared.SharedFunctionalGroupsSequence = [frame_type("ORIGINAL", "PRIMARY", "M", "F")]
    assert file_contrasts(shared) == {"fat"}


def _im(k, iop=(1, 0, 0, 0, 1, 0), ps=(0.5, 0.8), size=(4, 3), series="#3 'dixon_W'", z=None):
    from pathlib import Path

    from legcomp.io.dicom import _Image

    return _Image(path=Path(f"f{k}"), frame=None, series_uid="1.2", series=series, contrast="water", echo="",
                  ipp=np.array([10.0, 20.0, 5.0 * k if z is None else z]), iop=np.array(iop, float),
                  pixel_spacing=ps, size=size, slope=1.0, intercept=0.0)


def test_series_geometry_affine_and_messages():
    from legcomp.io.dicom import _geometry

    stack, aff = _geometry([_im(2), _im(0), _im(1)], "here")
    assert [im.path.name for im in stack] == ["f0", "f1", "f2"]  # sorted along the slice normal
    np.testing.assert_allclose(aff, [[-0.8, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 5, 0], [0, 0, 0, 1]])
    cases = [
        ([_im(0), _im(1, size=(4, 4))], "series #3 'dixon_W' mixes image orientations, sizes or pixel spacings"),
        ([_im(0), _im(1, ps=(0.5, 0.9))], "series #3 'dixon_W' mixes image orientations, sizes or pixel spacings"),
        ([_im(0), _im(1, iop=(1, 0, 0, 0, 0.9, 0.1))], "series #3 'dixon_W' mixes image orientations, sizes or pixel spacings"),
        ([_im(0, iop=(1, 0, 0, 0, 1.02, 0)), _im(1, iop=(1, 0, 0, 0, 1.02, 0))],
         "series #3 'dixon_W': ImageOrientationPatient 1\\0\\0\\0\\1.02\\0 is not two orthogonal unit vectors"),
        ([_im(0, iop=(1, 0, 0, 0.02, 1, 0)), _im(1, iop=(1, 0, 0, 0.02, 1, 0))],
         "series #3 'dixon_W': ImageOrientationPatient 1\\0\\0\\0.02\\1\\0 is not two orthogonal unit vectors"),
        ([_im(0, ps=(0.0, 1.0)), _im(1, ps=(0.0, 1.0))], "series #3 'dixon_W': PixelSpacing [0.0, 1.0] is not positive"),
        ([_im(0, z=np.nan), _im(1)],
         "series #3 'dixon_W': non-finite ImagePositionPatient, ImageOrientationPatient or PixelSpacing"),
        ([_im(0)], "series #3 'dixon_W' has a single slice; a 3D volume is needed"),
        ([_im(0), _im(1), _im(1)],
         "series #3 'dixon_W': several images share one slice position (echoes, phases or repeats in one series?)"),
        ([_im(0), _im(1), _im(2, z=10.5)],
         "series #3 'dixon_W': uneven slice positions (gaps 5-5.5 mm, off a uniform grid by up to 0.25 mm)"),
    ]
    for images, msg in cases:
        with pytest.raises(LegcompInputError) as info:
            _geometry(images, "here")
        assert str(info.value) == f"here: {msg}"
    _geometry([_im(0, iop=(1, 0, 0, 0, 1.009, 0)), _im(1, iop=(1, 0, 0, 0, 1.009, 0))], "here")  # within 1 %
    _geometry([_im(0), _im(1), _im(2, z=10.1)], "here")  # within 2 % of the step


def test_header_value_helpers_region_and_one_study(tmp_path):
    from legcomp.io.dicom import _check_one_study, _guess_region, _values, _words

    assert _values(None) == [] and _values("orig\\ primary \\\\m") == ["ORIG", "PRIMARY", "M"]
    assert _values(b"w\\f") == ["W", "F"] and _values(["a ", " ", "b"]) == ["A", "B"] and _values(3) == ["3"]
    assert _words("Dixon in-phase") == ["DIXON", "INPHASE"] and _words("opp_phase") == ["OUTPHASE"]
    assert _words("out of phase W") == ["OUTPHASE", "W"] and _words("Opposed Phase") == ["OUTPHASE"]

    def hdr(**kw):
        ds = Dataset()
        for k, v in kw.items():
            setattr(ds, k, v)
        return ds

    plain = tmp_path / "x" / "y"
    plain.mkdir(parents=True)
    assert _guess_region([hdr(BodyPartExamined="THIGH")], plain) == "thigh"
    assert _guess_region([hdr(BodyPartExamined="LEG", SeriesDescription="calves dixon")], plain) == "calf"
    assert _guess_region([hdr(BodyPartExamined="THIGH", SeriesDescription="calf")], plain) == "thigh"  # first source wins
    assert _guess_region([hdr(BodyPartExamined="THIGH"), hdr(BodyPartExamined="CALF")], plain) == "unknown"
    assert _guess_region([hdr(ProtocolName="Oberschenkel")], plain) == "thigh"
    assert _guess_region([hdr(StudyDescription="lower leg")], plain) == "calf"
    assert _guess_region([hdr()], plain) == "unknown"
    thigh = tmp_path / "sub" / "thigh_dixon" / "series"
    thigh.mkdir(parents=True)
    assert _guess_region([hdr()], thigh) == "thigh"
    _check_one_study([hdr(StudyInstanceUID="1"), hdr(StudyInstanceUID="1"), hdr()], tmp_path)
    with pytest.raises(LegcompInputError) as info:
        _check_one_study([hdr(StudyInstanceUID="1"), hdr(StudyInstanceUID="2")], tmp_path)
    assert str(info.value) == (f"{tmp_path}: the Dixon series come from 2 different studies (StudyInstanceUID); "
                               f"keep one acquisition per folder")


def test_pixel_data_errors_name_the_file_and_arrays_are_float32(tmp_path):
    from legcomp.io.dicom import _load

    _siemens(tmp_path / "ok")
    st = read_dicom_study(tmp_path / "ok")
    assert st.water.dtype == np.float32 and st.fat.dtype == np.float32 and st.name == "ok"
    f = sorted((tmp_path / "ok").iterdir())[0]
    im = _im(0)
    im.path = f
    im.size = (NY, NX)  # (Rows, Columns) as the file says
    vol = _load([im], {})
    assert vol.dtype == np.float32 and vol.shape == (NX, NY, 1)
    np.testing.assert_array_equal(vol[..., 0], pydicom.dcmread(f).pixel_array.T)
    im.size = (NY + 1, NX)
    with pytest.raises(LegcompInputError) as info:
        _load([im], {})
    assert str(info.value) == f"{f}: pixel data shape ({NY}, {NX}) differs from Rows x Columns ({NY + 1}, {NX})"
    ds = pydicom.dcmread(f)
    ds.PixelData = ds.PixelData[:10]  # cut short
    ds.save_as(f)
    im.size = (NY, NX)
    with pytest.raises(LegcompInputError) as info:
        _load([im], {})
    assert str(info.value).startswith(f"{f}: cannot read pixel data, file truncated or unsupported (ValueError: ")


def test_geometry_tolerances_and_region_from_the_nearest_folders(tmp_path):
    from legcomp.io.dicom import _geometry, _guess_region

    _geometry([_im(0, iop=(1, 0, 0, 0, 1, 0)), _im(1, iop=(1, 5e-5, 0, 0, 1, 0))], "here")  # within 1e-4
    _geometry([_im(0, ps=(0.5, 0.8)), _im(1, ps=(0.50005, 0.8))], "here")
    with pytest.raises(LegcompInputError, match="is not two orthogonal unit vectors"):
        _geometry([_im(0, iop=(1.02, 0, 0, 0, 1, 0)), _im(1, iop=(1.02, 0, 0, 0, 1, 0))], "here")
    deep = tmp_path / "calf_cohort" / "s1" / "a" / "b"  # only the last three folder names count
    deep.mkdir(parents=True)
    assert _guess_region([Dataset()], deep) == "unknown"
    assert _guess_region([Dataset()], deep.parent) == "calf"


def test_geometry_tolerance_boundaries_are_inclusive():
    """A slice gap of exactly 0.01 mm, a position off the uniform grid by exactly the tolerance (2 % of the
    step) and a row/column cosine product of exactly 0.01 are all still accepted."""
    from legcomp.io.dicom import _geometry

    _, aff = _geometry([_im(0, z=0.0), _im(1, z=0.01)], "here")
    assert aff[2, 2] == 0.01
    _geometry([_im(0, z=0.0), _im(1, z=51.0), _im(2, z=100.0)], "here")  # step 50 mm, 1 mm off
    _geometry([_im(0, iop=(1, 0, 0, 0.01, 1, 0)), _im(1, iop=(1, 0, 0, 0.01, 1, 0))], "here")


def _header(drop=(), **kw):
    """An in-memory classic water image header (3 rows x 4 columns) with geometry; ``drop``: tags to leave out."""
    ds = Dataset()
    ds.Rows, ds.Columns, ds.ImageType = 3, 4, ["DERIVED", "PRIMARY", "DIXON", "WATER"]
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [1, 2, 3], [1, 0, 0, 0, 1, 0], [0.5, 0.8]
    for key, value in kw.items():
        setattr(ds, key, value)
    for key in drop:
        delattr(ds, key)
    return ds


def test_images_of_a_classic_file_labels_and_defaults(tmp_path):
    """Without SeriesInstanceUID images group by folder; a missing SeriesNumber / SeriesDescription reads '?' / '';
    no echo number is no echo; an empty RescaleSlope is 1; an image needs both Rows and Columns."""
    from legcomp.io.dicom import _images

    p = tmp_path / "s" / "f1"
    (im,) = _images(p, _header(RescaleSlope=""))
    assert (im.series_uid, im.series, im.contrast, im.echo, im.frame) == (f"nouid:{p.parent}", "#? ''", "water", "", None)
    assert (im.size, im.pixel_spacing, im.slope, im.intercept) == ((3, 4), (0.5, 0.8), 1.0, 0.0)
    np.testing.assert_array_equal(im.ipp, [1, 2, 3])
    (im,) = _images(p, _header(SeriesInstanceUID="1.2.3", SeriesNumber=7, SeriesDescription="dixon W", EchoNumbers=2,
                               RescaleSlope=2, RescaleIntercept=-5))
    assert (im.series_uid, im.series, im.echo, im.slope, im.intercept) == ("1.2.3", "#7 'dixon W'", "2", 2.0, -5.0)
    assert _images(p, _header(drop=["Columns"])) == [] and _images(p, _header(drop=["Rows"])) == []


@pytest.mark.parametrize("drop,kw", [(["ImagePositionPatient"], {}), (["ImageOrientationPatient"], {}),
                                     (["PixelSpacing"], {}), ([], {"ImagePositionPatient": [1, 2]}),
                                     ([], {"ImageOrientationPatient": [1, 0, 0, 0, 1]})])
def test_images_without_valid_geometry_tags(tmp_path, drop, kw):
    from legcomp.io.dicom import _images

    with pytest.raises(LegcompInputError) as info:
        _images(tmp_path / "f1", _header(drop, **kw))
    assert str(info.value) == (f"{tmp_path / 'f1'}: water image without valid ImagePositionPatient / "
                               f"ImageOrientationPatient / PixelSpacing")
    assert info.value.path == tmp_path / "f1"


def test_images_of_a_two_frame_file_use_the_frame_groups_over_the_file(tmp_path):
    """Frame 0 is no Dixon image (its own frame type); frame 1 is fat by the shared frame type, with its own echo
    time and the shared rescale (the file-level echo number and intercept are not used)."""
    from legcomp.io.dicom import _images

    def item(**seqs):
        it = Dataset()
        for seq, attrs in seqs.items():
            inner = Dataset()
            for k, v in attrs.items():
                setattr(inner, k, v)
            setattr(it, seq, [inner])
        return it

    ds = Dataset()
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SeriesDescription = 3, 4, 2, "multi"
    ds.EchoNumbers, ds.RescaleIntercept = 1, 7
    ds.SharedFunctionalGroupsSequence = [item(
        PlaneOrientationSequence={"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]},
        PixelMeasuresSequence={"PixelSpacing": [0.5, 0.8]},
        PixelValueTransformationSequence={"RescaleSlope": 1.5, "RescaleIntercept": -10},
        MRImageFrameTypeSequence={"FrameType": ["DERIVED", "PRIMARY", "FAT", "FAT"]})]
    ds.PerFrameFunctionalGroupsSequence = [
        item(PlanePositionSequence={"ImagePositionPatient": [1, 2, 3]},
             MRImageFrameTypeSequence={"FrameType": ["ORIGINAL", "PRIMARY", "M", "NONE"]}),
        item(PlanePositionSequence={"ImagePositionPatient": [1, 2, 8]}, MREchoSequence={"EffectiveEchoTime": 4.2})]
    (im,) = _images(tmp_path / "mf", ds)
    assert (im.frame, im.contrast, im.echo, im.slope, im.intercept) == (1, "fat", "4.2", 1.5, -10.0)
    np.testing.assert_array_equal(im.ipp, [1, 2, 8])


def _tiny(folder, desc, image_type, number, **kw):
    """A one-slice 2 x 2 series."""
    return _write_series(folder, desc, image_type, _data(number)[:2, :2, :1], number=number, seed=number, **kw)


def test_read_dicom_study_messages_list_the_series(tmp_path):
    """Messages name every series by number and description, in series order (not by UID)."""
    water, fat, inphase = (["DERIVED", "PRIMARY", "DIXON", t] for t in ("WATER", "FAT", "IN_PHASE"))
    e = _err_dicom(tmp_path / "missing")
    assert str(e) == f"{tmp_path / 'missing'}: not a folder" and e.path == tmp_path / "missing"
    a = tmp_path / "a"  # two water series; their UIDs sort the other way round
    _tiny(a, "dixon_a", water, 1, uid="1.2.9")
    _tiny(a, "dixon_b", water, 2, uid="1.2.1")
    _tiny(a, "dixon_c", fat, 3)
    e = _err_dicom(a)
    assert str(e) == f"{a}: 2 candidate series for water: #1 'dixon_a', #2 'dixon_b'; keep one Dixon acquisition " \
                     f"per folder" and e.path == a
    b = tmp_path / "b"
    _tiny(b, "dixon_a", water, 1)
    _tiny(b, "dixon_ip", inphase, 2)
    assert str(_err_dicom(b)) == f"{b}: no fat series found (found water #1 'dixon_a', in_phase #2 'dixon_ip')"
    c = tmp_path / "c"  # no Dixon image; one file without SeriesNumber and SeriesDescription
    _tiny(c, "t1_tse", ["ORIGINAL", "PRIMARY", "M", "ND"], 1)
    _tiny(c / "x", "t1_tse", ["ORIGINAL", "PRIMARY", "M", "ND"], 2)
    (f,) = (c / "x").iterdir()
    ds = pydicom.dcmread(f)
    del ds.SeriesNumber, ds.SeriesDescription
    ds.save_as(f)
    assert str(_err_dicom(c)) == f"{c}: no Dixon water/fat series among 2 series (#1 't1_tse', #? '')"
    d = tmp_path / "d"  # seven series: the first six are named
    for n in range(1, 8):
        _tiny(d, "t1_tse", ["ORIGINAL", "PRIMARY", "M", "ND"], n)
    listed = ", ".join(f"#{n} 't1_tse'" for n in range(1, 7))
    assert str(_err_dicom(d)) == f"{d}: no Dixon water/fat series among 7 series ({listed})"


def _err_dicom(folder, **kw) -> LegcompInputError:
    with pytest.raises(LegcompInputError) as info:
        read_dicom_study(folder, **kw)
    return info.value


def test_implausible_size_in_the_headers_is_refused_before_reading_pixels(tmp_path):
    """Rows x Columns of a broken header (pixel data far too short) are refused by size, naming the series."""
    _siemens(tmp_path, ("water", "fat"))
    for f in tmp_path.iterdir():
        ds = pydicom.dcmread(f)
        ds.Rows, ds.Columns = 40000, 30000
        ds.save_as(f)
    assert str(_err_dicom(tmp_path)) == (
        f"{tmp_path} series #0 'dixon_water': (30000, 40000, {NZ}) voxels of 0.9x0.8x5 mm would need about "
        f"{30000 * 40000 * NZ * 40 / 1e9:.0f} GB at its own grid (limit 8 GB): a broken header?")


def test_keep_ids_without_a_patient_id_names_the_study_by_its_folder(tmp_path):
    folder = tmp_path / "s07"
    _siemens(folder)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        del ds.PatientID
        ds.save_as(f)
    assert read_dicom_study(folder, keep_ids=True).name == "s07"


@pytest.mark.filterwarnings("ignore:Expected implicit VR:UserWarning")  # pydicom probing the notes
def test_is_dicom_folder_needs_a_folder_and_probes_the_first_50_files(tmp_path):
    """Files without the DICM preamble are recognised by their header, in the first 50 files only."""
    _tiny(tmp_path / "a", "dixon", ["DERIVED", "PRIMARY", "DIXON", "WATER"], 1, no_preamble=True)
    (f,) = (tmp_path / "a").iterdir()
    assert is_dicom_folder(tmp_path / "a")
    assert not is_dicom_folder(f) and not is_dicom_folder(tmp_path / "missing")
    f.rename(tmp_path / "a" / "z_image")
    for n in range(50):
        (tmp_path / "a" / f"note{n:02d}.txt").write_text("not DICOM\n")
    assert not is_dicom_folder(tmp_path / "a")
    (tmp_path / "a" / "note00.txt").unlink()
    assert is_dicom_folder(tmp_path / "a")


def _object(path, meta_sop=None, preamble=True, **attrs):
    """A DICOM file written as given: file meta with ``meta_sop`` (if any), the preamble or not, ``attrs``."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if meta_sop:
        meta.MediaStorageSOPClassUID = meta_sop
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=False)
    return path


TRUNCATED = "truncated DICOM image (no pixel data element)"
NO_SOP = "truncated or unreadable DICOM file (no SOP Class UID)"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on files without a preamble or file meta
@pytest.mark.parametrize("meta_sop,attrs,expected", [
    (pydicom.uid.MediaStorageDirectoryStorage, {"PatientID": "x"}, "read"),  # a non-image object: kept, no error
    (MRImageStorage, {"PatientID": "x"}, NO_SOP),  # the file meta says image, the data set lost its SOP class
    (None, {"SOPClassUID": MRImageStorage}, TRUNCATED),  # an image by its SOP class
    ("1.2.3.4.5", {"SOPClassUID": "1.2.3.4.5", "Rows": 2}, TRUNCATED),  # an image by its Rows
    (MRImageStorage, {"SOPClassUID": "1.2.3.4.5"}, TRUNCATED),  # an image by its file meta
    (MRImageStorage, {"SOPClassUID": MRImageStorage, "Rows": 1, "Columns": 1, "FloatPixelData": b"\0" * 4}, "read"),
    (MRImageStorage, {"SOPClassUID": MRImageStorage, "Rows": 1, "Columns": 1, "DoubleFloatPixelData": b"\0" * 8},
     "read"),
    ("no preamble", {"Rows": 2, "Columns": 2}, None),  # without preamble only an image with a SOP class counts
])
def test_read_header_kinds_of_broken_and_non_image_files(tmp_path, meta_sop, attrs, expected):
    from legcomp.io.dicom import _read_header

    p = _object(tmp_path / "f", None if meta_sop == "no preamble" else meta_sop, meta_sop != "no preamble", **attrs)
    if expected in (TRUNCATED, NO_SOP):
        with pytest.raises(LegcompInputError) as info:
            _read_header(p)
        assert str(info.value) == f"{p}: {expected}" and info.value.path == p
    else:
        assert (_read_header(p) is not None) == (expected == "read")


def test_read_header_unparsable_file_with_preamble_is_an_error(tmp_path):
    """A file with the DICM preamble that pydicom cannot parse is reported; one without it is no DICOM."""
    import struct

    from legcomp.io.dicom import _has_preamble, _read_header

    p = _object(tmp_path / "bad")  # then a sequence whose item has no item tag
    p.write_bytes(p.read_bytes() + struct.pack("<HH2sHIHHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF, 0x1234, 0x5678, 4)
                  + b"abcd")
    with pytest.raises(LegcompInputError) as info:
        _read_header(p)
    assert str(info.value).startswith(f"{p}: unreadable DICOM file (OSError: ") and info.value.path == p
    q = tmp_path / "bad.txt"
    q.write_bytes(p.read_bytes()[132:])
    assert _read_header(q) is None
    assert _has_preamble(p) and not _has_preamble(q) and not _has_preamble(tmp_path) \
        and not _has_preamble(tmp_path / "missing")  # what cannot be opened has none


def test_hidden_files_and_dicomdir_are_not_read(tmp_path):
    """Hidden files and a file named DICOMDIR are skipped (by the reader, the folder test and the contrasts)."""
    from legcomp.io.dicom import folder_contrasts

    _siemens(tmp_path / "src")
    water, fat = (sorted((tmp_path / "src").glob(f"IM{n:02d}_*"))[0] for n in (0, 1))
    d = tmp_path / "d"
    d.mkdir()
    (d / ".IM_fat").write_bytes(fat.read_bytes())
    (d / "DICOMDIR").write_bytes(fat.read_bytes())
    assert not is_dicom_folder(d) and folder_contrasts(d) is None
    assert str(_err_dicom(d)) == f"{d}: no DICOM files found"
    (d / "a_sub").mkdir()
    (d / "water.dcm").write_bytes(water.read_bytes())
    assert folder_contrasts(d) == {"water"}


def test_file_contrasts_philips_legacy_frame_type_and_protocol_hint():
    """Per-frame Philips legacy (2005,140F) ImageType adds to the frame type; a Dixon hint in ProtocolName alone
    makes a weak description word count; an empty NumberOfFrames is one frame."""
    from legcomp.io.dicom import _images, file_contrasts

    def frame(frame_type=None, legacy=None):
        it = Dataset()
        if frame_type:
            it.MRImageFrameTypeSequence = [Dataset()]
            it.MRImageFrameTypeSequence[0].FrameType = frame_type
        if legacy:
            inner = Dataset()
            inner.ImageType = legacy
            it.add_new((0x2005, 0x140F), "SQ", [inner])
        return it

    ds = Dataset()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4, 4, 2
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
    ds.PerFrameFunctionalGroupsSequence = [frame(legacy=["ORIGINAL", "PRIMARY", "W", "W"]),
                                           frame(["ORIGINAL", "PRIMARY", "F", "F"], ["ORIGINAL", "PRIMARY", "M_FFE"])]
    assert file_contrasts(ds) == {"water", "fat"}
    classic = _header(ImageType=["ORIGINAL", "PRIMARY", "M", "ND"], SeriesDescription="t1_vibe_tra_F",
                      ProtocolName="t1_vibe_dixon_tra")
    assert file_contrasts(classic) == {"fat"}
    classic.NumberOfFrames = ""
    assert [im.frame for im in _images(Path("f"), classic)] == [None]


def test_folder_contrasts_count_a_broken_file_as_dicom_without_contrast(tmp_path):
    import struct

    from legcomp.io.dicom import folder_contrasts

    d = tmp_path / "d"
    d.mkdir()
    broken = _object(d / "b_broken")  # the DICM preamble, then a sequence item without its item tag
    broken.write_bytes(broken.read_bytes() + struct.pack("<HH2sHIHHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF, 0x1234,
                                                         0x5678, 4) + b"abcd")
    assert folder_contrasts(d) == frozenset()
    _siemens(tmp_path / "src")
    for n, name in ((0, "a_water"), (1, "c_fat")):
        (d / name).write_bytes(sorted((tmp_path / "src").glob(f"IM{n:02d}_*"))[0].read_bytes())
    assert folder_contrasts(d) == {"water", "fat"}


def test_find_studies_stray_series_folders_beside_a_study(tmp_path):
    """Series folders beside a study are each listed (they fail when read); a root holding only a series folder
    that is no study is itself listed."""
    from legcomp.io import find_studies

    root = tmp_path / "cohort"
    _siemens(root / "P1")
    for n in (1, 2):
        _tiny(root / f"s{n}", "localizer", ["ORIGINAL", "PRIMARY", "LOCALIZER"], n)
    assert find_studies(root) == [root / "P1", root / "s1", root / "s2"]
    assert find_studies(root / "s1") == [root / "s1"]
    other = tmp_path / "other"
    _tiny(other / "loc", "localizer", ["ORIGINAL", "PRIMARY", "LOCALIZER"], 1)
    assert find_studies(other) == [other]

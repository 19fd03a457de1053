"""The bad-input corpus: every kind of broken input, option or output path that a user or a clinic's data
can bring, through ``legcomp.cli.main``. Each must end with exit code 2 and one stderr line
(``legcomp: error: ...``) naming the file (or option) and the problem, before any segmentation, and leave
nothing in the output folder (not even the folder) nor a temporary folder anywhere.

A case builds its input under ``tmp`` and returns (argv, what the line must name); ``PROBLEM`` holds the
words the line must say. Tiny inputs only: no network ever runs here.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from legcomp import anatomy
from legcomp.cli import main
from legcomp.models import build_network, save_weights
from legcomp.phantom import generate, write_phantom

from test_dicom import _data, _positions, _siemens, _write_series  # DICOM writers (one Dixon series each)

AFF = np.diag([9.0, 9.0, 9.0, 1.0])


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A tiny valid thigh study (water, fat and labels): the material the broken ones are made from."""
    return write_phantom(generate("thigh", 1, matrix=(48, 32, 4), spacing=(9.0, 9.0, 9.0), supersample=1),
                         tmp_path_factory.mktemp("good") / "thigh_good")


@pytest.fixture(scope="module")
def calf_weights(tmp_path_factory) -> Path:
    """Untrained tiny calf stage-1 weights (only their metadata matters here)."""
    path = tmp_path_factory.mktemp("w") / "calf_stage1.pt"
    torch.manual_seed(0)
    save_weights(path, build_network("tiny", 2, anatomy.n_classes(1, "calf")), config="tiny", region="calf",
                 stage=1, patch_size=[32, 32, 8], working_spacing=[None, None, None])
    return path


def _nii(path: Path, data, affine=AFF, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data) if dtype is None else np.asarray(data).astype(dtype), affine)
    nib.save(img, str(path))
    return path


def _study(tmp: Path, good: Path, name: str = "thigh_case", water=None, fat=None, water_affine=AFF,
           fat_affine=AFF) -> Path:
    """A study folder from the good one's images, with ``water`` / ``fat`` arrays replaced where given."""
    folder = tmp / name
    w = nib.load(str(good / "water.nii.gz")).get_fdata(dtype=np.float32)
    f = nib.load(str(good / "fat.nii.gz")).get_fdata(dtype=np.float32)
    _nii(folder / "water.nii.gz", w if water is None else water, water_affine)
    _nii(folder / "fat.nii.gz", f if fat is None else fat, fat_affine)
    return folder


def _header_only(path: Path, shape: tuple[int, ...], zooms: tuple[float, ...]) -> Path:
    """A NIfTI file whose header promises ``shape`` but holds almost no data (never read)."""
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), AFF)
    img.header.set_data_shape(shape)
    img.header.set_zooms(zooms)
    img.set_sform(np.diag([*zooms, 1.0]), code=1)
    img.set_qform(np.diag([*zooms, 1.0]), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(img.header.binaryblock + b"\0" * 4 + b"\0" * 64)
    return path


def _run(study: Path, tmp: Path, *extra: str) -> list[str]:
    return ["run", str(study), "--out", str(tmp / "out"), "--quiet", "--device", "cpu", *extra]


# --------------------------------------------------------------------------- the cases
Case = Callable[[Path, Path, Path], tuple[list[str], str]]
CASES: dict[str, Case] = {}
PROBLEM: dict[str, str] = {}


def case(name: str, problem: str):
    def register(fn: Case) -> Case:
        CASES[name], PROBLEM[name] = fn, problem
        return fn
    return register


# files and folders
@case("input does not exist", r"no Dixon study found")
def _(tmp, good, w):
    return _run(tmp / "nowhere", tmp), str(tmp / "nowhere")


@case("empty folder", r"no Dixon study found")
def _(tmp, good, w):
    (tmp / "empty").mkdir()
    return _run(tmp / "empty", tmp), str(tmp / "empty")


@case("a text file as input", r"not a NIfTI file or study folder")
def _(tmp, good, w):
    (tmp / "notes.txt").write_text("hello\n")
    return _run(tmp / "notes.txt", tmp), str(tmp / "notes.txt")


@case("water without fat", r"no fat image found")
def _(tmp, good, w):
    folder = _study(tmp, good)
    (folder / "fat.nii.gz").unlink()
    return _run(folder, tmp), str(folder)


@case("fat without water", r"no water image found")
def _(tmp, good, w):
    folder = _study(tmp, good)
    (folder / "water.nii.gz").unlink()
    return _run(folder, tmp), str(folder)


@case("water is not NIfTI", r"cannot read NIfTI")
def _(tmp, good, w):
    folder = _study(tmp, good)
    (folder / "water.nii.gz").write_bytes(b"this is not an image")
    return _run(folder, tmp), str(folder / "water.nii.gz")


@case("truncated gzip", r"cannot read NIfTI")
def _(tmp, good, w):
    folder = _study(tmp, good)
    raw = gzip.decompress((folder / "fat.nii.gz").read_bytes())
    (folder / "fat.nii.gz").write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    return _run(folder, tmp), str(folder / "fat.nii.gz")


@case("two files claim water", r"two files for water")
def _(tmp, good, w):
    folder = _study(tmp, good)
    (folder / "W.nii.gz").write_bytes((folder / "water.nii.gz").read_bytes())
    return _run(folder, tmp), str(folder)


@case("4D water", r"4D")
def _(tmp, good, w):
    water = nib.load(str(good / "water.nii.gz")).get_fdata()
    folder = _study(tmp, good, water=np.stack([water, water], axis=-1))
    return _run(folder, tmp), str(folder / "water.nii.gz")


@case("2D water", r"2D")
def _(tmp, good, w):
    folder = _study(tmp, good, water=np.ones((48, 32), np.float32))
    return _run(folder, tmp), str(folder / "water.nii.gz")


@case("NaN in the image", r"NaN or inf values")
def _(tmp, good, w):
    water = nib.load(str(good / "water.nii.gz")).get_fdata(dtype=np.float32)
    water[3, 3, 1] = np.nan
    folder = _study(tmp, good, water=water)
    return _run(folder, tmp), str(folder / "water.nii.gz")


@case("all-zero image", r"all zero")
def _(tmp, good, w):
    folder = _study(tmp, good, fat=np.zeros((48, 32, 4), np.float32))
    return _run(folder, tmp), str(folder / "fat.nii.gz")


@case("complex voxels", r"unsupported voxel type")
def _(tmp, good, w):
    folder = _study(tmp, good)
    _nii(folder / "water.nii.gz", np.ones((48, 32, 4)), dtype=np.complex64)
    return _run(folder, tmp), str(folder / "water.nii.gz")


@case("water and fat shapes differ", r"shape \(48, 32, 3\) differs")
def _(tmp, good, w):
    fat = nib.load(str(good / "fat.nii.gz")).get_fdata()[:, :, :3]
    folder = _study(tmp, good, fat=fat)
    return _run(folder, tmp), str(folder / "fat.nii.gz")


@case("water and fat affines differ", r"affine differs .* by up to 5 mm")
def _(tmp, good, w):
    shifted = AFF.copy()
    shifted[0, 3] = 5.0
    folder = _study(tmp, good, fat_affine=shifted)
    return _run(folder, tmp), str(folder / "fat.nii.gz")


@case("label map with ids over 255", r"label ids must lie in 0-255")
def _(tmp, good, w):
    folder = _study(tmp, good)
    _nii(folder / "stage1.nii.gz", np.full((48, 32, 4), 300), dtype=np.int16)
    return _run(folder, tmp), str(folder / "stage1.nii.gz")


@case("label record is not JSON", r"cannot read label record")
def _(tmp, good, w):
    folder = _study(tmp, good)
    (folder / anatomy.LABEL_RECORD).write_text("{not json")
    return _run(folder, tmp), str(folder / anatomy.LABEL_RECORD)


# geometry: refused from the header, before the data are read
def _header_affine(path: Path, sform: np.ndarray, pixdim: float | None = None) -> None:
    """Rewrite a NIfTI file with ``sform`` as its affine (qform off), as a broken header would hold it."""
    img = nib.load(str(path))
    hdr = img.header.copy()
    hdr.set_sform(sform, code=1)
    hdr.set_qform(None, code=0)
    if pixdim is not None:
        hdr["pixdim"][1:4] = pixdim
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, hdr), str(path))


@case("zero affine", r"affine is zero or singular")
def _(tmp, good, w):
    folder = _study(tmp, good)
    _header_affine(folder / "water.nii.gz", np.zeros((4, 4)), pixdim=0.0)
    return _run(folder, tmp), str(folder / "water.nii.gz")


@case("singular affine", r"affine is zero or singular")
def _(tmp, good, w):
    flat = AFF.copy()
    flat[:3, 1] = flat[:3, 0]  # two voxel axes along one direction
    folder = _study(tmp, good, water_affine=flat)
    return _run(folder, tmp), str(folder / "water.nii.gz")


@case("non-finite affine", r"NaN or inf")
def _(tmp, good, w):
    bad = AFF.copy()
    bad[2, 2] = np.nan
    folder = _study(tmp, good)
    _header_affine(folder / "water.nii.gz", bad, pixdim=np.nan)  # the spacing itself is not finite
    return _run(folder, tmp), str(folder / "water.nii.gz")


@case("100 mm voxels", r"voxel size 9x9x100 mm lies outside")
def _(tmp, good, w):
    folder = _study(tmp, good, water_affine=np.diag([9.0, 9.0, 100.0, 1.0]))
    return _run(folder, tmp), str(folder / "water.nii.gz")


@case("0.001 mm voxels", r"voxel size .* lies outside")
def _(tmp, good, w):
    folder = _study(tmp, good, water_affine=np.diag([0.001, 0.001, 9.0, 1.0]))
    return _run(folder, tmp), str(folder / "water.nii.gz")


@case("matrix too large", r"would need about \d+ GB at its own grid")
def _(tmp, good, w):
    folder = _study(tmp, good)
    _header_only(folder / "water.nii", (4000, 4000, 500), (0.5, 0.5, 5.0))
    (folder / "water.nii.gz").unlink()
    return _run(folder, tmp), str(folder / "water.nii")


@case("working grid too large", r"would need about \d+ GB at the 1.5 mm working grid")
def _(tmp, good, w):
    folder = _study(tmp, good)
    _header_only(folder / "water.nii", (600, 600, 40), (40.0, 40.0, 5.0))
    (folder / "water.nii.gz").unlink()
    return _run(folder, tmp), str(folder / "water.nii")


# output paths: refused before anything is read
@case("output path is an existing file", r"the output path is an existing file")
def _(tmp, good, w):
    (tmp / "out").write_text("keep me")
    return _run(good, tmp), str(tmp / "out")


@case("a file on the output path", r"cannot make the output folder: .* is a file")
def _(tmp, good, w):
    (tmp / "afile").write_text("keep me")
    return ["run", str(good), "--out", str(tmp / "afile" / "out"), "--quiet"], str(tmp / "afile")


# options
@case("unknown region", r"invalid choice: 'knee'")
def _(tmp, good, w):
    return _run(good, tmp, "--region", "knee"), "--region"


@case("unknown fat rule", r"unknown fat rule 'otsu'")
def _(tmp, good, w):
    return _run(good, tmp, "--fat-rule", "otsu"), "otsu"


@case("unknown device", r"device 'tpu9'")
def _(tmp, good, w):
    return _run(good, tmp, "--device", "tpu9"), "tpu9"


@case("weights folder missing", r"weights folder not found")
def _(tmp, good, w):
    return _run(good, tmp, "--weights", str(tmp / "nowhere")), str(tmp / "nowhere")


@case("weights folder without weights", r"no weights for thigh stage 1")
def _(tmp, good, w):
    (tmp / "w").mkdir()
    return _run(good, tmp, "--weights", str(tmp / "w")), str(tmp / "w")


@case("corrupt weights file", r"not a readable weights file")
def _(tmp, good, w):
    (tmp / "w").mkdir()
    (tmp / "w" / "thigh_stage1.pt").write_bytes(b"not a torch file")
    return _run(good, tmp, "--weights", str(tmp / "w")), str(tmp / "w" / "thigh_stage1.pt")


@case("weights of the other region", r"weights are for region calf, not thigh")
def _(tmp, good, calf_weights):
    (tmp / "w").mkdir()
    (tmp / "w" / "thigh_stage1.pt").write_bytes(calf_weights.read_bytes())
    return _run(good, tmp, "--weights", str(tmp / "w")), str(tmp / "w" / "thigh_stage1.pt")


# DICOM
def _dixon(folder: Path, **kw) -> Path:
    _siemens(folder, **kw)
    return folder


@case("DICOM without a Dixon series", r"no Dixon water/fat series among 1 series")
def _(tmp, good, w):
    _write_series(tmp / "dcm", "t1_tse_tra", ["ORIGINAL", "PRIMARY", "M", "ND"], _data(0))
    return _run(tmp / "dcm", tmp), str(tmp / "dcm")


@case("truncated DICOM file", r"truncated")
def _(tmp, good, w):
    folder = _dixon(tmp / "dcm")
    victim = sorted(folder.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:400])
    return _run(folder, tmp), str(victim)


@case("DICOM slices unevenly spaced", r"uneven slice positions")
def _(tmp, good, w):
    pos = {"positions": _positions(gaps=[5, 5, 12, 5, 5])}
    return _run(_dixon(tmp / "dcm", water=pos, fat=pos), tmp), str(tmp / "dcm")


@case("DICOM single slice", r"single slice")
def _(tmp, good, w):
    for i, t in enumerate(("WATER", "FAT")):
        _write_series(tmp / "dcm", f"dixon_{t}", ["DERIVED", "PRIMARY", "DIXON", t], _data(i)[:, :, :1], number=i)
    return _run(tmp / "dcm", tmp), str(tmp / "dcm")


@case("DICOM two water series", r"2 candidate series for water")
def _(tmp, good, w):
    _siemens(tmp / "dcm", ("water", "fat", "water"))
    return _run(tmp / "dcm", tmp), str(tmp / "dcm")


@case("DICOM series folder missing", r"no fat series found")
def _(tmp, good, w):
    _write_series(tmp / "dcm" / "01_water", "dixon_W", ["DERIVED", "PRIMARY", "DIXON", "WATER"], _data(0))
    _write_series(tmp / "dcm" / "02_loc", "localizer", ["ORIGINAL", "PRIMARY", "LOCALIZER"], _data(1), number=2)
    return _run(tmp / "dcm", tmp), str(tmp / "dcm")


@case("DICOM series of two studies", r"2 different studies")
def _(tmp, good, w):
    _siemens(tmp / "dcm", water={"extra": {"StudyInstanceUID": generate_uid()}},
             fat={"extra": {"StudyInstanceUID": generate_uid()}})
    return _run(tmp / "dcm", tmp), str(tmp / "dcm")


@case("DICOM orientation not orthonormal", r"not two orthogonal unit vectors")
def _(tmp, good, w):
    iop = {"iop": [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]}
    return _run(_dixon(tmp / "dcm", water=iop, fat=iop), tmp), str(tmp / "dcm")


@case("DICOM zero pixel spacing", r"PixelSpacing \[0.0, 0.0\] is not positive")
def _(tmp, good, w):
    ps = {"pixel_spacing": (0.0, 0.0)}
    return _run(_dixon(tmp / "dcm", water=ps, fat=ps), tmp), str(tmp / "dcm")


# quantify and evaluate
@case("quantify: label ids outside the table", r"stage-1 map holds label ids \[7\]")
def _(tmp, good, w):
    labels = _nii(tmp / "s1.nii.gz", np.full((48, 32, 4), 7), nib.load(str(good / "water.nii.gz")).affine,
                  dtype=np.uint8)
    return ["quantify", str(good), "--stage1", str(labels), "--out", str(tmp / "out"), "--quiet"], str(labels)


@case("quantify: label map of another shape", r"shape \(48, 32, 3\) differs")
def _(tmp, good, w):
    labels = _nii(tmp / "s1.nii.gz", np.ones((48, 32, 3)), nib.load(str(good / "water.nii.gz")).affine,
                  dtype=np.uint8)
    return ["quantify", str(good), "--stage1", str(labels), "--out", str(tmp / "out"), "--quiet"], str(labels)


@case("quantify: mapping file missing", r"mapping file not found")
def _(tmp, good, w):
    return (["quantify", str(good), "--mapping", str(tmp / "ids.json"), "--out", str(tmp / "out"), "--quiet"],
            str(tmp / "ids.json"))


@case("quantify: mapping names an unknown muscle", r"mapping names unknown thigh structure 'biceps'")
def _(tmp, good, w):
    (tmp / "ids.json").write_text(json.dumps({"region": "thigh", "map": {"1": "biceps"}}))
    return (["quantify", str(good), "--mapping", str(tmp / "ids.json"), "--out", str(tmp / "out"), "--quiet"],
            str(tmp / "ids.json"))


@case("evaluate: reference folder missing", r"not a folder")
def _(tmp, good, w):
    return (["evaluate", "--pred", str(good), "--truth", str(tmp / "nowhere"), "--out", str(tmp / "out")],
            str(tmp / "nowhere"))


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.filterwarnings("ignore:Expected implicit VR:UserWarning")
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, good, calf_weights, capsys, monkeypatch, name):
    from legcomp.inference import cascade as cascade_mod

    def no_segmentation(*args, **kwargs):
        raise AssertionError("bad input reached the networks")

    monkeypatch.setattr(cascade_mod.Cascade, "predict", no_segmentation)
    argv, named = CASES[name](tmp_path, good, calf_weights)
    before = (tmp_path / "out").read_bytes() if (tmp_path / "out").is_file() else None
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("legcomp: error: "), err
    assert named in err, (named, err)
    assert __import__("re").search(PROBLEM[name], err), (PROBLEM[name], err)
    # nothing half-written: no output folder (an output path that is a file is left as it was) ...
    out = tmp_path / "out"
    assert (out.read_bytes() == before) if before is not None else not out.exists()
    # ... and no temporary folder anywhere
    assert not [p for p in tmp_path.rglob(".*tmp*")], list(tmp_path.rglob(".*tmp*"))

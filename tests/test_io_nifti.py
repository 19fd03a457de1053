"""NIfTI study reading: names, seed layouts, geometry, canonical orientation, bad input."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from legcomp.cli import main
from legcomp.errors import LegcompInputError
from legcomp.io import find_studies, read_label_map, read_study, write_study

# a non-diagonal, non-RAS affine: axes permuted and flipped (LPS-like), anisotropic voxels
AFFINE = np.array([[0.0, -0.8, 0.0, 40.0],
                   [-0.9, 0.0, 0.0, 30.0],
                   [0.0, 0.0, 5.0, -20.0],
                   [0, 0, 0, 1.0]])


def _img(seed, shape=(10, 12, 6)):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 100 + 1).astype(np.float32)


def _write(folder, names, affine=AFFINE, shape=(10, 12, 6)):
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for i, name in enumerate(names):
        data[name] = _img(i, shape)
        nib.save(nib.Nifti1Image(data[name], affine), str(folder / name))
    return data


def test_roundtrip_preserves_data_and_geometry(tmp_path):
    src = _write(tmp_path / "s1", ["Water.nii.gz", "FAT.nii", "ip.nii.gz", "Opp_phase.nii.gz"])
    s = read_study(tmp_path / "s1")
    assert s.derived == ()
    assert s.orientation == "".join(nib.aff2axcodes(AFFINE))
    assert nib.aff2axcodes(s.affine) == ("R", "A", "S")
    assert np.allclose(s.spacing, (0.8, 0.9, 5.0))  # canonical x is the input axis 1
    assert s.voxel_volume_ml == pytest.approx(0.8 * 0.9 * 5 / 1000)
    # canonical arrays map to the same world points as the input
    vox_in = np.array([3, 4, 2, 1.0])
    world = AFFINE @ vox_in
    vox_c = np.linalg.inv(s.affine) @ world
    assert s.water[tuple(np.round(vox_c[:3]).astype(int))] == src["Water.nii.gz"][3, 4, 2]
    # written back in the input geometry: identical arrays and affine
    write_study(s, tmp_path / "out")
    back = nib.load(str(tmp_path / "out" / "water.nii.gz"))
    assert np.allclose(back.affine, AFFINE)
    assert np.array_equal(back.get_fdata(dtype=np.float32), src["Water.nii.gz"])


def test_derived_phases_and_region_from_seed_layout(tmp_path):
    _write(tmp_path / "SOURCE" / "sub01" / "Calf", ["Water.nii.gz", "Fat.nii.gz"])
    _write(tmp_path / "SOURCE" / "sub01" / "Thigh", ["Water.nii.gz", "Fat.nii.gz", "In_phase.nii.gz", "Opp_phase.nii.gz"])
    found = find_studies(tmp_path / "SOURCE")
    assert [p.name for p in found] == ["Calf", "Thigh"]
    calf = read_study(found[0])
    assert calf.region == "calf" and calf.name == "sub01_calf"
    assert set(calf.derived) == {"in_phase", "opposed_phase"}
    assert np.allclose(calf.in_phase, calf.water + calf.fat)
    assert np.allclose(calf.opposed_phase, np.abs(calf.water - calf.fat))
    assert read_study(found[1]).derived == ()


def test_seed_training_layout_reads_masks(tmp_path):
    d = tmp_path / "case7"
    _write(d, ["roi_70p_Water.nii.gz", "roi_70p_Fat.nii.gz"])
    lab = np.zeros((10, 12, 6), np.uint8)
    lab[2:5, 3:7, 1:4] = 2
    lab[0:2] = 1
    nib.save(nib.Nifti1Image(lab, AFFINE), str(d / "case7_THIGH_WHOLEMUSCLE_SAT_mask.nii.gz"))
    s = read_study(d)
    assert s.region == "thigh" and set(s.labels) == {"stage1"}
    assert (s.labels["stage1"] == 2).sum() == (lab == 2).sum()
    assert np.array_equal(s.to_input_orientation(s.labels["stage1"]), lab)
    assert np.array_equal(read_label_map(d / "case7_THIGH_WHOLEMUSCLE_SAT_mask.nii.gz", s), s.labels["stage1"])


def _expect_error(path, match, **kw):
    with pytest.raises(LegcompInputError, match=match) as info:
        read_study(path, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_inputs(tmp_path):
    d = tmp_path / "nofat"
    _write(d, ["water.nii.gz"])
    assert str(d) in _expect_error(d, "no fat image")

    d = tmp_path / "shape"
    _write(d, ["water.nii.gz"])
    nib.save(nib.Nifti1Image(_img(1, (10, 12, 7)), AFFINE), str(d / "fat.nii.gz"))
    assert "fat.nii.gz" in _expect_error(d, "shape")

    d = tmp_path / "affine"
    _write(d, ["water.nii.gz"])
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    nib.save(nib.Nifti1Image(_img(1), shifted), str(d / "fat.nii.gz"))
    _expect_error(d, "affine differs")

    d = tmp_path / "nan"
    _write(d, ["water.nii.gz"])
    bad = _img(1)
    bad[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(bad, AFFINE), str(d / "fat.nii.gz"))
    _expect_error(d, "NaN")

    d = tmp_path / "zero"
    _write(d, ["water.nii.gz"])
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 6), np.float32), AFFINE), str(d / "fat.nii.gz"))
    _expect_error(d, "all zero")

    d = tmp_path / "4d"
    _write(d, ["water.nii.gz"])
    nib.save(nib.Nifti1Image(np.ones((10, 12, 6, 2), np.float32), AFFINE), str(d / "fat.nii.gz"))
    _expect_error(d, "4D")

    d = tmp_path / "truncated"
    _write(d, ["water.nii.gz", "fat.nii.gz"])
    raw = gzip.open(d / "fat.nii.gz").read()
    with gzip.open(d / "fat.nii.gz", "wb") as fh:
        fh.write(raw[: len(raw) // 2])
    _expect_error(d, "cannot read")

    d = tmp_path / "twice"
    _write(d, ["water.nii.gz", "fat.nii.gz", "F.nii.gz"])
    _expect_error(d, "two files for fat")

    _expect_error(tmp_path / "missing", "no such file")
    _expect_error(tmp_path / "nofat", "unknown region", region="knee")


def test_info_cli_and_exit_code(tmp_path, capsys):
    _write(tmp_path / "thigh_01", ["water.nii.gz", "fat.nii.gz"])
    assert main(["info", str(tmp_path / "thigh_01")]) == 0
    out = capsys.readouterr().out
    assert "thigh" in out and "opposed_phase" in out and "PLS" in out
    _write(tmp_path / "bad", ["water.nii.gz"])
    assert main(["info", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no fat image" in err


def test_label_ids_above_255_are_refused(tmp_path):
    d = tmp_path / "thigh_big"
    _write(d, ["water.nii.gz", "fat.nii.gz"])
    lab = np.zeros((10, 12, 6), np.int16)
    lab[1, 1, 1] = 258
    nib.save(nib.Nifti1Image(lab, AFFINE), str(d / "stage2.nii.gz"))
    assert "stage2.nii.gz" in _expect_error(d, "0-255")


def test_scaled_int16_keeps_float64_values(tmp_path):
    """The seed threshold must see the exact scaled values (nibabel's float64), not float32 roundings."""
    d = tmp_path / "scaled"
    d.mkdir()
    raw = np.arange(10 * 12 * 6, dtype=np.int16).reshape(10, 12, 6)
    for name in ("water", "fat"):
        img = nib.Nifti1Image(raw, AFFINE)
        img.header.set_slope_inter(0.1234567, 3.3)
        nib.save(img, str(d / f"{name}.nii.gz"))
    s = read_study(d)
    ref = nib.load(str(d / "fat.nii.gz")).get_fdata()
    assert s.fat.dtype == np.float64
    assert np.array_equal(np.sort(s.fat.ravel()), np.sort(ref.ravel()))

"""NIfTI study reading: names, seed layouts, geometry, canonical orientation, bad input."""

import gzip
from pathlib import Path

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


def _err(fn, *args, **kw) -> LegcompInputError:
    with pytest.raises(LegcompInputError) as info:
        fn(*args, **kw)
    return info.value


def test_geometry_checks_exact_bounds_and_messages():
    from legcomp.io.study import MAX_STUDY_GB, check_geometry

    assert check_geometry(np.diag([0.01, 50.0, 1.0, 1.0]), (4, 4, 4), "p") == (0.01, 50.0, 1.0)  # both ends allowed
    assert str(_err(check_geometry, np.diag([0.0099, 1, 1, 1.0]), (4, 4, 4), "p")) == \
        "p: voxel size 0.0099x1x1 mm lies outside 0.01-50 mm: a broken header?"
    assert str(_err(check_geometry, np.diag([1, 50.5, 1, 1.0]), (4, 4, 4), "p")) == \
        "p: voxel size 1x50.5x1 mm lies outside 0.01-50 mm: a broken header?"
    nan = np.eye(4)
    nan[0, 3] = np.nan
    assert str(_err(check_geometry, nan, (4, 4, 4), "p")) == \
        "p: the affine (voxel-to-world matrix) holds NaN or inf values"
    assert str(_err(check_geometry, np.eye(3), (4, 4, 4), "p")) == "p: the affine has shape (3, 3), expected 4x4"
    flat = np.eye(4)
    flat[:3, 1] = flat[:3, 0]  # two axes along x: singular
    assert str(_err(check_geometry, flat, (4, 4, 4), "p")) == \
        "p: the affine is zero or singular (voxel sizes 1x1x1 mm, determinant 0): a broken header"
    tilted = np.eye(4)
    tilted[:3, 1] = [1, 1e-7, 0]  # nearly parallel to x: determinant 1e-7 < 1e-6 x 1.41
    assert "zero or singular" in str(_err(check_geometry, tilted, (4, 4, 4), "p"))
    # memory: 8 GB at 40 bytes a voxel is 2e8 voxels
    assert MAX_STUDY_GB == 8.0
    n = 600  # 2.16e8 voxels: 8.6 GB
    assert str(_err(check_geometry, np.diag([1.5, 1.5, 1.5, 1.0]), (n, n, n), "p")).startswith(
        f"p: ({n}, {n}, {n}) voxels of 1.5x1.5x1.5 mm would need about 9 GB at its own grid (limit 8 GB): "
        "a broken header?")
    assert check_geometry(np.diag([1.5, 1.5, 1.5, 1.0]), (500, 500, 500), "p") == (1.5, 1.5, 1.5)  # 5 GB
    # fine in-plane voxels are resampled to 1.5 mm for the networks: counted at that grid
    e = _err(check_geometry, np.diag([0.1, 0.1, 5.0, 1.0]), (4000, 4000, 13), "p")
    assert "at the 1.5 mm working grid" not in str(e) and "at its own grid" in str(e)
    assert check_geometry(np.diag([0.1, 0.1, 5.0, 1.0]), (2000, 2000, 13), "p")  # 2 GB own, tiny working grid
    e = _err(check_geometry, np.diag([3.0, 3.0, 1.0, 1.0]), (2000, 2000, 20), "p")  # 3.2 GB own, 12.8 GB working
    assert "at the 1.5 mm working grid (limit 8 GB)" in str(e)
    assert _err(check_geometry, np.diag([1.0, 1, 1, 1]), (600, 600, 600, 2), "p").path == "p"  # 4D counts its volumes


def test_image_and_same_geometry_checks():
    from legcomp.io.study import check_image, check_same_geometry

    a = np.ones((3, 4, 5, 1, 1))
    out = check_image(a, "p")
    assert out.shape == (3, 4, 5) and out.dtype == np.float64
    assert check_image(np.ones((3, 4, 5), np.int16), "p").dtype == np.float32
    assert check_image(np.ones((3, 4, 5), np.float32), "p").dtype == np.float32
    assert str(_err(check_image, np.ones((3, 4)), "p")) == "p: image is 2D with shape (3, 4), expected a 3D volume"
    assert str(_err(check_image, np.ones((3, 4, 5, 2)), "p")) == \
        "p: image is 4D with shape (3, 4, 5, 2), expected a 3D volume"
    assert str(_err(check_image, np.ones((3, 0, 5)), "p")) == "p: image is empty"
    inf = np.ones((2, 2, 2))
    inf[0, 0, 0] = np.inf
    assert str(_err(check_image, inf, "p")) == "p: image contains NaN or inf values"
    assert str(_err(check_image, np.zeros((2, 2, 2)), "p")) == "p: image is all zero"
    d = np.ones((2, 2, 2))
    check_same_geometry((d, np.eye(4), "/x/w.nii"), (d, np.eye(4) + 1e-3, "f"))  # at the tolerance: same
    e = _err(check_same_geometry, (d, np.eye(4), "/x/w.nii"), (np.ones((2, 2, 3)), np.eye(4), "f.nii"))
    assert str(e) == "f.nii: shape (2, 2, 3) differs from w.nii (2, 2, 2)" and e.path == "f.nii"
    moved = np.eye(4)
    moved[1, 3] = 0.25
    assert str(_err(check_same_geometry, (d, np.eye(4), "/x/w.nii"), (d, moved, "f.nii"))) == \
        "f.nii: affine differs from w.nii by up to 0.25 mm (tolerance 0.001 mm)"
    check_same_geometry((d, np.eye(4), "w"), (d, moved, "f"), atol_mm=0.25)
    assert "tolerance 0.1 mm" in str(_err(check_same_geometry, (d, np.eye(4), "w"), (d, moved, "f"), atol_mm=0.1))


def test_make_study_labels_region_and_messages():
    from legcomp.io.study import make_study

    w, f = np.ones((3, 4, 5), np.float32), np.full((3, 4, 5), 2.0, np.float32)
    a = AFFINE
    assert str(_err(make_study, {"water": (w, a, "w")}, source="here")) == "here: no fat image found"
    assert _err(make_study, {"fat": (f, a, "f")}).path is None
    assert str(_err(make_study, {"water": (w, a, "w"), "fat": (f, a, "f")}, region="arm", source="s")) == \
        "s: unknown region 'arm'; expected thigh or calf"
    assert str(_err(make_study, {"water": (w, a, "w"), "fat": (f, a, "f")}, region="arm")) == \
        "unknown region 'arm'; expected thigh or calf"
    st = make_study({"water": (w, a, "w"), "fat": (f, a, "f")}, region="THIGH", name="n", source=Path("/s"))
    assert (st.region, st.name, st.source) == ("thigh", "n", "/s")
    assert make_study({"water": (w, a, "w"), "fat": (f, a, "f")}, region="").region == "unknown"
    lab = np.zeros((3, 4, 5, 1))
    lab[0, 0, 0, 0] = 255
    st = make_study({"water": (w, a, "w"), "fat": (f, a, "f")}, labels={"stage1": (lab, a, "l")})
    assert st.labels["stage1"].dtype == np.uint8 and st.labels["stage1"].max() == 255
    assert st.labels["stage1"].shape == st.shape
    for bad, msg in ((-1, "l: label map must hold non-negative integers"), (0.5, "l: label map must hold non-negative integers"),
                     (np.nan, "l: label map must hold non-negative integers"),
                     (256, "l: label map holds id 256; label ids must lie in 0-255")):
        lab = np.zeros((3, 4, 5))
        lab[1, 1, 1] = bad
        assert str(_err(make_study, {"water": (w, a, "w"), "fat": (f, a, "f")}, labels={"x": (lab, a, "l")})) == msg
    assert "differs from w" in str(_err(make_study, {"water": (w, a, "w"), "fat": (f, a, "f")},
                                        labels={"x": (np.zeros((3, 4, 6)), a, "l")}))
    shifted = a.copy()
    shifted[0, 3] += 0.5
    assert "affine differs" in str(_err(make_study, {"water": (w, a, "w"), "fat": (f, a, "f")},
                                        labels={"x": (np.zeros((3, 4, 5)), shifted, "l")}))
    assert make_study({"water": (w, a, "w"), "fat": (f, a + 5e-4, "f")}).derived == ("in_phase", "opposed_phase")
    assert make_study({"water": (w, a, "w"), "fat": (f, shifted, "f")}, atol_mm=0.5).shape == st.shape
    ip = np.full((3, 4, 5), 7.0, np.float32)
    st = make_study({"water": (w, a, "w"), "fat": (f, a, "f"), "in_phase": (ip, a, "ip")})
    assert st.derived == ("opposed_phase",) and (st.in_phase == 7).all() and (st.opposed_phase == 1).all()


def test_dixon_study_properties_and_writing(tmp_path):
    from legcomp.io.study import DixonStudy, make_study

    w = np.arange(1, 61, dtype=np.float32).reshape(3, 4, 5)
    st = make_study({"water": (w, AFFINE, "w"), "fat": (w, AFFINE, "f")})
    assert st.orientation == "".join(nib.aff2axcodes(AFFINE)) and st.orientation != "RAS"
    assert st.image("fat") is st.fat and st.image("in_phase") is st.in_phase
    assert str(_err(st.image, "t1")) == "unknown contrast 't1'"
    assert np.array_equal(st.to_input_orientation(st.water), w)
    p = st.save_like_input(st.water, tmp_path / "w.nii.gz", dtype=np.float32)
    img = nib.load(str(p))
    assert img.get_data_dtype() == np.float32 and np.array_equal(np.asarray(img.dataobj), w)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm" and np.allclose(img.affine, AFFINE)
    assert nib.load(str(st.save_like_input(st.water > 30, tmp_path / "m.nii.gz"))).get_data_dtype() == np.uint8
    bare = DixonStudy(water=w, fat=w, in_phase=w, opposed_phase=w, affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    assert bare.orientation == "RAS" and bare.to_input_orientation(w) is w
    assert bare.spacing == (2.0, 2.0, 3.0) and bare.voxel_volume_ml == pytest.approx(0.012)
    assert bare.shape == (3, 4, 5) and (bare.region, bare.name, bare.source) == ("unknown", "study", "")
    bare.save_like_input(w, tmp_path / "b.nii.gz", dtype=np.float32)
    assert np.allclose(nib.load(str(tmp_path / "b.nii.gz")).affine, np.diag([2.0, 2.0, 3.0, 1.0]))


def test_write_study_twice_types_and_label_map_geometry(tmp_path):
    from legcomp.io.study import make_study

    w = _img(0)
    lab = np.zeros(w.shape, np.uint8)
    lab[1:4, 2:5, 1:3] = 2
    st = make_study({"water": (w, AFFINE, "w"), "fat": (_img(1), AFFINE, "f")}, labels={"stage1": (lab, AFFINE, "l")})
    st.label_record = {"stage2": {"unlabelled": ["sartorius"]}}
    out = tmp_path / "a" / "b"
    write_study(st, out)
    write_study(st, out)  # into an existing folder: overwritten
    assert {p.name for p in out.iterdir()} == {"water.nii.gz", "fat.nii.gz", "in_phase.nii.gz", "opposed_phase.nii.gz",
                                               "stage1.nii.gz", "label_record.json"}
    assert nib.load(str(out / "water.nii.gz")).get_data_dtype() == np.float32
    assert nib.load(str(out / "stage1.nii.gz")).get_data_dtype() == np.uint8
    back = read_study(out)
    assert back.label_record == st.label_record and np.array_equal(back.labels["stage1"], st.labels["stage1"])
    write_study(st, tmp_path / "nolab", with_labels=False)
    assert not (tmp_path / "nolab" / "stage1.nii.gz").exists() and not (tmp_path / "nolab" / "label_record.json").exists()
    # a label map must match the study's input geometry; the message names the map and "study"
    nib.save(nib.Nifti1Image(lab[:, :, :4], AFFINE), str(tmp_path / "small.nii.gz"))
    e = _err(read_label_map, tmp_path / "small.nii.gz", st)
    assert str(e) == f"{tmp_path / 'small.nii.gz'}: shape (10, 12, 4) differs from study (10, 12, 6)"
    nib.save(nib.Nifti1Image(lab, AFFINE), str(tmp_path / "ok.nii.gz"))
    got = read_label_map(tmp_path / "ok.nii.gz", st)
    assert got.dtype == np.uint8 and np.array_equal(got, st.labels["stage1"])


def test_safe_name():
    from legcomp.io.atomic import safe_name

    assert safe_name('a/b\\c<d>e:f"g|h?i*j') == "a_b_c_d_e_f_g_h_i_j"
    assert safe_name("x\x00\x1f\x7fy") == "x_y"  # a run of unsafe characters is one "_"
    assert safe_name("..hidden") == "hidden" and safe_name(" .x. ") == "x" and safe_name("../..") == "_"
    assert safe_name("...") == "study" and safe_name("", default="d") == "d"
    assert safe_name("a" * 130) == "a" * 120 and safe_name("abcdef", max_len=3) == "abc"
    assert safe_name("ab. cd", max_len=3) == "ab"  # cut, then no trailing dot or space
    assert safe_name(12) == "12" and safe_name("Ü-ñ") == "Ü-ñ"


def test_check_output_folder_messages(tmp_path):
    import os

    from legcomp.io.atomic import check_output_folder

    f = tmp_path / "file"
    f.write_text("x")
    assert str(_err(check_output_folder, f)) == f"{f}: the output path is an existing file, not a folder"
    assert str(_err(check_output_folder, f / "sub" / "deeper")) == \
        f"{f / 'sub' / 'deeper'}: cannot make the output folder: {f} is a file"
    assert check_output_folder(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # only checked, not made
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert str(_err(check_output_folder, ro / "out")) == f"{ro}: the output folder is not writable"


def test_check_output_folder_not_writable_even_as_root(tmp_path, monkeypatch):
    """A folder that may be entered but not written to (as root too: os.access says so, not the mode bits)."""
    import os

    from legcomp.io import atomic

    real = os.access
    monkeypatch.setattr(atomic.os, "access", lambda p, mode, **kw: not mode & os.W_OK and real(p, mode, **kw))
    ro = tmp_path / "ro"
    ro.mkdir()
    e = _err(atomic.check_output_folder, ro / "out")
    assert str(e) == f"{ro}: the output folder is not writable" and e.path == ro


def test_load_nifti_messages_and_dtypes(tmp_path, monkeypatch):
    """Messages name the file; float32 data stay float32, other types are read as float64."""
    from legcomp.io import nifti
    from legcomp.io.nifti import load_nifti

    p = tmp_path / "x.nii.gz"
    e = _err(load_nifti, p)
    assert str(e) == f"{p}: file not found" and e.path == p
    nib.save(nib.Nifti1Image(_img(0, (4, 4, 2)), AFFINE), str(p))
    data, aff = load_nifti(p)
    assert data.dtype == np.float32 and aff.dtype == np.float64
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.int16), AFFINE), str(p))
    assert load_nifti(p)[0].dtype == np.float64
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.complex64), AFFINE), str(p))
    e = _err(load_nifti, p)
    assert str(e) == f"{p}: unsupported voxel type complex64 (expected a real-valued scalar image)" and e.path == p
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.diag([100.0, 1.0, 1.0, 1.0])), str(p))
    e = _err(load_nifti, p)
    assert str(e).startswith(f"{p}: voxel size 100x1x1 mm lies outside") and e.path == p
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), AFFINE), str(p))
    for where in ("data", "header"):  # failing while the data are read, or while the header is
        for exc, msg in ((RuntimeError("first line\nsecond"), "first line"), (RuntimeError(), "RuntimeError")):
            def fail(*args, exc=exc, **kw):
                raise exc

            with monkeypatch.context() as m:
                m.setattr(*((nib.Nifti1Image, "get_fdata") if where == "data" else (nifti.nib, "load")), fail)
                e = _err(load_nifti, p)
            assert str(e) == f"{p}: cannot read NIfTI ({msg})" and e.path == p


def test_read_nifti_study_names_labels_and_messages(tmp_path):
    """The seed's <subject>/Thigh layout names the study <subject>_thigh; label maps are read by default; a
    missing contrast lists what was found."""
    from legcomp.io.nifti import _subject_name, read_nifti_study

    assert _subject_name(tmp_path / "S01" / "Thigh") == "S01_thigh"
    assert _subject_name(tmp_path / "S01" / "CALF") == "S01_calf"
    d = tmp_path / "S02" / "Thigh"
    _write(d, ["water.nii.gz", "fat.nii.gz"], shape=(4, 4, 2))
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.uint8), AFFINE), str(d / "S02_THIGH_WHOLEMUSCLE_SAT_mask.nii.gz"))
    s = read_nifti_study(d)
    assert s.name == "S02_thigh" and set(s.labels) == {"stage1"}
    for names, found in ((["water.nii.gz", "in_phase.nii.gz"], "fat image found (found: in_phase, water"),
                         (["notes.nii.gz"], "water image found (found: no recognised Dixon images")):
        e = tmp_path / f"e{len(names)}"
        _write(e, names, shape=(4, 4, 2))
        assert str(_err(read_nifti_study, e)) == f"{e}: no {found})"


def test_find_studies_lists_half_and_broken_studies_but_not_hidden_ones(tmp_path):
    """A folder with water or fat only, or with two files for one contrast, is listed (it fails when read); a
    hidden folder is not; a file given as the root is itself the study; nothing is missing."""
    from legcomp.io.nifti import region_from_path

    root = tmp_path / "cohort"
    _write(root / "w_only", ["water.nii.gz"], shape=(4, 4, 2))
    _write(root / "f_only", ["fat.nii.gz"], shape=(4, 4, 2))
    _write(root / "twice", ["water.nii.gz", "fat.nii.gz", "F.nii.gz"], shape=(4, 4, 2))
    _write(root / ".hidden", ["water.nii.gz", "fat.nii.gz"], shape=(4, 4, 2))
    assert find_studies(root) == [root / "f_only", root / "twice", root / "w_only"]
    assert find_studies(root / "w_only" / "water.nii.gz") == [root / "w_only" / "water.nii.gz"]
    assert find_studies(root / "missing") == []
    assert region_from_path(root / "w_only") == "unknown"


def test_staged_output_moves_removes_stale_and_cleans_up(tmp_path):
    from legcomp.io.atomic import TMP_PREFIX, staged_output

    out = tmp_path / "a" / "b"
    with staged_output(out, managed=["x.txt", "stale.txt"]) as tmp:
        assert tmp.parent == out and tmp.name.startswith(TMP_PREFIX)
        (tmp / "x.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "y.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["sub", "x.txt"]
    (out / "stale.txt").write_text("old")
    (out / "mine.txt").write_text("keep")
    with staged_output(out, managed=["x.txt", "stale.txt"]) as tmp:
        (tmp / "x.txt").write_text("3")
        (tmp / "sub").mkdir()  # replaces the old folder of that name
        (tmp / "sub" / "z.txt").write_text("4")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "sub", "x.txt"]
    assert (out / "x.txt").read_text() == "3" and [p.name for p in (out / "sub").iterdir()] == ["z.txt"]
    # a failure leaves the folder as it was and removes the folders it made
    with pytest.raises(RuntimeError):
        with staged_output(out, managed=["x.txt"]) as tmp:
            (tmp / "x.txt").write_text("5")
            raise RuntimeError
    assert (out / "x.txt").read_text() == "3" and sorted(p.name for p in out.iterdir()) == ["mine.txt", "sub", "x.txt"]
    with pytest.raises(RuntimeError):
        with staged_output(tmp_path / "n1" / "n2" / "n3") as tmp:
            raise RuntimeError
    assert not (tmp_path / "n1").exists()
    keep = tmp_path / "k1"
    keep.mkdir()
    with pytest.raises(RuntimeError):
        with staged_output(keep / "n2") as tmp:
            (keep / "other.txt").write_text("someone else's")
            raise RuntimeError
    assert not (keep / "n2").exists() and (keep / "other.txt").exists()


def test_label_record_checks_and_messages(tmp_path):
    from legcomp.io.nifti import check_label_record, read_label_record

    p = tmp_path / "label_record.json"
    p.write_text('{"stage2": {"unlabelled": ["sartorius", "soleus"]}, "source": "x"}')  # either region when unknown
    assert read_label_record(p) == {"stage2": {"unlabelled": ["sartorius", "soleus"]}, "source": "x"}
    assert str(_err(read_label_record, p, "thigh")) == \
        f"{p}: label record: unknown stage-2 structure(s) 'soleus' for region thigh"
    p.write_text('{"stage1": {"unlabelled": ["sartorius"]}}')
    assert str(_err(read_label_record, p)) == \
        f"{p}: label record: unknown stage-1 structure(s) 'sartorius' for region unknown"
    p.write_text('{"stage1": {"unlabelled": ["subcutaneous_fat"]}, "stage2": {}}')
    assert read_label_record(p, "calf")["stage1"] == {"unlabelled": ["subcutaneous_fat"]}
    for text, msg in (('{"stage1": []}', 'label record: "stage1" must be an object with an "unlabelled" list'),
                      ('{"stage2": {"unlabelled": "soleus"}}',
                       'label record: "stage2" must be an object with an "unlabelled" list'),
                      ("[1]", "label record must be a JSON object")):
        p.write_text(text)
        e = _err(read_label_record, p)
        assert str(e) == f"{p}: {msg}" and e.path == p
    p.write_text("{oops")
    assert str(_err(read_label_record, p)) == \
        f"{p}: cannot read label record (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    p.write_bytes(b"\xff\xfe\x00")
    assert str(_err(read_label_record, p)).startswith(f"{p}: cannot read label record ('utf-8' codec can't decode")
    assert str(_err(read_label_record, tmp_path / "none.json")).startswith(
        f"{tmp_path / 'none.json'}: cannot read label record ([Errno 2] No such file or directory")
    assert str(_err(check_label_record, 3)) == "label record must be a JSON object"
    check_label_record({})


def test_label_record_default_region_lists_every_unknown_name(tmp_path):
    from legcomp.io.nifti import check_label_record
    from legcomp.io.study import make_study

    assert str(_err(check_label_record, {"stage2": {"unlabelled": ["a", "b"]}}, path="r.json")) == \
        "r.json: label record: unknown stage-2 structure(s) 'a', 'b' for region unknown"
    st = make_study({"water": (_img(0), AFFINE, "w"), "fat": (_img(1), AFFINE, "f")})
    img = nib.load(str(st.save_like_input(st.water, tmp_path / "w.nii.gz", dtype=np.float32)))
    np.testing.assert_allclose(img.get_qform(), AFFINE, atol=1e-5)
    np.testing.assert_allclose(img.get_sform(), AFFINE, atol=1e-5)

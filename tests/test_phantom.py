"""Tests of the synthetic Dixon phantom (small matrices only)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.phantom import generate, generate_cohort, save_preview, write_phantom
from legcomp.quantification import fat_fraction

SMALL = dict(matrix=(96, 64, 12), spacing=(4.5, 4.5, 15.0))
TINY = dict(matrix=(48, 32, 4), spacing=(9.0, 9.0, 9.0))


@pytest.fixture(scope="module")
def thigh():
    return generate("thigh", 7, **SMALL)


@pytest.fixture(scope="module")
def calf():
    return generate("calf", 7, **SMALL)


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def test_arrays_geometry_and_dixon_identities(thigh):
    ph = thigh
    for name in ("water", "fat", "in_phase", "opposed_phase"):
        a = getattr(ph, name)
        assert a.shape == (96, 64, 12) and a.dtype == np.float32 and np.isfinite(a).all() and (a >= 0).all()
    for name in ("stage1", "stage2", "legs"):
        assert getattr(ph, name).dtype == np.uint8
    np.testing.assert_allclose(ph.in_phase, ph.water + ph.fat, rtol=1e-6)
    np.testing.assert_allclose(ph.opposed_phase, np.abs(ph.water - ph.fat), rtol=1e-6, atol=1e-3)
    assert nib.aff2axcodes(ph.affine) == ("R", "A", "S")
    np.testing.assert_allclose(ph.spacing, (4.5, 4.5, 15.0))
    assert set(np.unique(ph.legs)) == {0, 1, 2}
    assert set(np.unique(ph.stage1)) == {0, 1, 2}
    # stage 2 muscles lie inside whole muscle; every labelled voxel lies in a leg
    assert (ph.stage1[ph.stage2 > 0] == anatomy.WHOLE_MUSCLE.id).all()
    assert (ph.legs[ph.stage1 > 0] > 0).all()


@pytest.mark.parametrize("region", ["thigh", "calf"])
def test_every_muscle_present_in_each_leg(region, thigh, calf):
    ph = thigh if region == "thigh" else calf
    for leg in anatomy.LEGS:
        present = set(np.unique(ph.stage2[ph.legs == leg])) - {0}
        assert present == {lab.id for lab in anatomy.MUSCLES[region]}, (region, leg, present)
        assert ph.truth["legs"][anatomy.LEGS[leg]]["sat"]["volume_ml"] > 0


def test_proximal_only_muscles(thigh, calf):
    def zprofile(ph, name, region):
        lab = anatomy.label_by_name(name, region).id
        return (ph.stage2 == lab).sum(axis=(0, 1))

    gm = zprofile(thigh, "gluteus_maximus", "thigh")
    ab = zprofile(thigh, "adductor_brevis_pectineus", "thigh")
    vm = zprofile(thigh, "vastus_medialis", "thigh")
    nz = thigh.shape[2]
    lo, hi = slice(0, nz // 3), slice(2 * nz // 3, nz)
    assert gm[lo].sum() == 0 and gm[hi].sum() > 0
    assert ab[lo].sum() == 0 and ab[hi].sum() > 0
    assert vm[lo].sum() > vm[hi].sum()  # vastus medialis bulk is distal
    gas = zprofile(calf, "gastrocnemius_medialis", "calf")
    assert gas[hi].sum() > 2 * gas[lo].sum()


def test_left_right_and_compartments(thigh, calf):
    ph = thigh
    xl = _centroid(ph.legs == 1)[0]
    xr = _centroid(ph.legs == 2)[0]
    assert xr > xl  # RAS+: the subject's right leg is at larger x
    mid = (xl + xr) / 2

    def c(ph, region, name, leg):
        return _centroid((ph.stage2 == anatomy.label_by_name(name, region).id) & (ph.legs == leg))

    for leg in (1, 2):
        rf, bf = c(ph, "thigh", "rectus_femoris", leg), c(ph, "thigh", "biceps_femoris", leg)
        vl, gr = c(ph, "thigh", "vastus_lateralis", leg), c(ph, "thigh", "gracilis", leg)
        assert rf[1] > bf[1]  # quadriceps anterior to hamstrings
        assert abs(gr[0] - mid) < abs(vl[0] - mid)  # gracilis medial (toward the midline), VL lateral
        ta, gmed = c(calf, "calf", "tibialis_anterior", leg), c(calf, "calf", "gastrocnemius_medialis", leg)
        gl = c(calf, "calf", "gastrocnemius_lateralis", leg)
        per = c(calf, "calf", "peroneus_longus_brevis", leg)
        cmid = (_centroid(calf.legs == 1)[0] + _centroid(calf.legs == 2)[0]) / 2
        assert ta[1] > gmed[1]
        assert abs(gmed[0] - cmid) < abs(gl[0] - cmid)
        assert abs(per[0] - cmid) > abs(ta[0] - cmid) - 2


def test_to_study(calf):
    st = calf.to_study()
    assert st.region == "calf" and st.shape == calf.shape
    np.testing.assert_allclose(st.spacing, calf.spacing)
    np.testing.assert_array_equal(st.labels["stage1"], calf.stage1)
    assert abs(st.voxel_volume_ml - calf.truth["voxel_volume_ml"]) < 1e-9


def test_single_leg():
    ph = generate("calf", 3, legs="left", matrix=(48, 48, 6), spacing=(4.5, 4.5, 20.0))
    assert set(np.unique(ph.legs)) == {0, 1}
    assert list(ph.truth["legs"]) == ["left"]


def test_contrast_sanity(thigh):
    ph = thigh
    sat = ph.stage1 == anatomy.SAT.id
    mus = ph.stage2 > 0
    bone = (ph.legs > 0) & (ph.stage1 == 0)
    assert np.median(ph.fat[sat]) > 3 * np.median(ph.fat[mus])
    assert np.median(ph.water[mus]) > 2 * np.median(ph.water[sat])
    assert np.percentile(ph.fat[bone], 90) > 2 * np.median(ph.fat[mus])  # fatty marrow (voxels mix with cortex)
    bg = ph.legs == 0
    assert np.median(ph.water[bg]) < 0.2 * np.median(ph.water[mus])


def test_truth_consistent_with_labels(thigh, calf):
    for ph, region in ((thigh, "thigh"), (calf, "calf")):
        for leg, t in ph.truth["legs"].items():
            for key in ("whole_muscle", "sat"):
                v, lv = t[key]["volume_ml"], t[key]["label_volume_ml"]
                assert abs(v - lv) < 0.06 * v, (region, leg, key, v, lv)
            for name, m in t["muscles"].items():
                if m["volume_ml"] > 40:
                    assert abs(m["volume_ml"] - m["label_volume_ml"]) < 0.2 * m["volume_ml"], (region, leg, name)
                assert 0.0 <= m["fat_fraction"] <= 1.0
            assert abs(t["intramat_ml"] - sum(m["fat_volume_ml"] for m in t["muscles"].values())) < 1e-6
            assert t["sat"]["fat_fraction"] > 0.7
        # image-based fat fraction in the SAT label agrees with the truth (noise is small there); measured
        # (seed 7, SMALL): thigh 0.833 vs 0.810, calf 0.815 vs 0.782 (skin and partial volume in the label)
        sat = ph.stage1 == anatomy.SAT.id
        total = ph.truth["total"]
        image_ff = float(fat_fraction(ph.water, ph.fat)[sat].mean())
        assert abs(image_ff - total["sat"]["fat_fraction"]) < 0.05, (region, image_ff, total["sat"]["fat_fraction"])
        assert total["whole_muscle"]["volume_ml"] > total["intermuscular"]["volume_ml"] > 0


def test_fine_grid_truth_matches_labels():
    ph = generate("thigh", 11, matrix=(144, 96, 6), spacing=(3.0, 3.0, 10.0))
    for t in ph.truth["legs"].values():
        for m in t["muscles"].values():
            if m["volume_ml"] > 20:
                assert abs(m["volume_ml"] - m["label_volume_ml"]) < 0.1 * m["volume_ml"]


def test_deterministic():
    a = generate("calf", 5, **TINY)
    b = generate("calf", 5, **TINY)
    c = generate("calf", 6, **TINY)
    for name in ("water", "fat", "stage1", "stage2", "legs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.water, c.water)
    assert json.dumps(a.truth, sort_keys=True) == json.dumps(b.truth, sort_keys=True)


def test_intramat_grows_with_infiltration():
    vals, ffs = [], []
    for inf in (0.0, 0.3, 0.8):
        ph = generate("thigh", 9, infiltration=inf, **TINY)
        vals.append(ph.truth["total"]["intramat_ml"])
        mus = ph.stage2 > 0
        ffs.append(float(np.mean(ph.fat[mus] / np.maximum(ph.fat[mus] + ph.water[mus], 1e-6))))
        if inf == 0.0:
            for m in ph.truth["total"]["muscles"].values():
                assert m["volume_ml"] == 0 or m["fat_fraction"] < 0.1
    assert vals[0] < vals[1] < vals[2]
    assert ffs[0] < ffs[1] < ffs[2]


def test_adiposity_thickens_sat():
    lean = generate("calf", 4, adiposity=0.0, **TINY)
    obese = generate("calf", 4, adiposity=1.0, **TINY)
    assert obese.truth["total"]["sat"]["volume_ml"] > 1.5 * lean.truth["total"]["sat"]["volume_ml"]


def test_swap_and_randomize():
    kw = dict(matrix=(48, 32, 6), spacing=(9.0, 9.0, 9.0))
    ref = generate("thigh", 2, **kw)
    sw = generate("thigh", 2, swap=True, **kw)
    np.testing.assert_array_equal(ref.stage2, sw.stage2)
    mus = ref.stage2 > 0
    assert (sw.fat[mus] > sw.water[mus]).sum() > (ref.fat[mus] > ref.water[mus]).sum()
    r1 = generate("thigh", 2, randomize=True, randomize_grid=False, **kw)
    r2 = generate("thigh", 3, randomize=True, randomize_grid=False, **kw)
    assert r1.options["snr"] != r2.options["snr"]
    assert r1.truth["total"]["whole_muscle"]["volume_ml"] > 0
    assert (r1.stage1[r1.stage2 > 0] == anatomy.WHOLE_MUSCLE.id).all()


def test_replaced_muscle_pd_goes_to_adipose():
    from legcomp.phantom.signal import FF_MAX, TissueParams, replaced_pd_factor

    ff = np.array([0.04, 0.04 + (FF_MAX - 0.04) / 2, FF_MAX, 0.01], np.float32)
    base = np.full(4, 0.04, np.float32)
    np.testing.assert_array_equal(replaced_pd_factor(ff, base, TissueParams()), 1.0)  # default phantom unchanged
    f = replaced_pd_factor(ff, base, TissueParams(replaced_pd=1.4))
    np.testing.assert_allclose(f, [1.0, 1.2, 1.4, 1.0], atol=1e-6)  # healthy 1, half-replaced 1.2, full 1.4


def test_marbled_end_stage_keeps_muscle_strands():
    from legcomp.phantom.shapes import N_CODES
    from legcomp.phantom.signal import FF_MAX, MuscleFat, muscle_ff

    tab = np.zeros(N_CODES)
    code = 20
    frac = tab.copy()
    frac[code] = 1.0  # fully fat-replaced
    base = tab.copy()
    base[code] = 0.05
    n3 = np.linspace(-2, 2, 401).astype(np.float32)
    args = (np.full(n3.size, code), np.zeros_like(n3), np.zeros_like(n3), n3, np.full_like(n3, 50.0))
    plain = muscle_ff(*args, MuscleFat(base=base, diffuse=tab, frac=frac, alpha=tab, target=tab))
    marbled = muscle_ff(*args, MuscleFat(base=base, diffuse=tab, frac=frac, alpha=tab, target=tab, strands=0.8))
    assert plain.min() > 0.9 * FF_MAX  # homogeneous fat without strands
    strand = np.abs(np.abs(n3) - 0.9) < 0.05
    assert marbled[strand].max() < 0.5 and np.allclose(marbled[np.abs(n3) < 0.5], plain[np.abs(n3) < 0.5])


def test_muscle_size_spread():
    from legcomp.phantom.shapes import REGION_SPECS, sample_subject

    template = np.stack([np.asarray(s.weight) for s in REGION_SPECS["thigh"].seeds])

    def spread(sd):
        legs = sample_subject("thigh", np.random.default_rng(5), size_sd=sd)
        live = template.min(axis=1) > 0  # seeds present along the whole leg
        return float(np.std(np.log(legs[0].seed_weight[live] / template[live]).mean(axis=1)))

    assert spread(0.35) > 2 * spread(0.12) > 0
    r = generate("thigh", 2, randomize=True, randomize_grid=False, matrix=(48, 32, 6), spacing=(9.0, 9.0, 9.0))
    assert 0.12 <= r.options["size_sd"] <= 0.35
    assert generate("thigh", 2, matrix=(48, 32, 6), spacing=(9.0, 9.0, 9.0)).options["size_sd"] == 0.12


def test_bad_options():
    with pytest.raises(LegcompInputError):
        generate("arm", 1)
    with pytest.raises(LegcompInputError):
        generate("thigh", 1, legs="middle")
    with pytest.raises(LegcompInputError):
        generate("thigh", 1, infiltration=1.5)
    with pytest.raises(LegcompInputError):
        generate("thigh", 1, spacing=(1.0, -1.0, 5.0))


def test_write_cohort_and_read_back(tmp_path):
    paths = generate_cohort("calf", 2, 40, tmp_path, progress=False, **TINY)
    assert [p.name for p in paths] == ["calf_00040", "calf_00041"]
    names = {"water", "fat", "in_phase", "opposed_phase", "stage1", "stage2", "legs"}
    for p in paths:
        assert {f.name for f in p.iterdir()} == {f"{n}.nii.gz" for n in names} | {"truth.json"}
        img = nib.load(str(p / "legs.nii.gz"))
        assert img.get_data_dtype() == np.uint8
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        truth = json.loads((p / "truth.json").read_text())
        assert truth["region"] == "calf" and truth["seed"] == int(p.name[-5:])
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # nothing half-written left
    # overwriting is atomic as well
    ph = generate("calf", 40, **TINY)
    write_phantom(ph, paths[0])
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]
    png = save_preview(paths[0], tmp_path / "prev.png")
    assert png.stat().st_size > 1000
    io = pytest.importorskip("legcomp.io")
    if not hasattr(io, "read_study"):
        pytest.skip("legcomp.io.read_study not written yet")
    st = io.read_study(paths[0])
    assert st.region == "calf"
    np.testing.assert_allclose(st.water, ph.water, rtol=1e-6)
    np.testing.assert_array_equal(st.labels["stage2"], ph.stage2)
    np.testing.assert_array_equal(st.labels["legs"], ph.legs)


def test_slice_gaps_keep_truth_consistent():
    ph = generate("calf", 12, matrix=(48, 32, 4), spacing=(9.0, 9.0, 24.0), slice_thickness=4.0)
    assert ph.options["supersample_xyz"][2] >= 3
    for t in ph.truth["legs"].values():
        v, lv = t["whole_muscle"]["volume_ml"], t["whole_muscle"]["label_volume_ml"]
        assert abs(v - lv) < 0.1 * v
    with pytest.raises(LegcompInputError):
        generate("calf", 12, matrix=(8, 8, 2), slice_thickness=-1.0)

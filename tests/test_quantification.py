"""Quantification on a hand-built two-leg volume with known answers (legcomp.quantification)."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.io.study import DixonStudy, make_study
from legcomp.quantification import (apply_label_mapping, fat_fraction, fat_mask, load_label_mapping, quantify,
                                    quantify_files, shipped_mappings, write_quantification)

RF = anatomy.label_by_name("rectus_femoris", "thigh").id
VL = anatomy.label_by_name("vastus_lateralis", "thigh").id
SHAPE_IN = (30, 60, 8)
VOX_ML = 0.8 * 1.2 * 3.0 / 1000


def affine_in(rot_deg: float = 0.0) -> np.ndarray:
    """Non-diagonal input affine: i -> world -y (0.8 mm), j -> world -x (1.2 mm), k -> z (3 mm)."""
    a = np.array([[0, -1.2, 0, 48.0], [-0.8, 0, 0, 16.0], [0, 0, 3.0, -18.0], [0, 0, 0, 1]])
    t = math.radians(rot_deg)
    rz = np.array([[math.cos(t), -math.sin(t), 0, 0], [math.sin(t), math.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return rz @ a


def build_inputs():
    """Input-orientation arrays: water, fat, stage1, stage2 (see the module docstring of the test)."""
    w = np.zeros(SHAPE_IN, np.float32)
    f = np.full(SHAPE_IN, 50.0, np.float32)  # fat.min() = 50: the min-max normalisation matters
    s1 = np.zeros(SHAPE_IN, np.uint8)
    s2 = np.zeros(SHAPE_IN, np.uint8)
    for j0, ks in ((5, slice(0, 8)), (35, slice(2, 6))):  # right leg (j small = world x large), left leg
        body = (slice(5, 25), slice(j0, j0 + 20), ks)
        mus = (slice(8, 22), slice(j0 + 3, j0 + 17), ks)
        s1[body] = anatomy.SAT.id
        w[body], f[body] = 50, 1050  # SAT: FF = 1050/1100
        s1[mus] = anatomy.WHOLE_MUSCLE.id
        w[mus], f[mus] = 300, 100  # muscle: FF 0.25, not fat by the seed rule
        s2[(slice(8, 14), mus[1], ks)] = RF
        s2[(slice(15, 22), mus[1], ks)] = VL
        inter = (slice(14, 15), mus[1], ks)  # intermuscular row
        w[inter], f[inter] = 50, 450  # FF 0.9, fat
    # right-leg RF, slice k=0: one row of fat (seed: (160-50)/1000 >= 0.1) and one row that a
    # normalisation without the minimum would call fat (140/1050 >= 0.1) but the seed does not
    w[8, 8:22, 0], f[8, 8:22, 0] = 100, 160
    w[9, 8:22, 0], f[9, 8:22, 0] = 60, 140
    return w, f, s1, s2


def build_study(rot_deg: float = 0.0) -> DixonStudy:
    w, f, s1, s2 = build_inputs()
    a = affine_in(rot_deg)
    return make_study({"water": (w, a, "water.nii.gz"), "fat": (f, a, "fat.nii.gz")}, region="thigh", name="hand",
                      labels={"stage1": (s1, a, "s1"), "stage2": (s2, a, "s2")})


@pytest.fixture(scope="module")
def study() -> DixonStudy:
    return build_study()


@pytest.fixture(scope="module")
def q(study):
    return quantify(study, study.labels["stage1"], study.labels["stage2"])


EXPECTED_VOX = {  # (leg, structure, measure) -> voxels
    ("right", "subcutaneous_fat", "volume_ml"): (400 - 196) * 8,
    ("right", "whole_muscle", "volume_ml"): 196 * 8,
    ("right", "rectus_femoris", "volume_ml"): 6 * 14 * 8,
    ("right", "vastus_lateralis", "volume_ml"): 7 * 14 * 8,
    ("left", "subcutaneous_fat", "volume_ml"): (400 - 196) * 4,
    ("left", "whole_muscle", "volume_ml"): 196 * 4,
    ("left", "rectus_femoris", "volume_ml"): 6 * 14 * 4,
    ("right", "rectus_femoris", "fat_volume_ml"): 14,
    ("right", "vastus_lateralis", "fat_volume_ml"): 0,
    ("right", "intramat", "fat_volume_ml"): 14,
    ("right", "intermat", "fat_volume_ml"): 14 * 8,
    ("right", "mat", "fat_volume_ml"): 14 + 14 * 8,
    ("left", "intramat", "fat_volume_ml"): 0,
    ("left", "intermat", "fat_volume_ml"): 14 * 4,
    ("total", "mat", "fat_volume_ml"): 14 + 14 * 12,
    ("total", "adductor_longus", "volume_ml"): 0,
}


@pytest.mark.parametrize("rot", [0.0, 17.0])
def test_exact_volumes_non_diagonal_affine(rot):
    st = build_study(rot)
    assert st.voxel_volume_ml == pytest.approx(VOX_ML)
    res = quantify(st, st.labels["stage1"], st.labels["stage2"])
    for (leg, s, m), n in EXPECTED_VOX.items():
        assert res.value(s, m, leg) == pytest.approx(n * VOX_ML, abs=1e-9), (leg, s, m)


def test_table_layout_and_totals(q):
    t = q.table
    assert list(t.columns) == ["subject", "region", "leg", "structure", "measure", "value", "unit"]
    assert set(t.leg) == {"left", "right", "total"}
    names = {lab.name for lab in anatomy.stage_labels(2, "thigh")} | {"subcutaneous_fat", "whole_muscle",
                                                                      "mat", "intramat", "intermat"}
    assert set(t.structure) == names
    vol = t[t.measure.isin(["volume_ml", "fat_volume_ml", "pv_fat_volume_ml"])]
    piv = vol.pivot_table(index=["structure", "measure"], columns="leg", values="value")
    np.testing.assert_allclose(piv["left"] + piv["right"], piv["total"], rtol=1e-9)
    for leg in ("left", "right", "total"):
        assert q.value("mat", "fat_volume_ml", leg) == pytest.approx(
            q.value("intramat", "fat_volume_ml", leg) + q.value("intermat", "fat_volume_ml", leg))
    assert set(t[t.measure == "volume_ml"].unit) == {"mL"}
    assert set(t[t.measure == "mean_fat_fraction"].unit) == {"fraction"}


def test_seed_rule_uses_min_max_normalisation(study):
    m = fat_mask(study, "seed")
    f = study.fat.astype(np.float64)
    np.testing.assert_array_equal(m, (f - 50) / 1000 >= 0.1)
    naive = study.fat / study.fat.max() >= 0.1  # what a rule ignoring the minimum would give
    assert naive.sum() > m.sum()


def test_other_fat_rules(study):
    ff = fat_fraction(study.water, study.fat)
    np.testing.assert_array_equal(fat_mask(study, "ff:0.5"), ff >= 0.5)
    np.testing.assert_array_equal(fat_mask(study, "abs:145"), study.fat >= 145)
    # median fat in SAT is 1050: sat:0.1 means fat >= 105
    np.testing.assert_array_equal(fat_mask(study, "sat:0.1", stage1=study.labels["stage1"]), study.fat >= 105)
    with pytest.raises(LegcompInputError):
        fat_mask(study, "sat:0.1")
    for bad in ("otsu", "ff:x", "ff:2", "sat:-1"):
        with pytest.raises(LegcompInputError):
            fat_mask(study, bad)
    res = quantify(study, study.labels["stage1"], study.labels["stage2"], fat_rule="ff:0.5")
    # rows i=8 and i=9 of right RF at k=0 are both fat at FF >= 0.5 (0.615 and 0.7)
    assert res.value("rectus_femoris", "fat_volume_ml", "right") == pytest.approx(28 * VOX_ML)
    assert res.meta["fat_rule"] == "ff:0.5"


def test_partial_volume_fat(q):
    rf_r = 14 * 160 / 260 + 14 * 140 / 200 + (6 * 14 * 8 - 28) * 0.25
    assert q.value("rectus_femoris", "pv_fat_volume_ml", "right") == pytest.approx(rf_r * VOX_ML, rel=1e-6)
    assert q.value("rectus_femoris", "mean_fat_fraction", "right") == pytest.approx(rf_r / (6 * 14 * 8), rel=1e-6)
    assert q.value("intermat", "pv_fat_volume_ml", "total") == pytest.approx(14 * 12 * 0.9 * VOX_ML, rel=1e-6)
    sat = (400 - 196) * 12 * 1050 / 1100
    assert q.value("subcutaneous_fat", "pv_fat_volume_ml", "total") == pytest.approx(sat * VOX_ML, rel=1e-6)
    assert q.value("mat", "pv_fat_volume_ml", "total") == pytest.approx(
        q.value("whole_muscle", "pv_fat_volume_ml", "total"))
    assert math.isnan(q.value("gluteus_maximus", "mean_fat_fraction", "total"))


def test_fat_fraction_guards():
    ff = fat_fraction(np.array([0.0, 1.0, -1.0, 3.0]), np.array([0.0, 1.0, 2.0, -1.0]))
    np.testing.assert_allclose(ff, [0.0, 0.5, 1.0, 0.0])


def test_incomplete_flag_keeps_volume(q):
    assert q.value("rectus_femoris", "incomplete", "right") == 1  # right leg spans every slice
    assert q.value("rectus_femoris", "incomplete", "left") == 0  # left leg: slices 2-5 only
    assert q.value("rectus_femoris", "incomplete", "total") == 1
    assert q.value("rectus_femoris", "volume_ml", "right") > 0
    assert "rectus_femoris" in q.meta["flags"]["incomplete"]
    assert q.value("adductor_longus", "incomplete", "total") == 0


def test_incomplete_only_when_the_field_of_view_cuts_a_large_cross_section():
    """A muscle that tapers to a thin end on the first and last slice ends inside the image: complete;
    one as wide on an edge slice as anywhere goes on beyond it: incomplete."""
    from legcomp.quantification.core import INCOMPLETE_AREA_FRACTION

    w, f, s1, s2 = build_inputs()
    s2[9:14, 8:22, [0, 7]] = 0  # right-leg RF: 1 of its 6 rows left on the edge slices
    assert 1 / 6 < INCOMPLETE_AREA_FRACTION
    a = affine_in()
    st = make_study({"water": (w, a, "w"), "fat": (f, a, "f")}, region="thigh", name="taper",
                    labels={"stage1": (s1, a, "s1"), "stage2": (s2, a, "s2")})
    res = quantify(st, st.labels["stage1"], st.labels["stage2"])
    assert res.value("rectus_femoris", "incomplete", "right") == 0
    assert res.value("rectus_femoris", "incomplete", "total") == 0
    assert res.value("vastus_lateralis", "incomplete", "right") == 1  # 7 rows on every slice
    assert res.value("whole_muscle", "incomplete", "left") == 0  # slices 2-5 of 8: inside the image
    assert res.value("whole_muscle", "incomplete", "total") == 1  # the right leg is cut
    assert "rectus_femoris" not in res.meta["flags"]["incomplete"]


def test_masks(q, study):
    s1, s2 = study.labels["stage1"], study.labels["stage2"]
    fat = fat_mask(study)
    assert set(q.masks) == {"mat", "intramat", "intermat"}
    for m in q.masks.values():
        assert m.dtype == np.uint8 and m.shape == study.shape
    np.testing.assert_array_equal(q.masks["mat"], fat & (s1 == 2))
    np.testing.assert_array_equal(q.masks["intramat"], fat & (s2 > 0))
    np.testing.assert_array_equal(q.masks["mat"], q.masks["intramat"] | q.masks["intermat"])


def test_stage2_only_and_stage1_only(study):
    s1, s2 = study.labels["stage1"], study.labels["stage2"]
    r2 = quantify(study, None, s2)
    assert r2.value("whole_muscle", "volume_ml") == pytest.approx((6 + 7) * 14 * 12 * VOX_ML)
    assert r2.value("intermat", "fat_volume_ml") == 0
    assert "subcutaneous_fat" not in set(r2.table.structure)
    assert r2.meta["whole_muscle"] == "union of stage-2 muscles"
    r1 = quantify(study, s1, None)
    assert r1.value("mat", "fat_volume_ml") == pytest.approx((14 + 14 * 12) * VOX_ML)
    assert set(r1.masks) == {"mat"}


def test_given_legs_are_used(study):
    legs = np.full(study.shape, 1, np.uint8)
    res = quantify(study, study.labels["stage1"], study.labels["stage2"], legs=legs)
    assert res.value("whole_muscle", "volume_ml", "right") == 0
    assert res.value("whole_muscle", "volume_ml", "left") == pytest.approx(196 * 12 * VOX_ML)


def test_bad_inputs(study):
    s1, s2 = study.labels["stage1"], study.labels["stage2"]
    bad1 = s1.copy()
    bad1[0, 0, 0] = 3
    with pytest.raises(LegcompInputError, match="outside"):
        quantify(study, bad1, s2)
    bad2 = s2.copy()
    bad2[0, 0, 0] = len(anatomy.THIGH_MUSCLES) + 1
    with pytest.raises(LegcompInputError, match="outside"):
        quantify(study, s1, bad2)
    with pytest.raises(LegcompInputError, match="empty"):
        quantify(study, np.zeros_like(s1), None)
    with pytest.raises(LegcompInputError, match="shape"):
        quantify(study, s1[:-1], s2)
    with pytest.raises(LegcompInputError):
        quantify(study, None, None)
    with pytest.raises(LegcompInputError):
        quantify(study, s1, s2, fat_rule="nope")
    with pytest.raises(LegcompInputError, match="shape"):
        quantify(study, s1, s2, legs=np.ones((2, 2, 2), np.uint8))
    with pytest.raises(LegcompInputError, match="region"):
        quantify(study, s1, s2, region="arm")


def test_write_quantification(tmp_path, q, study):
    out = tmp_path / "out"
    written = write_quantification(q, study, out)
    assert {p.name for p in out.iterdir()} == {"volumes.csv", "volumes.json", "mat.nii.gz", "intramat.nii.gz",
                                               "intermat.nii.gz"}
    assert set(written) == {"csv", "json", "mat", "intramat", "intermat"}
    doc = json.loads((out / "volumes.json").read_text())
    assert doc["meta"]["fat_rule"] == "seed" and doc["meta"]["legcomp_version"]
    assert doc["legs"]["right"]["mat"]["fat_volume_ml"] == pytest.approx(126 * VOX_ML)
    assert doc["legs"]["total"]["gluteus_maximus"]["mean_fat_fraction"] is None
    img = nib.load(str(out / "mat.nii.gz"))
    assert img.shape == SHAPE_IN
    np.testing.assert_allclose(img.affine, affine_in(), atol=1e-5)
    data = np.asarray(img.dataobj)
    assert data[8, 10, 0] == 1 and data[9, 10, 0] == 0 and data[14, 10, 3] == 1 and int(data.sum()) == 14 + 14 * 12
    import pandas as pd
    csv = pd.read_csv(out / "volumes.csv")
    assert len(csv) == len(q.table)


def test_write_is_atomic(tmp_path, q, study, monkeypatch):
    calls = {"n": 0}
    orig = DixonStudy.save_like_input

    def flaky(self, array, path, dtype=np.uint8):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return orig(self, array, path, dtype)

    monkeypatch.setattr(DixonStudy, "save_like_input", flaky)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        write_quantification(q, study, out)
    assert not out.exists() or not any(out.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name != "out"] == []


def test_label_mapping(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"region": "thigh", "stage": 2, "source": "test",
                                "map": {"20": "rectus_femoris", "21": "rectus_femoris", "30": "vastus_lateralis",
                                        "99": None}}))
    m = load_label_mapping(path)
    assert m == {20: "rectus_femoris", 21: "rectus_femoris", 30: "vastus_lateralis", 99: None}
    assert m.region == "thigh" and m.stage == 2
    out = apply_label_mapping(np.array([0, 20, 21, 30, 99]), m)
    np.testing.assert_array_equal(out, [0, RF, RF, VL, 0])
    with pytest.raises(LegcompInputError, match="not in the mapping"):
        apply_label_mapping(np.array([0, 20, 7]), m)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"region": "thigh", "map": {"1": "no_such_muscle"}}))
    with pytest.raises(LegcompInputError, match="unknown"):
        load_label_mapping(bad)
    bad.write_text("{not json")
    with pytest.raises(LegcompInputError):
        load_label_mapping(bad)
    with pytest.raises(LegcompInputError):
        load_label_mapping(tmp_path / "missing.json")


def test_shipped_huashan_mapping():
    assert "huashan_thigh" in shipped_mappings()
    m = load_label_mapping("huashan_thigh")
    assert m.region == "thigh" and m.stage == 2 and len(m) == 11
    assert m[8] == m[11] == "biceps_femoris"
    assert m[6] == "adductor_magnus_quadratus_femoris" and m[1] == "sartorius"


def test_quantify_files(tmp_path, study):
    pytest.importorskip("legcomp.io.nifti")
    w, f, s1, s2 = build_inputs()
    a = affine_in()
    sdir = tmp_path / "subj"
    sdir.mkdir()
    for name, arr in (("water", w), ("fat", f)):
        nib.save(nib.Nifti1Image(arr, a), str(sdir / f"{name}.nii.gz"))
    pdir = tmp_path / "pred"
    pdir.mkdir()
    nib.save(nib.Nifti1Image(s1, a), str(pdir / "s1.nii.gz"))
    foreign = np.where(s2 == RF, 21, np.where(s2 == VL, 30, 0)).astype(np.uint8)
    nib.save(nib.Nifti1Image(foreign, a), str(pdir / "s2.nii.gz"))
    mpath = tmp_path / "m.json"
    mpath.write_text(json.dumps({"region": "thigh", "stage": 2, "map": {"21": "rectus_femoris",
                                                                        "30": "vastus_lateralis"}}))
    out = tmp_path / "q"
    res = quantify_files(sdir, pdir / "s1.nii.gz", pdir / "s2.nii.gz", out, region="thigh", mapping=mpath)
    ref = quantify(study, study.labels["stage1"], study.labels["stage2"])
    np.testing.assert_allclose(res.table.value.to_numpy(), ref.table.value.to_numpy(), rtol=1e-6, equal_nan=True)
    assert (out / "volumes.csv").is_file() and (out / "intermat.nii.gz").is_file()
    with pytest.raises(LegcompInputError):
        quantify_files(sdir, pdir / "s1.nii.gz", pdir / "s2.nii.gz", None, region="thigh")  # ids 21/30 unmapped


DISPUTE_AFFINE = np.diag([2.0, 2.0, 5.0, 1.0])  # RAS+, 0.02 mL voxels
DISPUTE_VOX_ML = 2.0 * 2.0 * 5.0 / 1000


def _dispute_study():
    """Two legs (left at low x, right at high x; 3 slices), each a 6 x 6 SAT square around a 4 x 4 whole-muscle
    core that stage 2 labels rectus femoris (left) / vastus lateralis (right). Then stage 2 disagrees with
    stage 1: 4 x 3 left-leg voxels of stage-1 SAT are labelled rectus femoris, and 2 x 3 rectus femoris voxels
    lie where stage 1 is background; the given leg map leaves one 6 x 3 column of the right leg's SAT unassigned."""
    shape = (20, 10, 3)
    s1 = np.zeros(shape, np.uint8)
    s2 = np.zeros(shape, np.uint8)
    legs = np.zeros(shape, np.uint8)
    for x0, leg, mus in ((2, 1, RF), (12, 2, VL)):
        s1[x0:x0 + 6, 2:8] = anatomy.SAT.id
        s1[x0 + 1:x0 + 5, 3:7] = anatomy.WHOLE_MUSCLE.id
        s2[x0 + 1:x0 + 5, 3:7] = mus
        legs[x0 - 2:x0 + 8, :] = leg
    s2[2, 3:7] = RF  # over stage-1 SAT: 12 voxels
    s2[0, 3:5] = RF  # outside stage 1: 6 voxels
    legs[17, 2:8] = 0  # right-leg SAT without a leg: 18 voxels
    water = np.full(shape, 100.0, np.float32)
    fat = np.where(s1 == anatomy.SAT.id, 900.0, 20.0).astype(np.float32)
    study = make_study({"water": (water, DISPUTE_AFFINE, "w"), "fat": (fat, DISPUTE_AFFINE, "f")}, region="thigh",
                       name="dispute")
    return study, s1, s2, legs


def test_stage2_muscle_takes_precedence_over_stage1_and_is_flagged(q):
    study, s1, s2, legs = _dispute_study()
    assert study.voxel_volume_ml == pytest.approx(DISPUTE_VOX_ML)
    res = quantify(study, s1, s2, legs=legs)
    flags = res.meta["flags"]
    assert flags["muscle_over_sat_ml"] == pytest.approx(12 * DISPUTE_VOX_ML)
    assert flags["muscle_outside_stage1_ml"] == pytest.approx(6 * DISPUTE_VOX_ML)
    assert flags["unassigned_leg_ml"] == pytest.approx(18 * DISPUTE_VOX_ML)
    expected = {  # (structure, leg) -> voxels
        ("subcutaneous_fat", "left"): (36 - 16) * 3 - 12,  # the disputed voxels went to the muscle
        ("rectus_femoris", "left"): 16 * 3 + 12 + 6,
        ("whole_muscle", "left"): 16 * 3 + 12 + 6,
        ("subcutaneous_fat", "right"): (36 - 16) * 3 - 18,  # the unassigned column counts in no leg...
        ("vastus_lateralis", "right"): 16 * 3,
        ("subcutaneous_fat", "total"): (36 - 16) * 3 * 2 - 12,  # ...but in the total
        ("whole_muscle", "total"): 16 * 3 * 2 + 12 + 6,
    }
    for (structure, leg), n in expected.items():
        assert res.value(structure, "volume_ml", leg) == pytest.approx(n * DISPUTE_VOX_ML, abs=1e-12), (structure, leg)
    # SAT fat voxels relabelled muscle are intramuscular fat, not SAT
    assert res.value("intramat", "fat_volume_ml", "left") == pytest.approx(12 * DISPUTE_VOX_ML)
    assert int(res.masks["intramat"].sum()) == 12
    # without legs the leg map assigns every labelled voxel; maps that agree raise no flag
    auto = quantify(study, s1, s2)
    assert "unassigned_leg_ml" not in auto.meta["flags"]
    assert auto.meta["flags"]["muscle_over_sat_ml"] == pytest.approx(12 * DISPUTE_VOX_ML)
    assert q.meta["flags"]["muscle_over_sat_ml"] == 0 and q.meta["flags"]["muscle_outside_stage1_ml"] == 0
    assert "unassigned_leg_ml" not in q.meta["flags"]
    assert "muscle_over_sat_ml" not in quantify(study, None, s2, legs=legs).meta["flags"]  # nothing to disagree


def test_seed_rule_threshold_is_inclusive():
    """The seed's rule is ``>= 0.1``: a voxel exactly at the threshold is fat, one just below is not."""
    shape = (4, 3, 2)
    fat = np.full(shape, 50.0, np.float32)  # min 50
    fat[0, 0, 0] = 1050.0  # max: (F - 50) / 1000
    fat[1, 0, 0] = 150.0  # exactly 0.1
    fat[2, 0, 0] = np.nextafter(np.float32(150.0), np.float32(0.0))  # just below
    fat[3, 0, 0] = np.nextafter(np.float32(150.0), np.float32(1e9))  # just above
    study = make_study({"water": (np.full(shape, 10.0, np.float32), np.eye(4), "w"),
                        "fat": (fat, np.eye(4), "f")}, name="tie")
    assert (150.0 - 50.0) / (1050.0 - 50.0) == 0.1
    m = fat_mask(study, "seed")
    assert m[1, 0, 0] and not m[2, 0, 0] and m[3, 0, 0] and m[0, 0, 0]
    assert int(m.sum()) == 3
    s1 = np.full(shape, anatomy.WHOLE_MUSCLE.id, np.uint8)
    res = quantify(study, s1, None, legs=np.full(shape, 1, np.uint8))
    assert res.value("mat", "fat_volume_ml", "left") == pytest.approx(3 * study.voxel_volume_ml)

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


# function-scoped (cheap): mutation testing maps each test to the code it runs, fixture set-up included, so a
# module-scoped result would count only for the first test that asks for it
@pytest.fixture
def study() -> DixonStudy:
    return build_study()


@pytest.fixture
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


def _raises(fn, *args, **kw) -> LegcompInputError:
    with pytest.raises(LegcompInputError) as info:
        fn(*args, **kw)
    return info.value


def test_label_mapping_errors_name_the_file_and_the_problem(tmp_path):
    from legcomp.quantification.mapping import LabelMapping, mapping_stage

    p = tmp_path / "m.json"
    cases = [  # (document, exact message after "<path>: ")
        ({"map": {"1": "sartorius"}, "stage": 3}, "mapping stage must be 1 or 2, got 3"),
        ({"map": {"x": "sartorius"}}, "mapping key 'x' is not an integer label id"),
        ({"map": {"-1": "sartorius"}}, "mapping key '-1' is negative"),
        ({"map": {"4": 7}}, "mapping value for 4 must be a structure name or null"),
        ({"map": [1, 2]}, 'mapping JSON needs an object "map": {foreign id: legcomp name}'),
        ([1], 'mapping JSON needs an object "map": {foreign id: legcomp name}'),
        ({"region": "thigh", "map": {"1": "no_such_muscle"}}, "mapping names unknown thigh structure 'no_such_muscle'"),
        ({"region": "thigh", "map": {"1": "sartorius", "2": "subcutaneous_fat"}},
         "mapping mixes stage-1 and stage-2 structures"),
        ({"region": "thigh", "stage": 1, "map": {"1": "sartorius"}}, "mapping mixes stage-1 and stage-2 structures"),
    ]
    for doc, msg in cases:
        p.write_text(json.dumps(doc))
        exc = _raises(load_label_mapping, p)
        assert str(exc) == f"{p}: {msg}", doc
        assert exc.path == p
    p.write_text("{not json")
    assert str(_raises(load_label_mapping, p)).startswith(f"{p}: cannot read mapping JSON (Expecting property name")
    missing = tmp_path / "missing.json"
    assert str(_raises(load_label_mapping, missing)) == f"{missing}: mapping file not found (shipped mappings: " \
                                                        f"{', '.join(shipped_mappings())})"
    # a stage-2 mapping without a region: no names checked, defaults kept
    p.write_text(json.dumps({"map": {"1": "sartorius", "2": None}}))
    m = load_label_mapping(p)
    assert (m.region, m.stage, m.source, m.path) == (None, None, "", str(p))
    assert m == {1: "sartorius", 2: None}
    bare = LabelMapping({1: "sartorius"})
    assert (bare.region, bare.stage, bare.source, bare.path) == (None, None, "", "")
    # which stage a mapping's names belong to; a declared stage alone, or stage 2 when nothing says
    assert mapping_stage({1: "subcutaneous_fat", 2: "whole_muscle"}, "thigh") == 1
    assert mapping_stage({1: "sartorius"}, "thigh") == 2
    assert mapping_stage(LabelMapping({1: None}, stage=1), "thigh") == 1
    assert mapping_stage({1: None}, "calf") == 2
    assert str(_raises(mapping_stage, {1: "sartorius"}, "calf", "f.json")) == \
        "f.json: mapping names unknown calf structure 'sartorius'"


def test_shipped_mapping_by_name_with_or_without_json():
    a, b = load_label_mapping("huashan_thigh"), load_label_mapping("huashan_thigh.json")
    assert a == b and a.path == b.path and a.path.endswith("huashan_thigh.json")
    assert a.source  # the file says where its ids come from
    exc = _raises(load_label_mapping, "no_such_mapping")
    assert str(exc) == "no_such_mapping: mapping file not found (shipped mappings: huashan_thigh)"


def test_apply_label_mapping_ids_dtype_and_errors():
    from legcomp.quantification.mapping import LabelMapping

    m = LabelMapping({3: "rectus_femoris", 5: "vastus_lateralis", 40: "sartorius", 6: None}, region="thigh")
    out = apply_label_mapping(np.array([[0, 3], [5, 6]], np.int32), m)
    assert out.dtype == np.uint8 and out.shape == (2, 2)
    np.testing.assert_array_equal(out, [[0, RF], [VL, 0]])  # id 40 is above every present id: no harm
    sart = anatomy.label_by_name("sartorius", "thigh").id
    np.testing.assert_array_equal(apply_label_mapping(np.array([40, 0]), m), [sart, 0])
    np.testing.assert_array_equal(apply_label_mapping(np.array([3.0, 5.0]), m), [RF, VL])  # whole floats
    np.testing.assert_array_equal(apply_label_mapping(np.zeros((0,), np.int64), m), np.zeros((0,), np.uint8))
    np.testing.assert_array_equal(apply_label_mapping(np.zeros(3, np.uint8), m), [0, 0, 0])
    assert apply_label_mapping(np.zeros(3, np.uint8), m).dtype == np.uint8
    # region from the argument over the mapping's own; none at all is an error
    plain = {3: "soleus"}
    np.testing.assert_array_equal(apply_label_mapping(np.array([3]), plain, "calf"),
                                  [anatomy.label_by_name("soleus", "calf").id])
    assert str(_raises(apply_label_mapping, np.array([3]), plain, None, "x.nii")) == \
        "x.nii: the label mapping needs a region (thigh or calf)"
    for bad in (np.array([1.5]), np.array([-3.0]), np.array([-3])):
        assert str(_raises(apply_label_mapping, bad, m, None, "x.nii")) == \
            "x.nii: label map must hold non-negative integers"
    assert str(_raises(apply_label_mapping, np.array([0, 7, 3, 9, 7]), m, None, "x.nii")) == \
        "x.nii: label ids [7, 9] are not in the mapping (map them to null to ignore them)"
    assert str(_raises(apply_label_mapping, np.array([1]), {1: "soleus"}, "thigh", "x.nii")) == \
        "x.nii: mapping names unknown thigh structure 'soleus'"


def test_quantification_value_json_and_read_labels_for(q, study):
    from legcomp.quantification.core import quantification_json, read_labels_for

    with pytest.raises(KeyError):
        q.value("rectus_femoris", "volume_ml", "middle")
    assert q.value("rectus_femoris", "volume_ml", "total") == pytest.approx(6 * 14 * 12 * VOX_ML)
    doc = quantification_json(q)
    assert doc["subject"] == "hand" and doc["region"] == "thigh" and doc["meta"] is q.meta
    assert doc["units"] == {"volume_ml": "mL", "fat_volume_ml": "mL", "pv_fat_volume_ml": "mL",
                            "mean_fat_fraction": "fraction", "incomplete": "flag", "confidence": "fraction"}
    assert doc["legs"]["total"]["gluteus_maximus"]["mean_fat_fraction"] is None
    assert doc["legs"]["left"]["rectus_femoris"]["volume_ml"] == pytest.approx(6 * 14 * 4 * VOX_ML)
    # the study's own map, translated only when the mapping is of that stage
    s2 = study.labels["stage2"]
    assert read_labels_for(study, None, "stage2") is s2
    assert read_labels_for(study, None, "legs") is None
    swap = {RF: "vastus_lateralis", VL: "rectus_femoris"}
    np.testing.assert_array_equal(read_labels_for(study, None, "stage2", swap, "thigh", 2),
                                  np.where(s2 == RF, VL, np.where(s2 == VL, RF, 0)))
    assert read_labels_for(study, None, "stage2", swap, "thigh", 1) is s2
    assert read_labels_for(study, None, "stage1", swap, "thigh", 2) is study.labels["stage1"]


def _study_folder(tmp_path, name="subj", legs=None, with_labels=True):
    w, f, s1, s2 = build_inputs()
    a = affine_in()
    sdir = tmp_path / name
    sdir.mkdir()
    arrays = {"water": w, "fat": f}
    if with_labels:
        arrays.update(stage1=s1, stage2=s2)
    if legs is not None:
        arrays["legs"] = legs
    for key, arr in arrays.items():
        nib.save(nib.Nifti1Image(arr, a), str(sdir / f"{key}.nii.gz"))
    return sdir, s1, s2


def test_quantify_files_inputs_defaults_and_the_study_s_own_maps(tmp_path, study):
    sdir, s1, s2 = _study_folder(tmp_path, "thigh_07")
    res = quantify_files(sdir, None, None, None)  # the folder's own stage1/stage2; region from its name
    ref = quantify(study, study.labels["stage1"], study.labels["stage2"])
    np.testing.assert_allclose(res.table.value.to_numpy(), ref.table.value.to_numpy(), rtol=1e-6, equal_nan=True)
    assert res.meta["inputs"] == {"study": str(sdir), "stage1": None, "stage2": None, "mapping": None}
    assert res.meta["fat_rule"] == "seed" and res.meta["region"] == "thigh" and res.meta["legs_source"] == "leg_map"
    assert not (tmp_path / "q").exists()
    res = quantify_files(sdir, sdir / "stage1.nii.gz", None, tmp_path / "q", fat_rule="ff:0.5", mapping="huashan_thigh")
    assert res.meta["inputs"] == {"study": str(sdir), "stage1": str(sdir / "stage1.nii.gz"), "stage2": None,
                                  "mapping": str(load_label_mapping("huashan_thigh").path)}
    assert res.meta["fat_rule"] == "ff:0.5" and (tmp_path / "q" / "volumes.csv").is_file()


def test_quantify_files_uses_the_study_s_leg_map(tmp_path):
    legs = np.full(SHAPE_IN, 1, np.uint8)  # every voxel "left"
    sdir, _, _ = _study_folder(tmp_path, "thigh_legs", legs=legs)
    res = quantify_files(sdir, None, None, None)
    assert res.meta["legs_source"] == "given"
    assert res.value("whole_muscle", "volume_ml", "right") == 0
    assert res.value("whole_muscle", "volume_ml", "left") == pytest.approx(196 * 12 * VOX_ML)
    empty_legs = tmp_path / "thigh_nolegs"
    _study_folder(tmp_path, "thigh_nolegs", legs=np.zeros(SHAPE_IN, np.uint8))
    assert quantify_files(empty_legs, None, None, None).meta["legs_source"] == "leg_map"  # an empty map is none


def test_quantify_files_errors_name_the_file(tmp_path):
    sdir, s1, s2 = _study_folder(tmp_path, "subj", with_labels=False)  # region unknown from its name
    exc = _raises(quantify_files, sdir, None, None, None)
    assert str(exc) == f"{sdir}: no stage-1 or stage-2 label map given or found" and exc.path == sdir
    a = affine_in()
    p1, p2 = tmp_path / "s1.nii.gz", tmp_path / "s2.nii.gz"
    bad1 = s1.copy()
    bad1[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad1, a), str(p1))
    nib.save(nib.Nifti1Image(s2, a), str(p2))
    exc = _raises(quantify_files, sdir, p1, None, None)
    assert exc.path == p1 and str(exc).startswith(f"{p1}: stage-1 map holds label ids [7]")
    exc = _raises(quantify_files, sdir, None, p2, None)  # stage 2 needs a region
    assert exc.path is None and str(exc) == "subj: region unknown; pass region='thigh' or 'calf' to quantify stage-2 labels"
    bad2 = s2.copy()
    bad2[0, 0, 0] = 200
    nib.save(nib.Nifti1Image(bad2, a), str(p2))
    exc = _raises(quantify_files, sdir, None, p2, None, region="thigh")
    assert exc.path == p2 and str(exc).startswith(f"{p2}: stage-2 map holds label ids [200]")
    nib.save(nib.Nifti1Image(s1, a), str(p1))
    exc = _raises(quantify_files, sdir, p1, None, None, fat_rule="otsu")  # not the map's fault
    assert exc.path is None and str(exc).startswith("unknown fat rule 'otsu'")
    # a mapping without a region cannot stand in for the study's unknown one
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"stage": 2, "map": {str(RF): "rectus_femoris", str(VL): "vastus_lateralis"}}))
    exc = _raises(quantify_files, sdir, None, p2, None, mapping=m)
    assert str(exc) == f"{sdir}: region unknown; pass --region" and exc.path == sdir
    # the mapping's region is used when the study has none
    nib.save(nib.Nifti1Image(s2, a), str(p2))
    m.write_text(json.dumps({"region": "thigh", "stage": 2, "map": {str(RF): "rectus_femoris",
                                                                     str(VL): "vastus_lateralis"}}))
    res = quantify_files(sdir, p1, p2, None, mapping=m)
    assert res.meta["region"] == "thigh" and res.value("rectus_femoris", "volume_ml") == pytest.approx(6 * 14 * 12 * VOX_ML)
    # a region given beats the mapping's
    m.write_text(json.dumps({"region": "calf", "stage": 1, "map": {"1": "subcutaneous_fat", "2": "whole_muscle"}}))
    res = quantify_files(sdir, p1, p2, None, region="thigh", mapping=m)
    assert res.meta["region"] == "thigh" and res.value("rectus_femoris", "volume_ml") > 0


def test_fat_rule_parsing_boundaries_and_messages():
    from legcomp.quantification.fat import describe_fat_rule, parse_fat_rule

    assert parse_fat_rule(" SEED ") == ("seed", None)
    assert parse_fat_rule("FF:0") == ("ff", 0.0) and parse_fat_rule("ff:1") == ("ff", 1.0)
    assert parse_fat_rule("abs:-5") == ("abs", -5.0) and parse_fat_rule("sat:0.5") == ("sat", 0.5)
    for rule, msg in (("otsu", "unknown fat rule 'otsu'; expected seed, ff:T, sat:T or abs:V"),
                      ("ff", "unknown fat rule 'ff'; expected seed, ff:T, sat:T or abs:V"),
                      ("ff:x", "fat rule 'ff:x': 'x' is not a number"),
                      ("ff:0.5:1", "fat rule 'ff:0.5:1': '0.5:1' is not a number"),  # split at the first colon
                      ("abs:inf", "fat rule 'abs:inf': threshold must be finite"),
                      ("ff:nan", "fat rule 'ff:nan': threshold must be finite"),
                      ("ff:1.01", "fat rule 'ff:1.01': fat-fraction threshold must lie in 0-1"),
                      ("ff:-0.01", "fat rule 'ff:-0.01': fat-fraction threshold must lie in 0-1"),
                      ("sat:0", "fat rule 'sat:0': SAT multiple must be positive")):
        assert str(_raises(parse_fat_rule, rule)) == msg
    assert describe_fat_rule("seed") == "(F - min F) / (max F - min F) >= 0.1 over the whole image (seed study)"
    assert describe_fat_rule("ff:0.5") == "F / (W + F) >= 0.5"
    assert describe_fat_rule("sat:0.3") == "F >= 0.3 x median F in subcutaneous fat"
    assert describe_fat_rule("abs:100") == "F >= 100.0 (signal units)"


def test_fat_mask_thresholds_are_inclusive_and_errors_name_the_study():
    shape = (2, 2, 1)
    water = np.array([[[100.0], [50.0]], [[0.0], [0.0]]], np.float32)
    fat = np.array([[[100.0], [50.0]], [[0.0], [10.0]]], np.float32)
    st = make_study({"water": (water, np.eye(4), "w"), "fat": (fat, np.eye(4), "f")}, name="tiny")
    ff = fat_fraction(st.water, st.fat)
    assert ff.dtype == np.float32
    np.testing.assert_array_equal(fat_mask(st, "ff:0.5"), ff >= 0.5)
    assert int(fat_mask(st, "ff:0.5").sum()) == 3  # 0.5, 0.5 (on the threshold) and 1.0
    assert int(fat_mask(st, "abs:50").sum()) == 2 and fat_mask(st, "abs:50")[st.fat == 50].all()
    s1 = np.where(st.fat == 100, anatomy.SAT.id, 0).astype(np.uint8)  # SAT median fat 100
    np.testing.assert_array_equal(fat_mask(st, "sat:0.5", stage1=s1), st.fat >= 50)
    assert str(_raises(fat_mask, st, "sat:0.5")) == "fat rule 'sat:0.5' needs a stage-1 map (subcutaneous fat)"
    assert str(_raises(fat_mask, st, "sat:0.5", stage1=np.zeros(shape, np.uint8))) == \
        "fat rule 'sat:0.5': the stage-1 map has no subcutaneous fat"
    assert str(_raises(fat_mask, st, "sat:0.5", stage1=np.zeros((2, 2, 2), np.uint8))) == \
        "stage-1 map shape (2, 2, 2) differs from the study's (2, 2, 1)"
    flat = make_study({"water": (water, np.eye(4), "w"), "fat": (np.full(shape, 7, np.float32), np.eye(4), "f")},
                      name="flat")
    assert str(_raises(fat_mask, flat, "seed")) == \
        "flat: fat image is constant; the seed fat rule cannot normalise it"
    assert fat_mask(flat, "abs:7").all()


def test_label_map_checks_exact_messages(study):
    s1, s2 = study.labels["stage1"], study.labels["stage2"]
    n2 = len(anatomy.stage_labels(2, "thigh"))
    bad1 = s1.copy()
    bad1[0, 0, :2] = [3, 5]
    assert str(_raises(quantify, study, bad1, None)) == "stage-1 map holds label ids [3, 5] outside the stage-1 label table (1-2)"
    bad2 = s2.copy()
    bad2[0, 0, 0] = n2 + 1
    assert str(_raises(quantify, study, None, bad2)) == \
        f"stage-2 map holds label ids [{n2 + 1}] outside the thigh label table (1-{n2})"
    ok2 = s2.copy()
    ok2[0, 0, 0] = n2  # the last muscle id is in the table
    assert quantify(study, None, ok2).value(anatomy.stage_labels(2, "thigh")[-1].name, "volume_ml") > 0
    assert str(_raises(quantify, study, s1[:-1], None)) == \
        f"stage-1 map shape {s1[:-1].shape} differs from the study's {study.shape}"
    assert str(_raises(quantify, study, s1.astype(np.float32) + 0.5, None)) == "stage-1 map must hold integer label ids"
    nan = s1.astype(np.float32)
    nan[0, 0, 0] = np.nan
    assert str(_raises(quantify, study, nan, None)) == "stage-1 map must hold integer label ids"
    assert str(_raises(quantify, study, s1.astype(np.int16) - 1, None)) == "stage-1 map holds negative label ids"
    assert str(_raises(quantify, study, None, np.zeros_like(s2))) == "stage-2 map is empty (no labelled voxel)"
    assert str(_raises(quantify, study, None, None)) == \
        "hand: nothing to quantify (no stage-1 or stage-2 label map)"
    assert str(_raises(quantify, study, s1, s2, legs=np.full(study.shape, 3, np.uint8))) == \
        "leg map holds ids outside [1, 2]"
    assert str(_raises(quantify, study, s1, s2, legs=np.full(study.shape, -1, np.int8))) == \
        "leg map holds ids outside [1, 2]"
    assert str(_raises(quantify, study, s1, s2, legs=np.ones((2, 2, 2), np.uint8))) == \
        f"leg map shape (2, 2, 2) differs from the study's {study.shape}"
    # whole floats are label ids; a stage-1 map alone needs no region
    res = quantify(study, s1.astype(np.float64), None, region=None)
    assert res.value("whole_muscle", "volume_ml") == pytest.approx(196 * 12 * VOX_ML)
    unknown = make_study({"water": (study.water, study.affine, "w"), "fat": (study.fat, study.affine, "f")}, name="u")
    assert quantify(unknown, s1, None).meta["region"] == "unknown"
    assert str(_raises(quantify, unknown, None, s2)) == \
        "u: region unknown; pass region='thigh' or 'calf' to quantify stage-2 labels"
    assert quantify(unknown, None, s2, region="thigh").meta["region"] == "thigh"


def test_meta_records_the_inputs(q, study):
    m = q.meta
    assert m["subject"] == "hand" and m["region"] == "thigh" and m["fat_rule"] == "seed"
    assert m["fat_rule_definition"] == "(F - min F) / (max F - min F) >= 0.1 over the whole image (seed study)"
    assert m["voxel_volume_ml"] == pytest.approx(VOX_ML) and m["spacing_mm"] == pytest.approx([1.2, 0.8, 3.0])
    assert m["shape"] == list(study.shape) and m["legs_source"] == "leg_map"
    assert m["whole_muscle"] == "stage1 whole muscle united with stage-2 muscles"
    assert m["study_source"] == study.source and m["created_utc"].endswith("+00:00")
    assert m["flags"]["legs_present"] == ["left", "right"] and m["flags"]["single_leg"] is False
    assert m["flags"]["incomplete"] == sorted(m["flags"]["incomplete"])
    assert len(m["slice_coverage"]) == study.shape[2] and m["hip"]["slices"] == [] and m["notes"] == []
    r1 = quantify(study, study.labels["stage1"], None, subject="other")
    assert r1.meta["whole_muscle"] == "stage1 whole muscle" and r1.meta["subject"] == "other"
    assert set(r1.table.subject) == {"other"} and "muscle_over_sat_ml" not in r1.meta["flags"]
    one = np.where(study.labels["stage1"] > 0, 1, 0).astype(np.uint8)
    legs = np.full(study.shape, 2, np.uint8)
    r = quantify(study, study.labels["stage1"], None, legs=legs)
    assert r.meta["flags"]["legs_present"] == ["right"] and r.meta["flags"]["single_leg"] is True
    assert one.any()
    legs[tuple(np.argwhere(study.labels["stage1"] > 0)[0])] = 1  # a left leg of one voxel is a leg
    r = quantify(study, study.labels["stage1"], None, legs=legs)
    assert r.meta["flags"]["legs_present"] == ["left", "right"] and r.meta["flags"]["single_leg"] is False


def test_confidence_measure_is_the_mean_probability(study):
    s1, s2 = study.labels["stage1"], study.labels["stage2"]
    c1 = np.full(study.shape, 0.5, np.float32)
    c2 = np.where(s2 == RF, 0.9, 0.7).astype(np.float32)
    c2[..., 0][s2[..., 0] == RF] = 0.6  # right RF (the left leg spans slices 2-5), slice 0: 6 x 14 voxels
    assert int((s2[..., 0] == RF).sum()) == 84
    res = quantify(study, s1, s2, confidence={1: c1, 2: c2})
    assert res.value("subcutaneous_fat", "confidence", "total") == pytest.approx(0.5)
    assert res.value("whole_muscle", "confidence", "left") == pytest.approx(0.5)
    n = 6 * 14 * 8
    assert res.value("rectus_femoris", "confidence", "right") == pytest.approx((0.9 * (n - 84) + 0.6 * 84) / n)
    assert res.value("rectus_femoris", "confidence", "left") == pytest.approx(0.9)
    assert res.value("vastus_lateralis", "confidence", "total") == pytest.approx(0.7)
    assert math.isnan(res.value("gluteus_maximus", "confidence", "total"))
    assert set(res.table[res.table.measure == "confidence"].unit) == {"fraction"}
    assert "confidence" not in set(res.table[res.table.structure.isin(["mat", "intramat", "intermat"])].measure)
    assert "confidence" not in set(quantify(study, s1, s2).table.measure)
    assert str(_raises(quantify, study, s1, s2, confidence={2: np.ones((2, 2, 2))})) == \
        f"stage-2 confidence map shape (2, 2, 2) differs from the study's {study.shape}"


def test_incomplete_at_exactly_a_quarter_of_the_largest_cross_section():
    from legcomp.quantification.core import _cut_by_field_of_view

    area = np.array([[1, 0, 1], [4, 4, 8], [4, 3, 7]], float)  # slices x rows (left, right, total)
    np.testing.assert_array_equal(_cut_by_field_of_view(area, [0, 2]), [True, True, True])
    area = np.array([[0.99, 0, 0.99], [4, 4, 8], [0, 0.99, 0.99]])
    np.testing.assert_array_equal(_cut_by_field_of_view(area, [0, 2]), [False, False, False])
    np.testing.assert_array_equal(_cut_by_field_of_view(np.zeros((3, 3)), [0, 2]), [False, False, False])
    area = np.array([[0, 2, 2], [0, 4, 4], [0, 0, 0]], float)  # the right leg is cut: so is the total
    np.testing.assert_array_equal(_cut_by_field_of_view(area, [0, 2]), [False, True, True])
    area = np.array([[0, 0, 0], [4, 0, 4], [0, 0, 0]], float)  # the middle slice is an edge next to a gap
    np.testing.assert_array_equal(_cut_by_field_of_view(area, [1]), [True, False, True])


def test_mapping_details_background_id_none_values_and_float_maps(tmp_path, q):
    from legcomp.quantification.mapping import mapping_stage

    with pytest.raises(KeyError) as info:
        q.value("rectus_femoris", "volume_ml", "middle")
    assert info.value.args == (("rectus_femoris", "volume_ml", "middle"),)
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"region": "thigh", "map": {"0": None, "1": "sartorius"}}))
    assert load_label_mapping(p) == {0: None, 1: "sartorius"}  # id 0 may be mapped too
    assert mapping_stage({1: None, 2: "subcutaneous_fat"}, "thigh") == 1  # ignored ids say nothing
    np.testing.assert_array_equal(apply_label_mapping(np.array([0.0, 1.0]), load_label_mapping(p)),
                                  [0, anatomy.label_by_name("sartorius", "thigh").id])


def test_quantify_files_applies_a_mapping_to_the_map_of_its_stage(tmp_path, study):
    sdir, s1, s2 = _study_folder(tmp_path, "subj", with_labels=False)
    a = affine_in()
    p1, p2 = tmp_path / "s1.nii.gz", tmp_path / "s2.nii.gz"
    nib.save(nib.Nifti1Image((s1 * 10).astype(np.uint8), a), str(p1))  # foreign stage-1 ids 10 / 20
    nib.save(nib.Nifti1Image(s2, a), str(p2))
    m1 = tmp_path / "m1.json"
    m1.write_text(json.dumps({"stage": 1, "map": {"10": "subcutaneous_fat", "20": "whole_muscle"}}))  # no region
    ref = quantify(study, study.labels["stage1"], study.labels["stage2"])
    res = quantify_files(sdir, p1, p2, None, region="thigh", mapping=m1)
    np.testing.assert_allclose(res.table.value.to_numpy(), ref.table.value.to_numpy(), rtol=1e-6, equal_nan=True)
    assert res.meta["inputs"]["mapping"] == str(m1)
    res = quantify_files(sdir, p1, None, None, region="thigh", mapping={10: "subcutaneous_fat", 20: "whole_muscle"})
    assert res.value("whole_muscle", "volume_ml") == pytest.approx(196 * 12 * VOX_ML)
    assert res.meta["inputs"]["mapping"] is None  # a dict has no file
    exc = _raises(quantify_files, sdir, p1, None, None, mapping={10: "subcutaneous_fat", 20: "whole_muscle"})
    assert str(exc) == f"{sdir}: region unknown; pass --region"


def test_written_tables_masks_and_stale_files(tmp_path, q, study):
    import pandas as pd

    from legcomp.quantification.core import COLUMNS

    out = tmp_path / "out"
    write_quantification(q, study, out)
    csv = pd.read_csv(out / "volumes.csv")
    assert list(csv.columns) == list(COLUMNS) and len(csv) == len(q.table)
    for line in (out / "volumes.csv").read_text().splitlines()[1:]:
        value = line.split(",")[5]
        assert value == "" or len(value.replace("-", "").replace(".", "").lstrip("0").split("e")[0]) <= 6, line
    for k in ("mat", "intramat", "intermat"):
        assert nib.load(str(out / f"{k}.nii.gz")).get_data_dtype() == np.uint8
    # a stage-1-only result written over it: the stage-2 masks of the earlier run are removed
    only1 = quantify(study, study.labels["stage1"], None)
    write_quantification(only1, study, out)
    assert sorted(p.name for p in out.iterdir()) == ["mat.nii.gz", "volumes.csv", "volumes.json"]


def test_a_foreign_map_with_unmapped_ids_is_named(tmp_path):
    sdir, s1, s2 = _study_folder(tmp_path, "thigh_f", with_labels=False)
    p2 = tmp_path / "s2.nii.gz"
    nib.save(nib.Nifti1Image(np.where(s2 == RF, 21, np.where(s2 == VL, 30, 0)).astype(np.uint8), affine_in()), str(p2))
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"region": "thigh", "stage": 2, "map": {"21": "rectus_femoris"}}))
    exc = _raises(quantify_files, sdir, None, p2, None, mapping=m)
    assert exc.path == p2 and str(exc) == \
        f"{p2}: label ids [30] are not in the mapping (map them to null to ignore them)"


def test_incomplete_rule_per_row_and_for_the_total():
    from legcomp.quantification.core import _cut_by_field_of_view as cut

    z3 = [0, 0, 0]
    np.testing.assert_array_equal(cut(np.array([[1, 0, 1], [4, 0, 4], z3], float), [0, 2]), [True, False, True])
    np.testing.assert_array_equal(cut(np.array([[1, 0, 1], [2, 0, 2], z3], float), [0, 2]), [True, False, True])
    np.testing.assert_array_equal(cut(np.array([[1, 0, 1], [4, 0, 8], z3], float), [0, 2]), [True, False, True])
    # the total alone (unassigned voxels), a leg alone (the total is cut when either leg is)
    np.testing.assert_array_equal(cut(np.array([[0, 0, 3], [4, 4, 8], z3], float), [0, 2]), [False, False, True])
    np.testing.assert_array_equal(cut(np.array([[0, 2, 2], [0, 4, 20], z3], float), [0, 2]), [False, True, True])


def test_empty_region_is_unknown(study):
    unknown = make_study({"water": (study.water, study.affine, "w"), "fat": (study.fat, study.affine, "f")}, name="u")
    assert quantify(unknown, study.labels["stage1"], None, region="").meta["region"] == "unknown"


def test_quantify_details_sat_rule_single_voxels_measures_and_inputs(tmp_path, study, q):
    s1, s2 = study.labels["stage1"], study.labels["stage2"]
    # the sat rule needs stage 1, which quantify hands on
    res = quantify(study, s1, s2, fat_rule="sat:0.1")
    assert res.value("mat", "fat_volume_ml") == pytest.approx(float(((study.fat >= 105) & (s1 == 2)).sum()) * VOX_ML)
    # every fat measure of the fat masks, and nothing else
    for name in ("mat", "intramat", "intermat"):
        assert set(q.table[q.table.structure == name].measure) == {"fat_volume_ml", "pv_fat_volume_ml",
                                                                   "mean_fat_fraction", "incomplete"}
    # a one-voxel muscle has its voxel's fat fraction and confidence
    one = np.zeros_like(s2)
    idx = tuple(np.argwhere(s2 == RF)[0])
    one[idx] = RF
    r = quantify(study, None, one, confidence={2: np.full(study.shape, 0.3, np.float32)})
    ff = fat_fraction(study.water, study.fat)[idx]
    assert r.value("rectus_femoris", "mean_fat_fraction") == pytest.approx(float(ff))
    assert r.value("rectus_femoris", "confidence") == pytest.approx(0.3)
    # a structure cut by the field of view in the left leg only is flagged (its total is cut)
    legs = np.where(np.arange(study.shape[0])[:, None, None] < 15, 2, 1) * np.ones(study.shape, np.uint8)
    cut_left = quantify(study, s1, s2, legs=legs)  # left: the leg on every slice; right: slices 2-5 only
    assert [cut_left.value("whole_muscle", "incomplete", leg) for leg in ("left", "right")] == [1.0, 0.0]
    assert "whole_muscle" in cut_left.meta["flags"]["incomplete"]
    for name in cut_left.meta["flags"]["incomplete"]:
        assert cut_left.value(name, "incomplete", "total") == 1
    assert sorted(n for n in set(cut_left.table.structure) if cut_left.value(n, "incomplete", "total") == 1) == \
        cut_left.meta["flags"]["incomplete"]
    # the stage-2 map's file is recorded
    sdir, _, s2f = _study_folder(tmp_path, "thigh_in")
    res = quantify_files(sdir, None, sdir / "stage2.nii.gz", None)
    assert res.meta["inputs"]["stage2"] == str(sdir / "stage2.nii.gz")
    # a stage-2 mapping without a region uses the region given
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"stage": 2, "map": {str(RF): "vastus_lateralis", str(VL): "rectus_femoris"}}))
    res = quantify_files(sdir, None, sdir / "stage2.nii.gz", None, region="thigh", mapping=m)
    assert res.value("vastus_lateralis", "volume_ml") == pytest.approx(6 * 14 * 12 * VOX_ML)
    # ... or, with none given, the study's own (from its folder name)
    res = quantify_files(sdir, None, sdir / "stage2.nii.gz", None, mapping=m)
    assert res.meta["region"] == "thigh"
    assert res.value("vastus_lateralis", "volume_ml") == pytest.approx(6 * 14 * 12 * VOX_ML)


def test_a_single_leg_is_named_from_its_anatomy():
    """One leg, left of the isocentre (world x < 0): without stage 2 it is called left; its muscles (vastus
    lateralis towards +x) say it is a right leg."""
    shape = (20, 20, 2)
    s2 = np.zeros(shape, np.uint8)
    s2[12:16, 5:15] = VL  # lateral: larger x
    s2[4:8, 5:15] = anatomy.label_by_name("vastus_medialis", "thigh").id
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[0, 3] = -100.0  # the whole leg at x < 0
    w = np.full(shape, 100.0, np.float32)
    f = np.full(shape, 10.0, np.float32)
    f[0, 0, 0] = 900.0  # not constant: the seed rule can normalise it
    st = make_study({"water": (w, aff, "w"), "fat": (f, aff, "f")}, region="thigh")
    res = quantify(st, None, s2)
    assert res.meta["flags"]["legs_present"] == ["right"]
    assert quantify(st, (s2 > 0).astype(np.uint8) * 2, None).meta["flags"]["legs_present"] == ["left"]

"""Legs joined at the hip: split at the body midline, per-slice coverage, hip/pelvis slices left out.

Tiny synthetic bodies (x, y, z canonical RAS+, 1.5 x 1.5 x 5 mm): two leg discs apart on the
lower slices and one joined cross-section (a 'pelvis') above them; and the real thigh
huashan_thigh_001 (its top four slices are the hip and pelvis), run with the bundled networks.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from legcomp import anatomy
from legcomp.io.study import make_study
from legcomp.preprocessing.legs import (HIP_LEVEL, LEFT, RIGHT, coverage_report, fit_midline, input_slice_index,
                                        leg_map, slice_levels, split_legs)

SHAPE = (90, 40, 10)
SPACING = (1.5, 1.5, 5.0)
APART = range(0, 6)    # two legs, a gap between them (centres x = 24 and 60: midline 42, image centre 45)
JOINED = range(6, 10)  # one cross-section holding both legs and a bridge between them
MIDLINE = 42           # centre of the gap between the legs (x 37..47 empty)
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "huashan_thigh_001"


def affine(shape=SHAPE, spacing=SPACING, flip_z=False):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -np.asarray(spacing) * np.asarray(shape) / 2
    if flip_z:
        aff[2, 2], aff[2, 3] = -aff[2, 2], -aff[2, 3]
    return aff


def body(shape=SHAPE) -> np.ndarray:
    """Foreground: leg discs (radius 12) at x = 24 and 60 on every slice, bridged (x 24-60, y 10-30) on JOINED."""
    x, y = np.mgrid[:shape[0], :shape[1]]
    legs = (((x - 24) ** 2 + (y - 20) ** 2) < 144) | (((x - 60) ** 2 + (y - 20) ** 2) < 144)
    fg = np.zeros(shape, bool)
    fg[..., :] = legs[..., None]
    fg[24:61, 10:31, JOINED.start:JOINED.stop] = True
    return fg


def stage1_of(fg: np.ndarray) -> np.ndarray:
    """Whole muscle inside, a 2-voxel SAT rim."""
    inner = ndimage.binary_erosion(fg, structure=np.ones((5, 5, 1), bool))
    return np.where(inner, anatomy.WHOLE_MUSCLE.id, np.where(fg, anatomy.SAT.id, 0)).astype(np.uint8)


def study_of(fg: np.ndarray, aff: np.ndarray, region="thigh"):
    """Dixon-like images: muscle water-bright, the SAT rim fat-bright, background dark."""
    s1 = stage1_of(fg)
    water = np.choose(s1, [1.0, 10.0, 100.0]).astype(np.float32)
    fat = np.choose(s1, [1.0, 100.0, 10.0]).astype(np.float32)
    return make_study({"water": (water, aff, "w"), "fat": (fat, aff, "f")}, region=region)


def test_joined_slices_split_at_the_midline_not_given_to_one_leg():
    fg = body()
    sp = split_legs(fg, affine())
    assert sp.coverage == ("apart",) * len(APART) + ("joined",) * len(JOINED)
    np.testing.assert_allclose(sp.midline_x, MIDLINE, atol=0.5)
    x = np.arange(SHAPE[0])[:, None]
    for z in JOINED:
        f, lg = fg[..., z], sp.legs[..., z]
        assert (lg[f & (x < MIDLINE)] == LEFT).all() and (lg[f & (x >= MIDLINE + 1)] == RIGHT).all()
        assert 0.4 < (lg[f] == LEFT).mean() < 0.6  # each leg gets its side (the bug gave one leg all)
    for z in APART:
        assert (sp.legs[..., z][fg[..., z] & (x < MIDLINE)] == LEFT).all()
    assert (leg_map(fg, affine()) == sp.legs).all()  # one source of truth


def test_midline_followed_from_the_apart_slices():
    """Legs shifted by 6 voxels: the joined slices are split at the shifted gap, not the image centre."""
    fg = np.roll(body(), 6, axis=0)
    sp = split_legs(fg, affine())
    assert sp.coverage[JOINED.start] == "joined"
    lg, f = sp.legs[..., JOINED.start], fg[..., JOINED.start]
    x = np.arange(SHAPE[0])[:, None]
    assert (lg[f & (x < MIDLINE + 6)] == LEFT).all() and (lg[f & (x >= MIDLINE + 7)] == RIGHT).all()


def test_one_leg_slice_is_not_joined():
    fg = body()
    fg[..., JOINED.start:] = False
    x, y = np.mgrid[:SHAPE[0], :SHAPE[1]]
    fg[..., 8] = ((x - 30) ** 2 + (y - 20) ** 2) < 144  # the left leg alone, reaching past the midline
    sp = split_legs(fg, affine())
    assert sp.coverage[6:] == ("empty", "empty", "one_leg", "empty")
    assert (sp.legs[..., 8][fg[..., 8]] == LEFT).all()


def test_touching_legs_and_legs_joined_on_every_slice():
    fg = body()
    fg[..., JOINED.start:] = fg[..., 0:1]
    fg[36:49, 19:21, 2] = True  # a thin bridge: touching, split at the valley, still leg level
    assert split_legs(fg, affine()).coverage[2] == "touching"
    wide = np.zeros(SHAPE, bool)
    wide[20:70, 8:32, :] = True  # one wide cross-section on every slice: never all given to one leg
    sp = split_legs(wide, affine())
    assert set(sp.coverage) == {"joined"}
    assert (sp.legs[:45][wide[:45]] == LEFT).all() and (sp.legs[45:][wide[45:]] == RIGHT).all()
    assert slice_levels(sp.coverage, "thigh") == (HIP_LEVEL,) * SHAPE[2]


def test_fit_midline_is_robust_and_holds_its_extrapolation():
    z = np.arange(6)
    x = 10.0 + z
    x[5] = 40.0  # one slice skewed by stray tissue in the gap
    mid = fit_midline(z, x, 10, max_drift_vox=2.0)
    assert mid[2] == pytest.approx(12.0)
    assert mid[5] == pytest.approx(15.0)
    assert mid[9] == pytest.approx(17.0)  # the line says 19; held within 2 voxels of slice 5's 15
    assert (fit_midline(np.array([3]), np.array([7.0]), 4, 2.0) == 7.0).all()
    assert np.isnan(fit_midline(np.array([]), np.array([]), 3, 2.0)).all()


def test_slice_levels():
    cov = ("empty", "joined", "apart", "joined", "touching", "one_leg", "joined", "joined", "empty")
    assert slice_levels(cov, "thigh") == (None, "thigh", "thigh", "thigh", "thigh", "thigh", HIP_LEVEL, HIP_LEVEL, None)
    assert slice_levels(cov, "calf")[6:8] == ("calf", "calf")  # joined knees are no hip
    assert slice_levels(cov, None)[1] == "leg"
    assert slice_levels(("joined", "joined"), "thigh") == (HIP_LEVEL, HIP_LEVEL)


def test_input_slice_index_follows_the_input_slice_axis():
    assert input_slice_index(None, 3)[1].tolist() == [0, 1, 2]
    assert input_slice_index(affine(flip_z=True), 3)[1].tolist() == [2, 1, 0]
    lps_like = np.array([[0, -1.0, 0, 0], [0, 0, 1.0, 0], [-2.0, 0, 0, 0], [0, 0, 0, 1]])  # i runs superior->inferior
    axis, idx = input_slice_index(lps_like, 4)
    assert axis == 0 and idx.tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize("flip_z", [False, True])
def test_quantify_leaves_hip_out_by_default_and_keeps_it_on_request(flip_z):
    from legcomp.quantification import quantify
    aff = affine(flip_z=flip_z)
    fg_in = body()[..., ::-1] if flip_z else body()  # stored superior -> inferior when flipped
    st = study_of(fg_in, aff)
    fg = body()  # canonical (inferior -> superior)
    s1 = stage1_of(fg)
    q = quantify(st, s1, None, region="thigh")
    hip_input = [SHAPE[2] - 1 - z for z in JOINED] if flip_z else list(JOINED)
    assert sorted(q.meta["hip"]["slices"]) == sorted(hip_input) and q.meta["hip"]["in_volumes"] is False
    assert q.meta["notes"] and "hip/pelvis" in q.meta["notes"][0] and "--keep-hip" in q.meta["notes"][0]
    cov = q.meta["slice_coverage"]
    assert [c["coverage"] for c in cov] == ["apart"] * len(APART) + ["joined"] * len(JOINED)
    assert [c["in_volumes"] for c in cov] == [True] * len(APART) + [False] * len(JOINED)
    assert [c["slice"] for c in cov] == (list(range(SHAPE[2]))[::-1] if flip_z else list(range(SHAPE[2])))
    vml = st.voxel_volume_ml
    muscle = s1 == anatomy.WHOLE_MUSCLE.id
    assert q.value("whole_muscle", "volume_ml") == pytest.approx(muscle[..., :JOINED.start].sum() * vml)
    left_out = q.meta["hip"]["left_out_ml"]
    assert sum(v["whole_muscle"] for v in left_out.values()) == pytest.approx(muscle[..., JOINED.start:].sum() * vml, abs=0.2)
    assert not q.masks["mat"][..., JOINED.start:].any()
    assert "whole_muscle" in q.meta["flags"]["incomplete"]  # cut where the hip slices were left out

    kept = quantify(st, s1, None, region="thigh", keep_hip=True)
    assert kept.value("whole_muscle", "volume_ml") == pytest.approx(muscle.sum() * vml)
    assert kept.meta["hip"]["in_volumes"] is True and "kept" in kept.meta["notes"][0]
    left, right = (kept.value("whole_muscle", "volume_ml", leg) for leg in ("left", "right"))
    assert abs(left - right) < 0.1 * (left + right) / 2


@pytest.mark.parametrize("n_hip", [1, 2])
def test_structure_cut_only_next_to_the_left_out_hip_is_incomplete(n_hip):
    """Thin legs on slices 0-4; slice 5 below the hip: the left leg thin, the right one full; n_hip joined
    (hip) slices; above them one slice of the full left leg alone (leg level, in the volumes); empty above.
    Each leg is cut only on a slice next to the left-out hip: below it (right), above it (left)."""
    from legcomp.quantification import quantify
    shape = (90, 40, 12)
    x, y = np.mgrid[:shape[0], :shape[1]]

    def d(cx, r):
        return ((x - cx) ** 2 + (y - 20) ** 2) < r * r

    fg = np.zeros(shape, bool)
    fg[..., :5] = (d(24, 4) | d(60, 4))[..., None]
    fg[..., 5] = d(24, 5) | d(60, 12)
    for z in range(6, 6 + n_hip):
        fg[..., z] = d(24, 12) | d(60, 12)
        fg[24:61, 10:31, z] = True
    fg[..., 6 + n_hip] = d(24, 12)
    aff = affine(shape)
    q = quantify(study_of(fg, aff), stage1_of(fg), None, region="thigh")
    assert q.meta["hip"]["slices"] == list(range(6, 6 + n_hip)) and q.meta["hip"]["in_volumes"] is False
    assert [c["coverage"] for c in q.meta["slice_coverage"]][5:8 + n_hip] == \
        ["apart"] + ["joined"] * n_hip + ["one_leg", "empty"]
    assert [q.value("whole_muscle", "incomplete", leg) for leg in ("left", "right", "total")] == [1.0, 1.0, 1.0]
    kept = quantify(study_of(fg, aff), stage1_of(fg), None, region="thigh", keep_hip=True)
    assert [kept.value("whole_muscle", "incomplete", leg) for leg in ("left", "right", "total")] == [0.0, 0.0, 0.0]


def test_unassigned_leg_voxels_counted_in_the_volumes_only():
    """A given leg map that leaves the (left-out) hip slices and one SAT voxel of slice 0 unassigned: the flag
    counts that voxel alone."""
    from legcomp.quantification import quantify
    fg = body()
    st = study_of(fg, affine())
    s1 = stage1_of(fg)
    legs = leg_map(fg, affine())
    legs[..., JOINED.start:] = 0
    legs[tuple(np.argwhere(s1[..., 0] == anatomy.SAT.id)[0]) + (0,)] = 0
    q = quantify(st, s1, None, region="thigh", legs=legs)
    assert q.meta["hip"]["in_volumes"] is False
    assert q.meta["flags"]["unassigned_leg_ml"] == pytest.approx(st.voxel_volume_ml)
    assert "unassigned_leg_ml" not in quantify(st, s1, None, region="thigh").meta["flags"]


def test_calf_and_separate_legs_lose_nothing():
    from legcomp.quantification import quantify
    fg = body()
    st = study_of(fg, affine(), region="calf")
    q = quantify(st, stage1_of(fg), None, region="calf")
    assert q.meta["hip"]["slices"] == [] and not q.meta["notes"]
    assert all(c["in_volumes"] for c in q.meta["slice_coverage"])
    fg[..., JOINED.start:] = False
    q = quantify(study_of(fg, affine()), stage1_of(fg), None, region="thigh")
    assert q.meta["hip"]["slices"] == [] and not q.meta["notes"]


def test_all_slices_joined_are_kept_with_a_note():
    from legcomp.quantification import quantify
    fg = body()
    fg[24:61, 10:31, :] = True
    fg[..., 0] = body()[..., 0]  # one slice with the legs apart gives the midline
    s1 = stage1_of(fg)
    s1[..., 0] = 0
    q = quantify(study_of(fg, affine()), s1, None, region="thigh")
    assert q.meta["hip"]["in_volumes"] is True and "no other slice" in q.meta["notes"][0]
    assert q.meta["notes"][0].endswith(": kept: no other slice holds a labelled voxel, split between the legs at "
                                       "the body midline")


def test_process_study_records_coverage_and_keep_hip(tmp_path):
    from legcomp.pipeline import process_study
    fg = body()
    st = study_of(fg, affine())
    s1 = stage1_of(fg)

    def predict(study, return_confidence=False):  # a stand-in for the networks: the masks are given
        return (s1, np.zeros_like(s1), None) if return_confidence else (s1, np.zeros_like(s1))

    cascade = SimpleNamespace(predict=predict, region="thigh", sources={}, stage1=SimpleNamespace(device="cpu"))
    for keep in (False, True):
        out = process_study(st, tmp_path / f"keep{keep}", cascade, overlay=False, keep_hip=keep)
        run = json.loads((out / "run.json").read_text())
        assert run["keep_hip"] is keep and run["hip"]["in_volumes"] is keep
        assert [c["level"] for c in run["slice_coverage"]] == ["thigh"] * len(APART) + [HIP_LEVEL] * len(JOINED)
        assert any("hip/pelvis" in n for n in run["notes"])
    default = pd.read_csv(tmp_path / "keepFalse" / "volumes.csv")
    kept = pd.read_csv(tmp_path / "keepTrue" / "volumes.csv")
    sel = (default.structure == "whole_muscle") & (default.measure == "volume_ml") & (default.leg == "total")
    assert float(default[sel].value.iloc[0]) < float(kept[sel].value.iloc[0])
    rows = coverage_report(split_legs(fg, affine()), affine(), "thigh")
    assert rows[0]["midline_x_mm"] == pytest.approx(affine()[0, 3] + MIDLINE * SPACING[0], abs=1.0)


@pytest.mark.skipif(not (REAL / "water.nii.gz").is_file(), reason=f"real data not found at {REAL}")
def test_real_thigh_left_and_right_agree(tmp_path):
    """huashan_thigh_001 with the bundled networks: before the midline split the hip slices all went to the
    right leg (whole muscle 2712 / 6202 mL left / right, SAT 1487 / 3013). Measured after: 2712 / 2791 mL,
    SAT 1487 / 1580 (slices 12-15 left out); with --keep-hip 4387 / 4527 mL, SAT 2224 / 2277."""
    from legcomp.cli import main
    from legcomp.io import read_label_map, read_study
    from legcomp.quantification import quantify

    out = tmp_path / "huashan"
    assert main(["run", str(REAL), "--region", "thigh", "--out", str(out), "--quiet", "--no-overlay"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["hip"]["slices"] == [12, 13, 14, 15] and run["hip"]["in_volumes"] is False
    assert [c["level"] for c in run["slice_coverage"]] == ["thigh"] * 12 + [HIP_LEVEL] * 4
    t = pd.read_csv(out / "volumes.csv")

    def ml(structure, leg):
        return float(t[(t.structure == structure) & (t.measure == "volume_ml") & (t.leg == leg)].value.iloc[0])

    left, right = ml("whole_muscle", "left"), ml("whole_muscle", "right")
    assert abs(left - right) <= 0.2 * (left + right) / 2, (left, right)
    study = read_study(REAL, region="thigh")
    s1, s2 = read_label_map(out / "stage1.nii.gz", study), read_label_map(out / "stage2.nii.gz", study)
    kept = quantify(study, s1, s2 if s2.any() else None, region="thigh", keep_hip=True)
    left, right = kept.value("whole_muscle", "volume_ml", "left"), kept.value("whole_muscle", "volume_ml", "right")
    assert abs(left - right) <= 0.2 * (left + right) / 2, (left, right)
    assert kept.value("whole_muscle", "volume_ml") > ml("whole_muscle", "total")


def test_quantify_cli_keep_hip(tmp_path):
    import nibabel as nib

    from legcomp.cli import main
    fg = body()
    case = tmp_path / "thigh_case"
    case.mkdir()
    for name, img in (("water", np.where(fg, 100.0, 1.0)), ("fat", np.where(fg, 20.0, 1.0)), ("s1", stage1_of(fg))):
        nib.save(nib.Nifti1Image(img.astype(np.uint8 if name == "s1" else np.float32), affine()), str(case / f"{name}.nii.gz"))
    totals = {}
    for extra in ([], ["--keep-hip"]):
        out = tmp_path / f"out{len(extra)}"
        assert main(["quantify", str(case), "--stage1", str(case / "s1.nii.gz"), "--region", "thigh",
                     "--out", str(out), "--quiet", *extra]) == 0
        vj = json.loads((out / "volumes.json").read_text())
        assert vj["meta"]["hip"]["in_volumes"] is bool(extra)
        totals[bool(extra)] = vj["legs"]["total"]["whole_muscle"]["volume_ml"]
    assert totals[False] < totals[True]


def test_hip_notes_and_left_out_volumes_exactly():
    """The note names the hip slices and what was left out (mL, per leg, rounded to 0.1 mL); keep_hip keeps them."""
    from legcomp.quantification import quantify
    fg = body()
    st = study_of(fg, affine())
    s1 = stage1_of(fg)
    vml = st.voxel_volume_ml
    q = quantify(st, s1, None, region="thigh")
    hip_z = slice(JOINED.start, JOINED.stop)
    legs = leg_map(fg, affine(), region="thigh")
    lo = q.meta["hip"]["left_out_ml"]
    assert set(lo) == {"left", "right"}
    for leg_id, leg in ((LEFT, "left"), (RIGHT, "right")):
        on = legs[..., hip_z] == leg_id
        assert lo[leg] == {"subcutaneous_fat": round(float(np.count_nonzero((s1[..., hip_z] == 1) & on)) * vml, 1),
                           "whole_muscle": round(float(np.count_nonzero((s1[..., hip_z] == 2) & on)) * vml, 1)}
    wm = sum(v["whole_muscle"] for v in lo.values())
    sat = sum(v["subcutaneous_fat"] for v in lo.values())
    assert q.meta["notes"] == [f"slices 6, 7, 8, 9 show the hip/pelvis (legs joined in one cross-section): left out of "
                               f"the volumes (whole muscle {wm:.0f} mL, SAT {sat:.0f} mL); keep them with --keep-hip"]
    assert q.value("subcutaneous_fat", "volume_ml") == pytest.approx((s1[..., :JOINED.start] == 1).sum() * vml)
    kept = quantify(st, s1, None, region="thigh", keep_hip=True)
    assert kept.meta["notes"] == ["slices 6, 7, 8, 9 show the hip/pelvis (legs joined in one cross-section): kept as "
                                  "asked, split between the legs at the body midline"]
    assert kept.meta["hip"] == {"slices": [6, 7, 8, 9], "in_volumes": True, "left_out_ml": {}}


def test_quantify_files_leaves_the_hip_out_unless_asked(tmp_path):
    import nibabel as nib
    from legcomp.quantification import quantify_files
    fg = body()
    st = study_of(fg, affine())
    d = tmp_path / "thigh_hip"
    d.mkdir()
    for name, arr in (("water", st.water), ("fat", st.fat), ("stage1", stage1_of(fg))):
        nib.save(nib.Nifti1Image(arr, affine()), str(d / f"{name}.nii.gz"))
    q = quantify_files(d, None, None, None)
    assert q.meta["hip"]["in_volumes"] is False
    assert quantify_files(d, None, None, None, keep_hip=True).meta["hip"]["in_volumes"] is True


def test_training_crops_take_their_width_below_the_hip():
    """Stage-2 training cases are cropped as the cascade crops at inference: the joined hip slices do not
    widen a leg's box towards the midline (the leg discs are 24 voxels wide, the bridge reaches the midline)."""
    from legcomp.preprocessing import inputs as prep
    from legcomp.training.data import study_cases

    fg = body()
    st = study_of(fg, affine())
    s1 = stage1_of(fg)
    st.labels["stage1"] = s1
    st.labels["stage2"] = np.where(s1 == anatomy.WHOLE_MUSCLE.id, 1, 0).astype(np.uint8)
    cases = study_cases(st, 2, "thigh", spacing=(*SPACING[:2], None))
    m = int(np.ceil(prep.LEG_MARGIN_MM / SPACING[0]))
    muscle_width = int(ndimage.binary_erosion(body()[..., 0], structure=np.ones((5, 5), bool)).any(1)[:42].sum())
    assert len(cases) == 2
    for c in cases:
        assert c["image"].shape[1] == min(muscle_width + 2 * m, 42 + m)  # x extent: the leg, not half the bridge

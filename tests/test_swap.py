"""Fat-water swap detection and repair (legcomp.preprocessing.swap) and its place in ``legcomp run``."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from legcomp.cli import main
from legcomp.io import make_study, read_study
from legcomp.phantom import generate, write_phantom
from legcomp.phantom.signal import swap_mask
from legcomp.preprocessing import swap as S

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
TINY = dict(matrix=(96, 64, 12), spacing=(4.0, 4.0, 8.0), supersample=1)


@pytest.fixture(scope="module")
def phantoms():
    """A tiny thigh and a tiny lean calf (thin SAT), both legs."""
    return {"thigh": generate("thigh", 1, **TINY), "calf": generate("calf", 2, adiposity=0.1, **TINY)}


def _swapped(ph, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.where(where, ph.fat, ph.water), np.where(where, ph.water, ph.fat)


def _slab(shape) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[:, :, 4:8] = True
    return m


@pytest.mark.parametrize("region", ["thigh", "calf"])
def test_unswapped_phantom_raises_no_alarm(phantoms, region):
    rep = S.detect_swap(phantoms[region].water, phantoms[region].fat, phantoms[region].affine)
    assert rep.verdict == "none" and rep.note() == ""
    assert rep.n_units["ok"] >= 0.9 * 2 * phantoms[region].water.shape[2]  # (nearly) every leg slice judged
    assert (rep.work_factor, rep.spacing) == (1, (4.0, 4.0))
    from scipy import ndimage

    ids = {name: lid for lid, name in S.LEGS.items()}
    body = S.work_grid(phantoms[region].water, phantoms[region].fat, phantoms[region].affine)[2]
    for u in rep.units:  # the leg's centre on the work grid, not in its box
        leg = S._largest(body[:, :, u.z] & (rep.legs[:, :, u.z] == ids[u.leg]))
        assert u.centre == pytest.approx(ndimage.center_of_mass(leg))


@pytest.mark.parametrize("region", ["thigh", "calf"])
@pytest.mark.parametrize("case", ["whole", "left leg", "slab"])
def test_whole_and_partial_swaps_are_found_where_they_are(phantoms, region, case):
    ph = phantoms[region]
    nz = ph.water.shape[2]
    where = {"whole": np.ones(ph.water.shape, bool), "left leg": ph.legs == 1, "slab": _slab(ph.water.shape)}[case]
    rep = S.detect_swap(*_swapped(ph, where), ph.affine)
    expect = {"whole": {"left": list(range(nz)), "right": list(range(nz))}, "left leg": {"left": list(range(nz))},
              "slab": {"left": [4, 5, 6, 7], "right": [4, 5, 6, 7]}}[case]
    assert rep.verdict == ("whole" if case == "whole" else "partial")
    assert rep.swapped == expect and rep.partial == {}
    assert "fat-water swap" in rep.note() and "--fix-swap" in rep.note()


def test_a_swapped_region_at_the_edge_of_a_leg_is_found(phantoms):
    ph = phantoms["thigh"]
    where = swap_mask(ph.legs, ph.spacing, np.random.default_rng(3))  # the phantom's own swap model
    rep = S.detect_swap(*_swapped(ph, where), ph.affine)
    assert rep.verdict == "partial" and rep.swapped == {}
    assert list(rep.partial) == ["right"] and len(rep.partial["right"]) >= 3
    fixed = S.swap_region(rep, ph.water.shape)
    assert (fixed & where).sum() > 0.3 * where.sum()  # the wedges cover a good part of the region
    assert (fixed & ~where & (ph.legs > 0)).sum() < 0.05 * (ph.legs > 0).sum()


@pytest.mark.parametrize("case", ["whole", "slab", "left leg"])
def test_fix_swap_restores_the_original_arrays(phantoms, case):
    ph = phantoms["calf"]
    where = {"whole": np.ones(ph.water.shape, bool), "slab": _slab(ph.water.shape), "left leg": ph.legs == 1}[case]
    w, f = _swapped(ph, where)
    study = make_study({"water": (w, ph.affine, "w"), "fat": (f, ph.affine, "f"),
                        "in_phase": (ph.in_phase, ph.affine, "ip")})
    rep = S.check_study(study)
    fixed = S.fix_swap(study, rep)
    assert rep.fixed and rep.to_json()["fixed"] is True and rep.exchanged > 0
    if case == "left leg":  # the fix takes the left side of the split between the legs: the whole leg
        body = ph.legs > 0
        assert np.array_equal(fixed.water[body], ph.water[body]) and np.array_equal(fixed.fat[body], ph.fat[body])
    else:
        assert np.array_equal(fixed.water, ph.water) and np.array_equal(fixed.fat, ph.fat)
    # in-phase (read) and opposed-phase (derived |W - F|) are the same under a swap
    assert np.array_equal(fixed.in_phase, study.in_phase)
    assert np.allclose(fixed.opposed_phase, np.abs(fixed.water - fixed.fat))
    assert np.array_equal(study.water, w)  # the input study is left alone


def test_nothing_to_fix_leaves_the_study_alone(phantoms):
    ph = phantoms["thigh"]
    study = make_study({"water": (ph.water, ph.affine, "w"), "fat": (ph.fat, ph.affine, "f")})
    rep = S.check_study(study)
    assert S.fix_swap(study, rep) is study and not rep.fixed


def test_images_that_are_not_a_dixon_pair_get_a_note(phantoms):
    ph = phantoms["thigh"]
    labels = ph.stage2.astype(np.float32)
    cases = {"label map": (labels, ph.fat), "the same image": (ph.water, ph.water.copy()),
             "proportional": (ph.water, 3 * ph.water), "almost no signal": (ph.water, 1e-3 * ph.fat)}
    for words, (w, f) in cases.items():
        rep = S.detect_swap(w, f, ph.affine)
        assert rep.verdict == "not_dixon" and words in rep.note(), (words, rep.note())
    assert S.not_dixon_reason(ph.water, ph.fat) == ""
    # scanner-like integer images with many levels are fine
    assert S.not_dixon_reason(np.round(ph.water), np.round(ph.fat)) == ""


def test_slices_holding_one_leg_are_still_judged(phantoms):
    ph = phantoms["thigh"]
    w, f = ph.water.copy(), ph.fat.copy()
    w[:48, :, :3] = f[:48, :, :3] = 0.0  # slices 0-2 lose the leg at low x: no left leg there
    rep = S.detect_swap(w, f, ph.affine)
    assert sorted((u.z, u.leg) for u in rep.units if u.z < 3) == [(0, "right"), (1, "right"), (2, "right")]


def test_leg_slices_under_15_cm2_are_not_judged(phantoms):
    ph = phantoms["thigh"]
    aff = ph.affine.copy()
    aff[0, 0], aff[1, 1] = 0.8, 1.6  # the same voxels called 0.8 x 1.6 mm: 1.6 x 3.2 mm on the work grid
    rep = S.detect_swap(ph.water, ph.fat, aff)
    assert rep.spacing == pytest.approx((1.6, 3.2)) and sum(rep.n_units.values()) == 9
    assert min(u.area_cm2 for u in rep.units) == 15.0  # 24 leg slices, 15 of them smaller


def test_coarse_voxels_are_not_judged(phantoms):
    ph = phantoms["thigh"]
    aff = ph.affine.copy()
    aff[:2, :2] *= 1.5  # 6 mm in-plane
    rep = S.detect_swap(ph.fat, ph.water, aff)
    assert rep.verdict == "undecided" and "coarser" in rep.to_json()["not_judged"] and rep.note() == ""
    aff[:2, :2] = [[3.0, 0.0], [3.0, 1.0]]  # oblique: x voxels of 4.24 mm (a column's length, not a row's)
    assert "4.24 mm" in S.detect_swap(ph.fat, ph.water, aff).to_json()["not_judged"]


def test_slices_are_numbered_as_in_the_input_file(tmp_path, phantoms):
    """An input stored superior to inferior: run.json's slice numbers are the file's, not the canonical ones."""
    ph = phantoms["calf"]
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = ph.water.shape[2] - 1
    aff = ph.affine @ flip
    w, f = _swapped(ph, _slab(ph.water.shape))
    study = make_study({"water": (w[:, :, ::-1], aff, "w"), "fat": (f[:, :, ::-1], aff, "f")})
    rep = S.check_study(study)
    assert rep.swapped == {"left": [4, 5, 6, 7], "right": [4, 5, 6, 7]}  # canonical
    nz = ph.water.shape[2]
    assert rep.to_json()["swapped_slices"] == {leg: [nz - 1 - z for z in (7, 6, 5, 4)] for leg in ("left", "right")}


# --------------------------------------------------------------------------- legcomp run
@pytest.fixture(scope="module")
def swapped_study(tmp_path_factory, phantoms):
    """A tiny thigh phantom written with water and fat exchanged (files swapped), labels kept."""
    folder = write_phantom(phantoms["thigh"], tmp_path_factory.mktemp("swap") / "thigh_swapped")
    os.replace(folder / "water.nii.gz", folder / "tmp.nii.gz")
    os.replace(folder / "fat.nii.gz", folder / "water.nii.gz")
    os.replace(folder / "tmp.nii.gz", folder / "fat.nii.gz")
    return folder


def _run(study, out, weights, *extra):
    return main(["run", str(study), "--out", str(out), "--weights", str(weights), "--quiet", "--no-overlay",
                 "--no-report", "--device", "cpu", *extra])


def _muscle_ff(out: Path) -> float:
    import pandas as pd
    t = pd.read_csv(out / "volumes.csv")
    sel = (t.leg == "total") & (t.structure == "whole_muscle") & (t.measure == "mean_fat_fraction")
    return float(t[sel].value.iloc[0])


def test_run_reports_a_swap_and_fixes_it_with_fix_swap(tmp_path, swapped_study, stub_cascade, capsys):
    assert _run(swapped_study, tmp_path / "plain", stub_cascade.weights) == 0
    err = capsys.readouterr().err
    assert "fat-water swap: water and fat are swapped in the whole series" in err and len(err.splitlines()) == 1
    run = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert run["fat_water_swap"]["verdict"] == "whole" and run["fat_water_swap"]["fixed"] is False
    assert any("fat-water swap" in n for n in run["notes"])
    assert [f["kind"] for f in run["qc_flags"]].count("fat_water_swap") == 1

    assert _run(swapped_study, tmp_path / "fixed", stub_cascade.weights, "--fix-swap") == 0
    assert "exchanged back" in capsys.readouterr().err
    fixed = json.loads((tmp_path / "fixed" / "run.json").read_text())
    assert fixed["fat_water_swap"]["fixed"] is True
    assert fixed["fat_water_swap"]["exchanged_voxels"] == int(np.prod(TINY["matrix"]))
    assert fixed["fingerprint"]["options"]["fix_swap"] is True
    # quantified on the exchanged images: the healthy-ish muscle is water-dominant again
    assert _muscle_ff(tmp_path / "plain") > 0.5 > _muscle_ff(tmp_path / "fixed")


def test_run_on_a_clean_study_says_nothing(tmp_path, phantoms, stub_cascade, capsys):
    study = write_phantom(phantoms["calf"], tmp_path / "calf_clean")
    assert _run(study, tmp_path / "out", stub_cascade.weights, "--fix-swap") == 0
    assert "swap" not in capsys.readouterr().err
    rec = json.loads((tmp_path / "out" / "run.json").read_text())["fat_water_swap"]
    assert rec["verdict"] == "none" and rec["fixed"] is False and rec["note"] is None


def test_label_map_given_as_water_gets_a_note(tmp_path, phantoms, stub_cascade, capsys):
    study = write_phantom(phantoms["thigh"], tmp_path / "thigh_labels")
    lab = nib.load(str(study / "stage2.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj).astype(np.int16), lab.affine), str(study / "water.nii.gz"))
    assert _run(study, tmp_path / "out", stub_cascade.weights) == 0
    err = capsys.readouterr().err
    assert "not a Dixon water/fat pair: the water image holds" in err and "label map" in err
    rec = json.loads((tmp_path / "out" / "run.json").read_text())["fat_water_swap"]
    assert rec["verdict"] == "not_dixon" and "label map" in rec["note"]


# --------------------------------------------------------------------------- real studies
@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata absent")
@pytest.mark.parametrize("name", ["huashan_thigh_001", "qmritools_calf"])
def test_real_studies_no_alarm_and_swaps_found(name):
    path = REALDATA / name
    if not path.is_dir():
        pytest.skip(f"{name} absent")
    s = read_study(path)
    assert S.detect_swap(s.water, s.fat, s.affine).verdict == "none"
    assert S.detect_swap(s.fat, s.water, s.affine).verdict == "whole"
    rep = S.check_study(s)
    legs = rep.legs  # the left leg, on the detector's own split (work grid -> input grid)
    k = rep.work_factor
    left = np.repeat(np.repeat(legs == 1, k, axis=0), k, axis=1)[: s.shape[0], : s.shape[1]]
    left = np.pad(left, ((0, s.shape[0] - left.shape[0]), (0, s.shape[1] - left.shape[1]), (0, 0)), mode="edge")
    part = S.detect_swap(np.where(left, s.fat, s.water), np.where(left, s.water, s.fat), s.affine)
    assert part.verdict == "partial" and list(part.swapped) == ["left"]
    assert len(part.swapped["left"]) == sum(u.leg == "left" for u in part.units)


def _unit(z, leg, verdict, score=float("nan"), sectors=(0,) * 12):
    from legcomp.preprocessing.swap import SwapUnit

    return SwapUnit(z=z, leg=leg, area_cm2=100.0, ff_surface=float("nan"), ff_inner=float("nan"),
                    ff_marrow=float("nan"), score=score, sectors=tuple(sectors), verdict=verdict)


def test_swap_rule_helpers_at_their_thresholds():
    from legcomp.preprocessing import swap as S

    assert S._ranges([3, 4, 5, 6, 7, 10]) == "3-7, 10" and S._ranges([1]) == "1" and S._ranges([]) == ""
    assert S._ranges([2, 4, 5]) == "2, 4-5"
    assert S._describe({"left": [1, 2, 3], "right": [5, 6]}, {"right": [8, 9, 11]}, {"left": 3, "right": 9}) == \
        "the whole left leg; right leg, slices 5-6; part of the right leg, slices 8-9, 11"
    assert S._describe({"left": []}, {}, {"left": 0}) == ""
    assert S.integer_levels(np.array([0, 1, 2, 2.0])) == 3 and S.integer_levels(np.array([0, 1.5])) == 0
    assert S.layer_index(np.array([0.4, 0.6, 1.5, 2.49]), 1.0).tolist() == [0, 1, 2, 2]
    assert S.layer_index(np.array([0.4]), 1.0).dtype.kind == "i"
    assert S.first_layer(1.0) == 3 and S.first_layer(2.0) == 2 and S.first_layer(2.7) == 2 and S.first_layer(4.0) == 1
    # a sector: fat over water +1, water over fat -1; they must differ by CONTRAST (0.3) and the surface be decisive
    assert S.sector_state(0.75, 0.45) == 1 and S.sector_state(0.75, 0.46) == 0 and S.sector_state(0.7, 0.1) == 1
    assert S.sector_state(0.3, 0.6) == -1 and S.sector_state(0.31, 0.9) == 0 and S.sector_state(0.69, 0.1) == 0
    assert S.sector_state(float("nan"), 0.1) == 0 and S.sector_state(0.9, float("nan")) == 0
    assert S.score_terms(0.9, 0.2, 0.8) == pytest.approx(0.4 + 0.7 + 0.3)
    assert S.score_terms(0.9, float("nan"), float("nan")) == pytest.approx(0.4)
    assert S.score_terms(float("nan"), 0.2, 0.8) == pytest.approx(0.3)  # no inner term without a surface
    assert np.isnan(S.score_terms(float("nan"), float("nan"), float("nan")))
    assert S._max_circular_run(np.array([True, False, True, True])) == 3  # wraps around
    assert S._max_circular_run(np.ones(4, bool)) == 4 and S._max_circular_run(np.zeros(4, bool)) == 0
    fine, bad = (1,) * 12, (-1,) * 12
    assert S.unit_verdict(0.15, (0,) * 12) == "ok" and S.unit_verdict(0.149, (0,) * 12) == "undecided"
    assert S.unit_verdict(-0.15, (0,) * 12) == "swapped" and S.unit_verdict(-0.149, (0,) * 12) == "undecided"
    assert S.unit_verdict(0.5, bad) == "undecided" and S.unit_verdict(-0.5, fine) == "undecided"
    two = (-1, -1, 1, 1) + (0,) * 8
    assert S.unit_verdict(0.5, two) == "partial" and S.unit_verdict(0.5, two, partial=False) == "ok"
    assert S.unit_verdict(0.5, (-1, 0, 1, 1) + (0,) * 8) == "ok"  # one swapped sector is not a region
    assert S.unit_verdict(float("nan"), two, partial=False) == "undecided"
    assert S.swapped_arc((-1, -1, 1, -1) + (1,) * 8) == {0, 1}
    assert S.swapped_arc((-1,) + (1,) * 10 + (-1,)) == {11, 0}  # circular
    assert S.swapped_arc(bad) == set(range(12)) and S.swapped_arc(fine) == set()
    sec = S.sector_map((5, 5), (2.0, 2.0))
    assert sec.min() >= 0 and sec.max() < 12 and len(np.unique(sec)) >= 8 and sec.dtype.kind == "i"


def test_unit_box_largest_judge_unit_and_partial_chains():
    from legcomp.preprocessing import swap as S

    m = np.zeros((20, 20), bool)
    m[5, 7] = True
    assert S._box(m, 2) == (slice(3, 8), slice(5, 10)) and S._box(m, 6) == (slice(0, 12), slice(1, 14))
    assert S._box(m, 7) == (slice(0, 13), slice(0, 15))
    two = np.zeros((20, 20), bool)
    two[0:2, 0:2] = True  # labelled first, but smaller
    two[10:15, 10:15] = True
    np.testing.assert_array_equal(S._largest(two), np.pad(np.ones((5, 5), bool), ((10, 5), (10, 5))))
    # one leg slice (1 mm pixels): fat over water; area in cm^2 to 0.1, the fractions and score to 3 decimals
    ii, jj = np.indices((70, 70))
    r = np.hypot(ii - 35, jj - 35)
    leg = r < 30
    w = np.where(leg, np.where(r > 24, 12.34, 88.77), 0.0)
    f = np.where(leg, np.where(r > 24, 87.66, 11.23), 0.0)
    u = S.judge_unit(w, f, leg, (1.0, 1.0), z=4)
    assert (u.z, u.leg, u.area_cm2, u.ff_surface, u.ff_inner, u.score, u.verdict) == (4, "", 28.1, 0.877, 0.112, 1.141, "ok")
    # marrow: the bone's voxels brighter than half the leg's median W+F (150 > 55; not 1.5 x), not the dark cortex
    from scipy import ndimage
    ii, jj = np.indices((80, 80))
    rb = np.hypot(ii - 40, jj - 40)
    bleg = rb < 35
    bw, bf = np.where(bleg, 100.0, 0.0), np.where(bleg, 10.0, 0.0)
    bw[(rb >= 6) & (rb < 10)] = bf[(rb >= 6) & (rb < 10)] = 1.0  # cortex: 196 voxels
    bw[rb < 6], bf[rb < 6] = 15.0, 135.0  # marrow: 109 voxels, FF 0.9
    assert S._marrow_ff(bw, bf, bleg, ndimage.distance_transform_edt(bleg), (1.0, 1.0)) == pytest.approx(0.9)
    # partly swapped units in consecutive slices: a chain when their arcs overlap within one sector, not two

    def chain(step, order=(0, 1, 2)):
        arcs = [{(8 + k - step * z) % 12 for k in range(3)} for z in range(3)]
        return [u.verdict for u in S._confirm_partial(
            [_unit(z, "left", "partial", 0.5, [-1 if k in arcs[z] else 1 for k in range(12)]) for z in order])]

    assert chain(0) == chain(3) == ["partial"] * 3 and chain(4) == ["ok"] * 3  # step 4: sector 7 between
    assert chain(0, order=(2, 1, 0)) == ["partial"] * 3  # units in any order
    assert chain(-3) == ["partial"] * 3 and chain(-4) == ["ok"] * 3  # arcs turning the other way
    arc, far = (-1, -1, 1, 1) + (0,) * 8, (0,) * 6 + (-1, -1, 1, 1, 0, 0)
    assert [u.verdict for u in S._confirm_partial([_unit(z, "left", "partial", 0.5, arc) for z in range(2)])] == \
        ["ok"] * 2  # a chain of 2 is too short
    assert [u.verdict for u in S._confirm_partial([_unit(z, "left", "partial", 0.5, arc) for z in range(3)]
                                                   + [_unit(3, "left", "partial", 0.5, far)])] == \
        ["partial"] * 3 + ["ok"]  # a partial unit next to a chain but not linked to it leaves the chain alone


def test_summarise_verdicts_and_the_report():
    from legcomp.preprocessing.swap import SwapReport, summarise

    assert summarise([_unit(0, "left", "ok"), _unit(1, "left", "undecided")]).verdict == "none"
    assert summarise([_unit(0, "left", "undecided")]).verdict == "undecided"
    assert summarise([]).verdict == "undecided"
    r = summarise([_unit(0, "left", "swapped"), _unit(1, "left", "undecided"), _unit(2, "left", "swapped"),
                   _unit(0, "right", "swapped")])
    assert r.verdict == "whole" and r.swapped == {"left": [0, 1, 2], "right": [0]} and r.partial == {}
    assert r.n_units == {"ok": 0, "swapped": 4, "partial": 0, "undecided": 0}
    assert r.note() == ("fat-water swap: water and fat are swapped in the whole series; results are unreliable: "
                        "check the images, or rerun with --fix-swap")
    r = summarise([_unit(0, "left", "ok"), _unit(1, "left", "undecided"), _unit(2, "left", "swapped"),
                   _unit(3, "left", "undecided")])
    assert r.verdict == "partial" and r.swapped == {"left": [2, 3]}  # undecided at the end of a swapped stack
    r.slice_index = np.array([9, 8, 7, 6])
    r.fixed, r.exchanged = True, 42
    assert r.note() == ("fat-water swap: water and fat are swapped in part of the series (left leg, slices 6-7); "
                        "exchanged back in 42 voxels before segmenting (--fix-swap)")
    assert r.to_json() == {"verdict": "partial", "swapped_slices": {"left": [6, 7]}, "partly_swapped_slices": {},
                           "not_dixon": None, "not_judged": None,
                           "units": {"ok": 1, "swapped": 2, "partial": 0, "undecided": 1}, "fixed": True,
                           "exchanged_voxels": 42, "note": r.note()}
    # partly swapped units count only in a chain of 3 consecutive slices whose arcs overlap
    arc = (-1, -1, 1, 1) + (0,) * 8
    far = (0,) * 6 + (-1, -1, 1, 1, 0, 0)
    r = summarise([_unit(z, "right", "partial", 0.5, arc) for z in range(3)] + [_unit(5, "right", "partial", 0.5, arc)])
    assert r.partial == {"right": [0, 1, 2]} and r.units[3].verdict == "ok"
    r = summarise([_unit(0, "right", "partial", 0.5, arc), _unit(1, "right", "partial", 0.5, far),
                   _unit(2, "right", "partial", 0.5, arc)])
    assert r.verdict == "none" and r.partial == {}
    bad = SwapReport("not_dixon", not_dixon="the water image holds 2 integer levels only (a label map?)")
    assert bad.note() == "not a Dixon water/fat pair: the water image holds 2 integer levels only (a label map?)"
    assert not bad.any_swap and SwapReport("none").note() == "" and SwapReport("undecided").to_json()["note"] is None
    assert SwapReport("whole").input_slices([3, 1]) == [1, 3]


def test_not_dixon_reasons():
    from legcomp.preprocessing.swap import not_dixon_reason

    rng = np.random.default_rng(0)
    w = rng.random((20, 20, 4)) * 100 + 50
    f = rng.random((20, 20, 4)) * 100 + 50
    assert not_dixon_reason(w, f) == ""
    lab = np.zeros_like(w)
    lab[5:10] = 3
    assert not_dixon_reason(lab, f) == "the water image holds 2 integer levels only (a label map?)"
    assert not_dixon_reason(w, np.round(rng.random(w.shape) * 63)) == "the fat image holds 64 integer levels only (a label map?)"
    assert not_dixon_reason(w, np.round(rng.random(w.shape) * 70)) == ""
    phase = w - 120
    assert not_dixon_reason(w, phase) == "the fat image holds many negative values (a phase image?)"
    # negatives reaching 5 % of the maximum are enough (here min -50, max 50)
    assert not_dixon_reason(w, w - 100) == "the fat image holds many negative values (a phase image?)"
    bright = w.copy()
    bright[0, 0, 0] = 1e6  # the same image within 1e-6 x the brightest voxel (1.0)
    assert not_dixon_reason(bright, bright + 0.5) == "water and fat are the same image"
    hundred = np.zeros((10, 10, 2))
    hundred[..., 0] = 5.5  # exactly 100 body voxels are judged
    assert not_dixon_reason(hundred, hundred.copy()) == "water and fat are the same image"
    assert not_dixon_reason(w, w.copy()) == "water and fat are the same image"
    assert not_dixon_reason(w, 3 * w + 1) == "water and fat are proportional (the same image scaled)"
    assert not_dixon_reason(w, w * 0.01 * rng.random(w.shape)) == "the fat image holds almost no signal in the body"
    assert not_dixon_reason(f * 0.01 * rng.random(w.shape), f) == "the water image holds almost no signal in the body"
    tiny = np.zeros((4, 4, 4))
    tiny[0, 0, 0] = 5.5
    assert not_dixon_reason(tiny, tiny * 0.5 + 0.25) == ""  # fewer than 100 body voxels: not judged


def _neg(n_neg, neg, top, n=80, rest=10.5):
    a = np.full(n, rest)
    a[-1], a[:n_neg] = top, neg
    return a


PHASE = "the water image holds many negative values (a phase image?)"


@pytest.mark.parametrize("water, expected", [
    (np.r_[np.full(40, 10.5), np.zeros(58), -6.0], ""),  # 1 % negative, however deep; zeros are not negative
    (_neg(4, -6.0, 10.5), ""),  # 5 % negative: not more than 5 %
    (_neg(5, -1.0, 20.0), ""),  # down to -5 % of the maximum exactly: not below
    (_neg(10, -0.5, 100.5), ""),  # shallow
    (_neg(10, -0.03, 0.5, rest=0.25), PHASE),  # below -5 % of a maximum under 1
    (np.ones(80), "the water image holds 1 integer levels only (a label map?)"),
])
def test_not_dixon_phase_image_thresholds(water, expected):
    # under 100 voxels: nothing is checked after the label map and the phase image
    assert S.not_dixon_reason(water, np.full(water.shape, 0.75)) == expected


def _pair(i=np.arange(1000)):
    return 10.25 + (i % 5) * 0.5, 0.75 + (i % 7) * 0.25  # uncorrelated, non-integer


def test_not_dixon_reason_body_similarity_and_signal_checks():
    w = np.r_[np.full(99, 10.5), np.full(300, 0.04)]  # 99 body voxels and faint background
    assert S.not_dixon_reason(w, w.copy()) == ""
    w = np.linspace(10.5, 50.5, 200)
    assert S.not_dixon_reason(w, w * 1.0005) == "water and fat are the same image"  # within 0.1 %
    prop = "water and fat are proportional (the same image scaled)"
    small = np.linspace(0.15, 0.45, 200)  # std under 1
    assert S.not_dixon_reason(small, small * 2) == prop and S.not_dixon_reason(small * 2, small) == prop
    w, f = _pair()
    assert S.not_dixon_reason(w, f) == ""
    w[0] = 1e6  # one outlier: the 99th percentile ignores it
    assert S.not_dixon_reason(w, f) == ""
    w, f = _pair()
    f[0] = 1e6
    assert S.not_dixon_reason(w, f) == ""
    w, f = _pair()
    w[::10], f[:] = 100.0, np.where(np.arange(1000) % 10 == 5, 2.0, 1.25)  # fat 99th percentile 2 % of water's exactly
    assert S.not_dixon_reason(w, f) == ""
    f[f == 2.0] = 1.99
    assert S.not_dixon_reason(w, f) == "the fat image holds almost no signal in the body"


def test_integer_levels_samples_every_other_voxel_of_4_million():
    a = np.zeros(4_000_000)
    a[1::2] = 0.5
    assert S.integer_levels(a) == 1


def test_body_helpers():
    from legcomp.preprocessing.body import background_level, block_mean, body_mask, find_bones

    a = np.zeros((40, 40, 2))
    a[:2], a[-2:], a[:, :2], a[:, -2:] = 1.0, 2.0, 3.0, 4.0  # the outermost 5 %: 2 voxels each side
    a[10:30, 10:30] = 100.0
    assert background_level(a) == float(np.median(np.concatenate([a[:2].ravel(), a[-2:].ravel(), a[:, :2].ravel(),
                                                                  a[:, -2:].ravel()])))
    assert background_level(np.ones((3, 3, 1))) == 1.0  # at least one voxel each side
    narrow = np.ones((20, 3, 1))
    narrow[:, 1], narrow[[0, -1]] = 100.0, 100.0  # 3 voxels in y: one column each side, not the middle one
    assert background_level(narrow) == 1.0
    sq = np.zeros((20, 20, 1))
    sq[[0, -1]] = 1.0  # 44 of the 80 frame voxels are 1 (1 voxel each side), but not 44 of 120 (2 each side)
    assert background_level(sq) == 1.0
    tall = np.zeros((40, 20, 1))
    tall[[0, 1, -2, -1]] = 1.0  # 40 voxels in x: 2 each side (88 ones of 160); 20 in y: 1 each side
    assert background_level(tall) == 1.0
    strip = np.zeros((40, 40, 1))
    strip[10:13, 5:35] = 100.0  # 3 voxels wide: kept by the 3 x 3 opening
    assert body_mask(strip).sum() == 90
    assert body_mask(np.swapaxes(strip, 0, 1)).sum() == 90  # and 3 voxels high
    spike = np.zeros((20, 20, 1))
    spike[5:15, 5:15] = 10.0
    spike[8, 8] = 1000.0  # the 99th percentile (10), not the maximum, sets the threshold (1.5)
    spike[5:15, 15:18] = 1.5  # exactly at the threshold: not body
    assert body_mask(spike).sum() == 100
    m = body_mask(a)
    assert m[10:30, 10:30].all() and m.sum() == 2 * 400
    ring = a.copy()
    ring[15:25, 15:25] = 0.0  # a hole inside the body is filled
    assert body_mask(ring).sum() == 2 * 400
    noisy = np.full((40, 40, 1), 20.0)
    noisy[10:30, 10:30] = 45.0  # above 15 % of the 99th percentile, but not 2.5 x the background (50)
    assert not body_mask(noisy).any()
    noisy[10:30, 10:30] = 51.0
    assert body_mask(noisy).sum() == 400
    assert body_mask(a, fraction=1.1).sum() == 0
    b = np.arange(5 * 4 * 1, dtype=float).reshape(5, 4, 1)
    bm = block_mean(b, 2)
    assert bm.dtype == np.float32 and bm.shape == (2, 2, 1)
    assert bm[0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4) and bm[1, 1, 0] == pytest.approx((10 + 11 + 14 + 15) / 4)
    assert block_mean(b, 1).dtype == np.float32 and block_mean(b, 1).shape == b.shape
    # one leg slice (1 mm pixels): a disc of muscle with a dark 2 x 2 cm bone; a 0.5 x 0.5 cm void is a vessel
    ii, jj = np.indices((80, 80))
    leg = (ii - 40) ** 2 + (jj - 40) ** 2 < 35 ** 2
    w = np.where(leg, 100.0, 0.0)
    f = np.where(leg, 10.0, 0.0)
    w[30:50, 30:50] = f[30:50, 30:50] = 1.0
    w[40:45, 55:60] = f[40:45, 55:60] = 1.0
    from scipy import ndimage
    edt = ndimage.distance_transform_edt(leg)
    lab, areas = find_bones(w, f, leg, edt, (1.0, 1.0))
    assert len(areas) == 1 and areas[0] == pytest.approx(4.0, abs=0.5) and lab.max() == 1
    assert lab[40, 40] == 1 and lab[42, 57] == 0
    lab, areas = find_bones(w, f, leg, np.zeros_like(edt), (1.0, 1.0))  # nothing 3 mm inside
    assert len(areas) == 0 and not lab.any()
    lab, areas = find_bones(np.where(leg, 100.0, 0), np.where(leg, 10.0, 0), leg, edt, (1.0, 1.0))
    assert len(areas) == 0 and not lab.any()
    wf, ff = w.copy(), f.copy()
    wf[20:28, 30:50], ff[20:28, 30:50] = 10.0, 100.0  # fat-replaced tissue is as bright as muscle: no bone
    lab, areas = find_bones(wf, ff, leg, edt, (1.0, 1.0))
    assert len(areas) == 1 and lab[40, 40] == 1 and lab[24, 40] == 0


def test_swap_region_on_the_input_grid_and_fix_swap_types():
    from legcomp.preprocessing.swap import SwapReport, fix_swap, sector_map, swap_region, swapped_arc

    legs = np.zeros((3, 2, 2), np.uint8)
    legs[:2], legs[2] = 1, 2  # work grid: left leg rows 0-1, right leg row 2
    rep = SwapReport("partial", units=[_unit(0, "right", "swapped"), _unit(1, "left", "ok")], legs=legs, work_factor=2)
    region = swap_region(rep, (7, 5, 2))  # input grid: 2 x 2 blocks, the last row and column repeated
    expect = np.zeros((7, 5, 2), bool)
    expect[4:7, :, 0] = True
    np.testing.assert_array_equal(region, expect)
    # a work grid wider in y than in x: each axis padded to its own size
    rep_t = SwapReport("partial", units=rep.units, legs=legs.transpose(1, 0, 2).copy(), work_factor=2)
    np.testing.assert_array_equal(swap_region(rep_t, (5, 7, 2)), expect.transpose(1, 0, 2))
    assert swap_region(SwapReport("whole"), (2, 2, 1)).all()
    assert not swap_region(SwapReport("none", legs=legs, units=rep.units), (7, 5, 2)).any()
    assert not swap_region(SwapReport("partial", units=rep.units), (7, 5, 2)).any()  # no leg map
    # a partly swapped unit: only its swapped sectors, angles true on anisotropic pixels
    legs = np.full((12, 12, 1), 2, np.uint8)
    sectors = (-1, -1) + (1,) * 10
    u = _unit(0, "right", "partial", 0.5, sectors)
    u.centre = (6.0, 6.0)
    rep = SwapReport("partial", units=[u], legs=legs, work_factor=1, spacing=(1.0, 4.0))
    want = np.isin(sector_map((12, 12), (6.0, 6.0), (1.0, 4.0)), sorted(swapped_arc(sectors)))
    assert not np.array_equal(want, np.isin(sector_map((12, 12), (6.0, 6.0)), [0, 1]))
    np.testing.assert_array_equal(swap_region(rep, (12, 12, 1))[..., 0], want)
    assert swapped_arc((1, -1, -1) + (1,) * 9) == {1, 2}
    # fix_swap exchanges water and fat there, keeping the arrays' types
    w = np.full((12, 12, 1), 10.0, np.float32)
    f = np.full((12, 12, 1), 90.0, np.float32)
    st = make_study({"water": (w, np.eye(4), "w"), "fat": (f, np.eye(4), "f")})
    fixed = fix_swap(st, rep)
    assert fixed.water.dtype == np.float32 and fixed.fat.dtype == np.float32
    np.testing.assert_array_equal(fixed.water[..., 0], np.where(want, 90.0, 10.0))
    np.testing.assert_array_equal(fixed.fat[..., 0], np.where(want, 10.0, 90.0))
    assert rep.fixed and rep.exchanged == int(want.sum()) and fixed.in_phase is st.in_phase


def test_screen_study_reports_without_fixing_by_default(swapped_study, capsys):
    st = read_study(swapped_study)
    out, rep = S.screen_study(st)
    assert out is st and rep.verdict == "whole" and not rep.fixed
    assert "fat-water swap: water and fat are swapped in the whole series" in capsys.readouterr().err
    np.testing.assert_array_equal(rep.slice_index, S.input_slice_index(st))
    fixed, rep = S.screen_study(st, fix=True)
    assert rep.fixed and np.array_equal(fixed.water, st.fat)


def test_swap_slice_numbers_follow_the_input_slice_axis():
    w = np.ones((4, 3, 5), np.float32)
    st = make_study({"water": (w, np.diag([1.0, 1, -2, 1]), "w"), "fat": (w, np.diag([1.0, 1, -2, 1]), "f")})
    assert S.input_slice_index(st).tolist() == [4, 3, 2, 1, 0]
    st = make_study({"water": (w, np.diag([1.0, 1, 2, 1]), "w"), "fat": (w, np.diag([1.0, 1, 2, 1]), "f")})
    assert S.input_slice_index(st).tolist() == [0, 1, 2, 3, 4]
    perm = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # input axis 1 runs inferior
    st = make_study({"water": (w, perm, "w"), "fat": (w, perm, "f")})
    assert st.shape == (4, 5, 3) and S.input_slice_index(st).tolist() == [2, 1, 0]
    from dataclasses import replace
    assert S.input_slice_index(replace(st, input_affine=None)).tolist() == [0, 1, 2]


def test_work_grid_blocks_fine_pixels_to_about_2_mm():
    w = np.ones((41, 20, 2), np.float32)
    ww, ff, body, legs, spacing, k = S.work_grid(w, w, np.diag([0.5, 0.7, 4.0, 1.0]))
    assert k == 4 and spacing == pytest.approx((2.0, 2.8)) and ww.shape == (10, 5, 2) and legs.shape == body.shape
    assert S.work_grid(w, w, np.diag([2.5, 2.5, 4.0, 1.0]))[5] == 1


def _layered(values, n=5):
    """(ff, layers, mask) of a slice whose layer i holds ``n`` voxels of fat fraction ``values[i]``."""
    layers = np.repeat(np.arange(len(values))[:, None], n, axis=1)
    return np.repeat(np.asarray(values, float)[:, None], n, axis=1), layers, np.ones(layers.shape, bool)


@pytest.mark.parametrize("values, first, last, expected", [
    ([0.9, 0.5, 0.3, 0.1], 1, 3, (0.3, 2)),  # layer 0 is skin; |0.3 - 0.5| = DECISIVE exactly
    ([0.1, 0.5, 0.5, 0.9, 0.1], 1, 3, (0.9, 3)),  # the last layer counts, the one after it not
    ([0.1, 0.5, 0.5, 0.5, 0.9], 1, 3, (None, 0)),
])
def test_surface_ff_takes_the_first_decisive_layer_from_first_to_last(values, first, last, expected):
    ff, layers, mask = _layered(values)
    m, i = S.surface_ff(ff, layers, mask, first, last)
    assert i == expected[1] and (np.isnan(m) if expected[0] is None else m == expected[0])


def test_surface_ff_skips_layers_of_under_five_voxels():
    ff, layers, mask = _layered([0.5, 0.9, 0.1, 0.5])
    mask[1, 0] = False  # layer 1: 4 voxels, skipped; layer 2: 5, enough
    assert S.surface_ff(ff, layers, mask, 1, 3) == (0.1, 2)


@pytest.mark.parametrize("values, surface, last, expected", [
    ([0.0, 0.0, 0.2, 0.3, 0.4, 0.1, 0.6], 0.9, 4, 0.3),  # from layer 2 (first + 1) to 4: median of 0.2, 0.3, 0.4
    ([0.75, 0.75, 0.75, 0.75, 0.45, 0.1], 0.75, 4, 0.45),  # only the last layer differs, by CONTRAST exactly
    ([0.9, 0.9, 0.9, 0.9, 0.9, 0.2], 0.9, 4, None),  # a contrast below layer ``last`` does not count
])
def test_beneath_ff_from_the_first_contrasting_layer_down_to_last(values, surface, last, expected):
    import warnings

    ff, layers, mask = _layered(values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no median of an empty selection
        b = S.beneath_ff(ff, layers, mask, surface, 1, last)
    assert np.isnan(b) if expected is None else b == pytest.approx(expected)


def test_judge_unit_surface_depth_and_inner_core_on_2_mm_pixels(monkeypatch):
    # a leg of radius 15 pixels (30 mm): surface layers 2 .. 5 (min(20, 0.35 x 30) / 2 mm), inner: deeper than
    # 12 mm, beneath: layers down to 7 (0.5 x 30 / 2 mm); signal far below 1 (a scaled image)
    monkeypatch.setattr(S, "_marrow_ff", lambda *a: 0.12345)
    ii, jj = np.indices((36, 36))
    r = np.hypot(ii - 17.5, jj - 17.5)
    leg = r < 15
    ip = np.where(leg, 0.1, 0.0)
    f = np.where(leg, np.where(r > 12.5, 0.05, np.where(r > 9, 0.09, 0.02)), 0.0)
    u = S.judge_unit(ip - f, f, leg, (2.0, 2.0))
    assert (u.z, u.leg, u.area_cm2, u.ff_surface, u.ff_inner, u.ff_marrow, u.score) == \
        (0, "", 28.6, 0.9, 0.2, 0.123, 0.723)  # score 0.4 + 0.7 - 0.37655
    # beneath the fat (layers 3-5): water in layers 6-7, fat-like (0.75) below: +1 in the sectors along the axes
    # (the diagonal ones hold under 5 voxels per layer)
    f = np.where(leg, np.where(r > 12.5, 0.05, np.where(r > 9.5, 0.09, np.where(r > 7.5, 0.02, 0.075))), 0.0)
    assert S.judge_unit(ip - f, f, leg, (2.0, 2.0)).sectors == (0, 1, 0) * 4
    f = np.where(leg, np.where(r > 8, 0.05, 0.01), 0.0)  # decisive only deeper than layer 5
    u = S.judge_unit(ip - f, f, leg, (2.0, 2.0))
    assert np.isnan(u.ff_surface) and u.score == -0.377  # the marrow term alone


def test_judge_unit_inner_median_needs_five_voxels():
    # 1 mm pixels; inner: deeper than 0.4 x the radius of a disc of the leg's area
    leg = np.zeros((12, 14), bool)
    leg[2:5, 2:9] = True  # 21 voxels, radius 2.59 mm: 5 inner voxels (the middle row but its ends)
    f = np.where(leg, 0.9, 0.0)
    f[3, 3:8] = 0.2
    assert S.judge_unit(1.0 - f, f, leg, (1.0, 1.0)).ff_inner == 0.2
    leg[5:7, :] = False
    leg[2:5, 7:9] = False
    leg[6, 1:13] = leg[5, 1] = True  # 28 voxels: 3 inner ones only
    assert np.isnan(S.judge_unit(1.0 - f, f, leg, (1.0, 1.0)).ff_inner)


@pytest.mark.parametrize("n_marrow, expected", [(50, 0.9), (49, None)])
def test_marrow_ff_needs_half_a_cm2_of_bright_bone(monkeypatch, n_marrow, expected):
    # 2 x 0.5 mm pixels: 50 bright bone voxels are 0.5 cm^2 exactly; signal far below 1 (a scaled image)
    bones = np.zeros((20, 20), np.int32)
    bones.flat[:n_marrow + 60] = 1
    w, f = np.full((20, 20), 0.0625), np.full((20, 20), 0.0625)
    w.flat[:n_marrow], f.flat[:n_marrow] = 0.025, 0.225  # marrow: W+F 0.25, FF 0.9
    w.flat[n_marrow:n_marrow + 60], f.flat[n_marrow:n_marrow + 60] = 0.0625, 0.0  # W+F half the median: not marrow
    monkeypatch.setattr(S, "find_bones", lambda *a: (bones, np.array([1.0])))
    leg = np.ones((20, 20), bool)
    ff = S._marrow_ff(w, f, leg, np.ones((20, 20)), (2.0, 0.5))
    assert np.isnan(ff) if expected is None else ff == pytest.approx(expected)


def test_work_grid_hands_leg_map_the_blocked_affine(monkeypatch):
    seen = []
    monkeypatch.setattr(S, "leg_map", lambda body, aff: seen.append(aff) or np.ones(body.shape, np.uint8))
    aff = np.array([[0.5, 0.1, 0.0, 10.0], [0.2, 0.7, 0.0, 20.0], [0.0, 0.3, 4.0, 30.0], [0.0, 0.0, 0.0, 1.0]])
    w = np.zeros((40, 30, 2), np.float32)
    w[10:30, 5:25] = 1.0
    k = S.work_grid(w, w, aff)[5]
    assert k == 3 and len(seen) == 1
    np.testing.assert_allclose(seen[0], aff @ np.diag([3.0, 3.0, 1.0, 1.0]))


def test_fill_undecided_looks_at_the_nearest_judged_unit_only():
    got = [u.verdict for u in S._fill_undecided([_unit(0, "left", "partial"), _unit(1, "left", "undecided"),
                                                  _unit(2, "left", "swapped")])]
    assert got == ["partial", "undecided", "swapped"]  # a partly swapped neighbour is judged too
    got = [u.verdict for u in S._fill_undecided([_unit(0, "left", "undecided"), _unit(1, "left", "swapped"),
                                                  _unit(2, "left", "ok")])]
    assert got == ["swapped", "swapped", "ok"]  # only the nearest above


def test_summarise_keeps_work_grid_and_mixes_swapped_and_partial():
    arc = (-1, -1, 1, 1) + (0,) * 8
    units = [_unit(z, "right", "partial", 0.5, arc) for z in range(3)] + [_unit(z, "left", "swapped") for z in range(3)]
    r = S.summarise(units, None, 2, (2.0, 3.0))
    assert (r.verdict, r.work_factor, r.spacing) == ("partial", 2, (2.0, 3.0))
    assert S.summarise([]).work_factor == 1
    r = S.summarise([_unit(z, "left", "swapped") for z in range(3)] + [_unit(z, "right", "ok") for z in range(2)])
    assert r.note().startswith("fat-water swap: water and fat are swapped in part of the series (the whole left leg)")


def test_judge_unit_sectors_are_true_angles_on_anisotropic_pixels():
    # a swapped arc (water over fat) in sectors 1-2 by angle in mm, on 2 x 1 mm pixels
    ii, jj = np.indices((40, 40))
    r = np.hypot(ii - 19.5, jj - 19.5)
    leg = r < 18
    arc = np.isin(S.sector_map((40, 40), (19.5, 19.5), (2.0, 1.0)), [1, 2])
    f = np.where(leg, np.where(r > 14, np.where(arc, 0.1, 0.9), np.where(arc, 0.9, 0.1)), 0.0)
    u = S.judge_unit(np.where(leg, 1.0, 0.0) - f, f, leg, (2.0, 1.0))
    assert u.sectors == (1, -1, -1) + (1,) * 9

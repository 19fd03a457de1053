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


def test_coarse_voxels_are_not_judged(phantoms):
    ph = phantoms["thigh"]
    aff = ph.affine.copy()
    aff[:2, :2] *= 1.5  # 6 mm in-plane
    rep = S.detect_swap(ph.fat, ph.water, aff)
    assert rep.verdict == "undecided" and "coarser" in rep.to_json()["not_judged"] and rep.note() == ""


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

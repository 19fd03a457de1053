"""`legcomp prepare`: expert muscle labels -> training studies (mapping, stage-1 fill-in, unlabelled legs,
unlabelled slices -> IGNORE, label record of the muscles the labels lack)."""

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from legcomp import anatomy
from legcomp.cli import main
from legcomp.errors import LegcompInputError
from legcomp.io import read_label_map, read_study
from legcomp.phantom import generate, write_phantom
from legcomp.prepare import prepare_study
from legcomp.quantification.mapping import apply_label_mapping, load_label_mapping
from legcomp.training.data import study_cases

IGN = anatomy.IGNORE
TINY = dict(matrix=(96, 64, 12), spacing=(4.0, 4.0, 8.0))
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "huashan_thigh_001"


@pytest.fixture(scope="module")
def phantom():
    return generate("thigh", 11, **TINY)


class StubStage1:
    """Stands in for a cascade: a stage-1 'prediction' that misses part of the muscle (eroded)."""

    sources = {1: "stub"}

    def __init__(self, truth: np.ndarray):
        wm = ndimage.binary_erosion(truth == anatomy.WHOLE_MUSCLE.id, iterations=2)
        self.pred = np.where(wm, anatomy.WHOLE_MUSCLE.id, np.where(truth == anatomy.SAT.id, 1, 0)).astype(np.uint8)
        self.calls = 0

    def predict_stage1(self, study):
        self.calls += 1
        return self.pred


def _without_labels(ph):
    study = ph.to_study()
    return dataclasses.replace(study, labels={})


def test_stage1_filled_in_and_unlabelled_leg_left_out(phantom):
    study = _without_labels(phantom)
    stub = StubStage1(phantom.stage1)
    left_only = np.where(phantom.legs == 1, phantom.stage2, 0)
    prepared, info = prepare_study(study, left_only, "thigh", stub)
    assert stub.calls == 1 and info["legs_kept"] == ["left"] and info["legs_left_out"] == ["right"]
    s1, s2, legs = (prepared.labels[k] for k in ("stage1", "stage2", "legs"))
    # every labelled muscle voxel is whole muscle, even where the network missed it
    assert (s1[left_only > 0] == anatomy.WHOLE_MUSCLE.id).all()
    assert (stub.pred[left_only > 0] != anatomy.WHOLE_MUSCLE.id).any()
    np.testing.assert_array_equal(s2, left_only)
    assert set(np.unique(legs)) == {0, 1} and (legs[phantom.legs == 2] == 0).all()
    # training sees the labelled leg only (one case, not a right leg learnt as "no muscle")
    cases = study_cases(prepared, 2, "thigh")
    assert [c["name"].rsplit("_", 1)[-1] for c in cases] == ["left"]


def test_own_stage1_kept_and_legs_option(phantom):
    study = phantom.to_study()
    prepared, info = prepare_study(study, phantom.stage2, "thigh", None, legs=(2,))
    assert "own" in info["stage1"] and info["legs_kept"] == ["right"]
    np.testing.assert_array_equal(prepared.labels["stage1"], phantom.stage1)
    assert (prepared.labels["stage2"][phantom.legs == 1] == 0).all()


def test_unlabelled_slices_ignored_and_unlabelled_muscles_recorded(phantom):
    """Left leg unlabelled on slices 9-11, right leg on slice 0; adductor longus unmapped, gluteus maximus
    mapped but absent: partial labels, not background."""
    study = _without_labels(phantom)
    stub = StubStage1(phantom.stage1)
    al, gm = (anatomy.label_by_name(n, "thigh").id for n in ("adductor_longus", "gluteus_maximus"))
    m = np.where(np.isin(phantom.stage2, (al, gm)), 0, phantom.stage2).astype(np.uint8)
    m[:, :, 9:][phantom.legs[:, :, 9:] == 1] = 0
    m[:, :, 0][phantom.legs[:, :, 0] == 2] = 0
    mapped = [lab.name for lab in anatomy.THIGH_MUSCLES if lab.id != al]
    prepared, info = prepare_study(study, m, "thigh", stub, mapped=mapped)
    s1, s2, legs = (prepared.labels[k] for k in ("stage1", "stage2", "legs"))
    assert info["slices_without_labels"] == {"left": [9, 10, 11], "right": [0]}
    expect = np.zeros(m.shape, bool)
    expect[:, :, 9:] = legs[:, :, 9:] == 1
    expect[:, :, 0] = legs[:, :, 0] == 2
    np.testing.assert_array_equal(s2 == IGN, expect)  # that leg's whole side of the slice
    np.testing.assert_array_equal(s2[~expect], m[~expect])
    np.testing.assert_array_equal(s1, np.where(m > 0, anatomy.WHOLE_MUSCLE.id, stub.pred))  # stage 1 as filled
    assert info["muscles_unmapped"] == ["adductor_longus"] and info["muscles_absent"] == ["gluteus_maximus"]
    assert prepared.label_record["stage2"] == {"unlabelled": ["adductor_longus", "gluteus_maximus"]}
    assert prepared.label_record["stage1"] == {"unlabelled": []}
    for case in study_cases(prepared, 2, "thigh"):
        assert case["classes"][[al, gm]].tolist() == [0, 0] and case["classes"].sum() == 12
        assert (case["label"] == IGN).any()
    bg, info_bg = prepare_study(study, m, "thigh", stub, unlabelled_slices="background")
    np.testing.assert_array_equal(bg.labels["stage2"], m)
    assert info_bg["slices_without_labels"] == info["slices_without_labels"]
    with pytest.raises(LegcompInputError, match="unlabelled_slices"):
        prepare_study(study, m, "thigh", stub, unlabelled_slices="zero")


def test_bad_labels_fail_clearly(phantom):
    study = _without_labels(phantom)
    with pytest.raises(LegcompInputError, match="empty"):
        prepare_study(study, np.zeros(study.shape, np.uint8), "thigh", StubStage1(phantom.stage1))
    with pytest.raises(LegcompInputError, match="label mapping"):
        prepare_study(study, np.where(phantom.stage2 > 0, 40, 0).astype(np.uint8), "thigh", StubStage1(phantom.stage1))
    with pytest.raises(LegcompInputError, match="no stage-1"):
        prepare_study(study, phantom.stage2, "thigh", None)
    with pytest.raises(LegcompInputError, match="do not match"):
        prepare_study(study, phantom.stage2[:-1], "thigh", StubStage1(phantom.stage1))


def test_cli_maps_ids_and_survives_a_bad_study(tmp_path, phantom):
    """Foreign ids (muscle id + 100) in a file of the user's naming, adductor longus mapped to null and the
    top slice unlabelled; a second study lacks its label file."""
    al = anatomy.label_by_name("adductor_longus", "thigh").id
    good = tmp_path / "in" / "thigh_a"
    write_phantom(phantom, good)
    for f in ("stage1", "stage2", "legs"):
        (good / f"{f}.nii.gz").unlink()
    foreign = np.where(phantom.stage2 > 0, phantom.stage2.astype(np.int16) + 100, 0).astype(np.int16)
    foreign[:, :, -1] = 0
    nib.save(nib.Nifti1Image(foreign, phantom.affine), str(good / "experts.nii.gz"))
    mapping = {"region": "thigh", "stage": 2,
               "map": {str(lab.id + 100): None if lab.id == al else lab.name for lab in anatomy.MUSCLES["thigh"]}}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    bad = tmp_path / "in" / "thigh_b"
    write_phantom(phantom, bad)  # no experts.nii.gz
    out = tmp_path / "out"
    args = ["--labels", "experts.nii.gz", "--region", "thigh", "--mapping", str(tmp_path / "map.json"),
            "--quiet", "--device", "cpu"]
    rc = main(["prepare", str(tmp_path / "in"), "--out", str(out), *args])
    assert rc == 1
    fails = pd.read_csv(out / "failures.csv")
    assert len(fails) == 1 and "thigh_b" in fails["study"][0] and "experts.nii.gz" in fails["error"][0]
    assert not (out / "thigh_b").exists()
    prepared = read_study(out / "thigh_a")
    truth = np.where(phantom.stage2 == al, 0, phantom.stage2)
    s2 = prepared.labels["stage2"]
    assert (s2[:, :, -1] == IGN).all()  # both legs unlabelled there: the whole slice
    np.testing.assert_array_equal(s2[:, :, :-1], truth[:, :, :-1])
    assert (prepared.labels["stage1"][:, :, :-1][truth[:, :, :-1] > 0] == anatomy.WHOLE_MUSCLE.id).all()
    assert prepared.label_record["stage2"]["unlabelled"] == ["adductor_longus"]  # read from label_record.json
    info = json.loads((out / "thigh_a" / "prepare.json").read_text())
    assert info["legs_kept"] == ["left", "right"] and info["muscles_unmapped"] == ["adductor_longus"]
    assert info["label_record"] == prepared.label_record
    # training: adductor longus weighs 0 in the loss, the IGNORE voxels stay IGNORE
    cases = study_cases(prepared, 2, "thigh")
    assert len(cases) == 2 and all(c["classes"][al] == 0 and c["classes"].sum() == 13 for c in cases)
    assert all((c["label"] == IGN).any() for c in cases)
    # --unlabelled-slices background: the old behaviour, 0 on the unlabelled slice
    assert main(["prepare", str(good), "--out", str(tmp_path / "bg"), "--unlabelled-slices", "background", *args]) == 0
    np.testing.assert_array_equal(read_study(tmp_path / "bg" / "thigh_a").labels["stage2"], np.where(
        np.arange(truth.shape[2]) == truth.shape[2] - 1, 0, truth))


@pytest.mark.skipif(not (REAL / "water.nii.gz").is_file(), reason=f"real data not found at {REAL}")
def test_real_thigh_reference_labels_prepare(tmp_path):
    rc = main(["prepare", str(REAL), "--labels", "reference_labels.nii.gz", "--region", "thigh",
               "--mapping", "huashan_thigh", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    assert rc == 0
    info = json.loads((tmp_path / "huashan_thigh_001" / "prepare.json").read_text())
    assert info["legs_kept"] == ["left", "right"] and len(info["muscles_labelled"]) == 10
    # the reference labels slices 0-13 of 16; the hip slices 14-15 carry no label, not background. (The
    # leg map gives the merged hip slices 12-15 almost wholly to one leg: the other's sliver there, air, is
    # "unlabelled" too.)
    gaps = info["slices_without_labels"]
    assert all({14, 15} <= set(gaps[leg]) and min(gaps[leg]) >= 12 for leg in ("left", "right"))
    unlabelled = {"adductor_longus", "adductor_brevis_pectineus", "gluteus_maximus"}
    assert set(info["muscles_unmapped"]) == unlabelled
    study = read_study(tmp_path / "huashan_thigh_001")
    assert study.shape == (512, 512, 16)
    assert set(study.label_record["stage2"]["unlabelled"]) == unlabelled
    s1, s2 = study.labels["stage1"], study.labels["stage2"]
    top = s1[:, :, 14:] == anatomy.WHOLE_MUSCLE.id
    assert top.any() and (s2[:, :, 14:][top] == IGN).all()
    assert not ((s2[:, :, :14] == IGN) & (s1[:, :, :14] > 0)).any()
    ref = apply_label_mapping(read_label_map(REAL / "reference_labels.nii.gz", study), load_label_mapping(
        "huashan_thigh"), "thigh")
    np.testing.assert_array_equal(s2[s2 != IGN], ref[s2 != IGN])  # every expert label kept
    assert not ref[s2 == IGN].any()
    cases = study_cases(study, 2, "thigh")
    assert len(cases) == 2
    ids = [anatomy.label_by_name(n, "thigh").id for n in unlabelled]
    assert all((c["classes"][ids] == 0).all() and c["classes"].sum() == 11 for c in cases)

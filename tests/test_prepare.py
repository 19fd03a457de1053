"""`legcomp prepare`: expert muscle labels -> training studies (mapping, stage-1 fill-in, unlabelled legs)."""

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
from legcomp.io import read_study
from legcomp.phantom import generate, write_phantom
from legcomp.prepare import prepare_study
from legcomp.training.data import study_cases

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
    """Foreign ids (muscle id + 100) in a file of the user's naming; a second study lacks its label file."""
    good = tmp_path / "in" / "thigh_a"
    write_phantom(phantom, good)
    for f in ("stage1", "stage2", "legs"):
        (good / f"{f}.nii.gz").unlink()
    foreign = np.where(phantom.stage2 > 0, phantom.stage2.astype(np.int16) + 100, 0).astype(np.int16)
    nib.save(nib.Nifti1Image(foreign, phantom.affine), str(good / "experts.nii.gz"))
    mapping = {"region": "thigh", "stage": 2,
               "map": {str(lab.id + 100): lab.name for lab in anatomy.MUSCLES["thigh"]}}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    bad = tmp_path / "in" / "thigh_b"
    write_phantom(phantom, bad)  # no experts.nii.gz
    out = tmp_path / "out"
    rc = main(["prepare", str(tmp_path / "in"), "--labels", "experts.nii.gz", "--region", "thigh",
               "--mapping", str(tmp_path / "map.json"), "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 1
    fails = pd.read_csv(out / "failures.csv")
    assert len(fails) == 1 and "thigh_b" in fails["study"][0] and "experts.nii.gz" in fails["error"][0]
    assert not (out / "thigh_b").exists()
    prepared = read_study(out / "thigh_a")
    np.testing.assert_array_equal(prepared.labels["stage2"], phantom.stage2)
    assert (prepared.labels["stage1"][phantom.stage2 > 0] == anatomy.WHOLE_MUSCLE.id).all()
    assert json.loads((out / "thigh_a" / "prepare.json").read_text())["legs_kept"] == ["left", "right"]


@pytest.mark.skipif(not (REAL / "water.nii.gz").is_file(), reason=f"real data not found at {REAL}")
def test_real_thigh_reference_labels_prepare(tmp_path):
    rc = main(["prepare", str(REAL), "--labels", "reference_labels.nii.gz", "--region", "thigh",
               "--mapping", "huashan_thigh", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    assert rc == 0
    info = json.loads((tmp_path / "huashan_thigh_001" / "prepare.json").read_text())
    assert info["legs_kept"] == ["left", "right"] and len(info["muscles_labelled"]) == 10
    study = read_study(tmp_path / "huashan_thigh_001")
    assert study.shape == (512, 512, 16)
    assert len(study_cases(study, 2, "thigh")) == 2

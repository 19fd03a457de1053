"""Quantification on a real Dixon scan reproduces its authors' per-muscle fat fractions.

Data: shared/realdata/huashan_thigh_001 (both thighs, IDEAL water/fat, the authors' nnU-Net
labels and their mean fat fraction fat/(fat+water) per muscle). The authors averaged the
voxelwise fraction over all voxels of a label, both legs together (checked: their CSV equals
that mean to ~1e-16), which is legcomp's ``mean_fat_fraction`` of leg ``total``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "huashan_thigh_001"
pytestmark = pytest.mark.skipif(not (REAL / "water.nii.gz").is_file(),
                                reason=f"real data not found at {REAL} (shared/ beside the checkout)")

# the nine muscles whose foreign label maps one-to-one to a legcomp muscle (BL + BB merge into biceps_femoris)
ONE_TO_ONE = {"SA": "sartorius", "RF": "rectus_femoris", "VL": "vastus_lateralis", "VI": "vastus_intermedius",
              "VM": "vastus_medialis", "AM": "adductor_magnus_quadratus_femoris", "GR": "gracilis",
              "ST": "semitendinosus", "SM": "semimembranosus"}


@pytest.fixture(scope="module")
def result():
    from legcomp.io.nifti import read_label_map, read_study
    from legcomp.quantification import apply_label_mapping, load_label_mapping, quantify

    study = read_study(REAL, region="thigh")
    mapping = load_label_mapping("huashan_thigh")
    raw = read_label_map(REAL / "reference_labels.nii.gz", study)
    labels = apply_label_mapping(raw, mapping, path=REAL / "reference_labels.nii.gz")
    return study, raw, quantify(study, None, labels), labels


def test_mean_fat_fraction_matches_authors(result):
    _, _, q, _ = result
    ref = pd.read_csv(REAL / "reference_fat_fraction.csv", encoding="utf-8-sig").iloc[0]
    for abbrev, name in ONE_TO_ONE.items():
        ours = q.value(name, "mean_fat_fraction", "total")
        # measured: at most 1.1e-16 (float64 rounding); 1e-12 leaves room for summation order only
        assert abs(ours - float(ref[abbrev])) < 1e-12, (abbrev, ours, float(ref[abbrev]))


def test_merged_biceps_is_the_voxel_weighted_mean(result):
    study, raw, q, _ = result
    ref = pd.read_csv(REAL / "reference_fat_fraction.csv", encoding="utf-8-sig").iloc[0]
    n_bl, n_bb = int((raw == 8).sum()), int((raw == 11).sum())
    expected = (n_bl * float(ref["BL"]) + n_bb * float(ref["BB"])) / (n_bl + n_bb)
    assert q.value("biceps_femoris", "mean_fat_fraction", "total") == pytest.approx(expected, abs=1e-12)  # 1.1e-16
    assert q.value("biceps_femoris", "volume_ml", "total") == pytest.approx((n_bl + n_bb) * study.voxel_volume_ml)


def test_both_legs_found_and_split(result):
    _, _, q, _ = result
    assert q.meta["flags"]["legs_present"] == ["left", "right"]
    for name in ONE_TO_ONE.values():
        left, right = q.value(name, "volume_ml", "left"), q.value(name, "volume_ml", "right")
        assert left > 0 and right > 0 and 0.5 < left / right < 2.0, name  # each muscle in both legs, similar size


def test_leg_names_agree_with_anatomy(result):
    """Each leg found by the x-profile split is named as its own muscles' laterality says."""
    from legcomp.anatomy import LEGS
    from legcomp.preprocessing.legs import leg_map, side_from_muscles

    study, _, _, labels = result
    legs = leg_map(labels > 0, study.affine)
    for leg_id in LEGS:
        assert side_from_muscles(labels * (legs == leg_id), "thigh", study.affine) == leg_id

"""Evaluation metrics and the subject / folder evaluation (legcomp.evaluation)."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.evaluation import (dice, evaluate_paths, evaluate_subject, exact_fat_volumes, hausdorff95,
                                relative_error_pct, summarize)
from legcomp.io.study import make_study

RF = anatomy.label_by_name("rectus_femoris", "thigh").id
VL = anatomy.label_by_name("vastus_lateralis", "thigh").id


def cube(shape, start, n):
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + n) for s in start)] = True
    return m


@pytest.mark.parametrize("k", [1, 3])
def test_dice_of_offset_cubes(k):
    n = 10
    a = cube((30, 30, 30), (5, 5, 5), n)
    b = cube((30, 30, 30), (5 + k, 5, 5), n)
    assert dice(a, b) == pytest.approx((n - k) / n)
    assert dice(a, a) == 1.0
    assert math.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))
    assert dice(a, np.zeros_like(a)) == 0.0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_hausdorff_of_offset_cubes_anisotropic(k):
    sp = (1.5, 0.7, 4.0)
    a = cube((40, 40, 30), (5, 5, 5), 16)
    b = cube((40, 40, 30), (5 + k, 5, 5), 16)
    # the largest surface distance is the shift itself: k voxels along x
    assert hausdorff95(a, b, sp, percentile=100) == pytest.approx(k * sp[0])
    h95 = hausdorff95(a, b, sp)
    assert 0 < h95 <= k * sp[0]
    ref = float(torch.as_tensor(__import__("monai").metrics.compute_hausdorff_distance(
        torch.from_numpy(a[None, None]).float(), torch.from_numpy(b[None, None]).float(),
        include_background=True, percentile=95, spacing=sp)).item())
    assert h95 == pytest.approx(ref, rel=1e-5)


def test_hausdorff_nested_cubes_and_empty():
    from legcomp.evaluation import surface_distances
    inner = cube((40, 40, 40), (10, 10, 10), 20)
    outer = cube((40, 40, 40), (7, 7, 7), 26)
    d_in, d_out = surface_distances(inner, outer, (2.0, 2.0, 2.0))
    np.testing.assert_allclose(d_in, 6.0)  # every inner surface voxel is 3 voxels x 2 mm from the outer surface
    assert d_out.max() == pytest.approx(6.0 * math.sqrt(3))  # outer corners
    assert d_out.min() == pytest.approx(6.0)
    assert hausdorff95(inner, outer, (2.0, 2.0, 2.0)) == pytest.approx(np.percentile(d_out, 95))
    assert hausdorff95(inner, inner, (1.0, 1.0, 1.0)) == 0.0
    assert math.isnan(hausdorff95(inner, np.zeros_like(inner), (1, 1, 1)))


def test_hausdorff_matches_monai_on_random_blobs():
    from scipy import ndimage
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.standard_normal((40, 36, 20)), 3) > 0.05
    b = ndimage.gaussian_filter(rng.standard_normal((40, 36, 20)), 3) > 0.05
    sp = (1.2, 0.9, 3.5)
    from monai.metrics import compute_hausdorff_distance
    ref = float(compute_hausdorff_distance(torch.from_numpy(a[None, None]).float(),
                                           torch.from_numpy(b[None, None]).float(),
                                           include_background=True, percentile=95, spacing=sp))
    assert hausdorff95(a, b, sp) == pytest.approx(ref, rel=1e-5)


def test_relative_error():
    assert relative_error_pct(110, 100) == pytest.approx(10)
    assert relative_error_pct(90, 100) == pytest.approx(-10)
    assert math.isnan(relative_error_pct(1, 0))


SHAPE = (48, 20, 10)
SP = (1.5, 2.0, 5.0)


def phantom(shift: int = 0):
    """(water, fat, stage1, stage2, affine): two legs, SAT ring, two muscles and an intermuscular row."""
    s1 = np.zeros(SHAPE, np.uint8)
    s2 = np.zeros(SHAPE, np.uint8)
    w = np.zeros(SHAPE, np.float32)
    f = np.full(SHAPE, 10.0, np.float32)
    for x0 in (2, 26):
        s1[x0:x0 + 20, 2:18, 1:9] = 1
        s1[x0 + 2:x0 + 18, 4:16, 1:9] = 2
        s2[x0 + 2:x0 + 9, 4:16, 1:9] = RF
        s2[x0 + 10:x0 + 18, 4:16, 1:9] = VL
    w[s1 == 1], f[s1 == 1] = 50, 950
    w[s1 == 2], f[s1 == 2] = 300, 60
    w[(s1 == 2) & (s2 == 0)], f[(s1 == 2) & (s2 == 0)] = 50, 500
    w[(s2 == RF) & (np.arange(SHAPE[2]) == 4)], f[(s2 == RF) & (np.arange(SHAPE[2]) == 4)] = 100, 400
    aff = np.diag([*SP, 1.0])
    aff[:3, 3] = -np.array(SHAPE) * SP / 2
    if shift:
        s1, s2 = np.roll(s1, shift, 0), np.roll(s2, shift, 0)
    return w, f, s1, s2, aff


def study_of(w, f, aff, name="subj"):
    return make_study({"water": (w, aff, "w"), "fat": (f, aff, "f")}, region="thigh", name=name)


def test_evaluate_subject_identical_is_perfect():
    w, f, s1, s2, aff = phantom()
    df = evaluate_subject(s1, s2, s1, s2, study_of(w, f, aff))
    assert list(df.columns) == ["subject", "region", "leg", "structure", "metric", "value"]
    seg = df[df.structure.isin(["subcutaneous_fat", "whole_muscle", "rectus_femoris", "vastus_lateralis"])]
    assert (seg[seg.metric == "dsc"].value == 1).all()
    assert (seg[seg.metric == "hd95_mm"].value == 0).all()
    assert (seg[seg.metric == "volume_error_pct"].value == 0).all()
    fat = df[df.metric == "fat_volume_error_pct"]
    assert set(fat.structure) == {"mat", "intramat", "intermat"} and set(fat.leg) == {"left", "right", "total"}
    assert np.allclose(fat.value.dropna(), 0)
    absent = df[(df.structure == "gluteus_maximus") & (df.metric == "dsc")].value
    assert absent.isna().all()


def test_evaluate_subject_shift_known_values():
    w, f, s1, s2, aff = phantom()
    _, _, p1, p2, _ = phantom(shift=1)
    df = evaluate_subject(p1, p2, s1, s2, study_of(w, f, aff))

    def val(s, m, leg="total"):
        return float(df[(df.structure == s) & (df.metric == m) & (df.leg == leg)].value.iloc[0])

    assert val("rectus_femoris", "dsc") == pytest.approx(6 / 7)  # 7-voxel-wide block shifted by 1
    assert val("vastus_lateralis", "dsc") == pytest.approx(7 / 8)
    assert val("rectus_femoris", "volume_error_pct") == pytest.approx(0)
    assert val("rectus_femoris", "hd95_mm") <= SP[0] + 1e-9
    assert val("whole_muscle", "hd95_mm") == pytest.approx(SP[0])
    # shifted muscles: prediction's MAT split differs from the reference's
    assert not math.isnan(val("intermat", "fat_volume_error_pct"))


def test_evaluate_subject_with_exact_truth_and_bad_input():
    w, f, s1, s2, aff = phantom()
    st = study_of(w, f, aff)
    truth = {"fat_volume_ml": {"left": {"mat": 1.0, "intramat": 0.5, "intermat": 0.5},
                               "right": {"mat": 2.0, "intramat": 1.0, "intermat": 1.0}}}
    df = evaluate_subject(s1, s2, s1, s2, st, truth=truth)
    ex = df[(df.metric == "exact_fat_volume_ml") & (df.structure == "mat")].set_index("leg").value
    assert ex["left"] == 1.0 and ex["right"] == 2.0 and ex["total"] == 3.0
    with pytest.raises(LegcompInputError):
        evaluate_subject(None, s2, s1, None, st)
    with pytest.raises(LegcompInputError):
        evaluate_subject(s1[:-1], None, s1, None, st)


@pytest.mark.parametrize("doc, key, value", [
    ({"left": {"intermat": {"fat_volume_ml": 3.0, "volume_ml": 9.0}}}, ("left", "intermat"), 3.0),
    ({"legs": {"right": {"mat_fat_ml": 4.0, "mat_fat_fraction": 0.3}}}, ("right", "mat"), 4.0),
    ({"fat_volume_ml": {"intramat": 5.0}}, ("total", "intramat"), 5.0),
])
def test_exact_fat_volumes_layouts(doc, key, value):
    assert exact_fat_volumes(doc)[key] == value


def write_subject(folder, w, f, s1, s2, aff, truth=None):
    folder.mkdir(parents=True)
    for n, a in (("water", w), ("fat", f)):
        nib.save(nib.Nifti1Image(a, aff), str(folder / f"{n}.nii.gz"))
    for n, a in (("stage1", s1), ("stage2", s2)):
        nib.save(nib.Nifti1Image(a.astype(np.uint8), aff), str(folder / f"{n}.nii.gz"))
    if truth is not None:
        (folder / "truth.json").write_text(json.dumps(truth))


def test_evaluate_paths_folder_of_subjects(tmp_path):
    pytest.importorskip("legcomp.io.nifti")
    w, f, s1, s2, aff = phantom()
    _, _, p1, p2, _ = phantom(shift=1)
    truth, pred = tmp_path / "thigh_truth", tmp_path / "pred"
    write_subject(truth / "thigh_a", w, f, s1, s2, aff, truth={"fat_volume_ml": {"total": {"mat": 2.0}}})
    write_subject(truth / "thigh_b", w, f, s1, s2, aff)
    (pred / "thigh_a").mkdir(parents=True)
    (pred / "thigh_b").mkdir(parents=True)
    (pred / "thigh_c").mkdir(parents=True)  # no reference folder: reported, the rest go on
    for d, a1, a2 in (("thigh_a", p1, p2), ("thigh_b", s1, s2), ("thigh_c", s1, s2)):
        nib.save(nib.Nifti1Image(a1, aff), str(pred / d / "stage1.nii.gz"))
        nib.save(nib.Nifti1Image(a2, aff), str(pred / d / "stage2.nii.gz"))
    out = tmp_path / "eval"
    ev = evaluate_paths(pred, truth, out)
    assert set(ev.metrics.subject) == {"thigh_a", "thigh_b"}
    assert set(ev.errors) == {"thigh_c"}
    for n in ("metrics.csv", "summary.csv", "summary.md", "errors.csv"):
        assert (out / n).is_file()
    s = ev.summary
    row = s[(s.structure == "rectus_femoris") & (s.metric == "dsc")].iloc[0]
    assert row["n"] == 2 and row["mean"] == pytest.approx((6 / 7 + 1) / 2)
    assert row["sd"] == pytest.approx(np.std([6 / 7, 1.0], ddof=1))
    md = (out / "summary.md").read_text()
    assert "| rectus_femoris | total |" in md and "thigh_c" in md
    assert "exact_fat_volume_ml" in set(ev.metrics.metric)
    csv = pd.read_csv(out / "metrics.csv")
    assert len(csv) == len(ev.metrics)
    # one subject folder directly
    one = evaluate_paths(pred / "thigh_b", truth / "thigh_b")
    assert set(one.metrics.subject) == {"thigh_b"} and not one.errors
    one = evaluate_paths(pred / "thigh_b", truth)  # reference found by the subject's name
    assert set(one.metrics.subject) == {"thigh_b"} and not one.errors
    with pytest.raises(LegcompInputError):
        evaluate_paths(tmp_path / "nope", truth)


def test_summarize_empty():
    assert summarize(pd.DataFrame(columns=["subject", "region", "leg", "structure", "metric", "value"])).empty


def test_exact_fat_volumes_phantom_layout():
    leg = {"intramat_ml": 3.0, "intermat_ml": 2.0, "whole_muscle": {"volume_ml": 50.0, "fat_volume_ml": 5.0},
           "intermuscular": {"volume_ml": 4.0, "fat_volume_ml": 2.0}, "muscles": {"gracilis": {"fat_volume_ml": 1.0}}}
    doc = {"region": "thigh", "legs": {"left": leg, "right": dict(leg, intramat_ml=4.0)},
           "total": dict(leg, intramat_ml=7.0, intermat_ml=4.0, whole_muscle={"fat_volume_ml": 11.0})}
    ex = exact_fat_volumes(doc)
    assert ex[("left", "mat")] == 5.0 and ex[("right", "intramat")] == 4.0 and ex[("total", "intermat")] == 4.0
    assert ex[("total", "mat")] == 11.0 and len(ex) == 9


def test_hausdorff_two_legs_matches_monai():
    from monai.metrics import compute_hausdorff_distance
    a = cube((60, 20, 20), (2, 2, 2), 12) | cube((60, 20, 20), (40, 3, 2), 12)
    b = cube((60, 20, 20), (3, 2, 2), 12) | cube((60, 20, 20), (41, 3, 4), 10)
    sp = (1.5, 1.0, 4.0)
    for p, t in ((a, b), (a, cube((60, 20, 20), (3, 2, 2), 12))):  # the second: a leg missing in one mask
        ref = float(compute_hausdorff_distance(torch.from_numpy(p[None, None]).float(),
                                               torch.from_numpy(t[None, None]).float(),
                                               include_background=True, percentile=95, spacing=sp))
        assert hausdorff95(p, t, sp) == pytest.approx(ref, rel=1e-5)

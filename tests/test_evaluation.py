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
from legcomp.evaluation import (METRIC_COLUMNS, dice, evaluate_paths, evaluate_subject, exact_fat_volumes,
                                hausdorff95, relative_error_pct, summarize, summary_markdown, surface_distances,
                                write_evaluation)
from legcomp.evaluation.metrics import confusion, dice_from_confusion
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
    assert set(df[df.leg == "left"].metric) == {
        "pred_fat_volume_ml", "true_fat_volume_ml", "fat_volume_error_pct", "abs_fat_volume_error_pct",
        "exact_fat_volume_ml", "exact_fat_volume_error_pct", "reference_fat_volume_error_pct",
        "pred_pv_fat_volume_ml", "exact_pv_fat_volume_error_pct", "reference_pv_fat_volume_error_pct"}
    left_mat = df[(df.leg == "left") & (df.structure == "mat")].set_index("metric").value
    assert left_mat["reference_fat_volume_error_pct"] == pytest.approx(170.0)  # quantify(reference) 2.70 mL vs 1.0
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


def test_evaluate_paths_folder_of_subjects(tmp_path, caplog):
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
    with caplog.at_level("ERROR", logger="legcomp.evaluation.core"):
        ev = evaluate_paths(pred, truth, out)
    assert set(ev.metrics.subject) == {"thigh_a", "thigh_b"}
    assert ev.errors == {"thigh_c": f"{truth / 'thigh_c'}: no matching reference folder"}
    assert f"evaluation of thigh_c failed: {truth / 'thigh_c'}: no matching reference folder" in caplog.text
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
    assert len(csv) == len(ev.metrics) and list(csv.columns) == list(METRIC_COLUMNS)  # no index column
    # numbers written with 6 significant digits
    assert "thigh,total,rectus_femoris,dsc,0.928571,0.101015,2\n" in (out / "summary.csv").read_text()
    # one subject folder directly
    one = evaluate_paths(pred / "thigh_b", truth / "thigh_b")
    assert set(one.metrics.subject) == {"thigh_b"} and not one.errors
    one = evaluate_paths(pred / "thigh_b", truth)  # reference found by the subject's name
    assert set(one.metrics.subject) == {"thigh_b"} and not one.errors
    with pytest.raises(LegcompInputError):
        evaluate_paths(tmp_path / "nope", truth)


def test_summarize_empty():
    s = summarize(pd.DataFrame(columns=["subject", "region", "leg", "structure", "metric", "value"]))
    assert s.empty and list(s.columns) == ["region", "leg", "structure", "metric", "mean", "sd", "n"]


def test_summarize_keeps_the_order_of_the_metrics():
    rows = [(subj, "thigh", "total", s, m, v + d) for subj, d in (("a", 0.0), ("b", 0.2))
            for s, m, v in (("whole_muscle", "hd95_mm", 2.0), ("whole_muscle", "dsc", 0.5), ("mat", "dsc", 0.1))]
    rows.append(("a", "thigh", "left", "mat", "dsc", float("nan")))
    s = summarize(pd.DataFrame(rows, columns=list(METRIC_COLUMNS)))
    assert list(s.columns) == ["region", "leg", "structure", "metric", "mean", "sd", "n"]
    assert [tuple(r) for r in s[["leg", "structure", "metric", "n"]].itertuples(index=False)] == [
        ("total", "whole_muscle", "hd95_mm", 2), ("total", "whole_muscle", "dsc", 2), ("total", "mat", "dsc", 2),
        ("left", "mat", "dsc", 0)]  # not sorted; NaN values not counted
    np.testing.assert_allclose(s["mean"], [2.1, 0.6, 0.2, np.nan])
    np.testing.assert_allclose(s["sd"], [0.2 / math.sqrt(2)] * 3 + [np.nan])


def test_exact_fat_volumes_phantom_layout():
    leg = {"intramat_ml": 3.0, "intermat_ml": 2.0, "whole_muscle": {"volume_ml": 50.0, "fat_volume_ml": 5.0},
           "intermuscular": {"volume_ml": 4.0, "fat_volume_ml": 2.0}, "muscles": {"gracilis": {"fat_volume_ml": 1.0}}}
    doc = {"region": "thigh", "legs": {"left": leg, "right": dict(leg, intramat_ml=4.0)},
           "total": dict(leg, intramat_ml=7.0, intermat_ml=4.0, whole_muscle={"fat_volume_ml": 11.0})}
    ex = exact_fat_volumes(doc)
    assert ex[("left", "mat")] == 5.0 and ex[("right", "intramat")] == 4.0 and ex[("total", "intermat")] == 4.0
    assert ex[("total", "mat")] == 11.0 and len(ex) == 9
    assert ex[("right", "mat")] == 5.0  # whole_muscle.fat_volume_ml, not intramat + intermat (6.0)


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


@pytest.mark.parametrize("pred, truth", [([0, 2, 2], [0, 1, 0]), ([0, 1, 0], [0, 2, 2])])
def test_dice_of_label_valued_masks(pred, truth):
    # any non-zero value is "in the mask": label ids (2) count like True
    assert dice(np.array(pred), np.array(truth)) == pytest.approx(2 / 3)


def test_dice_of_empty_masks_is_nan_without_warning():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 RuntimeWarning
        assert math.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))


def test_dice_from_confusion_single_voxel_and_absent_label():
    p = np.array([0, 1, 1, 2])
    t = np.array([0, 1, 0, 0])
    c = confusion(p, t, 4)
    np.testing.assert_array_equal(c[:3, :3], [[1, 0, 0], [1, 1, 0], [1, 0, 0]])
    # label 2: one predicted voxel, none in the reference -> 0 (not NaN); label 3 in neither -> NaN
    np.testing.assert_allclose(dice_from_confusion(c), [0.5, 2 / 3, 0.0, np.nan])


@pytest.mark.parametrize("which", ["pred", "truth"])
def test_surface_distances_of_label_valued_masks(which):
    inner = cube((40, 40, 40), (10, 10, 10), 20)
    outer = cube((40, 40, 40), (7, 7, 7), 26)
    ref = surface_distances(inner, outer, (2.0, 2.0, 2.0))
    as_ids = (inner.astype(np.uint8) * 2, outer) if which == "pred" else (inner, outer.astype(np.uint8) * 2)
    got = surface_distances(*as_ids, (2.0, 2.0, 2.0))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r)


@pytest.mark.parametrize("doc, expected", [
    ({"left": {"mat": {"ff": 0.3}}}, {}),  # fat fractions, voxel counts: not volumes
    ({"left": {"mat": {"fat_fraction": 0.3}}}, {}),
    ({"left": {"mat": {"count": 120}}}, {}),
    ({"left": {"mat": {"voxels": 120}}}, {}),
    ({"left": {"mat": {"n_voxels": 120}}}, {}),
    # a path naming neither fat nor mL (and pv): only a value keyed by the structure itself is taken
    ({"pv": {"left": {"mat": 3.0}}}, {("left", "mat"): 3.0}),
    ({"pv": {"left": {"mat": {"value": 3.0}}}}, {}),
    ({"pv_mat": 3.0}, {}),
])
def test_exact_fat_volumes_ignored_and_bare_leaves(doc, expected):
    assert exact_fat_volumes(doc) == expected


@pytest.mark.parametrize("doc, expected", [
    # not finite, bool or text leaves are not volumes
    ({"left": {"mat_fat_ml": float("inf")}, "note": "text"}, {}),
    ({"left": {"mat_fat_ml": True}}, {}),
    ({"left": {"mat_fat_ml": "2.0"}}, {}),
    ({"left": {"mat_fat_fraction": 0.3}}, {}),
    # leg and structure from the tokens of one key ("_", "-" and "/" separate them)
    ({"left_mat_fat_ml": 2.0}, {("left", "mat"): 2.0}),
    ({"left-mat": {"fat_ml": 2.0}}, {("left", "mat"): 2.0}),
    ({"left/mat": {"fat_ml": 2.0}}, {("left", "mat"): 2.0}),
    # several candidates: the one whose path says fat, mL and not pv wins; the first on a tie
    ({"left": {"mat": {"volume_ml": 9.0, "fat_volume_ml": 3.0}}}, {("left", "mat"): 3.0}),
    ({"left": {"mat": {"fat_mm3": 3000.0, "fat_ml": 3.0}}}, {("left", "mat"): 3.0}),
    ({"left": {"mat": {"fat_ml": 2.0, "pv_fat_ml": 2.5}}}, {("left", "mat"): 2.0}),
    ({"left": {"mat": {"fat_ml": 2.0, "fat_volume_ml": 2.5}}}, {("left", "mat"): 2.0}),
    # total: the document's own, else left + right
    ({"left": {"mat_fat_ml": 1.0}, "right": {"mat_fat_ml": 2.0}, "total": {"mat_fat_ml": 3.5}},
     {("left", "mat"): 1.0, ("right", "mat"): 2.0, ("total", "mat"): 3.5}),
    ({"left": {"mat_fat_ml": 1.0}, "right": {"mat_fat_ml": 2.0}},
     {("left", "mat"): 1.0, ("right", "mat"): 2.0, ("total", "mat"): 3.0}),
])
def test_exact_fat_volumes_generic_reader(doc, expected):
    assert exact_fat_volumes(doc) == expected


@pytest.mark.parametrize("doc, expected", [
    # no whole_muscle block: MAT = IntraMAT + InterMAT
    ({"legs": {"left": {"intramat_ml": 3.0, "intermat_ml": 1.0}}},
     {("left", "intramat"): 3.0, ("left", "intermat"): 1.0, ("left", "mat"): 4.0}),
    # an unknown leg name is skipped, the next leg still read
    ({"legs": {"both": {"intramat_ml": 9.0}, "left": {"intramat_ml": 1.0}}}, {("left", "intramat"): 1.0}),
    # "legs" that is not an object: only the total block
    ({"legs": ["left"], "total": {"intramat_ml": 1.0, "intermat_ml": 2.0}},
     {("total", "intramat"): 1.0, ("total", "intermat"): 2.0, ("total", "mat"): 3.0}),
])
def test_exact_fat_volumes_phantom_layout_variants(doc, expected):
    assert exact_fat_volumes(doc) == expected


def test_evaluate_subject_volumes_of_a_missed_muscle():
    w, f, s1, s2, aff = phantom()
    p2 = s2.copy()
    p2[:24][p2[:24] == VL] = 0  # vastus lateralis missed in the leg at x < 24
    df = evaluate_subject(None, p2, None, s2, study_of(w, f, aff))
    vl = df[(df.structure == "vastus_lateralis") & (df.leg == "total")].set_index("metric").value
    assert vl["pred_volume_ml"] == pytest.approx(11.52) and vl["true_volume_ml"] == pytest.approx(23.04)  # 768 voxels/leg
    assert vl["volume_error_pct"] == pytest.approx(-50.0) and vl["abs_volume_error_pct"] == pytest.approx(50.0)
    assert vl["dsc"] == pytest.approx(2 / 3)


def test_evaluate_subject_not_labelled_structure_left_out():
    w, f, s1, s2, aff = phantom()
    first = anatomy.stage_labels(2, "thigh")[0].name
    df = evaluate_subject(None, s2, None, s2, study_of(w, f, aff), not_labelled=frozenset({first}))
    seg = set(df[df.metric == "dsc"].structure)
    assert seg == {lab.name for lab in anatomy.stage_labels(2, "thigh")} - {first}  # only that one left out


def test_evaluate_subject_hd95_of_a_structure_under_1_ml():
    w, f, s1, s2, aff = phantom()
    s2 = s2.copy()
    s2[30:32, 17:19, 1:3] = anatomy.label_by_name("gracilis", "thigh").id  # 8 voxels: 0.12 mL
    df = evaluate_subject(None, s2, None, s2, study_of(w, f, aff))
    gr = df[df.structure == "gracilis"].set_index("metric").value
    assert gr["pred_volume_ml"] == pytest.approx(0.12) and gr["hd95_mm"] == 0.0


def test_evaluate_subject_fat_rule_applies_to_prediction_and_reference():
    w, f, s1, s2, aff = phantom()
    # ff:0.85 takes the intermuscular row (FF 0.91) but not the RF slice (FF 0.8), unlike the seed rule
    df = evaluate_subject(s1, s2, s1, s2, study_of(w, f, aff), fat_rule="ff:0.85")
    tot = df[(df.leg == "total")].set_index(["structure", "metric"]).value
    assert tot[("intramat", "true_fat_volume_ml")] == pytest.approx(0.0)
    assert tot[("mat", "true_fat_volume_ml")] == pytest.approx(2.88)
    assert tot[("mat", "pred_fat_volume_ml")] == pytest.approx(2.88)
    assert tot[("mat", "fat_volume_error_pct")] == pytest.approx(0.0)


def test_evaluate_subject_region_argument_overrides_study():
    w, f, s1, s2, aff = phantom()
    st = make_study({"water": (w, aff, "w"), "fat": (f, aff, "f")}, name="subj")  # region unknown
    df = evaluate_subject(s1, s2, s1, s2, st, region="thigh")
    assert set(df.region) == {"thigh"}
    tot = df[(df.leg == "total")].set_index(["structure", "metric"]).value
    assert tot[("mat", "true_fat_volume_ml")] == pytest.approx(5.40)
    assert tot[("rectus_femoris", "dsc")] == 1.0


def test_evaluate_subject_single_leg_named_by_its_muscles():
    """One leg left of the isocentre whose muscles say it is a right leg (vastus lateralis lateral to
    gracilis towards +x): the fat volumes are the right leg's."""
    gr = anatomy.label_by_name("gracilis", "thigh").id
    s1 = np.zeros(SHAPE, np.uint8)
    s2 = np.zeros(SHAPE, np.uint8)
    s1[2:22, 2:18, 1:9] = 1
    s1[4:20, 4:16, 1:9] = 2
    s2[4:10, 4:16, 1:9] = gr
    s2[12:20, 4:16, 1:9] = VL
    w = np.where(s1 == 1, 50, np.where(s1 == 2, 300, 0)).astype(np.float32)
    f = np.where(s1 == 1, 950, np.where(s1 == 2, 60, 10)).astype(np.float32)
    f[(s1 == 2) & (s2 == 0)] = 500
    aff = np.diag([*SP, 1.0])
    aff[:3, 3] = -np.array(SHAPE) * SP / 2
    df = evaluate_subject(s1, s2, s1, s2, study_of(w, f, aff))
    mat = df[(df.structure == "mat") & (df.metric == "true_fat_volume_ml")].set_index("leg").value
    assert mat.to_dict() == pytest.approx({"left": 0.0, "right": 2.88, "total": 2.88})  # 192 voxels x 0.015 mL


SUMMARY_ROWS = [
    ("thigh", "total", "whole_muscle", "dsc", 0.9, 0.05, 2),
    ("thigh", "total", "whole_muscle", "hd95_mm", 1.5, np.nan, 1),
    ("thigh", "total", "rectus_femoris", "dsc", 0.8, 0.1, 2),
    ("thigh", "left", "mat", "fat_volume_error_pct", np.nan, np.nan, 0),
    ("thigh", "left", "mat", "abs_fat_volume_error_pct", 2.0, 0.5, 2),
]


def test_summary_markdown_exact_text():
    s = pd.DataFrame(SUMMARY_ROWS, columns=["region", "leg", "structure", "metric", "mean", "sd", "n"])
    md = summary_markdown(s, {"b": "boom"}, 2, {"a": ["sartorius", "gracilis"], "c": []})
    assert md == (
        "# legcomp evaluation summary\n\nSubjects evaluated: 2; failed: 1\n\n"
        "Not labelled by the reference, left out of the means (not applicable, not DSC 0): gracilis, sartorius (a)\n\n"
        "## Segmentation (thigh)\n\n| structure | leg | dsc | hd95_mm | n |\n|---|---|---|---|---|\n"
        "| whole_muscle | total | 0.900 ± 0.050 | 1.500 | 2 |\n"  # rows in the summary's order, not sorted
        "| rectus_femoris | total | 0.800 ± 0.100 | – | 2 |\n\n"
        "## Fat volumes (thigh)\n\n| structure | leg | fat_volume_error_pct | abs_fat_volume_error_pct | n |\n"
        "|---|---|---|---|---|\n| mat | left | – | 2.000 ± 0.500 | 2 |\n\n"
        "## Subjects not evaluated\n\n- b: boom\n")


def test_summary_markdown_all_columns_regions_in_order():
    seg = ["dsc", "hd95_mm", "volume_error_pct", "abs_volume_error_pct"]
    fat = ["fat_volume_error_pct", "abs_fat_volume_error_pct", "exact_fat_volume_error_pct",
           "reference_fat_volume_error_pct", "exact_pv_fat_volume_error_pct"]
    rows = [("thigh", "total", "whole_muscle", m, float(i + 1), np.nan, 1) for i, m in enumerate(seg)]
    rows += [("calf", "left", "mat", m, float(i + 1), np.nan, 1) for i, m in enumerate(fat)]  # no segmentation
    s = pd.DataFrame(rows, columns=["region", "leg", "structure", "metric", "mean", "sd", "n"])
    md = summary_markdown(s, None, 3, {"b": ["gracilis"], "a": ["gracilis"]})
    assert md == (
        "# legcomp evaluation summary\n\nSubjects evaluated: 3\n\n"
        "Not labelled by the reference, left out of the means (not applicable, not DSC 0): gracilis (a, b)\n\n"
        "## Segmentation (thigh)\n\n| structure | leg | dsc | hd95_mm | volume_error_pct | abs_volume_error_pct | n |\n"
        "|---|---|---|---|---|---|---|\n| whole_muscle | total | 1.000 | 2.000 | 3.000 | 4.000 | 1 |\n\n"
        "## Fat volumes (calf)\n\n| structure | leg | fat_volume_error_pct | abs_fat_volume_error_pct | "
        "exact_fat_volume_error_pct | reference_fat_volume_error_pct | exact_pv_fat_volume_error_pct | n |\n"
        "|---|---|---|---|---|---|---|---|\n| mat | left | 1.000 | 2.000 | 3.000 | 4.000 | 5.000 | 1 |\n")
    assert summary_markdown(pd.DataFrame(), {}, 0) == "# legcomp evaluation summary\n\nSubjects evaluated: 0\n"


def test_evaluate_paths_subjects_without_error_message(tmp_path, monkeypatch):
    """An exception without a message is reported by its type; nothing evaluated: 0 subjects, errors.csv."""
    from legcomp.evaluation import core
    pred, truth, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    for name in ("a", "b"):
        (pred / name).mkdir(parents=True)
        (pred / name / "stage1.nii.gz").write_bytes(b"")
        (truth / name).mkdir(parents=True)

    def fail(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(core, "_evaluate_pair", fail)
    ev = evaluate_paths(pred, truth, out)
    assert ev.errors == {"a": "RuntimeError", "b": "RuntimeError"} and ev.metrics.empty
    assert (out / "errors.csv").read_text() == "subject,error\na,RuntimeError\nb,RuntimeError\n"
    assert (out / "summary.csv").read_text() == "region,leg,structure,metric,mean,sd,n\n"
    assert (out / "summary.md").read_text() == (
        "# legcomp evaluation summary\n\nSubjects evaluated: 0; failed: 2\n\n"
        "## Subjects not evaluated\n\n- a: RuntimeError\n- b: RuntimeError\n")


def test_evaluate_paths_messages(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LegcompInputError) as e:
        evaluate_paths(tmp_path / "empty", tmp_path)
    assert str(e.value) == f"{tmp_path / 'empty'}: no stage1/stage2 predictions found (neither here nor in sub-folders)"
    w, f, s1, s2, aff = phantom()
    write_subject(tmp_path / "ref", w, f, s1, s2, aff)  # the path names no region
    with pytest.raises(LegcompInputError) as e:
        evaluate_paths(tmp_path / "ref", tmp_path / "ref")
    assert str(e.value) == f"{tmp_path / 'ref'}: region unknown; pass region"


def test_evaluate_paths_reference_study_folder_with_same_named_subfolder(tmp_path):
    """The reference is a study folder itself: used as it is, even with a sub-folder named like the prediction."""
    w, f, s1, s2, aff = phantom()
    write_subject(tmp_path / "thigh_ref", w, f, s1, s2, aff)
    (tmp_path / "thigh_ref" / "subj").mkdir()  # not a study
    pred = tmp_path / "subj"
    pred.mkdir()
    nib.save(nib.Nifti1Image(s1, aff), str(pred / "stage1.nii"))  # uncompressed NIfTI found too
    ev = evaluate_paths(pred, tmp_path / "thigh_ref")
    assert not ev.errors and set(ev.metrics.subject) == {"thigh_ref"}


def test_evaluate_paths_mapping_region_and_messages(tmp_path, caplog):
    """A mapping names the region when the path does not; its errors name the mapped file;
    an unreadable truth.json is skipped with a warning naming it."""
    w, f, s1, s2, aff = phantom()
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"region": "thigh", "stage": 2,
                                   "map": {str(RF): "rectus_femoris", str(VL): "vastus_lateralis"}}))
    ref = tmp_path / "ref"
    write_subject(ref, w, f, s1, s2, aff)
    (ref / "truth.json").write_text("{not json")
    pred = tmp_path / "pred"
    pred.mkdir()
    nib.save(nib.Nifti1Image(s2, aff), str(pred / "stage2.nii.gz"))
    with caplog.at_level("WARNING", logger="legcomp.evaluation.core"):
        ev = evaluate_paths(pred, ref, mapping=mapping)
    assert not ev.errors and set(ev.metrics.region) == {"thigh"}
    assert f"{ref / 'truth.json'}: unreadable truth.json (" in caplog.text
    assert "exact_fat_volume_ml" not in set(ev.metrics.metric)
    assert "gracilis" in ev.not_labelled["pred"] and "rectus_femoris" not in ev.not_labelled["pred"]
    dsc = ev.metrics[ev.metrics.metric == "dsc"].set_index("structure").value
    assert dsc.to_dict() == {"rectus_femoris": 1.0, "vastus_lateralis": 1.0}
    # reference under a fallback name, with an id the mapping lacks: the error names that file
    (ref / "stage2.nii.gz").unlink()
    nib.save(nib.Nifti1Image(np.where(s2 == RF, 99, s2).astype(np.uint8), aff), str(ref / "reference_labels.nii.gz"))
    with pytest.raises(LegcompInputError) as e:
        evaluate_paths(pred, ref, mapping=mapping)
    assert str(e.value) == (f"{ref / 'reference_labels.nii.gz'}: label ids [99] are not in the mapping "
                            "(map them to null to ignore them)")


def test_evaluate_paths_ambiguous_reference_folder_is_a_study(tmp_path):
    """A reference folder with two water images counts as a study (its error is reported), not as a folder
    of subjects, even with a sub-folder named like the prediction."""
    w, f, s1, s2, aff = phantom()
    write_subject(tmp_path / "thigh_ref" / "subj", w, f, s1, s2, aff)
    for n in ("water", "w"):
        nib.save(nib.Nifti1Image(w, aff), str(tmp_path / "thigh_ref" / f"{n}.nii.gz"))
    pred = tmp_path / "subj"
    pred.mkdir()
    nib.save(nib.Nifti1Image(s1, aff), str(pred / "stage1.nii.gz"))
    with pytest.raises(LegcompInputError, match="two files for water"):
        evaluate_paths(pred, tmp_path / "thigh_ref")

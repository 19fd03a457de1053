"""Left/right leg splitting (legcomp.preprocessing.legs)."""

from __future__ import annotations

import numpy as np
import pytest

from legcomp.anatomy import LEGS
from legcomp.errors import LegcompInputError
from legcomp.io.study import make_study
from legcomp.preprocessing.legs import leg_bounding_boxes, leg_map

LEFT = next(k for k, v in LEGS.items() if v == "left")
RIGHT = next(k for k, v in LEGS.items() if v == "right")
SHAPE = (80, 40, 12)


def centred_affine(spacing=(1.5, 1.5, 5.0), shape=SHAPE, flip_x=False):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -np.asarray(spacing) * np.asarray(shape) / 2
    if flip_x:
        aff[0, 0] = -aff[0, 0]
        aff[0, 3] = -aff[0, 3]
    return aff


def disc(cx, cy, r, shape=SHAPE, z=None):
    x, y = np.mgrid[:shape[0], :shape[1]]
    m = np.zeros(shape, bool)
    d = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
    zs = range(shape[2]) if z is None else z
    for k in zs:
        m[..., k] = d
    return m


def test_two_separate_legs_every_voxel_assigned():
    a, b = disc(20, 20, 12), disc(60, 20, 12)
    legs = leg_map(a | b, centred_affine())
    assert legs.dtype == np.uint8 and legs.shape == SHAPE
    assert set(np.unique(legs)) == {LEFT, RIGHT}  # background voxels get a leg too
    assert (legs[a] == LEFT).all() and (legs[b] == RIGHT).all()


def test_flipped_x_affine_swaps_names():
    a, b = disc(20, 20, 12), disc(60, 20, 12)
    legs = leg_map(a | b, centred_affine(flip_x=True))
    assert (legs[a] == RIGHT).all() and (legs[b] == LEFT).all()


def test_empty_foreground_is_all_zero():
    assert not leg_map(np.zeros(SHAPE, bool), centred_affine()).any()


def test_legs_touching_at_a_few_voxels():
    a, b = disc(24, 20, 16), disc(56, 20, 16)
    fg = a | b
    fg[38:43, 19:21, :] = True  # a thin bridge between the legs
    legs = leg_map(fg, centred_affine())
    assert (legs[a] == LEFT).mean() > 0.99 and (legs[b] == RIGHT).mean() > 0.99


def test_slices_with_one_leg_missing_and_converging_legs():
    a = np.zeros(SHAPE, bool)
    b = np.zeros(SHAPE, bool)
    for z in range(SHAPE[2]):
        a |= disc(18 + z, 20, 10, z=[z])  # left leg drifts towards the midline
        if z < 5:
            b |= disc(62 - z, 20, 10, z=[z])  # right leg ends early
    legs = leg_map(a | b, centred_affine())
    assert (legs[a] == LEFT).all() and (legs[b] == RIGHT).all()


@pytest.mark.parametrize("cx, sx, expected", [(60, 1.5, RIGHT), (20, 1.5, LEFT), (40.5, 1.0, RIGHT), (39.5, 1.0, LEFT)])
def test_single_leg_named_by_world_x(cx, sx, expected):
    legs = leg_map(disc(cx, 20, 12), centred_affine(spacing=(sx, sx, 5.0)))  # 40.5, 1 mm: world x 0.5 mm
    assert set(np.unique(legs)) == {expected}


@pytest.mark.parametrize("notch", [38, 39, 40])
def test_touching_legs_split_at_the_smoothed_valley(notch):
    """A bridge 2 voxels deep joins the legs (x 36-48), one voxel shallower at x = notch: the split lies at the
    valley of the x-profile smoothed by 1 voxel (ties within 1 % broken towards the global split), which puts
    the notch column on the left: not at the raw profile's minimum."""
    from legcomp.preprocessing.legs import split_legs

    fg = disc(24, 20, 12) | disc(60, 20, 12)
    fg[36:49, 19:21] = True
    fg[notch, 19] = False
    s = split_legs(fg, centred_affine())
    assert set(s.coverage) == {"touching"}
    np.testing.assert_array_equal(s.midline_x, np.full(SHAPE[2], notch + 0.5))
    assert (s.legs[notch, 20] == LEFT).all() and (s.legs[notch + 1, 20] == RIGHT).all()


def test_a_valley_moved_on_three_slices_is_followed():
    """Touching legs, the shallowest point of the bridge at x 40 on slices 0-8 and x 38 on 9-11: the per-slice
    splits (41, then 39) are median-filtered over 5 slices, which keeps a run of three."""
    from legcomp.preprocessing.legs import split_legs

    fg = disc(24, 20, 12) | disc(60, 20, 12)
    fg[36:49, 19:21] = True
    fg[40, 19, :9] = False
    fg[38, 19, 9:] = False
    s = split_legs(fg, centred_affine())
    first_right = [int(np.argmax(s.legs[:, 20, z] == RIGHT)) for z in range(SHAPE[2])]
    assert first_right == [41] * 9 + [39] * 3


def test_legs_never_on_one_slice_midline_at_the_global_split():
    """Left leg on slices 0-5, right leg on 6-11: no slice shows both, so no gap centre is measured and the
    midline is the global split between the legs (voxels x < split on one side) less half a voxel."""
    from legcomp.preprocessing.legs import find_leg_split, split_legs

    fg = disc(20, 20, 10, z=range(6)) | disc(60, 20, 10, z=range(6, 12))
    s = split_legs(fg, centred_affine())
    assert s.coverage == ("one_leg",) * 12
    prof = np.where(fg.any(axis=1), fg.shape[1] - np.argmax(fg[:, ::-1], axis=1) - np.argmax(fg, axis=1), 0).sum(1)
    split = find_leg_split(prof, 2.0, 0.75)
    assert 30 < split < 50
    np.testing.assert_array_equal(s.midline_x, np.full(12, split - 0.5))
    assert (s.legs[fg & (np.arange(80) < 40)[:, None, None]] == LEFT).all()


def test_non_diagonal_input_affine_named_in_world_coordinates():
    # input stored LPS-like with axes permuted (i -> world y, j -> world -x) and anisotropic voxels
    shape_in = (40, 80, 12)
    aff_in = np.array([[0, -1.2, 0, 48.0], [-0.8, 0, 0, 16.0], [0, 0, 3.0, -18.0], [0, 0, 0, 1]])
    fg_in = np.zeros(shape_in, bool)
    fg_in[10:30, 5:30, :] = True   # j small -> world x large -> the subject's right
    fg_in[10:30, 50:75, :] = True  # j large -> world x small -> left
    right_in = np.zeros(shape_in, bool)
    right_in[10:30, 5:30, :] = True
    img = np.ones(shape_in, np.float32)
    st = make_study({"water": (img, aff_in, "w"), "fat": (img, aff_in, "f")},
                    labels={"fg": (fg_in.astype(np.uint8), aff_in, "fg"), "r": (right_in.astype(np.uint8), aff_in, "r")})
    fg, right = st.labels["fg"] > 0, st.labels["r"] > 0
    legs = leg_map(fg, st.affine)
    assert (legs[right] == RIGHT).all() and (legs[fg & ~right] == LEFT).all()


def test_bad_dimension():
    with pytest.raises(LegcompInputError, match=r"leg map needs a 3D foreground, got shape \(4, 4\)"):
        leg_map(np.ones((4, 4), bool), np.eye(4))


def test_empty_foreground_split():
    from legcomp.preprocessing.legs import split_legs

    split = split_legs(np.zeros((4, 4, 3), bool), np.eye(4))
    assert split.coverage == ("empty",) * 3 and np.isnan(split.midline_x).all() and split.midline_x.shape == (3,)
    assert split.legs.dtype == np.uint8 and not split.legs.any()


def test_bounding_boxes_margin_and_clipping():
    a, b = disc(20, 20, 10), disc(60, 20, 10)
    fg = a | b
    legs = leg_map(fg, centred_affine())
    boxes = leg_bounding_boxes(legs, fg, margin_mm=3.0, spacing=(1.5, 1.5, 5.0))
    assert set(boxes) == {LEFT, RIGHT}
    sx, sy, sz = boxes[LEFT]
    assert (sx.start, sx.stop) == (11 - 2, 30 + 2)  # disc x in 11..29, margin 2 voxels
    assert (sz.start, sz.stop) == (0, SHAPE[2])  # 1 voxel margin clipped
    crop = np.zeros_like(fg)
    crop[boxes[RIGHT]] = True
    assert crop[b].all() and not crop[a].any()
    only_left = leg_bounding_boxes(legs, a, 0.0, (1.5, 1.5, 5.0))
    assert set(only_left) == {LEFT}


def test_one_leg_slice_crossing_the_midline_stays_whole():
    a = np.zeros(SHAPE, bool)
    b = np.zeros(SHAPE, bool)
    for z in range(SHAPE[2]):
        if z < 6:
            a |= disc(20, 20, 10, z=[z])
            b |= disc(60, 20, 10, z=[z])
        else:
            a |= disc(34, 20, 10, z=[z])  # the left leg alone, reaching past the image centre
    legs = leg_map(a | b, centred_affine())
    assert (legs[a] == LEFT).all() and (legs[b] == RIGHT).all()


def test_single_leg_with_bone_hole_is_not_split():
    leg = disc(40, 20, 18) & ~disc(40, 20, 12)  # a wide bone hole: a deep dip in the raw x-profile
    legs = leg_map(leg, centred_affine())
    assert len(np.unique(legs[leg])) == 1
    two = leg_map(leg | disc(78, 20, 1), centred_affine())  # a stray voxel cluster does not make a second leg
    assert len(np.unique(two[leg])) == 1


def thigh_leg_labels(cx, lateral_sign):
    """A single thigh disc with vastus lateralis on the ``lateral_sign`` side of x and vastus medialis opposite."""
    from legcomp.anatomy import label_by_name
    lab = np.zeros(SHAPE, np.uint8)
    x = np.arange(SHAPE[0])[:, None, None]
    leg = disc(cx, 20, 14)
    lat = leg & ((x - cx) * lateral_sign > 4)
    med = leg & ((x - cx) * lateral_sign < -4)
    lab[lat] = label_by_name("vastus_lateralis", "thigh").id
    lab[med] = label_by_name("vastus_medialis", "thigh").id
    return leg, lab


@pytest.mark.parametrize("lateral_sign, expected", [(+1, RIGHT), (-1, LEFT)])
def test_single_leg_named_from_anatomy(lateral_sign, expected):
    from legcomp.preprocessing.legs import side_from_muscles
    leg, lab = thigh_leg_labels(40, lateral_sign)  # centred on the isocentre: the x-sign rule cannot tell
    assert side_from_muscles(lab, "thigh", centred_affine()) == expected
    legs = leg_map(leg, centred_affine(), muscles=lab, region="thigh")
    assert set(np.unique(legs)) == {expected}
    flipped = leg_map(leg, centred_affine(flip_x=True), muscles=lab, region="thigh")
    assert set(np.unique(flipped)) == {RIGHT if expected == LEFT else LEFT}
    assert side_from_muscles(np.zeros_like(lab), "thigh", centred_affine()) is None


@pytest.mark.parametrize("which", ["both", "left", "right"])
def test_phantom_legs_recovered(which):
    phantom = pytest.importorskip("legcomp.phantom")
    ph = phantom.generate("thigh", 7, legs=which, matrix=(96, 64, 10), spacing=(4.5, 4.5, 18.0))
    fg = (ph.stage1 > 0) | (ph.stage2 > 0)
    legs = leg_map(fg, ph.affine, muscles=ph.stage2, region="thigh")
    assert (legs[fg] == ph.legs[fg]).mean() > 0.995


def test_find_leg_split_valley_depth_and_mass_limits():
    from legcomp.preprocessing.legs import find_leg_split

    two = np.array([0, 4, 4, 1, 4, 4, 0], float)  # valley 1 / hump 4 = 0.25
    assert find_leg_split(two, 0) == 3
    assert find_leg_split(two, 0, valley_ratio=0.25) is None  # a valley must lie strictly below the ratio
    assert find_leg_split(two, 0, valley_ratio=0.26) == 3
    assert find_leg_split(np.array([4, 4, 4, 4], float), 0) is None  # no valley
    assert find_leg_split(np.array([4, 0], float), 0) is None and find_leg_split(np.zeros(5), 0) is None
    assert find_leg_split(np.array([2, 0, 2], float), 0) == 1  # the smallest profile with a valley
    assert find_leg_split(np.array([0.5, 0, 0.5]), 0) == 1  # any scale
    notch = np.array([4, 4, 4, 2, 4, 4, 4], float)
    assert find_leg_split(notch, 0, 0.6) == 3 and find_leg_split(notch, 1.0, 0.6) is None  # smoothed away at 1 voxel
    assert find_leg_split(notch, 0.3, 0.6) == 3  # but not at 0.3
    from legcomp.preprocessing.legs import _axis_spacing

    np.testing.assert_allclose(_axis_spacing(np.array([[1.0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]])),
                               [1.0, np.sqrt(5.0), 3.0])  # column lengths of an oblique affine
    assert find_leg_split(np.array([0, 4, 0, 4], float), 0, min_fraction=0.0) == 2  # never before the first voxel
    assert find_leg_split(np.array([0, 4, 1, 4], float), 0) == 2  # the left hump is the voxel just before
    # either side must hold at least min_fraction of the mass (inclusive)
    lop = np.array([1, 0, 9], float)  # left side holds 0.1
    assert find_leg_split(lop, 0) == 1 and find_leg_split(lop, 0, min_fraction=0.11) is None
    rlop = lop[::-1].copy()
    assert find_leg_split(rlop, 0) == 1 and find_leg_split(rlop, 0, min_fraction=0.11) is None
    # the deepest valley wins; smoothing fills a one-voxel notch
    assert find_leg_split(np.array([5, 5, 2, 5, 5, 0, 5, 5], float), 0) == 5
    notch = np.array([5, 5, 5, 5, 4, 5, 5, 5, 5], float)
    assert find_leg_split(notch, 0, valley_ratio=0.9) == 4 and find_leg_split(notch, 3.0, valley_ratio=0.9) is None


def test_side_from_muscles_distance_and_groups():
    from legcomp import anatomy
    from legcomp.preprocessing.legs import side_from_muscles

    vl = anatomy.label_by_name("vastus_lateralis", "thigh").id
    vm = anatomy.label_by_name("vastus_medialis", "thigh").id
    lab = np.zeros((20, 3, 1), np.uint8)
    lab[15, 1, 0] = vl  # lateral at x = 15 mm, medial at x = 10 mm: 5 mm apart
    lab[10, 1, 0] = vm
    assert side_from_muscles(lab, "thigh", np.eye(4)) == RIGHT
    assert side_from_muscles(lab, "thigh", np.diag([-1.0, 1, 1, 1])) == LEFT
    assert side_from_muscles(lab, "thigh", np.eye(4), min_mm=5.01) is None
    assert side_from_muscles(lab[::-1].copy(), "thigh", np.eye(4)) == LEFT
    assert side_from_muscles(np.where(lab == vm, 0, lab), "thigh", np.eye(4)) is None  # no medial muscle
    assert side_from_muscles(np.where(lab == vl, 0, lab), "thigh", np.eye(4)) is None
    with pytest.raises(LegcompInputError):
        side_from_muscles(lab, "arm", np.eye(4))


def test_gap_centre_and_slice_helpers():
    from legcomp.preprocessing.legs import HIP_LEVEL, _gap_centre, input_slice_index, slice_levels

    col = np.array([3, 3, 0, 0, 0, 3, 3])
    assert _gap_centre(col, 3) == 3.0 and _gap_centre(col, 2) == 3.0 and _gap_centre(col, 5) == 4.5
    assert _gap_centre(np.array([0, 0, 3]), 0) == 0.5 and _gap_centre(np.array([3, 0, 0]), 2) == 1.5
    assert _gap_centre(np.array([3, 0, 0]), 1) == 1.5 and _gap_centre(np.array([0, 0, 3, 0]), 1) == 0.5  # to the ends
    assert _gap_centre(np.array([3, 1, 3]), 1) == 0.5  # any tissue in column s: touching
    cov = ("empty", "apart", "touching", "one_leg", "joined", "joined", "empty")
    assert slice_levels(cov, "thigh") == (None, "thigh", "thigh", "thigh", HIP_LEVEL, HIP_LEVEL, None)
    assert slice_levels(cov, None) == (None, "leg", "leg", "leg", HIP_LEVEL, HIP_LEVEL, None)
    assert slice_levels(cov, "calf") == (None, "calf", "calf", "calf", "calf", "calf", None)
    assert slice_levels(("joined", "apart", "joined"), "thigh") == ("thigh", "thigh", HIP_LEVEL)
    assert slice_levels(("joined", "touching"), "thigh") == ("thigh", "thigh")
    assert slice_levels(("joined", "joined"), "thigh") == (HIP_LEVEL, HIP_LEVEL)  # nothing apart below
    axis, idx = input_slice_index(None, 3)
    assert axis is None and list(idx) == [0, 1, 2]
    axis, idx = input_slice_index(np.diag([1.0, 1, -1, 1]), 3)
    assert axis == 2 and list(idx) == [2, 1, 0]
    perm = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # input axis 1 runs along z
    axis, idx = input_slice_index(perm, 4)
    assert axis == 1 and list(idx) == [0, 1, 2, 3]


def test_coverage_report_rows():
    from legcomp.preprocessing.legs import coverage_report, split_legs

    fg = disc(20, 20, 10) | disc(60, 20, 10)
    fg[..., 0] = False
    aff = centred_affine()
    split = split_legs(fg, aff, region="thigh")
    rows = coverage_report(split, aff, "thigh")
    assert len(rows) == SHAPE[2]
    assert rows[0] == {"slice": 0, "z_mm": round(float((aff @ [39.5, 19.5, 0, 1])[2]), 1), "coverage": "empty",
                       "level": None, "midline_x_mm": round(float((aff @ [split.midline_x[0], 19.5, 0, 1])[0]), 1),
                       "in_volumes": False}
    assert rows[1]["coverage"] == "apart" and rows[1]["level"] == "thigh" and rows[1]["in_volumes"] is True
    assert rows[1]["midline_x_mm"] == round(float((aff @ [40.0, 19.5, 1, 1])[0]), 1)
    assert rows[2]["z_mm"] - rows[1]["z_mm"] == pytest.approx(5.0)
    obl = aff.copy()
    obl[0, 1], obl[2, 0], obl[2, 1] = 0.37, 0.53, 0.29  # oblique: the slice centre's x and y move z and x
    row = coverage_report(split, obl, "thigh")[1]
    assert row["z_mm"] == round(float((obl @ [39.5, 19.5, 1, 1])[2]), 1)
    assert row["midline_x_mm"] == round(float((obl @ [split.midline_x[1], 19.5, 1, 1])[0]), 1)
    keep = np.ones(SHAPE[2], bool)
    keep[1] = False
    rows = coverage_report(split, aff, "thigh", input_affine=np.diag([1.5, 1.5, -5.0, 1]), in_volumes=keep)
    assert [r["slice"] for r in rows] == list(range(SHAPE[2]))[::-1]
    assert rows[1]["in_volumes"] is False and rows[0]["in_volumes"] is True
    one = split_legs(disc(60, 20, 10), aff)
    assert all(r["midline_x_mm"] is None for r in coverage_report(one, aff, None))
    tilted = aff.copy()
    tilted[2, 1] = 0.5  # slices tilted: world z of a slice centre depends on y
    assert coverage_report(split, tilted, "thigh")[1]["z_mm"] == round(float((tilted @ [39.5, 19.5, 1, 1])[2]), 1)


def test_bounding_box_shape_check_and_margins_per_axis():
    fg = disc(20, 20, 10, z=range(3, 6))
    legs = np.where(fg, LEFT, 0).astype(np.uint8)
    with pytest.raises(LegcompInputError, match=r"leg map shape \(80, 40, 12\) differs from foreground shape \(80, 40, 11\)"):
        leg_bounding_boxes(legs, fg[..., :11], 1.0, (1.5, 1.5, 5.0))
    (sx, sy, sz), = leg_bounding_boxes(legs, fg, 4.5, (1.5, 1.0, 5.0)).values()
    assert (sx.start, sx.stop) == (11 - 3, 30 + 3) and (sy.start, sy.stop) == (11 - 5, 30 + 5)
    assert (sz.start, sz.stop) == (2, 7)  # ceil(4.5 / 5) = 1 slice
    (sx, _, _), = leg_bounding_boxes(legs, fg, 0.0, (1.5, 1.5, 5.0)).values()
    assert (sx.start, sx.stop) == (11, 30)


def test_bounding_box_of_the_right_leg_alone():
    fg = disc(60, 20, 10)
    legs = np.where(fg, RIGHT, 0).astype(np.uint8)
    boxes = leg_bounding_boxes(legs, fg, 0.0, (1.5, 1.5, 5.0))
    assert set(boxes) == {RIGHT} and (boxes[RIGHT][0].start, boxes[RIGHT][0].stop) == (51, 70)


def test_legs_joined_on_every_slice_measured_on_the_largest_component():
    """No slice shows two legs: a cross-section at least 1.6 x as wide as deep (the largest component's
    extent, strays left out) is both legs joined, split at the centre of its x-extent."""
    from legcomp.preprocessing.legs import split_legs

    fg = np.zeros(SHAPE[:2] + (3,), bool)
    fg[10:58, 5:35] = True  # 48 x 30 voxels of 1.5 mm: aspect exactly 1.6
    fg[0:2, 0:2] = True  # a stray, labelled before the body
    aff = centred_affine(shape=fg.shape)
    s = split_legs(fg, aff)
    assert s.coverage == ("joined",) * 3
    np.testing.assert_allclose(s.midline_x, [33.5] * 3)
    assert set(np.unique(s.legs[10:34, 5:35])) == {LEFT} and set(np.unique(s.legs[34:58, 5:35])) == {RIGHT}
    assert split_legs(fg, aff, joined_aspect=1.61).coverage == ("one_leg",) * 3


def test_legs_joined_on_every_slice_follow_a_moving_midline():
    """The joined cross-section moves 2 voxels along x per slice (slices 0-7, empty above): split at each
    slice's own centre; above the body the midline is extrapolated but held within max_drift_mm (20 mm =
    13.3 voxels of 1.5 mm) of slice 7's."""
    from legcomp.preprocessing.legs import split_legs

    fg = np.zeros((90, 30, 16), bool)
    for z in range(8):
        fg[10 + 2 * z:60 + 2 * z, 5:25, z] = True  # 50 x 20 voxels: centre 34.5 + 2 z
    s = split_legs(fg, centred_affine(shape=fg.shape))
    assert s.coverage == ("joined",) * 8 + ("empty",) * 8
    z = np.arange(16)
    np.testing.assert_allclose(s.midline_x, np.minimum(34.5 + 2 * z, 48.5 + 20 / 1.5))
    for k in (0, 7):
        split = int(np.ceil(34.5 + 2 * k))
        assert set(np.unique(s.legs[:split, :, k][fg[:split, :, k]])) == {LEFT}
        assert set(np.unique(s.legs[split:, :, k][fg[split:, :, k]])) == {RIGHT}


def test_side_from_muscles_sign_with_no_minimum_distance():
    from legcomp import anatomy
    from legcomp.preprocessing.legs import side_from_muscles

    vl = anatomy.label_by_name("vastus_lateralis", "thigh").id
    vm = anatomy.label_by_name("vastus_medialis", "thigh").id
    lab = np.zeros((20, 3, 1), np.uint8)
    lab[10, 1, 0], lab[10, 2, 0] = vl, vm  # same world x: not to the right
    assert side_from_muscles(lab, "thigh", np.eye(4), min_mm=0) == LEFT
    assert side_from_muscles(lab, "thigh", np.diag([0.5, 1, 1, 1]) @ np.eye(4), min_mm=0) == LEFT
    lab[10, 1, 0], lab[11, 1, 0] = 0, vl  # lateral 0.5 mm to the right
    assert side_from_muscles(lab, "thigh", np.diag([0.5, 1, 1, 1]), min_mm=0) == RIGHT


@pytest.mark.parametrize("z, x, nz, drift, expected", [
    ([2, 2], [1, 3], 3, 5.0, [2.0, 2.0, 2.0]),  # one slice measured twice: a constant
    ([0, 1], [1, 2], 3, 10.0, [1.0, 2.0, 3.0]),  # two slices: a line
    ([0, 1, 2, 3], [0, 1, 2, 10], 4, 50.0, [-7 / 12, 19 / 12, 45 / 12, 71 / 12]),  # slope: median of all 6 pairs
    ([0, 0, 2], [0, 2, 4], 3, 50.0, [1.0, 2.5, 4.0]),  # pairs on one slice have no slope
    ([2, 3], [2, 3], 5, 0.5, [1.5, 1.5, 2.0, 3.0, 3.5]),  # extrapolated within 0.5 voxel of the ends
])
def test_fit_midline_theil_sen(z, x, nz, drift, expected):
    from legcomp.preprocessing.legs import fit_midline

    np.testing.assert_allclose(fit_midline(np.array(z), np.array(x), nz, drift), expected)


@pytest.mark.parametrize("kw", [{"valley_ratio": 0.01}, {"smooth_mm": 30.0}])
def test_leg_map_passes_its_split_settings_on(kw):
    from legcomp.preprocessing.legs import split_legs

    fg, aff = disc(25, 20, 12) | disc(55, 20, 12), centred_affine()
    legs = leg_map(fg, aff, **kw)
    np.testing.assert_array_equal(legs, split_legs(fg, aff, **kw).legs)
    assert (legs != leg_map(fg, aff)).any()  # a valley this shallow (or smoothed away) does not split the legs


def test_muscle_islands_between_the_legs_are_found():
    """Genitals between the upper thighs (a muscle-looking island at the midline, below the hip) are found;
    a leg's own muscle, a detached island on a leg's lateral side and the joined hip slices are not."""
    from legcomp.preprocessing.legs import midline_islands, split_legs

    shape = (100, 40, 12)
    aff = centred_affine(shape=shape)
    muscle = disc(25, 20, 14, shape) | disc(75, 20, 14, shape)
    fat = (disc(25, 20, 18, shape) | disc(75, 20, 18, shape)) & ~muscle
    organ = disc(50, 14, 5, shape, z=range(6, 9))  # between the thighs on the upper leg slices
    lateral = disc(3, 20, 2, shape, z=range(0, 9))  # a detached muscle at the left leg's lateral edge
    joined = np.zeros(shape, bool)
    joined[8:92, 5:35, 9:] = True  # hip/pelvis: the legs joined on the top slices
    muscle = (muscle | organ | lateral) & ~fat
    muscle[..., 9:] = joined[..., 9:]
    split = split_legs(muscle | fat, aff)
    assert split.coverage[0] == "apart" and split.coverage[11] == "joined"
    isl = midline_islands(muscle, split, 1.5, "thigh")
    assert isl[organ].all() and not isl[~organ].any()
    # the band decides: the lateral island, about 70 mm from the midline, is found only by a wider one
    assert not midline_islands(muscle, split, 1.5, "thigh", band_mm=60.0)[lateral].any()
    assert midline_islands(muscle, split, 1.5, "thigh", band_mm=80.0)[lateral].all()

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


@pytest.mark.parametrize("cx, expected", [(60, RIGHT), (20, LEFT)])
def test_single_leg_named_by_world_x(cx, expected):
    legs = leg_map(disc(cx, 20, 12), centred_affine())
    assert set(np.unique(legs)) == {expected}


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
    with pytest.raises(LegcompInputError):
        leg_map(np.ones((4, 4), bool), np.eye(4))


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

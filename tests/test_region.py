"""Automatic region detection (thigh vs calf) from the image alone: phantoms, hand-made legs, real studies."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from legcomp.errors import LegcompInputError
from legcomp.inference import region as R
from legcomp.inference.region import detect_region, leg_slices, region_features
from legcomp.io import make_study, read_study
from legcomp.phantom import generate

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
SMALL = dict(matrix=(144, 96, 8), spacing=(3.0, 3.0, 10.0))


def _study(water, fat, affine):
    return make_study({"water": (water, affine, "w"), "fat": (fat, affine, "f")})


@pytest.fixture(scope="module")
def phantoms():
    out = {}
    for region in ("thigh", "calf"):
        for seed in (11, 12):
            ph = generate(region, seed, **SMALL)
            out[region, seed] = _study(ph.water, ph.fat, ph.affine)
    return out


@pytest.mark.parametrize("region", ["thigh", "calf"])
@pytest.mark.parametrize("seed", [11, 12])
def test_region_detection_on_phantoms(phantoms, region, seed):
    study = phantoms[region, seed]
    assert detect_region(study) == region
    f = region_features(study)
    # decided by the bone rule, not the area fallback, and with a clear depth
    assert f["reason"].startswith("bone depth"), f
    if region == "thigh":
        assert f["depth"] >= R.THIGH_DEPTH and f["votes_thigh"] > f["votes_calf"]
    else:
        assert f["depth"] <= R.CALF_DEPTH and f["votes_calf"] > f["votes_thigh"]


def test_single_leg_and_flipped_axes():
    ph = generate("calf", 11, legs="left", **SMALL)
    assert detect_region(_study(ph.water, ph.fat, ph.affine)) == "calf"
    # the same data stored with x and y reversed (an LPS-like file): canonicalised, same answer
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [(ph.water.shape[0] - 1) * 3.0, (ph.water.shape[1] - 1) * 3.0, 0.0]
    aff = ph.affine @ flip
    s = _study(ph.water[::-1, ::-1].copy(), ph.fat[::-1, ::-1].copy(), aff)
    assert detect_region(s) == "calf"


def _leg_images(radius_mm: float, bone_offset: float | None, nz: int = 6, sp: float = 2.0):
    """Two disc legs of muscle with SAT, each with a bone (cortex ring + fatty marrow) at
    ``bone_offset`` x radius from its centre (towards +y), or no bone."""
    nx, ny = int((4 * radius_mm + 80) / sp), int((2 * radius_mm + 40) / sp)
    x = (np.arange(nx) - nx / 2 + 0.5) * sp
    y = (np.arange(ny) - ny / 2 + 0.5) * sp
    X, Y = np.meshgrid(x, y, indexing="ij")
    water = np.zeros((nx, ny), np.float32)
    fat = np.zeros_like(water)
    rng = np.random.default_rng(0)
    for cx in (-radius_mm - 10, radius_mm + 10):
        r = np.hypot(X - cx, Y)
        fat[(r < radius_mm)] = 900.0  # SAT
        muscle = r < radius_mm - 8
        water[muscle], fat[muscle] = 1000.0, 60.0
        if bone_offset is not None:
            rb = np.hypot(X - cx, Y - bone_offset * radius_mm)
            water[rb < 13], fat[rb < 13] = 20.0, 20.0  # cortex
            marrow = rb < 8
            water[marrow], fat[marrow] = 80.0, 850.0
    water = np.repeat(water[:, :, None], nz, 2) + rng.normal(0, 10, (nx, ny, nz)).astype(np.float32)
    fat = np.repeat(fat[:, :, None], nz, 2) + rng.normal(0, 10, (nx, ny, nz)).astype(np.float32)
    return np.abs(water), np.abs(fat), np.diag([sp, sp, 8.0, 1.0])


def test_bone_depth_beats_leg_area():
    # thigh-sized legs (~150 cm^2) whose bone lies just under the skin (like a tibia): calf
    w, f, aff = _leg_images(70.0, bone_offset=0.62)
    feats = region_features(_study(w, f, aff))
    assert feats["leg_area_cm2"] > R.AREA_THRESHOLD_CM2
    assert feats["region"] == "calf" and feats["reason"].startswith("bone depth"), feats
    # calf-sized legs (~80 cm^2) with a central bone (like a femur): thigh
    w, f, aff = _leg_images(50.0, bone_offset=0.0)
    feats = region_features(_study(w, f, aff))
    assert feats["leg_area_cm2"] < R.AREA_THRESHOLD_CM2
    assert feats["region"] == "thigh" and feats["reason"].startswith("bone depth"), feats
    rows = leg_slices(_study(w, f, aff))
    assert {r.leg for r in rows} == {1, 2} and all(len(r.bones_cm2) == 1 for r in rows)
    assert all(4.0 < r.bones_cm2[0] < 6.5 for r in rows)  # pi * 1.3^2 = 5.3 cm^2


def test_area_fallback_without_bones():
    for radius, expected in ((80.0, "thigh"), (45.0, "calf")):
        w, f, aff = _leg_images(radius, bone_offset=None)
        feats = region_features(_study(w, f, aff))
        assert feats["votes_thigh"] + feats["votes_calf"] == 0
        assert feats["reason"].startswith("leg area") and feats["region"] == expected, feats


def test_merged_pelvis_slices_do_not_vote():
    # a thigh whose top slices are one wide body with a bone near its edge (pelvis-like)
    w, f, aff = _leg_images(60.0, bone_offset=0.0, nz=8)
    wp, fp, _ = _leg_images(60.0, bone_offset=0.85, nz=3)
    c, ny = w.shape[0] // 2, w.shape[1]
    fp[c - 30:c + 30, ny // 2 - 25:ny // 2 + 25] = 900.0  # fill the gap: both legs merge into one body
    w[:, :, 5:], f[:, :, 5:] = wp, fp
    rows = leg_slices(_study(w, f, aff))
    assert {r.z for r in rows} == set(range(5)) and all(r.vote == "thigh" for r in rows)
    assert detect_region(_study(w, f, aff)) == "thigh"


def test_convex_hull_closes_a_notch():
    X, Y = np.ogrid[:41, :41]
    disc = (X - 20) ** 2 + (Y - 20) ** 2 <= 15 ** 2
    notched = disc & ~((np.abs(X - 20) <= 3) & (Y >= 28))  # a subcutaneous bone read as background
    hull = R._convex_hull(notched)
    assert hull[20, 30] and not notched[20, 30]
    assert (hull >= notched).all() and not (hull & ~ndimage.binary_dilation(disc)).any()  # at most half a voxel wider


def test_no_leg_raises_one_line_error():
    w = np.zeros((40, 40, 3), np.float32)
    w[18:22, 18:22] = 1000.0  # a 4 mm blob: no leg-sized cross-section
    study = make_study({"water": (w, np.eye(4), "w"), "fat": (w * 0.1, np.eye(4), "f")}, name="tiny")
    with pytest.raises(LegcompInputError, match="cannot detect thigh or calf") as err:
        detect_region(study)
    assert "\n" not in str(err.value) and "tiny" in str(err.value)


@pytest.mark.skipif(not (REALDATA / "huashan_thigh_001").is_dir(), reason="../shared/realdata not present")
@pytest.mark.parametrize("folder,expected", [("huashan_thigh_001", "thigh"), ("qmritools_calf", "calf")])
def test_real_studies(folder, expected):
    study = read_study(REALDATA / folder)
    study.region = "unknown"
    feats = region_features(study)
    assert feats["region"] == expected and detect_region(study) == expected
    assert feats["reason"].startswith("bone depth"), feats

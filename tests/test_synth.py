"""Tests of Dixon legs synthesised from a real muscle label map (``legcomp synth``), on tiny maps."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from legcomp import anatomy
from legcomp.cli import main
from legcomp.errors import LegcompInputError
from legcomp.io import read_study
from legcomp.phantom import generate, load_source, synth_cohort, synthesize
from legcomp.phantom.shapes import CORTEX, FASCIA, IMAT, LEG_STRIDE, MARROW, SAT, SKIN
from legcomp.phantom.synth import OTHER_MUSCLE, build_tissues

SP = (3.0, 3.0, 10.0)
FOREIGN = 100  # foreign ids: FOREIGN + legcomp id, so that a mapping must be applied


@pytest.fixture(scope="module")
def source_files(tmp_path_factory):
    """A label map with foreign ids (the muscles of a small template thigh; gluteus maximus as a
    hip muscle mapped to null) and its mapping JSON."""
    d = tmp_path_factory.mktemp("src")
    ph = generate("thigh", 3, spacing=SP, matrix=(144, 96, 10), supersample=1, infiltration=0.0)
    lab = np.where(ph.stage2 > 0, ph.stage2.astype(np.int16) + FOREIGN, 0).astype(np.int16)
    nib.save(nib.Nifti1Image(lab, ph.affine), str(d / "map.nii.gz"))
    gm = anatomy.label_by_name("gluteus_maximus", "thigh").id
    mp = {"region": "thigh",
          "map": {str(FOREIGN + lb.id): (None if lb.id == gm else lb.name) for lb in anatomy.THIGH_MUSCLES},
          "foreign_names": {str(FOREIGN + gm): "Gluteus maximus (hip)"}}
    (d / "labels.json").write_text(json.dumps(mp))
    return d / "map.nii.gz", d / "labels.json", ph


@pytest.fixture(scope="module")
def synth(source_files):
    lm, mp, _ = source_files
    return synthesize(load_source(lm, mp), 5, spacing=SP, supersample=1, geometry=False)


def test_source_mapping_and_record(source_files):
    lm, mp, ph = source_files
    src = load_source(lm, mp)
    assert src.region == "thigh"
    gm = anatomy.label_by_name("gluteus_maximus", "thigh")
    present = {lb.name for lb in anatomy.THIGH_MUSCLES if (ph.stage2 == lb.id).any() and lb.id != gm.id}
    assert set(src.unlabelled) == {lb.name for lb in anatomy.THIGH_MUSCLES} - present
    assert gm.name in src.unlabelled
    # a hip muscle mapped to null is still muscle (other muscle), never a stage-2 label
    if (ph.stage2 == gm.id).any():
        assert (src.codes[ph.stage2 == gm.id] == OTHER_MUSCLE).all()


def test_every_tissue_is_built(source_files):
    lm, mp, _ = source_files
    src = load_source(lm, mp)
    codes, gap, _ = build_tissues(src, np.random.default_rng(0), adiposity=0.5, resize_mm=0.0)
    tissue = codes % LEG_STRIDE
    for t in (SKIN, SAT, FASCIA, IMAT, CORTEX, MARROW):
        assert (tissue == t).any(), f"tissue {t} missing"
    legs = codes // LEG_STRIDE
    assert set(np.unique(legs[codes > 0])) == {0, 1}  # both legs
    assert np.isfinite(gap).all() and gap.min() >= 0


def test_truth_consistent_with_labels(synth):
    ph = synth
    assert ph.water.shape == ph.stage1.shape == ph.stage2.shape == ph.legs.shape
    np.testing.assert_allclose(ph.in_phase, ph.water + ph.fat, rtol=1e-6)
    # every muscle label lies in stage-1 whole muscle, in a leg
    assert (ph.stage1[ph.stage2 > 0] == anatomy.WHOLE_MUSCLE.id).all()
    assert (ph.legs[ph.stage1 > 0] > 0).all()
    vox = float(np.prod(ph.spacing)) / 1000
    for leg_id, leg in anatomy.LEGS.items():
        t = ph.truth["legs"][leg]
        for lb in anatomy.THIGH_MUSCLES:
            n = int(((ph.stage2 == lb.id) & (ph.legs == leg_id)).sum())
            assert t["muscles"][lb.name]["label_volume_ml"] == pytest.approx(n * vox)
        assert t["sat"]["label_volume_ml"] == pytest.approx(
            int(((ph.stage1 == anatomy.SAT.id) & (ph.legs == leg_id)).sum()) * vox)
        assert t["bone"]["volume_ml"] > 0 and t["sat"]["volume_ml"] > 0 and t["intermuscular"]["volume_ml"] > 0
    # fat lies where the tissue is fat: SAT brighter in fat than in water, muscle the other way unless replaced
    sat = ph.stage1 == anatomy.SAT.id
    assert ph.fat[sat].mean() > ph.water[sat].mean()


def test_mapping_is_applied_in_place(source_files, synth):
    """Without geometric randomisation each muscle lands where the source map has it (under its mapped name)."""
    _, _, ph = source_files
    gm = anatomy.label_by_name("gluteus_maximus", "thigh").id
    assert not (synth.stage2 == gm).any()
    # each muscle sits where the source has it, relative to all muscles (mm), with about its size
    def rel_centroid(stage2, sel, spacing):
        return (np.argwhere(sel).mean(0) - np.argwhere(stage2 > 0).mean(0)) * np.asarray(spacing)

    for lb in anatomy.THIGH_MUSCLES:
        a, b = ph.stage2 == lb.id, synth.stage2 == lb.id
        if lb.id == gm or a.sum() < 150:
            continue
        assert abs(int(b.sum()) - int(a.sum())) < 0.4 * a.sum(), lb.name
        d = np.linalg.norm(rel_centroid(ph.stage2, a, ph.spacing) - rel_centroid(synth.stage2, b, synth.spacing))
        assert d < 6.0, (lb.name, d)
    for leg_id in anatomy.LEGS:  # the side of each leg is kept (x of its muscles)
        xa = np.argwhere((ph.stage2 > 0) & (ph.legs == leg_id))[:, 0].mean() - ph.shape[0] / 2
        xb = np.argwhere((synth.stage2 > 0) & (synth.legs == leg_id))[:, 0].mean() - synth.shape[0] / 2
        assert np.sign(xa) == np.sign(xb)


def test_deterministic_per_seed(source_files):
    lm, mp, _ = source_files
    src = load_source(lm, mp)
    a = synthesize(src, 11, supersample=1)
    b = synthesize(src, 11, supersample=1)
    c = synthesize(src, 12, supersample=1)
    for k in ("water", "fat", "stage1", "stage2", "legs"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.water.shape != c.water.shape or not np.array_equal(a.water, c.water)


def test_cohort_writes_record_read_by_training(source_files, tmp_path):
    lm, mp, _ = source_files
    folders = synth_cohort(lm, mp, 1, 4, tmp_path, progress=False, spacing=SP, supersample=1)
    assert len(folders) == 1 and folders[0].name.startswith("thigh_synth_map_")
    rec = json.loads((folders[0] / anatomy.LABEL_RECORD).read_text())
    assert "gluteus_maximus" in rec["stage2"]["unlabelled"]
    study = read_study(folders[0])
    assert study.region == "thigh" and "stage2" in study.labels
    assert "gluteus_maximus" in study.label_record["stage2"]["unlabelled"]


def test_cli_and_errors(source_files, tmp_path, capsys):
    lm, mp, _ = source_files
    assert main(["synth", "--labels", str(lm), "--mapping", str(mp), "--n", "1", "--out", str(tmp_path / "o"),
                 "--spacing", "3,3,10", "--supersample", "1", "--quiet"]) == 0
    assert len(list((tmp_path / "o").iterdir())) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"region": "thigh", "map": {str(FOREIGN + 1): "no_such_muscle"}}))
    assert main(["synth", "--labels", str(lm), "--mapping", str(bad), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_muscle" in err[0]
    with pytest.raises(LegcompInputError, match="not in the mapping"):
        load_source(lm, {"region": "thigh", "map": {str(FOREIGN + 1): "rectus_femoris"}})
    assert not (tmp_path / "b").exists()


def test_selective_end_stage_muscles():
    """``selective`` fat-replaces muscles picked at random whatever their susceptibility (dystrophy
    pattern: spared next to end-stage); 0 draws nothing extra, so the template phantom is unchanged."""
    from legcomp.phantom import signal as sig
    from legcomp.phantom.shapes import MUSCLE0, REGION_SPECS

    sus = REGION_SPECS["thigh"].susceptibility
    n = len(anatomy.MUSCLES["thigh"])
    codes = MUSCLE0 + np.arange(1, n + 1)
    healthy = sig.sample_muscle_fat("thigh", np.random.default_rng(3), 0.0, sus, True, selective=1.0)
    assert np.all(healthy.target[codes] >= 0.45)  # every muscle end-stage although infiltration is 0
    assert np.all(healthy.target[LEG_STRIDE + codes] >= 0.45)  # in both legs
    none = sig.sample_muscle_fat("thigh", np.random.default_rng(3), 0.0, sus, True, selective=0.0)
    assert np.all(none.target[codes] < 0.1)
    a = sig.sample_muscle_fat("thigh", np.random.default_rng(5), 0.3, sus, False)
    b = sig.sample_muscle_fat("thigh", np.random.default_rng(5), 0.3, sus, False, selective=0.0)
    for k in ("base", "diffuse", "frac", "alpha", "target"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    some = sig.sample_muscle_fat("thigh", np.random.default_rng(8), 0.0, sus, True, selective=0.5)
    ends = some.target[codes] >= 0.45
    assert 0 < ends.sum() < n  # muscle by muscle, not all or none


def test_calf_tibia_under_the_skin_becomes_bone():
    """A calf map whose muscles leave the tibia's void open to the skin (its medial face lies under the
    skin) and joined to an unlabelled deep gap: the void is inside the fascia and becomes bone, not a
    notch of SAT, and the thin gap beside it stays soft tissue."""
    from legcomp.phantom.shapes import MUSCLE0
    from legcomp.phantom.synth import SourceMap

    n, sp = 80, 1.0
    x, y = np.meshgrid((np.arange(n) - n / 2) * sp, (np.arange(n) - n / 2) * sp, indexing="ij")
    r = np.hypot(x, y)
    limb = r <= 30
    void = np.hypot(x, y - 20) <= 9  # the tibia: 9 mm, its anterior edge near the outline
    gap = (np.abs(x) <= 3) & (y < 12) & (y > -12)  # an unlabelled band running back from it (FDL/FHL)
    ids = [lb.id for lb in anatomy.CALF_MUSCLES]
    sl = np.zeros((n, n), np.uint8)
    ang = np.arctan2(y, x)
    sl[limb] = MUSCLE0 + np.asarray(ids)[((ang[limb] + np.pi) / (2 * np.pi) * 3).astype(int) % 3]
    sl[void | gap] = 0
    sl[limb & (y > 24) & (np.abs(x) < 6)] = 0  # open to the skin in front of the tibia
    codes = np.repeat(np.concatenate([sl, sl[::-1]], axis=0)[:, :, None], 4, axis=2)  # two legs
    src = SourceMap(codes=codes, affine=np.diag([sp, sp, 10.0, 1.0]), region="calf", name="c",
                    unlabelled=[lb.name for lb in anatomy.CALF_MUSCLES[3:]])
    out, _, aff = build_tissues(src, np.random.default_rng(0), adiposity=0.3, resize_mm=0.0, septa=0.0,
                                vessels=False, fill_gaps_mm=0.0)
    pad = int(round(-aff[0, 3] / sp))  # the padded grid's offset, voxels
    t = out[pad:pad + n, pad:pad + n, 1] % LEG_STRIDE  # the first leg
    core = np.hypot(x, y - 20) <= 5
    assert np.isin(t[core], (MARROW, CORTEX)).all()
    assert not np.isin(t[void], (SAT, SKIN)).any()
    assert not np.isin(t[gap & (y < 0)], (MARROW, CORTEX)).any()  # the deep band is no bone


def test_thick_gap_of_a_map_lacking_muscles_is_unnamed_muscle():
    """A calf map that lacks the deep posterior muscles and leaves their place empty: the thick gap is
    muscle in stage 1 and "one of the unlabelled muscles" (UNNAMED_MUSCLE) in stage 2, never background;
    the same map naming every muscle draws none."""
    from legcomp.phantom.shapes import MUSCLE0
    from legcomp.phantom.synth import SourceMap

    n, sp = 80, 1.0
    x, y = np.meshgrid((np.arange(n) - n / 2) * sp, (np.arange(n) - n / 2) * sp, indexing="ij")
    limb = np.hypot(x, y) <= 30
    hole = np.hypot(x, y + 5) <= 9  # an unlabelled 18 mm gap in the middle of the muscles
    ids = [lb.id for lb in anatomy.CALF_MUSCLES]
    sl = np.zeros((n, n), np.uint8)
    ang = np.arctan2(y, x)
    sl[limb] = MUSCLE0 + np.asarray(ids)[((ang[limb] + np.pi) / (2 * np.pi) * 3).astype(int) % 3]
    sl[hole] = 0
    sl[np.hypot(x, y - 20) <= 8] = MARROW  # the map's own tibia
    codes = np.repeat(np.concatenate([sl, sl[::-1]], axis=0)[:, :, None], 4, axis=2)
    aff = np.diag([sp, sp, 10.0, 1.0])
    kw = dict(spacing=(2.0, 2.0, 10.0), supersample=1, geometry=False)
    lacking = SourceMap(codes=codes, affine=aff, region="calf", name="c", has_bone=True,
                        unlabelled=[lb.name for lb in anatomy.CALF_MUSCLES[3:]])
    ph = synthesize(lacking, 0, **kw)
    un = ph.stage2 == anatomy.UNNAMED_MUSCLE
    assert un.sum() * 4 > 0.3 * hole.sum() * 2 * 4  # most of the two legs' gaps (2 mm voxels)
    assert (ph.stage1[un] == anatomy.WHOLE_MUSCLE.id).all()
    assert ph.truth["label_record"]["stage2"]["unlabelled"] == lacking.unlabelled
    ph_all = synthesize(SourceMap(codes=codes, affine=aff, region="calf", name="c", has_bone=True, unlabelled=[]),
                        0, **kw)
    assert not (ph_all.stage2 == anatomy.UNNAMED_MUSCLE).any()


def test_coarse_map_is_refined_before_tissues_are_drawn():
    """A 3 mm map (the real calf map's voxel) is upsampled to 1 mm with smooth outlines before fascia,
    septa and skin are drawn, so they are as thin as on a fine map; each muscle keeps its area and place."""
    from legcomp.phantom.shapes import MUSCLE0
    from legcomp.phantom.synth import SourceMap, _refine

    n, sp = 30, 3.0
    x, y = np.meshgrid((np.arange(n) - n / 2) * sp, (np.arange(n) - n / 2) * sp, indexing="ij")
    limb = np.hypot(x, y) <= 36
    sl = np.where(limb, MUSCLE0 + np.where(x < 0, 1, 2), 0).astype(np.uint8)
    codes = np.repeat(np.concatenate([sl, sl[::-1]], axis=0)[:, :, None], 3, axis=2)
    aff = np.diag([sp, sp, 10.0, 1.0])
    aff[:3, 3] = [-50.0, 20.0, 5.0]
    src = SourceMap(codes=codes, affine=aff, region="calf", name="c", unlabelled=[])
    fine = _refine(src, 1.0)
    assert np.allclose(fine.spacing, (1.0, 1.0, 10.0))
    for c in (MUSCLE0 + 1, MUSCLE0 + 2):  # area (mm2) within 5 %, centroid (mm, world) within 1 mm
        a, b = codes[..., 0] == c, fine.codes[..., 0] == c
        assert abs(b.sum() * 1.0 - a.sum() * 9.0) < 0.05 * a.sum() * 9.0
        ca = aff[:2, :2] @ np.argwhere(a).mean(0) + aff[:2, 3]
        cb = fine.affine[:2, :2] @ np.argwhere(b).mean(0) + fine.affine[:2, 3]
        assert np.linalg.norm(ca - cb) < 1.0
    out, _, out_aff = build_tissues(src, np.random.default_rng(0), adiposity=0.3, resize_mm=0.0, vessels=False)
    assert np.sqrt((out_aff[:3, :2] ** 2).sum(0)).max() <= 1.0 + 1e-6
    assert (out % LEG_STRIDE == FASCIA).any() and (out % LEG_STRIDE == SKIN).any()
    assert _refine(SourceMap(codes=codes, affine=np.diag([1.5, 1.5, 10.0, 1.0]), region="calf", name="c",
                             unlabelled=[]), 1.0).codes is codes  # a fine map is left as it is


def test_genitals_between_the_upper_thighs_are_no_leg(source_files):
    """The organ blob lies between the legs on the proximal slices only, replaces background only, and is
    labelled neither SAT nor muscle nor leg, so stage 1 learns to leave it out."""
    from legcomp.phantom.generator import _lut
    from legcomp.phantom.shapes import ORGAN
    from legcomp.phantom.synth import _add_midline_organ

    lm, mp, _ = source_files
    src = load_source(lm, mp)
    before, _, _ = build_tissues(src, np.random.default_rng(0), adiposity=0.5, resize_mm=0.0)
    out = before.copy()
    _add_midline_organ(out, *(float(v) for v in src.spacing[:2]), np.random.default_rng(1))
    organ = out == ORGAN
    assert organ.any()
    assert (before[organ] == 0).all() and (out[~organ] == before[~organ]).all()
    zs = np.nonzero(organ.any(axis=(0, 1)))[0]
    assert zs.max() == out.shape[2] - 1 and zs.min() >= out.shape[2] // 2  # proximal slices (+z superior)
    for k in zs:
        xa = np.nonzero(((before[:, :, k] > 0) & (before[:, :, k] < LEG_STRIDE)).any(1))[0]
        xb = np.nonzero((before[:, :, k] > LEG_STRIDE).any(1))[0]
        xo = np.nonzero(organ[:, :, k].any(1))[0]
        assert xa.min() < xo.mean() < xb.max()  # between the legs
    for kind in ("stage1", "stage2", "legs"):
        assert _lut(kind, "thigh")[ORGAN] == 0


def test_synthesised_thigh_with_genitals_keeps_them_out_of_the_labels(source_files):
    lm, mp, _ = source_files
    src = load_source(lm, mp)
    seed = next(s for s in range(50)  # a seed whose study draws the organ (half of them do)
                if np.random.default_rng(np.random.SeedSequence([s, 7, sum(map(ord, src.name))]).spawn(7)[6]
                                         ).random() < 0.5)
    ph = synthesize(src, seed, spacing=SP, supersample=1, geometry=False)
    bright_outside = (ph.legs == 0) & (ph.water > 0.5 * np.median(ph.water[ph.stage1 == anatomy.WHOLE_MUSCLE.id]))
    assert bright_outside.sum() > 20  # the organ's water signal, outside every leg
    assert (ph.stage1[bright_outside] == 0).all() and (ph.stage2[bright_outside] == 0).all()

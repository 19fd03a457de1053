"""Attention-Res-V-Net shapes and gradients, weights files, network inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.io.study import DixonStudy, make_study
from legcomp.models import (build_network, count_parameters, load_weights, network_divisor, read_weights_meta,
                            resolve_config, save_weights)
from legcomp.preprocessing import inputs as prep

torch.set_num_threads(1)


@pytest.mark.parametrize("config", ["tiny", "fast"])
def test_output_shape(config):
    torch.manual_seed(0)
    model = build_network(config, in_channels=2, out_channels=5).eval()
    dx, dy, dz = network_divisor(config)
    x = torch.randn(1, 2, 2 * dx, dy, 2 * dz)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 5, 2 * dx, dy, 2 * dz)
    assert torch.isfinite(y).all()


def test_seed_config_size_and_forward():
    assert network_divisor("seed") == (16, 16, 4) == network_divisor("fast")
    cfg = resolve_config("seed")
    assert cfg["features"] == [64, 128, 256, 512] and cfg["bottleneck"] == 1024
    assert cfg["strides"][:2] == [[2, 2, 1], [2, 2, 1]] and cfg["strides"][2:] == [[2, 2, 2], [2, 2, 2]]
    model = build_network("seed", 2, 3).eval()
    n = count_parameters(model)
    assert 30e6 < n < 150e6
    assert n > 10 * count_parameters(build_network("fast", 2, 3))
    with torch.no_grad():
        y = model(torch.randn(1, 2, 16, 16, 4))
    assert y.shape == (1, 3, 16, 16, 4)


def test_attention_gates_and_groups_present():
    model = build_network("fast")
    names = [type(m).__name__ for m in model.modules()]
    assert names.count("AttentionBlock") == 4
    seed = build_network("seed")
    assert any(isinstance(m, torch.nn.Conv3d) and m.groups > 1 for m in seed.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())


def test_input_not_multiple_of_divisor_raises():
    model = build_network("tiny").eval()
    with pytest.raises(ValueError, match="multiple"):
        model(torch.randn(1, 2, 10, 8, 4))


def test_gradient_reaches_first_layer():
    torch.manual_seed(0)
    model = build_network("tiny", 2, 3)
    x = torch.randn(2, 2, 16, 16, 4)
    model(x).square().mean().backward()
    first = model.encoders[0].conv1.conv.weight
    assert first.grad is not None and float(first.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_config():
    with pytest.raises(LegcompInputError):
        build_network("huge")
    with pytest.raises(LegcompInputError):
        resolve_config({"features": [4, 8], "strides": [[2, 2, 1]]})


# --------------------------------------------------------------------------- weights files

def _saved(tmp_path, region="thigh", stage=1, **kw):
    n_cls = kw.pop("n_classes", anatomy.n_classes(stage, region))
    torch.manual_seed(1)
    model = build_network("tiny", 2, n_cls).eval()
    path = save_weights(tmp_path / "w.pt", model, config="tiny", region=region, stage=stage, n_classes=n_cls,
                        normalisation=prep.NORMALISATION, working_spacing=[1.5, 1.5, None], patch_size=[16, 16, 4],
                        val_dsc={"x": 0.5}, **kw)
    return model, path


def test_weights_round_trip(tmp_path):
    model, path = _saved(tmp_path, "calf", 2)
    loaded, meta = load_weights(path, region="calf", stage=2)
    x = torch.randn(1, 2, 16, 16, 4)
    with torch.no_grad():  # weights are stored as float16: equal up to half precision
        assert torch.allclose(model(x), loaded(x), rtol=1e-2, atol=1e-2)
    full, _ = load_weights(save_weights(tmp_path / "full.pt", model, config="tiny", region="calf", stage=2,
                                        half=False), region="calf", stage=2)
    with torch.no_grad():
        assert torch.equal(model(x), full(x))
    assert meta["region"] == "calf" and meta["stage"] == 2
    assert meta["n_classes"] == anatomy.n_classes(2, "calf") == len(meta["label_names"])
    assert meta["label_names"][1:] == [lab.name for lab in anatomy.CALF_MUSCLES]
    assert meta["channels"] == ["opposed_phase", "water"]
    assert meta["config"]["name"] == "tiny" and meta["val_dsc"] == {"x": 0.5}
    assert meta["working_spacing"] == [1.5, 1.5, None]
    assert "legcomp_version" in meta
    meta2, state = read_weights_meta(path)
    assert meta2 == meta and set(state) == set(model.state_dict())


def test_weights_unwrap_ddp_prefix(tmp_path):
    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    torch.manual_seed(0)
    model = build_network("tiny", 2, 3)
    compiled = Wrap(model)
    compiled._orig_mod = compiled.module  # torch.compile's wrapper attribute
    del compiled.module
    for wrapped in (Wrap(model), compiled, Wrap(compiled)):
        path = save_weights(tmp_path / "w.pt", wrapped, config="tiny", region="thigh", stage=1)
        _, state = read_weights_meta(path)
        assert list(state) == list(model.state_dict())  # no "module." / "_orig_mod." prefix
        loaded, _ = load_weights(path)
        for k, v in model.state_dict().items():
            want = v.half().to(v.dtype) if v.is_floating_point() else v  # stored as float16
            assert torch.equal(loaded.state_dict()[k], want), k


def test_corrupt_and_truncated_files(tmp_path):
    _, path = _saved(tmp_path)
    blob = path.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(blob[: len(blob) // 2])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all" * 10)
    for p in (trunc, junk):
        with pytest.raises(LegcompInputError) as exc:
            load_weights(p)
        assert p.name in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(LegcompInputError, match="not found"):
        load_weights(tmp_path / "missing.pt")


def test_not_a_legcomp_file(tmp_path):
    p = tmp_path / "other.pt"
    torch.save({"state_dict": {}, "epoch": 3}, p)
    with pytest.raises(LegcompInputError, match="not a legcomp weights file"):
        load_weights(p)


def test_wrong_region_stage_and_label_count(tmp_path):
    _, path = _saved(tmp_path, "thigh", 2)
    with pytest.raises(LegcompInputError, match="region thigh, not calf"):
        load_weights(path, region="calf")
    with pytest.raises(LegcompInputError, match="stage 2, not stage 1"):
        load_weights(path, stage=1)
    load_weights(path, region="thigh", stage=2)
    bad = tmp_path / "bad"
    bad.mkdir()
    _, path2 = _saved(bad, "thigh", 2, n_classes=anatomy.n_classes(2, "calf"))
    with pytest.raises(LegcompInputError, match="classes") as exc:
        load_weights(path2)
    assert "w.pt" in str(exc.value)


# --------------------------------------------------------------------------- inputs

def _study(shape=(40, 30, 6), spacing=(0.75, 0.75, 6.0), seed=0):
    rng = np.random.default_rng(seed)
    aff = np.diag([*spacing, 1.0])
    w = (rng.random(shape) * 500).astype(np.float32)
    f = (rng.random(shape) * 300).astype(np.float32)
    w[:5] = 0
    f[:5] = 0
    lab = np.zeros(shape, np.uint8)
    lab[10:30, 8:22] = anatomy.WHOLE_MUSCLE.id
    return make_study({"water": (w, aff, "w"), "fat": (f, aff, "f")}, region="thigh",
                      labels={"stage1": (lab, aff, "s1")})


def test_normalisation_keeps_water_fat_ratio():
    s = _study()
    x = prep.stage1_input(s)
    assert x.shape == (2, *s.shape) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= prep.CLIP[1]
    body = (s.water + s.fat) > 0
    ok = body & (x < prep.CLIP[1]).all(0) & (s.fat > 1)
    np.testing.assert_allclose(x[0][ok] / x[1][ok], s.water[ok] / s.fat[ok], rtol=1e-4)
    xp = prep.stage1_input(s, method="in_phase_percentile")
    assert 0.5 < np.percentile((xp[0] + xp[1])[body], 50) < 1.0
    # same scale whatever the scanner's gain
    s2 = make_study({"water": (s.water * 7, s.affine, "w"), "fat": (s.fat * 7, s.affine, "f")})
    np.testing.assert_allclose(prep.stage1_input(s2), x, rtol=1e-5, atol=1e-6)


def _fat_and_muscle(hot: float = 1.0) -> DixonStudy:
    """Muscle (W 600, F 30) inside a fat ring (W 40, F 800); the front 20 % of the muscle x ``hot``."""
    w = np.zeros((40, 40, 4), np.float32)
    f = np.zeros_like(w)
    xx, yy = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    r = np.hypot(xx - 20, yy - 20)[..., None].repeat(4, 2)
    w[r < 18], f[r < 18] = 40, 800
    w[r < 12], f[r < 12] = 600, 30
    w[(r < 12) & (yy[..., None] > 26)] *= hot  # a coil hot spot over muscle
    return make_study({"water": (w, np.eye(4), "w"), "fat": (f, np.eye(4), "f")})


def test_fat_reference_normalisation():
    s = _fat_and_muscle()
    assert prep.intensity_scale(s) == pytest.approx(prep.FAT_REFERENCE_FACTOR * 800)
    assert prep.intensity_scale(s, "in_phase_percentile") == pytest.approx(840)
    # a hot spot over muscle moves the in-phase percentile, not the fat reference
    hot = _fat_and_muscle(hot=3.0)
    assert prep.intensity_scale(hot) == pytest.approx(prep.intensity_scale(s))
    assert prep.intensity_scale(hot, "in_phase_percentile") > 1.5 * prep.intensity_scale(s, "in_phase_percentile")
    # too few pure-fat voxels: falls back to the in-phase percentile
    lean = make_study({"water": (np.where(s.water == 600, 600, 0).astype(np.float32), s.affine, "w"),
                       "fat": (np.where(s.water == 600, 30, 0).astype(np.float32), s.affine, "f")})
    assert prep.intensity_scale(lean) == pytest.approx(prep.intensity_scale(lean, "in_phase_percentile"))
    with pytest.raises(LegcompInputError, match="unknown normalisation"):
        prep.intensity_scale(s, "zscore")


def test_weights_record_their_normalisation():
    assert prep.normalisation_of({})["method"] == "in_phase_percentile"  # weights from before the choice
    assert prep.normalisation_of({"normalisation": prep.normalisation_spec()})["method"] == "fat_reference"
    with pytest.raises(LegcompInputError):
        prep.normalisation_of({"normalisation": {"method": "zscore"}})
    # a recorded spec's own parameters are used, not this version's constants
    s = _fat_and_muscle()
    recorded = {**prep.normalisation_spec("fat_reference"), "factor": 2.0}
    assert prep.intensity_scale(s, prep.normalisation_of({"normalisation": recorded})) == pytest.approx(1600)


def test_stage2_input_channels():
    s = _study()
    x = prep.stage2_input(s)
    assert x.shape == (2, *s.shape)
    np.testing.assert_allclose(x[1], prep.stage1_input(s)[0])
    x3 = prep.stage2_input(s, s.labels["stage1"])
    assert x3.shape == (3, *s.shape) and set(np.unique(x3[2])) == {0.0, 1.0}


def test_working_grid_round_trip():
    s = _study()
    w = prep.to_working(s)  # 0.75 mm -> 1.5 mm in-plane
    assert w.shape == (20, 15, 6) and np.allclose(w.spacing, (1.5, 1.5, 6.0))
    # voxel centres: world position of working voxel 0 is the midpoint of input voxels 0 and 1
    np.testing.assert_allclose(w.affine[:3, 3], s.affine[:3, :3] @ [0.5, 0.5, 0] + s.affine[:3, 3])
    back = prep.from_working(w.labels["stage1"], w, s)
    assert back.shape == s.shape and back.dtype == np.uint8
    assert (back == s.labels["stage1"]).mean() > 0.97
    assert prep.to_working(s, {"working_spacing": [None, None, None]}) is s
    assert prep.to_working(s, (0.76, 0.76, None)) is s  # within tolerance: untouched
    probs = np.stack([w.water, w.fat])
    assert prep.from_working(probs, w, s, order=1).shape == (2, *s.shape)
    with pytest.raises(LegcompInputError):
        prep.from_working(np.zeros((3, 3, 3)), w, s)


def test_labels_from_probabilities_give_smoother_borders():
    """A disc at 0.5 mm, its probabilities at 1.5 mm: linear resampling of probabilities recovers the
    border better than nearest-neighbour labels, and equals argmax when the grids coincide."""
    fine = np.zeros((90, 90, 4), np.float32)
    xx, yy = np.meshgrid(np.arange(90) + 0.5, np.arange(90) + 0.5, indexing="ij")
    disc = (xx - 44.0) ** 2 + (yy - 47.0) ** 2 < 31.0 ** 2
    study = make_study({"water": (fine + disc[..., None], np.diag([0.5, 0.5, 6.0, 1.0]), "w"),
                        "fat": (fine + 0.1, np.diag([0.5, 0.5, 6.0, 1.0]), "f")})
    work = prep.to_working(study)
    assert work.shape == (30, 30, 4)
    p1 = np.repeat(disc.reshape(30, 3, 30, 3).mean(axis=(1, 3))[..., None], 4, 2).astype(np.float32)  # partial volume
    prob = np.stack([1 - p1, p1])
    smooth = prep.labels_from_probabilities(prob, work, study)
    nearest = prep.from_working(prob.argmax(0).astype(np.uint8), work, study)
    truth = np.repeat(disc[..., None], 4, 2)
    assert smooth.dtype == np.uint8 and smooth.shape == study.shape
    assert (smooth != truth).sum() < 0.4 * (nearest != truth).sum()
    assert np.array_equal(prep.labels_from_probabilities(prob, work, work), prob.argmax(0))
    with pytest.raises(LegcompInputError):
        prep.labels_from_probabilities(prob[:, :-1], work, study)


def test_leg_crop_and_mirror():
    stage1 = np.zeros((60, 40, 5), np.uint8)
    legs = np.zeros_like(stage1)
    legs[:30], legs[30:] = 2, 1
    stage1[5:20, 10:30] = anatomy.WHOLE_MUSCLE.id
    stage1[40:55, 12:28] = anatomy.WHOLE_MUSCLE.id
    box = prep.leg_crop_box(stage1, legs, 1, (1.5, 1.5, 6.0), margin_mm=3.0)
    assert box == (slice(38, 57), slice(10, 30), slice(0, 5))
    assert prep.leg_crop_box(stage1, legs, 1, (1.5, 1.5, 6.0), margin_mm=300.0)[0] == slice(0, 60)
    assert prep.leg_crop_box(np.zeros_like(stage1), legs, 1, (1, 1, 1)) is None
    img = np.random.default_rng(0).random((2, 60, 40, 5))
    c = prep.crop(img, box)
    assert c.shape == (2, 19, 20, 5)
    m = prep.mirror_x(c)
    assert np.array_equal(m[:, 0], c[:, -1]) and np.array_equal(prep.mirror_x(m), c)
    full = np.zeros((60, 40, 5))
    prep.paste(full, np.ones((19, 20, 5)), box)
    assert full.sum() == 19 * 20 * 5
    # channel-first arrays: the (x, y, z) mask selects voxels in every channel
    probs = np.zeros((3, 60, 40, 5))
    where = np.zeros((19, 20, 5), bool)
    where[:4] = True
    prep.paste(probs, np.ones((3, 19, 20, 5)), box, where=where)
    assert probs.sum() == 3 * where.sum() and probs[:, 38:42, 10:30].all()
    assert prep.is_left(1) and not prep.is_left(2)
    assert prep.pad_to_multiple(np.zeros((2, 19, 20, 5)), (16, 16, 4)).shape == (2, 32, 32, 8)


def _raw_study(water, fat, source=""):
    """A DixonStudy straight from arrays (no input checks), 2 mm voxels."""
    w, f = np.asarray(water, np.float32), np.asarray(fat, np.float32)
    return DixonStudy(water=w, fat=f, in_phase=w + f, opposed_phase=np.abs(w - f), affine=np.diag([2.0, 2, 2, 1]),
                      source=source)


def test_normalisation_specs_and_errors():
    assert prep.normalisation_spec() == {"method": "fat_reference", "body_fraction": 0.1, "clip": [0.0, 2.0],
                                         "fat_fraction_above": 0.75, "factor": 1.4}
    assert prep.normalisation_spec("in_phase_percentile") == {"method": "in_phase_percentile", "body_fraction": 0.1,
                                                              "clip": [0.0, 2.0], "percentile": 99.0}
    assert prep.normalisation_of({}) == prep.normalisation_spec("in_phase_percentile")  # weights before 0.2
    assert prep.normalisation_of({"normalisation": None})["method"] == "in_phase_percentile"
    rec = prep.normalisation_of({"normalisation": {"method": "fat_reference", "factor": 2.0}})
    assert rec["factor"] == 2.0 and rec["fat_fraction_above"] == 0.75
    with pytest.raises(LegcompInputError) as info:
        prep.normalisation_of({"normalisation": {"method": "zscore"}})
    assert str(info.value) == "unknown normalisation 'zscore'; expected one of fat_reference, in_phase_percentile"


def test_intensity_scale_rules_and_fallbacks():
    n = 1000
    w = np.zeros((10, 10, 10), np.float32)
    f = np.zeros((10, 10, 10), np.float32)
    flat_w, flat_f = w.reshape(-1), f.reshape(-1)
    flat_f[:100], flat_w[:100] = 300.0, 100.0  # 100 voxels at FF 0.75 exactly: not pure fat (strictly above)
    flat_w[100:400] = 50.0
    st = _raw_study(w, f)
    ip = (st.water + st.fat)[prep.body_mask(st)]
    assert prep.intensity_scale(st) == pytest.approx(float(np.percentile(ip, 99.0)))  # fell back
    flat_f[:100], flat_w[:100] = 301.0, 100.0  # now FF > 0.75: 100 pure-fat voxels are enough
    st = _raw_study(w, f)
    assert prep.intensity_scale(st) == pytest.approx(1.4 * 301.0)
    assert prep.intensity_scale(st, {"method": "fat_reference", "factor": 2.0}) == pytest.approx(602.0)
    flat_f[99] = 0.0  # 99 pure-fat voxels: too few
    st = _raw_study(w, f)
    assert prep.intensity_scale(st) == pytest.approx(float(np.percentile((st.water + st.fat)[prep.body_mask(st)], 99)))
    assert prep.intensity_scale(st, {"method": "in_phase_percentile", "percentile": 50.0}) == pytest.approx(
        float(np.percentile((st.water + st.fat)[prep.body_mask(st)], 50)))
    assert prep.body_mask(_raw_study(np.full((2, 2, 2), 5.0), np.zeros((2, 2, 2)))).sum() == 8
    b = np.zeros((1, 1, 1000))
    b[..., 500:] = 1000.0
    b[..., :500] = 100.0  # 0.1 x the 99.9th percentile (1000): not body (strictly above)
    assert not prep.body_mask(_raw_study(b, np.zeros_like(b)))[..., :500].any()
    with pytest.raises(LegcompInputError) as info:
        prep.intensity_scale(_raw_study(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), source="s01"))
    assert str(info.value) == "s01: water + fat is zero everywhere"
    with pytest.raises(LegcompInputError) as info:
        prep.intensity_scale(_raw_study(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))))
    assert info.value.path is None
    neg = _raw_study(np.full((2, 2, 2), -3.0), np.zeros((2, 2, 2)))  # nothing positive: |W+F| max
    assert prep.intensity_scale(neg, "in_phase_percentile") == pytest.approx(3.0)


def test_network_inputs_scaled_clipped_and_checked():
    w = np.array([[[0.0, 1.0], [2.0, 9.0]]], np.float32)
    f = np.array([[[4.0, 1.0], [0.0, -1.0]]], np.float32)
    st = _raw_study(w, f, source="s")
    x1 = prep.stage1_input(st, scale=2.0)
    assert x1.dtype == np.float32 and x1.shape == (2, 1, 2, 2)
    np.testing.assert_array_equal(x1[0], [[[0, 0.5], [1, 2]]])  # 9 / 2 clipped to 2
    np.testing.assert_array_equal(x1[1], [[[2, 0.5], [0, 0]]])  # -1 / 2 clipped to 0
    s1 = np.array([[[2, 1], [0, 2]]], np.uint8)
    x2 = prep.stage2_input(st, s1, scale=2.0)
    assert x2.shape == (3, 1, 2, 2) and x2.dtype == np.float32
    np.testing.assert_array_equal(x2[0], np.clip(np.abs(w - f) / 2, 0, 2))
    np.testing.assert_array_equal(x2[2], [[[1, 0], [0, 1]]])
    assert prep.stage2_input(st, scale=2.0).shape == (2, 1, 2, 2)
    with pytest.raises(LegcompInputError) as info:
        prep.stage2_input(st, np.zeros((2, 2, 2)), scale=2.0)
    assert str(info.value) == "s: stage-1 mask shape (2, 2, 2) differs from the image shape (1, 2, 2)"
    np.testing.assert_array_equal(prep.network_input(st, 2, s1, method="in_phase_percentile")[2], x2[2])
    assert prep.network_input(st, "1").shape == (2, 1, 2, 2)
    with pytest.raises(LegcompInputError) as info:
        prep.network_input(st, 3)
    assert str(info.value) == "unknown stage 3; expected 1 or 2"


def test_working_grid_helpers():
    assert prep.working_spacing() == (1.5, 1.5, None)
    assert prep.working_spacing({}) == (None, None, None)  # weights without one: native grid
    assert prep.working_spacing({"working_spacing": [1, 2, None]}) == (1.0, 2.0, None)
    assert prep.working_spacing([3, 3, 3]) == (3.0, 3.0, 3.0)
    with pytest.raises(LegcompInputError) as info:
        prep.working_spacing([1, 2])
    assert str(info.value) == "working spacing needs 3 values (x, y, z), got [1, 2]"
    # an axis within 10 % of the target keeps its grid (inclusive)
    assert prep.working_shape((100, 100, 10), (1.65, 1.35, 5.0), (1.5, 1.5, None)) == (100, 100, 10)
    assert prep.working_shape((100, 100, 10), (1.66, 1.34, 5.0), (1.5, 1.5, None)) == (111, 89, 10)
    assert prep.working_shape((1, 4, 4), (0.1, 1.5, 1.5), (1.5, 1.5, 1.5)) == (1, 4, 4)  # never below 1
    a = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    assert prep.resample(a, (2, 2, 2)) is a
    up = prep.resample(np.stack([a, a + 1]), (4, 4, 2), order=0)
    assert up.shape == (2, 4, 4, 2) and np.array_equal(up[1] - up[0], np.ones((4, 4, 2)))
    assert np.array_equal(up[0, ::2, ::2], a)
    down = prep.resample(np.ones((5, 5, 3)), (2, 2, 3))
    assert down.shape == (2, 2, 3)


def test_working_study_and_back():
    w = np.ones((30, 20, 4), np.float32)
    aff = np.diag([0.75, 0.75, 5.0, 1.0])
    lab = np.zeros(w.shape, np.uint8)
    lab[10:20, 6:14] = 2
    st = make_study({"water": (w, aff, "w"), "fat": (w * 2, aff, "f")}, labels={"stage1": (lab, aff, "l")})
    work = prep.to_working(st)
    assert work.shape == (15, 10, 4) and work.water.dtype == np.float32 and work.opposed_phase.dtype == np.float32
    np.testing.assert_allclose(work.spacing, (1.5, 1.5, 5.0))
    np.testing.assert_allclose(work.affine[:3, 3], st.affine[:3, 3] + [0.375, 0.375, 0.0])  # voxel centres aligned
    assert work.labels["stage1"].dtype == np.uint8 and set(np.unique(work.labels["stage1"])) == {0, 2}
    assert np.array_equal(prep.labels_to_working(lab, st, work), work.labels["stage1"])
    assert prep.to_working(st, [0.75, 0.75, None]) is st
    back = prep.from_working(work.labels["stage1"], work, st)
    assert back.dtype == np.uint8 and back.shape == st.shape and np.array_equal(back, lab)
    with pytest.raises(LegcompInputError) as info:
        prep.from_working(np.zeros((3, 3, 3)), work, st)
    assert str(info.value) == "array shape (3, 3, 3) does not match the working grid (15, 10, 4)"
    prob = np.zeros((3, 15, 10, 4), np.float32)
    prob[0], prob[2][work.labels["stage1"] == 2] = 0.6, 0.9
    labels, conf = prep.labels_and_confidence(prob, work, st)
    assert labels.dtype == np.uint8 and conf.dtype == np.float32 and labels.shape == st.shape
    assert set(np.unique(labels)) == {0, 2} and conf.max() == pytest.approx(0.9) and conf.min() == pytest.approx(0.6)
    same, c = prep.labels_and_confidence(prob, work, work)
    assert np.array_equal(same, work.labels["stage1"]) and np.array_equal(c, np.where(same == 2, 0.9, 0.6).astype(np.float32))
    assert np.array_equal(prep.labels_from_probabilities(prob, work, work), same)
    with pytest.raises(LegcompInputError) as info:
        prep.labels_and_confidence(prob[0], work, st)
    assert str(info.value) == "probabilities of shape (15, 10, 4) do not match the working grid (15, 10, 4)"


def test_crop_box_ignores_hip_slices_for_its_width():
    """Hip/pelvis slices (half a pelvis per leg) do not widen a leg's crop box; z stays whole; a leg
    with muscle only on skipped slices still gets a box from them."""
    s1 = np.zeros((30, 20, 4), np.uint8)
    legs = np.full_like(s1, 2)
    s1[10:15, 6:9, :3] = 2
    s1[2:25, 3:18, 3] = 2  # the top slice: pelvic contents called muscle
    hip = np.array([False, False, False, True])
    assert prep.leg_crop_box(s1, legs, 2, (1, 1, 5), margin_mm=0) == (slice(2, 25), slice(3, 18), slice(0, 4))
    assert prep.leg_crop_box(s1, legs, 2, (1, 1, 5), margin_mm=0, skip_slices=hip) == (
        slice(10, 15), slice(6, 9), slice(0, 4))
    s1[:, :, :3] = 0
    assert prep.leg_crop_box(s1, legs, 2, (1, 1, 5), margin_mm=0, skip_slices=hip) == (
        slice(2, 25), slice(3, 18), slice(0, 4))


def test_crop_paste_mirror_and_pad():
    s1 = np.zeros((30, 20, 3), np.uint8)
    legs = np.zeros_like(s1)
    s1[10:15, 6:9] = 2
    legs[:] = 2
    assert prep.leg_crop_box(s1, legs, 1, (1.5, 1.5, 5.0)) is None
    assert prep.leg_crop_box(s1, legs, 2, (1.5, 2.0, 5.0), margin_mm=3.1) == (slice(7, 18), slice(4, 11), slice(0, 3))
    assert prep.leg_crop_box(s1, legs, 2, (1.5, 1.5, 5.0), margin_mm=30) == (slice(0, 30), slice(0, 20), slice(0, 3))
    assert prep.leg_crop_box(s1, legs, 2, (1.5, 1.5, 5.0), margin_mm=0) == (slice(10, 15), slice(6, 9), slice(0, 3))
    full = np.zeros((2, 4, 4, 1))
    box = (slice(1, 3), slice(0, 2), slice(0, 1))
    where = np.array([[[True], [False]], [[False], [True]]])
    out = prep.paste(full, np.ones((2, 2, 2, 1)) * 7, box, where)
    assert out is full and full.sum() == 7 * 4 and full[1, 1, 0, 0] == 7 and full[1, 1, 1, 0] == 0
    prep.paste(full, np.full((2, 2, 2, 1), 3.0), box)
    assert (prep.crop(full, box) == 3).all()
    a = np.arange(24).reshape(2, 3, 4, 1)
    assert np.array_equal(prep.mirror_x(a), a[:, ::-1]) and prep.mirror_x(a).flags["C_CONTIGUOUS"]
    assert np.array_equal(prep.mirror_x(a[0]), a[0, ::-1])
    assert prep.is_left(1) and not prep.is_left(2) and not prep.is_left(0)
    b = np.ones((2, 5, 3, 1))
    assert prep.pad_to_multiple(b, (4, 4, 1)).shape == (2, 8, 4, 1)
    assert prep.pad_to_multiple(b, (1, 1, 1), minimum=(6, 2, 3)).shape == (2, 6, 3, 3)
    assert prep.pad_to_multiple(b, (1, 1, 1)) is b
    z = prep.pad_to_multiple(np.ones((5, 3, 1)), (4, 4, 1), mode="constant")
    assert z.shape == (8, 4, 1) and z.sum() == 15
    assert prep.pad_to_multiple(np.ones((5, 3, 1)), (4, 4, 1)).sum() == 32  # edge mode repeats


def test_default_normalisation_linear_resampling_and_label_ties():
    # network inputs use the default (fat_reference) normalisation unless told otherwise
    w = np.zeros((10, 10, 12), np.float32)
    f = np.zeros_like(w)
    f[..., :2], w[..., :2] = 500.0, 10.0  # 200 pure-fat voxels
    w[..., 2:] = 300.0
    st = _raw_study(w, f)
    assert prep.intensity_scale(st) != pytest.approx(prep.intensity_scale(st, "in_phase_percentile"))
    np.testing.assert_array_equal(prep.network_input(st, 1), prep.stage1_input(st, scale=prep.intensity_scale(st)))
    np.testing.assert_array_equal(prep.network_input(st, 2), prep.stage2_input(st, scale=prep.intensity_scale(st)))
    other = prep.intensity_scale(st, "in_phase_percentile")  # a recorded normalisation is passed on
    np.testing.assert_array_equal(prep.network_input(st, 1, method="in_phase_percentile"), prep.stage1_input(st, scale=other))
    np.testing.assert_array_equal(prep.network_input(st, 2, method="in_phase_percentile"), prep.stage2_input(st, scale=other))
    # resampling is linear by default
    ramp = np.array([0.0, 0.0, 4.0, 16.0])[:, None, None] * np.ones((1, 2, 2))
    up = prep.resample(ramp, (8, 2, 2))
    np.testing.assert_allclose(up[:, 0, 0], [0, 0, 0, 1, 3, 7, 13, 16])
    np.testing.assert_allclose(prep.resample(ramp, (8, 2, 2), order=0)[:, 0, 0], [0, 0, 0, 0, 4, 4, 16, 16])
    # label maps go to the working grid by nearest neighbour: no ids in between
    lab = np.zeros((30, 20, 2), np.uint8)
    lab[11:20, 7:13] = 2
    lab_st = make_study({"water": (np.ones(lab.shape, np.float32), np.diag([0.75, 0.75, 5.0, 1]), "w"),
                         "fat": (np.ones(lab.shape, np.float32), np.diag([0.75, 0.75, 5.0, 1]), "f")})
    work = prep.to_working(lab_st)
    assert set(np.unique(prep.labels_to_working(lab, lab_st, work))) == {0, 2}
    # class probabilities: resampled linearly class by class; the lower class wins a tie, as argmax does
    prob = np.zeros((3,) + work.shape, np.float32)
    prob[1] = 0.5
    prob[2] = 0.5
    prob[0, :7] = 0.9
    labels, conf = prep.labels_and_confidence(prob, work, lab_st)
    assert set(np.unique(labels)) == {0, 1} and labels.dtype == np.uint8
    expect = np.maximum.reduce([prep.resample(prob[c], lab_st.shape, 1) for c in range(3)])
    np.testing.assert_array_equal(conf, expect)
    assert ((conf > 0.5) & (conf < 0.9)).any()  # linear, not nearest, across the border
    same, c = prep.labels_and_confidence(prob, work, work)
    assert same.dtype == np.uint8 and c.dtype == np.float32 and set(np.unique(same)) == {0, 1}

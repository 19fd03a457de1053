"""Training: k-fold split, transforms, loss decrease, end-to-end train() with resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.io import read_study
from legcomp.models import build_network, load_weights
from legcomp.preprocessing import inputs as prep
from legcomp.training import build_transforms, fit_patch, kfold_split, study_cases, train
from legcomp.training.cli import add_train_arguments
from legcomp.training.toy import toy_arrays, write_toy_cohort

torch.set_num_threads(1)

NATIVE = (None, None, None)


def test_kfold_split_deterministic_and_disjoint():
    names = [f"s{i:02d}" for i in range(11)]
    folds = [kfold_split(names, 5, k, seed=3) for k in range(5)]
    vals = [set(v) for _, v in folds]
    assert set().union(*vals) == set(range(11))
    assert sum(len(v) for v in vals) == 11
    for tr, va in folds:
        assert not set(tr) & set(va) and len(tr) + len(va) == 11
    assert kfold_split(names, 5, 2, seed=3) == folds[2]
    # order of the input does not matter, only the names
    rev = names[::-1]
    tr, va = kfold_split(rev, 5, 2, seed=3)
    assert sorted(rev[i] for i in va) == sorted(names[i] for i in folds[2][1])
    assert kfold_split(names, 5, 2, seed=4) != folds[2]
    assert kfold_split(names, 1, 0) == (list(range(11)), [])
    with pytest.raises(LegcompInputError):
        kfold_split(names, 5, 5)


def test_fit_patch_clamps_to_data():
    assert fit_patch((128, 128, 32), [(40, 30, 10), (50, 20, 9)], (16, 16, 4)) == (64, 32, 12)
    assert fit_patch((64, 64, 16), [(300, 200, 40)], (16, 16, 4)) == (64, 64, 16)


def test_transforms_give_patches():
    from monai.data import set_track_meta

    arr = toy_arrays((20, 12, 5))
    case = {"image": np.stack([arr["water"], arr["fat"]]) / 500, "label": arr["stage2"][None]}
    set_track_meta(False)
    try:
        det, rnd = build_transforms(2, anatomy.n_classes(2, "thigh"), (16, 16, 4))
        rnd.set_random_state(seed=0)
        d = det(case)
        out = rnd(d)
    finally:
        set_track_meta(True)
    item = out[0] if isinstance(out, list) else out
    assert tuple(item["image"].shape) == (2, 16, 16, 4) and tuple(item["label"].shape) == (1, 16, 16, 4)
    assert set(item) == {"image", "label"}


def test_intensity_augmentation_stays_in_the_inference_range():
    from monai.data import set_track_meta

    arr = toy_arrays((20, 12, 5))
    sig = np.stack([arr["water"], arr["fat"]]) / max(arr["water"].max(), arr["fat"].max()) * 2.0  # up to CLIP max
    mask = (arr["stage1"] == anatomy.WHOLE_MUSCLE.id)[None].astype(np.float32)
    case = {"image": np.concatenate([sig, mask]).astype(np.float32), "label": arr["stage2"][None]}
    set_track_meta(False)
    try:
        det, rnd = build_transforms(2, anatomy.n_classes(2, "thigh"), (16, 16, 4))
        rnd.set_random_state(seed=1)
        d = det(case)
        highs = []
        for _ in range(40):
            out = rnd(d)
            img = (out[0] if isinstance(out, list) else out)["image"]
            assert float(img[:2].min()) >= prep.CLIP[0] and float(img[:2].max()) <= prep.CLIP[1]
            assert set(np.unique(np.asarray(img[2]))) <= {0.0, 1.0}  # the mask is not scaled or blurred
            highs.append(float(img[:2].max()))
    finally:
        set_track_meta(True)
    assert max(highs) == prep.CLIP[1]  # intensity scaling did push values up to the clip


def test_study_cases_stage2_mirrors_left_leg(tmp_path):
    p = write_toy_cohort(tmp_path, 1)[0]
    study = read_study(p)
    cases = study_cases(study, 2, "thigh", spacing=NATIVE)
    assert [c["name"] for c in cases] == [f"{study.name}_left", f"{study.name}_right"]
    left, right = cases
    # the toy legs are mirror images: the mirrored left crop's muscle layout looks like the right one's
    assert left["image"].shape[0] == 2 and left["label"].ndim == 4
    assert left["label"].max() <= anatomy.n_classes(2, "thigh") - 1
    s1 = study_cases(study, 1, "thigh", spacing=NATIVE)
    assert len(s1) == 1 and s1[0]["image"].shape == (2, *study.shape)
    with pytest.raises(LegcompInputError, match="stage2"):
        study.labels.pop("stage2")
        study_cases(study, 2, "thigh")


def _symmetric_study(ph):
    """The phantom with its left half replaced by the mirror image of its right half (x = nx-1-x): the left
    leg is the right leg's exact mirror image (image and labels)."""
    from legcomp.io.study import make_study

    nx = ph.shape[0]
    assert nx % 2 == 0
    right = np.arange(nx) >= nx // 2  # RAS+: the subject's right leg lies at high x

    def sym(a):
        return np.where(right[:, None, None], a, a[::-1])

    legs = np.where(right[:, None, None], ph.legs, np.where(ph.legs[::-1] == 2, 1, 0)).astype(np.uint8)
    assert set(np.unique(ph.legs[right])) == {0, 2}
    imgs = {k: (sym(getattr(ph, k)), ph.affine, k) for k in ("water", "fat")}
    labs = {"stage1": (sym(ph.stage1), ph.affine, "s1"), "stage2": (sym(ph.stage2), ph.affine, "s2"),
            "legs": (legs, ph.affine, "legs")}
    return make_study(imgs, region="thigh", name="sym", labels=labs)


def test_study_cases_stage2_left_leg_is_mirrored_like_a_right_leg():
    """Stage-2 cases: the left leg's crop is mirrored along x, image and labels alike, so that its lateral
    muscles lie on the same side as a right leg's."""
    from legcomp.phantom import generate

    ph = generate("thigh", 3, matrix=(48, 32, 4), spacing=(9.0, 9.0, 9.0), supersample=1)
    vl = anatomy.label_by_name("vastus_lateralis", "thigh").id  # lateral
    gr = anatomy.label_by_name("gracilis", "thigh").id  # medial
    for leg_id in (1, 2):  # in the study: lateral is away from the midline, so to low x on the left leg
        x_vl = np.argwhere((ph.stage2 == vl) & (ph.legs == leg_id))[:, 0].mean()
        x_gr = np.argwhere((ph.stage2 == gr) & (ph.legs == leg_id))[:, 0].mean()
        assert (x_vl > x_gr) == (leg_id == 2)
    cases = {c["name"].rsplit("_", 1)[1]: c for c in study_cases(ph.to_study(), 2, "thigh", spacing=NATIVE)}
    assert set(cases) == {"left", "right"}
    for leg, c in cases.items():  # in both crops vastus lateralis lies at higher x than gracilis
        lab = c["label"][0]
        assert np.argwhere(lab == vl)[:, 0].mean() > np.argwhere(lab == gr)[:, 0].mean(), leg
    # exact: a left leg that is the right leg's mirror image gives the very same case, image and labels
    cases = {c["name"].rsplit("_", 1)[1]: c for c in study_cases(_symmetric_study(ph), 2, "thigh", spacing=NATIVE)}
    left, right = cases["left"], cases["right"]
    assert (left["label"] > 0).any() and len(np.unique(left["label"])) > 5
    np.testing.assert_array_equal(left["label"], right["label"])
    np.testing.assert_array_equal(left["image"], right["image"])
    assert not np.array_equal(left["label"], left["label"][:, ::-1])  # not trivially symmetric


def test_few_steps_lower_the_loss():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    arr = toy_arrays((32, 16, 4), seed=1)
    x = torch.from_numpy(np.stack([arr["water"], arr["fat"]]) / 600.0)[None].float()
    y = torch.from_numpy(arr["stage1"][None, None].astype(np.int64))
    model = build_network("tiny", 2, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_train_end_to_end_and_resume(tmp_path):
    write_toy_cohort(tmp_path / "data", 3, shape=(32, 16, 4))
    out = tmp_path / "model"
    kw = dict(stage=1, region="thigh", out=out, folds=3, fold=1, config="tiny", iters_per_epoch=2, batch=2,
              patch=(16, 16, 4), working_spacing=None, progress=False, seed=5, device="cpu")
    s = train(tmp_path / "data", epochs=2, **kw)
    assert s["epochs_run"] == 2 and s["n_train_cases"] == 2 and s["n_val_cases"] == 1
    assert s["steps"] == 4 and s["best_epoch"] in (1, 2)
    for suffix in ("pt", "checkpoint.pt", "metrics.csv", "curve.png", "summary.json"):
        assert (out / f"thigh_stage1.{suffix}").is_file()
    model, meta = load_weights(out / "thigh_stage1.pt", region="thigh", stage=1)
    assert set(meta["val_dsc"]) == {"subcutaneous_fat", "whole_muscle"}
    assert meta["patch_size"] == [16, 16, 4] and meta["working_spacing"] == [None, None, None]
    assert len(meta["training"]["split"]["val"]) == 1 and len(meta["training"]["split"]["train"]) == 2
    rows = list(csv.DictReader(open(out / "thigh_stage1.metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and float(rows[0]["train_loss"]) > 0
    # resume: continues at epoch 3
    s2 = train(tmp_path / "data", epochs=3, **kw)
    assert s2["start_epoch"] == 2 and s2["epochs_run"] == 3 and s2["steps"] == 2
    assert len(list(csv.DictReader(open(out / "thigh_stage1.metrics.csv")))) == 3
    assert meta["normalisation"] == prep.normalisation_spec("fat_reference")  # the default, recorded
    # a checkpoint of another fold, or of another normalisation, is refused
    with pytest.raises(LegcompInputError, match="another run"):
        train(tmp_path / "data", epochs=3, **{**kw, "fold": 0})
    with pytest.raises(LegcompInputError, match="another run"):
        train(tmp_path / "data", epochs=3, **kw, normalisation="in_phase_percentile")
    assert json.loads((out / "thigh_stage1.summary.json").read_text())["epochs_run"] == 3
    # a checkpoint from before normalisations were recorded resumes as in_phase_percentile
    ck_path = out / "thigh_stage1.checkpoint.pt"
    ck = torch.load(ck_path, weights_only=True)
    old = json.loads(ck["run_json"])
    del old["normalisation"]
    ck["run_json"] = json.dumps(old)
    torch.save(ck, ck_path)
    s3 = train(tmp_path / "data", epochs=4, **kw, normalisation="in_phase_percentile")
    assert s3["start_epoch"] == 3 and s3["epochs_run"] == 4


def _assert_same_state(got, want, where=""):
    """Nested state dicts (tensors, numbers, lists, dicts) equal, tensor by tensor (exactly)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, sorted(got), sorted(want))
        for k in want:
            _assert_same_state(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_state(g, w, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


def test_resume_restores_model_and_optimizer_state(tmp_path, monkeypatch):
    """After a resume the model and the optimizer hold the checkpoint's state, tensor by tensor, and
    training goes on exactly as an uninterrupted run would."""
    import legcomp.training.loop as loop

    write_toy_cohort(tmp_path / "data", 2, shape=(32, 16, 4))
    kw = dict(stage=1, region="thigh", folds=1, config="tiny", iters_per_epoch=2, batch=1, patch=(16, 16, 4),
              working_spacing=None, progress=False, seed=2, device="cpu", lr=1e-2)
    out = tmp_path / "m"
    train(tmp_path / "data", out=out, epochs=1, **kw)
    ck = torch.load(out / "thigh_stage1.checkpoint.pt", weights_only=True)
    assert ck["optimizer"]["state"] and all(int(v["step"]) == 2 for v in ck["optimizer"]["state"].values())

    made = {}
    real_build, real_adamw = loop.build_network, torch.optim.AdamW

    def build(*a, **k):
        made["model"] = real_build(*a, **k)
        return made["model"]

    class RecordingAdamW(real_adamw):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made["opt"] = self

    with monkeypatch.context() as mp:
        mp.setattr(loop, "build_network", build)
        mp.setattr(torch.optim, "AdamW", RecordingAdamW)
        # epochs=1 again: resumed after epoch 1, nothing left to run, so the objects hold what resume restored
        s = train(tmp_path / "data", out=out, epochs=1, **kw)
    assert s["stop_reason"] == "already complete" and s["steps"] == 0
    _assert_same_state(made["model"].state_dict(), ck["model"], "model")
    _assert_same_state(made["opt"].state_dict(), ck["optimizer"], "optimizer")
    fresh = real_build("tiny", 2, anatomy.n_classes(1, "thigh"))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ck["model"].values()))

    # resumed for a second epoch == two epochs in one go (model, optimizer and RNG states all restored)
    s2 = train(tmp_path / "data", out=out, epochs=2, **kw)
    assert s2["start_epoch"] == 1 and s2["steps"] == 2
    one_go = train(tmp_path / "data", out=tmp_path / "m2", epochs=2, **kw)
    assert one_go["steps"] == 4
    a = torch.load(out / "thigh_stage1.checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "m2" / "thigh_stage1.checkpoint.pt", weights_only=True)
    _assert_same_state(a["model"], b["model"], "model")
    _assert_same_state(a["optimizer"], b["optimizer"], "optimizer")


def test_train_stage2_all_folds_with_stage1_channel(tmp_path):
    write_toy_cohort(tmp_path / "data", 2, region="calf", shape=(32, 16, 4))
    s = train(tmp_path / "data", stage=2, region="calf", out=tmp_path / "m", folds=1, config="tiny", epochs=1,
              iters_per_epoch=2, batch=2, patch=(16, 16, 4), working_spacing=None, progress=False,
              with_stage1=True, loss="dicefocal", device="cpu")
    assert s["n_train_cases"] == 4 and s["n_val_cases"] == 0  # one case per leg
    model, meta = load_weights(tmp_path / "m" / "calf_stage2.pt", region="calf", stage=2)
    assert meta["in_channels"] == 3 and meta["with_stage1"] is True
    assert meta["channels"] == ["opposed_phase", "water", "stage1_muscle"]


def test_init_bundled_starts_from_the_bundled_weights(tmp_path):
    from legcomp.models import bundled_weights

    write_toy_cohort(tmp_path / "data", 1, region="thigh", shape=(64, 32, 4))
    s = train(tmp_path / "data", stage=2, region="thigh", out=tmp_path / "m", folds=1, config="fast", epochs=1,
              iters_per_epoch=1, batch=1, patch=(32, 32, 4), working_spacing=None, progress=False, lr=0.0,
              weight_decay=0.0, init_weights="bundled", augment=False, device="cpu")
    assert s["n_train_cases"] == 2
    tuned, meta = load_weights(tmp_path / "m" / "thigh_stage2.pt", region="thigh", stage=2)
    bundled, _ = load_weights(bundled_weights("thigh", 2), region="thigh", stage=2)
    for (k, a), b in zip(tuned.named_parameters(), bundled.parameters()):
        assert torch.equal(a, b), k  # lr 0: exactly the bundled weights came out (norm statistics move)


def test_bad_options(tmp_path):
    with pytest.raises(LegcompInputError, match="no studies"):
        train(tmp_path, stage=1, region="thigh", out=tmp_path / "o", progress=False, device="cpu")
    with pytest.raises(LegcompInputError, match="loss"):
        train(tmp_path, stage=1, region="thigh", out=tmp_path / "o", loss="mse", device="cpu")


def test_cli_arguments():
    import argparse

    p = add_train_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--data", "d", "--stage", "2", "--region", "calf", "--out", "o", "--patch", "64", "64", "16",
                      "--no-resume", "--with-stage1", "--loss", "dicefocal"])
    assert a.stage == 2 and a.patch == [64, 64, 16] and a.resume is False and a.with_stage1 and a.folds == 5


def test_time_limit_stops_and_anneals(tmp_path):
    write_toy_cohort(tmp_path / "data", 2, shape=(32, 16, 4))
    s = train(tmp_path / "data", stage=1, region="thigh", out=tmp_path / "m", folds=1, config="tiny", epochs=50,
              iters_per_epoch=1, batch=1, patch=(16, 16, 4), working_spacing=None, progress=False,
              time_limit_min=1e-4, device="cpu")
    assert s["stop_reason"] == "time limit" and s["epochs_run"] == 1
    rows = list(csv.DictReader(open(tmp_path / "m" / "thigh_stage1.metrics.csv")))
    assert float(rows[0]["lr"]) < 1e-3  # decayed by the time used, not by epochs


# --------------------------------------------------------------------------- loop helpers, exactly

def test_seed_all_seeds_every_generator_and_rng_state_round_trips():
    import random

    import legcomp.training.loop as loop

    seed = 2**32 + 7  # numpy takes the seed modulo 2**32
    loop._seed_all(seed)
    got = (random.random(), float(np.random.random()), float(torch.rand(1)))
    assert got[0] == random.Random(seed).random()
    assert got[1] == float(np.random.RandomState(7).random_sample())
    assert got[2] == float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))
    st = loop._rng_state()
    assert st["numpy_keys"].dtype == torch.int64 and st["numpy_pos"] == np.random.get_state()[2]
    assert set(st) - {"cuda"} == {"torch", "numpy_keys", "numpy_pos", "python"}
    want = (random.random(), np.random.standard_normal(), float(np.random.random()), float(torch.rand(1)))
    random.random(), np.random.standard_normal(), torch.rand(3)  # move every generator on
    loop._set_rng_state(st)
    assert (random.random(), np.random.standard_normal(), float(np.random.random()), float(torch.rand(1))) == want


def _png_size(path):
    head = open(path, "rb").read(24)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_write_curve_png_size(tmp_path):
    import legcomp.training.loop as loop

    rows = [{"epoch": 1, "train_loss": 1.0, "val_mean_dsc": 0.5, "valset_mean_dsc": ""},
            {"epoch": 2, "train_loss": 0.5, "val_mean_dsc": 0.7, "valset_mean_dsc": 0.6}]
    loop._write_curve(rows, tmp_path / "x.curve.png")
    assert _png_size(tmp_path / "x.curve.png") == (600, 350)  # 6 x 3.5 in at 100 dpi


def test_mean_dsc_rounds_and_handles_missing_values():
    import warnings

    import legcomp.training.loop as loop

    names = anatomy.stage_labels(1, "thigh")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" warnings
        dsc, mean = loop._mean_dsc(np.array([[0.123456, np.nan], [0.2, np.nan]]), names)
        assert dsc == {"subcutaneous_fat": 0.1617, "whole_muscle": None} and mean == pytest.approx(0.161728)
        assert loop._mean_dsc(np.array([[np.nan, np.nan]]), names) == ({"subcutaneous_fat": None,
                                                                       "whole_muscle": None}, 0.0)
        for empty in ([], np.zeros((0, 2))):
            assert loop._mean_dsc(empty, names) == ({"subcutaneous_fat": None, "whole_muscle": None}, 0.0)


def test_append_case_rows_exact_csv(tmp_path):
    import legcomp.training.loop as loop

    names = anatomy.stage_labels(1, "thigh")
    cases = [{"set": 0, "study": "s1", "name": "s1_a"}, {"set": 1, "study": "s2", "name": "s2_a"}]
    rows = np.array([[0.123456, np.nan], [np.nan, np.nan]])
    path = tmp_path / "c.csv"
    loop._append_case_rows(path, 3, cases, rows, names, [{"path": "/v1"}, {"path": "/v2"}])
    loop._append_case_rows(path, 4, cases[:1], np.array([[0.5, 0.25]]), names, [{"path": "/v1"}])
    assert path.read_bytes().decode() == ("epoch,set,study,case,mean_dsc,dsc_subcutaneous_fat,dsc_whole_muscle\r\n"
                                "3,/v1,s1,s1_a,0.1235,0.1235,\r\n3,/v2,s2,s2_a,,,\r\n"
                                "4,/v1,s1,s1_a,0.375,0.5,0.25\r\n")


def test_warn_val_in_training_names_the_shared_studies(caplog):
    import logging
    from types import SimpleNamespace

    import legcomp.training.loop as loop

    def run(n_shared):
        used = {f"/d/t{i}": [f"t{i}", f"h{i}", None, "train", 1] for i in range(n_shared)}
        used["/d/v"] = ["v", "hv", None, "val", 1]  # a k-fold validation study is no training study
        data = SimpleNamespace(gathered=[[{"used": used}]])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="legcomp.training"):
            loop._warn_val_in_training(SimpleNamespace(stem="thigh_stage1"), data,
                                       {f"h{i}" for i in range(n_shared)} | {"hv", "other"})
        return [r.getMessage() for r in caplog.records]

    assert run(6) == ["thigh_stage1: 6 --val studies are also training studies (same files): "
                      "t0, t1, t2, t3, t4 ..."]
    assert run(5) == ["thigh_stage1: 5 --val studies are also training studies (same files): t0, t1, t2, t3, t4"]
    assert run(0) == []


class _ValueNet(torch.nn.Module):
    """Predicts class ``round(channel 0)`` at each voxel; records what it is given."""

    def __init__(self, n_classes):
        super().__init__()
        self.n, self.seen = n_classes, []

    def forward(self, x):
        self.seen.append((x.clone(), x.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return torch.cat([(x[:, :1].round() == c).float() for c in range(self.n)], 1)


def test_validate_pads_windows_ignores_and_masks():
    import legcomp.training.loop as loop

    img = np.ones((1, 12, 2, 4))  # float64, smaller than the patch in y
    img[0, 6:] = 2.0
    lab = img.astype(np.uint8).copy()
    lab[0, 0, 0, 0] = 2  # one voxel predicted wrong
    lab[0, 11, 1, 3] = anatomy.IGNORE  # two ignored voxels: not scored
    lab[0, 1, 0, 0] = anatomy.IGNORE
    net = _ValueNet(3)
    got = loop.validate(net, [{"image": img, "label": lab}], 3, (8, 4, 4), (1, 1, 1), torch.device("cpu"), False)
    ref, pred = lab[0], img[0].round().astype(np.uint8)
    keep = ref != anatomy.IGNORE
    want = [2 * ((pred == c) & (ref == c) & keep).sum() / (((pred == c) & keep).sum() + ((ref == c) & keep).sum())
            for c in (1, 2)]
    np.testing.assert_allclose(got, [want])
    assert got.shape == (1, 2) and got[0, 0] < 1.0
    xs = torch.cat([s[0] for s in net.seen])
    assert tuple(xs.shape) == (2, 1, 8, 4, 4)  # two windows of the patch size
    assert all(s[1] == torch.float32 and s[2] is False for s in net.seen)
    first = xs[0, 0].numpy()  # the first window: the image at the start, zeros after it (padded at the end)
    np.testing.assert_array_equal(first[:, :2], img[0, :8])
    assert not first[:, 2:].any()
    # a structure the case does not label (classes <= 0.5) scores NaN
    out = loop.validate(net, [{"image": img, "label": lab, "classes": [1.0, 0.5, 1.0]}], 3, (8, 4, 4), (1, 1, 1),
                        torch.device("cpu"), False)
    assert np.isnan(out[0, 0]) and out[0, 1] == got[0, 1]
    # amp: bfloat16 autocast
    net.seen.clear()
    loop.validate(net, [{"image": img, "label": lab}], 3, (8, 4, 4), (1, 1, 1), torch.device("cpu"), True)
    assert net.seen[0][2] is True and net.seen[0][3] == torch.bfloat16
    # no cases: an empty (0, n_classes - 1) array
    empty = loop.validate(net, [], 3, (8, 4, 4), (1, 1, 1), torch.device("cpu"), False)
    assert empty.shape == (0, 2)


class _WindowNet(torch.nn.Module):
    """Class 1 everywhere in the window that starts at the image's first voxel, class 2 in the others."""

    def forward(self, x):
        first = (x[:, 0, 0, 0, 0] == 5.0).float()[:, None, None, None]
        ones = torch.ones_like(x[:, 0])
        return torch.stack([0 * ones, ones * first, ones * (1 - first)], 1)


def test_validate_blends_windows_with_gaussian_weights():
    import legcomp.training.loop as loop

    img = np.zeros((1, 12, 4, 4), np.float32)
    img[0, 0] = 5.0
    lab = np.ones((1, 12, 4, 4), np.uint8)
    lab[0, 8:] = 2
    got = loop.validate(_WindowNet(), [{"image": img, "label": lab}], 3, (8, 4, 4), (1, 1, 1),
                        torch.device("cpu"), False)
    # windows x 0-7 (class 1) and 4-11 (class 2): plain averaging would tie in 4-7 and give class 1 there
    # (DSC 1, 1); the Gaussian weights let the second window win near its centre
    assert got[0, 0] < 1.0 and got[0, 1] < 1.0


def _train_messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("legcomp.training")]


def test_init_weights_checks_and_log_lines(tmp_path, caplog):
    import logging

    from legcomp.models import save_weights

    write_toy_cohort(tmp_path / "data", 1, shape=(32, 16, 4))
    kw = dict(stage=1, region="thigh", folds=1, config="tiny", epochs=1, iters_per_epoch=1, batch=1,
              patch=(16, 16, 4), working_spacing=None, progress=False, device="cpu", lr=0.0)
    w = tmp_path / "w"
    save_weights(w / "calf.pt", build_network("tiny", 2, 3), config="tiny", region="calf", stage=1)
    n2 = anatomy.n_classes(2, "thigh")
    save_weights(w / "s2.pt", build_network("tiny", 2, n2), config="tiny", region="thigh", stage=2, in_channels=2)
    save_weights(w / "fast.pt", build_network("fast", 2, 3), config="fast", region="thigh", stage=1)
    save_weights(w / "ch3.pt", build_network("tiny", 3, 3), config="tiny", region="thigh", stage=1, in_channels=3)
    save_weights(w / "ok.pt", build_network("tiny", 2, 3), config="tiny", region="thigh", stage=1)
    with pytest.raises(LegcompInputError, match="weights are for region calf, not thigh"):
        train(tmp_path / "data", out=tmp_path / "o1", init_weights=w / "calf.pt", **kw)
    with pytest.raises(LegcompInputError, match="weights are for stage 2, not stage 1"):
        train(tmp_path / "data", out=tmp_path / "o2", init_weights=w / "s2.pt", **kw)
    for name in ("fast.pt", "ch3.pt"):
        with pytest.raises(LegcompInputError) as exc:
            train(tmp_path / "data", out=tmp_path / "o3", init_weights=w / name, **kw)
        assert str(exc.value) == f"{w / name}: initial weights have another network config or input channels"
    caplog.set_level(logging.INFO, logger="legcomp.training")
    caplog.clear()
    train(tmp_path / "data", out=tmp_path / "o4", init_weights=w / "ok.pt", **kw)  # no normalisation recorded
    msgs = _train_messages(caplog)
    assert f"thigh_stage1: initialised from {w / 'ok.pt'}" in msgs
    assert ("the initial weights were trained with the in_phase_percentile normalisation; fine-tuning with "
            "fat_reference") in msgs
    caplog.clear()
    train(tmp_path / "data", out=tmp_path / "o5", init_weights=w / "ok.pt", normalisation="in_phase_percentile", **kw)
    msgs = _train_messages(caplog)
    assert f"thigh_stage1: initialised from {w / 'ok.pt'}" in msgs
    assert not [m for m in msgs if "initial weights were trained" in m]


def test_resume_with_another_keep_recopies_that_candidate(tmp_path, caplog):
    import logging
    import pickle
    from pathlib import PurePosixPath

    from legcomp.training import provenance as P

    write_toy_cohort(tmp_path / "data", 3, shape=(32, 16, 4))
    out = tmp_path / "m"
    kw = dict(stage=1, region="thigh", out=out, folds=3, fold=0, config="tiny", epochs=2, iters_per_epoch=1,
              batch=1, patch=(16, 16, 4), working_spacing=None, progress=False, seed=1, device="cpu")
    s1 = train(tmp_path / "data", keep="last", **kw)
    assert s1["kept_epoch"] == 2
    best = out / "thigh_stage1.best_fold.pt"
    prov = P.read_provenance(best)
    assert prov["keep"] == "last" and prov["weights"]["selection"] == "best-fold"
    P.write_provenance(best, {**prov, "weights": {**prov["weights"], "epoch": 1}})  # as if epoch 1 was best
    caplog.set_level(logging.INFO, logger="legcomp.training")
    caplog.clear()
    s2 = train(tmp_path / "data", keep="best-fold", **kw)  # nothing left to train: only the kept file changes
    ck = out / "thigh_stage1.checkpoint.pt"
    assert f"thigh_stage1: resumed from {ck} at epoch 3" in _train_messages(caplog)
    assert s2["stop_reason"] == "already complete" and s2["keep"] == "best-fold" and s2["kept_epoch"] == 1
    kept = P.read_provenance(out / "thigh_stage1.pt")
    assert kept["keep"] == "best-fold" and kept["weights"]["selection"] == "best-fold"
    assert kept["weights"]["epoch"] == 1
    assert (out / "thigh_stage1.pt").read_bytes() == best.read_bytes()
    with pytest.raises(LegcompInputError) as exc:
        train(tmp_path / "data", **{**kw, "fold": 1})
    assert str(exc.value) == (f"{ck}: checkpoint belongs to another run (stage/region/fold/seed/config/"
                              "normalisation); use another --out or --no-resume")
    # the checkpoint is read with weights_only: it cannot smuggle in arbitrary objects
    blob = torch.load(ck, weights_only=True)
    torch.save({**blob, "extra": PurePosixPath("x")}, ck)
    with pytest.raises(pickle.UnpicklingError):
        train(tmp_path / "data", **kw)


def test_resume_with_fewer_sources_restarts_the_draw_counts(tmp_path):
    write_toy_cohort(tmp_path / "a", 1, shape=(32, 16, 4))
    write_toy_cohort(tmp_path / "b", 1, shape=(32, 16, 4), seed=3)
    out = tmp_path / "m"
    kw = dict(stage=1, region="thigh", out=out, folds=1, config="tiny", iters_per_epoch=2, batch=1,
              patch=(16, 16, 4), working_spacing=None, progress=False, device="cpu")
    train([tmp_path / "a", tmp_path / "b"], epochs=1, **kw)
    s = train([tmp_path / "a"], epochs=2, **kw)
    assert s["start_epoch"] == 1 and [src["draws"] for src in s["sources"]] == [2]
    state = json.loads(torch.load(out / "thigh_stage1.checkpoint.pt", weights_only=True)["state_json"])
    assert len(state["draws"]) == 1


def test_draws_per_source_add_up_over_a_resume(tmp_path):
    """The patches drawn per source, in the summary, provenance and checkpoint, count every run of a
    resumed training, as a straight run does (the checkpoint once held none of them)."""
    write_toy_cohort(tmp_path / "a", 1, shape=(32, 16, 4))
    write_toy_cohort(tmp_path / "b", 1, shape=(32, 16, 4), seed=3)
    kw = dict(stage=1, region="thigh", folds=1, config="tiny", iters_per_epoch=3, batch=2,
              patch=(16, 16, 4), working_spacing=None, progress=False, device="cpu")
    srcs = [(tmp_path / "a", 1.0), (tmp_path / "b", 2.0)]
    straight = train(srcs, out=tmp_path / "s", epochs=2, **kw)
    train(srcs, out=tmp_path / "r", epochs=1, **kw)
    ck = tmp_path / "r" / "thigh_stage1.checkpoint.pt"
    assert sum(json.loads(torch.load(ck, weights_only=True)["state_json"])["draws"]) == 6
    resumed = train(srcs, out=tmp_path / "r", epochs=2, **kw)
    draws = [src["draws"] for src in resumed["sources"]]
    assert resumed["start_epoch"] == 1 and sum(draws) == 12 == resumed["steps_total"] * 2
    assert draws == [src["draws"] for src in straight["sources"]]
    assert json.loads(torch.load(ck, weights_only=True)["state_json"])["draws"] == draws
    from legcomp.training import provenance as P

    prov = P.read_provenance(tmp_path / "r" / "thigh_stage1.pt")
    assert [src["draws"] for src in prov["sources"]] == draws

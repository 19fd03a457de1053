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
              patch=(16, 16, 4), working_spacing=None, progress=False, seed=5)
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


def test_train_stage2_all_folds_with_stage1_channel(tmp_path):
    write_toy_cohort(tmp_path / "data", 2, region="calf", shape=(32, 16, 4))
    s = train(tmp_path / "data", stage=2, region="calf", out=tmp_path / "m", folds=1, config="tiny", epochs=1,
              iters_per_epoch=2, batch=2, patch=(16, 16, 4), working_spacing=None, progress=False,
              with_stage1=True, loss="dicefocal")
    assert s["n_train_cases"] == 4 and s["n_val_cases"] == 0  # one case per leg
    model, meta = load_weights(tmp_path / "m" / "calf_stage2.pt", region="calf", stage=2)
    assert meta["in_channels"] == 3 and meta["with_stage1"] is True
    assert meta["channels"] == ["opposed_phase", "water", "stage1_muscle"]


def test_init_bundled_starts_from_the_bundled_weights(tmp_path):
    from legcomp.models import bundled_weights

    write_toy_cohort(tmp_path / "data", 1, region="thigh", shape=(64, 32, 4))
    s = train(tmp_path / "data", stage=2, region="thigh", out=tmp_path / "m", folds=1, config="fast", epochs=1,
              iters_per_epoch=1, batch=1, patch=(32, 32, 4), working_spacing=None, progress=False, lr=0.0,
              weight_decay=0.0, init_weights="bundled", augment=False)
    assert s["n_train_cases"] == 2
    tuned, meta = load_weights(tmp_path / "m" / "thigh_stage2.pt", region="thigh", stage=2)
    bundled, _ = load_weights(bundled_weights("thigh", 2), region="thigh", stage=2)
    for (k, a), b in zip(tuned.named_parameters(), bundled.parameters()):
        assert torch.equal(a, b), k  # lr 0: exactly the bundled weights came out (norm statistics move)


def test_bad_options(tmp_path):
    with pytest.raises(LegcompInputError, match="no studies"):
        train(tmp_path, stage=1, region="thigh", out=tmp_path / "o", progress=False)
    with pytest.raises(LegcompInputError, match="loss"):
        train(tmp_path, stage=1, region="thigh", out=tmp_path / "o", loss="mse")


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
              time_limit_min=1e-4)
    assert s["stop_reason"] == "time limit" and s["epochs_run"] == 1
    rows = list(csv.DictReader(open(tmp_path / "m" / "thigh_stage1.metrics.csv")))
    assert float(rows[0]["lr"]) < 1e-3  # decayed by the time used, not by epochs

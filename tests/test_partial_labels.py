"""Partial labels in training: IGNORE voxels, label records, the marginal loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.io import read_study, write_study
from legcomp.training import build_transforms, study_cases, train
from legcomp.training.losses import PartialLabelLoss
from legcomp.training.toy import write_toy_cohort

torch.set_num_threads(1)

NATIVE = (None, None, None)


def _logits_target(seed=0, shape=(2, 5, 6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    y = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    return x, y


def test_loss_equals_monai_when_everything_is_labelled():
    from monai.losses import DiceCELoss, DiceLoss, FocalLoss

    x, y = _logits_target()
    ref = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(x, y)
    assert abs(float(PartialLabelLoss("dicece")(x, y)) - float(ref)) < 1e-6
    assert abs(float(PartialLabelLoss("dicece")(x, y, torch.ones(2, 5))) - float(ref)) < 1e-6
    # dicefocal: the focal term is MONAI's softmax focal loss summed over classes (mean over voxels)
    ref_f = (DiceLoss(to_onehot_y=True, softmax=True, batch=True)(x, y)
             + FocalLoss(to_onehot_y=True, use_softmax=True)(x, y) * x.shape[1])
    assert abs(float(PartialLabelLoss("dicefocal")(x, y)) - float(ref_f)) < 1e-5


@pytest.mark.parametrize("kind", ["dicece", "dicefocal"])
def test_unlabelled_class_is_not_learnt_as_background(kind):
    # 3 classes; the target is background everywhere except a block of class 1; class 2 starts at p ~0.7
    # in the background region. Unlabelled class 2 keeps its probability, a labelled one loses it.
    target = torch.zeros(1, 1, 4, 4, 2, dtype=torch.long)
    target[..., :2, :, :] = 1
    bg = target[0, 0] == 0

    def run(classes):
        init = torch.zeros(1, 3, 4, 4, 2)
        init[:, 1] = -2.0
        init[:, 2] = float(np.log(0.7 * (1 + np.exp(-2.0)) / 0.3))
        init[:, 1][target[:, 0] == 1] = 3.0
        logits = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=0.1)
        fn = PartialLabelLoss(kind)
        for _ in range(100):
            opt.zero_grad()
            fn(logits, target, classes).backward()
            opt.step()
        return torch.softmax(logits.detach(), 1)[0, 2][bg]

    p0 = torch.softmax(torch.tensor([0.0, -2.0, float(np.log(0.7 * (1 + np.exp(-2.0)) / 0.3))]), 0)[2]
    assert abs(float(p0) - 0.7) < 1e-4
    assert float(run(torch.tensor([[1.0, 1.0, 0.0]])).min()) >= 0.5
    assert float(run(torch.tensor([[1.0, 1.0, 1.0]])).max()) < 0.1
    assert float(run(None).max()) < 0.1


@pytest.mark.parametrize("kind", ["dicece", "dicefocal"])
def test_ignore_voxels_do_not_contribute(kind):
    x, y = _logits_target(seed=1)
    ign = torch.zeros_like(y, dtype=torch.bool)
    ign[..., :2, :, :] = True
    y = torch.where(ign, torch.full_like(y, anatomy.IGNORE), y)
    classes = torch.tensor([[1.0, 1, 0, 1, 1], [1.0, 1, 1, 1, 1]])
    y[0][y[0] == 2] = 0  # sample 0 does not label class 2
    fn = PartialLabelLoss(kind)
    x1 = x.clone().requires_grad_(True)
    l1 = fn(x1, y, classes)
    l1.backward()
    mask = ign.expand_as(x)
    assert torch.isfinite(l1) and float(x1.grad[mask].abs().max()) == 0.0
    assert float(x1.grad[~mask].abs().max()) > 0
    x2 = torch.where(mask, torch.randn_like(x) * 10, x)
    assert abs(float(fn(x2, y, classes)) - float(l1.detach())) < 1e-6
    # nothing labelled at all: zero, finite
    assert float(fn(x, torch.full_like(y, anatomy.IGNORE), classes)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["dicece", "dicefocal"])
def test_unnamed_muscle_is_learnt_as_one_of_the_unlabelled_muscles(kind):
    # UNNAMED_MUSCLE voxels of a sample that lacks classes 2 and 3: their mass moves to 2 + 3 (however
    # split), away from background and the labelled class; in a sample labelling everything they are left out
    target = torch.zeros(1, 1, 4, 4, 2, dtype=torch.long)
    target[..., :2, :, :] = 1
    target[..., 3:, :, :] = anatomy.UNNAMED_MUSCLE
    un = target[0, 0] == anatomy.UNNAMED_MUSCLE
    lacks = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    fn = PartialLabelLoss(kind)

    logits = torch.zeros(1, 4, 4, 4, 2, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        fn(logits, target, lacks).backward()
        opt.step()
    p = torch.softmax(logits.detach(), 1)[0]
    assert float((p[2] + p[3])[un].min()) > 0.9
    assert float(p[0][un].max()) < 0.05 and float(p[1][un].max()) < 0.05
    # the loss sees only the sum of the unlabelled classes' mass, not how it is split between them
    x = torch.randn(1, 4, 4, 4, 2)
    y = x.clone()
    y[:, 2], y[:, 3] = x[:, 3], x[:, 2]
    assert abs(float(fn(x, target, lacks)) - float(fn(y, target, lacks))) < 1e-6
    # every class labelled: the voxels are left out (as IGNORE)
    ign = torch.where(target == anatomy.UNNAMED_MUSCLE, torch.full_like(target, anatomy.IGNORE), target)
    assert abs(float(fn(x, target, torch.ones(1, 4))) - float(fn(x, ign, torch.ones(1, 4)))) < 1e-6
    # a batch mixing both kinds of sample keeps finite gradients
    xb = torch.randn(2, 4, 4, 4, 2, requires_grad=True)
    fn(xb, target.expand(2, -1, -1, -1, -1), torch.cat([lacks, torch.ones(1, 4)])).backward()
    assert torch.isfinite(xb.grad).all() and float(xb.grad[1][:, un].abs().max()) == 0.0


def _partial_study(tmp_path, record=None):
    p = write_toy_cohort(tmp_path, 1, shape=(32, 16, 4))[0]
    study = read_study(p)
    study.labels["stage1"][..., 0] = anatomy.IGNORE  # an unlabelled slice in both maps
    study.labels["stage2"][..., :2] = anatomy.IGNORE
    study.label_record = record if record is not None else {
        "source": "test", "stage2": {"unlabelled": ["adductor_longus", "gluteus_maximus"]}}
    out = tmp_path / "partial" / "thigh_partial"
    write_study(study, out)
    return out


def test_label_record_is_read_and_checked(tmp_path):
    folder = _partial_study(tmp_path)
    study = read_study(folder)
    assert study.label_record["stage2"]["unlabelled"] == ["adductor_longus", "gluteus_maximus"]
    assert (study.labels["stage2"][..., :2] == anatomy.IGNORE).all()
    assert read_study(write_toy_cohort(tmp_path / "plain", 1, shape=(32, 16, 4))[0]).label_record == {}
    rec = folder / anatomy.LABEL_RECORD
    rec.write_text("{not json")
    with pytest.raises(LegcompInputError, match=anatomy.LABEL_RECORD) as err:
        read_study(folder)
    assert "\n" not in str(err.value)
    rec.write_text(json.dumps({"stage2": {"unlabelled": ["soleus"]}}))  # a calf muscle in a thigh study
    with pytest.raises(LegcompInputError, match="soleus"):
        read_study(folder)
    rec.write_text(json.dumps({"stage1": {"unlabelled": "whole_muscle"}}))
    with pytest.raises(LegcompInputError, match=anatomy.LABEL_RECORD):
        read_study(folder)


def test_study_cases_keep_ignore_and_give_classes(tmp_path):
    study = read_study(_partial_study(tmp_path))
    n2 = anatomy.n_classes(2, "thigh")
    for spacing in (NATIVE, (1.5, 1.5, None)):  # native, and resampled (nearest) to the working grid
        (c1,) = study_cases(study, 1, "thigh", spacing=spacing)
        assert (c1["classes"] == 1).all() and c1["classes"].dtype == np.float32
        assert (c1["label"][0, ..., 0] == anatomy.IGNORE).all() and (c1["label"][0, ..., 1:] != anatomy.IGNORE).all()
        cases = study_cases(study, 2, "thigh", spacing=spacing)
        assert len(cases) == 2
        for c in cases:
            expect = np.ones(n2, np.float32)
            expect[[anatomy.label_by_name(n, "thigh").id for n in ("adductor_longus", "gluteus_maximus")]] = 0
            assert c["classes"].shape == (n2,) and np.array_equal(c["classes"], expect)
            lab = c["label"][0]
            assert (lab[..., :2] == anatomy.IGNORE).all()
            assert set(np.unique(lab[..., 2:])) - {0} and anatomy.IGNORE not in lab[..., 2:]


def test_transforms_carry_classes_and_never_centre_on_ignore():
    from monai.data import set_track_meta

    lab = np.zeros((1, 12, 10, 4), np.uint8)
    lab[0, 2:5, 2:5] = 1
    lab[0, 6:10, 5:9] = 2
    lab[0, :, :, 0] = anatomy.IGNORE
    case = {"image": np.random.default_rng(0).random((2, 12, 10, 4), dtype=np.float32), "label": lab,
            "classes": np.array([1, 1, 1, 0], np.float32)}
    set_track_meta(False)
    try:
        det, rnd = build_transforms(2, 4, (8, 8, 4))
        rnd.set_random_state(seed=0)
        d = det(case)
        flat = lab.reshape(-1)
        for c, idx in enumerate(d["label_cls_indices"]):
            assert (flat[np.asarray(idx)] == c).all()  # IGNORE voxels are no class's index
        for _ in range(5):
            out = rnd(d)
            item = out[0] if isinstance(out, list) else out
            assert set(item) == {"image", "label", "classes"}
            assert np.array_equal(np.asarray(item["classes"]), case["classes"])
            assert set(np.unique(np.asarray(item["label"]))) <= {0, 1, 2, anatomy.IGNORE}
    finally:
        set_track_meta(True)


def test_train_with_a_label_record(tmp_path):
    from legcomp.training.loop import validate

    paths = write_toy_cohort(tmp_path / "data", 2, shape=(32, 16, 4))
    for p in paths:
        (p / anatomy.LABEL_RECORD).write_text(json.dumps({"stage2": {"unlabelled": ["vastus_medialis"]}}))
    s = train(tmp_path / "data", stage=2, region="thigh", out=tmp_path / "m", folds=2, fold=0, config="tiny",
              epochs=1, iters_per_epoch=2, batch=2, patch=(16, 16, 4), working_spacing=None, progress=False,
              device="cpu")
    assert s["steps"] == 2 and s["n_val_cases"] == 2
    # vastus_medialis (in the toy maps, but recorded as unlabelled) gets no validation DSC
    assert s["best_val_dsc"]["vastus_medialis"] is None
    # validate: IGNORE voxels left out, unlabelled classes NaN
    from legcomp.models import build_network

    model = build_network("tiny", 2, anatomy.n_classes(2, "thigh"))
    study = read_study(paths[0])
    cases = study_cases(study, 2, "thigh", spacing=NATIVE)
    rows = validate(model, cases, anatomy.n_classes(2, "thigh"), (16, 16, 4), (16, 16, 4), torch.device("cpu"), False)
    vm = anatomy.label_by_name("vastus_medialis", "thigh").id
    assert np.isnan(rows[:, vm - 1]).all()

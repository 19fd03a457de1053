"""``legcomp.cli.main``: each sub-command's exit code (0 done, 1 some studies of a cohort failed, 2 bad input
with one stderr line naming the file, 130 interrupted), on tiny phantoms."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from legcomp import anatomy, cli
from legcomp.cli import main
from legcomp.models import build_network, save_weights
from legcomp.phantom import generate, write_phantom
from legcomp.training.toy import write_toy_cohort

torch.set_num_threads(1)

TINY_PHANTOM = dict(matrix=(48, 32, 4), spacing=(9.0, 9.0, 9.0), supersample=1)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny labelled thigh phantom study folder (water, fat, stage1, stage2, legs)."""
    return write_phantom(generate("thigh", 1, **TINY_PHANTOM), tmp_path_factory.mktemp("cli") / "thigh_00001")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """Untrained tiny-config thigh weights (plumbing, not accuracy)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    for stage in (1, 2):
        model = build_network("tiny", 2, anatomy.n_classes(stage, "thigh"))
        save_weights(folder / f"thigh_stage{stage}.pt", model, config="tiny", region="thigh", stage=stage,
                     patch_size=[32, 32, 8], working_spacing=[None, None, None])
    return folder


def _one_error_line(capsys, name: str) -> str:
    """stderr is exactly one line, ``legcomp: error: ...`` naming ``name``."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("legcomp: error: ") and name in err, err
    return err


def test_labels_and_info(tmp_path, study, capsys):
    assert main(["labels", "--region", "thigh", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(anatomy.labels("thigh"))
    assert main(["info", str(study), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["region"] == "thigh" and info["shape"] == [48, 32, 4]
    # bad input: 2 and one line naming the file
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["labels", "--region", "thigh", "--itksnap", str(blocker / "sub")]) == 2
    _one_error_line(capsys, str(blocker))
    bad = tmp_path / "thigh_bad"
    bad.mkdir()
    (bad / "water.nii.gz").write_bytes(b"not a nifti")
    (bad / "fat.nii.gz").write_bytes((study / "fat.nii.gz").read_bytes())
    assert main(["info", str(bad)]) == 2
    _one_error_line(capsys, str(bad / "water.nii.gz"))


def test_phantom(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantom", "--region", "calf", "--n", "1", "--seed", "4", "--out", str(out), "--matrix", "48,32,4",
                 "--spacing", "9,9,9", "--quiet"]) == 0
    assert (out / "calf_00004" / "water.nii.gz").is_file() and (out / "calf_00004" / "truth.json").is_file()
    capsys.readouterr()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["phantom", "--region", "calf", "--out", str(blocker), "--matrix", "48,32,4", "--spacing", "9,9,9",
                 "--quiet"]) == 2
    _one_error_line(capsys, str(blocker))
    assert main(["phantom", "--region", "knee", "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "knee")


def test_quantify(tmp_path, study, capsys):
    out = tmp_path / "q"
    assert main(["quantify", str(study), "--out", str(out), "--quiet"]) == 0
    table = pd.read_csv(out / "volumes.csv")
    assert set(table["leg"]) == {"left", "right", "total"}
    capsys.readouterr()
    broken = tmp_path / "broken_stage1.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    assert main(["quantify", str(study), "--stage1", str(broken), "--out", str(tmp_path / "q2"), "--quiet"]) == 2
    _one_error_line(capsys, str(broken))
    assert not (tmp_path / "q2").exists()
    assert main(["quantify", str(tmp_path / "missing"), "--out", str(tmp_path / "q3")]) == 2
    _one_error_line(capsys, str(tmp_path / "missing"))


def test_evaluate(tmp_path, study, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", "--pred", str(study), "--truth", str(study), "--out", str(out)]) == 0
    dsc = pd.read_csv(out / "metrics.csv").query("metric == 'dsc'")["value"].dropna()  # NaN: absent in both
    assert len(dsc) > 10 and (dsc == 1.0).all()  # the labels against themselves
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(study), "--truth", str(tmp_path / "nowhere")]) == 2
    _one_error_line(capsys, str(tmp_path / "nowhere"))
    # a cohort in which one subject has no reference: 1, the other is evaluated
    preds = tmp_path / "preds"
    for name in ("thigh_00001", "thigh_00002"):
        (preds / name).mkdir(parents=True)
        for f in ("stage1.nii.gz", "stage2.nii.gz"):
            (preds / name / f).write_bytes((study / f).read_bytes())
    truths = tmp_path / "truths"
    truths.mkdir()
    (truths / "thigh_00001").symlink_to(study)
    assert main(["evaluate", "--pred", str(preds), "--truth", str(truths), "--out", str(tmp_path / "ev2")]) == 1
    assert set(pd.read_csv(tmp_path / "ev2" / "metrics.csv")["subject"]) == {"thigh_00001"}


def test_train(tmp_path, capsys):
    write_toy_cohort(tmp_path / "data", 1, shape=(32, 16, 4))
    args = ["train", "--stage", "1", "--region", "thigh", "--config", "tiny", "--epochs", "1", "--iters", "1",
            "--folds", "1", "--batch", "1", "--patch", "16", "16", "4", "--working-spacing", "0", "0",
            "--no-progress", "--no-cache", "--device", "cpu"]
    assert main([*args, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "thigh_stage1.pt").is_file()
    capsys.readouterr()
    assert main([*args, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # one error line naming the folder (a shell also shows train's first log line on stderr; pytest catches it)
    assert [e for e in err if e.startswith("legcomp: error:")] == err and len(err) == 1
    assert str(tmp_path / "empty") in err[0]


def test_run_cohort_with_one_broken_study_exits_1(tmp_path, study, tiny_weights, capsys):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "thigh_good").symlink_to(study)
    bad = cohort / "thigh_broken"
    bad.mkdir()
    (bad / "water.nii.gz").write_bytes((study / "water.nii.gz").read_bytes())
    (bad / "fat.nii.gz").write_bytes(b"truncated")
    out = tmp_path / "out"
    assert main(["run", str(cohort), "--out", str(out), "--weights", str(tiny_weights), "--device", "cpu",
                 "--quiet", "--no-overlay"]) == 1
    assert (out / "thigh_good" / "stage1.nii.gz").is_file() and not (out / "thigh_broken").exists()
    fails = pd.read_csv(out / "failures.csv")
    assert list(fails["study"]) == [str(bad)] and str(bad / "fat.nii.gz") in fails["error"][0]
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("legcomp: error:")]
    assert len(err) == 1 and str(bad / "fat.nii.gz") in err[0]
    # the same broken study alone: bad input, 2
    assert main(["run", str(bad), "--out", str(tmp_path / "o2"), "--weights", str(tiny_weights), "--device", "cpu",
                 "--quiet"]) == 2
    _one_error_line(capsys, str(bad / "fat.nii.gz"))


@pytest.mark.parametrize("command,argv", [
    ("cmd_info", ["info", "somewhere"]),
    ("cmd_run", ["run", "somewhere", "--out", "elsewhere"]),
    ("cmd_train", ["train", "--data", "d", "--stage", "1", "--region", "thigh", "--out", "o"]),
])
def test_keyboard_interrupt_exits_130(monkeypatch, capsys, command, argv):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, command, interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == "legcomp: interrupted"

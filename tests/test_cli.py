"""``legcomp.cli.main``: each sub-command's exit code (0 done, 1 some studies of a cohort failed, 2 bad input
with one stderr line naming the file, 130 interrupted), on tiny phantoms."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from legcomp import anatomy, cli
from legcomp.cli import main
from legcomp.phantom import generate, write_phantom
from legcomp.training.toy import write_toy_cohort

torch.set_num_threads(1)

TINY_PHANTOM = dict(matrix=(48, 32, 4), spacing=(9.0, 9.0, 9.0), supersample=1)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny labelled thigh phantom study folder (water, fat, stage1, stage2, legs)."""
    return write_phantom(generate("thigh", 1, **TINY_PHANTOM), tmp_path_factory.mktemp("cli") / "thigh_00001")


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


def test_closed_stdout_is_not_an_error(monkeypatch, capsys):
    """``legcomp labels | head -2``: the reader goes away; no "error: Broken pipe", exit code 0."""
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["labels"]) == 0
    assert capsys.readouterr().err == ""


def test_closed_stdout_in_a_real_pipe():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import sys; from legcomp.cli import main; sys.exit(main())",
                             "labels"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like head after its lines: closed before legcomp writes (it is still importing)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Broken pipe" not in err and "Error" not in err, err


def test_usage_errors_are_one_line_and_choices_are_checked(capsys):
    assert main(["run", "x", "--out", "y", "--region", "knee"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("legcomp: error: argument --region: invalid choice: 'knee'"), err
    assert main(["predict", "x", "--out", "y", "--region", "calf", "--device", "tpu9"]) == 2  # choices pass
    assert "tpu9" in capsys.readouterr().err
    assert main(["--version"]) == 0


@pytest.mark.parametrize("command,options", [("train", ["--epochs", "--lr"]), ("quantify", ["--quiet"]),
                                             ("run", ["--overwrite", "--keep-ids"])])
def test_every_option_has_help(capsys, command, options):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
    bare = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
    assert bare == [] and all(o in text for o in options)


def test_phantom_without_region_makes_both(tmp_path, capsys):
    assert main(["phantom", "--n", "1", "--out", str(tmp_path / "ph"), "--matrix", "48,32,4", "--spacing",
                 "9,9,9", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "ph").iterdir()) == ["calf_00000", "thigh_00000"]
    assert "no --region: making 1 of each region" in capsys.readouterr().err


def test_evaluate_mapping_leaves_unlabelled_structures_out(tmp_path, study, capsys):
    """A reference in foreign ids without sartorius and gracilis: those are not applicable (no DSC 0 in the
    means), and the summary says so."""
    import nibabel as nib
    import numpy as np

    truth = tmp_path / "ref" / "thigh_00001"
    truth.mkdir(parents=True)
    for f in ("water.nii.gz", "fat.nii.gz"):
        (truth / f).write_bytes((study / f).read_bytes())
    img = nib.load(str(study / "stage2.nii.gz"))
    s2 = np.asarray(img.dataobj).astype(np.int16)
    left_out = {"sartorius", "gracilis"}
    mapping = {}
    foreign = np.zeros_like(s2)
    for lab in anatomy.stage_labels(2, "thigh"):
        if lab.name not in left_out:
            foreign[s2 == lab.id] = lab.id + 100
            mapping[str(lab.id + 100)] = lab.name
    nib.save(nib.Nifti1Image(foreign, img.affine), str(truth / "reference_labels.nii.gz"))
    (tmp_path / "ids.json").write_text(json.dumps({"region": "thigh", "map": mapping}))
    assert (s2 == anatomy.label_by_name("sartorius", "thigh").id).any()  # predicted, but not in the reference
    out = tmp_path / "ev"
    assert main(["evaluate", "--pred", str(study), "--truth", str(truth), "--mapping", str(tmp_path / "ids.json"),
                 "--out", str(out)]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert not set(metrics["structure"]) & left_out
    dsc = metrics.query("metric == 'dsc'")["value"].dropna()
    assert len(dsc) > 5 and (dsc == 1.0).all()
    note = "Not labelled by the reference, left out of the means (not applicable, not DSC 0): gracilis, sartorius"
    assert note in (out / "summary.md").read_text() and note in capsys.readouterr().out


def test_sigterm_exits_143_and_the_handler_is_put_back(monkeypatch, capsys):
    import os
    import signal

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)  # a batch scheduler's time limit
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "cmd_info", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info", "somewhere"]) == 143
    assert capsys.readouterr().err.strip() == "legcomp: interrupted (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) == before

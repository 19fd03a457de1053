"""The main job end to end: cascade, output geometry, cohorts, failures, weights errors, region detection."""

import json
import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from legcomp import anatomy
from legcomp.cli import main
from legcomp.inference import Cascade, default_weights_dir
from legcomp.io import read_label_map, read_study
from legcomp.models import build_network, save_weights
from legcomp.phantom import generate, write_phantom
from legcomp.preprocessing.legs import leg_map

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
TINY = dict(matrix=(96, 64, 12), spacing=(4.0, 4.0, 8.0))


@pytest.fixture(scope="module")
def thigh_case(tmp_path_factory):
    return write_phantom(generate("thigh", 7, **TINY), tmp_path_factory.mktemp("ph") / "thigh_00007")


def _reoriented_copy(src: Path, dst: Path) -> np.ndarray:
    """Copy a study with its axes permuted and flipped (an LPS-like, non-diagonal affine)."""
    dst.mkdir(parents=True)
    for name in ("water", "fat"):
        img = nib.load(str(src / f"{name}.nii.gz"))
        ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("PLS"))
        data = nib.orientations.apply_orientation(img.get_fdata(dtype=np.float32), ornt)
        affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
        assert nib.aff2axcodes(affine) == ("P", "L", "S")
        nib.save(nib.Nifti1Image(data, affine), str(dst / f"{name}.nii.gz"))
    return affine


def test_run_writes_everything_in_input_geometry(tmp_path, thigh_case, tiny_weights):
    case = tmp_path / "thigh_lps"
    affine = _reoriented_copy(thigh_case, case)
    assert main(["run", str(case), "--out", str(tmp_path / "out"), "--weights", str(tiny_weights),
                 "--quiet", "--device", "cpu"]) == 0
    out = tmp_path / "out"
    for f in ("stage1.nii.gz", "stage2.nii.gz", "volumes.csv", "volumes.json", "mat.nii.gz", "overlay.png", "run.json"):
        assert (out / f).is_file(), f
    s1 = nib.load(str(out / "stage1.nii.gz"))
    water = nib.load(str(case / "water.nii.gz"))
    assert s1.shape == water.shape and np.allclose(s1.affine, affine)
    table = pd.read_csv(out / "volumes.csv")
    assert {"subject", "region", "leg", "structure", "measure", "value", "unit"} <= set(table.columns)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left


def test_cascade_is_deterministic_and_consistent(thigh_case, tiny_weights):
    study = read_study(thigh_case)
    cascade = Cascade.load("thigh", tiny_weights, "cpu")
    a1, a2 = cascade.predict(study)
    b1, b2 = cascade.predict(study)
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
    assert a1.shape == a2.shape == study.shape
    assert not (a2 > 0)[a1 != anatomy.WHOLE_MUSCLE.id].any()  # muscles only inside stage-1 whole muscle
    assert a2.max() <= len(anatomy.THIGH_MUSCLES)


def test_cascade_uses_the_normalisation_its_weights_record(tmp_path, thigh_case, tiny_weights, monkeypatch):
    from legcomp.preprocessing import inputs as prep

    study = read_study(thigh_case)
    seen = []
    real_scale = prep.intensity_scale
    monkeypatch.setattr(prep, "intensity_scale", lambda st, method="fat_reference": seen.append(
        method if isinstance(method, str) else method["method"]) or real_scale(st, method))
    Cascade.load("thigh", tiny_weights, "cpu").predict(study)  # weights recording no method: the old one
    assert seen == ["in_phase_percentile"] * 2
    wdir = tmp_path / "w"
    wdir.mkdir()
    torch.manual_seed(0)  # untrained networks: the same ones whatever ran before (stage 2 runs only on muscle)
    for stage in (1, 2):
        model = build_network("tiny", 2, anatomy.n_classes(stage, "thigh"))
        save_weights(wdir / f"thigh_stage{stage}.pt", model, config="tiny", region="thigh", stage=stage,
                     patch_size=[32, 32, 8], working_spacing=[None, None, None],
                     normalisation=prep.normalisation_spec("fat_reference"))
    seen.clear()
    Cascade.load("thigh", wdir, "cpu").predict(study)
    assert seen == ["fat_reference"] * 2


def test_stage2_mirrors_left_leg_probabilities(thigh_case, tiny_weights):
    """A stub stage-2 network that calls the low-x half of every crop muscle 1 and the rest muscle 2:
    the left leg's crop is mirrored in and its probabilities mirrored back."""
    from legcomp.inference.cascade import Network
    from legcomp.preprocessing.legs import leg_map

    class HalfAndHalf(Network):
        def probabilities(self, image, progress=False):
            n = int(self.meta["n_classes"])
            prob = np.zeros((n, *image.shape[1:]), np.float32)
            half = image.shape[1] // 2
            prob[1, :half], prob[2, half:] = 1.0, 1.0
            return prob

    study = read_study(thigh_case)
    cascade = Cascade.load("thigh", tiny_weights, "cpu")
    cascade.stage2 = HalfAndHalf(cascade.stage2.model, cascade.stage2.meta, cascade.stage2.device)
    s1 = study.labels["stage1"]
    s2 = cascade.predict_stage2(study, s1)
    assert set(np.unique(s2)) == {0, 1, 2} and not s2[s1 != anatomy.WHOLE_MUSCLE.id].any()
    legs = leg_map(s1 > 0, study.affine)
    for leg_id, leg in anatomy.LEGS.items():
        xs = {k: np.argwhere((s2 == k) & (legs == leg_id))[:, 0].mean() for k in (1, 2)}
        # the right leg's crop goes in as it is (muscle 1 at low x), the left leg's mirrored (at high x)
        assert (xs[1] < xs[2]) == (leg == "right"), leg


def test_cohort_goes_on_past_a_bad_study(tmp_path, thigh_case, tiny_weights):
    cohort = tmp_path / "cohort"
    write_phantom(generate("calf", 3, **TINY), cohort / "calf_00003")
    bad = cohort / "thigh_bad"
    bad.mkdir(parents=True)
    (bad / "water.nii.gz").write_bytes((thigh_case / "water.nii.gz").read_bytes())
    out = tmp_path / "out"
    code = main(["run", str(cohort), "--out", str(out), "--weights", str(tiny_weights), "--quiet", "--device", "cpu"])
    assert code == 1
    assert (out / "calf_00003" / "stage2.nii.gz").is_file()
    assert not (out / "thigh_bad").exists()
    fails = pd.read_csv(out / "failures.csv")
    assert len(fails) == 1 and "no fat image" in fails.loc[0, "error"]
    assert set(pd.read_csv(out / "cohort_volumes.csv")["region"]) == {"calf"}


def test_bad_weights_give_one_line_and_exit_2(tmp_path, thigh_case, tiny_weights, capsys):
    wdir = tmp_path / "w"
    wdir.mkdir()
    (wdir / "thigh_stage1.pt").write_bytes(b"not a torch file at all")
    (wdir / "thigh_stage2.pt").write_bytes((tiny_weights / "thigh_stage2.pt").read_bytes())
    out = tmp_path / "out"
    assert main(["run", str(thigh_case), "--out", str(out), "--weights", str(wdir), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "thigh_stage1.pt" in err
    assert not out.exists()
    # weights of the wrong region under the right name
    (wdir / "thigh_stage1.pt").write_bytes((tiny_weights / "calf_stage1.pt").read_bytes())
    assert main(["run", str(thigh_case), "--out", str(out), "--weights", str(wdir), "--quiet", "--device", "cpu"]) == 2
    assert "region calf" in capsys.readouterr().err
    assert main(["run", str(thigh_case), "--out", str(out), "--region", "knee", "--quiet", "--device", "cpu"]) == 2


def test_weights_folder_with_one_network_takes_the_other_bundled(tmp_path, tiny_weights, thigh_case, capsys):
    from legcomp.inference.cascade import cascade_paths
    from legcomp.errors import LegcompInputError

    wdir = tmp_path / "w"
    wdir.mkdir()
    with pytest.raises(LegcompInputError, match="no weights for thigh stage 1"):
        cascade_paths("thigh", wdir)  # neither network: a wrong folder, not a fallback
    (wdir / "thigh_stage2.pt").write_bytes((tiny_weights / "thigh_stage2.pt").read_bytes())
    paths = cascade_paths("thigh", wdir)
    assert paths[2] == wdir / "thigh_stage2.pt" and paths[1] == default_weights_dir() / "thigh_stage1.pt"
    cascade = Cascade.load("thigh", wdir, "cpu")
    assert cascade.sources[1].endswith("thigh_stage1.pt") and str(wdir) in cascade.sources[2]
    assert cascade.stage2.meta["config"] != cascade.stage1.meta["config"]  # tiny stage 2, bundled stage 1
    assert cascade_paths("thigh", tiny_weights) == {s: tiny_weights / f"thigh_stage{s}.pt" for s in (1, 2)}
    capsys.readouterr()
    assert main(["predict", str(thigh_case), "--out", str(tmp_path / "o"), "--weights", str(wdir), "--quiet",
                 "--device", "cpu"]) == 0
    assert "thigh stage 1: none in" in capsys.readouterr().err  # the user is told


@pytest.mark.skipif(not (REALDATA / "qmritools_calf").is_dir(), reason="../shared/realdata not present")
@pytest.mark.skipif(not (default_weights_dir() / "calf_stage1.pt").is_file(), reason="bundled weights missing")
def test_bundled_weights_on_real_calf(tmp_path):
    src = REALDATA / "qmritools_calf"
    out = tmp_path / "calf"
    assert main(["run", str(src), "--out", str(out), "--quiet", "--no-overlay", "--device", "cpu"]) == 0
    s1 = nib.load(str(out / "stage1.nii.gz"))
    water = nib.load(str(src / "water.nii.gz"))
    assert s1.shape == water.shape and np.allclose(s1.affine, water.affine)
    lab = np.asarray(s1.dataobj)
    assert (lab == 2).sum() > 0.3 * (lab > 0).sum()  # mostly muscle in a healthy calf
    table = pd.read_csv(out / "volumes.csv")
    legs = set(table["leg"])
    assert {"left", "right"} <= legs
    # the leg named right is the one lying towards world +x (RAS: the subject's right), judged from
    # the raw file with nibabel alone, not through legcomp's reader
    raw = nib.load(str(src / "water.nii.gz"))
    data = np.asarray(raw.dataobj, np.float32)
    comps, n = ndimage.label(data > 0.1 * np.percentile(data, 99.9))
    sizes = ndimage.sum(np.ones_like(data), comps, range(1, n + 1))
    big = [int(i) + 1 for i in np.argsort(sizes)[-2:]]
    centres = [raw.affine @ [*ndimage.center_of_mass(comps == c), 1.0] for c in big]
    study = read_study(src)
    legs_map = leg_map(read_label_map(out / "stage1.nii.gz", study) > 0, study.affine)
    inv = np.linalg.inv(study.affine)
    names = {}
    for c in centres:
        ijk = np.round(inv @ c)[:3].astype(int)
        names[anatomy.LEGS[int(legs_map[tuple(ijk)])]] = c[0]
    assert set(names) == {"left", "right"} and names["right"] > names["left"]


def test_rerun_into_same_folder_leaves_no_stale_files(tmp_path, thigh_case, tiny_weights):
    out = tmp_path / "out"
    assert main(["run", str(thigh_case), "--out", str(out), "--weights", str(tiny_weights),
                 "--quiet", "--device", "cpu"]) == 0
    assert (out / "overlay.png").is_file() and (out / "volumes.csv").is_file()
    assert main(["predict", str(thigh_case), "--out", str(out), "--weights", str(tiny_weights),
                 "--quiet", "--device", "cpu"]) == 0
    assert (out / "stage2.nii.gz").is_file()
    assert not (out / "overlay.png").exists() and not (out / "volumes.csv").exists()


def test_single_leg_runs(tmp_path, tiny_weights):
    case = write_phantom(generate("calf", 5, legs="left", matrix=(64, 64, 12), spacing=(4.0, 4.0, 8.0)),
                         tmp_path / "calf_00005")
    study = read_study(case)
    s1, s2 = Cascade.load("calf", tiny_weights, "cpu").predict(study)
    assert s1.shape == s2.shape == study.shape


def test_bad_device_is_an_input_error(thigh_case, tmp_path, capsys):
    assert main(["run", str(thigh_case), "--out", str(tmp_path / "o"), "--device", "tpu9", "--quiet"]) == 2
    assert "device" in capsys.readouterr().err


# --------------------------------------------------------------------------- cohorts: re-runs, interrupts, names
TINY_FAST = dict(matrix=(48, 32, 4), spacing=(9.0, 9.0, 9.0), supersample=1)


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """Three tiny labelled thigh phantoms (a cohort folder); copy it before changing it."""
    root = tmp_path_factory.mktemp("tiny") / "cohort"
    for seed in (1, 2, 3):
        write_phantom(generate("thigh", seed, **TINY_FAST), root / f"thigh_{seed:05d}")
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _run(cohort, out, weights, *extra):
    return main(["run", str(cohort), "--out", str(out), "--weights", str(weights), "--quiet", "--no-overlay",
                 "--device", "cpu", *extra])


def _no_temporary_folders(root: Path) -> None:
    left = [p for p in root.rglob("*") if p.name.startswith((".legcomp-tmp", ".cohort")) or ".tmp" in p.name]
    assert not left, left


def test_rerun_skips_studies_done_from_the_same_inputs_weights_and_options(tmp_path, tiny_cohort, stub_cascade,
                                                                          capsys):
    cohort, out = _copy(tiny_cohort, tmp_path / "cohort"), tmp_path / "out"
    assert _run(cohort, out, stub_cascade.weights) == 0
    assert len(stub_cascade.calls) == 3
    fp = json.loads((out / "thigh_00001" / "run.json").read_text())["fingerprint"]
    assert set(fp) == {"inputs", "options", "weights"} and fp["options"]["fat_rule"] == "seed"
    first = (out / "cohort_volumes.csv").read_text()
    stub_cascade.calls.clear()
    capsys.readouterr()
    assert _run(cohort, out, stub_cascade.weights) == 0
    assert stub_cascade.calls == []  # nothing recomputed
    assert "3 up to date, skipped" in capsys.readouterr().out
    assert (out / "cohort_volumes.csv").read_text() == first  # the skipped studies' volumes are in it
    # a changed input, a missing output: only those studies again
    fat = cohort / "thigh_00002" / "fat.nii.gz"
    img = nib.load(str(fat))
    nib.save(nib.Nifti1Image(img.get_fdata() * 1.01, img.affine), str(fat))
    (out / "thigh_00003" / "volumes.json").unlink()
    assert _run(cohort, out, stub_cascade.weights) == 0
    assert sorted(stub_cascade.calls) == ["thigh_00002", "thigh_00003"]
    # another option, other weights, or --overwrite: all again
    for extra, weights in ((["--fat-rule", "ff:0.5"], stub_cascade.weights), ([], tmp_path / "w2"),
                           (["--overwrite"], tmp_path / "w2")):
        if weights != stub_cascade.weights and not weights.exists():
            _copy(stub_cascade.weights, weights)
            (weights / "thigh_stage2.pt").write_bytes(b"other stage-2 weights")
        stub_cascade.calls.clear()
        assert _run(cohort, out, weights, *extra) == 0
        assert len(stub_cascade.calls) == 3, extra
    _no_temporary_folders(tmp_path)


def test_single_study_rerun_is_skipped_too(tmp_path, tiny_cohort, stub_cascade, capsys):
    study, out = tiny_cohort / "thigh_00001", tmp_path / "out"
    assert _run(study, out, stub_cascade.weights) == 0
    assert _run(study, out, stub_cascade.weights) == 0
    assert len(stub_cascade.calls) == 1 and "up to date" in capsys.readouterr().out
    assert main(["predict", str(study), "--out", str(out), "--weights", str(stub_cascade.weights), "--quiet",
                 "--device", "cpu"]) == 0  # other options (no quantification): done again
    assert len(stub_cascade.calls) == 2


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_cohort_writes_its_tables_and_leaves_no_temporary_folder(tmp_path, tiny_cohort, stub_cascade,
                                                                            capsys, signum, code):
    """A batch scheduler's SIGTERM (or Ctrl-C) in the middle of the second study."""
    out = tmp_path / "out"
    stub_cascade.on_predict = lambda n: os.kill(os.getpid(), signum) if n == 2 else None
    assert _run(tiny_cohort, out, stub_cascade.weights) == code
    assert stub_cascade.calls == ["thigh_00001", "thigh_00002"]
    assert (out / "thigh_00001" / "run.json").is_file() and not (out / "thigh_00002").exists()
    assert set(pd.read_csv(out / "cohort_volumes.csv")["subject"]) == {"thigh_00001"}
    fails = pd.read_csv(out / "failures.csv")
    assert list(fails["study"]) == [str(tiny_cohort / "thigh_00002"), str(tiny_cohort / "thigh_00003")]
    assert all(f"interrupted by {signal.Signals(signum).name}" in e for e in fails["error"])
    _no_temporary_folders(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is not None and "interrupted" in capsys.readouterr().err
    # the next run does what is left, and failures.csv goes
    stub_cascade.on_predict = None
    assert _run(tiny_cohort, out, stub_cascade.weights) == 0
    assert stub_cascade.calls[2:] == ["thigh_00002", "thigh_00003"] and not (out / "failures.csv").exists()
    assert len(pd.read_csv(out / "cohort_volumes.csv")["subject"].unique()) == 3


def test_output_folder_on_another_device(tmp_path, tiny_cohort, stub_cascade, monkeypatch):
    """The output folder is a mount point (``docker -v host:/out``): a rename into it from anywhere outside
    fails with EXDEV, as the kernel does across devices. Outputs are staged inside it, so all is well."""
    import errno

    mount = tmp_path / "mnt"
    mount.mkdir()
    real_replace, real_rename = os.replace, os.rename

    def same_device(src, dst) -> bool:
        inside = [Path(os.path.abspath(p)).is_relative_to(mount) for p in (src, dst)]
        return inside[0] == inside[1]

    def guarded(real):
        def move(src, dst, *a, **k):
            if not same_device(src, dst):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))
            return real(src, dst, *a, **k)
        return move

    monkeypatch.setattr(os, "replace", guarded(real_replace))
    monkeypatch.setattr(os, "rename", guarded(real_rename))
    assert _run(tiny_cohort / "thigh_00001", mount, stub_cascade.weights) == 0
    assert (mount / "volumes.csv").is_file() and (mount / "run.json").is_file()
    assert _run(tiny_cohort, mount / "cohort", stub_cascade.weights) == 0
    assert (mount / "cohort" / "cohort_volumes.csv").is_file()
    _no_temporary_folders(tmp_path)


def test_output_folder_names_are_sanitised(tmp_path, tiny_cohort, stub_cascade):
    cohort = tmp_path / "cohort"
    bad = "x\x1b[31m red\nthigh:1"
    _copy(tiny_cohort / "thigh_00001", cohort / bad)
    _copy(tiny_cohort / "thigh_00002", cohort / "sub" / "thigh_2")
    out = tmp_path / "out"
    assert _run(cohort, out, stub_cascade.weights) == 0
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["sub_thigh_2", "x_[31m red_thigh_1"]
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve()) and not any(ord(c) < 32 for c in p.name), p
    assert set(pd.read_csv(out / "cohort_volumes.csv")["subject"]) == set(names)


def test_cascade_sets_muscle_islands_between_the_legs_to_background(thigh_case, tiny_weights, monkeypatch):
    """Stage 1 as the cascade returns it: a muscle island between the legs (genitals) is background,
    every other voxel keeps the network's label (here a stand-in: the phantom's own stage-1 map)."""
    import legcomp.inference.cascade as cascade_mod

    study = read_study(thigh_case)
    truth = study.labels["stage1"].copy()
    mid = truth.shape[0] // 2
    assert not truth[mid - 2:mid + 3, :, :4].any()  # the legs are apart on the lowest slices
    ys = np.flatnonzero(truth[:, :, 1].any(axis=0))
    blob = np.zeros(truth.shape, bool)
    blob[mid - 1:mid + 2, (ys.min() + ys.max()) // 2 - 1:(ys.min() + ys.max()) // 2 + 2, 1:3] = True
    fake = np.where(blob, anatomy.WHOLE_MUSCLE.id, truth).astype(np.uint8)
    monkeypatch.setattr(cascade_mod.prep, "labels_and_confidence",
                        lambda prob, work, st: (fake.copy(), np.ones(fake.shape, np.float32)))
    s1, _ = Cascade.load("thigh", tiny_weights, "cpu").stage1_with_confidence(study)
    assert (s1[blob] == 0).all()
    assert np.array_equal(s1[~blob], fake[~blob])

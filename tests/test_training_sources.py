"""Training for long, real work: preprocessing cache, several weighted sources, --val studies and the
kept checkpoint, per-epoch log lines, provenance (and run.json per stage), unreadable studies skipped."""

from __future__ import annotations

import csv
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.models import load_weights
from legcomp.training import data as D
from legcomp.training import train
from legcomp.training import provenance as P
from legcomp.training.cache import CaseCache, content_hash
from legcomp.training.toy import write_toy_cohort

torch.set_num_threads(1)

SHAPE = (32, 16, 4)
TINY = dict(config="tiny", iters_per_epoch=1, batch=1, patch=(16, 16, 4), working_spacing=None, progress=False,
            device="cpu")


def _count_reads(monkeypatch) -> list:
    """Count (and name) the studies legcomp.training reads from their files."""
    calls: list = []
    real = D.read_study

    def counting(path, **kw):
        calls.append(os.path.basename(str(path)))
        return real(path, **kw)

    monkeypatch.setattr(D, "read_study", counting)
    return calls


def _as_uncompressed(folder, name="water"):
    """Rewrite a contrast as an uncompressed .nii (its size then depends on the shape alone)."""
    img = nib.load(str(folder / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(folder / f"{name}.nii"))
    (folder / f"{name}.nii.gz").unlink()
    return folder / f"{name}.nii"


# --------------------------------------------------------------------------- cache


def test_second_run_reads_nothing_and_a_changed_file_is_reread(tmp_path, monkeypatch):
    paths = write_toy_cohort(tmp_path / "data", 2, shape=SHAPE)
    water = _as_uncompressed(paths[0])
    calls = _count_reads(monkeypatch)
    kw = dict(stage=1, region="thigh", out=tmp_path / "m", folds=1, epochs=1, cache=tmp_path / "cache", **TINY)
    s1 = train(tmp_path / "data", **kw)
    assert sorted(calls) == ["thigh_00000", "thigh_00001"]
    assert s1["cache"]["built"] == 2 and s1["cache"]["hits"] == 0
    # a later run (and a resumed one) reads no study file
    calls.clear()
    s2 = train(tmp_path / "data", resume=False, **kw)
    assert calls == [] and s2["cache"]["hits"] == 2 and s2["cache"]["built"] == 0
    s3 = train(tmp_path / "data", **{**kw, "epochs": 2})
    assert calls == [] and s3["start_epoch"] == 1 and s3["steps"] == 1
    # the same bytes give the same cases as reading afresh (memory-mapped, read-only)
    cached = D.load_studies(paths, 1, "thigh", spacing=(None, None, None), cache=CaseCache(tmp_path / "cache"))
    fresh = D.load_studies(paths, 1, "thigh", spacing=(None, None, None))
    assert calls == ["thigh_00000", "thigh_00001"] and cached.hits == 2
    for a, b in zip(cached.cases, fresh.cases):
        assert isinstance(a["image"], np.memmap) and not a["image"].flags.writeable
        for key in ("image", "label", "classes"):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key])
        assert a["name"] == b["name"]
    # one voxel changed, same size and modification time: re-read (content is hashed, not size+mtime)
    calls.clear()
    st = water.stat()
    img = nib.load(str(water))
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] += 7
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(water))
    os.utime(water, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert water.stat().st_size == st.st_size and water.stat().st_mtime_ns == st.st_mtime_ns
    s4 = train(tmp_path / "data", resume=False, **kw)
    assert calls == ["thigh_00000"] and s4["cache"]["hits"] == 1 and s4["cache"]["built"] == 1
    # other preprocessing options are other entries
    calls.clear()
    D.load_studies(paths[1:], 1, "thigh", spacing=(None, None, None), normalisation="in_phase_percentile",
                   cache=CaseCache(tmp_path / "cache"))
    assert calls == ["thigh_00001"]


def test_corrupt_cache_entry_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    paths = write_toy_cohort(tmp_path / "data", 1, shape=SHAPE)
    calls = _count_reads(monkeypatch)
    cache = CaseCache(tmp_path / "cache")
    first = D.load_studies(paths, 2, "thigh", spacing=(None, None, None), cache=cache)
    assert len(first.cases) == 2 and calls == ["thigh_00000"]
    want = [np.array(c["image"]) for c in first.cases]  # (the memory maps would see the corruption below)
    entry = next((tmp_path / "cache").rglob("manifest.json")).parent
    assert not list(entry.parent.glob(".*tmp*"))  # no temporary folder left behind
    # flip bytes inside an array (same size): the checksum catches it
    npy = entry / "c1_image.npy"
    raw = bytearray(npy.read_bytes())
    raw[-8:] = bytes(8)
    npy.write_bytes(bytes(raw))
    again = D.load_studies(paths, 2, "thigh", spacing=(None, None, None), cache=CaseCache(tmp_path / "cache"))
    assert calls == ["thigh_00000"] * 2 and again.built == 1
    for a, b in zip(again.cases, want):
        assert np.array_equal(a["image"], b)
    # a truncated file, then a missing manifest: rebuilt each time
    npy.write_bytes(npy.read_bytes()[:100])
    c2 = CaseCache(tmp_path / "cache")
    D.load_studies(paths, 2, "thigh", spacing=(None, None, None), cache=c2)
    assert c2.rebuilt == 1 and len(calls) == 3
    (entry / "manifest.json").unlink()
    c3 = CaseCache(tmp_path / "cache")
    D.load_studies(paths, 2, "thigh", spacing=(None, None, None), cache=c3)
    assert c3.rebuilt == 1 and len(calls) == 4
    c4 = CaseCache(tmp_path / "cache")
    D.load_studies(paths, 2, "thigh", spacing=(None, None, None), cache=c4)
    assert c4.hits == 1 and c4.rebuilt == 0 and len(calls) == 4


# --------------------------------------------------------------------------- sources and sampling


def test_parse_sources():
    assert D.parse_source("real/:0.3") == D.Source(D.Path("real/"), 0.3)
    assert D.parse_source("synth") == D.Source(D.Path("synth"), 1.0)
    assert D.parse_source("a:b").path == D.Path("a:b")  # not a number: part of the path
    assert D.parse_source(("x", 2)).weight == 2.0
    assert [s.weight for s in D.parse_sources(["a", "b:0.5"])] == [1.0, 0.5]
    assert len(D.parse_sources("one")) == 1 and len(D.parse_sources(D.Path("one"))) == 1
    for bad in ("x:0", "x:-1", "x:nan"):
        with pytest.raises(LegcompInputError, match="weight"):
            D.parse_source(bad)


def test_sampling_proportions_follow_the_weights_not_the_sizes():
    g = torch.Generator().manual_seed(0)
    groups = [0] * 40 + [1] * 3 + [2] * 7
    s = D.source_sampler(groups, [1.0, 0.3, 0.7], 20000, g)
    drawn = np.bincount([groups[i] for i in s], minlength=3) / 20000
    assert np.allclose(drawn, [0.5, 0.15, 0.35], atol=0.015), drawn
    assert s.counts == list(np.round(drawn * 20000).astype(int))
    # within a source, cases are drawn uniformly
    idx = np.bincount(list(s), minlength=50)
    assert idx[40:43].min() > 0.8 * idx[40:43].max()
    one = D.source_sampler([0] * 5, [1.0], 10, g)
    assert isinstance(one.inner, torch.utils.data.RandomSampler) and len(list(one)) == 10


def test_two_sources_train_split_and_counts(tmp_path):
    write_toy_cohort(tmp_path / "synth", 6, shape=SHAPE)
    write_toy_cohort(tmp_path / "real", 3, shape=SHAPE, seed=50)
    s = train([tmp_path / "synth", f"{tmp_path / 'real'}:0.5"], stage=1, region="thigh", out=tmp_path / "m",
              folds=3, fold=0, epochs=2, seed=1, **{**TINY, "iters_per_epoch": 10, "batch": 3})
    synth, real = s["sources"]
    assert (synth["weight"], real["weight"]) == (1.0, 0.5) and real["share"] == pytest.approx(1 / 3, abs=1e-3)
    assert (synth["studies"], synth["train_studies"], synth["val_studies"]) == (6, 4, 2)
    assert (real["studies"], real["train_studies"], real["val_studies"]) == (3, 2, 1)
    assert synth["draws"] + real["draws"] == s["steps"] * 3 == 60 and real["draws"] > 5
    assert s["n_train_cases"] == 6 and s["n_val_cases"] == 3
    # the split is per source and each source's is the one it would get alone
    alone = D.kfold_split([f"thigh_{i:05d}" for i in range(6)], 3, 0, 1)
    per = {os.path.basename(p["source"]): p for p in s["split"]["per_source"]}
    assert per["synth"]["val"] == [f"thigh_{i:05d}" for i in alone[1]]
    assert s["split"]["method"] == "k-fold per source" and len(s["split"]["val"]) == 3
    meta = load_weights(tmp_path / "m" / "thigh_stage1.pt")[1]
    assert meta["training"]["split"]["per_source"] == s["split"]["per_source"]


# --------------------------------------------------------------------------- --val, kept weights, log


def test_val_dirs_score_per_structure_and_keep_the_best(tmp_path):
    write_toy_cohort(tmp_path / "data", 2, shape=SHAPE)
    (vpath,) = write_toy_cohort(tmp_path / "val", 1, shape=SHAPE, seed=70)
    (vpath / anatomy.LABEL_RECORD).write_text(json.dumps({"stage1": {"unlabelled": ["subcutaneous_fat"]}}))
    out = tmp_path / "m"
    s = train(tmp_path / "data", stage=1, region="thigh", out=out, folds=1, epochs=3, val_dirs=[tmp_path / "val"],
              **TINY)
    assert s["keep"] == "best-val" and s["n_valset_cases"] == 1 and s["best_valset_epoch"] in (1, 2, 3)
    rows = list(csv.DictReader(open(out / "thigh_stage1.metrics.csv")))
    assert len(rows) == 3
    for r in rows:
        assert 0.0 <= float(r["valset_mean_dsc"]) <= 1.0 and r["valset_dsc_whole_muscle"] != ""
        assert r["valset_dsc_subcutaneous_fat"] == ""  # the study does not label it
        assert float(r["data_s"]) >= 0 and float(r["time_s"]) > 0
    best = max(rows, key=lambda r: float(r["valset_mean_dsc"]))
    assert int(best["epoch"]) == s["best_valset_epoch"]
    assert s["best_valset_dsc"] == {"subcutaneous_fat": None, "whole_muscle": float(best["valset_dsc_whole_muscle"])}
    per_case = list(csv.DictReader(open(out / "thigh_stage1.valset_cases.csv")))
    assert [int(r["epoch"]) for r in per_case] == [1, 2, 3] and per_case[0]["study"] == "thigh_00070"
    # the best --val checkpoint is kept and is the weights; the last epoch's beside it
    best_pt, kept, last = out / "thigh_stage1.best_val.pt", out / "thigh_stage1.pt", out / "thigh_stage1.last.pt"
    assert best_pt.read_bytes() == kept.read_bytes()
    meta = load_weights(kept)[1]
    assert meta["selection"] == "best-val" and meta["epoch"] == s["best_valset_epoch"]
    assert meta["valset_mean_dsc"] == round(float(best["valset_mean_dsc"]), 4)
    assert load_weights(last)[1]["epoch"] == 3 and not (out / "thigh_stage1.best_fold.pt").exists()
    assert json.loads((out / "thigh_stage1.provenance.json").read_text())["keep"] == "best-val"
    assert (out / "thigh_stage1.curve.png").is_file()
    # --keep last: the weights are the last epoch's
    s2 = train(tmp_path / "data", stage=1, region="thigh", out=tmp_path / "m2", folds=1, epochs=2,
               val_dirs=[tmp_path / "val"], keep="last", **TINY)
    assert s2["keep"] == "last" and s2["kept_epoch"] == 2
    m2 = tmp_path / "m2"
    assert (m2 / "thigh_stage1.pt").read_bytes() == (m2 / "thigh_stage1.last.pt").read_bytes()
    assert (tmp_path / "m2" / "thigh_stage1.best_val.pt").is_file()
    with pytest.raises(LegcompInputError, match="best-val"):
        train(tmp_path / "data", stage=1, region="thigh", out=tmp_path / "m3", folds=1, keep="best-val", **TINY)
    with pytest.raises(LegcompInputError, match="best-fold"):
        train(tmp_path / "data", stage=1, region="thigh", out=tmp_path / "m3", folds=1, keep="best-fold", **TINY)


def test_one_log_line_per_epoch_without_progress(tmp_path, caplog):
    write_toy_cohort(tmp_path / "data", 2, shape=SHAPE)
    with caplog.at_level("INFO", logger="legcomp.training"):
        train(tmp_path / "data", stage=1, region="thigh", out=tmp_path / "m", folds=2, epochs=3, **TINY)
    pattern = re.compile(r"thigh_stage1 epoch (\d)/3 loss \d+\.\d+ lr [\d.e-]+ "
                         r"val DSC \d\.\d{4} \(best \d\.\d{4} @ \d\) "
                         r"\d+\.\d s \(data \d+\.\d s\) left \d+:\d\d:\d\d$")
    lines = [r.getMessage() for r in caplog.records if pattern.search(r.getMessage())]
    assert [pattern.search(x).group(1) for x in lines] == ["1", "2", "3"]
    log_text = (tmp_path / "m" / "train.log").read_text()
    assert len([x for x in log_text.splitlines() if pattern.search(x)]) == 3
    assert "studies ready" in log_text and "reading data" in log_text
    s = json.loads((tmp_path / "m" / "thigh_stage1.summary.json").read_text())
    assert s["read_time_s"] >= 0 and s["data_wait_s"] >= 0 and s["first_step_s"] > 0 and s["steps_per_min"] > 0


# --------------------------------------------------------------------------- provenance, run.json


def test_provenance_beside_every_weights_file(tmp_path):
    synth = write_toy_cohort(tmp_path / "synth", 2, shape=SHAPE)
    real = write_toy_cohort(tmp_path / "real", 2, shape=SHAPE, seed=40)
    for p in real:
        (p / anatomy.LABEL_RECORD).write_text(json.dumps({"stage2": {"unlabelled": ["vastus_medialis"]}}))
    (real[1] / anatomy.LABEL_RECORD).write_text(json.dumps({"stage2": {"unlabelled": ["vastus_medialis",
                                                                                      "sartorius"]}}))
    init = tmp_path / "init"
    train(synth[0], stage=2, region="thigh", out=init, folds=1, epochs=1, **TINY)
    out = tmp_path / "m"
    s = train([tmp_path / "synth", (tmp_path / "real", 0.25)], stage=2, region="thigh", out=out, folds=2, epochs=2,
              init_weights=init / "thigh_stage2.pt", command="legcomp train --data synth --data real:0.25", **TINY)
    for name in ("thigh_stage2", "thigh_stage2.last", "thigh_stage2.best_fold"):
        prov = json.loads((out / f"{name}.provenance.json").read_text())
        assert prov["weights"]["file"] == f"{name}.pt"
        assert prov["weights"]["sha256_16"] == P.sha256_16(out / f"{name}.pt")
        assert prov["command"] == "legcomp train --data synth --data real:0.25"
        assert prov["keep"] == "best-fold" and prov["kept_as"] == "thigh_stage2.pt"
    prov = json.loads((out / "thigh_stage2.provenance.json").read_text())
    assert prov["weights"]["selection"] == "best-fold" and prov["weights"]["epoch"] == s["best_epoch"]
    src_synth, src_real = prov["sources"]
    assert src_synth["path"] == str((tmp_path / "synth").resolve()) and src_real["weight"] == 0.25
    assert src_synth["studies"] == src_real["studies"] == 2
    assert src_real["hash"] == P.studies_hash((p.name, content_hash(p)) for p in real)
    assert src_synth["hash"] == P.studies_hash((p.name, content_hash(p)) for p in synth) != src_real["hash"]
    assert src_synth["lacks"] == {} and src_real["lacks"] == {"stage2": {"sartorius": 1, "vastus_medialis": 2}}
    assert "synth" in prov["trained_on"] and "real" in prov["trained_on"]
    assert prov["epochs"] == {"planned": 2, "run": 2} and prov["steps"] == 2
    assert prov["seconds"]["total"] > 0 and prov["device"] == "cpu"
    assert prov["network"]["config"]["name"] == "tiny" and prov["network"]["n_classes"] == anatomy.n_classes(2, "thigh")
    assert prov["init_weights"] == {"file": str((init / "thigh_stage2.pt").resolve()),
                                    "sha256_16": P.sha256_16(init / "thigh_stage2.pt")}
    from legcomp import __version__

    assert prov["legcomp_version"] == __version__
    assert prov["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"])
    assert prov["skipped"] == [] and prov["split"]["method"] == "k-fold per source"


def test_run_json_names_each_stages_own_training_data(tmp_path, monkeypatch):
    from legcomp.inference import Cascade
    from legcomp.io import read_study
    from legcomp.pipeline import process_study

    write_toy_cohort(tmp_path / "synth", 1, shape=SHAPE)
    write_toy_cohort(tmp_path / "real", 1, shape=SHAPE, seed=30)
    weights = tmp_path / "weights"
    train(tmp_path / "synth", stage=1, region="thigh", out=weights, folds=1, epochs=1, **TINY)
    train(tmp_path / "real", stage=2, region="thigh", out=weights, folds=1, epochs=1, **TINY)
    cascade = Cascade.load("thigh", weights, "cpu")
    (study_path,) = write_toy_cohort(tmp_path / "study", 1, shape=SHAPE, seed=80)
    study = read_study(study_path)
    monkeypatch.setattr(Cascade, "predict", lambda self, st, return_confidence=False: (
        (st.labels["stage1"], st.labels["stage2"], {}) if return_confidence else (st.labels["stage1"], st.labels["stage2"])))
    process_study(study, tmp_path / "out", cascade, quantify=False, overlay=False)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    by_stage = run["weights_trained_on"]
    assert set(by_stage) == {"stage1", "stage2"}
    assert by_stage["stage1"]["sources"][0]["path"] == str((tmp_path / "synth").resolve())
    assert by_stage["stage2"]["sources"][0]["path"] == str((tmp_path / "real").resolve())
    assert str(tmp_path / "real") in by_stage["stage2"]["trained_on"]
    assert str(tmp_path / "real") not in by_stage["stage1"]["trained_on"]
    assert by_stage["stage2"]["weights"]["sha256_16"] == run["weights"]["stage2"]["sha256_16"]
    # the bundled weights' hand-written provenance is read as it is, per stage
    from legcomp.models import bundled_weights

    for stage in (1, 2):
        prov = P.read_provenance(bundled_weights("thigh", stage))
        want = json.loads(bundled_weights("thigh", stage).with_suffix(".provenance.json").read_text())
        assert prov == want and "trained_on" in prov
    assert P.read_provenance(tmp_path / "nothing.pt") == {"trained_on": "unknown"}


# --------------------------------------------------------------------------- unreadable studies


def test_unreadable_study_is_skipped_and_named(tmp_path):
    from legcomp.cli import main

    paths = write_toy_cohort(tmp_path / "data", 3, shape=SHAPE)
    (paths[1] / "water.nii.gz").write_bytes(b"not a nifti file at all")
    out = tmp_path / "m"
    s = train(tmp_path / "data", stage=1, region="thigh", out=out, folds=1, epochs=1, **TINY)
    assert s["n_train_cases"] == 2 and len(s["skipped"]) == 1
    (sk,) = s["skipped"]
    assert sk["study"] == str(paths[1]) and "water.nii.gz" in sk["reason"] and "\n" not in sk["reason"]
    log_lines = [x for x in (out / "train.log").read_text().splitlines() if "skipped study" in x]
    assert len(log_lines) == 1 and str(paths[1]) in log_lines[0]
    prov = json.loads((out / "thigh_stage1.provenance.json").read_text())
    assert prov["skipped"] == s["skipped"] and sk["source"] == str((tmp_path / "data").resolve())
    assert prov["sources"][0]["studies"] == 3 and prov["sources"][0]["used"] == 2
    # nothing usable left: exit 2
    for p in paths:
        (p / "water.nii.gz").write_bytes(b"broken")
    rc = main(["train", "--data", str(tmp_path / "data"), "--stage", "1", "--region", "thigh", "--out",
               str(tmp_path / "m2"), "--config", "tiny", "--epochs", "1", "--iters", "1", "--folds", "1",
               "--patch", "16", "16", "4", "--working-spacing", "0", "0", "--no-progress", "--no-cache",
               "--device", "cpu"])
    assert rc == 2


def test_cli_options(tmp_path, monkeypatch):
    import argparse

    from legcomp.training.cache import default_cache_dir
    from legcomp.training.cli import add_train_arguments

    p = add_train_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--data", "synth", "--data", "real:0.3", "--val", "v1", "--val", "v2", "--stage", "1",
                      "--region", "thigh", "--out", "o", "--keep", "last", "--cache", "c"])
    assert a.data == ["synth", "real:0.3"] and a.val == ["v1", "v2"] and a.keep == "last" and a.cache == "c"
    assert a.use_cache
    a = p.parse_args(["--data", "d", "--stage", "1", "--region", "thigh", "--out", "o", "--no-cache"])
    assert not a.use_cache and a.keep == "auto" and a.val is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "legcomp" / "training"
    # the command line's default cache is the user's cache folder
    write_toy_cohort(tmp_path / "data", 1, shape=SHAPE)
    from legcomp.cli import main

    assert main(["train", "--data", str(tmp_path / "data"), "--stage", "1", "--region", "thigh", "--out",
                 str(tmp_path / "m"), "--config", "tiny", "--epochs", "1", "--iters", "1", "--folds", "1",
                 "--batch", "1", "--patch", "16", "16", "4", "--working-spacing", "0", "0", "--no-progress",
                 "--device", "cpu"]) == 0
    assert list((tmp_path / "xdg" / "legcomp" / "training").rglob("manifest.json"))
    prov = json.loads((tmp_path / "m" / "thigh_stage1.provenance.json").read_text())
    assert prov["command"].startswith("legcomp train --data ") and prov["cache"].startswith(str(tmp_path / "xdg"))

"""The leave-one-source-out bench runs end to end on a tiny budget (real data in ../shared/realdata)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"

pytestmark = pytest.mark.skipif(not (REALDATA / "huashan_thigh_001").is_dir(), reason="no ../shared/realdata")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_real_loo", ROOT / "bench" / "bench_real_loo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loo_bench_tiny_budget(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bench = _bench()
    res = bench.main(["--train", "--out", str(tmp_path / "loo"), "--per-map", "1", "--max-maps", "1",
                      "--phantoms", "0", "--minutes", "0.05", "--epochs", "1", "--iters", "1",
                      "--patch", "64", "64", "16", "--no-calf", "--json", str(tmp_path / "scores.json")])
    loo = json.loads((tmp_path / "loo" / "loo.json").read_text())
    # the held-out person's own label map is never a training source
    assert loo["held_out"] == "huashan_thigh_001"
    assert not any("THIGH_061" in s for s in loo["sources"]) and loo["n_synth"] >= 1
    assert (tmp_path / "loo" / "weights" / "thigh_stage2.pt").is_file()
    legs = res["thigh"]["legs"]
    for leg in ("left", "right"):
        assert 0.0 <= legs[leg]["mean_muscle_dsc"] <= 1.0
        assert 0.0 <= legs[leg]["stage1_muscle_without_label"] <= 1.0
    assert set(res["thigh"]["muscles"]) >= {"vastus_lateralis", "gracilis"}
    out = capsys.readouterr().out
    assert "mean over muscles" in out and "huashan_thigh_001 (held out)" in out
    assert json.loads((tmp_path / "scores.json").read_text())["thigh"]["labelled_slices"] == [0, 13]


def test_seen_case_is_found_in_the_provenance(tmp_path):
    """A network trained on the case (in its own split, or in that of a run it continued) is a training
    fit: the bench says so without being told. The bundled thigh muscle network was trained on it."""
    import shutil

    from legcomp.inference.cascade import cascade_paths

    bench = _bench()
    bundled = cascade_paths("thigh")
    for s, p in bundled.items():
        shutil.copy(p, tmp_path / p.name)
    prov = tmp_path / bundled[2].name.replace(".pt", ".provenance.json")
    for split, found in [({"train": ["a/synth_1"]}, False), ({"train": ["real/huashan_thigh_001"]}, True)]:
        prov.write_text(json.dumps({"split": {"train": ["x"]}, "previous": {"split": split}}))
        assert bench.trained_on("huashan_thigh_001", "thigh", tmp_path) is found
    prov.write_text(json.dumps({"split": {"train": ["huashan_thigh_001_left"]}}))  # another name
    assert bench.trained_on("huashan_thigh_001", "thigh", tmp_path) is False
    assert bench.trained_on("huashan_thigh_001", "thigh") is True  # the shipped weights

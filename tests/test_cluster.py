"""Cohorts on Dask (``legcomp run --workers N`` / ``--scheduler ADDRESS``): the same answers as serially,
skip-done, networks loaded once per worker, a dying worker costs only its study, the memory limit, the extra.

Crashes and memory hogs reach the worker processes through a Dask worker preload (a script written by
these tests): it wraps :func:`legcomp.cluster.study_task` (which a worker looks up by name) to die
(``os._exit``) or to allocate without end, after leaving a temporary output folder as a half-written study
would, for a study whose folder holds a marker file; and it records the cascade each study was given.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from legcomp.cli import main
from legcomp.cluster import LOCAL_CONFIG, distributed_available
from legcomp.phantom import generate, write_phantom

needs_dask = pytest.mark.skipif(not distributed_available(), reason='Dask distributed not installed ("[cluster]")')

SMALL = dict(matrix=(96, 64, 8), spacing=(4.0, 4.0, 8.0), supersample=1)
ARRAYS = ("stage1.nii.gz", "stage2.nii.gz", "mat.nii.gz", "intramat.nii.gz", "intermat.nii.gz")

PRELOAD = '''"""Test-only Dask worker preload (tests/test_cluster.py): crashes, memory hogs, cascades handed out."""
import os
import time
from pathlib import Path

import numpy as np

from legcomp import cluster

CASCADES = []  # id() of the cascade each study got in this worker process
_task = getattr(cluster.study_task, "unhooked", cluster.study_task)  # Dask may run this file twice
_cached = getattr(cluster.cached_cascade, "unhooked", cluster.cached_cascade)


def cached_cascade(*args, **kwargs):
    cascade = _cached(*args, **kwargs)
    CASCADES.append(id(cascade))
    return cascade


def study_task(job, path, target, name, threads):
    folder = Path(path)
    marks = {m for m in ("crash-once", "hog") if (folder / f"legcomp-test-{m}").exists()}
    if marks:
        with open(folder / "attempts.txt", "a") as f:
            f.write(f"{os.getpid()}\\n")
        tries = len((folder / "attempts.txt").read_text().split())
        (Path(target) / ".legcomp-tmp-dead").mkdir(parents=True, exist_ok=True)  # a study half-written
        if "crash-once" in marks and tries == 1:
            os._exit(17)
        if "hog" in marks:
            hog = []
            for _ in range(96):  # 32 MB more every 20 ms, to 3 GiB (over the 2 GiB limit) ...
                hog.append(np.ones(4 << 20))
                time.sleep(0.02)
            for _ in range(600):  # ... and held for up to a minute, until the nanny ends this worker (its
                time.sleep(0.1)   # memory monitor may lag on a busy machine)
            raise RuntimeError("the nanny did not end a worker over its memory limit")
    return _task(job, path, target, name, threads)


cached_cascade.unhooked, study_task.unhooked = _cached, _task
cluster.cached_cascade, cluster.study_task = cached_cascade, study_task
'''


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Three small thigh phantoms (a cohort folder); copy it before changing it."""
    root = tmp_path_factory.mktemp("cluster") / "cohort"
    for seed in (1, 2, 3):
        write_phantom(generate("thigh", seed, **SMALL), root / f"thigh_{seed:05d}")
    return root


@pytest.fixture(scope="module")
def serial(cohort, tmp_path_factory) -> Path:
    """The cohort run serially (bundled networks, one torch thread, as each cluster worker here)."""
    import torch

    out = tmp_path_factory.mktemp("serial") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _run(cohort, out) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def preload(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preload") / "legcomp_test_preload.py"
    path.write_text(PRELOAD)
    return path


@pytest.fixture(scope="module")
def local_cluster(preload):
    """A LocalCluster of 2 worker processes x 1 thread with the test preload, and a client to look inside."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({**LOCAL_CONFIG, "distributed.worker.preload": [str(preload)]}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                               memory_limit="4GiB", silence_logs=40)
    with cluster, Client(cluster) as client:
        client.run(lambda: __import__("torch").set_num_threads(1))
        yield cluster, client


def _run(cohort: Path, out: Path, *extra: str) -> int:
    return main(["run", str(cohort), "--out", str(out), "--quiet", "--no-overlay", "--device", "cpu", *extra])


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {f: np.asarray(nib.load(str(folder / f)).dataobj) for f in ARRAYS}


def _same_volumes(a: Path, b: Path) -> None:
    """Two volumes tables hold the same rows in the same order, every value equal, but the networks' mean
    ``confidence``, which differs in the 6th decimal when torch ran on another number of threads."""
    ta, tb = pd.read_csv(a), pd.read_csv(b)
    assert len(ta) == len(tb) and len(ta) > 0
    conf = ta["measure"] == "confidence"
    assert list(conf) == list(tb["measure"] == "confidence")
    assert ta[~conf].equals(tb[~conf]), (a, b)
    assert ta[conf].drop(columns="value").equals(tb[conf].drop(columns="value"))
    assert np.allclose(ta.loc[conf, "value"], tb.loc[conf, "value"], rtol=0, atol=1e-5, equal_nan=True)


def _no_temporary_folders(root: Path) -> None:
    left = [p for p in root.rglob("*") if p.name.startswith(".")]
    assert not left, left


@needs_dask
def test_an_interrupted_then_resumed_cluster_run_gives_the_serial_answers(tmp_path, cohort, serial, local_cluster,
                                                                         monkeypatch, capsys):
    """Ctrl-C in the driver after the first study came back: the tables hold what finished and list the rest
    as not done; the next run skips what is complete and does the rest. Every output is then the serial
    run's, and each worker process loaded its networks once."""
    from legcomp import cluster as cluster_mod

    cluster, client = local_cluster
    out, real, seen = tmp_path / "out", cluster_mod._result, []

    def result_then_interrupt(*args):
        if seen:
            raise KeyboardInterrupt
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(cluster_mod, "_result", result_then_interrupt)
    assert _run(cohort, out, "--scheduler", cluster.scheduler_address) == 130
    assert len(pd.read_csv(out / "cohort_volumes.csv")["subject"].unique()) == 1
    fails = pd.read_csv(out / "failures.csv")
    assert len(fails) == 2 and all("not done: interrupted by SIGINT" in e for e in fails["error"])
    deadline = time.monotonic() + 120
    while any(client.run(lambda dask_worker: len(dask_worker.state.executing)).values()):  # studies in flight
        assert time.monotonic() < deadline
        time.sleep(0.5)
    _no_temporary_folders(out)
    monkeypatch.undo()
    capsys.readouterr()
    assert _run(cohort, out, "--scheduler", cluster.scheduler_address) == 0
    assert " up to date, skipped" in capsys.readouterr().out and not (out / "failures.csv").exists()
    for name in ("thigh_00001", "thigh_00002", "thigh_00003"):
        a, b = _arrays(serial / name), _arrays(out / name)
        for f in ARRAYS:
            assert np.array_equal(a[f], b[f]), (name, f)
        _same_volumes(serial / name / "volumes.csv", out / name / "volumes.csv")
        fp = [json.loads((d / name / "run.json").read_text())["fingerprint"] for d in (serial, out)]
        assert fp[0] == fp[1]  # where it ran is no option: serial outputs are up to date for a cluster run
    _same_volumes(serial / "cohort_volumes.csv", out / "cohort_volumes.csv")
    assert (out / "index.html").is_file()
    _no_temporary_folders(out)
    given = client.run(lambda: list(__import__("legcomp_test_preload").CASCADES))
    assert sum(len(ids) for ids in given.values()) == 3 and max(len(ids) for ids in given.values()) >= 2
    assert all(len(set(ids)) <= 1 for ids in given.values())  # one cascade per worker process, reused


@needs_dask
def test_a_dying_worker_costs_only_its_study(tmp_path, cohort, serial, preload, monkeypatch, capsys):
    """On a local cluster (``--workers 2``), one study kills its worker once (``os._exit`` mid-study) and is
    retried on another; one takes its worker over ``--memory-per-worker`` on every try and is listed."""
    import dask

    root = tmp_path / "cohort"
    shutil.copytree(cohort / "thigh_00001", root / "normal")
    shutil.copytree(cohort / "thigh_00002", root / "crash_once")
    (root / "crash_once" / "legcomp-test-crash-once").touch()
    shutil.copytree(cohort / "thigh_00003", root / "hog")
    (root / "hog" / "legcomp-test-hog").touch()
    out = tmp_path / "out"
    with dask.config.set({"distributed.worker.preload": [str(preload)],
                          "distributed.scheduler.allowed-failures": 1}):
        code = _run(root, out, "--workers", "2", "--memory-per-worker", "2GiB")
    err = capsys.readouterr().err
    assert code == 1
    fails = pd.read_csv(out / "failures.csv")
    assert list(fails["study"]) == [str(root / "hog")]
    assert "KilledWorker" in fails.loc[0, "error"] and "memory limit (2.00 GiB" in fails.loc[0, "error"]
    assert "2 tries" in fails.loc[0, "error"] and "KilledWorker" in err
    assert len((root / "hog" / "attempts.txt").read_text().split()) == 2  # retried once, then listed
    tries = (root / "crash_once" / "attempts.txt").read_text().split()
    # died, then done by another worker process; a retry that shared a worker with the hog when that worker
    # was killed is tried once more (seen once in a fresh clone: 3 tries), each try in its own process
    assert 2 <= len(tries) <= 3 and len(set(tries)) == len(tries)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["crash_once", "normal"]
    assert set(pd.read_csv(out / "cohort_volumes.csv")["subject"]) == {"crash_once", "normal"}
    for name, ref in (("normal", "thigh_00001"), ("crash_once", "thigh_00002")):
        a, b = _arrays(serial / ref), _arrays(out / name)
        assert all(np.array_equal(a[f], b[f]) for f in ARRAYS), name
    _no_temporary_folders(out)  # the dead try's temporary folder is gone


def test_cluster_options_without_dask_name_the_extra(tmp_path, cohort, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "distributed", None)  # import distributed fails
    assert _run(cohort, tmp_path / "out", "--workers", "2") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'pip install "legcomp[cluster]"' in err
    assert not (tmp_path / "out").exists()
    assert _run(cohort / "thigh_00001", tmp_path / "one") == 0  # serially, all is well


@pytest.mark.parametrize("extra,message", [
    (["--workers", "0"], "at least 1"),
    (["--memory-per-worker", "2GB"], "goes with --workers"),
    (["--workers", "1", "--memory-per-worker", "lots"], "expected a size"),
    (["--workers", "1", "--scheduler", "tcp://x:1"], "not allowed with"),
])
def test_bad_cluster_options_are_one_line_errors(tmp_path, cohort, capsys, extra, message):
    if "lots" in extra and not distributed_available():
        pytest.skip("parsing sizes needs Dask")
    assert _run(cohort, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


@needs_dask
def test_killed_reason_says_crash_or_memory(monkeypatch):
    """failures.csv's reason for a study whose workers died: memory when the nanny said so, else a crash."""
    from types import SimpleNamespace

    from legcomp import cluster

    exc = SimpleNamespace(last_worker=SimpleNamespace(address="tcp://w:1", memory_limit=2 << 30), allowed_failures=2)
    said = {"worker-restart-memory": [(0.0, {"worker": "tcp://w:1", "pid": 1, "rss": 3 << 30})]}
    client = SimpleNamespace(get_events=lambda topic: said.get(topic, []))
    why = cluster.killed_reason(client, exc)
    assert why.startswith("KilledWorker") and "memory limit (2.00 GiB" in why and "3 tries" in why
    said.clear()
    monkeypatch.setattr(cluster, "MEMORY_EVENT_WAIT_S", 0.0)
    why = cluster.killed_reason(client, exc)
    assert why.startswith("KilledWorker") and "died" in why and "memory" not in why


def test_networks_are_loaded_once_per_process(monkeypatch, stub_cascade):
    from legcomp import cluster

    monkeypatch.setattr(cluster, "_CASCADES", {})
    a = cluster.cached_cascade("thigh", str(stub_cascade.weights), "cpu")
    assert cluster.cached_cascade("thigh", str(stub_cascade.weights), "cpu") is a
    assert cluster.cached_cascade("calf", str(stub_cascade.weights), "cpu") is not a
    (stub_cascade.weights / "thigh_stage2.pt").write_bytes(b"retrained stage 2, longer")  # new weights: reloaded
    assert cluster.cached_cascade("thigh", str(stub_cascade.weights), "cpu") is not a

"""Throughput and peak memory of ``legcomp run COHORT`` serially and on a local Dask cluster.

Makes a cohort of ``--n`` thigh phantoms (seeds 100, 101, ...; ``--matrix`` as ``legcomp phantom``'s) and runs
``legcomp run`` on it, a fresh process each time: serially, then with ``--workers 1`` and ``--workers 2``
(one study at a time per worker process). Each mode also runs a one-study cohort, so that its fixed start-up
(importing, starting the cluster, loading the networks) and its time per study after that are told apart:
per study = (T(n) - T(1)) / (n - 1), start-up = T(1) - per study; "of which run.json's seconds" is the
studies' own segmentation, quantification and report time (the rest of a study: reading, hashing, writing, and
with the cluster its task's round trip). The cluster's overhead per study is its
per-study time with one worker minus the serial one. Peak RSS is polled (every 0.1 s) over the whole process
tree: the driver, Dask's scheduler (in the driver), nannies and workers; "largest process" is the biggest
single one (a worker's peak with the cluster).

    python bench/bench_cluster.py [--n 6] [--matrix 288,192,40] [--modes serial,1,2]

Needs ``pip install -e ".[cluster]"`` for the cluster modes. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_cohort(cohort: Path, out: Path, workers: int | None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS of the process tree in GiB, peak RSS of its largest process in GiB)."""
    import psutil

    cmd = [sys.executable, "-m", "legcomp.cli", "run", str(cohort), "--out", str(out), "--device", "cpu", "--quiet"]
    if workers:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, peak, largest = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        rss = []
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak, largest = max(peak, sum(rss)), max(largest, max(rss, default=0))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"legcomp run failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return wall, peak / 2**30, largest / 2**30


def own_seconds(out: Path) -> float:
    """Mean over a run's studies of the seconds ``run.json`` records (segmentation, quantification, report)."""
    import json

    totals = [sum(json.loads(f.read_text())["seconds"].values()) for f in out.glob("*/run.json")]
    return sum(totals) / max(1, len(totals))


def make_cohort(root: Path, n: int, matrix: tuple[int, int, int] | None) -> Path:
    from legcomp.phantom import generate, write_phantom

    opts = {"matrix": matrix} if matrix else {}
    for i in range(n):
        write_phantom(generate("thigh", 100 + i, **opts), root / f"thigh_{100 + i:05d}")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6, help="studies in the cohort (default 6)")
    ap.add_argument("--matrix", default=None, help="phantom matrix nx,ny,nz (default: the thigh phantom's)")
    ap.add_argument("--modes", default="serial,1,2", help="serial and/or worker counts (default serial,1,2)")
    a = ap.parse_args()
    matrix = tuple(int(v) for v in a.matrix.split(",")) if a.matrix else None
    modes = [None if m == "serial" else int(m) for m in a.modes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        tmp = Path(tmp)
        cohort = make_cohort(tmp / "cohort", a.n, matrix)
        one = tmp / "one"
        shutil.copytree(next(iter(sorted(cohort.iterdir()))), one / "thigh_one")
        from legcomp.io import read_study
        shape = read_study(next(iter(sorted(cohort.iterdir())))).shape
        print(f"{a.n} thigh phantoms of {'x'.join(map(str, shape))} voxels; {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f} at the start; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
        rows, per_study = [], {}
        for workers in modes:
            label = "serial" if workers is None else f"{workers} worker{'s' if workers > 1 else ''}"
            t1, _, _ = run_cohort(one, tmp / f"out1_{label}", workers)
            tn, peak, largest = run_cohort(cohort, tmp / f"out_{label}", workers)
            per = (tn - t1) / max(1, a.n - 1)
            per_study[workers] = per
            rows.append((label, tn, 60 * a.n / tn, 60 / per if per > 0 else float("inf"), per,
                         own_seconds(tmp / f"out_{label}"), t1 - per, peak, largest))
            print(f"  {label}: {tn:.1f} s", file=sys.stderr)
    print("| mode | wall time | studies/min | studies/min after start-up | s per study | of which run.json's "
          "seconds | start-up | peak RSS (all processes) | largest process |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, tn, rate, steady, per, own, start, peak, largest in rows:
        print(f"| {label} | {tn:.1f} s | {rate:.1f} | {steady:.1f} | {per:.1f} s | {own:.1f} s | {start:.1f} s | "
              f"{peak:.2f} GiB | {largest:.2f} GiB |")
    if None in per_study and 1 in per_study:
        print(f"\ncluster overhead per study (1 worker minus serial, after start-up): "
              f"{per_study[1] - per_study[None]:+.2f} s")


if __name__ == "__main__":
    main()

"""What the quality-control report costs: ``legcomp run`` on the bundled example with and without it.

Each run is a fresh ``legcomp run examples/thigh_example`` process (bundled weights, CPU, a new
output folder), alternating with and without ``--no-report``; wall time, the process's CPU time
(user + system: steadier than wall time on a shared machine) and run.json's own timing of the
report (``seconds.report``) are taken, and medians printed. The report's share of a run is its
median timing over the fastest wall time without it (the run least slowed by other work on the
machine: the strictest ratio), and the process's added CPU time. The confidence maps are computed
in both variants (they feed volumes.csv); their own cost is timed apart on probability arrays of
the example's size.

    python bench/bench_report.py [--repeats 3] [--study examples/thigh_example]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_once(study: Path, out: Path, report: bool) -> dict:
    """One ``legcomp run`` process: wall and CPU seconds, the report's own seconds and the report's size."""
    cmd = [sys.executable, "-m", "legcomp.cli", "run", str(study), "--out", str(out), "--device", "cpu", "--quiet"]
    if not report:
        cmd.append("--no-report")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"legcomp run failed: {p.stderr.read().decode()[-2000:]}")
    run = json.loads((out / "run.json").read_text())
    page = out / "report.html"
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "report": run["seconds"].get("report", 0.0),
            "segmentation": run["seconds"]["segmentation"], "mb": page.stat().st_size / 1e6 if page.exists() else 0.0}


def confidence_cost(shape: tuple[int, int, int], classes: tuple[int, ...] = (3, 14), repeats: int = 3) -> float:
    """Seconds to take the per-voxel maximum of float16 class probabilities (both stages) on ``shape``."""
    rng = np.random.default_rng(0)
    best = float("inf")
    arrays = [rng.random((c, *shape), dtype=np.float32).astype(np.float16) for c in classes]
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a in arrays:
            conf = np.zeros(a.shape[1:], np.float32)  # as legcomp.preprocessing.inputs.labels_and_confidence
            for c in range(a.shape[0]):
                np.maximum(conf, a[c], out=conf)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default=str(ROOT / "examples" / "thigh_example"))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    study = Path(a.study)
    rows: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for report in (False, True):
                r = run_once(study, Path(tmp) / f"{'with' if report else 'without'}_{i}", report)
                rows[report].append(r)
                print(f"  run {i + 1} {'with' if report else 'without'} report: wall {r['wall']:.1f} s, "
                      f"CPU {r['cpu']:.1f} s", flush=True)

    def med(report: bool, key: str) -> float:
        return statistics.median(r[key] for r in rows[report])

    base_wall, base_cpu = med(False, "wall"), med(False, "cpu")
    print(f"\nlegcomp run {study.name}, {a.repeats} runs each (medians)")
    fastest = min(r["wall"] for r in rows[False])
    print(f"{'variant':<16}{'wall (s)':>10}{'fastest (s)':>13}{'CPU (s)':>10}{'report (s)':>12}{'report.html (MB)':>18}")
    for report in (False, True):
        print(f"{'with report' if report else '--no-report':<16}{med(report, 'wall'):>10.1f}"
              f"{min(r['wall'] for r in rows[report]):>13.1f}{med(report, 'cpu'):>10.1f}"
              f"{med(report, 'report'):>12.2f}{med(report, 'mb'):>18.1f}")
    print(f"\nadded by the report: its own timing {med(True, 'report'):.2f} s = "
          f"{100 * med(True, 'report') / fastest:.1f} % of the fastest run without it (limit 20 %); "
          f"CPU time {100 * (med(True, 'cpu') / base_cpu - 1):+.1f} %; median wall {100 * (med(True, 'wall') / base_wall - 1):+.1f} % "
          f"(wall times on a shared machine vary by more than the report costs)")
    import nibabel as nib
    shape = nib.load(str(next(study.glob("water.nii*")))).shape[:3]
    print(f"confidence maps (both stages' per-voxel maximum, {shape}): {confidence_cost(shape):.2f} s per study")


if __name__ == "__main__":
    main()

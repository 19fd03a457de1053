"""Time to the first optimizer step of ``legcomp train``, with and without the preprocessing cache.

Three fresh ``python -m legcomp.training`` processes on the same N thigh studies (``--folds 1``, one
epoch of ``--steps`` steps, no validation):

1. ``cold``: an empty cache folder (every study is read, resampled, normalised and stored);
2. ``warm``: the same cache folder again (every study comes back memory-mapped; nothing is read);
3. ``no cache``: ``--no-cache`` (every study read and built, nothing stored).

Reported per run: seconds from ``train()``'s start to the first optimizer step (``first_step_s`` of the
summary: study discovery, hashing, reading or the cache, the data set's own copy, model set-up),
seconds spent getting the studies ready, training throughput (optimizer steps per minute), the
process's wall time, and the cache's hits/builds; then warm / cold (goal: <= 10 %).
Without ``--data``, N small two-leg thigh phantoms (``--matrix`` at ``--spacing``) are generated into a
temporary folder first. Needs nothing but legcomp.

    python bench/bench_train_cache.py [--n 100] [--data DIR] [--steps 20] [--config fast] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_phantoms(folder: Path, n: int, matrix, spacing, seed: int) -> float:
    from legcomp.phantom import generate, write_phantom

    t0 = time.perf_counter()
    for i in range(n):
        write_phantom(generate("thigh", seed + i, matrix=tuple(matrix), spacing=tuple(spacing)),
                      folder / f"thigh_{seed + i:05d}")
    return time.perf_counter() - t0


def train_once(a: argparse.Namespace, data: Path, out: Path, cache: Path | None) -> dict:
    cmd = [sys.executable, "-m", "legcomp.training", "--data", str(data), "--stage", str(a.stage), "--region", "thigh",
           "--out", str(out), "--folds", "1", "--config", a.config, "--epochs", "1", "--iters", str(a.steps),
           "--batch", str(a.batch), "--device", a.device, "--no-progress", "--no-resume", "--patience", "0",
           "--working-spacing", *[str(s) for s in a.working_spacing], "--workers", str(a.workers)]
    if a.patch:
        cmd += ["--patch", *[str(p) for p in a.patch]]
    cmd += ["--cache", str(cache)] if cache is not None else ["--no-cache"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"legcomp train failed ({p.returncode}):\n{p.stderr[-3000:]}")
    summary = json.loads((out / f"thigh_stage{a.stage}.summary.json").read_text())
    summary["wall_s"] = wall
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="thigh studies to generate without --data (default 100)")
    ap.add_argument("--data", default=None, help="folder of labelled thigh studies (default: generate --n phantoms)")
    ap.add_argument("--stage", type=int, choices=(1, 2), default=1)
    ap.add_argument("--config", default="fast", help="network config (default fast; tiny for a quick smoke run)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of the one epoch (default 20)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--working-spacing", type=float, nargs=2, default=(1.5, 1.5), metavar=("DX", "DY"))
    ap.add_argument("--matrix", type=int, nargs=3, default=(144, 96, 16), metavar=("NX", "NY", "NZ"),
                    help="generated phantoms' matrix (default 144 96 16)")
    ap.add_argument("--spacing", type=float, nargs=3, default=(3.0, 3.0, 10.0), metavar=("DX", "DY", "DZ"),
                    help="generated phantoms' voxel size in mm (default 3 3 10)")
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    a = ap.parse_args()

    import legcomp
    from legcomp.io import find_studies

    with tempfile.TemporaryDirectory(prefix="bench_train_cache_") as tmp_name:
        work = Path(a.keep) if a.keep else Path(tmp_name)
        work.mkdir(parents=True, exist_ok=True)
        if a.data:
            data = Path(a.data)
            n = len(find_studies(data))
            print(f"data: {data} ({n} studies)")
        else:
            data = work / "phantoms"
            secs = make_phantoms(data, a.n, a.matrix, a.spacing, a.seed)
            n = a.n
            print(f"data: {n} thigh phantoms {tuple(a.matrix)} at {tuple(a.spacing)} mm, generated in {secs:.1f} s")
        cache = work / "cache"
        runs = [("cold cache", train_once(a, data, work / "out_cold", cache)),
                ("warm cache", train_once(a, data, work / "out_warm", cache)),
                ("no cache", train_once(a, data, work / "out_nocache", None))]

    print(f"\nlegcomp {legcomp.__version__}, stage {a.stage}, config {a.config}, {n} studies, {a.steps} steps "
          f"of batch {a.batch}, device {runs[0][1]['device']}")
    head = f"{'run':<12}{'first step s':>14}{'ready s':>10}{'steps/min':>11}{'wall s':>9}{'hits':>7}{'built':>7}"
    print(head)
    print("-" * len(head))
    for name, s in runs:
        c = s.get("cache") or {}
        print(f"{name:<12}{s['first_step_s']:>14.2f}{s['read_time_s']:>10.2f}{s['steps_per_min'] or 0:>11.1f}"
              f"{s['wall_s']:>9.1f}{c.get('hits', '-'):>7}{c.get('built', '-'):>7}")
    cold, warm = runs[0][1], runs[1][1]
    ratio = 100.0 * warm["first_step_s"] / cold["first_step_s"] if cold["first_step_s"] else float("nan")
    ready = 100.0 * warm["read_time_s"] / cold["read_time_s"] if cold["read_time_s"] else float("nan")
    print(f"\nwarm / cold time to the first step: {ratio:.1f} % (goal <= 10 %); studies ready: {ready:.1f} %")
    print("(first step includes a fixed ~1-2 s of lazy imports and set-up in a fresh process, which dominates "
          "when the studies are few and small)")


if __name__ == "__main__":
    main()

"""Benchmark phantom generation: default thigh, default calf, small test size (prints a table).

Usage: python bench/bench_phantom.py [--repeat N] [--randomize N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from legcomp.phantom import generate

CASES = [
    ("thigh default (1.5x1.5x5 mm)", "thigh", {}),
    ("calf default (1.5x1.5x5 mm)", "calf", {}),
    ("thigh small test (96x64x12)", "thigh", dict(matrix=(96, 64, 12), spacing=(4.5, 4.5, 15.0))),
    ("calf small test (96x64x12)", "calf", dict(matrix=(96, 64, 12), spacing=(4.5, 4.5, 15.0))),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--randomize", type=int, default=3, help="number of randomized thigh/calf samples to time")
    args = ap.parse_args()
    print(f"# legcomp phantom benchmark; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'case':34s} {'matrix':>14s} {'sub-voxels':>11s} {'best s':>7s} {'mean s':>7s} {'arrays MB':>11s}")
    rows = [(name, region, kw) for name, region, kw in CASES]
    rows += [(f"{r} randomize seed {s}", r, dict(randomize=True)) for s in range(args.randomize) for r in ("thigh", "calf")]
    for i, (name, region, kw) in enumerate(rows):
        times = []
        seed = i if "randomize" in name else 1
        for _ in range(1 if "randomize" in name else args.repeat):
            t0 = time.perf_counter()
            ph = generate(region, seed, **kw)
            times.append(time.perf_counter() - t0)
        sx, sy, sz = ph.options["supersample_xyz"]
        nsub = int(np.prod(ph.shape)) * sx * sy * sz
        mb = sum(getattr(ph, k).nbytes for k in ("water", "fat", "in_phase", "opposed_phase", "stage1", "stage2", "legs")) / 1e6
        print(f"{name:34s} {'x'.join(map(str, ph.shape)):>14s} {nsub / 1e6:10.1f}M {min(times):7.2f} {np.mean(times):7.2f} {mb:11.1f}")


if __name__ == "__main__":
    main()

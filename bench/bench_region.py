"""Benchmark automatic region detection (thigh vs calf) on phantoms and the two real studies.

Phantoms: ``--n`` thigh and ``--n`` calf studies (seeds 7000+): every other one with
``randomize=True`` (random contrast, bias, noise, grid, leg separation, infiltration), every
fifth a single leg. They are cached as ``.npz`` in ``--cache`` (default: a folder in the system
temp dir), so a second run only times the detector. Real studies are read from
``../shared/realdata`` and must both be right (the script exits 1 otherwise).

Usage: python bench/bench_region.py [--n 20] [--seed0 7000] [--random-fraction 0.5] [--cache DIR] [--verbose]
Held-out set used in the module doc: --seed0 8000 --random-fraction 1.0 (all randomized).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from legcomp.inference.region import detect_region, region_features
from legcomp.io import make_study, read_study

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
REAL_CASES = (("huashan_thigh_001", "thigh"), ("qmritools_calf", "calf"))
SEED0 = 7000


def phantom_cases(n: int, seed0: int = SEED0, random_fraction: float = 0.5) -> list[tuple[str, int, str, bool]]:
    """(region, seed, legs, randomize) of the benchmark phantoms, ``n`` per region: every fifth
    one a single leg, a ``random_fraction`` of them (evenly spread) domain-randomized."""
    out = []
    for region in ("thigh", "calf"):
        for i in range(n):
            legs = ("left", "right")[(i // 5) % 2] if i % 5 == 4 else "both"
            rand = int((i + 1) * random_fraction) > int(i * random_fraction)
            out.append((region, seed0 + i, legs, rand))
    return out


def load_phantom(region: str, seed: int, legs: str, randomize: bool, cache: Path):
    """The phantom's study (generated once, then read from the ``.npz`` cache)."""
    path = cache / f"{region}_{seed}_{legs}_{'rand' if randomize else 'fixed'}.npz"
    if not path.is_file():
        from legcomp.phantom import generate
        ph = generate(region, seed, legs=legs, randomize=randomize)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, water=ph.water.astype(np.float32), fat=ph.fat.astype(np.float32), affine=ph.affine)
        os.replace(tmp, path)
    d = np.load(path)
    return make_study({"water": (d["water"], d["affine"], "w"), "fat": (d["fat"], d["affine"], "f")},
                      name=path.stem)


def timed(study) -> tuple[str, float]:
    """(detected region, seconds) of one :func:`detect_region` call."""
    t0 = time.perf_counter()
    r = detect_region(study)
    return r, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20, help="phantoms per region")
    ap.add_argument("--seed0", type=int, default=SEED0, help="first phantom seed")
    ap.add_argument("--random-fraction", type=float, default=0.5, help="fraction of randomized phantoms")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "legcomp_bench_region")
    ap.add_argument("--generate-only", action="store_true", help="fill the cache and stop")
    ap.add_argument("--verbose", action="store_true", help="print each case's features")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"# legcomp region detection benchmark; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; cache {args.cache}")
    rows: dict[str, list[bool]] = {}
    fallback: dict[str, int] = {}
    times: list[tuple[tuple[int, ...], float]] = []
    wrong: list[str] = []
    for region, seed, legs, rand in phantom_cases(args.n, args.seed0, args.random_fraction):
        study = load_phantom(region, seed, legs, rand, args.cache)
        if args.generate_only:
            print(f"cached {study.name} {study.shape}", flush=True)
            continue
        got, dt = timed(study)
        times.append((study.shape, dt))
        key = f"{region} {'randomized' if rand else 'fixed'}{' 1 leg' if legs != 'both' else ''}"
        rows.setdefault(key, []).append(got == region)
        f = region_features(study)
        fallback[key] = fallback.get(key, 0) + (not f["reason"].startswith("bone depth"))
        if got != region:
            wrong.append(f"{study.name} {study.shape} {tuple(round(s, 2) for s in study.spacing)} -> {got}: {f['reason']}")
        if args.verbose:
            print(f"{study.name:28s} {str(study.shape):16s} -> {got:5s} {f}", flush=True)
    if args.generate_only:
        return 0
    real_ok = True
    real_rows = []
    for folder, truth in REAL_CASES:
        path = REALDATA / folder
        if not path.is_dir():
            real_rows.append((folder, truth, "missing", "-", float("nan"), ""))
            continue
        study = read_study(path)
        study.region = "unknown"
        got, dt = timed(study)
        got, dt2 = timed(study)  # second call: no first-call overheads
        real_ok &= got == truth
        real_rows.append((folder, truth, got, str(study.shape), dt2, region_features(study)["reason"]))
        if args.verbose:
            print(f"{folder:28s} {str(study.shape):16s} -> {got:5s} {region_features(study)}")
    print(f"\n{'phantoms':28s} {'n':>4s} {'correct':>8s} {'accuracy':>9s} {'area fallback':>14s}")
    allc = []
    for key in sorted(rows):
        v = rows[key]
        allc += v
        print(f"{key:28s} {len(v):4d} {sum(v):8d} {sum(v) / len(v):9.1%} {fallback[key]:14d}")
    for region in ("thigh", "calf"):
        v = [c for k, vs in rows.items() if k.startswith(region) for c in vs]
        print(f"{region + ' (all)':28s} {len(v):4d} {sum(v):8d} {sum(v) / max(len(v), 1):9.1%}")
    print(f"{'all phantoms':28s} {len(allc):4d} {sum(allc):8d} {sum(allc) / max(len(allc), 1):9.1%}")
    print(f"\n{'real study':28s} {'truth':>6s} {'detected':>9s} {'shape':>16s} {'s/call':>7s}  reason")
    for folder, truth, got, shape, dt, reason in real_rows:
        print(f"{folder:28s} {truth:>6s} {got:>9s} {shape:>16s} {dt:7.3f}  {reason}")
    if times:
        t = np.array([dt for _, dt in times])
        vox = np.array([np.prod(s) for s, _ in times]) / 1e6
        print(f"\nphantom calls: {len(t)}, median {np.median(t):.3f} s, max {t.max():.3f} s "
              f"(median {np.median(vox):.1f} Mvoxel, max {vox.max():.1f} Mvoxel)")
    for w in wrong:
        print("wrong:", w)
    if not real_ok:
        print("FAIL: a real study was misclassified", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

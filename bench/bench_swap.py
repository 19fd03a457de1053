"""Benchmark fat-water swap detection (:mod:`legcomp.preprocessing.swap`): detection rate and false alarms.

Studies: ``--n`` template phantoms per region (seeds 9100+, infiltration and adiposity spread over
0-1), ``--n-random`` domain-randomised phantoms per region (random contrast, noise, bias, grid, leg
separation; one that drew its own swap is skipped), and the two real Dixon studies in
``../shared/realdata`` (huashan_thigh_001: dystrophic thigh; qmritools_calf: healthy calf).

Each study is judged as it is (``none``) and with water and fat exchanged by this script:
``whole`` (every voxel), ``leg`` (one leg, alternating left/right), ``slab`` (the middle third of the
slices) and ``region`` (a blob of 30-70 mm radius at the edge of one leg spanning 20-60 % of the
slices: the phantom's own swap model, :func:`legcomp.phantom.signal.swap_mask`; ``--real-regions`` of
them per real study; a blob that swaps under 1 % of the body is drawn again).

Columns:
  studies       the group of studies; swap: the case; n: how many (study, swap) pairs were judged
  detected      studies whose verdict is a swap (``whole`` or ``partial``); for ``none``: false alarms
  right verdict ``whole`` for whole swaps, ``partial`` for the others, ``none`` for unswapped studies
  unit sens     leg slices (units) mostly swapped (>= 50 % of the leg's body voxels) judged swapped or
                partly swapped, over all such units
  part sens     units partly swapped (10-50 % of the leg's body voxels) judged swapped or partly swapped
  unit FA       units with no swapped voxel judged swapped or partly swapped, over all such units
  restored      swapped body voxels that ``fix_swap`` exchanged back
  harmed        unswapped body voxels that ``fix_swap`` exchanged (wrongly)
  s/study       median seconds of one detection

Usage: python bench/bench_swap.py [--n 6] [--n-random 4] [--real-regions 4] [--cases none,whole,...] [--verbose]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from legcomp.inference.region import body_mask
from legcomp.io import read_study
from legcomp.phantom.signal import swap_mask
from legcomp.preprocessing import swap as S
from legcomp.preprocessing.legs import leg_map

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
REAL = ("huashan_thigh_001", "qmritools_calf")
CASES = ("none", "whole", "leg", "slab", "region")
SEED0 = 9100


def phantoms(n: int, n_random: int) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """(group, name, water, fat, affine) of the benchmark phantoms."""
    from legcomp.phantom import generate
    out = []
    for region in ("thigh", "calf"):
        for i in range(n):
            infl, adip = (i * 0.37) % 1.0, 1.0 - (i * 0.29) % 1.0
            ph = generate(region, SEED0 + i, spacing=(1.5, 1.5, 6.0), supersample=1, infiltration=infl,
                          adiposity=adip)
            out.append(("template phantoms", f"{region}{SEED0 + i}", ph.water, ph.fat, ph.affine))
        i = 0
        while i < n_random:
            seed = SEED0 + 500 + i + 100 * (region == "calf")
            ph = generate(region, seed, supersample=1, randomize=True)
            i += 1
            if ph.options.get("swap"):
                continue
            out.append(("randomized phantoms", f"{region}{seed}r", ph.water, ph.fat, ph.affine))
    return out


def real_studies() -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """(group, name, water, fat, affine) of the real studies present."""
    out = []
    for name in REAL:
        if (REALDATA / name).is_dir():
            s = read_study(REALDATA / name)
            out.append((name, name, s.water, s.fat, s.affine))
    return out


def swap_truth(case: str, legs: np.ndarray, body: np.ndarray, spacing: tuple, rng: np.random.Generator,
               index: int) -> np.ndarray:
    """Bool (x, y, z): the voxels this case swaps."""
    shape = legs.shape
    if case == "none":
        return np.zeros(shape, bool)
    if case == "whole":
        return np.ones(shape, bool)
    if case == "leg":
        return legs == (1 + index % 2)
    if case == "slab":
        m = np.zeros(shape, bool)
        m[:, :, shape[2] // 3: max(shape[2] // 3 + 1, 2 * shape[2] // 3)] = True
        return m
    for _ in range(20):  # a blob that misses the body (under 1 % of it) is drawn again
        m = swap_mask(np.where(body, legs, 0), spacing, rng)
        if (m & body).sum() >= 0.01 * body.sum():
            break
    return m


def unit_truth(report: S.SwapReport, body_w: np.ndarray, truth: np.ndarray) -> list[float]:
    """Per unit of ``report``: the fraction of the leg's body voxels (work grid) that are swapped."""
    k = report.work_factor
    t = truth[::k, ::k][: body_w.shape[0], : body_w.shape[1]]
    ids = {"left": 1, "right": 2}
    out = []
    for u in report.units:
        m = body_w[:, :, u.z] & (report.legs[:, :, u.z] == ids[u.leg])
        out.append(float(t[:, :, u.z][m].mean()) if m.any() else 0.0)
    return out


EXPECTED = {"none": "none", "whole": "whole", "leg": "partial", "slab": "partial", "region": "partial"}
"""The right study verdict of each case."""
KEYS = ("det", "right", "sens", "psens", "fa", "rest", "harm", "t")


def judge_case(case: str, water: np.ndarray, fat: np.ndarray, affine: np.ndarray, truth: np.ndarray,
               body: np.ndarray, body_w: np.ndarray) -> dict:
    """One detection on water and fat exchanged where ``truth``; the measures of the table's columns."""
    w, f = np.where(truth, fat, water), np.where(truth, water, fat)
    t0 = time.perf_counter()
    rep = S.detect_swap(w, f, affine)
    dt = time.perf_counter() - t0
    frac = unit_truth(rep, body_w, truth)
    flagged = [u.verdict in ("swapped", "partial") for u in rep.units]
    exchanged = S.swap_region(rep, w.shape) & body
    tb = truth & body
    return {"det": [rep.any_swap], "right": [rep.verdict == EXPECTED[case]],
            "sens": [fl for fl, fr in zip(flagged, frac) if fr >= 0.5],
            "psens": [fl for fl, fr in zip(flagged, frac) if 0.1 <= fr < 0.5],
            "fa": [fl for fl, fr in zip(flagged, frac) if fr == 0.0],
            "rest": [float((exchanged & tb).sum() / tb.sum())] if tb.any() else [],
            "harm": [float((exchanged & ~tb).sum() / max((body & ~tb).sum(), 1))], "t": [dt],
            "report": rep}


def print_table(stats: dict[tuple[str, str], dict[str, list]]) -> list[str]:
    """Print the markdown table; returns the real studies' unswapped or whole cases with a wrong verdict."""
    def pct(v: list) -> str:
        return f"{np.mean(v):.1%} ({sum(v)}/{len(v)})" if len(v) else "-"

    print("\n| studies | swap | n | detected | right verdict | unit sens | part sens | unit FA | restored | harmed "
          "| s/study |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fails = []
    for g in dict.fromkeys(g for g, _ in stats):
        for case in CASES:
            st = stats.get((g, case))
            if not st:
                continue
            n = len(st["det"])
            det = f"{sum(st['det'])}/{n}" + (" false alarms" if case == "none" else "")
            rest = f"{np.mean(st['rest']):.1%}" if st["rest"] else "-"
            print(f"| {g} | {case} | {n} | {det} | {sum(st['right'])}/{n} | {pct(st['sens'])} | {pct(st['psens'])} "
                  f"| {pct(st['fa'])} | {rest} | {np.mean(st['harm']):.2%} | {np.median(st['t']):.2f} |")
            if g in REAL and case in ("none", "whole") and sum(st["right"]) < n:
                fails.append(f"{g} {case}")
    return fails


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6, help="template phantoms per region")
    ap.add_argument("--n-random", type=int, default=4, help="domain-randomised phantoms per region")
    ap.add_argument("--real-regions", type=int, default=4, help="region swaps drawn per real study")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--verbose", action="store_true", help="print every study's verdict")
    args = ap.parse_args()
    t_start = time.perf_counter()
    print(f"# legcomp fat-water swap benchmark; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    stats: dict[tuple[str, str], dict[str, list]] = {}
    for idx, (group, name, water, fat, affine) in enumerate(phantoms(args.n, args.n_random) + real_studies()):
        rng = np.random.default_rng(sum(map(ord, name)))  # each study's own draws
        water, fat = np.asarray(water, np.float32), np.asarray(fat, np.float32)
        body_w = S.work_grid(water, fat, affine)[2]
        body = body_mask(water + fat)
        legs = leg_map(body, affine)
        spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        for case in [c for c in CASES if c in args.cases.split(",")]:
            for _ in range(args.real_regions if case == "region" and group in REAL else 1):
                truth = swap_truth(case, legs, body, spacing, rng, idx)
                res = judge_case(case, water, fat, affine, truth, body, body_w)
                st = stats.setdefault((group, case), {k: [] for k in KEYS})
                for k in KEYS:
                    st[k] += res[k]
                if args.verbose:
                    rep = res["report"]
                    print(f"{name:22s} {case:7s} -> {rep.verdict:9s} {rep.n_units} {rep.note()}", flush=True)
    fails = print_table(stats)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if fails:
        print("FAIL: wrong verdict on " + ", ".join(fails), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
